"""Tiny split classifiers with every head structure the cell search treats differently, and a tiny aux net."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from explain.nets.split import SplitClassifier

NUM_CLASSES = 4
HEADS = ["flatten-linear", "mlp", "pool-linear", "conv", "bottleneck"]
# The scorer each head gets (head_scorer's choice): conv heads fall back to g itself.
SCORER_KIND = {
    "flatten-linear": "flatten-linear",
    "mlp": "flatten-linear",
    "pool-linear": "pool-linear",
    "conv": "generic",
    "bottleneck": "bottleneck-local",
}


def features_net(channels: int = 8) -> nn.Module:
    """1 x 4h x 4w images -> ``channels`` x h x w features."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, channels, 3, padding=1),
        nn.MaxPool2d(2),
    )


def head(kind: str, d: int, grid: tuple[int, int], num_classes: int = NUM_CLASSES) -> nn.Module:
    hw = grid[0] * grid[1]
    if kind == "flatten-linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(d * hw, num_classes))
    if (
        kind == "mlp"
    ):  # VGG's head in miniature, nested as the authors' nn.Sequential(Flatten, vgg.classifier)
        classifier = nn.Sequential(
            nn.Linear(d * hw, 16),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(16, 12),
            nn.ReLU(),
            nn.Linear(12, num_classes),
        )
        return nn.Sequential(nn.Flatten(), classifier)
    if kind == "pool-linear":
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(d, num_classes)
        )
    if kind == "conv":
        return nn.Sequential(
            nn.Conv2d(d, 6, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, num_classes),
        )
    if kind == "bottleneck":  # ResNet-50's head after conv5_1 in miniature: two bottlenecks, pooling, fc
        blocks = [Bottleneck(d, d // 4) for _ in range(2)]
        for norm in (m for block in blocks for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-0.5, 0.5)  # trained-looking statistics, so folding them is tested
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.uniform_(-0.5, 0.5)
        return nn.Sequential(
            nn.Sequential(*blocks), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(d, num_classes)
        )
    raise ValueError(kind)


def tiny_model(seed: int, kind: str = "flatten-linear", grid: tuple[int, int] = (4, 4)) -> SplitClassifier:
    torch.manual_seed(seed)
    f = features_net()
    g = head(kind, 8, grid)
    return SplitClassifier(f=f.eval(), g=g.eval())


def tiny_aux(seed: int) -> nn.Module:
    """A random conv net: 1 x 4h x 4w images -> 5 x h x w cells (the semantic method's u in tests)."""
    torch.manual_seed(10_000 + seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.AvgPool2d(2),
    ).eval()


def images(seed: int, n: int, grid: tuple[int, int] = (4, 4)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, 1, 4 * grid[0], 4 * grid[1], generator=generator)


def predicted(model: SplitClassifier, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model.g(model.f(x)).argmax())


def a_target(model: SplitClassifier, query: torch.Tensor, distractor: torch.Tensor) -> int:
    """Goyal's c': the distractor's predicted class, or another class when it equals the query's."""
    c, c_prime = predicted(model, query), predicted(model, distractor)
    return c_prime if c_prime != c else (c + 1) % NUM_CLASSES


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: one torch thread is many times faster than two on a shared two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
