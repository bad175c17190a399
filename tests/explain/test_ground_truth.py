"""A check against ground truth: on drawn birds whose classes differ only in head colour, a classifier trained
here in seconds is explained by CVE and the semantic method. Their first edits must replace the query's head
(Near-KP on the known part), and the semantic method's must replace it with the distractor's head far more
often than CVE's (Same-KP): the paper's claim, where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explain.methods.cve import CVE
from explain.methods.semantic import SemanticCounterfactual
from explain.stimuli.metrics import cell_parts, keypoint_metrics
from tests.explain.cell_models import single_thread  # noqa: F401 (an autouse fixture)
from tests.explain.drawn_birds import PartCells, bird_classifier, drawn_birds

PAIRS = 20


@pytest.fixture(scope="module")
def birds():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_x, train_y, _ = drawn_birds(0, 200)
        model = bird_classifier(0, train_x, train_y)
        test_x, test_y, keypoints = drawn_birds(1, 2 * PAIRS)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = float((model.g(model.f(test_x)).argmax(dim=1) == test_y).float().mean())
    queries = [i for i in range(2 * PAIRS) if test_y[i] == 0]  # red heads, explained as "why not blue"
    distractors = [i for i in range(2 * PAIRS) if test_y[i] == 1]
    return model, accuracy, test_x, keypoints, queries, distractors


def first_edits_on_heads(results, keypoints, queries, distractors) -> tuple[float, float]:
    """Fractions of first edits whose query cell, and whose distractor cell, holds the head keypoint."""
    query_hits = distractor_hits = 0
    for result, q, d in zip(results, queries, distractors, strict=True):
        first = result.edits[0]
        query_hits += "head" in cell_parts(keypoints[q], (4, 4), (32, 32))[first.query_cell]
        distractor_hits += "head" in cell_parts(keypoints[d], (4, 4), (32, 32))[first.distractor_cell]
    return query_hits / len(results), distractor_hits / len(results)


def explain(method, birds):
    model, _, x, keypoints, queries, distractors = birds
    results = method.explain_batch(
        model, x[queries], [1] * len(queries), [x[d : d + 1] for d in distractors], aux=PartCells()
    )
    assert all(result.edits for result in results)
    metrics = [
        keypoint_metrics(r.edits, keypoints[q], [keypoints[d]], (4, 4), (32, 32), [(32, 32)])
        for r, q, d in zip(results, queries, distractors, strict=True)
    ]
    summary = {key: float(np.nanmean([m[key] for m in metrics])) for key in metrics[0]}
    return results, summary


def test_the_classifier_learned_the_task(birds):
    assert birds[1] >= 0.95


def test_first_edits_land_on_the_head_and_semantic_edits_match_parts(birds):
    _, _, _, keypoints, queries, distractors = birds
    cve_results, cve = explain(CVE(), birds)
    assert all(r.flipped for r in cve_results)
    cve_query_head, _ = first_edits_on_heads(cve_results, keypoints, queries, distractors)
    assert cve_query_head >= 0.7  # CVE finds the discriminative part on the query ...

    for method in (SemanticCounterfactual(topk=None), SemanticCounterfactual()):  # without and with prefilter
        results, semantic = explain(method, birds)
        query_head, distractor_head = first_edits_on_heads(results, keypoints, queries, distractors)
        assert query_head >= 0.7 and distractor_head >= 0.7, method.config()
        assert semantic["near_kp_first"] >= cve["near_kp_first"]
        # ... but only the semantic method replaces it with the same part of the distractor
        assert semantic["same_kp_first"] >= cve["same_kp_first"] + 0.3, (semantic, cve)
        assert semantic["same_kp_all"] > cve["same_kp_all"]
