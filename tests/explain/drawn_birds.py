"""A tiny drawn data set with known discriminative part: "birds" whose two classes differ only in head colour.

Each 32 x 32 RGB image holds a grey elliptic body, a round head on one side of it and a triangular tail on the
other, placed at a random position, over faint noise. Class 0 has a red head, class 1 a blue one; both have
the same mean over channels, so a colour-blind auxiliary model sees the same head. Keypoints (x, y) mark the
head, body and tail centres.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from explain.nets.split import SplitClassifier

SIZE = 32
HEAD_COLOURS = {0: (0.9, 0.0, 0.0), 1: (0.0, 0.0, 0.9)}


def draw_bird(rng: np.random.Generator, label: int) -> tuple[np.ndarray, dict[str, tuple[float, float]]]:
    """One (3, 32, 32) float image in [0, 1] and its keypoints."""
    image = rng.uniform(0, 0.08, size=(3, SIZE, SIZE))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    facing = 1 if rng.random() < 0.5 else -1
    # The head sits inside one 8 px cell of the classifier's 4 x 4 grid (centre within 1 px of the cell's).
    hx = 8.0 * (rng.integers(2, 4) if facing > 0 else rng.integers(0, 2)) + 4.0 + rng.uniform(-1, 1)
    hy = 8.0 * rng.integers(1, 3) + 4.0 + rng.uniform(-1, 1)
    cx, cy = hx - facing * 8.0, hy + 2.0
    body = ((xx - cx) / 6.0) ** 2 + ((yy - cy) / 3.5) ** 2 <= 1
    image[:, body] = 0.6
    head = (xx - hx) ** 2 + (yy - hy) ** 2 <= 2.8**2
    image[:, head] = np.array(HEAD_COLOURS[label])[:, None]
    tx, ty = cx - facing * 8.5, cy
    tail = (np.abs(yy - ty) <= (facing * (xx - tx) + 3.0) * 0.9) & (np.abs(xx - tx) <= 3.0)
    image[:, tail & ~body] = 0.45
    return image.clip(0, 1), {"head": (hx, hy), "body": (cx, cy), "tail": (tx, ty)}


def drawn_birds(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``n`` images (n, 3, 32, 32), labels alternating 0, 1, and keypoints."""
    rng = np.random.default_rng(seed)
    images, keypoints = [], []
    labels = [i % 2 for i in range(n)]
    for label in labels:
        image, points = draw_bird(rng, label)
        images.append(image)
        keypoints.append(points)
    return torch.tensor(np.stack(images), dtype=torch.float32), torch.tensor(labels), keypoints


def bird_classifier(
    seed: int, images: torch.Tensor, labels: torch.Tensor, epochs: int = 25
) -> SplitClassifier:
    """f: three conv + pool stages to a 16 x 4 x 4 grid (8 px cells); g: flatten + linear.."""
    torch.manual_seed(seed)
    f = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    g = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 2))
    model = nn.Sequential(f, g)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for batch in torch.arange(len(images)).split(64):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimiser.step()
    return SplitClassifier(f=f.eval(), g=g.eval())


class PartCells(nn.Module):
    """The auxiliary model u of the ground-truth test: hue-blind part histograms on f's 4 x 4 grid.

    Per pixel: saturated (a head of either colour), mid grey (body) or dark grey (tail); each cell is the
    fraction of its pixels of each kind. This is the paper's parts-detector auxiliary model
    (its upper bound, Table 4) in miniature: it knows parts, never the colour that separates the classes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saturation = x.amax(dim=1) - x.amin(dim=1)
        grey = saturation < 0.1
        luminance = x.mean(dim=1)
        kinds = torch.stack(
            [
                saturation > 0.5,
                grey & (luminance > 0.55) & (luminance < 0.65),
                grey & (luminance > 0.4) & (luminance < 0.5),
            ],
            dim=1,
        ).float()
        return nn.functional.avg_pool2d(kinds, 8)
