"""explain.stimuli.metrics on hand-built cases with known answers, and against a brute-force reference."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from explain.methods.base import Edit, cells_to_mask
from explain.stimuli.metrics import (
    assign_cells,
    cell_parts,
    edit_count,
    fit_cell_clusters,
    flip_rate,
    keypoint_metrics,
    near_kp,
    near_kp_per_edit,
    same_cluster_proxy,
    same_cluster_proxy_per_edit,
    same_kp,
    same_kp_per_edit,
)

# A 2x2 grid on an 8x8 query: cell 0 = rows 0-3 x cols 0-3, 1 = rows 0-3 x cols 4-7, 2 = rows 4-7 x
# cols 0-3, 3 the rest. Keypoints are (x, y): x is the column.
QUERY = {
    "beak": (1, 1),  # cell 0
    "wing": [(6, 2), (5.5, 6.9)],  # cells 1 and 3: left and right wing merged
    "tail": (-1, 3),  # outside the image: ignored
}
DISTRACTORS = [
    {"beak": (5, 5), "wing": (1, 6)},  # 8x8: cells 3 and 2
    {"tail": (7, 3), "eye": []},  # 4x8: cells are 2 rows by 4 columns, (7, 3) is in cell 3; no eye visible
]
SIZES = [(8, 8), (4, 8)]
EDITS = [
    (0, 0, 3),  # beak -> beak: near 1, same 1
    (1, 0, 2),  # wing -> wing: near 1, same 1
    (2, 0, 0),  # nothing -> nothing: near 0, same 0
    (3, 1, 3),  # wing -> tail: near 1, same 0
    (0, 1, 0),  # beak -> nothing: near 1/2 (0 when both are required), same 0
]


def test_cell_parts_hand_built():
    assert cell_parts(QUERY, (2, 2), (8, 8)) == [{"beak"}, {"wing"}, set(), {"wing"}]
    assert cell_parts(DISTRACTORS[1], (2, 2), (4, 8)) == [set(), set(), set(), {"tail"}]


def test_cell_parts_boundaries_follow_cells_to_mask():
    # 7 rows in 2 cells: rows 0-2 and 3-6. y = 2.99 is in pixel row 2, y = 3 starts the second cell.
    parts = cell_parts({"a": (0, 2.99), "b": (6.99, 3.0), "c": (7, 0), "d": (0, 7)}, (2, 2), (7, 7))
    assert parts == [{"a"}, set(), set(), {"b"}]  # c and d lie just outside the image


def test_metrics_hand_built():
    args = (QUERY, DISTRACTORS, (2, 2), (8, 8), SIZES)
    assert near_kp_per_edit(EDITS, *args) == [1.0, 1.0, 0.0, 1.0, 0.5]
    assert near_kp(EDITS, *args) == pytest.approx(0.7)
    assert near_kp(EDITS, *args, require_both=True) == pytest.approx(0.6)
    assert same_kp_per_edit(EDITS, *args) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert same_kp(EDITS, *args) == pytest.approx(0.4)
    assert near_kp(EDITS[:1], *args) == 1.0  # the paper's "single edit": the first edit only
    assert edit_count(EDITS) == 5


def test_edit_objects_and_json_triples_agree():
    args = (QUERY, DISTRACTORS, (2, 2), (8, 8), SIZES)
    objects = [Edit(*edit) for edit in EDITS]
    json_lists = [list(edit) for edit in EDITS]
    assert near_kp(objects, *args) == near_kp(json_lists, *args) == near_kp(EDITS, *args)
    assert same_kp(objects, *args) == same_kp(json_lists, *args) == same_kp(EDITS, *args)
    assert edit_count(objects) == edit_count(json_lists) == 5


def test_no_edits_is_nan():
    args = (QUERY, DISTRACTORS, (2, 2), (8, 8), SIZES)
    assert math.isnan(near_kp([], *args))
    assert math.isnan(same_kp([], *args))
    assert edit_count([]) == 0
    assert math.isnan(flip_rate([]))


def test_flip_rate():
    assert flip_rate([True, False, True, True]) == 0.75
    assert flip_rate(np.array([True, False])) == 0.5
    with pytest.raises(TypeError, match="0.9"):
        flip_rate([True, 0.9])


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ([(4, 0, 0)], "cell 4 is outside the 2x2 grid"),
        ([(0, 0, -1)], "cell -1 is outside"),
        ([(0, 2, 0)], "distractor 2 but there are 2"),
        ([(0, 0)], r"edit 0 is \(0, 0\)"),
        ([(0, 0, 1.5)], "triple of integers"),
        ([None], "edit 0 is None"),
    ],
)
def test_bad_edits(edits, message):
    with pytest.raises(ValueError, match=message):
        near_kp(edits, QUERY, DISTRACTORS, (2, 2), (8, 8), SIZES)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 distractor keypoint sets but 1 distractor sizes"):
        same_kp(EDITS, QUERY, DISTRACTORS, (2, 2), (8, 8), SIZES[:1])
    with pytest.raises(ValueError, match="keypoint 'beak'"):
        cell_parts({"beak": (1, 2, 3)}, (2, 2), (8, 8))
    with pytest.raises(ValueError, match="grid must be two positive integers"):
        cell_parts(QUERY, (0, 2), (8, 8))


def reference_parts(keypoints: dict, cell: int, grid: tuple[int, int], size: tuple[int, int]) -> set[str]:
    """Parts whose keypoint lands on a pixel of the cell as cells_to_mask draws it."""
    mask = cells_to_mask([cell], grid, size)
    height, width = size
    parts = set()
    for name, points in keypoints.items():
        for x, y in points:
            if 0 <= x < width and 0 <= y < height and mask[math.floor(y), math.floor(x)]:
                parts.add(name)
    return parts


def random_coordinate(rng: np.random.Generator, extent: int) -> float:
    """Mostly inside the image, often on a pixel boundary, sometimes just outside."""
    kind = rng.random()
    if kind < 0.15:
        return float(rng.choice([rng.uniform(-2, 0), extent, rng.uniform(extent, extent + 2)]))
    if kind < 0.4:
        return float(rng.integers(0, extent))
    return float(rng.uniform(0, extent))


def random_keypoints(rng: np.random.Generator, size: tuple[int, int]) -> dict:
    height, width = size
    keypoints = {}
    for name in ("beak", "wing", "tail"):
        if rng.random() < 0.9:
            count = int(rng.integers(0, 6))
            keypoints[name] = [
                (random_coordinate(rng, width), random_coordinate(rng, height)) for _ in range(count)
            ]
    return keypoints


@pytest.mark.parametrize("seed", range(30))
def test_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    grid = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    query_size = (int(rng.integers(1, 16)), int(rng.integers(1, 16)))  # smaller than the grid at times
    n = int(rng.integers(1, 4))
    distractor_sizes = [(int(rng.integers(1, 16)), int(rng.integers(1, 16))) for _ in range(n)]
    query = random_keypoints(rng, query_size)
    distractors = [random_keypoints(rng, size) for size in distractor_sizes]
    cells = grid[0] * grid[1]
    edits = [
        (int(rng.integers(cells)), int(rng.integers(n)), int(rng.integers(cells)))
        for _ in range(int(rng.integers(1, 10)))
    ]

    assert cell_parts(query, grid, query_size) == [
        reference_parts(query, cell, grid, query_size) for cell in range(cells)
    ]
    near, both, same = [], [], []
    for query_cell, d, distractor_cell in edits:
        q = reference_parts(query, query_cell, grid, query_size)
        t = reference_parts(distractors[d], distractor_cell, grid, distractor_sizes[d])
        near.append((bool(q) + bool(t)) / 2)
        both.append(float(bool(q) and bool(t)))
        same.append(float(bool(q & t)))
    args = (query, distractors, grid, query_size, distractor_sizes)
    mixed = [Edit(*e) if i % 2 else list(e) for i, e in enumerate(edits)]
    assert near_kp_per_edit(mixed, *args) == near
    assert near_kp(mixed, *args) == pytest.approx(np.mean(near))
    assert near_kp(mixed, *args, require_both=True) == pytest.approx(np.mean(both))
    assert same_kp_per_edit(mixed, *args) == same
    assert same_kp(mixed, *args) == pytest.approx(np.mean(same))


def test_imports_without_django():
    code = "import sys, explain.stimuli.metrics; sys.exit('django' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={"PYTHONPATH": str(root)})


def test_keypoint_metrics_as_stored_with_an_explanation():
    summary = keypoint_metrics(EDITS, QUERY, DISTRACTORS, (2, 2), (8, 8), SIZES)
    assert summary == {
        "near_kp_first": 1.0,
        "near_kp_all": pytest.approx(0.7),
        "same_kp_first": 1.0,
        "same_kp_all": pytest.approx(0.4),
    }


def reference_kmeans_labels(vectors: np.ndarray, centroids: np.ndarray) -> list[int]:
    labels = []
    for v in vectors:
        distances = [float(((v - c) ** 2).sum()) for c in centroids]
        labels.append(distances.index(min(distances)))
    return labels


@pytest.mark.parametrize("seed", range(4))
def test_cell_clusters_recover_planted_parts(seed):
    """Cells drawn around three well-separated directions: K-means (k=3) puts each part in its own cluster,
    and the proxy scores an edit 1 exactly when its two cells come from the same planted part."""
    rng = np.random.default_rng(seed)
    directions = np.eye(6)[:3] * 5
    parts = rng.integers(0, 3, size=(4, 3, 3))  # 4 images on a 3 x 3 grid
    cells = directions[parts] + rng.normal(0, 0.3, size=(4, 3, 3, 6))
    cells = cells.transpose(0, 3, 1, 2)  # (N, d, h, w)
    centroids = fit_cell_clusters(cells, 3, seed=seed)
    labels = assign_cells(cells, centroids)
    flat_parts = parts.reshape(4, -1)
    for a in range(9 * 4):
        for b in range(9 * 4):
            same_part = flat_parts.flat[a] == flat_parts.flat[b]
            assert (labels.flat[a] == labels.flat[b]) == same_part
    unit = cells.transpose(0, 2, 3, 1).reshape(-1, 6)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    assert labels.reshape(-1).tolist() == reference_kmeans_labels(unit, centroids)
    np.testing.assert_array_equal(assign_cells(cells[1], centroids), labels[1])
    edits = [(int(rng.integers(9)), int(rng.integers(3)), int(rng.integers(9))) for _ in range(12)]
    expected = [float(flat_parts[0, q] == flat_parts[1 + d, j]) for q, d, j in edits]
    assert same_cluster_proxy_per_edit(edits, labels[0], list(labels[1:])) == expected
    assert same_cluster_proxy(edits, labels[0], list(labels[1:])) == pytest.approx(np.mean(expected))
    assert math.isnan(same_cluster_proxy([], labels[0], list(labels[1:])))


def test_cluster_inputs_are_checked():
    cells = np.random.default_rng(0).normal(size=(2, 4, 2, 2))
    with pytest.raises(ValueError, match="k must be an integer in 1..8"):
        fit_cell_clusters(cells, 9)
    with pytest.raises(ValueError, match="d = 4"):
        assign_cells(np.zeros((3, 2, 2)), fit_cell_clusters(cells, 2))
    with pytest.raises(ValueError, match="distractor 1 but there are 1"):
        same_cluster_proxy([(0, 1, 0)], [0, 1], [[0, 1]])
