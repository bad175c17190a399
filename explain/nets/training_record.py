"""What every generative training function shares: a step loop with tqdm and ``progress(done, total)``,
batches drawn with a ``torch.Generator``, and a JSON record of the data, steps and loss beside the weights."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

Progress = Callable[[int, int], None]
RECORD_NAME = "training.json"


def check_steps(steps: int, batch_size: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}; pass the number of optimiser steps to run")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")


def check_images(images: torch.Tensor, name: str = "images") -> None:
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N >= 1, C, H, W), not {tuple(images.shape)}")
    if not torch.is_floating_point(images):
        raise ValueError(f"{name} must be floating point (the classifier's input scale), not {images.dtype}")


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches drawn without replacement within each pass over ``n`` items."""
    order = torch.randperm(n, generator=generator)
    position = 0
    for _ in range(steps):
        if position + min(batch_size, n) > n:
            order, position = torch.randperm(n, generator=generator), 0
        yield order[position : position + batch_size]
        position += batch_size


class StepLoop:
    """tqdm bar + progress callback + loss history (every step's loss, and a running mean for the bar)."""

    def __init__(self, steps: int, description: str, progress: Progress | None, every: int = 10):
        self.steps, self.progress, self.every = steps, progress, every
        self.losses: list[float] = []
        self.parts: dict[str, list[float]] = {}
        self.bar = tqdm(total=steps, desc=description, leave=False, disable=None)
        if progress is not None:
            progress(0, steps)

    def step(self, loss: float, **parts: float) -> None:
        self.losses.append(float(loss))
        for name, value in parts.items():
            self.parts.setdefault(name, []).append(float(value))
        self.bar.update(1)
        done = len(self.losses)
        if done % self.every == 0 or done == self.steps:
            recent = self.losses[-self.every :]
            self.bar.set_postfix(
                loss=f"{sum(recent) / len(recent):.4f}", **{k: f"{v:.3f}" for k, v in parts.items()}
            )
            if self.progress is not None:
                self.progress(done, self.steps)

    def close(self) -> None:
        self.bar.close()

    def summary(self) -> dict[str, Any]:
        """The loss curve; with named parts (e.g. C3LT's cls, prx), each part's first and last-10% mean."""
        last = max(1, self.steps // 10)
        tail = self.losses[-last:]
        out: dict[str, Any] = {
            "steps": self.steps,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last_10pct": sum(tail) / len(tail) if tail else None,
            "loss_every_step": self.losses,
        }
        if self.parts:
            out["parts_first"] = {k: v[0] for k, v in self.parts.items()}
            out["parts_last_10pct"] = {k: sum(v[-last:]) / len(v[-last:]) for k, v in self.parts.items()}
        return out


def write_record(out_dir: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """``out_dir/training.json``: what was trained on, how long, and the loss curve."""
    path = Path(out_dir) / RECORD_NAME
    path.write_text(json.dumps(record, indent=1, default=float))
    return path


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(path) / RECORD_NAME).read_text())


def data_summary(tensor: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"count": int(tensor.shape[0]), "shape": list(tensor.shape[1:])}
    if labels is not None:
        values, counts = torch.unique(labels, return_counts=True)
        out["per_label"] = {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}
    return out


def require_dir(path: str | os.PathLike[str], what: str) -> Path:
    """A local directory that exists, or an error that says what to pass instead."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"{what} directory {str(p)!r} does not exist; pass a local directory saved with save_pretrained "
            f"(the platform's training functions write one). Nothing is downloaded."
        )
    return p
