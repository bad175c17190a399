"""Mining the class pairs a study teaches, from a confusion matrix or from class attributes.

- ``most_confused_pairs``: for every class c, the class c' its images are most often mistaken for
  (Vandenhende et al. 2022, section 4.4).
- ``top_k_confused_pairs``: the k (class, class) pairs with the highest confusion overall.
- ``nearest_by_attributes``: for every class, the class whose mean attribute vector is nearest (Goyal et al.
  2019, CUB's 312 attributes).

Rows of a confusion matrix are true classes, columns predicted classes. Scores are rates: the share of class
c's images predicted as c'. Ties go to the lower class index, so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MinedPair:
    class_a: int  # query class
    class_b: int  # the class it is confused with (distractor class)
    score: float  # confusion rate, or attribute distance for nearest_by_attributes (smaller = nearer)


def confusion_rates(confusion: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Row-normalised confusion with a zero diagonal: entry (c, c') = share of class c predicted as c'."""
    matrix = np.asarray(confusion, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(
            f"a confusion matrix must be square with 2 or more classes, got shape {matrix.shape}"
        )
    if (matrix < 0).any() or not np.isfinite(matrix).all():
        raise ValueError("a confusion matrix holds counts: every entry must be finite and >= 0")
    totals = matrix.sum(axis=1, keepdims=True)
    rates = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    np.fill_diagonal(rates, 0.0)
    return rates


def most_confused_pairs(confusion: Sequence[Sequence[float]] | np.ndarray) -> list[MinedPair]:
    """For every class with any confusion, its most-confused other class (one pair per class, in order)."""
    rates = confusion_rates(confusion)
    pairs = []
    for c, row in enumerate(rates):
        if row.max() > 0:
            other = int(np.argmax(row))  # first maximum: ties go to the lower index
            pairs.append(MinedPair(c, other, float(row[other])))
    return pairs


def top_k_confused_pairs(
    confusion: Sequence[Sequence[float]] | np.ndarray, k: int, *, symmetric: bool = False
) -> list[MinedPair]:
    """The k ordered pairs (c, c') with the highest confusion rate, highest first; pairs never confused are
    left out. With ``symmetric`` a pair is scored by the mean of both directions and listed once (c < c')."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rates = confusion_rates(confusion)
    n = len(rates)
    if symmetric:
        rates = (rates + rates.T) / 2
        candidates = [(rates[a, b], a, b) for a in range(n) for b in range(a + 1, n)]
    else:
        candidates = [(rates[a, b], a, b) for a in range(n) for b in range(n) if a != b]
    candidates = [c for c in candidates if c[0] > 0]
    candidates.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [MinedPair(a, b, float(score)) for score, a, b in candidates[:k]]


def nearest_by_attributes(attributes_per_class: Mapping[int, np.ndarray] | np.ndarray) -> list[MinedPair]:
    """For every class, the class whose attribute vector is nearest (Euclidean), with that distance.

    ``attributes_per_class`` is a (classes, attributes) array of mean attribute vectors, or a mapping from a
    class index to its images' attribute vectors (images, attributes), averaged here.
    """
    if isinstance(attributes_per_class, Mapping):
        if len(attributes_per_class) < 2:
            raise ValueError("need attribute vectors of 2 or more classes")
        classes = sorted(attributes_per_class)
        means = []
        for c in classes:
            vectors = np.asarray(attributes_per_class[c], dtype=np.float64)
            if vectors.ndim == 1:
                vectors = vectors[None]
            if vectors.size == 0:
                raise ValueError(f"class {c} has no attribute vectors")
            means.append(vectors.mean(axis=0))
        if len({m.shape for m in means}) != 1:
            raise ValueError(
                f"classes have attribute vectors of different lengths: {sorted({len(m) for m in means})}"
            )
        matrix = np.stack(means)
    else:
        matrix = np.asarray(attributes_per_class, dtype=np.float64)
        classes = list(range(len(matrix)))
        if matrix.ndim != 2 or len(matrix) < 2:
            raise ValueError(
                f"expected a (classes, attributes) array with 2 or more classes, got {matrix.shape}"
            )
    distances = np.sqrt(((matrix[:, None, :] - matrix[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(distances, np.inf)
    return [
        MinedPair(classes[i], classes[int(np.argmin(row))], float(row.min()))
        for i, row in enumerate(distances)
    ]
