"""Automatic metrics of cell-replacement counterfactuals (Goyal et al. 2019; Vandenhende et al. 2022, 4.1).

- Near-KP: do the replaced cells contain object keypoints (a proxy for discriminative regions)?
- Same-KP: do the query cell and the distractor cell contain the same part (semantic consistency)?
- #Edits: how many cell replacements until the decision flips.

Keypoints come per image as ``{part_name: (x, y)}`` in pixels, x along the width, or ``{part_name: [(x, y),
...]}`` where the caller merged left and right instances of a part into one name (the paper counts 'left wing'
and 'right wing' as 'wing'). Grid cells index row-major over an (h, w) grid laid on the image exactly as
``explain.methods.base.cells_to_mask`` lays it: cell (r, c) covers rows ``r*H//h .. (r+1)*H//h`` and columns
``c*W//w .. (c+1)*W//w``, end exclusive. A keypoint at a fractional position lies in the cell that holds the
pixel ``(floor(y), floor(x))``. Keypoints outside the image (cropping pushes some out) are ignored; leave out
invisible parts before calling, since CUB stores them as (0, 0), which is a pixel of the image.

Edits are ``Edit`` objects or their JSON form, ``(query_cell, distractor, distractor_cell)`` triples.

Each metric is the mean over a list of edits, ``nan`` for none. Pass ``edits[:1]`` for the paper's "single
edit" rows. For its "all edits" rows the paper pools the per-edit values of every counterfactual before
averaging (the authors' evaluation code concatenates them), so use the ``*_per_edit`` functions and average
the concatenation rather than averaging per-counterfactual means.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Keypoints = Mapping[str, Sequence[float] | Sequence[Sequence[float]]]


def cell_parts(keypoints: Keypoints, grid: tuple[int, int], size: tuple[int, int]) -> list[set[str]]:
    """For each of the h*w cells (row-major), the set of part names whose keypoint falls inside it."""
    h, w = _check_pair(grid, "grid")
    height, width = _check_pair(size, "size")
    tops = np.array([r * height // h for r in range(h + 1)])
    lefts = np.array([c * width // w for c in range(w + 1)])
    parts: list[set[str]] = [set() for _ in range(h * w)]
    for name, points in keypoints.items():
        xy = _points(name, points)
        x, y = xy[:, 0], xy[:, 1]
        seen = (x >= 0) & (x < width) & (y >= 0) & (y < height)  # NaN compares False: ignored too
        # The last boundary at or before the coordinate; empty cells (H < h) share a boundary and are skipped.
        rows = np.searchsorted(tops, y[seen], side="right") - 1
        cols = np.searchsorted(lefts, x[seen], side="right") - 1
        for cell in rows * w + cols:
            parts[int(cell)].add(name)
    return parts


def near_kp_per_edit(
    edits: Iterable[Any],
    query_keypoints: Keypoints,
    distractor_keypoints_list: Sequence[Keypoints],
    grid: tuple[int, int],
    query_size: tuple[int, int],
    distractor_sizes: Sequence[tuple[int, int]],
    *,
    require_both: bool = False,
) -> list[float]:
    """Near-KP of each edit: 1 if both cells contain a keypoint, 1/2 if one does, 0 if neither.

    The paper says only that Near-KP "measures if the image regions contain object keypoints", which leaves
    open how the query's and the distractor's region combine. The authors' released evaluation code
    (facebookresearch/visual-counterfactuals, ``explainer/eval.py``) scores an edit as the mean of the two
    indicators, ``0.5 * ([query cell has a keypoint] + [distractor cell has a keypoint])``; that is the
    default here, so numbers are comparable with the paper's tables. ``require_both=True`` gives the stricter
    reading: 1 only if both cells contain a keypoint.
    """
    scores = []
    for query_parts, distractor_parts in _edit_parts(
        edits, query_keypoints, distractor_keypoints_list, grid, query_size, distractor_sizes
    ):
        if require_both:
            scores.append(float(bool(query_parts) and bool(distractor_parts)))
        else:
            scores.append(0.5 * (bool(query_parts) + bool(distractor_parts)))
    return scores


def near_kp(
    edits: Iterable[Any],
    query_keypoints: Keypoints,
    distractor_keypoints_list: Sequence[Keypoints],
    grid: tuple[int, int],
    query_size: tuple[int, int],
    distractor_sizes: Sequence[tuple[int, int]],
    *,
    require_both: bool = False,
) -> float:
    """Mean Near-KP over ``edits`` (``near_kp_per_edit`` says how the paper is read); ``nan`` if none."""
    return _mean(
        near_kp_per_edit(
            edits,
            query_keypoints,
            distractor_keypoints_list,
            grid,
            query_size,
            distractor_sizes,
            require_both=require_both,
        )
    )


def same_kp_per_edit(
    edits: Iterable[Any],
    query_keypoints: Keypoints,
    distractor_keypoints_list: Sequence[Keypoints],
    grid: tuple[int, int],
    query_size: tuple[int, int],
    distractor_sizes: Sequence[tuple[int, int]],
) -> list[float]:
    """Same-KP of each edit: 1 if the query cell and the distractor cell share a part name, else 0.

    Every edit counts, including those whose cells hold no keypoint (they score 0): the paper measures "how
    often we select the same keypoints in the query and distractor image", over all selections, and the
    authors' code averages over all edits likewise.
    """
    return [
        float(bool(query_parts & distractor_parts))
        for query_parts, distractor_parts in _edit_parts(
            edits, query_keypoints, distractor_keypoints_list, grid, query_size, distractor_sizes
        )
    ]


def same_kp(
    edits: Iterable[Any],
    query_keypoints: Keypoints,
    distractor_keypoints_list: Sequence[Keypoints],
    grid: tuple[int, int],
    query_size: tuple[int, int],
    distractor_sizes: Sequence[tuple[int, int]],
) -> float:
    """Mean Same-KP over ``edits``, the fraction that replace a part with the same part; ``nan`` if none."""
    return _mean(
        same_kp_per_edit(
            edits, query_keypoints, distractor_keypoints_list, grid, query_size, distractor_sizes
        )
    )


def edit_count(edits: Iterable[Any]) -> int:
    """The number of edits (the paper's #Edits for one counterfactual)."""
    return len(_triples(edits))


def flip_rate(flags: Sequence[bool]) -> float:
    """The fraction of counterfactuals whose edits flipped the decision; ``nan`` for none."""
    for i, flag in enumerate(flags):
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"flags must be booleans, flag {i} is {flag!r} ({type(flag).__name__})")
    return _mean([float(flag) for flag in flags])


