"""The auxiliary embedding u(.) of the semantic method (Vandenhende et al. 2022): spatial cells that line up
with the classifier's 7 x 7 grid, so that "the same part" can be matched across a query and a distractor.

- ``SimSiamNet`` + ``train_simsiam``: a small self-supervised model (SimSiam, Chen & He 2021) trained on the
  data set itself, for the embedded default (28 px images -> d x 7 x 7 cells).
- ``load_resnet50_auxiliary``: a local ResNet-50 state_dict (e.g. SwAV or DeepCluster, as in the paper) whose
  ``layer4`` output gives 2048 x 7 x 7 cells at 224 px.
- ``part_clustering_accuracy``: the paper's check of an auxiliary model where keypoints exist: K-means on the
  cells that hold a keypoint, each cluster labelled with its majority part, and the share of cells whose part
  is their cluster's majority.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision import models as tv
from tqdm.auto import tqdm

from explain.stimuli.metrics import cell_parts

from .classifiers import CheckpointError, load_state_dict_strict, read_state_dict

Progress = Callable[[int, int], None]


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SimSiamNet(nn.Module):
    """Encoder (conv stages down to a 7 x 7 grid at 28 px), projector and predictor of SimSiam.

    ``cells(x)`` is the encoder's spatial output (N, dim, H/4, W/4); the projector sees its global average.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, dim: int = 64, pred_dim: int = 32):
        super().__init__()
        self.in_channels, self.width, self.dim, self.pred_dim = in_channels, width, dim, pred_dim
        self.encoder = nn.Sequential(
            *_conv(in_channels, width),
            nn.MaxPool2d(2),
            *_conv(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv(2 * width, dim),
        )
        # SimSiam's projector ends in batch norm without affine; its predictor is a bottleneck MLP.
        self.projector = nn.Sequential(
            nn.Linear(dim, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False),
            nn.BatchNorm1d(dim, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )

    def config(self) -> dict[str, int]:
        return {
            "in_channels": self.in_channels,
            "width": self.width,
            "dim": self.dim,
            "pred_dim": self.pred_dim,
        }

    def cells(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, p): projection and prediction of each image."""
        z = self.projector(self.encoder(x).mean(dim=(2, 3)))
        return z, self.predictor(z)


def simsiam_loss(p1: Tensor, z1: Tensor, p2: Tensor, z2: Tensor) -> Tensor:
    """Symmetrised negative cosine similarity with stop-gradient on z (SimSiam, equations 1-2); in [-1, 1]."""
    return -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """A random view of each image: resized crop (scale 0.5-1), horizontal flip, brightness and contrast."""
    n = len(x)
    scale = 0.5 + 0.5 * torch.rand(n, generator=generator)
    side = scale.sqrt()
    shift = (1 - side)[:, None] * (2 * torch.rand(n, 2, generator=generator) - 1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    views = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=generator)).to(x.device, x.dtype)
    brightness = (0.4 * torch.rand(n, 1, 1, 1, generator=generator) - 0.2).to(x.device, x.dtype)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    return (views - mean) * contrast + mean + brightness


def train_simsiam(
    model: SimSiamNet,
    x: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Self-supervised training on the images ``x`` (N, C, H, W), normalised. SGD with momentum and a cosine
    schedule (as SimSiam). Returns ``{"loss": [mean per epoch], "batch_loss": [...], "steps": int}``."""
    if len(x) < 2:
        raise ValueError(f"SimSiam needs at least 2 images (batch norm), got {len(x)}")
    if epochs < 1 or batch_size < 2 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 2 and lr > 0; got {epochs}, {batch_size}, {lr}")
    device = next(model.parameters()).device
    steps_per_epoch = max(1, len(x) // batch_size)  # full batches only: batch norm needs > 1 sample
    total = epochs * steps_per_epoch
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total)
    curve: dict[str, Any] = {"loss": [], "batch_loss": [], "steps": total, "epochs": epochs}
    every = max(1, steps_per_epoch // 20)
    model.train()
    done = 0
    with tqdm(total=total, desc="train auxiliary", unit="batch", leave=False, disable=None) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            epoch_loss = 0.0
            for step in range(steps_per_epoch):
                batch = x[order[step * batch_size : (step + 1) * batch_size]]
                v1, v2 = augment(batch, generator).to(device), augment(batch, generator).to(device)
                (z1, p1), (z2, p2) = model(v1), model(v2)
                loss = simsiam_loss(p1, z1, p2, z2)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                value = float(loss.detach())
                epoch_loss += value
                done += 1
                if done % every == 0:
                    curve["batch_loss"].append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
                if progress is not None and (done % every == 0 or done == total):
                    progress(done, total)
            curve["loss"].append(epoch_loss / steps_per_epoch)
    model.eval()
    return curve


def load_simsiam(path: str | Path, config: Mapping[str, int]) -> SimSiamNet:
    """A trained ``SimSiamNet`` from a local state_dict and the constructor config stored beside it."""
    model = SimSiamNet(**config)
    load_state_dict_strict(model, read_state_dict(path), path)
    return model.eval()


class ResNet50Cells(nn.Module):
    """ResNet-50 up to ``layer4``: ``cells(x)`` is (N, 2048, 7, 7) at 224 px."""

    def __init__(self) -> None:
        super().__init__()
        net = tv.resnet50(weights=None)
        self.body = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )

    def cells(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.cells(x)


_SELF_SUPERVISED_PREFIXES = ("module.", "backbone.", "encoder.", "encoder_q.", "model.", "trunk.")


def load_resnet50_auxiliary(path: str | Path) -> ResNet50Cells:
    """A local ResNet-50 state_dict (torchvision key names, optionally behind a prefix such as SwAV's
    ``module.`` or MoCo's ``encoder_q.``) as an auxiliary model. Heads (fc, projection, prototypes) are
    ignored; every key of the ResNet body must be present with its shape, or ``CheckpointError`` names the
    problem."""
    state = read_state_dict(path)
    for _ in range(2):  # e.g. "module.encoder_q.layer1..."
        for prefix in _SELF_SUPERVISED_PREFIXES:
            if any(k.startswith(prefix) for k in state) and not any(k.startswith("layer1.") for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    model = ResNet50Cells()
    names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    body: dict[str, Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in names:
            body[f"body.{names[head]}.{rest}"] = value
    if not body:
        raise CheckpointError(
            f"checkpoint {path}: no ResNet-50 keys (conv1, bn1, layer1..layer4) found; keys start with "
            f"{sorted({k.split('.')[0] for k in state})[:8]}. Save the backbone's state_dict with "
            "torchvision names"
        )
    load_state_dict_strict(model, body, path)
    return model.eval()


def kmeans(points: np.ndarray, k: int, *, seed: int = 0, iterations: int = 100) -> np.ndarray:
    """Cluster index of each point: Lloyd's algorithm from a k-means++ start (deterministic given seed)."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of points), got {k}")
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(n)]]
    for _ in range(1, k):
        d2 = ((points[:, None, :] - np.stack(centres)[None]) ** 2).sum(-1).min(1)
        total = d2.sum()
        centres.append(points[rng.choice(n, p=d2 / total)] if total > 0 else points[rng.integers(n)])
    centre_array = np.stack(centres)
    labels = np.full(n, -1)
    for _ in range(iterations):
        distances = ((points[:, None, :] - centre_array[None]) ** 2).sum(-1)
        new = distances.argmin(1)
        if (new == labels).all():
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                centre_array[j] = points[labels == j].mean(0)
    return labels


def part_clustering_accuracy(
    cells: Tensor | np.ndarray,
    keypoints: Sequence[Mapping[str, Sequence[Sequence[float]]]],
    image_sizes: Sequence[tuple[int, int]],
    *,
    n_clusters: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The paper's part-clustering check of an auxiliary model.

    ``cells`` (N, d, h, w) are u's cells of N images; ``keypoints[i]`` the parts of image i in pixels and
    ``image_sizes[i]`` its (height, width). Every (cell, part) where a keypoint falls in a cell gives one
    labelled vector (its L2-normalised cell embedding). K-means with ``n_clusters`` (default: the number of
    parts) groups them; each cluster takes its majority part; accuracy is the share of vectors whose part is
    their cluster's. Returns ``{"accuracy", "n_cells", "n_parts", "n_clusters"}``.
    """
    cells_np = cells.detach().cpu().numpy() if isinstance(cells, Tensor) else np.asarray(cells)
    if cells_np.ndim != 4:
        raise ValueError(f"cells must be (N, d, h, w), got shape {cells_np.shape}")
    n, d, h, w = cells_np.shape
    if len(keypoints) != n or len(image_sizes) != n:
        raise ValueError(
            f"{n} images of cells but {len(keypoints)} keypoint sets and {len(image_sizes)} sizes"
        )
    vectors, parts = [], []
    for i in range(n):
        for cell, names in enumerate(cell_parts(keypoints[i], (h, w), tuple(image_sizes[i]))):
            for name in sorted(names):
                vectors.append(cells_np[i, :, cell // w, cell % w])
                parts.append(name)
    if not vectors:
        raise ValueError(
            "no keypoint falls inside any image: nothing to cluster (does the data set have keypoints?)"
        )
    x = np.stack(vectors).astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n_parts = len(set(parts))
    k = min(n_clusters or n_parts, len(x))
    labels = kmeans(x, k, seed=seed)
    correct = 0
    for j in range(k):
        members = [parts[i] for i in np.flatnonzero(labels == j)]
        if members:
            correct += Counter(members).most_common(1)[0][1]
    return {"accuracy": correct / len(x), "n_cells": len(x), "n_parts": n_parts, "n_clusters": k}


def embed_cells(model: nn.Module, x: Tensor, *, batch_size: int = 256) -> Tensor:
    """``model.cells`` of every image of ``x``, in eval mode and without gradients, on the CPU."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(model.cells(x[start : start + batch_size].to(device)).cpu())
    return torch.cat(out)
