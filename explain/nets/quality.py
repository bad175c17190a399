"""Quality cards: how good a backbone is, measured on held-out images, and whether it is good enough to
drive a study.

A card is a dict ``{"kind", "figures": {name: value}, "thresholds": [...], "passed": bool, "failures": [...],
"images": n}``. Each ``<kind>_card`` function measures the figures of one backbone kind; ``judge`` compares
them with ``THRESHOLDS``, the one place where the bar of every kind is set, each with its reason. Images are
pixels in [0, 1] (N, C, H, W), the scale every generative backbone is trained on; the classifier is a
``SplitClassifier`` that reads that scale (its normalisation inside ``f``). Everything runs on the CPU in
chunks and draws its randomness from a seeded ``torch.Generator``, so a card is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain.methods.base import SplitClassifier


@dataclass(frozen=True)
class Threshold:
    """``figure`` must be ``>=`` or ``<=`` ``value``; ``reason`` says why that bar."""

    figure: str
    op: str
    value: float
    reason: str

    def holds(self, measured: float) -> bool:
        if math.isnan(measured):
            return False
        return measured >= self.value if self.op == ">=" else measured <= self.value

    def as_dict(self) -> dict[str, Any]:
        return {"figure": self.figure, "op": self.op, "value": self.value, "reason": self.reason}


# The bar of every backbone kind, in one place. Chance for a 10-class data set is 0.1.
THRESHOLDS: dict[str, tuple[Threshold, ...]] = {
    "autoencoder": (
        Threshold(
            "psnr_db",
            ">=",
            20.0,
            "below 20 dB a 28 px garment loses its texture and edges: C3LT's, "
            "SLC's and LDCE's images are then blurs of the autoencoder, not of the method",
        ),
        Threshold(
            "accuracy_drop",
            "<=",
            0.05,
            "the classifier must see a reconstruction as it sees the "
            "original (at most 5 points less accurate), or counterfactuals flip on artefacts",
        ),
    ),
    "denoiser": (
        Threshold(
            "eps_mse_mean",
            "<=",
            0.5,
            "predicting zero noise scores 1.0 and predicting the clean latent "
            "about 2; a denoiser that learnt eps-prediction is well below both across noise levels",
        ),
        Threshold(
            "sample_accuracy",
            ">=",
            0.6,
            "class-conditional samples (guided as LDCE's Eq. 8 with eta = 2, SAMPLE_GUIDANCE_SCALE) "
            "must look like their class to the classifier (chance 0.1), or LDCE's guidance works against a "
            "prior that knows no classes",
        ),
    ),
    "bridge": (
        Threshold(
            "inpaint_l1_ratio",
            "<=",
            0.9,
            "inside a random region the bridge must beat filling it "
            "with the mean training image by 10% (L1), or RCSB paints noise or blocks",
        ),
        Threshold(
            "inpainted_accuracy",
            ">=",
            0.7,
            "images with 20-30% of their area inpainted must keep "
            "their class for the classifier, or RCSB's flips come from broken images",
        ),
    ),
    "sae": (
        Threshold(
            "explained_variance",
            ">=",
            0.8,
            "SLC's trait loss reads the classifier through the SAE: "
            "it must keep 80% of the pooled features' variance",
        ),
        Threshold(
            "active_fraction",
            "<=",
            0.5,
            "a sparse code uses at most half of its latents per image; a dense one has no traits to steer",
        ),
    ),
    "c3lt_maps": (
        Threshold(
            "flip_rate",
            ">=",
            0.9,
            "the maps are C3LT's counterfactuals: they must flip 90% of held-out "
            "images of the pair (the demo's floor for every generative method)",
        ),
        Threshold(
            "l1",
            "<=",
            0.15,
            "mean absolute pixel change at most 0.15: a counterfactual is the query "
            "changed, not another garment",
        ),
    ),
    "auxiliary": (
        Threshold(
            "part_clustering_accuracy",
            ">=",
            0.5,
            "SCOUT and the semantic setup match cells by parts; "
            "clustered cell embeddings must name the part of half the keypoints",
        ),
        Threshold(
            "knn_accuracy",
            ">=",
            0.6,
            "without keypoints: a 5-NN vote on pooled cell embeddings must "
            "find the class of 60% of held-out images (chance 0.1), or 'semantically similar' is noise",
        ),
    ),
}


def judge(kind: str, figures: dict[str, float], images: int) -> dict[str, Any]:
    """The card of a backbone of ``kind``: its figures against ``THRESHOLDS[kind]`` (a figure it has none of,
    e.g. part clustering without keypoints, is left out)."""
    if kind not in THRESHOLDS:
        raise ValueError(f"no quality card for backbone kind {kind!r}; known: {', '.join(THRESHOLDS)}")
    checked = [t for t in THRESHOLDS[kind] if t.figure in figures]
    failures = [
        f"{t.figure} = {figures[t.figure]:.4g}, needs {t.op} {t.value:g}"
        for t in checked
        if not t.holds(float(figures[t.figure]))
    ]
    return {
        "kind": kind,
        "figures": {k: float(v) for k, v in figures.items()},
        "thresholds": [t.as_dict() for t in checked],
        "passed": not failures,
        "failures": failures,
        "images": images,
    }


def _chunks(x: Tensor, size: int = 256) -> list[Tensor]:
    return list(x.split(size))


@torch.no_grad()
def _predict(model: SplitClassifier, x: Tensor) -> Tensor:
    return torch.cat([model.g(model.f(chunk)).argmax(-1) for chunk in _chunks(x)])


@torch.no_grad()
def psnr(x: Tensor, y: Tensor) -> float:
    """Mean PSNR (dB) over images, pixels in [0, 1]."""
    mse = ((x.clamp(0, 1) - y) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


@torch.no_grad()
def autoencoder_card(vae: nn.Module, model: SplitClassifier, x: Tensor, y: Tensor) -> dict[str, Any]:
    """PSNR of reconstructions D(E(x)) and the classifier's accuracy on them vs on the originals."""
    from explain.nets.autoencoder import decode, encode

    reconstruction = torch.cat([decode(vae, encode(vae, chunk)).clamp(0, 1) for chunk in _chunks(x)])
    original = float((_predict(model, x) == y).float().mean())
    rebuilt = float((_predict(model, reconstruction) == y).float().mean())
    figures = {
        "psnr_db": psnr(reconstruction, x),
        "accuracy_original": original,
        "accuracy_reconstruction": rebuilt,
        "accuracy_drop": original - rebuilt,
    }
    return judge("autoencoder", figures, len(x))


