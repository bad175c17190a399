"""The primary test of a machine-teaching study: valid with 3 raters per condition and with stimuli that vary.

A contrast of test accuracies (a method vs another within a setup, or how that gap changes between setups) is
tested twice, and the primary p-value is the larger of the two (each is valid, so their maximum is too:
P(max <= alpha) <= alpha):

1. **min F'** (Clark 1973, "language-as-fixed-effect"), written as a t test on the accuracy difference. The
   estimate is the contrast of cell accuracies averaged over raters (each rater's accuracy in a cell first).
   Its variance is the sum of a by-rater part (raters as the random sample) and a by-stimulus part (class
   pairs, or test images, as the random sample: each one's accuracy per cell, averaged over its raters). When
   both estimates coincide, t^2 = est^2 / (V_rater + V_stimulus) is exactly Clark's min F' = F1 F2 / (F1 +
   F2), with Satterthwaite's degrees of freedom, capped at twice the smaller part's (``DF_CAP``: see below).
   Both parts count the trial-level noise once each, so the test errs on the conservative side; it does not
   grow anticonservative with raters when the stimuli of a condition teach some images (or pairs) better
   than others, as a model with raters random and stimuli fixed does (Judd, Westfall & Kenny 2012).
2. **Rater permutation**: the same estimate, with the condition labels re-randomised the way the design
   randomised them (between subjects: across the raters of the contrast's cells, within each setup; within
   subjects: across each rater's own blocks). Exact enumeration when there are at most ``n_perm``
   relabellings, Monte Carlo otherwise (p = (1 + hits) / (1 + draws)). It is exact for a comparison of two
   methods and conservative for an interaction (labels are only exchanged within a setup). It supports claims
   about these stimuli only; the min F' supports claims about stimuli like them.

The cap on the degrees of freedom is a small-sample correction of ours, calibrated by simulation
(``bench/bench_analysis_sim.py``): with 3 class pairs the by-pair variance rests on 2 degrees of freedom, and
when it happens to come out small Satterthwaite's formula also makes the degrees of freedom large, so the
test rejected 9-10% of null studies at alpha 0.05 (item x condition SD 1.0, 20-40 raters per condition).
With the degrees of freedom at most twice the smaller part's it stays under 7% there; with many pairs and
raters the cap hardly moves the critical value (t at 38 df against t at infinite df: 2.02 vs 1.96). Using
the smaller part's degrees of freedom alone (Hsu's rule) also holds the rate but costs most of the power
with few pairs.

Each part's variance is a cluster-robust sum over its units (raters; pairs or images) of their centred,
small-sample-scaled contributions, so a unit seen in several cells (a within-subjects rater, a test image
shown in both conditions) brings its covariance with it. Pure numpy / pandas / scipy; no Django.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product

import numpy as np
import pandas as pd
from scipy import stats as sps

from .stats import Contrast, contrasts_for, holm, setup_order

DF_CAP = 2.0  # the min F' test's degrees of freedom are at most DF_CAP x the smaller part's (docstring)
PRIMARY_MODEL = "primary: max(min F' rater + stimulus random, rater permutation)"
UNITS = {"pairs": "pair", "images": "image"}
PERMUTATION_MODEL = "primary: rater permutation (these stimuli)"
GENERALISES = {
    "pairs": "raters, class pairs and test images like these (all three random)",
    "images": "raters and test images like these, for these class pairs (pairs fixed)",
    "permutation": "raters like these, for these stimuli, class pairs and test images (stimuli fixed)",
}


def _cell_scores(rows: pd.DataFrame, unit: str) -> pd.DataFrame:
    """Mean accuracy of each unit (rater, pair or image) in each (method, setup) cell."""
    scores = rows.groupby([unit, "method", "setup"], sort=True)["correct"].agg(["mean", "count"])
    return scores.reset_index().rename(columns={unit: "unit", "mean": "y", "count": "n"})


def _robust_part(scores: pd.DataFrame, weights: dict[tuple[str, str], float]) -> tuple[float, float, float]:
    """Contrast estimate over unit means, its cluster-robust variance and Satterthwaite degrees of freedom.

    Per cell c with n_c units: the mean of its units' scores. A unit's contribution is sum_c w_c (y_uc -
    ybar_c) / sqrt(n_c (n_c - 1)); the variance is the sum over units of their squared contributions (for
    independent cells this is sum_c w_c^2 s_c^2 / n_c, Welch's; for a unit in every cell, the paired
    variance).
    Degrees of freedom: Welch-Satterthwaite over the cells, at most (units - 1).
    """
    cells = list(weights)
    pairs = pd.Series(list(zip(scores["method"], scores["setup"], strict=True)), index=scores.index)
    keep = pairs.isin(cells)
    use = scores.loc[keep]
    if use.empty:
        return math.nan, math.nan, math.nan
    cell = list(zip(use["method"], use["setup"], strict=True))
    groups = use.groupby(["method", "setup"])["y"]
    mean, count, var = groups.mean(), groups.count(), groups.var(ddof=1)
    if any(c not in mean.index or count[c] < 2 for c in cells):
        return math.nan, math.nan, math.nan
    estimate = float(sum(weights[c] * mean[c] for c in cells))
    w = np.array([weights[c] for c in cell])
    centred = use["y"].to_numpy(float) - np.array([mean[c] for c in cell])
    scale = np.sqrt(np.array([count[c] * (count[c] - 1) for c in cell], dtype=float))
    contribution = pd.Series(w * centred / scale).groupby(use["unit"].to_numpy()).sum()
    variance = float((contribution**2).sum())
    pieces = np.array([weights[c] ** 2 * var[c] / count[c] for c in cells])
    dofs = np.array([count[c] - 1 for c in cells], dtype=float)
    denom = float((pieces**2 / dofs).sum())
    welch = float(pieces.sum() ** 2 / denom) if denom > 0 else math.inf
    return estimate, variance, min(welch, float(use["unit"].nunique() - 1))


def min_f_test(rows: pd.DataFrame, weights: dict[tuple[str, str], float], *, unit: str = "pairs") -> dict:
    """Clark's min F' as a t test of one contrast (module docstring): estimate, SE, df, t, p, 95% CI."""
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r}: the primary test generalises over 'pairs' or 'images'")
    est, v_rater, df_rater = _robust_part(_cell_scores(rows, "rater"), weights)
    _, v_stim, df_stim = _robust_part(_cell_scores(rows, UNITS[unit]), weights)
    out = {"estimate": est, "se_rater": math.sqrt(v_rater) if v_rater == v_rater else math.nan,
           "se_stimulus": math.sqrt(v_stim) if v_stim == v_stim else math.nan, "se": math.nan, "df": math.nan,
           "t": math.nan, "p_min_f": math.nan, "ci_low": math.nan, "ci_high": math.nan}  # fmt: skip
    if any(math.isnan(x) for x in (est, v_rater, v_stim)) or v_rater + v_stim <= 0:
        return out
    variance = v_rater + v_stim
    terms = [v**2 / d for v, d in ((v_rater, df_rater), (v_stim, df_stim)) if v > 0 and d > 0]
    df = variance**2 / sum(terms) if terms else math.nan
    df = min(df, DF_CAP * min(df_rater, df_stim))
    if not df > 0:
        return out
    t = est / math.sqrt(variance)
    half = sps.t.ppf(0.975, df) * math.sqrt(variance)
    return out | {"se": math.sqrt(variance), "df": df, "t": t, "p_min_f": float(2 * sps.t.sf(abs(t), df)),
                  "ci_low": est - half, "ci_high": est + half}  # fmt: skip


def _strata(contrast: Contrast, design: str, scores: pd.DataFrame) -> np.ndarray:
    """Which rater scores may exchange labels: within a setup (between subjects) or within a rater."""
    if design == "within":
        return pd.factorize(scores["unit"].astype(str) + "|" + scores["setup"])[0]
    return pd.factorize(scores["setup"])[0]


def _statistic(y: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Contrast of label means for each row of ``labels`` (perm x units): sum_c w_c mean(y | label c)."""
    out = np.zeros(labels.shape[0])
    for c, weight in enumerate(w):
        hit = labels == c
        n = hit.sum(axis=1)
        out += weight * np.where(n > 0, (hit * y).sum(axis=1) / np.maximum(n, 1), np.nan)
    return out


