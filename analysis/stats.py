"""Statistics of a machine-teaching study as pure functions over tidy rows (one row per response).

No Django here: every function takes a pandas DataFrame (or plain numbers) and returns numbers or a DataFrame,
so the same code serves the report, the API, the tests and the simulation bench. The columns used are the ones
of the tidy export (``analysis.selectors.TIDY_COLUMNS``): ``rater``, ``method``, ``setup``, ``pair``,
``image``, ``phase``, ``answer``, ``correct`` (1/0 for pre-learning and test, empty for learning),
``is_catch``, ``excluded``.

Where a number comes from a model, the returned table says which one in a ``model`` column:

- ``GEE``: statsmodels GEE, binomial family, logit link, exchangeable working correlation within rater,
Mancl-DeRouen bias-reduced sandwich covariance (population-averaged odds ratios).
- ``Bayesian mixed GLM``: statsmodels ``BinomialBayesMixedGLM`` with random intercepts for rater and image:
  variance components by variational Bayes, fixed effects by a Laplace approximation given them
  (``fit_mixed``); p-values are the two-sided normal tail of the posterior mode over its posterior standard
  deviation (rater- and image-specific odds ratios).
- ``chi-square`` / ``Fisher`` / ``Woolf``: plain tests on pooled 2 x 2 counts that ignore clustering
(cross-check).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats as sps

GEE_MODEL = "GEE (binomial, exchangeable within rater, bias-reduced sandwich)"
MIXED_MODEL = "Bayesian mixed GLM (rater + image random intercepts; VB variance components, Laplace)"
CELL = ["method", "setup"]
EXCLUSION_RULE_NAMES = ["failed_catch_trials", "median_rt_below_ms", "incomplete"]


# --------------------------------------------------------------------------------------------- proportions


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (Wilson 1927): centre (k + z^2/2) / (n + z^2)."""
    if n < 0 or k < 0 or k > n + 1e-9:
        raise ValueError(f"need 0 <= k <= n for a proportion, got k={k}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    z = sps.norm.ppf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def cluster_bootstrap_interval(
    correct: Sequence[float],
    clusters: Sequence[object],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the pooled proportion when whole clusters (raters) are resampled with
    replacement.

    Each bootstrap study draws as many raters as there are, with replacement, and pools all their responses;
    this keeps the dependence between one rater's answers that a Wilson interval ignores.
    """
    y = np.asarray(correct, dtype=float)
    groups = pd.Series(y).groupby(np.asarray(clusters), sort=True)
    k = groups.sum().to_numpy()
    n = groups.count().to_numpy().astype(float)
    if len(k) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(k), size=(n_boot, len(k)))
    boot = k[draws].sum(axis=1) / n[draws].sum(axis=1)
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return (float(lo), float(hi))


def cohens_h(p1: float, p2: float) -> float:
    """Cohen's h effect size of two proportions: 2 asin(sqrt(p2)) - 2 asin(sqrt(p1)) (positive when p2 >
    p1)."""
    return 2 * math.asin(math.sqrt(p2)) - 2 * math.asin(math.sqrt(p1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order; NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), np.nan)
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def two_by_two(k1: int, n1: int, k2: int, n2: int) -> dict[str, float]:
    """Plain cross-check of two pooled proportions: Pearson chi-square (no continuity correction) and
    Fisher."""
    table = np.array([[k1, n1 - k1], [k2, n2 - k2]])
    if table.sum(axis=0).min() == 0 or min(n1, n2) == 0:
        chi2, p_chi2 = math.nan, math.nan
    else:
        chi2, p_chi2, _, _ = sps.chi2_contingency(table, correction=False)
    _, p_fisher = sps.fisher_exact(table)
    return {"chi2": float(chi2), "p_chi2": float(p_chi2), "p_fisher": float(p_fisher)}


def _log_odds_ratio(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """log OR of group 2 vs group 1 with its Woolf variance; Haldane's +0.5 when a cell is empty."""
    cells = np.array([k2, n2 - k2, k1, n1 - k1], dtype=float)
    if (cells == 0).any():
        cells += 0.5
    a, b, c, d = cells
    return float(math.log(a * d / (b * c))), float((1 / cells).sum())


# --------------------------------------------------------------------------------------------- tidy rows