NOISE_LEVELS = (50, 250, 500, 750, 950)


@torch.no_grad()
def denoising_losses(
    eps: Callable[[Tensor, Tensor, Tensor], Tensor],
    alphas_cumprod: Tensor,
    z0: Tensor,
    labels: Tensor,
    generator: torch.Generator,
    levels: tuple[int, ...] = NOISE_LEVELS,
) -> dict[int, float]:
    """eps-prediction MSE at each noise level t (Eq. 2 of LDCE): z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps."""
    out = {}
    for t in levels:
        noise = torch.randn(z0.shape, generator=generator)
        a = alphas_cumprod[t]
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        steps = torch.full((len(z0),), t, dtype=torch.long)
        prediction = torch.cat(
            [
                eps(zc, tc, cc)
                for zc, tc, cc in zip(_chunks(z_t), _chunks(steps), _chunks(labels), strict=True)
            ]
        )
        out[t] = float(F.mse_loss(prediction, noise))
    return out


# Classifier-free guidance scale of the card's class-conditional samples: LDCE's Eq. (8),
# eps(z) + eta (eps(z, c) - eps(z)) (Ho & Salimans), with the paper's eta = 2 (Sec. 4, implementation details;
# ``LDCE(eta=2.0)``). Its direction eps(z, c) - eps(z) is the implicit classifier LDCE's consensus filter and
# gradient renormalisation read. (The LDM paper samples its class-conditional ImageNet model, LDCE-cls's
# backbone, with s = 1.5 for its FID table; s = 1 is the plain conditional score, recorded beside it.)
SAMPLE_GUIDANCE_SCALE = 2.0
# At most this many classes are sampled (the first ones), so a card's cost stays bounded for 1,000 classes.
SAMPLE_CLASSES = 10


