"""The four generative methods through the common interface, on tiny random diffusers backbones: shapes,
determinism, batched == item-by-item, RCSB's exact region constraint, LDCE's consensus at 180 degrees, and the
shared helpers against plain reference implementations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from explain.methods import method_class
from explain.methods.c3lt import C3LT
from explain.methods.generative import (
    BatchAdam,
    Generated,
    GenerativeMethod,
    change_region,
    cout,
    gaussian_blur,
)
from explain.methods.ldce import LDCE, LDCETxt
from explain.methods.rcsb import RCSB, top_cells_region
from explain.methods.slc import SLC
from explain.nets.autoencoder import decode, encode
from explain.nets.split import SplitClassifier, frozen

from .gen_fixtures import (
    NUM_CLASSES,
    images,
    one_thread,  # noqa: F401 (autouse fixture)
    tiny_bridge,
    tiny_classifier,
    tiny_denoiser,
    tiny_maps,
    tiny_sae,
    tiny_vae,
)


def build(name: str, **overrides):
    if name == "c3lt":
        return C3LT(autoencoder=tiny_vae(), maps=tiny_maps(a=0, b=1), **overrides)
    if name == "slc":
        kw = {"stage1_steps": 3, "max_steps": 6, "lr": 0.1} | overrides
        return SLC(autoencoder=tiny_vae(), sae=tiny_sae(), **kw)
    if name == "ldce-cls":
        kw = {"num_inference_steps": 10, "start_step": 3} | overrides
        return LDCE(autoencoder=tiny_vae(), denoiser=tiny_denoiser(), **kw)
    if name == "rcsb":
        kw = {"steps": 4, "ig_steps": 3, "smooth_samples": 2, "cell_size": 4}
        return RCSB(bridge=tiny_bridge(), **(kw | overrides))
    raise AssertionError(name)


METHODS = ["c3lt", "slc", "ldce-cls", "rcsb"]
STOCHASTIC = ["slc", "ldce-cls", "rcsb"]


def targets_for(name: str, n: int) -> list[int]:
    """Classes the tiny classifier does not predict for these images (it predicts 0): methods must work."""
    return [1] * n if name == "c3lt" else [1 + i % (NUM_CLASSES - 1) for i in range(n)]


def test_registered_by_name():
    assert method_class("c3lt") is C3LT
    assert method_class("slc") is SLC
    assert method_class("ldce-cls") is LDCE
    assert method_class("ldce-txt") is LDCETxt
    assert method_class("rcsb") is RCSB


@pytest.mark.parametrize("name", METHODS)
def test_shapes_determinism_and_json(name):
    model, method, x = tiny_classifier(), build(name), images(2, seed=3)
    first = method.explain(
        model, x[:1], targets_for(name, 1)[0], x[1:], generator=torch.Generator().manual_seed(5)
    )
    again = method.explain(
        model, x[:1], targets_for(name, 1)[0], x[1:], generator=torch.Generator().manual_seed(5)
    )
    assert first.image.shape == (1, 16, 16) and first.image.dtype == np.float32
    assert first.query_mask.shape == (16, 16)
    assert set(np.unique(first.query_mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.query_mask, again.query_mask)
    record = json.loads(json.dumps(first.to_json()))
    assert record["config"]["method"] == name
    assert record["timings"]["region_area"] == pytest.approx(float(first.query_mask.mean()))
    assert any(k.startswith("nfe_") for k in record["timings"])
    assert 0.0 <= first.image.min() and first.image.max() <= 1.0  # what a stimulus can show
    shown = np.rint(first.image.astype(np.float64) * 255.0) / 255.0  # the worker's 8-bit pixels
    with torch.no_grad():
        p_cf = torch.softmax(model.g(model.f(torch.from_numpy(shown).float()[None])), -1)[0]
    assert first.scores[1] == pytest.approx(float(p_cf[first.target]), abs=1e-5)
    assert first.flipped == (int(p_cf.argmax()) == first.target)
    if name in STOCHASTIC:
        other = method.explain(model, x[:1], first.target, x[1:], generator=torch.Generator().manual_seed(6))
        assert not np.array_equal(first.image, other.image)


# SLC's stage 1 classifies D(E(D(z + dz))) (three autoencoder passes a step, as released), whose batched
# convolution rounding its normalised Adam steps and the L1 term's sign amplify over the steps: how much
# depends on the CPU's kernels (max 1.9e-4 on an Intel Xeon, 1.8e-3 on an AMD EPYC, both with AVX512-VNNI).
# Another seed's draws change these images by 0.8 at most and 0.13 on average, so 1e-2 still tells a wrong
# draw from rounding.
BATCHED_ATOL = {"slc": 1e-2}


@pytest.mark.parametrize("name", METHODS)
def test_batched_equals_item_by_item(name):
    model, method, x = tiny_classifier(), build(name), images(3, seed=7)
    targets = targets_for(name, 3)
    batched = method.explain_batch(
        model, x, targets, generator=torch.Generator().manual_seed(1), batch_size=3
    )
    generator = torch.Generator().manual_seed(1)
    single = [method.explain(model, x[i : i + 1], targets[i], None, generator=generator) for i in range(3)]
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_allclose(b.image, s.image, atol=BATCHED_ATOL.get(name, 1e-4), rtol=0)
        assert b.flipped == s.flipped and b.target == s.target
        assert np.mean(b.query_mask != s.query_mask) < 0.01  # a threshold may fall between the two


class _Fixed(GenerativeMethod):
    """Returns a given counterfactual, whatever the query."""

    name = "fixed"

    def __init__(self, x_cf: torch.Tensor):
        self.x_cf = x_cf

    def config(self):
        return {"method": self.name}

    def _generate(self, model, x, y, noise):
        return Generated(x_cf=self.x_cf.expand_as(x).clone())


THRESHOLD = 127.3 / 255  # the toy classifier's decision boundary on the mean pixel


def _brightness_classifier() -> SplitClassifier:
    """Class 1 when the mean pixel exceeds THRESHOLD, else class 0."""
    g = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 2))
    with torch.no_grad():
        g[1].weight.copy_(torch.stack([torch.zeros(256), torch.full((256,), 1000.0 / 256)]))
        g[1].bias.copy_(torch.tensor([0.0, -1000.0 * THRESHOLD]))
    return SplitClassifier(f=torch.nn.Identity(), g=g)


@pytest.mark.parametrize(
    ("case", "flips"), [("one pixel at 1000", False), ("127.4/255", False), ("127.6/255", True), ("1", True)]
)
def test_a_counterfactual_flips_only_as_the_8_bit_image_a_rater_is_shown(case, flips):
    """Every case is class 1 as floats; as shown (clamped to [0, 1], stored as 8-bit pixels) one pixel at
    1000 is 1 (mean 1/256), 127.4/255 is 127/255 (below the boundary), 127.6/255 is 128/255 (above)."""
    model, x = _brightness_classifier(), torch.zeros(1, 1, 16, 16)
    x_cf = torch.zeros(1, 1, 16, 16)
    if case == "one pixel at 1000":
        x_cf[..., 0, 0] = 1000.0
    else:
        x_cf[:] = {"127.4/255": 127.4 / 255, "127.6/255": 127.6 / 255, "1": 1.0}[case]
    with torch.no_grad():
        assert int(model.g(model.f(x_cf)).argmax()) == 1  # the floats would flip in every case
    result = _Fixed(x_cf).explain(model, x, 1)
    assert 0.0 <= result.image.min() and result.image.max() <= 1.0
    assert result.flipped is flips
    assert result.timings["l1"] == pytest.approx(float(x_cf.clamp(0, 1).mean()), abs=1e-6)
    assert result.timings["raw_out_of_range"] == (1 / 256 if case == "one pixel at 1000" else 0.0)


def test_rcsb_changes_no_pixel_outside_its_region():
    model = tiny_classifier()
    method = build("rcsb", s=5.0, area=0.3)
    x = images(4, seed=11)
    results = method.explain_batch(model, x, [1, 2, 3, 0], generator=torch.Generator().manual_seed(2))
    for query, r in zip(x, results, strict=True):
        outside = r.query_mask == 0
        assert outside.any() and (~outside).any()
        np.testing.assert_array_equal(r.image[0][outside], query[0].numpy()[outside])  # exactly
        assert np.abs(r.image[0][~outside] - query[0].numpy()[~outside]).max() > 1e-3  # inside, it moved
        assert r.query_mask.mean() <= 0.3 + 1e-6


def test_top_cells_region_against_a_plain_ranking():
    attribution = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    region = top_cells_region(attribution, 4, area=0.25)
    for i in range(2):
        sums = {
            (r, c): float(attribution[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].abs().sum())
            for r in range(4)
            for c in range(4)
        }
        best = sorted(sums, key=sums.get, reverse=True)[:4]  # 4 of 16 cells = 25 %
        expected = torch.zeros(16, 16)
        for r, c in best:
            expected[4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 1
        torch.testing.assert_close(region[i, 0], expected)


def test_ldce_consensus_at_180_degrees_equals_plain_guidance():
    model, x = tiny_classifier(), images(2, seed=4)
    plain = build("ldce-cls", consensus=False).explain_batch(
        model, x, [1, 2], generator=torch.Generator().manual_seed(3)
    )
    at_180 = build("ldce-cls", gamma=180.0).explain_batch(
        model, x, [1, 2], generator=torch.Generator().manual_seed(3)
    )
    strict = build("ldce-cls", gamma=0.0).explain_batch(
        model, x, [1, 2], generator=torch.Generator().manual_seed(3)
    )
    for p, c, s in zip(plain, at_180, strict, strict=True):
        np.testing.assert_allclose(c.image, p.image, atol=1e-5, rtol=0)
        assert c.timings["consensus_kept"] == 1.0
        assert s.timings["consensus_kept"] < 0.5
        assert np.abs(s.image - p.image).max() > 1e-4  # the filter does something when it filters


def test_c3lt_refuses_a_target_outside_its_pair():
    with pytest.raises(ValueError, match=r"classes 0 <-> 1; target 3"):
        build("c3lt").explain(tiny_classifier(), images(1), 3, None)


def test_bad_targets_and_shapes_are_named():
    method, model = build("rcsb"), tiny_classifier()
    with pytest.raises(ValueError, match=r"target 9 is not a class .* 4 classes"):
        method.explain(model, images(1), 9, None)
    with pytest.raises(ValueError, match=r"\(1, C, H, W\), not \(2, 1, 16, 16\)"):
        method.explain(model, images(2), 1, None)
    with pytest.raises(ValueError, match="2 queries but 1 targets"):
        method.explain_batch(model, images(2), [1])
    with pytest.raises(ValueError, match="tau"):
        RCSB(bridge=tiny_bridge(), tau=1.5)


def reference_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Direct 2-D Gaussian sum with reflected indices."""
    radius = int(np.ceil(3 * sigma))
    h, w = x.shape
    k = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    out = np.zeros_like(x)
    for r in range(h):
        for c in range(w):
            out[r, c] = sum(
                k[a + radius] * k[b + radius] * x[reflect(r + a, h), reflect(c + b, w)]
                for a in range(-radius, radius + 1)
                for b in range(-radius, radius + 1)
            )
    return out