def _relabellings(labels: np.ndarray, strata: np.ndarray, n_perm: int, rng: np.random.Generator):
    """Every relabelling within strata when there are at most ``n_perm`` (exact), else ``n_perm`` random
    ones."""
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    counts = []
    for idx in groups:
        _, multiplicity = np.unique(labels[idx], return_counts=True)
        total = math.factorial(len(idx))
        for m in multiplicity:
            total //= math.factorial(int(m))
        counts.append(total)
    if math.prod(counts) <= n_perm:
        per_group = [list(_arrangements(sorted(labels[idx].tolist()))) for idx in groups]
        out = np.empty((math.prod(counts), len(labels)), dtype=labels.dtype)
        for row, choice in enumerate(product(*per_group)):
            for idx, values in zip(groups, choice, strict=True):
                out[row, idx] = values
        return out, True
    out = np.tile(labels, (n_perm, 1))
    for idx in groups:
        order = np.argsort(rng.random((n_perm, len(idx))), axis=1)
        out[:, idx] = labels[idx][order]
    return out, False


def _arrangements(values: list[int]):
    """The distinct orderings of a multiset of labels, each once (lexicographic)."""
    if not values:
        yield ()
        return
    for first in sorted(set(values)):
        rest = list(values)
        rest.remove(first)
        for tail in _arrangements(rest):
            yield (first, *tail)