@torch.no_grad()
def guided_samples(
    denoiser, labels: Tensor, shape: tuple[int, ...], steps: int, scale: float, generator: torch.Generator
) -> Tensor:
    """Latents sampled by deterministic DDIM (``steps`` steps) from the guided score
    eps(z) + scale (eps(z, c) - eps(z)) (``scale`` 1: eps(z, c) alone)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(denoiser.scheduler.config)
    scheduler.set_timesteps(steps)
    z = torch.randn((len(labels), *shape), generator=generator)
    null = torch.full_like(labels, denoiser.null_class)
    for t in scheduler.timesteps:
        if scale == 1.0:
            eps = denoiser.eps(z, t, labels)
        else:
            eps_uc, eps_c = denoiser.eps(torch.cat([z, z]), t, torch.cat([null, labels])).chunk(2)
            eps = eps_uc + scale * (eps_c - eps_uc)
        z = scheduler.step(eps, t, z).prev_sample
    return z


@torch.no_grad()
def denoiser_card(
    denoiser,
    vae: nn.Module,
    model: SplitClassifier,
    x: Tensor,
    y: Tensor,
    *,
    samples_per_class: int | None = None,
    sample_steps: int = 25,
    guidance_scale: float = SAMPLE_GUIDANCE_SCALE,
    seed: int = 0,
) -> dict[str, Any]:
    """Denoising loss at ``NOISE_LEVELS`` on the held-out images' latents, and the classifier's accuracy on
    class-conditional DDIM samples (``sample_steps`` steps) of every class (the first ``SAMPLE_CLASSES``):
    ``sample_accuracy`` with the LDM's classifier-free guidance scale (``guidance_scale``), the thresholded
    figure, and ``sample_accuracy_unguided`` (scale 1) beside it. ``samples_per_class``: default as many as
    the held-out images per class, between 10 and 50 (the accuracy of 100 samples has a standard error of
    about 0.05)."""
    from explain.nets.autoencoder import decode, encode

    generator = torch.Generator().manual_seed(seed)
    z0 = torch.cat([encode(vae, chunk) for chunk in _chunks(x)])
    losses = denoising_losses(denoiser.eps, denoiser.scheduler.alphas_cumprod, z0, y, generator)
    classes = min(denoiser.num_classes, SAMPLE_CLASSES)
    if samples_per_class is None:
        samples_per_class = min(50, max(10, len(x) // max(denoiser.num_classes, 1)))
    labels = torch.arange(classes).repeat_interleave(samples_per_class)
    figures = {f"eps_mse_t{t}": v for t, v in losses.items()}
    figures["eps_mse_mean"] = sum(losses.values()) / len(losses)
    for name, scale in (("sample_accuracy", guidance_scale), ("sample_accuracy_unguided", 1.0)):
        start = generator.get_state()  # both draw the same starting noise
        z = guided_samples(denoiser, labels, tuple(z0.shape[1:]), sample_steps, scale, generator)
        generator.set_state(start)
        samples = decode(vae, z).clamp(0, 1)
        figures[name] = float((_predict(model, samples) == labels).float().mean())
    figures["sample_guidance_scale"] = guidance_scale
    return judge("denoiser", figures, len(x))


@torch.no_grad()
def bridge_card(
    bridge,
    model: SplitClassifier,
    x: Tensor,
    y: Tensor,
    mean_image: Tensor,
    *,
    steps: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """I2SB's loss at several times, and unguided inpainting (``steps`` bridge steps, RCSB's sampler with
    s = 0) of a random region of 20-30% of each held-out image: L1 inside the region relative to filling it
    with ``mean_image`` (the mean training image), and the classifier's accuracy on the inpainted images."""
    from explain.nets.bridge import random_regions

    generator = torch.Generator().manual_seed(seed)
    last = bridge.schedule.num_timesteps - 1
    region = torch.zeros_like(x[:, :1])
    while True:  # regions of 20-30% of the image: what RCSB's area = 0.2 region and its neighbours cover
        fresh = random_regions(len(x), tuple(x.shape[-2:]), generator, max_area=0.35)
        share = fresh.flatten(1).mean(1)
        take = ((share >= 0.2) & (share <= 0.3) & (region.flatten(1).sum(1) == 0)).view(-1, 1, 1, 1)
        region = torch.where(take, fresh, region)
        if bool((region.flatten(1).sum(1) > 0).all()):
            break
    losses = {}
    for n in (last // 10, last // 2, last):
        x1 = (1 - region) * x + region * torch.randn(x.shape, generator=generator)
        steps_n = torch.full((len(x),), n, dtype=torch.long)
        x_t = bridge.posterior_sample(x, x1, steps_n, torch.randn(x.shape, generator=generator))
        target = (x_t - x) / bridge.coefficient("std_fwd", steps_n, x)
        prediction = bridge.unet(torch.cat([x_t, region], dim=1), steps_n).sample
        losses[n] = float(F.mse_loss(prediction, target))
    keep = region == 0
    times = torch.linspace(0, last, steps + 1).round().long().tolist()
    x1 = (1 - region) * x + region * torch.randn(x.shape, generator=generator)
    x_n = torch.where(
        keep, x, bridge.posterior_sample(x, x1, times[-1], torch.randn(x.shape, generator=generator))
    )
    for n in range(steps, 0, -1):
        x0_hat = bridge.x0_hat(x_n, times[n], region)
        mu, mu_bar = bridge.step_coefficients(times[n - 1], times[n])
        x_n = torch.where(keep, x, mu * x0_hat + mu_bar * x_n)
    inpainted = x_n.clamp(0, 1)
    area = region.sum()
    l1 = float(((inpainted - x).abs() * region).sum() / area)
    l1_mean = float(((mean_image.expand_as(x) - x).abs() * region).sum() / area)
    figures = {f"bridge_mse_n{n}": v for n, v in losses.items()}
    figures.update(
        inpaint_l1=l1,
        inpaint_l1_mean_fill=l1_mean,
        inpaint_l1_ratio=l1 / max(l1_mean, 1e-8),
        inpainted_accuracy=float((_predict(model, inpainted) == y).float().mean()),
        accuracy_original=float((_predict(model, x) == y).float().mean()),
    )
    return judge("bridge", figures, len(x))


@torch.no_grad()
def sae_card(sae: nn.Module, features: Tensor) -> dict[str, Any]:
    """Explained variance of the SAE's reconstruction of held-out pooled features, and the share of its
    latents active per image (L0 / dictionary size)."""
    codes = sae.h_enc(features)
    reconstruction = sae.h_dec(codes)
    residual = ((features - reconstruction) ** 2).sum()
    total = ((features - features.mean(0)) ** 2).sum().clamp(min=1e-12)
    l0 = float((codes > 0).float().sum(-1).mean())
    figures = {
        "explained_variance": float(1 - residual / total),
        "l0": l0,
        "active_fraction": l0 / codes.shape[-1],
    }
    return judge("sae", figures, len(features))


@torch.no_grad()
def c3lt_card(maps, vae: nn.Module, model: SplitClassifier, x_a: Tensor, x_b: Tensor) -> dict[str, Any]:
    """Flip rate and proximity (mean |x - x'| per pixel) of g on held-out images of class a (towards b) and
    of h on those of class b (towards a), with the maps applied ``maps.n`` times."""
    from explain.nets.autoencoder import decode, encode
    from explain.nets.c3lt_maps import apply_n

    flips, l1s, count = 0, 0.0, 0
    for x, target in ((x_a, maps.class_b), (x_b, maps.class_a)):
        for chunk in _chunks(x):
            x_prime = decode(vae, apply_n(maps.towards(target), encode(vae, chunk), maps.n)).clamp(0, 1)
            flips += int((_predict(model, x_prime) == target).sum())
            l1s += float((x_prime - chunk).abs().flatten(1).mean(1).sum())
            count += len(chunk)
    return judge("c3lt_maps", {"flip_rate": flips / count, "l1": l1s / count}, count)


@torch.no_grad()
def knn_accuracy(train: Tensor, train_y: Tensor, test: Tensor, test_y: Tensor, k: int = 5) -> float:
    """Accuracy of a k-nearest-neighbour vote (cosine similarity) of ``test`` among ``train`` embeddings."""
    a, b = F.normalize(train, dim=1), F.normalize(test, dim=1)
    nearest = (b @ a.T).topk(k, dim=1).indices
    votes = F.one_hot(train_y[nearest], int(train_y.max()) + 1).sum(1)
    return float((votes.argmax(1) == test_y).float().mean())


@torch.no_grad()
def auxiliary_card(
    embed: Callable[[Tensor], Tensor],
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    part_clustering: float | None = None,
) -> dict[str, Any]:
    """5-NN class accuracy of pooled cell embeddings (``embed``: images -> (N, d, h, w)), plus the paper's
    part-clustering accuracy when the data set has keypoints (computed by the caller)."""
    pooled = lambda x: torch.cat([embed(chunk).mean(dim=(-2, -1)) for chunk in _chunks(x)])  # noqa: E731
    figures = {"knn_accuracy": knn_accuracy(pooled(x_train), y_train, pooled(x_test), y_test)}
    if part_clustering is not None:
        figures["part_clustering_accuracy"] = part_clustering
    return judge("auxiliary", figures, len(x_test))


def card_summary(card: dict[str, Any]) -> str:
    """One line: pass/fail and the thresholded figures, e.g. 'passed: psnr_db 24.1 (>= 20)'."""
    parts = [
        f"{t['figure']} {card['figures'][t['figure']]:.3g} ({t['op']} {t['value']:g})"
        for t in card["thresholds"]
    ]
    return f"{'passed' if card['passed'] else 'FAILED'}: " + ", ".join(parts)


def backbone_card(
    kind: str,
    path: str,
    *,
    classifier: SplitClassifier,
    x_test: Tensor,
    y_test: Tensor,
    x_train: Tensor,
    y_train: Tensor,
    autoencoder: str | nn.Module | None = None,
    auxiliary_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The card of the backbone of ``kind`` saved at ``path`` in the platform's own format: loads it (and the
    autoencoder it works in: a path, or the loaded model) and measures it with ``model_card``.
    ``auxiliary_config`` is a SimSiam model's stored config."""
    if kind == "auxiliary":
        from explain.nets.auxiliary import load_simsiam

        if auxiliary_config is None or auxiliary_config.get("architecture") != "simsiam":
            raise ValueError(
                "the auxiliary card of a SimSiam model needs its stored config (architecture simsiam)"
            )
        model = load_simsiam(path, auxiliary_config["net"])
        norm = auxiliary_config["normalisation"]
        embed = lambda x: model.cells((x - norm["mean"][0]) / norm["std"][0])  # noqa: E731
        return auxiliary_card(embed, x_train, y_train, x_test, y_test)
    loaders = {
        "autoencoder": ("explain.nets.autoencoder", "load_autoencoder"),
        "denoiser": ("explain.nets.diffusion", "load_denoiser"),
        "bridge": ("explain.nets.bridge", "load_bridge"),
        "sae": ("explain.nets.sae", "load_sae"),
        "c3lt_maps": ("explain.nets.c3lt_maps", "load_c3lt_maps"),
    }
    if kind not in loaders:
        raise ValueError(f"no quality card for backbone kind {kind!r}; known: {', '.join(THRESHOLDS)}")
    from importlib import import_module

    module, function = loaders[kind]
    model = getattr(import_module(module), function)(path)
    return model_card(
        kind, model, classifier=classifier, x_test=x_test, y_test=y_test, x_train=x_train, y_train=y_train,
        autoencoder=autoencoder,
    )  # fmt: skip


def model_card(
    kind: str,
    model: Any,
    *,
    classifier: SplitClassifier,
    x_test: Tensor,
    y_test: Tensor,
    x_train: Tensor,
    y_train: Tensor,
    autoencoder: str | nn.Module | None = None,
) -> dict[str, Any]:
    """The card of a loaded backbone of ``kind`` (as the methods take it, whichever format it was read from:
    a model the platform trained, one it ships, or a researcher's registered one), measured on the held-out
    ``x_test`` (pixels in [0, 1]); ``x_train`` gives the mean image (bridge). ``autoencoder``: the one a
    denoiser or C3LT maps work in (a path, or the loaded model)."""
    if kind == "autoencoder":
        return autoencoder_card(model, classifier, x_test, y_test)
    if kind == "denoiser":
        return denoiser_card(model, _need(autoencoder, kind), classifier, x_test, y_test)
    if kind == "bridge":
        return bridge_card(model, classifier, x_test, y_test, x_train.mean(0, keepdim=True))
    if kind == "sae":
        from explain.nets.sae import pooled_features

        with torch.no_grad():
            features = torch.cat([pooled_features(classifier.f, chunk) for chunk in _chunks(x_test)])
        return sae_card(model, features)
    if kind == "c3lt_maps":
        vae = _need(autoencoder, kind)
        for label in (model.class_a, model.class_b):
            if not bool((y_test == label).any()):
                raise ValueError(f"no held-out images of class {label} to measure the C3LT maps on")
        return c3lt_card(
            model, vae, classifier, x_test[y_test == model.class_a], x_test[y_test == model.class_b]
        )
    raise ValueError(f"no quality card for backbone kind {kind!r}; known: {', '.join(THRESHOLDS)}")


def _need(autoencoder: str | nn.Module | None, kind: str) -> nn.Module:
    from explain.nets.autoencoder import load_autoencoder

    if autoencoder is None or isinstance(autoencoder, str) and not autoencoder:
        raise ValueError(f"the card of a {kind} needs the path of the autoencoder it was trained with")
    return load_autoencoder(autoencoder) if isinstance(autoencoder, str) else autoencoder
