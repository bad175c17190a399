"""SCOUT: known answers worked out by hand, and the batched maps (one forward and one backward pass) equal
maps computed one gradient at a time in numpy as the authors' released code does (pre-pool5
activations, class maps clamped to 1e-7 below zero, positive self-awareness gradients, S * (max B - B) * A
unnormalised)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from explain.methods import method_class
from explain.methods.scout import SCOUT
from explain.nets.split import SplitClassifier
from tests.explain.cell_models import (  # noqa: F401 (single_thread: an autouse fixture)
    HEADS,
    a_target,
    images,
    predicted,
    single_thread,
    tiny_model,
)


def reference_map(head: torch.nn.Module, activation: torch.Tensor, objective, positive: bool) -> np.ndarray:
    """sum over channels of gradient x activation of one scalar of the head at one (d, h', w') activation;
    as cf_ss_vgg_cub.py: Heatmap_hp keeps positive gradients, Heatmap_cls's maps get 1e-7 where < 0."""
    x = activation[None].clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(objective(head(x)[0]), x)
    gradient = gradient[0].detach().double().numpy()
    value = x[0].detach().double().numpy()
    if positive:
        gradient[gradient < 0.0] = 0.0
        return (gradient * value).sum(axis=0)
    cam = (gradient * value).sum(axis=0)
    cam[cam < 0] = 1e-7
    return cam


def reference_scout(model: SplitClassifier, query, target, distractor, cells):
    f = model.f
    body, head = f[:-1], torch.nn.Sequential(f[-1], model.g)  # the tiny f ends in a max-pool (pool5)
    with torch.no_grad():
        fq, fd = model.f(query)[0], model.f(distractor)[0]
        c = int(model.g(fq[None]).argmax())
        aq, ad = body(query)[0], body(distractor)[0]

    def score(k):
        return lambda logits: logits[k]

    def confidence(logits):
        return torch.softmax(logits, dim=-1).max()

    def combined(a, own, other):
        a_map = reference_map(head, a, score(own), positive=False)
        b_map = reference_map(head, a, score(other), positive=False)
        s_map = reference_map(head, a, confidence, positive=True)
        return s_map * (np.amax(b_map) - b_map) * a_map

    d, h, w = fq.shape

    def cell_means(fine):
        fh, fw = fine.shape[0] // h, fine.shape[1] // w
        return [
            fine[r * fh : (r + 1) * fh, c_ * fw : (c_ + 1) * fw].mean() for r in range(h) for c_ in range(w)
        ]

    query_map = cell_means(combined(aq, c, target))
    distractor_map = cell_means(combined(ad, target, c))
    top_q = sorted(range(len(query_map)), key=lambda i: -query_map[i])[:cells]
    top_d = sorted(range(len(distractor_map)), key=lambda i: -distractor_map[i])[:cells]
    current, scores = fq.clone(), []
    with torch.no_grad():
        for i, j in zip(top_q, top_d, strict=True):
            current[:, i // w, i % w] = fd[:, j // w, j % w]
            logits = model.g(current[None])[0]
            scores.append(float(torch.log_softmax(logits, dim=-1)[target]))
    return [(i, 0, j) for i, j in zip(top_q, top_d, strict=True)], scores, int(logits.argmax()) == target


FRESH = [int.from_bytes(os.urandom(4), "little")]


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("seed", [*range(4), *FRESH])
def test_batched_maps_choose_the_reference_regions(kind, seed):
    model = tiny_model(seed, kind)
    x = images(seed, 6)
    queries, distractors = x[:3], [x[3:4], x[4:5], x[5:6]]
    targets = [a_target(model, queries[q : q + 1], distractors[q]) for q in range(3)]
    cells = 1 + seed % 3
    batch = SCOUT(cells=cells).explain_batch(model, queries, targets, distractors)
    for q in range(3):
        edits, scores, flipped = reference_scout(model, queries[q : q + 1], targets[q], distractors[q], cells)
        assert [(e.query_cell, e.distractor, e.distractor_cell) for e in batch[q].edits] == edits
        assert batch[q].scores == pytest.approx(scores, rel=1e-5, abs=1e-5)
        assert batch[q].flipped == flipped
        assert batch[q].query_mask.sum() == 16 * cells  # cells of 4 x 4 pixels


def test_one_cell_by_default_and_config():
    model = tiny_model(1, "pool-linear")
    x = images(1, 2)
    result = method_class("scout")().explain(model, x[:1], a_target(model, x[:1], x[1:]), x[1:])
    assert len(result.edits) == 1 and result.config == {"method": "scout", "cells": 1}
    assert result.query_mask.sum() == 16 and result.distractor_masks[0].sum() == 16
    assert set(result.timings) == {"features_s", "maps_s", "search_s", "candidates", "evaluated", "rescored"}


def test_maps_do_not_depend_on_the_rest_of_the_batch():
    model = tiny_model(2, "mlp")
    x = images(2, 4)
    target = a_target(model, x[:1], x[2:3])
    alone = SCOUT(cells=3).explain(model, x[:1], target, x[2:3])
    together = SCOUT(cells=3).explain_batch(model, x[:2], [target, predicted(model, x[3:])], [x[2:3], x[3:]])
    assert alone.edits == together[0].edits


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="cells"):
        SCOUT(cells=0)
    model = tiny_model(0)
    x = images(0, 2)
    with pytest.raises(ValueError, match="more than the 4x4 grid"):
        SCOUT(cells=17).explain(model, x[:1], 1, x[1:])
    with pytest.raises(ValueError, match="target 9"):
        SCOUT().explain(model, x[:1], 9, x[1:])