def _edit_parts(
    edits: Iterable[Any],
    query_keypoints: Keypoints,
    distractor_keypoints_list: Sequence[Keypoints],
    grid: tuple[int, int],
    query_size: tuple[int, int],
    distractor_sizes: Sequence[tuple[int, int]],
) -> list[tuple[set[str], set[str]]]:
    """For each edit, the parts in its query cell and the parts in its distractor cell."""
    if len(distractor_keypoints_list) != len(distractor_sizes):
        raise ValueError(
            f"{len(distractor_keypoints_list)} distractor keypoint sets but {len(distractor_sizes)} "
            "distractor sizes; pass one of each per distractor image"
        )
    h, w = _check_pair(grid, "grid")
    query = cell_parts(query_keypoints, grid, query_size)
    distractors = [
        cell_parts(keypoints, grid, size)
        for keypoints, size in zip(distractor_keypoints_list, distractor_sizes, strict=True)
    ]
    pairs = []
    for query_cell, distractor, distractor_cell in _triples(edits):
        for cell in (query_cell, distractor_cell):
            if not 0 <= cell < h * w:
                raise ValueError(f"cell {cell} is outside the {h}x{w} grid (cells 0..{h * w - 1})")
        if not 0 <= distractor < len(distractors):
            raise ValueError(
                f"edit names distractor {distractor} but there are {len(distractors)} distractors"
            )
        pairs.append((query[query_cell], distractors[distractor][distractor_cell]))
    return pairs


def _triples(edits: Iterable[Any]) -> list[tuple[int, int, int]]:
    """Edits as (query_cell, distractor, distractor_cell) integer triples, from ``Edit`` objects or JSON."""
    triples = []
    for i, edit in enumerate(edits):
        try:
            if hasattr(edit, "query_cell"):
                fields = (edit.query_cell, edit.distractor, edit.distractor_cell)
            else:
                fields = tuple(edit)
                if len(fields) != 3:
                    raise ValueError
            triples.append(tuple(operator.index(v) for v in fields))
        except (TypeError, ValueError):
            raise ValueError(
                f"edit {i} is {edit!r}: expected an Edit or a (query_cell, distractor, distractor_cell) "
                "triple of integers"
            ) from None
    return triples


def _points(name: str, points: Any) -> np.ndarray:
    """A keypoint entry as an (n, 2) float array of (x, y) rows."""
    problem = f"keypoint {name!r} is {points!r}: expected (x, y) or a list of (x, y) pairs"
    try:
        xy = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(problem) from None
    if xy.size == 0:
        return xy.reshape(0, 2)
    if xy.shape == (2,):
        return xy[None, :]
    if xy.ndim == 2 and xy.shape[1] == 2:
        return xy
    raise ValueError(problem)


