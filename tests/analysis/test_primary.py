"""Calibration of the primary test and of the models: against hand-computed cases, scipy references and
simulation (a test that checks coverage must fail when the wrong covariance is used)."""

import math
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis import power, primary, stats
from analysis.simulate import simulate_rows

PAIRWISE = stats.contrasts_for(["a", "b"], ["random"])[0]


def rater_rows(scores: dict[str, tuple[str, list[int]]], pair: int = 1) -> pd.DataFrame:
    """Test rows from {rater: (method, answers 1/0)}; image i of the pair is the i-th answer."""
    records = [
        {"rater": r, "method": m, "setup": "random", "pair": pair, "image": f"p{pair}i{i}", "correct": y}
        for r, (m, answers) in scores.items()
        for i, y in enumerate(answers)
    ]
    return pd.DataFrame(records)


def test_permutation_is_exact_on_an_enumerable_case():
    # Six raters of 10 answers with distinct accuracies 0.1 .. 0.6; method b has the top three. Of the
    # C(6, 3) = 20 relabellings only this one and its mirror reach |0.5 - 0.2| = 0.3: p = 2 / 20 = 0.1.
    scores = {f"r{k}": ("b" if k > 3 else "a", [1] * k + [0] * (10 - k)) for k in range(1, 7)}
    result = primary.permutation_test(rater_rows(scores), PAIRWISE, n_perm=5000)
    assert result == {"p_permutation": pytest.approx(0.1), "permutations": 20, "exact": True}
    # Over every possible labelling of the same six raters, P(p <= alpha) <= alpha at every alpha the exact
    # distribution can reach: the test is exact, not merely approximately valid.
    pvalues = []
    for chosen in combinations(range(1, 7), 3):
        relabelled = {f"r{k}": ("b" if k in chosen else "a", scores[f"r{k}"][1]) for k in range(1, 7)}
        pvalues.append(primary.permutation_test(rater_rows(relabelled), PAIRWISE)["p_permutation"])
    for alpha in sorted(set(pvalues)):
        assert np.mean(np.array(pvalues) <= alpha + 1e-12) <= alpha + 1e-12
    assert min(pvalues) == pytest.approx(0.1)


def test_monte_carlo_permutation_agrees_with_exact_enumeration():
    rng = np.random.default_rng(4)
    scores = {f"r{k}": ("b" if k % 2 else "a", list(rng.integers(0, 2, 12))) for k in range(16)}
    rows = rater_rows(scores)
    exact = primary.permutation_test(rows, PAIRWISE, n_perm=20000)  # C(16, 8) = 12870 <= 20000
    sampled = primary.permutation_test(rows, PAIRWISE, n_perm=4000, seed=1)
    assert exact["exact"] and exact["permutations"] == 12870 and not sampled["exact"]
    assert sampled["p_permutation"] == pytest.approx(exact["p_permutation"], abs=0.03)


def test_within_subject_permutation_swaps_labels_inside_each_rater_only():
    # Four raters each saw a under one pair and b under another: 2^4 = 16 relabellings (swap or not per
    # rater). Every rater did better under b by 0.2, so the observed difference is the largest: p = 2/16.
    rows = []
    for r in range(4):
        for method, pair, k in (("a", 1, 5 + r), ("b", 2, 7 + r)):
            answers = [1] * k + [0] * (10 - k)
            rows.append(rater_rows({f"r{r}": (method, answers)}, pair=pair))
    result = primary.permutation_test(pd.concat(rows), PAIRWISE, design="within")
    assert result == {"p_permutation": pytest.approx(2 / 16), "permutations": 16, "exact": True}