def test_scout_is_declared_an_attribution_method_whose_regions_need_no_flip():
    from explain.methods import method_class, no_flip_names, registered

    assert no_flip_names() == ["scout"]
    assert method_class("scout") is SCOUT and not registered("scout").declaration.requires_flip


def linear_model(weight: list[list[float]], pool: bool = False) -> SplitClassifier:
    """f = identity on a 1-channel 1 x 4 "image" (optionally followed by a 1 x 2 max-pool), g = flatten +
    linear without bias with the given rows: every gradient is a weight, worked out by hand below."""
    width = len(weight[0])
    linear = torch.nn.Linear(width, len(weight), bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight))
    f = torch.nn.Sequential(torch.nn.Identity(), torch.nn.MaxPool2d((1, 2))) if pool else torch.nn.Identity()
    return SplitClassifier(f=f, g=torch.nn.Sequential(torch.nn.Flatten(), linear))


def test_known_answer_maps_worked_out_by_hand():
    """x = (1, 1, 1, 1), W_c = (3, 2, 1, -1), W_c' = (0, 1, 3, 0): logits 5 and 4, p = sigmoid(1).
    A = W_c x = (3, 2, 1, 1e-7) (the negative cell clamped), B = (0, 1, 3, 0), max B - B = (3, 2, 0, 3),
    S = max(p (1 - p) (W_c - W_c'), 0) x = p (1 - p) (3, 1, 0, 0): D = p (1 - p) (27, 4, 0, 0)."""
    from explain.methods.scout import attribution_maps, discriminant_map

    model = linear_model([[3, 2, 1, -1], [0, 1, 3, 0]])
    x = torch.ones(3, 1, 1, 4)
    maps = attribution_maps(model.g, x, torch.tensor([0, 1, -1]))
    p = 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(maps[0, 0].numpy(), [3, 2, 1, 1e-7], rtol=1e-6)
    np.testing.assert_allclose(maps[1, 0].numpy(), [0, 1, 3, 0], rtol=1e-6)
    np.testing.assert_allclose(maps[2, 0].numpy(), p * (1 - p) * np.array([3, 1, 0, 0]), rtol=1e-5)
    d = discriminant_map(maps[2:3], maps[0:1], maps[1:2])
    np.testing.assert_allclose(d[0, 0].numpy(), p * (1 - p) * np.array([27, 4, 0, 0]), rtol=1e-5)


def test_known_answer_region_where_normalised_maps_would_disagree():
    """W_c = (3, 2, 2, 2), W_c' = (2, -1, 3, 3), x = 1: logits 9 and 7. A = (3, 2, 2, 2),
    B = (2, 1e-7, 3, 3), max B - B = (1, 3, 0, 0), S = k (1, 3, 0, 0) (W_c - W_c' = (1, 3, -1, -1)):
    D = k (3, 18, 0, 0), cell 1. Min-max normalised maps with signed S (the code before the released
    formula) give A = (1, 0, 0, 0), 1 - B = (1/4, 1, 0, 0), S = (1/2, 1, 0, 0): (1/8, 0, 0, 0), cell 0."""
    model = linear_model([[3, 2, 2, 2], [2, -1, 3, 3]])
    x = torch.ones(1, 1, 1, 4)
    result = SCOUT().explain(model, x, 1, x)
    assert result.edits[0].query_cell == 1


def test_maps_are_taken_before_a_final_max_pool():
    """f = identity then a 1 x 2 max-pool: the maps live on the 1 x 4 pre-pool activation (the gradient
    reaches only each pair's larger value) and a cell of the 1 x 2 grid scores the mean of its two values."""
    from explain.methods.scout import map_layers

    model = linear_model([[3, 2], [0, 1]], pool=True)
    body, head = map_layers(model)
    x = torch.tensor([[[[1.0, 2.0, 0.5, 1.0]]]])
    assert tuple(body(x).shape) == (1, 1, 1, 4) and tuple(model.f(x).shape) == (1, 1, 1, 2)
    # pooled features (2, 1); logits c: 3*2 + 2*1 = 8, c': 1 -> predicted 0; target 1.
    # Fine gradients pass to the max of each pair: A = (0, 6, 0, 2), B = (0, 0, 0, 1) -> B max 1,
    # max B - B = (1, 1, 1, 0), S ∝ (0, 3*2, 0, 1*1) = (0, 6, 0, 1): D ∝ (0, 36, 0, 0) -> coarse cell 0.
    result = SCOUT().explain(model, x, 1, x)
    assert result.edits[0].query_cell == 0