def test_gaussian_blur_and_change_region_against_references():
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, x_cf = torch.rand(1, 1, 12, 12, generator=g), torch.rand(1, 1, 12, 12, generator=g)
        d = (x - x_cf).abs()[0, 0].double().numpy()
        np.testing.assert_allclose(
            gaussian_blur((x - x_cf).abs(), 1.0)[0, 0].numpy(), reference_blur(d, 1.0), atol=1e-5
        )
        region, (threshold,) = change_region(x, x_cf, 0.4, 1.0)
        smoothed = reference_blur(d, 1.0)
        assert threshold == pytest.approx(0.4 * smoothed.max(), rel=1e-5)
        np.testing.assert_array_equal(region[0, 0].numpy(), (smoothed >= threshold).astype(np.float32))
    region, (threshold,) = change_region(x, x.clone())
    assert region.sum() == 0 and threshold == 0


def test_batch_adam_matches_torch_adam_and_freezes_inactive_items():
    g = torch.Generator().manual_seed(0)
    param = torch.randn(3, 5, generator=g)
    reference = param.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([reference], lr=0.1)
    adam, mine = BatchAdam(param, alpha=0.1), param.clone()
    for _ in range(4):
        grad = torch.randn(3, 5, generator=g)
        reference.grad = grad.clone()
        optimiser.step()
        mine = mine - adam.direction(grad)
    torch.testing.assert_close(mine, reference.detach())
    before = adam.m.clone()
    step = adam.direction(torch.randn(3, 5, generator=g), torch.tensor([True, False, True]))
    assert torch.all(step[1] == 0) and torch.equal(adam.m[1], before[1])