def test_min_f_is_clarks_min_f_prime_against_scipy():
    # Balanced between-subjects study: every rater answers the same 10 images of one pair, so the by-rater
    # and by-image estimates coincide and t^2 must equal F1 F2 / (F1 + F2), with F1 = Welch's t^2 over the
    # raters' accuracies and F2 = the paired t^2 over the images' accuracies in the two conditions.
    rng = np.random.default_rng(0)
    scores = {f"r{k}": ("b" if k % 2 else "a", list(rng.integers(0, 2, 10))) for k in range(14)}
    rows = rater_rows(scores)
    result = primary.min_f_test(rows, PAIRWISE.weights, unit="images")
    by_rater = rows.groupby(["rater", "method"])["correct"].mean().reset_index()
    b_raters = by_rater.loc[by_rater.method == "b", "correct"]
    a_raters = by_rater.loc[by_rater.method == "a", "correct"]
    f1 = sps.ttest_ind(b_raters, a_raters, equal_var=False).statistic ** 2
    by_image = rows.groupby(["image", "method"])["correct"].mean().unstack()
    f2 = sps.ttest_rel(by_image["b"], by_image["a"]).statistic ** 2
    assert result["t"] ** 2 == pytest.approx(f1 * f2 / (f1 + f2), rel=1e-9)
    assert result["estimate"] == pytest.approx(by_image["b"].mean() - by_image["a"].mean())
    # Welch's standard error for the raters, the paired one for the images.
    means = by_rater.groupby("method")["correct"]
    assert result["se_rater"] ** 2 == pytest.approx((means.var() / means.count()).sum())
    assert result["se_stimulus"] ** 2 == pytest.approx((by_image["b"] - by_image["a"]).var() / 10)
    assert result["ci_low"] < result["estimate"] < result["ci_high"]


def test_min_f_degrees_of_freedom_are_capped_at_twice_the_smaller_part():
    # 3 class pairs: the by-pair part has 2 df. Satterthwaite's formula gives more when the by-pair variance
    # comes out small; the cap (bench/bench_analysis_sim.py: 9-10% false positives without it) keeps df <= 4.
    null = {("a", "random"): 0.75, ("b", "random"): 0.75}
    simulated = simulate_rows(
        null, raters_per_condition=40, pairs_per_rater=2, n_pairs=3, rater_sd=0.6, seed=11
    )
    rows = stats.analysed_test_rows(simulated)
    result = primary.min_f_test(rows, PAIRWISE.weights, unit="pairs")
    v_rater, v_stim = result["se_rater"] ** 2, result["se_stimulus"] ** 2
    satterthwaite = (v_rater + v_stim) ** 2 / (v_rater**2 / 78 + v_stim**2 / 2)
    assert satterthwaite > 4 and result["df"] == pytest.approx(2 * 2)
    assert result["p_min_f"] == pytest.approx(2 * sps.t.sf(abs(result["t"]), 4))


def test_min_f_needs_two_stimuli_per_cell():
    scores = {f"r{k}": ("b" if k % 2 else "a", [1, 0, 1]) for k in range(6)}
    assert math.isnan(primary.min_f_test(rater_rows(scores), PAIRWISE.weights, unit="pairs")["p_min_f"])
    # Then the primary p is undefined and nothing is significant, though the permutation p is defined.
    table = primary.primary_tests(rater_rows(scores), contrasts=[PAIRWISE])
    assert table["p_permutation"].notna().all() and table["p"].isna().all() and not table["significant"].any()
    with pytest.raises(ValueError, match="unit='raters'"):
        primary.min_f_test(rater_rows(scores), PAIRWISE.weights, unit="raters")


def test_the_primary_p_is_undefined_when_the_permutation_half_is(monkeypatch):
    # A min F' p of 0.001 alone is no primary result: both halves must be defined (max(0.001, nan) is 0.001).
    rng = np.random.default_rng(1)
    rows = pd.concat(
        rater_rows(
            {f"r{k}{pair}": ("b" if k % 2 else "a", list(rng.integers(0, 2, 8))) for k in range(8)}, pair
        )
        for pair in range(4)
    )
    monkeypatch.setattr(primary, "min_f_test", lambda *a, **k: {"p_min_f": 0.001, "estimate": 0.3})
    monkeypatch.setattr(primary, "permutation_test", lambda *a, **k: {"p_permutation": math.nan})
    table = primary.primary_tests(rows, contrasts=[PAIRWISE])
    assert table["p"].isna().all() and not table["significant"].any()


