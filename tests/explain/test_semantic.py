"""The semantic method (Vandenhende et al. 2022): the fast search equals a plain loop written from Eq. 1-4,
for every head structure, one or several distractors, with and without the prefilter; its rules hold."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from explain.methods import method_class
from explain.methods.base import Edit, SplitClassifier
from explain.methods.semantic import SemanticCounterfactual
from tests.explain.cell_models import (  # noqa: F401 (single_thread: an autouse fixture)
    HEADS,
    a_target,
    images,
    single_thread,
    tiny_aux,
    tiny_model,
)


def reference_semantic(
    model: SplitClassifier,
    aux: torch.nn.Module,
    query: torch.Tensor,
    target: int,
    distractors: torch.Tensor,
    *,
    lambda_: float,
    tau: float,
    topk: float | None,
) -> tuple[list[Edit], list[float], bool]:
    """One candidate at a time: cosines and Eq. 3 in Python floats, g on each edited feature map."""
    with torch.no_grad():
        current, fd = model.f(query)[0].clone(), model.f(distractors)
        uq, ud = aux(query)[0], aux(distractors)
    d, h, w = current.shape
    hw, n = h * w, distractors.shape[0]
    m = n * hw
    pairs = [(i, nj) for i in range(hw) for nj in range(m)]  # index k = i * m + nj

    def aux_cell(image: torch.Tensor, cell: int) -> np.ndarray:
        return image[:, cell // w, cell % w].double().numpy()

    cosine = {}
    for i, nj in pairs:
        a, b = aux_cell(uq, i), aux_cell(ud[nj // hw], nj % hw)
        cosine[i, nj] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    log_ls = {}
    for i in range(hw):
        normaliser = math.log(sum(math.exp(cosine[i, nj] / tau) for nj in range(m)))
        for nj in range(m):
            log_ls[i, nj] = cosine[i, nj] / tau - normaliser
    if topk is None:
        allowed = set(pairs)
    else:
        ranked = sorted(range(len(pairs)), key=lambda k: -cosine[pairs[k]])  # stable: lower k first on ties
        allowed = {pairs[k] for k in ranked[: max(1, int(topk * len(pairs)))]}

    edits, scores, used_query, used_distractor = [], [], set(), set()
    with torch.no_grad():
        flipped = int(model.g(current[None]).argmax()) == target
        while not flipped and len(edits) < hw:
            best = None
            for i, nj in pairs:
                if (i, nj) not in allowed or i in used_query or nj in used_distractor:
                    continue
                candidate = current.clone()
                candidate[:, i // w, i % w] = fd[nj // hw, :, (nj % hw) // w, (nj % hw) % w]
                logits = model.g(candidate[None])[0]
                score = float(torch.log_softmax(logits, dim=-1)[target])
                if lambda_ > 0:
                    score += lambda_ * log_ls[i, nj]
                if best is None or score > best[0]:
                    best = (score, i, nj, int(logits.argmax()) == target)
            if best is None:
                break
            score, i, nj, flipped = best
            current[:, i // w, i % w] = fd[nj // hw, :, (nj % hw) // w, (nj % hw) % w]
            used_query.add(i)
            used_distractor.add(nj)
            edits.append(Edit(i, nj // hw, nj % hw))
            scores.append(score)
    return edits, scores, flipped


FRESH = [int.from_bytes(os.urandom(4), "little") for _ in range(2)]  # new inputs on every run
SETTINGS = [  # (distractors, topk, lambda_)
    (1, 0.1, 0.4),
    (3, 0.1, 0.4),
    (1, None, 0.4),
    (2, 0.3, 0.0),
]


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("seed", [*range(4), *FRESH])
def test_fast_search_chooses_the_reference_edits(kind, seed):
    n, topk, lambda_ = SETTINGS[seed % len(SETTINGS)]
    grid = (3, 3) if kind == "conv" else (4, 4)  # the reference loop with a conv head is slow
    model, aux = tiny_model(seed, kind, grid), tiny_aux(seed)
    x = images(seed, 1 + n, grid)
    target = a_target(model, x[:1], x[1:2])
    method = SemanticCounterfactual(
        lambda_=lambda_, topk=topk, num_distractors=None, chunk_size=[7, 4096][seed % 2]
    )
    result = method.explain(model, x[:1], target, x[1:], aux=aux)
    edits, scores, flipped = reference_semantic(
        model, aux, x[:1], target, x[1:], lambda_=lambda_, tau=0.1, topk=topk
    )
    assert result.edits == edits, f"seed {seed}"
    assert result.scores == pytest.approx(scores, rel=1e-5, abs=1e-5)
    assert result.flipped == flipped


def test_the_reference_comparison_is_not_degenerate():
    """Across the compared cases some take several edits and some use a distractor other than the first."""
    lengths, distractors_used = [], set()
    for seed in range(8):
        n, topk, lambda_ = SETTINGS[seed % len(SETTINGS)]
        model, aux = tiny_model(seed, "mlp"), tiny_aux(seed)
        x = images(seed, 1 + n)
        target = a_target(model, x[:1], x[1:2])
        result = SemanticCounterfactual(lambda_=lambda_, topk=topk, num_distractors=None).explain(
            model, x[:1], target, x[1:], aux=aux
        )
        lengths.append(len(result.edits))
        distractors_used |= {e.distractor for e in result.edits}
    assert max(lengths) >= 2 and distractors_used >= {0, 1}


def test_no_cell_is_edited_twice_and_the_prefilter_runs_dry_without_raising():
    model, aux = tiny_model(3, "pool-linear"), tiny_aux(3)
    with torch.no_grad():  # an unreachable target: the search runs until no candidate is left
        model.g[-1].weight[2] = 0.0
        model.g[-1].bias[2] = -100.0
    x = images(3, 2)
    result = SemanticCounterfactual(topk=0.05).explain(model, x[:1], 2, x[1:], aux=aux)
    assert result.flipped is False and len(result.edits) >= 1
    assert len({e.query_cell for e in result.edits}) == len(result.edits)
    assert len({e.distractor_cell for e in result.edits}) == len(result.edits)
    assert len(result.edits) < 16  # int(0.05 * 256) = 12 pairs at most, fewer once cells are used


def test_semantic_term_prefers_matching_cells():
    """With a huge lambda the first edit takes, for its query cell, the distractor cell most similar in u."""
    model, aux = tiny_model(5, "mlp"), tiny_aux(5)
    x = images(5, 2)
    target = a_target(model, x[:1], x[1:])
    result = SemanticCounterfactual(lambda_=1000.0, topk=None).explain(model, x[:1], target, x[1:], aux=aux)
    with torch.no_grad():
        uq, ud = aux(x[:1])[0].reshape(5, 16), aux(x[1:])[0].reshape(5, 16)
    cosine = torch.nn.functional.normalize(uq.t(), dim=1) @ torch.nn.functional.normalize(ud.t(), dim=1).t()
    first = result.edits[0]
    assert first.distractor_cell == int(cosine[first.query_cell].argmax())


def test_masks_config_batch_and_registry():
    model, aux = tiny_model(6, "mlp"), tiny_aux(6)
    x = images(6, 5)
    queries, distractors = x[:2], [x[2:4], x[4:5]]
    targets = [a_target(model, queries[q : q + 1], distractors[q][:1]) for q in range(2)]
    method = method_class("semantic")(num_distractors=None, max_edits=3)
    batch = method.explain_batch(model, queries, targets, distractors, aux=aux)
    for q in range(2):
        single = method.explain(model, queries[q : q + 1], targets[q], distractors[q], aux=aux)
        assert batch[q].edits == single.edits and batch[q].flipped == single.flipped
        assert len(single.distractor_masks) == distractors[q].shape[0]
        assert single.query_mask.shape == (16, 16) and single.grid == (4, 4)
        for n, mask in enumerate(single.distractor_masks):
            cells = {e.distractor_cell for e in single.edits if e.distractor == n}
            assert mask.sum() == 16 * len(cells)  # 4 x 4 pixels per cell
    config = batch[0].config
    assert config == {
        "method": "semantic",
        "lambda_": 0.4,
        "tau": 0.1,
        "topk": 0.1,
        "num_distractors": None,
        "max_edits": 3,
        "chunk_size": 4096,
        "precision": "float32",
    }
    again = SemanticCounterfactual(**{k: v for k, v in config.items() if k != "method"})
    assert again.explain(model, queries[:1], targets[0], distractors[0], aux=aux).edits == batch[0].edits


def test_one_distractor_by_default():
    model, aux = tiny_model(7, "mlp"), tiny_aux(7)
    x = images(7, 4)
    target = a_target(model, x[:1], x[1:2])
    several = SemanticCounterfactual().explain(model, x[:1], target, x[1:], aux=aux)
    one = SemanticCounterfactual().explain(model, x[:1], target, x[1:2], aux=aux)
    assert several.edits == one.edits and len(several.distractor_masks) == 1


def test_bad_arguments_are_refused():
    model, aux = tiny_model(0, "mlp"), tiny_aux(0)
    x = images(0, 3)
    with pytest.raises(ValueError, match="auxiliary model"):
        SemanticCounterfactual().explain(model, x[:1], 1, x[1:])
    with pytest.raises(ValueError, match=r"N >= 3"):
        SemanticCounterfactual(num_distractors=3).explain(model, x[:1], 1, x[1:], aux=aux)
    with pytest.raises(ValueError, match="grid"):
        SemanticCounterfactual().explain(model, x[:1], 1, x[1:], aux=torch.nn.AvgPool2d(2))
    with pytest.raises(ValueError, match="topk"):
        SemanticCounterfactual(topk=10)
    with pytest.raises(ValueError, match="tau"):
        SemanticCounterfactual(tau=0)
    with pytest.raises(ValueError, match="lambda_"):
        SemanticCounterfactual(lambda_=-1)


def test_region_masks_show_the_first_edit_or_all_edits():
    model, aux = tiny_model(8, "mlp"), tiny_aux(8)
    with torch.no_grad():  # unreachable: several edits are made
        model.g[1][-1].weight[0] = 0.0
        model.g[1][-1].bias[0] = -100.0
    x = images(8, 3)
    result = SemanticCounterfactual(topk=None, num_distractors=None, max_edits=4).explain(
        model, x[:1], 0, x[1:], aux=aux
    )
    assert len(result.edits) == 4
    first = result.edits[0]
    query_mask, distractor, distractor_mask = result.region_masks()
    assert distractor == first.distractor
    assert (
        query_mask.sum() == 16
        and query_mask[divmod(first.query_cell, 4)[0] * 4, first.query_cell % 4 * 4] == 1
    )
    assert distractor_mask.sum() == 16
    r, c = divmod(first.distractor_cell, 4)
    assert distractor_mask[r * 4 : r * 4 + 4, c * 4 : c * 4 + 4].all()
    query_all, distractor_all, taken_all = result.region_masks(all_edits=True)
    np.testing.assert_array_equal(query_all, result.query_mask)
    assert distractor_all == first.distractor
    np.testing.assert_array_equal(taken_all, result.distractor_masks[first.distractor])


class ZeroAux(torch.nn.Module):
    """u with all-zero cells: every cosine is 0, so the prefilter and Eq. 3 tie on every pair."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 5, *x.shape[-2:])


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("seed", [80, 81, *FRESH[:1]])
def test_exact_ties_in_aux_and_cells_break_by_the_shared_rule(kind, seed):
    """All-zero auxiliary features and duplicated distractor cells: the prefilter keeps the lowest pairs and
    the search the lowest (i, J) among equal scores, exactly as the reference loop (the CVE tie rule)."""
    grid = (3, 3)
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(4, 8, generator=generator) * 3
    cells = vectors[torch.randint(0, 4, (3 * 9,), generator=generator)]  # query + 2 distractors, repeated
    x = cells.reshape(3, 9, 8).permute(0, 2, 1).reshape(3, 8, *grid)
    model = SplitClassifier(f=torch.nn.Identity(), g=tiny_model(seed, kind, grid).g)
    target = a_target(model, x[:1], x[1:2])
    for topk in (None, 0.5):
        result = SemanticCounterfactual(topk=topk, num_distractors=None).explain(
            model, x[:1], target, x[1:], aux=ZeroAux()
        )
        edits, scores, flipped = reference_semantic(
            model, ZeroAux(), x[:1], target, x[1:], lambda_=0.4, tau=0.1, topk=topk
        )
        assert result.edits == edits, (seed, topk)
        assert result.scores == pytest.approx(scores, rel=1e-5, abs=1e-5)
        assert result.flipped == flipped