def _check_pair(pair: Sequence[int], what: str) -> tuple[int, int]:
    try:
        first, second = (operator.index(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two positive integers, got {pair!r}") from None
    if first < 1 or second < 1:
        raise ValueError(f"{what} must be two positive integers, got {pair!r}")
    return first, second


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


_SIDES = ("left", "right")


def keypoint_metrics(
    edits: Sequence[Any],
    query_keypoints: Keypoints,
    distractor_keypoints_list: Sequence[Keypoints],
    grid: tuple[int, int],
    query_size: tuple[int, int],
    distractor_sizes: Sequence[tuple[int, int]],
) -> dict[str, float]:
    """One counterfactual's keypoint metrics as stored with it: Near-KP and Same-KP of the first edit and of
    all edits. Rates are ``nan`` without edits."""
    args = (query_keypoints, distractor_keypoints_list, grid, query_size, distractor_sizes)
    edits = list(edits)
    return {
        "near_kp_first": near_kp(edits[:1], *args),
        "near_kp_all": near_kp(edits, *args),
        "same_kp_first": same_kp(edits[:1], *args),
        "same_kp_all": same_kp(edits, *args),
    }


def fit_cell_clusters(cells: np.ndarray, k: int, *, seed: int = 0, iterations: int = 100) -> np.ndarray:
    """K-means centroids (k, d) of auxiliary-model cells (N, d, h, w), for the same-cluster proxy.

    Cells are L2-normalised first (the semantic method compares them by cosine). K-means++ seeding from
    ``np.random.default_rng(seed)``, then Lloyd steps until the assignment stops changing; an emptied
    cluster is re-seeded with the cell farthest from its centroid.
    """
    vectors = _unit_cells(cells)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= len(vectors):
        raise ValueError(f"k must be an integer in 1..{len(vectors)} (the number of cells), got {k!r}")
    rng = np.random.default_rng(seed)
    centroids = [vectors[rng.integers(len(vectors))]]
    for _ in range(1, k):
        distance = np.min(((vectors[:, None, :] - np.array(centroids)[None]) ** 2).sum(-1), axis=1)
        total = distance.sum()
        pick = rng.choice(len(vectors), p=distance / total) if total > 0 else rng.integers(len(vectors))
        centroids.append(vectors[pick])
    centre = np.array(centroids)
    labels = None
    for _ in range(iterations):
        distance = ((vectors[:, None, :] - centre[None]) ** 2).sum(-1)
        new = distance.argmin(axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = vectors[labels == c]
            if len(members):
                centre[c] = members.mean(axis=0)
            else:
                centre[c] = vectors[distance[np.arange(len(vectors)), labels].argmax()]
    return centre


def assign_cells(cells: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cluster of each cell: (h*w,) row-major for one (d, h, w) image, (N, h*w) for (N, d, h, w) cells."""
    single = np.asarray(cells).ndim == 3
    batch = np.asarray(cells)[None] if single else np.asarray(cells)
    if batch.ndim != 4 or batch.shape[1] != np.asarray(centroids).shape[1]:
        raise ValueError(
            f"cells must be (d, h, w) or (N, d, h, w) with d = {np.asarray(centroids).shape[1]} (the "
            f"centroids' width), got {np.asarray(cells).shape}"
        )
    vectors = _unit_cells(batch)
    labels = ((vectors[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(axis=1)
    labels = labels.reshape(batch.shape[0], -1)
    return labels[0] if single else labels


def same_cluster_proxy_per_edit(
    edits: Iterable[Any], query_clusters: Sequence[int], distractor_clusters_list: Sequence[Sequence[int]]
) -> list[float]:
    """A proxy for Same-KP on datasets without keypoints: 1 if an edit's query cell and distractor cell fall
    in the same K-means cluster of auxiliary cells (``assign_cells``), else 0."""
    scores = []
    for query_cell, distractor, distractor_cell in _triples(edits):
        if not 0 <= distractor < len(distractor_clusters_list):
            raise ValueError(
                f"edit names distractor {distractor} but there are {len(distractor_clusters_list)} "
                "distractors"
            )
        clusters = distractor_clusters_list[distractor]
        for cell, size in ((query_cell, len(query_clusters)), (distractor_cell, len(clusters))):
            if not 0 <= cell < size:
                raise ValueError(f"cell {cell} is outside the grid (cells 0..{size - 1})")
        scores.append(float(query_clusters[query_cell] == clusters[distractor_cell]))
    return scores


def same_cluster_proxy(
    edits: Iterable[Any], query_clusters: Sequence[int], distractor_clusters_list: Sequence[Sequence[int]]
) -> float:
    """Mean same-cluster rate over ``edits`` (a proxy for Same-KP; label it so); ``nan`` for none."""
    return _mean(same_cluster_proxy_per_edit(edits, query_clusters, distractor_clusters_list))


def _unit_cells(cells: np.ndarray) -> np.ndarray:
    """(N, d, h, w) cells as (N * h * w, d) unit vectors (image-major, then row-major cells)."""
    cells = np.asarray(cells, dtype=np.float64)
    if cells.ndim != 4 or not np.isfinite(cells).all():
        raise ValueError(f"cells must be a finite (N, d, h, w) array, got shape {cells.shape}")
    vectors = cells.transpose(0, 2, 3, 1).reshape(-1, cells.shape[1])
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