def permutation_test(
    rows: pd.DataFrame,
    contrast: Contrast,
    *,
    design: str = "between",
    n_perm: int = 2000,
    seed: int = 0,
) -> dict:
    """Two-sided rater permutation p-value of one contrast (module docstring); says whether it was exact."""
    scores = _cell_scores(rows, "rater")
    cells = list(contrast.weights)
    cell_of = list(zip(scores["method"], scores["setup"], strict=True))
    keep = np.array([c in contrast.weights for c in cell_of])
    scores = scores.loc[keep].reset_index(drop=True)
    present = {c for c, k in zip(cell_of, keep, strict=True) if k}
    if set(cells) - present:
        return {"p_permutation": math.nan, "permutations": 0, "exact": False}
    index = {c: i for i, c in enumerate(cells)}
    labels = np.array([index[c] for c in zip(scores["method"], scores["setup"], strict=True)])
    y = scores["y"].to_numpy(float)
    w = np.array([contrast.weights[c] for c in cells])
    strata = _strata(contrast, design, scores)
    observed = float(_statistic(y, labels[None, :], w)[0])
    relabelled, exact = _relabellings(labels, strata, n_perm, np.random.default_rng(seed))
    null = _statistic(y, relabelled, w)
    null = null[~np.isnan(null)]
    hits = int((np.abs(null) >= abs(observed) - 1e-12).sum())
    p = hits / len(null) if exact else (1 + hits) / (1 + len(null))
    return {"p_permutation": float(p), "permutations": len(null), "exact": exact}


def primary_tests(
    rows: pd.DataFrame,
    *,
    contrasts: Sequence[Contrast] | None = None,
    design: str = "between",
    unit: str = "pairs",
    test: str = "min_f_permutation",
    correction: str = "holm",
    n_perm: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """The primary table: per contrast, the accuracy difference with its min F' interval, both p-values, the
    primary p (their maximum; the permutation p alone when ``test`` is "permutation"), its ``correction``
    across the contrasts (holm, bonferroni or none) and whether it is significant at ``alpha``."""
    if test not in ("min_f_permutation", "permutation"):
        raise ValueError(f"test={test!r}; use 'min_f_permutation' or 'permutation'")
    if contrasts is None:
        methods, setups = sorted(rows["method"].unique()), setup_order(rows["setup"].unique())
        contrasts = contrasts_for(methods, setups)
    records = []
    for i, c in enumerate(contrasts):
        result = min_f_test(rows, c.weights, unit=unit)
        perm = permutation_test(rows, c, design=design, n_perm=n_perm, seed=seed + i)
        if test == "permutation":
            p = perm["p_permutation"]
        else:  # undefined when either half is (Python's max would pass over a NaN in second place)
            both = (result["p_min_f"], perm["p_permutation"])
            p = math.nan if np.isnan(both).any() else max(both)
        model = PRIMARY_MODEL if test != "permutation" else PERMUTATION_MODEL
        names = {"model": model, "kind": c.kind, "comparison": c.label, "setup": c.setup,
                 "method_a": c.method_a, "method_b": c.method_b}  # fmt: skip
        records.append({**names, **result, **perm, "p": p})
    table = pd.DataFrame.from_records(records)
    if table.empty:
        return table
    table["p_adjusted"] = adjust(table["p"].tolist(), correction)
    table["significant"] = table["p_adjusted"] < alpha
    table["generalises_over"] = GENERALISES[unit] if test != "permutation" else GENERALISES["permutation"]
    return table


def adjust(pvalues: Sequence[float], correction: str) -> list[float]:
    """Family-wise adjusted p-values: Holm's step-down, Bonferroni's, or none; NaN stays NaN."""
    if correction == "holm":
        return holm(pvalues)
    if correction == "bonferroni":
        m = sum(p == p for p in pvalues)
        return [min(1.0, p * m) if p == p else math.nan for p in pvalues]
    if correction == "none":
        return list(pvalues)
    raise ValueError(f"correction={correction!r}; use 'holm', 'bonferroni' or 'none'")
