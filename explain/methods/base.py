"""The one interface every counterfactual method implements.

A method's hyperparameters are its constructor's keyword arguments, with the papers' defaults; ``config()``
returns them as JSON so that any stimulus can be regenerated from the stored config.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from explain.nets.split import SplitClassifier


@dataclass(frozen=True)
class Edit:
    """One cell replacement: ``query_cell`` takes cell ``distractor_cell`` of distractor ``distractor``.

    Cells are indexed row-major over the feature grid (``row * w + col``).
    """

    query_cell: int
    distractor: int
    distractor_cell: int


@dataclass
class Counterfactual:
    """What a method returns for one query image."""

    method: str
    target: int
    flipped: bool
    edits: list[Edit]
    scores: list[float]
    query_mask: np.ndarray  # (H, W) float32 in [0, 1], image resolution
    distractor_masks: list[np.ndarray]  # one (H, W) mask per distractor image
    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    image: np.ndarray | None = None  # the synthesised counterfactual, for generative methods
    grid: tuple[int, int] | None = None  # (h, w) of the feature grid the edits index, for cell methods

    def region_masks(self, *, all_edits: bool = False) -> tuple[np.ndarray, int, np.ndarray]:
        """``(query_mask, distractor, distractor_mask)``: the regions a learning stimulus shows.

        By default the first edit only (the paper's stimulus): its query cell, the distractor image it came
        from and that image's cell. ``all_edits=True``: every edited query cell, and every cell taken from the
        first edit's distractor. Without edits (or without a grid): the stored masks and distractor 0.
        """
        if not self.edits or self.grid is None:
            return self.query_mask, 0, self.distractor_masks[0] if self.distractor_masks else self.query_mask
        chosen = self.edits if all_edits else self.edits[:1]
        distractor = chosen[0].distractor
        query_size = tuple(self.query_mask.shape)
        distractor_size = tuple(self.distractor_masks[distractor].shape)
        query_mask = cells_to_mask(sorted({e.query_cell for e in chosen}), self.grid, query_size)
        taken = sorted({e.distractor_cell for e in chosen if e.distractor == distractor})
        return query_mask, distractor, cells_to_mask(taken, self.grid, distractor_size)

    def to_json(self) -> dict[str, Any]:
        """Everything but the arrays, as JSON-serialisable data."""
        return {
            "method": self.method,
            "target": self.target,
            "flipped": self.flipped,
            "edits": [[e.query_cell, e.distractor, e.distractor_cell] for e in self.edits],
            "scores": self.scores,
            "config": self.config,
            "timings": self.timings,
            "grid": list(self.grid) if self.grid is not None else None,
        }


class CounterfactualMethod:
    """Base class: subclasses set ``name`` and implement ``explain``."""

    name: ClassVar[str]

    def config(self) -> dict[str, Any]:
        """The constructor arguments of this instance, plus the method name."""
        params = inspect.signature(type(self).__init__).parameters
        values = {p: getattr(self, p) for p in params if p != "self"}
        return {"method": self.name, **values}

    def explain(
        self,
        model: SplitClassifier,
        query: torch.Tensor,
        target: int,
        distractors: torch.Tensor,
        *,
        aux: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> Counterfactual:
        """Explain why ``query`` (1, C, H, W) is not class ``target`` using ``distractors`` (N, C, H, W)."""
        raise NotImplementedError

    def explain_batch(
        self,
        model: SplitClassifier,
        queries: torch.Tensor,
        targets: list[int],
        distractors: list[torch.Tensor],
        *,
        aux: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Counterfactual]:
        """``explain`` for each query (Q, C, H, W) with its target and its distractors (N_q, C, H, W).

        The results equal item-by-item ``explain``; methods override this where batching saves work. An
        unreachable target never raises: its result says ``flipped=False``.
        """
        check_batch(queries, targets, distractors)
        return [
            self.explain(model, queries[q : q + 1], targets[q], distractors[q], aux=aux, generator=generator)
            for q in range(queries.shape[0])
        ]


def check_batch(queries: torch.Tensor, targets: list[int], distractors: list[torch.Tensor]) -> None:
    """Refuse a batch whose parts do not line up, naming the counts."""
    if queries.ndim != 4:
        raise ValueError(f"queries must have shape (Q, C, H, W), not {tuple(queries.shape)}")
    if len(targets) != queries.shape[0] or len(distractors) != queries.shape[0]:
        raise ValueError(
            f"{queries.shape[0]} queries but {len(targets)} targets and {len(distractors)} distractor sets; "
            "pass one target and one (N, C, H, W) distractor tensor per query"
        )


def cells_to_mask(cells: list[int], grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A (H, W) float32 mask covering the given grid cells, each cell mapped to its image region."""
    h, w = grid
    height, width = size
    mask = np.zeros((height, width), dtype=np.float32)
    for cell in cells:
        r, c = divmod(cell, w)
        top, bottom = r * height // h, (r + 1) * height // h
        left, right = c * width // w, (c + 1) * width // w
        mask[top:bottom, left:right] = 1.0
    return mask
