"""The branch and bound of the cell search: its upper bounds hold on random MLP tails (and are tight enough to
prune), with the switch terms' intervals from int8 products and from float32 ones (the CPU picks one), its
int8 products are exact, and the searches that use it choose the plain loops' edits."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from explain.methods import cell_bounds
from explain.methods.cell_bounds import TailBound, _Gathered, mlp_tail
from explain.methods.cell_search import _Step, head_scorer
from explain.methods.cve import CVE
from explain.methods.semantic import SemanticCounterfactual
from explain.nets.split import SplitClassifier
from tests.explain.cell_models import (  # noqa: F401 (single_thread: an autouse fixture)
    a_target,
    features_net,
    images,
    single_thread,
    tiny_aux,
)
from tests.explain.test_cve import reference_cve, tied_features
from tests.explain.test_semantic import reference_semantic

FRESH = [int.from_bytes(os.urandom(4), "little") for _ in range(2)]  # new inputs on every run


def tail(seed: int, widths: tuple[int, int, int]) -> nn.Sequential:
    """VGG's head after its first layer, in miniature: ReLU, Dropout, Linear, ReLU, Dropout, Linear."""
    torch.manual_seed(seed)
    first, mid, classes = widths
    return nn.Sequential(
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(first, mid),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(mid, classes),
    ).eval()


@pytest.fixture(params=["int8", "float32"])
def intervals(request, monkeypatch):
    """Both ways of bounding the switch terms, whichever this CPU would pick."""
    monkeypatch.setattr(cell_bounds, "int8_products_fast", lambda: request.param == "int8")
    return request.param


@pytest.mark.parametrize("seed", [*range(6), *FRESH])
def test_the_bound_is_above_the_exact_score_and_close_to_it_for_small_changes(seed, intervals):
    widths = [(64, 48, 5), (256, 256, 20), (96, 32, 3)][seed % 3]
    rest = tail(seed, widths)
    bound = TailBound(*mlp_tail(rest))
    assert bound.int8 == (intervals == "int8")
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(widths[0], generator=generator)
    target = seed % widths[2]
    bound.begin(hidden, target)
    exact_rest = copy.deepcopy(rest).double()
    for scale in (0.01, 0.1, 1.0, 5.0):  # small changes (one cell) to ones that switch most units
        h1 = hidden + scale * torch.randn(300, widths[0], generator=generator)
        with torch.no_grad():
            exact = torch.log_softmax(exact_rest(h1.double()), dim=-1)[:, target]
        upper = bound.upper(h1.clone()).double()
        assert (upper >= exact - 1e-5).all(), (scale, float((exact - upper).max()))
        if scale == 0.01:
            assert float((upper - exact).max()) < 0.02, "the bound should be tight for small changes"


@pytest.mark.parametrize("seed", [*range(6), *FRESH])
def test_the_refined_bound_is_above_the_exact_score_and_tighter(seed, intervals):
    """``refine`` (int8 intervals with delta quantized twice) holds on random tails, changes from tiny to
    large and candidates equal to the anchor (delta 0), and is tighter than ``upper`` on average; with
    float32 intervals it is ``upper``."""
    widths = [(64, 48, 5), (256, 256, 20), (96, 32, 3)][seed % 3]
    rest = tail(seed, widths)
    bound = TailBound(*mlp_tail(rest))
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(widths[0], generator=generator)
    target = seed % widths[2]
    bound.begin(hidden, target)
    exact_rest = copy.deepcopy(rest).double()
    tighter = []
    for scale in (1e-4, 0.01, 0.1, 1.0):
        h1 = hidden + scale * torch.randn(300, widths[0], generator=generator)
        h1[:5] = hidden  # no change: delta is 0
        with torch.no_grad():
            exact = torch.log_softmax(exact_rest(h1.double()), dim=-1)[:, target]
        upper = bound.upper(h1.clone()).double()
        refined = bound.refine(h1.clone()).double()
        assert (refined >= exact - 1e-5).all(), (scale, float((exact - refined).max()))
        if intervals == "int8":
            plain = plain_refined_bound(rest, hidden, h1, target)
            assert torch.allclose(refined, plain, rtol=1e-5, atol=1e-5), float((refined - plain).abs().max())
        if intervals == "float32":
            assert torch.equal(refined, upper)
        else:
            assert float(refined.mean()) <= float(upper.mean()) + 1e-7, scale
            tighter.append(float(refined.mean()) < float(upper.mean()))
    assert intervals == "float32" or any(tighter)