def test_cout_against_a_plain_loop():
    model, g = tiny_classifier(), torch.Generator().manual_seed(1)
    for _ in range(3):
        x, x_cf = torch.rand(1, 1, 16, 16, generator=g), torch.rand(1, 1, 16, 16, generator=g)
        d = (x - x_cf).abs()[0, 0].flatten()
        order = sorted(range(256), key=lambda i: (-float(d[i]), i))
        probs = []
        for t in range(9):
            frame = x.clone().flatten()
            for i in order[: round(t * 256 / 8)]:
                frame[i] = x_cf.flatten()[i]
            with torch.no_grad():
                probs.append(torch.softmax(model.g(model.f(frame.view(1, 1, 16, 16))), -1)[0])
        aupc = sum((probs[t] + probs[t + 1]) / 2 for t in range(8)) / 8
        assert cout(model, x, x_cf, 0, 2, steps=8) == pytest.approx(float(aupc[2] - aupc[0]), abs=1e-6)


def direct_consensus(guide: torch.Tensor, implicit: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. (10)-(11) one 1x1 patch at a time: the angle by acos in float64, zeroed where it exceeds gamma."""
    out = guide.clone()
    b, _, h, w = guide.shape
    for i in range(b):
        for r in range(h):
            for c in range(w):
                u, v = guide[i, :, r, c].double(), implicit[i, :, r, c].double()
                angle = math.degrees(math.acos(max(-1.0, min(1.0, float(u @ v / (u.norm() * v.norm()))))))
                if angle > gamma:
                    out[i, :, r, c] = 0
    return out


@pytest.mark.parametrize("gamma", [45.0, 90.0, 135.0])
def test_ldce_consensus_at_intermediate_angles_equals_eq_10_11(gamma):
    from explain.methods.ldce import guided_score

    g = torch.Generator().manual_seed(int(gamma))
    eps_uc, eps_c, grad_c = (torch.randn(2, 4, 5, 5, generator=g) for _ in range(3))
    a_t = torch.tensor(0.6)
    eps, keep = guided_score(
        eps_uc, eps_c, grad_c, torch.zeros_like(grad_c), a_t,
        lambda_c=1.0, lambda_d=0.0, eta=1.0, gamma=gamma, enforce_same_norms=False,
    )  # fmt: skip
    expected = direct_consensus((1 - a_t).sqrt() * grad_c, eps_c - eps_uc, gamma)
    torch.testing.assert_close(eps - eps_uc, expected)
    assert 0 < float(keep.float().mean()) < 1  # some patches kept, some filtered


def test_ldce_renormalised_guidance_has_the_implicit_classifiers_norm():
    """enforce_same_norms: each weighted term has norm lambda ||eps_c - eps_uc|| per item, after filtering."""
    from explain.methods.ldce import guided_score

    g = torch.Generator().manual_seed(5)
    eps_uc, eps_c, grad_c, grad_d = (torch.randn(3, 4, 6, 6, generator=g) for _ in range(4))
    grad_c[1] *= 1000.0  # the raw scales differ wildly; the renormalised ones do not
    a_t = torch.tensor(0.3)
    implicit_norm = (eps_c - eps_uc).flatten(1).norm(dim=1)
    for lambda_c, lambda_d in ((2.3, 0.0), (0.0, 0.3)):
        eps, keep = guided_score(
            eps_uc, eps_c, grad_c, grad_d, a_t,
            lambda_c=lambda_c, lambda_d=lambda_d, eta=2.0, gamma=45.0, enforce_same_norms=True,
        )  # fmt: skip
        term = (eps - eps_uc) / 2.0
        torch.testing.assert_close(term.flatten(1).norm(dim=1), (lambda_c + lambda_d) * implicit_norm)
    # the classifier term keeps the filtered direction: zero where the consensus dropped a patch
    eps, keep = guided_score(
        eps_uc, eps_c, grad_c, grad_d, a_t,
        lambda_c=1.0, lambda_d=0.0, eta=1.0, gamma=45.0, enforce_same_norms=True,
    )  # fmt: skip
    assert bool(((eps - eps_uc) * ~keep == 0).all()) and not bool(keep.all())


def test_ldce_guidance_raises_the_target_probability_against_lambda_c_zero():
    """Paper defaults (consensus, renormalised), same noise: guidance moves the result towards the target."""
    model, x = tiny_classifier(), images(4, seed=7)
    targets = [1, 2, 1, 2]
    raised = []
    for lambda_c in (0.0, 2.3):
        method = build("ldce-cls", lambda_c=lambda_c, start_step=6)
        results = method.explain_batch(model, x, targets, generator=torch.Generator().manual_seed(11))
        raised.append([r.scores[1] for r in results])  # p(target | x_cf)
    assert all(guided > plain for plain, guided in zip(*raised, strict=True)), raised


def record_slc_decodes(monkeypatch) -> list[torch.Tensor]:
    """Every latent SLC decodes, in order (stage 1's, then stage 2's)."""
    import explain.methods.slc as slc_module

    seen: list[torch.Tensor] = []
    real = slc_module.decode

    def spy(vae, z, channels=None):
        seen.append(z.detach().clone())
        return real(vae, z, channels)

    monkeypatch.setattr(slc_module, "decode", spy)
    return seen


@pytest.mark.parametrize("stop_probability", [0.2, 0.95])
def test_slc_stage_2_edits_only_the_mask_and_stops_by_the_released_rule(monkeypatch, stop_probability):
    """Stage 2 changes the latent exactly nowhere outside its mask, and it stops at the first step that ends
    a run of 5 steps predicting the target with p(target) > stop_probability (judged on the perturbed edit
    the classifier saw), or after 25 steps; the result says which."""
    model, x = tiny_classifier(), images(2, seed=9)
    method = build("slc", stage1_steps=4, max_steps=25, lr=0.2, sigma=1.0, stop_probability=stop_probability)
    seen = record_slc_decodes(monkeypatch)
    masks = []
    real_optimise = SLC._optimise

    def spy(self, *args, **kwargs):
        if kwargs.get("perturb") is not None:
            masks.append(args[3].detach().clone())  # the stage-2 mask M
            seen.clear()  # keep stage 2's decodes only
        return real_optimise(self, *args, **kwargs)

    monkeypatch.setattr(SLC, "_optimise", spy)
    with torch.no_grad():
        z = method._encode(x) * method._vae.config.scaling_factor
    # target 0, the class the tiny classifier predicts (p near 0.3), can meet the rule; target 2 cannot
    results = method.explain_batch(model, x, [0, 2], generator=torch.Generator().manual_seed(2))
    (mask,) = masks
    outside = (mask == 0).expand_as(z)
    assert bool(outside.any()) and not bool(outside.all())
    stage2 = [int(r.timings["stage2_steps"]) for r in results]
    assert len(seen) == max(stage2) + 1  # one decode per step, then the counterfactual's

    def running(step: int) -> list[int]:
        """The items still running at a stage-2 step: SLC decodes only those, in order."""
        return [i for i, count in enumerate(stage2) if step < count]

    steps, final = seen[:-1], seen[-1]
    for step, latent in enumerate(steps):
        rows = running(step)
        assert latent.shape[0] == len(rows)
        assert torch.equal(latent[outside[rows]], z[rows][outside[rows]])  # the query's latent outside M
    assert torch.equal(final[outside], z[outside])
    assert any(not torch.equal(latent, z[running(step)]) for step, latent in enumerate(steps))  # edits in M
    for i, r in enumerate(results):
        with torch.no_grad():
            probabilities = [
                torch.softmax(
                    model.g(model.f(decode(method._vae, steps[k][running(k).index(i)][None], 1))), -1
                )[0]
                for k in range(stage2[i])
            ]
        run, first_stop = 0, None
        for step, p in enumerate(probabilities):
            hit = int(p.argmax()) == r.target and float(p[r.target]) > stop_probability
            run = run + 1 if hit else 0
            if run >= 5 and first_stop is None:
                first_stop = step
        if r.timings["stage2_stopped_by_rule"] == 1.0:
            assert first_stop == stage2[i] - 1  # stopped exactly when the run of five completed
        else:
            assert first_stop is None and stage2[i] == 25  # the cap: 25 steps
    if stop_probability == 0.2:  # one item stops by the rule, one at the cap
        assert [r.timings["stage2_stopped_by_rule"] for r in results] == [1.0, 0.0]


def reference_slc(method: SLC, model, x: torch.Tensor, target: int, noise: torch.Tensor) -> torch.Tensor:
    """The released ``LatentEditPipeline.forward`` for one image, written out plainly: Adam on a delta that
    starts at 0 in each stage; the classifier sees D(z + (delta + s n_k) M) (stage 1: through D(E(.)),
    s = 0, M = 1); stop after 5 consecutive steps predicting the target above the threshold; the mask from
    the positive part of the summed gradients, summed over channels, scipy's Gaussian filter, / max, zeroed
    below t; the counterfactual D(z + delta M) without noise. Latents in the autoencoder's own units."""
    from scipy import ndimage

    vae, scale, channels = method._vae, method._vae.config.scaling_factor, x.shape[1]
    with torch.no_grad():
        z = encode(vae, x) / scale

    def run(mask, steps, strength, first_phase):
        delta = torch.zeros_like(z)
        m1, m2 = torch.zeros_like(z), torch.zeros_like(z)  # Adam's moments (Kingma & Ba, algorithm 1)
        gradients = torch.zeros_like(z)
        left = method.stop_patience
        for k in range(steps):
            delta.requires_grad_(True)
            image = decode(vae, (z + (delta + strength * noise[k]) * mask) * scale, channels)
            if first_phase:
                image = decode(vae, encode(vae, image), channels)
            logits = model.g(model.f(image))
            p = torch.softmax(logits, 1)[0, target]
            if int(logits.argmax(1)) == target and float(p) > method.stop_probability:
                left -= 1
            else:
                left = method.stop_patience
            if left <= 0:
                break
            loss = -logits[0, target] + method.lambda_s * delta.abs().mean()
            (grad,) = torch.autograd.grad(loss, delta)
            m1 = 0.9 * m1 + 0.1 * grad
            m2 = 0.999 * m2 + 0.001 * grad**2
            n = torch.tensor(k + 1.0)  # the step count in float32, as the method keeps it
            m_hat, v_hat = m1 / (1 - 0.9**n), m2 / (1 - 0.999**n)
            delta = (delta - method.lr * m_hat / (v_hat.sqrt() + 1e-8)).detach()
            gradients += grad
        return (delta * mask).detach(), gradients

    with frozen(vae, model.f, model.g):
        _, gradients = run(torch.ones_like(z), method.stage1_steps, 0.0, True)
        m = gradients[0].clamp(min=0).sum(0).numpy().astype(np.float64)
        m = ndimage.gaussian_filter(m, sigma=method.sigma)
        m = m / m.max()
        m[m < method.t] = 0
        mask = torch.from_numpy(m).float()[None, None]
        delta, _ = run(mask, method.max_steps, method.perturbation, False)
        with torch.no_grad():
            return decode(vae, (z + delta) * scale, channels)


@pytest.mark.parametrize("stop_probability", [0.3, 0.95])
def test_slc_equals_a_plain_reference_of_the_released_pipeline(stop_probability):
    """The whole method against ``reference_slc`` on fresh random inputs, with the same noise draws, on an
    autoencoder whose scaling factor is not 1 (the release edits unscaled latents). Item by item: Adam's
    normalised steps and the L1 term's sign turn float rounding into visible differences over many steps,
    which the tolerance (far below the effect of any departure from the release) absorbs."""
    pytest.importorskip("scipy")
    model, x = tiny_classifier(seed=3), images(2, seed=21)
    vae = tiny_vae(seed=5)
    vae.register_to_config(scaling_factor=0.5)
    method = SLC(
        autoencoder=vae, lr=0.05, stage1_steps=6, max_steps=12, sigma=0.7, t=0.4, perturbation=0.3,
        stop_probability=stop_probability,
    )  # fmt: skip
    targets = [2, 3]  # this tiny classifier predicts 2 (p near 0.33): with 0.3 the rule stops item 0
    by_rule = []
    for i, seed in enumerate((7, 8)):
        query = x[i : i + 1]
        (r,) = method.explain_batch(model, query, [targets[i]], generator=torch.Generator().manual_seed(seed))
        noise = method._noise(query, torch.Generator().manual_seed(seed))["noise"][0]  # (steps, D, h, w)
        expected = reference_slc(method, model, query, targets[i], noise[:, None])
        np.testing.assert_allclose(r.image, expected[0].clamp(0, 1).numpy(), atol=1e-3)  # shown: clamped
        by_rule.append(r.timings["stage2_stopped_by_rule"])
    assert by_rule == ([1.0, 0.0] if stop_probability == 0.3 else [0.0, 0.0])  # both paths ran


def test_slc_stage_2_starts_from_zero_and_does_not_accumulate_its_perturbation(monkeypatch):
    """With lr = 0 the edit never moves: every stage-2 step sees z + s n_k M (a fresh draw, not a sum of
    draws, and no draw at the start), and the counterfactual is D(z), the query's reconstruction."""
    model, x = tiny_classifier(), images(1, seed=4)
    method = build("slc", lr=0.0, max_steps=5, sigma=0.5, t=0.0, perturbation=0.7, stop_probability=0.99)
    seen = record_slc_decodes(monkeypatch)
    masks = []
    real_optimise = SLC._optimise

    def spy(self, *args, **kwargs):
        if kwargs.get("perturb") is not None:
            masks.append(args[3].detach().clone())
            seen.clear()
        return real_optimise(self, *args, **kwargs)

    monkeypatch.setattr(SLC, "_optimise", spy)
    (r,) = method.explain_batch(model, x, [2], generator=torch.Generator().manual_seed(6))
    noise = method._noise(x, torch.Generator().manual_seed(6))["noise"][0]
    with torch.no_grad():
        z = encode(method._vae, x)
        recon = decode(method._vae, z, 1)
    (mask,) = masks
    assert len(seen) == 5 + 1
    for k in range(5):
        torch.testing.assert_close(seen[k], z + 0.7 * noise[k][None] * mask, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.image, recon[0].clamp(0, 1).numpy(), atol=1e-6)  # shown: clamped


def test_slc_stage_1_classifies_the_autoencoders_round_trip_of_the_edit(monkeypatch):
    """Stage 1 (mask 1, no perturbation) decodes z + dz, encodes that image and decodes again: three
    autoencoder passes a step, the second decode being of E(D(z + dz))."""
    import explain.methods.slc as slc_module

    model, x = tiny_classifier(), images(1, seed=12)
    method = build("slc", stage1_steps=3, stop_probability=0.99)
    calls: list[tuple[str, torch.Tensor]] = []
    real_encode, real_decode = slc_module.encode, slc_module.decode

    def enc(vae, image):
        out = real_encode(vae, image)
        calls.append(("E", out.detach().clone()))
        return out

    def dec(vae, z, channels=None):
        calls.append(("D", z.detach().clone()))
        return real_decode(vae, z, channels)

    monkeypatch.setattr(slc_module, "encode", enc)
    monkeypatch.setattr(slc_module, "decode", dec)
    method.explain_batch(model, x, [3], generator=torch.Generator().manual_seed(0))
    kinds = "".join(kind for kind, _ in calls)
    # E(x) in _noise and in _generate, then three steps of D E D, then stage 2
    assert kinds.startswith("EE" + "DED" * 3 + "D") and not kinds.startswith("EE" + "DED" * 4)
    for step in range(3):
        _, encoded = calls[2 + 3 * step + 1]
        _, decoded_again = calls[2 + 3 * step + 2]
        assert torch.equal(encoded, decoded_again)


@pytest.mark.parametrize("only_positive", [True, False])
def test_slc_mask_follows_the_released_rule_on_a_hand_made_gradient(only_positive):
    """Eq. (5) as released: positive part (or magnitude) of the aggregated gradients, summed over channels,
    scipy's gaussian_filter, divided by the max, zeroed below t (kept soft above it)."""
    from explain.methods.slc import lag_mask

    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.zeros(1, 2, 9, 7)
    g[0, 0, 2, 1], g[0, 1, 2, 1] = 3.0, -1.0
    g[0, 0, 6, 5], g[0, 1, 6, 4] = -4.0, 1.5
    g[0, 1, 8, 0] = 2.0
    expected = (np.clip(g[0].numpy(), 0, None) if only_positive else np.abs(g[0].numpy())).sum(0)
    expected = ndimage.gaussian_filter(expected.astype(np.float64), sigma=1.3)
    expected = expected / expected.max()
    expected[expected < 0.3] = 0
    got = lag_mask(g, sigma=1.3, t=0.3, only_positive=only_positive)
    assert got.shape == (1, 1, 9, 7)
    np.testing.assert_allclose(got[0, 0].numpy(), expected, atol=1e-6)
    assert 0 < float((got > 0).float().mean()) < 1 and float(got.max()) == pytest.approx(1.0)
    assert len(np.unique(expected[expected > 0])) > 2  # a soft mask, not a binary one


def test_slc_trait_codes_weight_the_features_by_the_mask_as_released():
    """Eq. (7) as in the release's SAE pipeline: the mask resized to the feature grid by torchvision's
    bicubic resize, min-max normalised, multiplies the spatial features before the average pool and h_enc;
    the reference codes are those of the reconstruction D(E(x))."""
    tv = pytest.importorskip("torchvision.transforms.functional")
    method = build("slc")
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 1:4, 2:6] = torch.tensor([0.5, 0.8, 1.0, 0.6])
    features = torch.randn(1, 8, 3, 3, generator=g)
    weight = tv.resize(mask[:, 0], [3, 3], interpolation=tv.InterpolationMode.BICUBIC)
    weight = (weight - weight.min()) / (weight - weight.min()).max()
    expected = method._sae.h_enc((features * weight[:, None]).mean(dim=(-2, -1)))
    torch.testing.assert_close(method._traits(features, mask), expected, rtol=1e-5, atol=1e-6)

    model, x = tiny_classifier(), images(1, seed=2)
    calls = []
    real = SLC._traits

    def spy(self, feats, m):
        calls.append(feats.detach().clone())
        return real(self, feats, m)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SLC, "_traits", spy)
        (r,) = method.explain_batch(model, x, [1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reconstruction = decode(method._vae, encode(method._vae, x), 1)
        torch.testing.assert_close(calls[0], model.f(reconstruction), rtol=1e-5, atol=1e-6)
    # then one call per stage-2 step that updates (not the step that completes the stopping run)
    assert len(calls) == 1 + int(r.timings["stage2_steps"]) - int(r.timings["stage2_stopped_by_rule"])


@pytest.mark.parametrize(("n", "sigma"), [(7, 0.5), (14, 3.0), (5, 3.0), (9, 1.3)])
def test_slc_blur_matrix_equals_scipy_gaussian_filter1d(n, sigma):
    """Reflect borders (d c b a | a b c d), radius int(4 sigma + 0.5), also when the radius exceeds n."""
    from explain.methods.slc import reflect_blur_matrix

    ndimage = pytest.importorskip("scipy.ndimage")
    v = np.random.default_rng(n).normal(size=n)
    got = reflect_blur_matrix(n, sigma, dtype=torch.float64) @ torch.from_numpy(v)
    np.testing.assert_allclose(got.numpy(), ndimage.gaussian_filter1d(v, sigma), atol=1e-12)


def test_bridge_coefficients_equal_the_i2sb_posterior_computed_independently():
    """I2SB: symmetric betas, sigma_t^2 = sum of betas to t, bar sigma_t^2 = the rest; q(x_t | x_0, x_1) and
    the OT-ODE step are Gaussian products (compute_gaussian_product_coef), here in float64 numpy."""
    from explain.nets.bridge import BridgeSchedule, InpaintingBridge

    n, beta_max = 200, 1.0
    betas = np.linspace(1e-4**0.5, (beta_max / n) ** 0.5, n) ** 2
    betas = np.concatenate([betas[: n // 2], np.flip(betas[: n - n // 2])])
    sigma = np.sqrt(np.cumsum(betas))
    sigma_bar = np.sqrt(np.flip(np.cumsum(np.flip(betas))))
    schedule = BridgeSchedule(num_timesteps=n)
    assert schedule.beta_max == beta_max  # the released default
    bridge = InpaintingBridge(unet=None, schedule=schedule)
    x0, x1 = torch.full((1, 1, 2, 2), 0.25), torch.full((1, 1, 2, 2), -2.0)
    for t in (0, 37, 99, 150, 199):
        denom = sigma[t] ** 2 + sigma_bar[t] ** 2
        mean = sigma_bar[t] ** 2 / denom * 0.25 + sigma[t] ** 2 / denom * -2.0
        std = np.sqrt(sigma[t] ** 2 * sigma_bar[t] ** 2 / denom)
        got = bridge.posterior_sample(x0, x1, t, None)
        np.testing.assert_allclose(got.numpy(), mean, rtol=1e-5)
        noisy = bridge.posterior_sample(x0, x1, t, torch.ones_like(x0))
        np.testing.assert_allclose((noisy - got).numpy(), std, rtol=1e-4)
    for prev, t in ((0, 10), (37, 99), (120, 199)):
        delta2 = sigma[t] ** 2 - sigma[prev] ** 2  # std_delta^2
        denom = sigma[prev] ** 2 + delta2
        mu, mu_bar = bridge.step_coefficients(prev, t)
        assert mu == pytest.approx(delta2 / denom, rel=1e-5)
        assert mu_bar == pytest.approx(sigma[prev] ** 2 / denom, rel=1e-5)


@pytest.mark.parametrize("area", [0.1, 0.3, 0.55])
def test_rcsb_region_area_is_the_requested_fraction_and_comes_from_the_predicted_class(area):
    """Cells of 4 px on 16 px images: 16 cells; the region holds floor(area x 16) of them (at least one), and
    it is the same whatever the target (it explains the predicted class, not the target)."""
    model, x = tiny_classifier(), images(3, seed=13)
    method = build("rcsb", area=area)
    noise = torch.randn(3, 2, *x.shape[1:], generator=torch.Generator().manual_seed(4))
    region = method.region(model, x, noise)
    expected_cells = max(1, math.floor(area * 16 + 1e-9))
    for r in region:
        assert float(r.mean()) == pytest.approx(expected_cells / 16)
        assert float(r.mean()) <= area or expected_cells == 1
    again = build("rcsb", area=area).explain_batch(
        model, x, [1, 2, 3], generator=torch.Generator().manual_seed(5)
    )
    other = build("rcsb", area=area).explain_batch(
        model, x, [2, 3, 1], generator=torch.Generator().manual_seed(5)
    )
    for a, b in zip(again, other, strict=True):
        np.testing.assert_array_equal(a.query_mask, b.query_mask)


def test_rcsb_region_is_smoothgrad_of_ig_of_the_predicted_class():
    """Against a plain loop, as the release runs Captum: IG by 5 Gauss-Legendre points on [0, 1] (numpy's
    nodes x and weights w: a = (x + 1) / 2, weights w / 2) over noisy copies x + 0.05 noise (absolute, in
    pixel units), averaged over the copies."""
    from explain.methods.rcsb import smoothgrad_ig

    model, x = tiny_classifier(), images(2, seed=14)
    noise = torch.randn(3, 2, *x.shape[1:], generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        predicted = model.g(model.f(x)).argmax(-1)
    nodes, weights = np.polynomial.legendre.leggauss(5)
    expected = torch.zeros_like(x)
    for k in range(3):
        for i in range(2):
            copy = x[i : i + 1] + 0.05 * noise[k, i : i + 1]
            grads = torch.zeros_like(copy)
            for node, weight in zip(nodes, weights, strict=True):
                point = (float(node + 1) / 2 * copy).requires_grad_(True)
                (g,) = torch.autograd.grad(model.g(model.f(point))[0, predicted[i]], point)
                grads += float(weight) / 2 * g
            expected[i] += (copy * grads)[0] / 3
    got = smoothgrad_ig(model, x, predicted, 5, noise, 0.05)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_per_item_generators_give_each_item_its_one_by_one_result(name):
    """The precompute's per-unit seeds: item i of a batch draws from generators[i], so it equals item i
    explained alone with that generator (up to the rounding of batched convolutions)."""
    model, method, x = tiny_classifier(), build(name), images(3, seed=8)
    targets, seeds = targets_for(name, 3), [101, 202, 303]
    batched = method.explain_batch(
        model, x, targets, generators=[torch.Generator().manual_seed(s) for s in seeds], batch_size=3
    )
    for i, b in enumerate(batched):
        alone = method.explain(
            model, x[i : i + 1], targets[i], None, generator=torch.Generator().manual_seed(seeds[i])
        )
        np.testing.assert_allclose(b.image, alone.image, atol=BATCHED_ATOL.get(name, 1e-4), rtol=0)
        assert b.flipped == alone.flipped and b.timings.get("nfe_classifier") == alone.timings.get(
            "nfe_classifier"
        )
        assert np.mean(b.query_mask != alone.query_mask) < 0.01
    if name in STOCHASTIC:  # the seeds are really used: one shared generator gives other draws
        shared = method.explain_batch(model, x, targets, generator=torch.Generator().manual_seed(101))
        assert not np.allclose(shared[1].image, batched[1].image, atol=1e-3)
    with pytest.raises(ValueError, match="one per query"):
        method.explain_batch(model, x, targets, generators=[torch.Generator()])


@pytest.mark.parametrize("name", STOCHASTIC)
def test_each_batched_item_gets_exactly_the_noise_it_gets_alone(name, monkeypatch):
    """What holds exactly whatever the rounding: item i of a batch receives, bit for bit, the draws it
    receives explained alone with generators[i] (SLC's and RCSB's Adam steps can turn batched rounding into
    visibly different images, so their batched images equal the one-by-one ones only approximately)."""
    model, method, x = tiny_classifier(), build(name), images(3, seed=9)
    targets, seeds = targets_for(name, 3), [11, 22, 33]
    seen = []
    generate = type(method)._generate

    def capturing(self, model, x, y, noise):
        seen.append({k: v.clone() for k, v in noise.items()})
        return generate(self, model, x, y, noise)

    monkeypatch.setattr(type(method), "_generate", capturing)
    method.explain_batch(model, x, targets, generators=[torch.Generator().manual_seed(s) for s in seeds])
    for i in range(3):
        method.explain(
            model, x[i : i + 1], targets[i], None, generator=torch.Generator().manual_seed(seeds[i])
        )
    batched, alone = seen[0], seen[1:]
    assert batched  # the method draws noise
    for i in range(3):
        for key, value in batched.items():
            assert torch.equal(value[i : i + 1], alone[i][key]), (name, key, i)


def reference_ldce(method: LDCE, model, x: torch.Tensor, y: torch.Tensor, eps_noise: torch.Tensor):
    """LDCE-cls written plainly from the equations: per step one pass of the denoiser on the unconditional
    and conditional inputs together, z0_hat from the unconditional score (Eq. 4), and each guidance
    gradient by its own backward pass; then Eq. 6 with consensus and renormalisation, and DDIM (Eq. 5)."""
    from explain.methods.ldce import guided_score

    scheduler = method._denoiser.scheduler
    scheduler.set_timesteps(method.num_inference_steps)
    timesteps = scheduler.timesteps[-method.start_step :].tolist()
    alphas, d = scheduler.alphas_cumprod, method._denoiser
    with torch.no_grad():
        z_0 = encode(method._vae, x)
    z_t = alphas[timesteps[0]].sqrt() * z_0 + (1 - alphas[timesteps[0]]).sqrt() * eps_noise
    for i, t in enumerate(timesteps):
        a_t = alphas[t]
        a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else scheduler.final_alpha_cumprod
        z_t = z_t.detach().requires_grad_(True)
        null = torch.full_like(y, d.null_class)
        eps_uc, eps_c = d.eps(torch.cat([z_t, z_t]), t, torch.cat([null, y])).chunk(2)
        x0_hat = decode(method._vae, (z_t - (1 - a_t).sqrt() * eps_uc) / a_t.sqrt(), x.shape[1])
        l_c = torch.nn.functional.cross_entropy(model.g(model.f(x0_hat)), y, reduction="sum")
        l_d = (x0_hat.clamp(0, 1) - x).abs().sum()
        (grad_c,) = torch.autograd.grad(l_c, z_t, retain_graph=True)
        (grad_d,) = torch.autograd.grad(l_d, z_t)
        eps, _ = guided_score(
            eps_uc, eps_c, grad_c, grad_d, a_t, lambda_c=method.lambda_c, lambda_d=method.lambda_d,
            eta=method.eta, gamma=method.gamma if method.consensus else None,
            enforce_same_norms=method.enforce_same_norms,
        )  # fmt: skip
        with torch.no_grad():
            z0_pred = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            z_t = a_prev.sqrt() * z0_pred + (1 - a_prev).sqrt() * eps
    with torch.no_grad():
        return decode(method._vae, z_t, x.shape[1])


@pytest.mark.parametrize("seed", [3, 17])
@pytest.mark.parametrize(
    "settings", [{}, {"consensus": False}, {"consensus": False, "enforce_same_norms": False}]
)
def test_ldce_matches_the_plain_reference_on_random_inputs(seed, settings):
    """The method's step (the conditional score outside the graph, two backward passes through the
    unconditional one only) gives the reference's counterfactuals on fresh random images and noise."""
    model, x = tiny_classifier(), images(3, seed=seed)
    y = torch.tensor([1 + (seed + i) % (NUM_CLASSES - 1) for i in range(3)])
    method = build("ldce-cls", start_step=5, lambda_c=4.0, **settings)
    noise = method._noise(x, torch.Generator().manual_seed(seed))
    with frozen(method._vae, method._denoiser.unet, model.f, model.g):
        expected = reference_ldce(method, model, x, y, noise["eps"])
        got = method._generate(model, x, y, noise).x_cf
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)  # float sums over other batch sizes


def test_the_full_demos_ldce_departs_only_where_the_paper_tunes_per_data_set():
    """LDCE's paper fixes eta, respacing, consensus and the distance, and tunes T, lambda_c, gamma and
    lambda_d on a few examples of each data set (section 4): ldce-cls-fashion-mnist, the full demo's,
    departs only there; the constructor's defaults are Table 5's ImageNet column."""
    from explain.methods import registered
    from studies.demo import BUDGETS, demo_methods

    config = LDCE(autoencoder=tiny_vae(), denoiser=tiny_denoiser()).config()
    table_5 = {"num_inference_steps": 500, "start_step": 191, "gamma": 45.0, "lambda_c": 2.3, "lambda_d": 0.3}
    fixed = {"eta": 2.0, "consensus": True, "enforce_same_norms": True}
    assert {k: config[k] for k in table_5 | fixed} == table_5 | fixed
    tuned = registered("ldce-cls-fashion-mnist")
    assert set(tuned.config()) <= {"start_step", "lambda_c", "gamma", "lambda_d"}, tuned.config()
    assert "ldce-cls-fashion-mnist" in demo_methods(BUDGETS["full"])[0]