@pytest.mark.parametrize("raters", [3, 10])
def test_primary_false_positive_rate_with_items_that_teach_differently(raters):
    # The case: two equal methods whose stimuli teach some images better (item x condition SD 1.0)
    # and some pairs better (pair x condition SD 0.5). A rater-only model rejects far above alpha; the
    # primary test stays at or below it.
    null = {("a", "random"): 0.75, ("b", "random"): 0.75}
    rejected, rater_only = 0, 0
    n = 60
    for seed in range(n):
        simulated = simulate_rows(
            null,
            raters_per_condition=raters,
            pairs_per_rater=2,
            n_pairs=6,
            rater_sd=0.3,
            item_condition_sd=1.0,
            pair_condition_sd=0.5,
            seed=seed,
        )
        rows = stats.analysed_test_rows(simulated)
        table = primary.primary_tests(rows, n_perm=200, seed=seed)
        rejected += bool(table["p"].iloc[0] < 0.05)
        rater_only += bool(table["p_permutation"].iloc[0] < 0.05)
    assert rejected / n <= 0.07 + 1.645 * math.sqrt(0.07 * 0.93 / n)
    if raters == 10:
        assert rater_only / n >= 0.12  # the stimuli-as-fixed test is fooled by the same data (alpha 0.05)


def test_primary_detects_a_large_effect_with_enough_raters_and_pairs():
    truth = {("a", "random"): 0.6, ("b", "random"): 0.9}
    simulated = simulate_rows(
        truth, raters_per_condition=20, pairs_per_rater=2, n_pairs=10, rater_sd=0.3, seed=3
    )
    rows = stats.analysed_test_rows(simulated)
    table = primary.primary_tests(rows, n_perm=500)
    assert bool(table["significant"].iloc[0]) and table["estimate"].iloc[0] > 0.15
    assert table["generalises_over"].iloc[0] == primary.GENERALISES["pairs"]


def test_woolf_crosscheck_by_hand():
    # Setup s0: a 6/10, b 9/10 -> log OR = log(9 * 4 / (1 * 6)) = 1.791759,
    #   Woolf variance 1/9 + 1/1 + 1/6 + 1/4 = 1.527778.
    # Setup s1: a 8/10, b 5/10 -> log OR = log(5 * 2 / (5 * 8)) = -1.386294,
    #   Woolf variance 1/5 + 1/5 + 1/8 + 1/2 = 1.025.
    # z = (-1.386294 - 1.791759) / sqrt(2.552778) = -1.989091; chi2 = 3.956485, p = 0.046691.
    records = []
    for setup, counts in (("s0", {"a": 6, "b": 9}), ("s1", {"a": 8, "b": 5})):
        for method, k in counts.items():
            for i in range(10):
                records.append({"method": method, "setup": setup, "correct": int(i < k), "rater": f"r{i}"})
    table = stats.crosscheck_table(pd.DataFrame(records), stats.contrasts_for(["a", "b"], ["s0", "s1"]))
    woolf = table.set_index("comparison").loc["(b vs a) x (s1 vs s0)"]
    assert woolf["chi2"] == pytest.approx(3.956485, abs=1e-5)
    assert woolf["p_chi2"] == pytest.approx(0.046691, abs=1e-5)


