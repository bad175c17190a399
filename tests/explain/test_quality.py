"""Quality cards: figures against plain references, thresholds, and cards of tiny and wrong backbones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from explain.nets.diffusion import DDIMScheduler, scheduler_config
from explain.nets.quality import (
    THRESHOLDS,
    bridge_card,
    c3lt_card,
    card_summary,
    denoising_losses,
    guided_samples,
    judge,
    knn_accuracy,
    psnr,
    sae_card,
)

from .gen_fixtures import images, one_thread, tiny_bridge, tiny_classifier, tiny_maps, tiny_sae, tiny_vae

__all__ = ["one_thread"]


def test_every_threshold_names_a_reason_and_a_direction():
    for kind, thresholds in THRESHOLDS.items():
        assert thresholds, kind
        for t in thresholds:
            assert t.op in (">=", "<=") and len(t.reason) > 30, (kind, t)


def test_judge_names_the_failing_figure_and_its_bar():
    card = judge("autoencoder", {"psnr_db": 14.2, "accuracy_drop": 0.01}, images=50)
    assert not card["passed"]
    assert card["failures"] == ["psnr_db = 14.2, needs >= 20"]
    assert card_summary(card).startswith("FAILED: psnr_db 14.2 (>= 20)")
    assert judge("autoencoder", {"psnr_db": 24.0, "accuracy_drop": 0.01}, images=50)["passed"]


def test_judge_fails_nan_and_refuses_unknown_kinds():
    assert not judge("sae", {"explained_variance": math.nan, "active_fraction": 0.1}, images=3)["passed"]
    with pytest.raises(ValueError, match="no quality card for backbone kind 'vae'"):
        judge("vae", {}, images=1)


def test_psnr_matches_a_plain_reference():
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(5, 1, 7, 7, generator=g), torch.rand(5, 1, 7, 7, generator=g)
    expected = np.mean(
        [10 * np.log10(1 / np.mean((a - b) ** 2)) for a, b in zip(x.numpy(), y.numpy(), strict=True)]
    )
    assert psnr(x, y) == pytest.approx(expected, rel=1e-5)


def test_knn_accuracy_matches_a_plain_reference():
    g = torch.Generator().manual_seed(4)
    train, test = torch.randn(40, 6, generator=g), torch.randn(15, 6, generator=g)
    train_y, test_y = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (15,), generator=g)
    hits = 0
    for v, label in zip(test.numpy(), test_y.tolist(), strict=True):
        sims = [np.dot(v, u) / np.linalg.norm(v) / np.linalg.norm(u) for u in train.numpy()]
        nearest = np.argsort(sims)[::-1][:5]
        hits += int(np.bincount(train_y.numpy()[nearest], minlength=3).argmax() == label)
    assert knn_accuracy(train, train_y, test, test_y) == pytest.approx(hits / 15)


def _constant_latents():
    """Every latent is the same vector c, so the ideal noise predictor is known in closed form."""
    c = torch.full((64, 4, 3, 3), 1.5)
    return c, torch.zeros(64, dtype=torch.long), DDIMScheduler(**scheduler_config()).alphas_cumprod


def test_an_ideal_noise_predictor_passes_the_denoising_bar():
    z0, labels, alphas = _constant_latents()

    def ideal(z_t, t, _labels):
        a = alphas[t].view(-1, 1, 1, 1)
        return (z_t - a.sqrt() * z0[: len(z_t)]) / (1 - a).sqrt()

    losses = denoising_losses(ideal, alphas, z0, labels, torch.Generator().manual_seed(0))
    assert max(losses.values()) < 1e-6
    card = judge("denoiser", {"eps_mse_mean": np.mean(list(losses.values())), "sample_accuracy": 1.0}, 64)
    assert card["passed"]


def test_a_denoiser_predicting_the_clean_latent_fails_its_card():
    """The wrong objective (x0- instead of eps-prediction), learnt perfectly: MSE = 1 + c^2 at every level."""
    z0, labels, alphas = _constant_latents()
    losses = denoising_losses(lambda z_t, t, _: z0[: len(z_t)], alphas, z0, labels, torch.Generator())
    assert all(v == pytest.approx(1 + 1.5**2, rel=0.1) for v in losses.values())
    card = judge("denoiser", {"eps_mse_mean": np.mean(list(losses.values())), "sample_accuracy": 1.0}, 64)
    assert not card["passed"]
    assert card["failures"][0].startswith("eps_mse_mean = 3.") and "needs <= 0.5" in card["failures"][0]


def test_untrained_c3lt_maps_flip_no_more_than_chance_and_fail():
    x = images(12, seed=1)
    maps = tiny_maps(a=0, b=1)
    card = c3lt_card(maps, tiny_vae(), tiny_classifier(), x[:6], x[6:])
    assert card["images"] == 12 and 0 <= card["figures"]["flip_rate"] <= 1
    assert card["figures"]["l1"] > 0
    assert not card["passed"]


def test_the_bridge_card_measures_inside_random_regions_of_a_fifth_to_a_third():
    x = images(8, seed=2)
    card = bridge_card(
        tiny_bridge(), tiny_classifier(), x, torch.zeros(8, dtype=torch.long), x.mean(0, True), steps=3
    )
    figures = card["figures"]
    assert figures["inpaint_l1_ratio"] == pytest.approx(
        figures["inpaint_l1"] / figures["inpaint_l1_mean_fill"]
    )
    assert {"bridge_mse_n99", "bridge_mse_n499", "bridge_mse_n999"} <= set(figures)
    assert not card["passed"]  # an untrained bridge inpaints noise


def test_sae_card_explained_variance_against_a_plain_reference():
    sae = tiny_sae()
    features = torch.randn(30, 8, generator=torch.Generator().manual_seed(5))
    card = sae_card(sae, features)
    with torch.no_grad():
        rec = sae(features).numpy()
    f = features.numpy()
    expected = 1 - ((f - rec) ** 2).sum() / ((f - f.mean(0)) ** 2).sum()
    assert card["figures"]["explained_variance"] == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        active = (sae.h_enc(features) > 0).float().mean().item()
    assert card["figures"]["active_fraction"] == pytest.approx(active, rel=1e-5)


class _TwoScores:
    """A denoiser whose unconditional score is 0 and whose conditional score is the label, everywhere."""

    null_class = 3
    scheduler = DDIMScheduler(**scheduler_config())

    def eps(self, z, t, labels):
        return labels.float().view(-1, 1, 1, 1).expand_as(z) * (labels != self.null_class).view(-1, 1, 1, 1)


def test_card_samples_follow_the_classifier_free_guided_score():
    """Scale s samples with eps_uc + s (eps_c - eps_uc): here s * label, so a DDIM run by hand with that
    constant score gives the same latents; scale 1 is the conditional score alone."""
    labels = torch.tensor([1, 2])
    for scale in (1.0, 1.5):
        z = guided_samples(_TwoScores(), labels, (1, 2, 2), 4, scale, torch.Generator().manual_seed(0))
        scheduler = DDIMScheduler(**scheduler_config())
        scheduler.set_timesteps(4)
        expected = torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            eps = scale * labels.float().view(-1, 1, 1, 1).expand_as(expected)
            expected = scheduler.step(eps, t, expected).prev_sample
        assert torch.allclose(z, expected, atol=1e-5)
    unguided = guided_samples(_TwoScores(), labels, (1, 2, 2), 4, 1.0, torch.Generator().manual_seed(0))
    assert not torch.allclose(z, unguided, atol=1e-3)  # the scale changes the samples
