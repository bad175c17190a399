"""What the generative methods (C3LT, SLC, LDCE, RCSB) share.

- ``GenerativeMethod``: ``explain`` for one query is ``explain_batch`` of one, so batched and item-by-item use
  the same code; each item draws its noise from the generator in turn, before any batch work, so a batch gives
  the same counterfactuals as the same items explained one after another with the same generator.
- ``change_region``: the region of a method that produces none, the thresholded, smoothed |x - x_cf|.
- ``BatchAdam``: Adam with per-item state, so items that are done stop moving while the rest go on.
- Quality measures of one counterfactual: ``cout`` (C3LT's definition), ``s3_similarity``, ``l1``.

Images are in the classifier's input scale; a counterfactual ``image`` is (C, H, W) float32, the query's
layout without the batch axis. Extra numbers (NFE, L1, the region threshold and area) go in
``Counterfactual.timings``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from explain.methods.base import Counterfactual, CounterfactualMethod
from explain.nets.split import SplitClassifier
from explain.nets.split import frozen as frozen  # the methods' shared import of it


def module_name(value: Any) -> Any:
    """A backbone's local path (what config() stores), or the value itself when it is plain data."""
    if isinstance(value, str | int | float | bool | type(None) | list | tuple | dict):
        return list(value) if isinstance(value, tuple) else value
    path = getattr(value, "name_or_path", None)
    if path is None:
        cfg = getattr(value, "config", None)
        path = cfg.get("_name_or_path") if hasattr(cfg, "get") else None
    return str(path) if path else f"<unsaved {type(value).__name__}>"


@dataclass
class Generated:
    """What a method's batch generation returns: counterfactuals, regions (None: derive from the change),
    NFE."""

    x_cf: torch.Tensor  # (B, C, H, W)
    region: torch.Tensor | None = None  # (B, 1, H, W) in {0, 1}, or None
    nfe: dict[str, list[int]] = field(default_factory=dict)  # network -> per-item evaluations
    extra: dict[str, list[float]] = field(default_factory=dict)  # per-item numbers for timings


