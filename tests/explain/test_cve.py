"""CVE (Goyal et al. 2019): the batched search equals a plain one-candidate-at-a-time loop written from
Eq. 1-2 (no cell reused, the documented tie rule), and its output holds together (flips really classify as the
target, masks cover the edited cells, config regenerates it)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from explain.methods.base import Edit, SplitClassifier
from explain.methods.cell_search import HeadScorer, LinearFirstScorer, head_scorer
from explain.methods.cve import CVE
from tests.explain.cell_models import (  # noqa: F401 (single_thread: an autouse fixture)
    HEADS,
    NUM_CLASSES,
    SCORER_KIND,
    a_target,
    images,
    predicted,
    single_thread,
    tiny_model,
)

FRESH = [int.from_bytes(os.urandom(4), "little") for _ in range(2)]  # new inputs on every run
FRESH_TIES = [int.from_bytes(os.urandom(4), "little")]


def reference_cve(
    model: SplitClassifier, query: torch.Tensor, target: int, distractor: torch.Tensor, max_edits: int | None
) -> tuple[list[Edit], list[float], bool]:
    """The obvious greedy loop: every unused (i, j) scored by its own pass of g, in order i then j, strict ">"
    (the lowest pair wins exact ties); a query cell or distractor cell once used is never a candidate again
    (Eq. 1's permutation P and gating a)."""
    with torch.no_grad():
        current, fd = model.f(query)[0].clone(), model.f(distractor)[0]
        d, h, w = current.shape
        hw = h * w
        cap = hw if max_edits is None else max_edits
        edits, scores, used_i, used_j = [], [], set(), set()
        flipped = int(model.g(current[None]).argmax()) == target
        while not flipped and len(edits) < cap:
            best = None
            for i in range(hw):
                for j in range(hw):
                    if i in used_i or j in used_j:
                        continue
                    candidate = current.clone()
                    candidate[:, i // w, i % w] = fd[:, j // w, j % w]
                    logits = model.g(candidate[None])[0]
                    score = float(torch.log_softmax(logits, dim=-1)[target])
                    if best is None or score > best[0]:
                        best = (score, i, j, int(logits.argmax()) == target)
            score, i, j, flipped = best
            current[:, i // w, i % w] = fd[:, j // w, j % w]
            used_i.add(i)
            used_j.add(j)
            edits.append(Edit(i, 0, j))
            scores.append(score)
    return edits, scores, flipped


def edited_features(model: SplitClassifier, query: torch.Tensor, distractor: torch.Tensor, edits: list[Edit]):
    """f(I*) rebuilt from the edits alone (Eq. 1, one cell at a time)."""
    with torch.no_grad():
        current, fd = model.f(query).clone(), model.f(distractor)
    w = current.shape[-1]
    for e in edits:
        current[0, :, e.query_cell // w, e.query_cell % w] = fd[
            0, :, e.distractor_cell // w, e.distractor_cell % w
        ]
    return current


def cell_grid_mask(cells: set[int], grid: tuple[int, int], cell_px: int) -> np.ndarray:
    indicator = np.zeros(grid, dtype=np.float32)
    for cell in cells:
        indicator[divmod(cell, grid[1])] = 1.0
    return np.kron(indicator, np.ones((cell_px, cell_px), dtype=np.float32))


CASES = [(seed, (4, 4)) for seed in range(5)] + [(5, (4, 3)), (6, (3, 5))]


@pytest.mark.parametrize(("seed", "grid"), CASES)
def test_batched_search_equals_the_one_candidate_at_a_time_reference(seed, grid):
    model = tiny_model(seed, grid=grid)
    x = images(seed, 2, grid)
    query, distractor = x[:1], x[1:]
    target = a_target(model, query, distractor)
    expected_edits, expected_scores, expected_flipped = reference_cve(model, query, target, distractor, None)
    hw = grid[0] * grid[1]
    for chunk_size in (1, 7, hw * hw + 5):
        result = CVE(chunk_size=chunk_size).explain(model, query, target, distractor)
        assert result.edits == expected_edits, chunk_size
        np.testing.assert_allclose(result.scores, expected_scores, rtol=1e-5, atol=1e-6)
        assert result.flipped == expected_flipped
        assert len(result.edits) <= hw


def test_the_reference_comparison_covers_flips_that_take_several_edits():
    """Guards the comparison above against degenerate cases (every run flipping at once, or never)."""
    lengths = []
    for seed, grid in CASES:
        model = tiny_model(seed, grid=grid)
        x = images(seed, 2, grid)
        result = CVE().explain(model, x[:1], a_target(model, x[:1], x[1:]), x[1:])
        assert result.flipped
        lengths.append(len(result.edits))
    assert max(lengths) >= 2


def test_a_flip_really_classifies_as_the_target():
    for seed in range(4):
        model = tiny_model(seed)
        x = images(seed, 2)
        target = a_target(model, x[:1], x[1:])
        result = CVE().explain(model, x[:1], target, x[1:])
        assert result.flipped and result.edits
        with torch.no_grad():
            logits = model.g(edited_features(model, x[:1], x[1:], result.edits))[0]
        assert int(logits.argmax()) == target
        assert result.scores[-1] == pytest.approx(float(torch.log_softmax(logits, dim=-1)[target]), abs=1e-5)
        # every edit but the last leaves the prediction elsewhere: the search stops at the first flip
        with torch.no_grad():
            before = model.g(edited_features(model, x[:1], x[1:], result.edits[:-1]))[0]
        assert int(before.argmax()) != target


def unreachable_model(seed: int, unreachable: int) -> SplitClassifier:
    """g gives class ``unreachable`` a constant, very low logit whatever the features."""
    model = tiny_model(seed)
    linear = model.g[1]
    with torch.no_grad():
        linear.weight[unreachable] = 0.0
        linear.bias[unreachable] = -100.0
    return model


@pytest.mark.parametrize("max_edits", [1, 3, None])
def test_an_unreachable_target_stops_at_the_cap_without_raising(max_edits):
    model = unreachable_model(0, unreachable=2)
    x = images(0, 2)
    result = CVE(max_edits=max_edits).explain(model, x[:1], 2, x[1:])
    assert result.flipped is False
    assert len(result.edits) == len(result.scores) == (16 if max_edits is None else max_edits)
    assert all(score < -50 for score in result.scores)


@pytest.mark.parametrize("seed", [1, 2])
def test_run_to_the_cap_no_cell_is_used_twice_and_the_choices_are_the_reference_loops(seed):
    """Run to the cap (an unreachable target), every query cell and every distractor cell is used once."""
    model = unreachable_model(seed, unreachable=2)
    x = images(seed, 2)
    expected_edits, expected_scores, _ = reference_cve(model, x[:1], 2, x[1:], None)
    for chunk_size in (1, 7, 1000):
        result = CVE(chunk_size=chunk_size).explain(model, x[:1], 2, x[1:])
        assert len(result.edits) == 16
        assert sorted(e.query_cell for e in result.edits) == list(range(16))
        assert sorted(e.distractor_cell for e in result.edits) == list(range(16))
        assert result.edits == expected_edits
        np.testing.assert_allclose(result.scores, expected_scores, rtol=1e-5, atol=1e-6)


def feature_model(seed: int, kind: str, grid: tuple[int, int]) -> SplitClassifier:
    """f is the identity: the "images" are feature maps, so a test can place exact ties among the cells."""
    model = tiny_model(seed, kind, grid)
    return SplitClassifier(f=torch.nn.Identity(), g=model.g)


def tied_features(seed: int, grid: tuple[int, int]) -> torch.Tensor:
    """A query and a distractor (2, 8, h, w) whose cells repeat: two distinct distractor cells, the query's
    cells drawn from three vectors, so many candidate pairs score exactly alike."""
    generator = torch.Generator().manual_seed(seed)
    h, w = grid
    vectors = torch.randn(5, 8, generator=generator) * 3
    query_pick = torch.randint(0, 3, (h * w,), generator=generator)
    distractor_pick = 3 + torch.randint(0, 2, (h * w,), generator=generator)
    query = vectors[query_pick].t().reshape(8, h, w)
    distractor = vectors[distractor_pick].t().reshape(8, h, w)
    return torch.stack([query, distractor])


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("seed", [*range(70, 74), *FRESH_TIES])
def test_exact_ties_break_by_the_documented_rule_on_every_head(kind, seed):
    """Duplicated distractor (and query) cells make exactly equal scores: both pick the lowest (i, j)."""
    grid = (3, 3)
    model = feature_model(seed, kind, grid)
    x = tied_features(seed, grid)
    target = a_target(model, x[:1], x[1:])
    expected_edits, expected_scores, expected_flipped = reference_cve(model, x[:1], target, x[1:], None)
    result = CVE(chunk_size=[4, 4096][seed % 2]).explain(model, x[:1], target, x[1:])
    assert result.edits == expected_edits, f"seed {seed}"
    assert result.scores == pytest.approx(expected_scores, rel=1e-6, abs=1e-6)
    assert result.flipped == expected_flipped


def test_ties_really_occur_in_the_tie_cases():
    """Guards the test above: the first step's best score is shared by several pairs on some inputs."""
    shared = 0
    for seed in range(70, 74):
        model = feature_model(seed, "flatten-linear", (3, 3))
        x = tied_features(seed, (3, 3))
        target = a_target(model, x[:1], x[1:])
        with torch.no_grad():
            scores = []
            for i in range(9):
                for j in range(9):
                    candidate = x[0].clone().reshape(8, 9)
                    candidate[:, i] = x[1].reshape(8, 9)[:, j]
                    logits = model.g(candidate.reshape(1, 8, 3, 3))[0]
                    scores.append(float(torch.log_softmax(logits, -1)[target]))
        shared += scores.count(max(scores)) > 1
    assert shared >= 2


def test_a_query_already_of_the_target_class_needs_no_edit():
    model = tiny_model(0)
    x = images(0, 2)
    result = CVE().explain(model, x[:1], predicted(model, x[:1]), x[1:])
    assert result.flipped is True and result.edits == [] and result.scores == []
    assert not result.query_mask.any() and not result.distractor_masks[0].any()


def test_masks_cover_exactly_the_edited_cells_at_image_resolution():
    model = unreachable_model(1, unreachable=3)  # runs the full cap, so several cells are edited
    x = images(1, 2)
    result = CVE(max_edits=5).explain(model, x[:1], 3, x[1:])
    assert result.query_mask.shape == (16, 16) and result.query_mask.dtype == np.float32
    assert len(result.distractor_masks) == 1 and result.distractor_masks[0].shape == (16, 16)
    query_cells = {e.query_cell for e in result.edits}
    distractor_cells = {e.distractor_cell for e in result.edits}
    np.testing.assert_array_equal(result.query_mask, cell_grid_mask(query_cells, (4, 4), 4))
    np.testing.assert_array_equal(result.distractor_masks[0], cell_grid_mask(distractor_cells, (4, 4), 4))


def test_masks_on_a_non_square_grid():
    grid = (4, 3)
    model = tiny_model(5, grid=grid)
    x = images(5, 2, grid)
    result = CVE().explain(model, x[:1], a_target(model, x[:1], x[1:]), x[1:])
    assert result.query_mask.shape == (16, 12)
    np.testing.assert_array_equal(
        result.query_mask, cell_grid_mask({e.query_cell for e in result.edits}, grid, 4)
    )


def test_only_the_first_distractor_is_used():
    model = tiny_model(2)
    x = images(2, 4)
    target = a_target(model, x[:1], x[1:2])
    one = CVE().explain(model, x[:1], target, x[1:2])
    several = CVE().explain(model, x[:1], target, x[1:])
    assert several.edits == one.edits and several.scores == one.scores
    assert all(e.distractor == 0 for e in several.edits)


def test_config_round_trip_reproduces_the_result():
    model = tiny_model(3)
    x = images(3, 2)
    target = a_target(model, x[:1], x[1:])
    first = CVE(max_edits=6, chunk_size=33).explain(model, x[:1], target, x[1:])
    assert first.config == {"method": "cve", "max_edits": 6, "chunk_size": 33, "precision": "float32"}
    assert first.method == "cve" and first.target == target
    assert set(first.timings) == {"features_s", "search_s", "candidates", "evaluated", "rescored"}
    # no reuse: step s scores the (16 - s)^2 pairs of unused query and distractor cells
    assert first.timings["candidates"] == sum((16 - s) ** 2 for s in range(len(first.edits)))
    assert first.timings["rescored"] <= first.timings["evaluated"] <= first.timings["candidates"]
    again = CVE(**{k: v for k, v in first.config.items() if k != "method"}).explain(
        model, x[:1], target, x[1:]
    )
    assert again.to_json() | {"timings": None} == first.to_json() | {"timings": None}
    np.testing.assert_array_equal(again.query_mask, first.query_mask)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        CVE(chunk_size=0)
    with pytest.raises(ValueError):
        CVE(max_edits=-1)
    model = tiny_model(0)
    x = images(0, 2)
    with pytest.raises(ValueError):
        CVE().explain(model, x, 1, x)  # a batch of queries
    with pytest.raises(ValueError, match="target 4 is not a class"):
        CVE().explain(model, x[:1], NUM_CLASSES, x[1:])  # not a class of g
    with pytest.raises(ValueError, match="precision"):
        CVE(precision="float8")


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("seed", [*range(10, 18), *FRESH])
def test_every_head_structure_chooses_the_reference_edits(kind, seed):
    """The structure-exploiting scorers (rank-d update, pooled sums) and the generic one pick the plain
    loop's edits with its scores, on many seeds and a fresh pair each run."""
    grids = [(3, 3), (2, 3), (3, 2)] if kind == "conv" else [(4, 4), (3, 4), (4, 3)]  # the reference is slow
    grid = grids[seed % 3]
    model = tiny_model(seed, kind, grid)
    x = images(seed, 2, grid)
    target = a_target(model, x[:1], x[1:])
    assert head_scorer(model.g, 8, grid).kind == SCORER_KIND[kind]
    expected_edits, expected_scores, expected_flipped = reference_cve(model, x[:1], target, x[1:], None)
    result = CVE(chunk_size=[5, 4096][seed % 2]).explain(model, x[:1], target, x[1:])
    assert result.edits == expected_edits, f"seed {seed}"
    assert result.scores == pytest.approx(expected_scores, rel=1e-6, abs=1e-6)
    assert result.flipped == expected_flipped


def check_reduced_precision(kind: str, precision: str, device: str) -> None:
    for seed in range(30, 36):
        model = tiny_model(seed, kind)
        x = images(seed, 2)
        target = a_target(model, x[:1], x[1:])
        exact = CVE().explain(model, x[:1], target, x[1:])
        model.f.to(device), model.g.to(device)
        reduced = CVE(precision=precision).explain(model, x[:1].to(device), target, x[1:].to(device))
        assert reduced.edits == exact.edits, seed
        assert reduced.scores == pytest.approx(exact.scores, rel=1e-5, abs=1e-5), seed


@pytest.mark.parametrize("kind", ["flatten-linear", "mlp", "pool-linear", "bottleneck"])  # CPU conv: slow
def test_reduced_precision_scores_still_choose_the_float32_edits(kind):
    check_reduced_precision(kind, "bfloat16", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("kind", HEADS)
def test_on_the_gpu_every_precision_chooses_the_cpu_float32_edits(kind, precision):
    check_reduced_precision(kind, precision, "cuda")


def test_batch_equals_item_by_item():
    model = tiny_model(40, "mlp")
    x = images(40, 6)
    queries, distractors = x[:3], [x[3:4], x[4:6], x[5:6]]
    targets = [a_target(model, queries[q : q + 1], distractors[q][:1]) for q in range(3)]
    batch = CVE().explain_batch(model, queries, targets, distractors)
    for q in range(3):
        single = CVE().explain(model, queries[q : q + 1], targets[q], distractors[q])
        assert batch[q].edits == single.edits and batch[q].flipped == single.flipped
        np.testing.assert_allclose(batch[q].scores, single.scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="3 queries but 2 targets"):
        CVE().explain_batch(model, queries, targets[:2], distractors)


def test_uncached_projections_and_changed_weights_still_choose_the_reference_edits(monkeypatch):
    """Pairs beyond the projection cache are projected per chunk; weights edited in place rebuild blocks."""
    monkeypatch.setattr(LinearFirstScorer, "cache_bytes", 0)
    for seed in (50, 51, 52):
        model = tiny_model(seed, "mlp")
        x = images(seed, 2)
        target = a_target(model, x[:1], x[1:])
        CVE().explain(model, x[:1], target, x[1:])  # builds and keeps the blocks
        with torch.no_grad():
            model.g[1][0].weight.mul_(-1.5)
        target = a_target(model, x[:1], x[1:])
        expected_edits, expected_scores, _ = reference_cve(model, x[:1], target, x[1:], None)
        result = CVE(chunk_size=37).explain(model, x[:1], target, x[1:])
        assert result.edits == expected_edits, seed
        assert result.scores == pytest.approx(expected_scores, rel=1e-6, abs=1e-6)


def test_memory_bound_on_chunks_keeps_the_reference_edits(monkeypatch):
    """A conv head's chunk is capped so that its edited feature maps stay under HeadScorer.chunk_bytes."""
    assert head_scorer(tiny_model(0, "conv", (3, 3)).g, 2048, (7, 7)).max_chunk(2048, 49) == 2**28 // (
        2048 * 49 * 4
    )
    monkeypatch.setattr(HeadScorer, "chunk_bytes", 3 * 8 * 9 * 4)  # three candidates per chunk
    model = tiny_model(60, "conv", (3, 3))
    x = images(60, 2, (3, 3))
    target = a_target(model, x[:1], x[1:])
    expected_edits, _, _ = reference_cve(model, x[:1], target, x[1:], None)
    assert CVE().explain(model, x[:1], target, x[1:]).edits == expected_edits


def test_pooling_to_the_grid_size_keeps_the_fast_scorer():
    """The split VGG classifier's g starts with AdaptiveAvgPool2d((7, 7)), a copy at 224 px: the rank-d
    scorer still applies (it fell back to g per candidate) and still chooses the reference's edits."""
    model = tiny_model(70, "mlp")
    model = SplitClassifier(f=model.f, g=torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d((4, 4)), *model.g))
    assert head_scorer(model.g, 8, (4, 4)).kind == "flatten-linear"
    assert head_scorer(model.g, 8, (3, 3)).kind == "generic"  # pooling that changes the grid is not skipped
    x = images(70, 2)
    target = a_target(model, x[:1], x[1:])
    expected_edits, expected_scores, _ = reference_cve(model, x[:1], target, x[1:], None)
    result = CVE().explain(model, x[:1], target, x[1:])
    assert result.edits == expected_edits
    assert result.scores == pytest.approx(expected_scores, rel=1e-6, abs=1e-6)