def _mixed_calibration(n_studies: int = 36) -> tuple[float, float]:
    """Mean model SE over the SD of the estimates, and 95% interval coverage, of b - a from fit_mixed."""
    truth = {("a", "random"): 0.7, ("b", "random"): 0.7}
    estimates, ses = [], []
    for seed in range(n_studies):
        simulated = simulate_rows(truth, raters_per_condition=6, pairs_per_rater=1, tests_per_pair=16,
                                  n_pairs=1, rater_sd=1.0, seed=100 + seed)  # fmt: skip
        rows = stats.analysed_test_rows(simulated)
        fit = stats.fit_mixed(rows, seed=seed)
        L = np.array([-1.0, 1.0])
        estimates.append(float(L @ fit.params))
        ses.append(float(math.sqrt(L @ fit.cov @ L)))
    estimates, ses = np.array(estimates), np.array(ses)
    coverage = float(np.mean(np.abs(estimates) <= 1.96 * ses))
    return float(ses.mean() / estimates.std(ddof=1)), coverage


def test_mixed_model_standard_errors_match_simulation_and_the_wrong_block_fails(monkeypatch):
    ratio, coverage = _mixed_calibration()
    assert 0.75 < ratio < 1.4 and coverage >= 0.85, (ratio, coverage)
    # The covariance given the random effects (inverse of the fixed-effect block of the Hessian) ignores the
    # raters' variance: the same check must reject it.
    monkeypatch.setattr(stats, "fixed_effect_covariance", lambda H, k: np.linalg.inv(H[:k, :k]))
    ratio, coverage = _mixed_calibration()
    assert not (0.75 < ratio < 1.4 and coverage >= 0.85), (ratio, coverage)


def test_power_plans_raters_and_pairs_together():
    base = dict(p1=0.70, p2=0.82, trials_per_pair=10, pairs_per_rater=2, rater_sd=0.6, pair_sd=0.3)
    few_pairs = power.primary_power(raters=40, pairs=3, **base)
    many_pairs = power.primary_power(raters=40, pairs=40, **base)
    assert few_pairs < many_pairs  # more raters cannot make up for too few pairs
    assert power.primary_power(raters=10, pairs=40, **base) < many_pairs
    plan = power.primary_plan(target=0.8, **base)
    assert set(plan.columns) >= {"raters_per_condition", "pairs", "power"}
    assert (plan["power"] >= 0.8).all()
    cheapest = plan.sort_values(["raters_per_condition", "pairs"]).iloc[0]
    assert power.primary_power(raters=int(cheapest.raters_per_condition) - 1, pairs=int(cheapest.pairs),
                               **base) < 0.8  # fmt: skip


def test_a_headline_without_an_estimate_says_so_instead_of_printing_nan():
    from analysis.report import _headline

    nan = float("nan")
    row = {
        "comparison": "cve vs scout (random)", "kind": "pairwise", "method_a": "cve", "method_b": "scout",
        "setup": "random", "estimate": nan, "ci_low": nan, "ci_high": nan, "p": nan, "p_adjusted": nan,
        "significant": False, "generalises_over": "raters and stimuli",
    }  # fmt: skip
    accuracy = pd.DataFrame([{"method": "cve", "setup": "random", "accuracy": 0.5}])
    plan = {"headline": "", "correction": "holm", "alpha": 0.05}
    text, chosen_after = _headline(pd.DataFrame([row]), plan, accuracy)
    assert "nan" not in text.lower() and "not estimable" in text and "could not be computed" in text
    assert "scout not measured" not in text and "not measured with scout" in text and chosen_after
    row.update(estimate=0.12, ci_low=0.02, ci_high=0.22, p=0.01, p_adjusted=0.03, significant=True)
    text, _ = _headline(pd.DataFrame([row]), plan, accuracy)
    assert "+12.0 points (95% CI +2.0 to +22.0, min F', unadjusted)" in text
    assert "significant at alpha 0.05" in text
    # The primary p names its two halves, so an interval excluding 0 beside "not significant" is explained.
    row.update(p_min_f=0.004, p_permutation=0.1, p=0.1, p_adjusted=0.6, significant=False)
    text, _ = _headline(pd.DataFrame([row]), plan, accuracy)
    assert "p = 0.1 (the larger of the min F' p 0.004 and the rater-permutation p 0.1)" in text
    assert "not significant at alpha 0.05" in text
