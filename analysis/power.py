"""Sample size and power for comparing two methods' test accuracy when each rater answers several trials.

Responses of one rater are correlated (intraclass correlation ``icc``), so m trials per rater carry the
information of m / DE independent ones, with the design effect DE = 1 + (m - 1) * icc (Kish 1965; Donner &
Klar 2000). The count of independent responses per condition comes from the normal approximation for two
proportions (Fleiss, Levin & Paik 2003, eq. 4.14, without continuity correction):

    n = (z_{1-alpha/2} sqrt(2 pbar qbar) + z_{power} sqrt(p1 q1 + p2 q2))^2 / (p1 - p2)^2

and the raters needed per condition are ceil(n * DE / m). This assumes a between-subjects design (one
condition per rater); a within-subjects design needs no more raters than this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from .primary import DF_CAP


def _check(p1: float, p2: float, trials_per_rater: float, icc: float, alpha: float) -> None:
    for name, p in (("p1", p1), ("p2", p2)):
        if not 0 < p < 1:
            raise ValueError(f"{name}={p!r} is not an accuracy strictly between 0 and 1")
    if p1 == p2:
        raise ValueError(f"p1 and p2 are both {p1!r}: there is no difference to detect; give two accuracies")
    if trials_per_rater < 1:
        raise ValueError(f"trials_per_rater={trials_per_rater!r}; each rater answers at least one test trial")
    if not 0 <= icc < 1:
        raise ValueError(f"icc={icc!r} is not an intraclass correlation in [0, 1)")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha!r} is not a significance level in (0, 1)")


def design_effect(trials_per_rater: float, icc: float) -> float:
    """Kish's design effect of clusters of ``trials_per_rater`` responses with intraclass correlation
    ``icc``."""
    return 1 + (trials_per_rater - 1) * icc


def responses_per_condition(p1: float, p2: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Independent responses per condition for a two-sided test of p1 vs p2 to reach ``power``."""
    z_a = sps.norm.ppf(1 - alpha / 2)
    z_b = sps.norm.ppf(power)
    pbar = (p1 + p2) / 2
    root = z_a * math.sqrt(2 * pbar * (1 - pbar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return root**2 / (p1 - p2) ** 2


def raters_per_condition(
    p1: float,
    p2: float,
    *,
    trials_per_rater: float,
    icc: float,
    alpha: float = 0.05,
    power: float = 0.8,
) -> int:
    """Raters needed per condition so that a two-sided test at ``alpha`` detects p1 vs p2 with ``power``."""
    _check(p1, p2, trials_per_rater, icc, alpha)
    if not 0 < power < 1:
        raise ValueError(f"power={power!r} is not a probability in (0, 1)")
    n = responses_per_condition(p1, p2, alpha=alpha, power=power)
    return math.ceil(n * design_effect(trials_per_rater, icc) / trials_per_rater - 1e-9)


def power_of(
    p1: float,
    p2: float,
    *,
    raters: int,
    trials_per_rater: float,
    icc: float,
    alpha: float = 0.05,
) -> float:
    """Power of the two-sided test of p1 vs p2 with ``raters`` raters per condition (the inverse of
    ``raters_per_condition``; both rejection tails counted)."""
    _check(p1, p2, trials_per_rater, icc, alpha)
    n = raters * trials_per_rater / design_effect(trials_per_rater, icc)
    z_a = sps.norm.ppf(1 - alpha / 2)
    pbar = (p1 + p2) / 2
    s0 = math.sqrt(2 * pbar * (1 - pbar))
    s1 = math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    d = abs(p1 - p2) * math.sqrt(n)
    return float(sps.norm.cdf((d - z_a * s0) / s1) + sps.norm.cdf((-d - z_a * s0) / s1))


def icc_anova(correct: Sequence[float], clusters: Sequence[object]) -> float:
    """One-way ANOVA estimate of the intraclass correlation of binary responses within clusters (raters),
    with the unequal-cluster-size n0 of Donner (1986); negative estimates are clipped to 0."""
    frame = pd.DataFrame({"y": np.asarray(correct, dtype=float), "c": np.asarray(clusters)})
    g = frame.groupby("c")["y"].agg(["sum", "count"])
    k, N = len(g), float(g["count"].sum())
    if k < 2 or N <= k:
        return 0.0
    p = g["sum"].sum() / N
    p_i = g["sum"] / g["count"]
    msb = float((g["count"] * (p_i - p) ** 2).sum() / (k - 1))
    msw = float((g["count"] * p_i * (1 - p_i)).sum() / (N - k))
    n0 = (N - float((g["count"] ** 2).sum()) / N) / (k - 1)
    denom = msb + (n0 - 1) * msw
    return max(0.0, (msb - msw) / denom) if denom > 0 else 0.0


def power_table(
    rows: pd.DataFrame,
    *,
    alpha: float = 0.05,
    target_power: float = 0.8,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """From pilot data (tidy test rows): per pair of methods within a setup, the raters per condition needed
    to detect the observed difference with ``target_power``, and the power the current raters give (both under
    the ICC and trials per rater estimated from the same rows)."""
    icc = icc_anova(rows["correct"], rows["rater"].astype(str) + "|" + rows["method"] + "|" + rows["setup"])
    per_rater = rows.groupby(["rater", "method", "setup"]).size()
    m = float(per_rater.mean()) if len(per_rater) else math.nan
    acc = rows.groupby(["method", "setup"])["correct"].mean()
    raters = rows.groupby(["method", "setup"])["rater"].nunique()
    records = []
    for setup in sorted(rows["setup"].unique()):
        methods = sorted(rows.loc[rows["setup"] == setup, "method"].unique())
        for i, a in enumerate(methods):
            for b in methods[i + 1 :]:
                p1, p2 = float(acc[(a, setup)]), float(acc[(b, setup)])
                record = {"setup": setup, "method_a": a, "method_b": b, "accuracy_a": p1, "accuracy_b": p2,
                          "raters_now": int(min(raters[(a, setup)], raters[(b, setup)])),
                          "raters_needed": None, "power_now": math.nan}  # fmt: skip
                if 0 < p1 < 1 and 0 < p2 < 1 and p1 != p2:
                    record["raters_needed"] = raters_per_condition(
                        p1, p2, trials_per_rater=m, icc=icc, alpha=alpha, power=target_power
                    )
                    record["power_now"] = power_of(
                        p1, p2, raters=record["raters_now"], trials_per_rater=m, icc=icc, alpha=alpha
                    )
                records.append(record)
    assumptions = {"icc": icc, "trials_per_rater": m, "design_effect": design_effect(m, icc) if m == m else m,
                   "alpha": alpha, "target_power": target_power}  # fmt: skip
    return pd.DataFrame.from_records(records), assumptions


def primary_power(
    *,
    p1: float,
    p2: float,
    raters: int,
    pairs: int,
    trials_per_pair: int = 10,
    pairs_per_rater: int = 2,
    rater_sd: float = 0.6,
    pair_sd: float = 0.3,
    alpha: float = 0.05,
) -> float:
    """Approximate power of the primary test (``analysis.primary``) of two methods, between subjects, with
    ``raters`` per condition drawn over ``pairs`` class pairs.

    On the accuracy scale (logit SDs times p(1 - p)): a rater's accuracy in a cell varies by ability and by
    the binomial noise of their ``trials_per_pair * pairs_per_rater`` answers and the pair effects they met;
    a pair's accuracy in a cell by its pair x condition effect (``pair_sd``) and the raters who saw it. The
    test's variance is the sum of the by-rater and by-pair parts (min F'), its degrees of freedom
    Satterthwaite's (capped as the test caps them), and the power that of a two-sided t with that
    non-centrality. When the exact permutation
    of R vs R raters cannot reach ``alpha`` (2 / C(2R, R) > alpha, i.e. R <= 3) the power is 0.
    """
    _check(p1, p2, trials_per_pair, 0.0, alpha)
    if raters < 2 or pairs < 2:
        raise ValueError(f"raters={raters}, pairs={pairs}: the primary test needs at least 2 of each")
    if 2 / math.comb(2 * raters, raters) > alpha:
        return 0.0
    p = (p1 + p2) / 2
    slope = p * (1 - p)
    ability, pair_var = (slope * rater_sd) ** 2, (slope * pair_sd) ** 2
    k = min(pairs_per_rater, pairs)
    binomial = p * (1 - p) / (trials_per_pair * k)
    v_rater = 2 * (ability + binomial + pair_var / k) / raters
    units = min(pairs, raters * k)
    raters_per_pair = max(raters * k / pairs, 1.0)
    v_pair = 2 * (pair_var + (ability + p * (1 - p) / trials_per_pair) / raters_per_pair) / units
    df1 = 2 * raters - 2
    df2 = units - 1 if raters * k >= pairs else 2 * units - 2  # pairs seen in both cells: paired
    df = (v_rater + v_pair) ** 2 / (v_rater**2 / df1 + v_pair**2 / max(df2, 1))
    df = min(df, DF_CAP * min(df1, max(df2, 1)))  # the primary test's cap (analysis.primary)
    nc = abs(p2 - p1) / math.sqrt(v_rater + v_pair)
    crit = sps.t.ppf(1 - alpha / 2, df)
    return float(sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc))


def primary_plan(
    *,
    p1: float,
    p2: float,
    target: float = 0.8,
    pair_options: Sequence[int] = (3, 5, 10, 20, 40, 80, 155),
    max_raters: int = 200,
    **design: float,
) -> pd.DataFrame:
    """For each number of class pairs, the fewest raters per condition that give the primary test ``target``
    power (``primary_power``'s assumptions); pair counts that cannot reach it with ``max_raters`` are left
    out. Raters and pairs are planned together: past some point more raters cannot make up for few pairs."""
    records = []
    for pairs in pair_options:
        for raters in range(2, max_raters + 1):
            value = primary_power(p1=p1, p2=p2, raters=raters, pairs=pairs, **design)
            if value >= target:
                records.append({"pairs": pairs, "raters_per_condition": raters, "power": value,
                                "responses_per_condition": raters * int(design.get("pairs_per_rater", 2))
                                * int(design.get("trials_per_pair", 10))})  # fmt: skip
                break
    return pd.DataFrame.from_records(
        records, columns=["pairs", "raters_per_condition", "power", "responses_per_condition"]
    )