def shown_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the 8-bit pixels a stimulus stores (round half to even, as the worker's PNG)."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


class GenerativeMethod(CounterfactualMethod):
    """Base of the generative methods: subclasses implement ``_noise`` (per item) and ``_generate``
    (batch)."""

    region_threshold: float = 0.25
    region_sigma: float = 1.0

    def config(self) -> dict[str, Any]:
        return {k: module_name(v) for k, v in super().config().items()}

    def explain(
        self,
        model: SplitClassifier,
        query: torch.Tensor,
        target: int,
        distractors: torch.Tensor | None = None,
        *,
        aux: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> Counterfactual:
        """One counterfactual for ``query`` (1, C, H, W) towards class ``target``; distractors are unused."""
        if query.ndim != 4 or query.shape[0] != 1:
            raise ValueError(f"query must have shape (1, C, H, W), not {tuple(query.shape)}")
        return self.explain_batch(model, query, [target], aux=aux, generator=generator)[0]

    def explain_batch(
        self,
        model: SplitClassifier,
        queries: torch.Tensor,
        targets: list[int] | torch.Tensor,
        *,
        aux: nn.Module | None = None,
        generator: torch.Generator | None = None,
        generators: list[torch.Generator] | None = None,
        batch_size: int = 16,
    ) -> list[Counterfactual]:
        """Counterfactuals for ``queries`` (B, C, H, W) towards ``targets`` (B,), ``batch_size`` at a time.

        Randomness: item i draws its noise from ``generators[i]`` when given (one per query, e.g. each
        precompute unit's own seed), else from ``generator`` in turn (seed 0 when None); either way before
        any batch work, so each item gets exactly the draws it gets explained alone; its counterfactual is the
        one-by-one one up to the float rounding of batched convolutions, which methods with Adam steps (SLC,
        RCSB: every gradient entry normalised) can amplify into visibly different images."""
        if queries.ndim != 4 or queries.shape[0] < 1:
            raise ValueError(f"queries must have shape (B >= 1, C, H, W), not {tuple(queries.shape)}")
        targets = [int(t) for t in (targets.tolist() if isinstance(targets, torch.Tensor) else targets)]
        if len(targets) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(targets)} targets; pass one target per query")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        with torch.no_grad():
            num_classes = model.g(model.f(queries[:1])).shape[-1]
        bad = [t for t in targets if not 0 <= t < num_classes]
        if bad:
            raise ValueError(
                f"target {bad[0]} is not a class of the classifier (it has {num_classes} classes)"
            )
        if generators is not None and (generator is not None or len(generators) != len(queries)):
            raise ValueError(
                f"generators must be one per query ({len(queries)}, got {len(generators)}) and not given "
                "together with generator"
            )
        if generators is None:
            shared = (
                generator if generator is not None else torch.Generator(device=queries.device).manual_seed(0)
            )
            generators = [shared] * len(queries)
        results: list[Counterfactual] = []
        for begin in range(0, len(queries), batch_size):
            x = queries[begin : begin + batch_size]
            y = torch.tensor(targets[begin : begin + batch_size], device=x.device)
            noises = [self._noise(x[i : i + 1], generators[begin + i]) for i in range(len(x))]
            noise = {k: torch.cat([n[k] for n in noises]) for k in noises[0]} if noises[0] else {}
            start = time.perf_counter()
            out = self._generate(model, x, y, noise)
            seconds = (time.perf_counter() - start) / len(x)
            results.extend(self._assemble(model, x, y, out, seconds, aux))
        return results

    def _noise(self, query: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The random draws one item needs, each with a leading batch axis of 1."""
        return {}

    def _generate(
        self, model: SplitClassifier, x: torch.Tensor, y: torch.Tensor, noise: dict[str, torch.Tensor]
    ) -> Generated:
        raise NotImplementedError

    def _assemble(
        self,
        model: SplitClassifier,
        x: torch.Tensor,
        y: torch.Tensor,
        out: Generated,
        seconds: float,
        aux: nn.Module | None,
    ) -> list[Counterfactual]:
        # What a rater is shown: the image clamped to [0, 1] and stored as 8-bit pixels. The decision, the
        # scores, L1 and the region are those of that image, never of out-of-range values that a decoder
        # may produce and the classifier may react to (every release clamps its final image).
        raw = out.x_cf.detach()
        out_of_range = ((raw < 0) | (raw > 1)).flatten(1).float().mean(1)
        x_cf = raw.clamp(0.0, 1.0)
        with torch.no_grad():
            p_query = torch.softmax(model.g(model.f(x)), -1)
            p_cf = torch.softmax(model.g(model.f(shown_pixels(x_cf))), -1)
        if out.region is None:
            region, thresholds = change_region(x, x_cf, self.region_threshold, self.region_sigma)
        else:
            region, thresholds = out.region.detach(), [math.nan] * len(x)
        config = self.config()
        results = []
        for i in range(len(x)):
            target = int(y[i])
            timings = {"seconds": seconds, "l1": float((x[i] - x_cf[i]).abs().mean())}
            timings["region_area"] = float(region[i].mean())
            timings["raw_out_of_range"] = float(out_of_range[i])  # before the clamp
            timings["region_threshold"] = thresholds[i]
            for network, counts in out.nfe.items():
                timings[f"nfe_{network}"] = float(counts[i])
            for name, values in out.extra.items():
                timings[name] = float(values[i])
            results.append(
                Counterfactual(
                    method=self.name,
                    target=target,
                    flipped=int(p_cf[i].argmax()) == target,
                    edits=[],
                    scores=[float(p_query[i, target]), float(p_cf[i, target])],
                    query_mask=region[i, 0].float().cpu().numpy().astype(np.float32),
                    distractor_masks=[],
                    config=dict(config),
                    timings=timings,
                    image=x_cf[i].float().cpu().numpy().astype(np.float32),
                )
            )
        return results


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding; radius 3 sigma (at least 1)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def change_region(
    x: torch.Tensor, x_cf: torch.Tensor, relative_threshold: float = 0.25, sigma: float = 1.0
) -> tuple[torch.Tensor, list[float]]:
    """(B, 1, H, W) binary regions where the smoothed change G(|x - x_cf|) >= ``relative_threshold`` x its
    maximum, and the absolute thresholds used. An unchanged image has an empty region (threshold 0)."""
    d = gaussian_blur((x - x_cf).abs().sum(1, keepdim=True), sigma)
    peak = d.flatten(1).max(1).values
    threshold = relative_threshold * peak
    region = ((d >= threshold.view(-1, 1, 1, 1)) & (peak.view(-1, 1, 1, 1) > 0)).float()
    return region, [float(t) for t in threshold]


class BatchAdam:
    """Adam (Kingma & Ba; RCSB algorithm 4) with per-item step counts: inactive items keep state and value."""

    def __init__(
        self, like: torch.Tensor, alpha: float = 1.0, beta1: float = 0.9, beta2: float = 0.999, eps=1e-8
    ):
        self.alpha, self.beta1, self.beta2, self.eps = alpha, beta1, beta2, eps
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.n = torch.zeros(like.shape[0], device=like.device, dtype=like.dtype)

    def direction(self, grad: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """bar g_n = alpha m_hat / (sqrt(v_hat) + eps) for active items, zero for the others."""
        active = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device) if active is None else active
        a = active.view(-1, *([1] * (grad.ndim - 1)))
        self.m = torch.where(a, self.beta1 * self.m + (1 - self.beta1) * grad, self.m)
        self.v = torch.where(a, self.beta2 * self.v + (1 - self.beta2) * grad**2, self.v)
        self.n = self.n + active.to(self.n.dtype)
        n = self.n.clamp(min=1).view_as(a.float())
        m_hat = self.m / (1 - self.beta1**n)
        v_hat = self.v / (1 - self.beta2**n)
        return torch.where(a, self.alpha * m_hat / (v_hat.sqrt() + self.eps), torch.zeros_like(grad))


def l1(x: torch.Tensor, x_cf: torch.Tensor) -> float:
    """Mean absolute pixel change (C3LT's Prox, Eq. 10, for one image)."""
    return float((x - x_cf).abs().mean())


@torch.no_grad()
def cout(
    model: SplitClassifier, x: torch.Tensor, x_cf: torch.Tensor, source: int, target: int, steps: int = 20
) -> float:
    """COUT = AUPC_c' - AUPC_c (C3LT Eq. 8): insert the most-changed pixels of ``x_cf`` into ``x`` in
    ``steps``
    equal batches (mask: |x - x_cf| summed over channels, normalised) and average the trapezoids of the
    classifier's probabilities of ``target`` and ``source``. ``x`` and ``x_cf`` are (1, C, H, W)."""
    d = (x - x_cf).abs().sum(1).flatten()
    order = torch.argsort(d, descending=True, stable=True)
    hw = d.numel()
    frames = []
    for t in range(steps + 1):
        keep = torch.zeros(hw, dtype=torch.bool, device=x.device)
        keep[order[: round(t * hw / steps)]] = True
        keep = keep.view(1, 1, *x.shape[-2:])
        frames.append(torch.where(keep, x_cf, x))
    p = torch.softmax(model.g(model.f(torch.cat(frames))), -1)
    aupc = ((p[:-1] + p[1:]) / 2).mean(0)  # Eq. (8), AUPC_k
    return float(aupc[target] - aupc[source])


@torch.no_grad()
def s3_similarity(features: nn.Module, x: torch.Tensor, x_cf: torch.Tensor) -> float:
    """Cosine similarity of S(x) and S(x_cf) (LDCE Eq. 15) for a feature model S (outputs pooled to
    vectors)."""
    a, b = features(x), features(x_cf)
    if a.ndim > 2:
        a, b = a.flatten(2).mean(-1), b.flatten(2).mean(-1)
    return float(F.cosine_similarity(a.flatten(1), b.flatten(1)).mean())