def analysed_test_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The responses the analysis counts: test phase, not catch trials, raters not excluded."""
    keep = (rows["phase"] == "test") & ~rows["is_catch"].astype(bool) & ~rows["excluded"].astype(bool)
    out = rows.loc[keep].copy()
    out["correct"] = out["correct"].astype(int)
    return out


def accuracy_table(
    rows: pd.DataFrame,
    by: Sequence[str] = CELL,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    icc: float = 0.0,
    min_bootstrap_raters: int = 0,
) -> pd.DataFrame:
    """Accuracy per group (e.g. method x setup) with three intervals: Wilson (answers as independent), Wilson
    on the effective number of answers n / DE with Kish's design effect DE = 1 + (m - 1) ``icc`` (m: mean
    answers per rater in the group), and the rater-cluster bootstrap, left empty for groups of fewer than
    ``min_bootstrap_raters`` raters (with 3 raters it has 10 distinct resamples, narrower than Wilson)."""
    records = []
    for key, group in rows.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        k, n = int(group["correct"].sum()), len(group)
        n_raters = int(group["rater"].nunique())
        w_lo, w_hi = wilson_interval(k, n, confidence)
        de = 1 + (n / n_raters - 1) * icc
        e_lo, e_hi = wilson_interval(k / de, n / de, confidence)
        b_lo, b_hi = math.nan, math.nan
        if n_raters >= min_bootstrap_raters:
            b_lo, b_hi = cluster_bootstrap_interval(
                group["correct"], group["rater"], n_boot=n_boot, seed=seed, confidence=confidence
            )
        records.append(
            {
                **dict(zip(by, key, strict=True)),
                "n_raters": n_raters,
                "n_responses": n,
                "n_correct": k,
                "accuracy": k / n,
                "wilson_low": w_lo,
                "wilson_high": w_hi,
                "design_effect": de,
                "effective_low": e_lo,
                "effective_high": e_hi,
                "bootstrap_low": b_lo,
                "bootstrap_high": b_hi,
            }
        )
    columns = [*by, "n_raters", "n_responses", "n_correct", "accuracy", "wilson_low", "wilson_high"]
    columns += ["design_effect", "effective_low", "effective_high", "bootstrap_low", "bootstrap_high"]
    return pd.DataFrame.from_records(records, columns=columns)


def dont_know_table(rows: pd.DataFrame, by: Sequence[str] = CELL) -> pd.DataFrame:
    """Share of pre-learning answers that were "don't know", per group, with Wilson intervals."""
    pre = rows.loc[(rows["phase"] == "pre") & ~rows["is_catch"].astype(bool) & ~rows["excluded"].astype(bool)]
    records = []
    for key, group in pre.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        k, n = int((group["answer"] == "D").sum()), len(group)
        lo, hi = wilson_interval(k, n)
        records.append(
            {**dict(zip(by, key, strict=True)), "n_responses": n, "n_dont_know": k, "dont_know_rate": k / n}
            | {"wilson_low": lo, "wilson_high": hi}
        )
    columns = [*by, "n_responses", "n_dont_know", "dont_know_rate", "wilson_low", "wilson_high"]
    return pd.DataFrame.from_records(records, columns=columns)


def learning_gain_table(
    rows: pd.DataFrame,
    by: Sequence[str] = CELL,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    min_bootstrap_raters: int = 0,
) -> pd.DataFrame:
    """Pre-learning accuracy ("don't know" counts as not correct), test accuracy and their difference, per
    group, with a rater-cluster-bootstrap interval of the gain (each resampled rater brings both phases), left
    empty for groups of fewer than ``min_bootstrap_raters`` raters (as in ``accuracy_table``)."""
    use = rows.loc[rows["phase"].isin(["pre", "test"]) & ~rows["is_catch"].astype(bool)]
    use = use.loc[~use["excluded"].astype(bool)]
    records = []
    rng_seed = seed
    for key, group in use.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        per_rater = group.groupby(["rater", "phase"])["correct"].agg(["sum", "count"]).unstack("phase")
        per_rater = per_rater.reindex(columns=pd.MultiIndex.from_product([["sum", "count"], ["pre", "test"]]))
        per_rater = per_rater.fillna(0.0)
        k_pre, n_pre = per_rater[("sum", "pre")].to_numpy(), per_rater[("count", "pre")].to_numpy()
        k_test, n_test = per_rater[("sum", "test")].to_numpy(), per_rater[("count", "test")].to_numpy()
        pre_acc = k_pre.sum() / n_pre.sum() if n_pre.sum() else math.nan
        test_acc = k_test.sum() / n_test.sum() if n_test.sum() else math.nan
        rng = np.random.default_rng(rng_seed)
        draws = rng.integers(0, len(k_pre), size=(n_boot, len(k_pre)))
        with np.errstate(invalid="ignore", divide="ignore"):
            gains = k_test[draws].sum(1) / n_test[draws].sum(1) - k_pre[draws].sum(1) / n_pre[draws].sum(1)
        gains = gains[~np.isnan(gains)]
        shown = len(gains) and len(per_rater) >= min_bootstrap_raters
        lo, hi = np.quantile(gains, [0.025, 0.975]) if shown else (math.nan, math.nan)
        records.append(
            {
                **dict(zip(by, key, strict=True)),
                "n_raters": len(per_rater),
                "pre_accuracy": pre_acc,
                "test_accuracy": test_acc,
                "gain": test_acc - pre_acc,
                "gain_bootstrap_low": float(lo),
                "gain_bootstrap_high": float(hi),
            }
        )
    columns = [*by, "n_raters", "pre_accuracy", "test_accuracy", "gain", "gain_bootstrap_low"]
    return pd.DataFrame.from_records(records, columns=[*columns, "gain_bootstrap_high"])


# --------------------------------------------------------------------------------------------- exclusions


def exclusions_evaluate(raters: pd.DataFrame, rows: pd.DataFrame, rules: dict) -> pd.DataFrame:
    """Which raters each declared rule excludes.

    ``raters``: one row per assignment with columns ``rater`` and ``assignment_status``; ``rows``: the tidy
    responses. Rules (``Study.exclusion_rules``): ``failed_catch_trials`` (exclude at this many failed catch
    trials or more), ``median_rt_below_ms`` (median reaction time of pre-learning and test answers, browser
    clock, server clock where the browser's is missing), ``incomplete`` (assignment not completed). An
    assignment a researcher marked ``excluded`` is always excluded. Returns one row per rater: ``excluded``
    and ``reasons``.
    """
    unknown = set(rules) - set(EXCLUSION_RULE_NAMES)
    if unknown:
        raise ValueError(
            f"unknown exclusion rules {sorted(unknown)}; "
            "known: failed_catch_trials, median_rt_below_ms, incomplete"
        )
    out = raters[["rater", "assignment_status"]].drop_duplicates("rater").set_index("rater")
    reasons: dict[object, list[str]] = {r: [] for r in out.index}
    answered = rows.loc[rows["phase"].isin(["pre", "test"])]
    if "failed_catch_trials" in rules:
        limit = rules["failed_catch_trials"]
        catch = answered.loc[answered["is_catch"].astype(bool)]
        failed = (catch["answer"] != catch["correct_answer"]).groupby(catch["rater"]).sum()
        for rater, n_failed in failed.items():
            if n_failed >= limit and rater in reasons:
                reasons[rater].append(f"failed_catch_trials: {int(n_failed)} failed (limit {limit})")
    if "median_rt_below_ms" in rules:
        floor = rules["median_rt_below_ms"]
        rt = answered["client_rt_ms"].astype(float).fillna(answered["server_rt_ms"].astype(float))
        medians = rt.groupby(answered["rater"]).median()
        for rater, median in medians.items():
            if not math.isnan(median) and median < floor and rater in reasons:
                reasons[rater].append(f"median_rt_below_ms: median {median:.0f} ms (floor {floor} ms)")
    if rules.get("incomplete"):
        for rater, status in out["assignment_status"].items():
            if status not in ("completed", "excluded"):
                reasons[rater].append(f"incomplete: assignment {status}")
    for rater, status in out["assignment_status"].items():
        if status == "excluded":
            reasons[rater].append("excluded by the researcher")
    out["reasons"] = [reasons[r] for r in out.index]
    out["excluded"] = out["reasons"].map(bool)
    return out.reset_index()[["rater", "assignment_status", "excluded", "reasons"]]


# The reason a rater carries when a researcher's correction dropped their assignment (``studies.Correction``).
DROPPED_BY_CORRECTION = "dropped by correction"


def exclusion_counts(evaluated: pd.DataFrame, rules: dict) -> pd.DataFrame:
    """How many raters each rule excluded (a rater may fall under several rules), and in total: the declared
    rules, then the researcher's exclusions and the assignments a correction dropped."""
    records = []
    by_researcher = ["excluded by the researcher", DROPPED_BY_CORRECTION]
    names = [name for name in EXCLUSION_RULE_NAMES if name in rules] + by_researcher
    for name in names:
        prefix = name if name in by_researcher else f"{name}:"
        n = sum(any(r.startswith(prefix) for r in reasons) for reasons in evaluated["reasons"])
        value = rules.get(name, "") if name in rules else ""
        records.append({"rule": name, "value": json_value(value), "raters_excluded": int(n)})
    n_excluded = int(evaluated["excluded"].sum())
    records.append({"rule": "any rule (total)", "value": "", "raters_excluded": n_excluded})
    records.append({"rule": "raters kept", "value": "", "raters_excluded": len(evaluated) - n_excluded})
    return pd.DataFrame.from_records(records, columns=["rule", "value", "raters_excluded"])


def json_value(value: object) -> str:
    return "true" if value is True else "false" if value is False else str(value)


# --------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Contrast:
    """A linear combination of cell log-odds: ``weights`` maps (method, setup) -> coefficient."""

    kind: str  # "pairwise" or "interaction"
    label: str
    setup: str
    method_a: str
    method_b: str
    weights: dict[tuple[str, str], float]


def contrasts_for(methods: Sequence[str], setups: Sequence[str]) -> list[Contrast]:
    """Pairwise method comparisons within each setup (B vs A) and, for every method pair, the interaction
    contrast: how much the B-vs-A gap changes from the first setup to each other setup."""
    out = []
    for setup in setups:
        for a, b in combinations(methods, 2):
            weights = {(b, setup): 1.0, (a, setup): -1.0}
            out.append(Contrast("pairwise", f"{b} vs {a} | {setup}", setup, a, b, weights))
    for s0, s1 in ((setups[0], s) for s in setups[1:]):
        for a, b in combinations(methods, 2):
            weights = {(b, s1): 1.0, (a, s1): -1.0, (b, s0): -1.0, (a, s0): 1.0}
            label = f"({b} vs {a}) x ({s1} vs {s0})"
            out.append(Contrast("interaction", label, f"{s1} vs {s0}", a, b, weights))
    return out


def setup_order(setups: Sequence[str]) -> list[str]:
    """Setups in report order: "random" (the paper's baseline, the reference of interactions) first."""
    return sorted(set(setups), key=lambda s: (s != "random", s))


def _cells(rows: pd.DataFrame) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    methods = sorted(rows["method"].unique())
    setups = setup_order(rows["setup"].unique())
    cells = sorted({(m, s) for m, s in zip(rows["method"], rows["setup"], strict=True)})
    return methods, setups, cells


def _design(rows: pd.DataFrame, cells: list[tuple[str, str]]) -> np.ndarray:
    """Cell-means design: one indicator column per observed (method, setup) cell, no intercept."""
    index = {cell: i for i, cell in enumerate(cells)}
    X = np.zeros((len(rows), len(cells)))
    X[np.arange(len(rows)), [index[c] for c in zip(rows["method"], rows["setup"], strict=True)]] = 1.0
    return X


def _contrast_vector(contrast: Contrast, cells: list[tuple[str, str]]) -> np.ndarray | None:
    index = {cell: i for i, cell in enumerate(cells)}
    if any(cell not in index for cell in contrast.weights):
        return None
    L = np.zeros(len(cells))
    for cell, w in contrast.weights.items():
        L[index[cell]] = w
    return L


@dataclass
class Fit:
    model: str
    cells: list[tuple[str, str]]
    params: np.ndarray
    cov: np.ndarray
    note: str = ""


def fit_gee(rows: pd.DataFrame) -> Fit:
    """GEE with a cell-means logit model, exchangeable working correlation within rater, bias-reduced
    sandwich."""
    from statsmodels.genmod import families
    from statsmodels.genmod.cov_struct import Exchangeable
    from statsmodels.genmod.generalized_estimating_equations import GEE

    rows = rows.sort_values(["rater"], kind="stable")
    _, _, cells = _cells(rows)
    X = _design(rows, cells)
    groups = pd.factorize(rows["rater"], sort=True)[0]
    model = GEE(rows["correct"].to_numpy(float), X, groups=groups, family=families.Binomial(),
                cov_struct=Exchangeable())  # fmt: skip
    extra = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = model.fit(cov_type="bias_reduced", maxiter=100)
        except np.linalg.LinAlgError:
            # A cluster of leverage 1 (a condition answered by one rater) has no bias-reduced correction.
            result = model.fit(cov_type="robust", maxiter=100)
            extra.append(
                "bias-reduced covariance undefined (a condition with one rater?); robust sandwich used"
            )
    extreme = [f"{m}|{s}" for (m, s), g in rows.groupby(CELL)["correct"] if g.mean() in (0.0, 1.0)]
    if extreme:
        extra.append(
            f"cells with all answers right or all wrong (estimates unreliable): {', '.join(extreme)}"
        )
    note = "; ".join(sorted({str(w.message).splitlines()[0] for w in caught} | set(extra)))
    return Fit(GEE_MODEL, cells, np.asarray(result.params), np.asarray(result.cov_params()), note)


def fixed_effect_covariance(hessian: np.ndarray, k: int) -> np.ndarray:
    """Laplace covariance of the first ``k`` parameters (the fixed effects) given the negative Hessian of the
    log posterior of (fixed, random) effects: the fixed-effect block of its inverse. (The inverse of the
    Hessian's fixed-effect block would be the covariance given the random effects, too small.)"""
    return np.linalg.inv(hessian)[:k, :k]


def fit_mixed(rows: pd.DataFrame, *, seed: int = 0, fe_prior_sd: float = 2.0) -> Fit:
    """Logistic regression with rater and image random intercepts (statsmodels ``BinomialBayesMixedGLM``).

    The variance components come from the variational Bayes fit (``fit_vb``). The fixed effects' covariance is
    then the Laplace approximation of their posterior given those variance components: the inverse Hessian of
    the log posterior of (fixed effects, random effects) at its mode, found by Newton steps from the VB means.
    The mean-field VB standard deviations alone ignore the dependence between a condition's effect and its
    raters' random effects and are too small (anticonservative p-values); the joint mode of ``fit_map`` lets
    the variance components collapse to zero.
    """
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    _, _, cells = _cells(rows)
    X = _design(rows, cells)
    raters = pd.get_dummies(rows["rater"].astype(str), dtype=float)
    images = pd.get_dummies(rows["image"].astype(str), dtype=float)
    Z = np.hstack([raters.to_numpy(), images.to_numpy()])
    ident = np.r_[np.zeros(raters.shape[1], dtype=int), np.ones(images.shape[1], dtype=int)]
    y = rows["correct"].to_numpy(float)
    model = BinomialBayesMixedGLM(
        y, X, Z, ident, vcp_p=1.0, fe_p=fe_prior_sd,
        fep_names=[f"{m}|{s}" for m, s in cells], vcp_names=["rater", "image"],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vb = model.fit_vb(fit_method="L-BFGS-B", rng=seed)
    note = "; ".join(sorted({str(w.message).splitlines()[0] for w in caught}))
    sd = np.exp(np.asarray(vb.vcp_mean))
    k = len(cells)
    A = np.hstack([X, Z])
    precision = np.r_[np.full(k, 1 / fe_prior_sd**2), 1 / np.maximum(sd[ident], 1e-6) ** 2]
    theta = np.r_[np.asarray(vb.fe_mean), np.asarray(vb.vc_mean)]
    for _ in range(100):
        mu = 1 / (1 + np.exp(-(A @ theta)))
        grad = A.T @ (y - mu) - precision * theta
        H = A.T @ (A * (mu * (1 - mu))[:, None]) + np.diag(precision)
        step = np.linalg.solve(H, grad)
        theta = theta + step
        if np.abs(step).max() < 1e-10:
            break
    else:
        note = "; ".join(filter(None, [note, "Newton steps for the posterior mode did not converge"]))
    mu = 1 / (1 + np.exp(-(A @ theta)))
    H = A.T @ (A * (mu * (1 - mu))[:, None]) + np.diag(precision)
    cov = fixed_effect_covariance(H, k)
    note = "; ".join(filter(None, [note, f"random-intercept SD: rater {sd[0]:.3f}, image {sd[1]:.3f}"]))
    return Fit(MIXED_MODEL, cells, theta[:k], cov, note)


def _exp(x: float) -> float:
    """exp on the odds-ratio scale: NaN stays NaN, and a separated fit's huge log odds ratio or standard
    error gives inf or 0 instead of an OverflowError that would stop the report."""
    if math.isnan(x):
        return math.nan
    return math.exp(x) if x < 709 else math.inf


def contrast_table(fit: Fit, contrasts: Sequence[Contrast], confidence: float = 0.95) -> pd.DataFrame:
    """Each contrast's log odds ratio, odds ratio with interval, z and two-sided p, from one fitted model."""
    z_crit = sps.norm.ppf(0.5 + confidence / 2)
    records = []
    for c in contrasts:
        L = _contrast_vector(c, fit.cells)
        if L is None:
            estimate = se = math.nan
        else:
            estimate = float(L @ fit.params)
            se = float(math.sqrt(max(L @ fit.cov @ L, 0.0)))
        z = estimate / se if se > 0 else math.nan
        p = float(2 * sps.norm.sf(abs(z))) if not math.isnan(z) else math.nan
        records.append(
            {
                "model": fit.model,
                "kind": c.kind,
                "comparison": c.label,
                "setup": c.setup,
                "method_a": c.method_a,
                "method_b": c.method_b,
                "log_odds_ratio": estimate,
                "se": se,
                "odds_ratio": _exp(estimate),
                "or_low": _exp(estimate - z_crit * se),
                "or_high": _exp(estimate + z_crit * se),
                "z": z,
                "p": p,
            }
        )
    table = pd.DataFrame.from_records(records)
    table["p_holm"] = holm(table["p"].tolist()) if len(table) else []
    table["note"] = fit.note
    return table


def joint_interaction_test(fit: Fit, methods: Sequence[str], setups: Sequence[str]) -> dict[str, object]:
    """Wald chi-square that every method x setup interaction is zero: (M-1)(S-1) independent contrasts against
    the first method and the first setup."""
    rows_L = []
    for s in setups[1:]:
        for m in methods[1:]:
            weights = {(m, s): 1.0, (methods[0], s): -1.0, (m, setups[0]): -1.0, (methods[0], setups[0]): 1.0}
            L = _contrast_vector(Contrast("interaction", "", s, methods[0], m, weights), fit.cells)
            if L is not None:
                rows_L.append(L)
    if not rows_L:
        return {"model": fit.model, "test": "method x setup interaction (Wald)", "chi2": math.nan, "df": 0,
                "p": math.nan}  # fmt: skip
    L = np.vstack(rows_L)
    beta = L @ fit.params
    V = L @ fit.cov @ L.T
    chi2 = float(beta @ np.linalg.pinv(V) @ beta)
    df = int(np.linalg.matrix_rank(V))
    return {"model": fit.model, "test": "method x setup interaction (Wald)", "chi2": chi2, "df": df,
            "p": float(sps.chi2.sf(chi2, df))}  # fmt: skip


def crosscheck_table(rows: pd.DataFrame, contrasts: Sequence[Contrast]) -> pd.DataFrame:
    """The plain cross-check of each contrast on pooled counts: chi-square and Fisher for pairwise
    comparisons, Woolf's test of equal odds ratios across setups for interactions; Cohen's h for pairwise
    effect sizes."""
    counts = rows.groupby(CELL)["correct"].agg(["sum", "count"])
    records = []
    for c in contrasts:
        record = {"comparison": c.label, "kind": c.kind}
        if c.kind == "pairwise":
            a, b = (c.method_a, c.setup), (c.method_b, c.setup)
            if a not in counts.index or b not in counts.index:
                continue
            ka, na = (int(x) for x in counts.loc[a])
            kb, nb = (int(x) for x in counts.loc[b])
            check = two_by_two(ka, na, kb, nb)
            record |= {"model": "chi-square / Fisher (pooled, ignores clustering)", "accuracy_a": ka / na,
                       "accuracy_b": kb / nb, "cohens_h": cohens_h(ka / na, kb / nb), **check}  # fmt: skip
        else:
            s0, s1 = c.setup.split(" vs ")[1], c.setup.split(" vs ")[0]
            keys = [(c.method_a, s0), (c.method_b, s0), (c.method_a, s1), (c.method_b, s1)]
            if any(k not in counts.index for k in keys):
                continue
            (ka0, na0), (kb0, nb0), (ka1, na1), (kb1, nb1) = ((int(x) for x in counts.loc[k]) for k in keys)
            lor0, v0 = _log_odds_ratio(ka0, na0, kb0, nb0)
            lor1, v1 = _log_odds_ratio(ka1, na1, kb1, nb1)
            z = (lor1 - lor0) / math.sqrt(v0 + v1)
            record |= {"model": "Woolf test of equal odds ratios (pooled, ignores clustering)",
                       "chi2": z * z, "p_chi2": float(sps.chi2.sf(z * z, 1))}  # fmt: skip
        records.append(record)
    table = pd.DataFrame.from_records(records)
    if len(table):
        table["p_chi2_holm"] = holm(table["p_chi2"].tolist())
    return table


def significance(rows: pd.DataFrame, *, seed: int = 0, mixed: bool = True) -> dict[str, pd.DataFrame]:
    """Pairwise within-setup comparisons and the method x setup interaction, from GEE and the mixed model,
    with Holm correction across the comparisons of each model, and the plain cross-check."""
    methods, setups, _ = _cells(rows)
    contrasts = contrasts_for(methods, setups)
    fits = [fit_gee(rows)]
    if mixed:
        fits.append(fit_mixed(rows, seed=seed))
    comparisons = pd.concat([contrast_table(f, contrasts) for f in fits], ignore_index=True)
    joint = pd.DataFrame.from_records([joint_interaction_test(f, methods, setups) for f in fits])
    return {
        "comparisons": comparisons,
        "interaction": joint,
        "crosscheck": crosscheck_table(rows, contrasts),
    }


# --------------------------------------------------------------------------------------------- metrics


METRIC_KEYS = ["near_kp", "same_kp", "n_edits", "flip_rate", "cout"]


def metrics_vs_accuracy(explanations: pd.DataFrame, rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Automatic metrics of each method next to its human test accuracy, and the correlation of each metric
    with accuracy across (class pair x condition) cells.

    ``explanations``: one row per explanation with ``pair``, ``method``, ``setup`` and any of METRIC_KEYS
    (missing values are allowed and skipped).
    """
    expl = explanations.copy()
    for key in METRIC_KEYS:
        if key not in expl:
            expl[key] = np.nan
        expl[key] = pd.to_numeric(expl[key], errors="coerce")
    per_method = expl.groupby(CELL)[METRIC_KEYS].mean()
    accuracy = rows.groupby(CELL)["correct"].mean().rename("test_accuracy")
    table = per_method.join(accuracy, how="outer").reset_index()

    per_cell = expl.groupby(["pair", *CELL])[METRIC_KEYS].mean()
    acc_cell = rows.groupby(["pair", *CELL])["correct"].mean().rename("test_accuracy")
    cells = per_cell.join(acc_cell, how="inner").reset_index()
    records = []
    for key in METRIC_KEYS:
        both = cells[[key, "test_accuracy"]].dropna()
        n = len(both)
        record = {"metric": key, "n_cells": n, "spearman_rho": math.nan, "spearman_p": math.nan,
                  "pearson_r": math.nan, "pearson_p": math.nan}  # fmt: skip
        if n >= 3 and both[key].nunique() > 1 and both["test_accuracy"].nunique() > 1:
            rho, p_rho = sps.spearmanr(both[key], both["test_accuracy"])
            r, p_r = sps.pearsonr(both[key], both["test_accuracy"])
            record |= {"spearman_rho": float(rho), "spearman_p": float(p_rho), "pearson_r": float(r),
                       "pearson_p": float(p_r)}  # fmt: skip
        records.append(record)
    return {"metrics_by_condition": table, "metric_correlations": pd.DataFrame.from_records(records),
            "metrics_by_pair": cells}  # fmt: skip
