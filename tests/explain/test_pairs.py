"""Pair mining on confusion matrices and attribute vectors with known answers and against a reference."""

import numpy as np
import pytest

from explain.stimuli.pairs import (
    confusion_rates,
    most_confused_pairs,
    nearest_by_attributes,
    top_k_confused_pairs,
)

# Rows: true class; columns: predicted. Class 0 is mostly mistaken for 2, class 1 for 0, class 2 for 0,
# class 3 never.
CONFUSION = [
    [80, 5, 15, 0],
    [30, 60, 10, 0],
    [6, 4, 90, 0],
    [0, 0, 0, 50],
]


def test_most_confused_class_of_every_class():
    pairs = [(p.class_a, p.class_b, round(p.score, 4)) for p in most_confused_pairs(CONFUSION)]
    assert pairs == [(0, 2, 0.15), (1, 0, 0.3), (2, 0, 0.06)]


def test_top_k_confused_pairs_in_order():
    pairs = [(p.class_a, p.class_b, round(p.score, 4)) for p in top_k_confused_pairs(CONFUSION, 3)]
    assert pairs == [(1, 0, 0.3), (0, 2, 0.15), (1, 2, 0.1)]
    symmetric = [(p.class_a, p.class_b) for p in top_k_confused_pairs(CONFUSION, 2, symmetric=True)]
    assert symmetric == [(0, 1), (0, 2)]  # (0.05 + 0.3) / 2 = 0.175, (0.15 + 0.06) / 2 = 0.105


def test_pairs_never_confused_are_left_out_and_ties_go_to_the_lower_index():
    assert len(top_k_confused_pairs(CONFUSION, 100)) == 6
    tied = [[10, 5, 5], [0, 10, 0], [0, 0, 10]]
    assert [(p.class_a, p.class_b) for p in most_confused_pairs(tied)] == [(0, 1)]


def test_top_k_matches_a_plain_reference_on_random_matrices():
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(2, 9))
        confusion = rng.integers(0, 30, size=(n, n))
        rates = confusion / confusion.sum(1, keepdims=True)
        reference = sorted(
            ((rates[a, b], a, b) for a in range(n) for b in range(n) if a != b and confusion[a, b] > 0),
            key=lambda t: (-t[0], t[1], t[2]),
        )[:5]
        mined = top_k_confused_pairs(confusion, 5)
        assert [(p.class_a, p.class_b) for p in mined] == [(a, b) for _, a, b in reference]
        np.testing.assert_allclose([p.score for p in mined], [s for s, _, _ in reference])


def test_bad_confusion_matrices_are_refused():
    with pytest.raises(ValueError, match="square"):
        confusion_rates([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match=">= 0"):
        confusion_rates([[1, -2], [0, 1]])
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_k_confused_pairs(CONFUSION, 0)


def test_nearest_class_by_mean_attribute_vector():
    per_class = {
        0: np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]),  # mean (1, 0, 0.5)
        1: np.array([[1.0, 0.0, 0.0]]),  # (1, 0, 0): nearest to 0
        2: np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]),  # (0, 1, 0.5): nearest to 0 (sqrt 2)
    }
    pairs = nearest_by_attributes(per_class)
    assert [(p.class_a, p.class_b) for p in pairs] == [(0, 1), (1, 0), (2, 0)]
    assert pairs[0].score == pytest.approx(0.5)
    assert pairs[2].score == pytest.approx(np.sqrt(2))
    with pytest.raises(ValueError, match="different lengths"):
        nearest_by_attributes({0: np.zeros((1, 2)), 1: np.zeros((1, 3))})
