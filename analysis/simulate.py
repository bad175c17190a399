"""Simulated studies with a known truth: tidy rows drawn from accuracies per (method, setup).

Each simulated rater has a random ability (a normal intercept on the logit scale, standard deviation
``rater_sd``), each test image a random difficulty (``image_sd``), and the stimuli of each condition teach
some images and some class pairs better than others (``item_condition_sd``, ``pair_condition_sd``); a rater
answers every test image of a class pair once. The accuracies given are the accuracies of an average rater
on an average image. Pure numpy/pandas, no Django: the bench, the tests and the demo study all draw from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import integrate
from scipy import stats as sps


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def simulate_rows(
    accuracy: Mapping[tuple[str, str], float],
    *,
    raters_per_condition: int,
    pairs_per_rater: int = 1,
    tests_per_pair: int = 10,
    n_pairs: int = 4,
    rater_sd: float = 0.6,
    image_sd: float = 0.0,
    item_condition_sd: float = 0.0,
    pair_condition_sd: float = 0.0,
    design: str = "between",
    pre_accuracy: float = 0.5,
    dont_know_rate: float = 0.5,
    seed: int | np.random.Generator = 0,
) -> pd.DataFrame:
    """Tidy rows (pre-learning and test) of a simulated study.

    ``accuracy``: test accuracy per (method, setup) for an average rater on an average image. On the logit
    scale each answer adds the rater's ability (SD ``rater_sd``), the image's difficulty (``image_sd``, the
    same in every condition), how well this condition's stimuli teach this image (``item_condition_sd``: an
    item x condition effect) and this class pair (``pair_condition_sd``: the stimuli of a method for a pair
    are one draw of what it produces). ``design``: "between" (a rater sees ``pairs_per_rater`` pairs, all in
    one condition) or "within" (a rater sees ``pairs_per_rater`` pairs, each in a different condition, the
    conditions in a random order; ``raters_per_condition`` raters answer each condition).
    ``pre_accuracy``: accuracy of the pre-learning answers that are not "don't know" (``dont_know_rate`` of
    them are).
    """
    if design not in ("between", "within"):
        raise ValueError(f"design={design!r}; use 'between' or 'within'")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if pairs_per_rater > n_pairs:
        raise ValueError(f"pairs_per_rater={pairs_per_rater} is more than n_pairs={n_pairs}")
    cells = sorted(accuracy)
    for (method, setup), p in accuracy.items():
        if not 0 < p < 1:
            raise ValueError(f"accuracy of {method}/{setup} is {p!r}; it must be strictly between 0 and 1")
    if design == "within" and pairs_per_rater != len(cells):
        raise ValueError(
            f"a within-subjects rater sees each of the {len(cells)} conditions once; "
            f"pairs_per_rater={pairs_per_rater} should be {len(cells)}"
        )
    T = tests_per_pair
    image_effect = rng.normal(0.0, image_sd, size=(n_pairs, T))
    item_cell = rng.normal(0.0, item_condition_sd, size=(len(cells), n_pairs, T))
    pair_cell = rng.normal(0.0, pair_condition_sd, size=(len(cells), n_pairs))
    n_raters = raters_per_condition * (1 if design == "within" else len(cells))
    if design == "between":
        plan = [[c] * pairs_per_rater for c in range(len(cells)) for _ in range(raters_per_condition)]
    else:
        plan = [list(rng.permutation(len(cells))) for _ in range(n_raters)]
    ability = rng.normal(0.0, rater_sd, size=n_raters)
    columns: dict[str, list] = {k: [] for k in ("rater", "method", "setup", "pair", "image", "phase")}
    columns |= {"position": [], "correct": [], "answer": []}
    for r, blocks in enumerate(plan):
        pairs = rng.choice(n_pairs, size=pairs_per_rater, replace=False)
        for c, pair in zip(blocks, pairs, strict=True):
            method, setup = cells[c]
            p = accuracy[cells[c]]
            eta = _logit(p) + ability[r] + image_effect[pair] + item_cell[c, pair] + pair_cell[c, pair]
            correct = rng.random(T) < 1 / (1 + np.exp(-eta))
            dont_know = rng.random(T) < dont_know_rate
            pre_correct = (rng.random(T) < pre_accuracy) & ~dont_know
            for phase, ok in (("pre", pre_correct), ("test", correct)):
                answer = np.where(ok, "A", "B")
                if phase == "pre":
                    answer = np.where(dont_know, "D", answer)
                columns["rater"].append(np.full(T, f"r{r + 1:05d}"))
                columns["method"].append(np.full(T, method))
                columns["setup"].append(np.full(T, setup))
                columns["pair"].append(np.full(T, pair))
                columns["image"].append(np.array([f"p{pair}i{i}" for i in range(T)]))
                columns["phase"].append(np.full(T, phase))
                columns["position"].append(np.arange(T))
                columns["correct"].append(ok.astype(int))
                columns["answer"].append(answer)
    rows = pd.DataFrame({k: np.concatenate(v) for k, v in columns.items()})
    rows["correct_answer"] = "A"
    rows["is_catch"] = False
    rows["excluded"] = False
    return rows


def marginal_accuracy(p: float, rater_sd: float) -> float:
    """Population-average accuracy when the average rater has accuracy ``p`` and abilities vary with
    ``rater_sd`` on the logit scale: E[expit(logit p + u)], u ~ N(0, rater_sd^2)."""
    if rater_sd == 0:
        return p
    f = lambda u: sps.norm.pdf(u, scale=rater_sd) / (1 + math.exp(-(_logit(p) + u)))  # noqa: E731
    return float(integrate.quad(f, -8 * rater_sd, 8 * rater_sd)[0])


def latent_icc(p: float, rater_sd: float) -> float:
    """Intraclass correlation of one rater's binary answers on the probability scale for the random-intercept
    model: Var(E[y|u]) / (pbar (1 - pbar))."""
    if rater_sd == 0:
        return 0.0
    mean = marginal_accuracy(p, rater_sd)
    f = lambda u: sps.norm.pdf(u, scale=rater_sd) / (1 + math.exp(-(_logit(p) + u))) ** 2  # noqa: E731
    second = float(integrate.quad(f, -8 * rater_sd, 8 * rater_sd)[0])
    return (second - mean**2) / (mean * (1 - mean))