def test_int8_products_are_exact_with_and_without_the_cpu_kernel(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (37, 300), generator=generator).to(torch.int8)
    b = torch.randint(-127, 128, (50, 300), generator=generator).to(torch.int8).t()
    expected = a.long() @ b.long()
    assert torch.equal(cell_bounds._int8_products(a, b).long(), expected)
    monkeypatch.setattr(cell_bounds, "_INT_MM", None)
    assert torch.equal(cell_bounds._int8_products(a, b).long(), expected)


def test_only_the_vgg_tail_gets_bounds():
    assert mlp_tail(tail(0, (8, 6, 3))) is not None
    gelu = nn.Sequential(nn.GELU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    deeper = nn.Sequential(nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    training = tail(0, (8, 6, 3)).train()
    assert mlp_tail(gelu) is None and mlp_tail(deeper) is None and mlp_tail(training) is None


def wide_model(seed: int, grid: tuple[int, int] = (4, 4), classes: int = 6) -> SplitClassifier:
    """A VGG-shaped head wide enough for the bounds to prune: Flatten, Linear, then the tail."""
    torch.manual_seed(seed)
    f = features_net()
    hw = grid[0] * grid[1]
    g = nn.Sequential(
        nn.Flatten(),
        nn.Sequential(
            nn.Linear(8 * hw, 96),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(96, 64),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(64, classes),
        ),
    )
    return SplitClassifier(f=f.eval(), g=g.eval())


def assert_reference_edits(model, aux, seed: int) -> None:
    """CVE and the semantic search on ``model`` pick the plain reference loops' edits, scores and flips."""
    x = images(seed, 4)
    target = a_target(model, x[:1], x[1:2])
    cve = CVE().explain(model, x[:1], target, x[1:2])
    edits, scores, flipped = reference_cve(model, x[:1], target, x[1:2], None)
    assert (cve.edits, cve.flipped) == (edits, flipped), f"seed {seed}"
    assert cve.scores == pytest.approx(scores, rel=1e-5, abs=1e-5)
    semantic = SemanticCounterfactual(topk=0.3, num_distractors=None).explain(
        model, x[:1], target, x[1:], aux=aux
    )
    edits, scores, flipped = reference_semantic(
        model, aux, x[:1], target, x[1:], lambda_=0.4, tau=0.1, topk=0.3
    )
    assert (semantic.edits, semantic.flipped) == (edits, flipped), f"seed {seed}"
    assert semantic.scores == pytest.approx(scores, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("seed", [*range(8), *FRESH])
def test_branch_and_bound_prunes_yet_chooses_the_reference_edits(seed, intervals):
    model, aux = wide_model(seed), tiny_aux(seed)
    assert head_scorer(model.g, 8, (4, 4)).tail.int8 == (intervals == "int8")
    assert_reference_edits(model, aux, seed)


def test_the_bounds_really_prune_in_the_compared_cases(intervals):
    """Guards the test above: across its seeds most candidates are bounded out, never scored."""
    evaluated = candidates = 0
    for seed in range(8):
        model, aux = wide_model(seed), tiny_aux(seed)
        x = images(seed, 4)
        target = a_target(model, x[:1], x[1:2])
        for result in (
            CVE().explain(model, x[:1], target, x[1:2]),
            SemanticCounterfactual(topk=0.3, num_distractors=None).explain(
                model, x[:1], target, x[1:], aux=aux
            ),
        ):
            evaluated += result.timings["evaluated"]
            candidates += result.timings["candidates"]
    assert evaluated < 0.5 * candidates, (evaluated, candidates)


@pytest.mark.parametrize("seed", [*range(70, 74), *FRESH])
def test_exact_ties_survive_the_pruning_and_break_by_the_documented_rule(seed, intervals):
    """Duplicated cells make exactly equal scores (and equal bounds): all of them are scored and the lowest
    pair wins, as in the plain loop; the wide head still prunes the rest."""
    model = SplitClassifier(f=nn.Identity(), g=wide_model(seed).g)
    x = tied_features(seed, (4, 4))
    target = a_target(model, x[:1], x[1:])
    result = CVE().explain(model, x[:1], target, x[1:])
    edits, scores, flipped = reference_cve(model, x[:1], target, x[1:], None)
    assert (result.edits, result.flipped) == (edits, flipped), f"seed {seed}"
    assert result.scores == pytest.approx(scores, rel=1e-5, abs=1e-5)
    assert result.timings["evaluated"] < result.timings["candidates"]


class _KnownScores:
    """A scorer whose candidates' scores are given (target 0 of two classes) and whose bounds exceed them by
    ``excess``; it counts the rounds of scoring (the tail's passes)."""

    def __init__(self, scores: torch.Tensor, excess: float):
        self.scores, self.excess, self.rounds = scores.double(), excess, []

    def upper_bounds(self, i, j):  # one distractor cell (m = 1): candidate k is (i, 0)
        return (self.scores[i] + self.excess).float()

    def logits(self, i, j):
        self.rounds.append(len(i))
        score = self.scores[i]  # log softmax([0, x])[0] = -log(1 + e^x) = score
        return torch.stack([torch.zeros_like(score), torch.log(torch.expm1(-score))], dim=1).float()


@pytest.mark.parametrize("seed", [*range(4), *FRESH])
def test_the_first_round_adapts_to_the_bounds_excess_and_misses_nothing(seed):
    """Given the excess of earlier steps, one round scores everything that can reach the shortlist; without it
    (the first step) the top 8 go first and a second round adds the rest. Either way every candidate whose
    bound reaches best - 2 margin is scored, and the best is found."""
    generator = torch.Generator().manual_seed(seed)
    scores = -1 - torch.rand(200, generator=generator, dtype=torch.float64) * 0.2
    scores[torch.randperm(200, generator=generator)[:20]] = -1 + 1e-4 * torch.rand(20, dtype=torch.float64)
    candidates = torch.arange(200)
    for slack, rounds in (((0.01, 0.01), 1), (None, 2)):
        scorer = _KnownScores(scores, excess=0.01)
        step = _Step(scorer, candidates, 1, 0, None, 1.0, 4096)
        excess = step.branch_and_bound(1e-3, 1e-5, slack)
        assert len(scorer.rounds) == rounds, scorer.rounds
        assert excess[0] == pytest.approx(0.01, abs=1e-6) and excess[1] is None  # nothing to refine
        best = float(scores.max())
        assert float(step.fast.max()) == pytest.approx(best, abs=1e-6)
        reaching = scores + 0.01 >= best - 2e-3
        assert bool(torch.isfinite(step.fast[reaching]).all())
        assert step.evaluated == sum(scorer.rounds)


class _KnownScoresRefined(_KnownScores):
    """``_KnownScores`` whose bounds can be refined to exceed the scores by ``tight`` only (as the int8
    bounds' second quantization); it records the candidates refined."""

    refines = True

    def __init__(self, scores: torch.Tensor, excess: float, tight: float):
        super().__init__(scores, excess)
        self.tight, self.refined = tight, []

    def refine_bounds(self, i, j):
        self.refined.extend(i.tolist())
        return (self.scores[i] + self.tight).float()


@pytest.mark.parametrize("seed", [*range(4), *FRESH])
def test_refined_bounds_score_fewer_candidates_and_miss_nothing(seed):
    """With bounds that can be refined, only the candidates whose refined bound reaches best - 2 margin are
    scored (after the first round), every one of them is, the best is found, each candidate is refined at
    most once, and only a few are refined; the excesses before and after refinement come back."""
    generator = torch.Generator().manual_seed(seed)
    scores = -1 - torch.rand(200, generator=generator, dtype=torch.float64) * 0.2
    scores[torch.randperm(200, generator=generator)[:20]] = -1 + 0.02 * torch.rand(20, dtype=torch.float64)
    candidates = torch.arange(200)
    best = float(scores.max())
    for slack in ((0.03, 0.003), None):
        plain = _KnownScores(scores, excess=0.03)
        loose = None if slack is None else (slack[0], slack[0])
        _Step(plain, candidates, 1, 0, None, 1.0, 4096).branch_and_bound(1e-3, 1e-5, loose)
        scorer = _KnownScoresRefined(scores, excess=0.03, tight=0.003)
        step = _Step(scorer, candidates, 1, 0, None, 1.0, 4096)
        excess = step.branch_and_bound(1e-3, 1e-5, slack)
        assert excess[0] == pytest.approx(0.03, abs=1e-6)
        assert excess[1] is None or excess[1] == pytest.approx(0.003, abs=1e-6)
        assert float(step.fast.max()) == pytest.approx(best, abs=1e-6)
        reaching = scores + 0.003 >= best - 2e-3
        assert bool(torch.isfinite(step.fast[reaching]).all())
        assert len(set(scorer.refined)) == len(scorer.refined) < 100
        assert step.evaluated < sum(plain.rounds), (step.evaluated, plain.rounds)


def test_the_cpu_check_for_fast_int8_products_is_a_measurement_made_once():
    """It runs once per process, on one thread, and leaves torch's thread count as it found it."""
    cell_bounds.int8_products_fast.cache_clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = cell_bounds.int8_products_fast()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert isinstance(first, bool) and cell_bounds.int8_products_fast() is first
    assert cell_bounds.int8_products_fast.cache_info().hits == 1


def _plain_parts(rest: nn.Sequential, anchor: torch.Tensor, h1: torch.Tensor, target: int):
    """What both plain bounds share, in float64: W2, h2 at the anchor, the weights w, delta, the linear part,
    and W2's per-row int8 copy (Wq, its scales)."""
    (l2, l3) = mlp_tail(rest)
    w2, b2, w3, b3 = (p.detach().double() for p in (l2.weight, l2.bias, l3.weight, l3.bias))
    a1 = anchor.double().relu()
    h2 = w2 @ a1 + b2
    z = w3 @ h2.relu() + b3
    v = -torch.softmax(z, dim=-1)
    v[target] += 1
    w = w3.t() @ v
    delta = h1.double().relu() - a1
    linear = torch.log_softmax(z, dim=-1)[target] + delta @ (w2.t() @ torch.where(h2 > 0, w, 0 * w))
    scale = w2.abs().amax(dim=1) / 127
    q = torch.round(w2 / scale[:, None]).clamp(-127, 127)
    return w2, h2, w, delta, linear, q, scale


def _plain_sum(h2, w, linear, interval, allowance) -> torch.Tensor:
    """The bound from the switch terms' intervals and their allowances: linear + sum of w_k > 0 times
    max(0, sign_k Delta_k - |h2_0,k| + allowance)."""
    switch = torch.where(h2 > 0, -1.0, 1.0) * interval - h2.abs() + allowance
    return linear + switch.relu() @ torch.where(w > 0, w, 0 * w)


def _first_quantization(h1: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """delta's int8 integers and step, quantized as the search does, in float32, so that the same integers
    come out: (integers in float64, step in float32)."""
    delta32 = h1.relu() - anchor.relu()
    step32 = delta32.abs().amax(dim=1, keepdim=True) / 127
    step32 = torch.where(step32 > 0, step32, torch.ones_like(step32))
    return torch.round(delta32 / step32).clamp(-127, 127).double(), step32


def plain_bound(
    rest: nn.Sequential, anchor: torch.Tensor, h1: torch.Tensor, target: int, intervals: str = "float32"
) -> torch.Tensor:
    """The bound (cell_bounds' docstring) the plain way, in float64: every unit with w_k > 0, every input;
    the switch terms' intervals are the exact Delta plus the float32 product's rounding allowance, or the
    int8 product's Delta^ (per-row and per-candidate scales, each candidate's step its largest |delta| / 127)
    plus its error bound."""
    w2, h2, w, delta, linear, q, scale = _plain_parts(rest, anchor, h1, target)
    n = anchor.shape[0]
    if intervals == "float32":
        gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
        allowance = 2 * gamma * w2.norm(dim=1)[None] * delta.norm(dim=1)[:, None]
        interval = delta @ w2.t()
    else:
        quantized, step32 = _first_quantization(h1, anchor)
        step = step32.double()
        interval = (quantized @ q.t()) * step * scale[None]
        residual = (delta - quantized * step).norm(dim=1)[:, None]
        q_norm = (q * scale[:, None]).norm(dim=1)[None]
        allowance = (w2 - q * scale[:, None]).norm(dim=1)[None] * delta.norm(dim=1)[
            :, None
        ] + q_norm * residual
    return _plain_sum(h2, w, linear, interval, allowance)


def plain_refined_bound(
    rest: nn.Sequential, anchor: torch.Tensor, h1: torch.Tensor, target: int
) -> torch.Tensor:
    """``TailBound.refine``'s bound the plain way, in float64: every unit with w_k > 0, every input; delta
    quantized twice (the first time in float32 as the search does, so that the same integers come out)."""
    w2, h2, w, delta, linear, q, scale = _plain_parts(rest, anchor, h1, target)
    first, step = _first_quantization(h1, anchor)
    residual = (h1.relu() - anchor.relu()).double() - first * step.double()
    step2 = (residual.abs().amax(dim=1, keepdim=True) / 127).float()
    step2 = torch.where(step2 > 0, step2, torch.ones_like(step2)).double()
    second = torch.round(residual / step2).clamp(-127, 127)
    interval = (first * step.double() + second * step2) @ (q * scale[:, None]).t()
    left = (residual - second * step2).norm(dim=1)[:, None]
    q_norm = (q * scale[:, None]).norm(dim=1)[None]
    allowance = (w2 - q * scale[:, None]).norm(dim=1)[None] * delta.norm(dim=1)[:, None] + q_norm * left
    return _plain_sum(h2, w, linear, interval, allowance)


@pytest.mark.parametrize("seed", [*range(4), *FRESH])
def test_the_bounds_kept_submatrix_gives_the_plain_bound_from_step_to_step(seed, intervals, monkeypatch):
    """The products reuse W2's (or Wq's) gathered rows and columns from step to step (``_Gathered``): on a
    walk of anchors whose units and inputs come and go, with chunks of candidates that leave inputs out, every
    bound is the plain one (float64, all units and inputs) to float32 rounding, and above the exact score."""
    rest = tail(seed, (96, 64, 4))
    bound = TailBound(*mlp_tail(rest))
    assert bound.int8 == (intervals == "int8")
    exact_rest = copy.deepcopy(rest).double()
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(96, generator=generator)
    target = seed % 4
    # an earlier step that needed every unit: the next ones keep all columns, most with weight 0
    monkeypatch.setattr(_Gathered, "waste", 1.5)
    monkeypatch.setattr(_Gathered, "block", 16)  # several blocks per gather
    bound.begin(hidden, target)
    bound.gathered.select(torch.arange(64))
    kept = excess = appended = 0
    for _ in range(12):
        hidden = hidden + 0.1 * torch.randn(96, generator=generator)  # the applied edit moves the anchor
        columns = bound.gathered.columns
        bound.begin(hidden, target)
        kept += bound.gathered.columns is columns
        excess += bound.gathered.columns is columns and bound.units < len(columns)
        for _ in range(3):  # chunks of candidates; each leaves some inputs at delta 0 (inactive in all)
            changes = 0.2 * torch.randn(50, 96, generator=generator)
            changes[:, torch.rand(96, generator=generator) < 0.3] = 0
            h1 = hidden + changes
            h1[:, (hidden < 0) & (torch.rand(96, generator=generator) < 0.5)] = -1.0
            before = len(bound.gathered.row_list)
            upper = bound.upper(h1.clone()).double()
            appended += 0 < before < len(bound.gathered.row_list)
            plain = plain_bound(rest, hidden, h1, target, intervals)
            assert torch.allclose(upper, plain, rtol=1e-5, atol=1e-5), float((upper - plain).abs().max())
            with torch.no_grad():
                exact = torch.log_softmax(exact_rest(h1.double()), dim=-1)[:, target]
            assert (upper >= exact - 1e-5).all()
    assert kept and excess and appended, (kept, excess, appended)  # the kept submatrix was really used


@pytest.mark.parametrize("seed", [*range(4), *FRESH])
def test_the_kept_columns_hold_every_unit_and_a_margin_of_near_ones(seed):
    """A fresh column set is the units with w > 0 and the next by weight (``_Gathered.select``), within the
    allowed excess; NaN weights (no unit) take no place."""
    generator = torch.Generator().manual_seed(seed)
    gathered = _Gathered(torch.zeros(8, 200), torch.empty(1600), torch.empty(800), [None])
    w = torch.randn(200, generator=generator)
    w[torch.randperm(200, generator=generator)[:30]] = float("nan")
    units = (w > 0).nonzero().squeeze(1)
    columns = gathered.select(units, w)
    assert bool(torch.isin(units, columns).all()) and bool((columns.diff() > 0).all())
    assert len(columns) <= (1 + _Gathered.waste) * len(units)
