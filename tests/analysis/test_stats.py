"""The statistics against numbers computed by hand (worked in the comments) and against plain reference
code."""

import math

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from analysis import power, stats
from analysis.simulate import simulate_rows


def tidy(records: list[tuple]) -> pd.DataFrame:
    """Tidy rows from (rater, method, setup, phase, answer, correct_answer[, is_catch, rt])."""
    rows = []
    for i, rec in enumerate(records):
        rater, method, setup, phase, answer, truth = rec[:6]
        is_catch = rec[6] if len(rec) > 6 else False
        rt = rec[7] if len(rec) > 7 else 1000
        rows.append(
            {
                "rater": rater,
                "method": method,
                "setup": setup,
                "phase": phase,
                "answer": answer,
                "correct_answer": truth,
                "correct": int(answer == truth),
                "is_catch": is_catch,
                "excluded": False,
                "pair": 1,
                "image": f"img{i % 10}",
                "client_rt_ms": rt,
                "server_rt_ms": rt + 20,
            }  # fmt: skip
        )
    return pd.DataFrame(rows)


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.959964: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.99207 / 1.38415 = 0.716736;
    # half width z * sqrt(0.8 * 0.2 / 10 + z^2 / 400) / 1.38415 = 1.959964 * 0.160012 / 1.38415 = 0.226578.
    lo, hi = stats.wilson_interval(8, 10)
    assert lo == pytest.approx(0.716736 - 0.226578, abs=1e-5)
    assert hi == pytest.approx(0.716736 + 0.226578, abs=1e-5)
    assert stats.wilson_interval(0, 5)[0] == 0.0 and stats.wilson_interval(5, 5)[1] == 1.0


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError, match="k=11, n=10"):
        stats.wilson_interval(11, 10)


def test_holm_by_hand_and_against_statsmodels():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, max(0.06, 1 * 0.04) = 0.06
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    rng = np.random.default_rng(7)
    for _ in range(20):
        p = rng.random(rng.integers(1, 12)) ** 3
        assert stats.holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist())
    assert math.isnan(stats.holm([0.02, math.nan])[1]) and stats.holm([0.02, math.nan])[0] == 0.02


def test_cohens_h_by_hand():
    # 2 asin(sqrt 0.8) - 2 asin(sqrt 0.5) = 2 * 1.107149 - 2 * 0.785398
    assert stats.cohens_h(0.5, 0.8) == pytest.approx(0.643501, abs=1e-6)
    assert stats.cohens_h(0.8, 0.5) == pytest.approx(-0.643501, abs=1e-6)


def test_two_by_two_by_hand():
    # 6/10 vs 9/10: expected 7.5 and 2.5 per row; chi2 = 2 * 1.5^2 / 7.5 + 2 * 1.5^2 / 2.5 = 2.4.
    # Fisher: P(x) = C(15, x) C(5, 10 - x) / C(20, 10); tables as or less likely than x = 6 (25025) are
    # x = 5, 6, 9, 10: (3003 + 25025 + 25025 + 3003) / 184756.
    check = stats.two_by_two(6, 10, 9, 10)
    assert check["chi2"] == pytest.approx(2.4)
    assert check["p_chi2"] == pytest.approx(0.121335, abs=1e-6)
    assert check["p_fisher"] == pytest.approx(56056 / 184756)


def test_cluster_bootstrap_against_a_plain_loop():
    rng = np.random.default_rng(3)
    raters = np.repeat(np.arange(30), rng.integers(3, 12, size=30))
    ability = rng.random(30)
    correct = (rng.random(len(raters)) < ability[raters]).astype(int)
    lo, hi = stats.cluster_bootstrap_interval(correct, raters, n_boot=4000, seed=1)

    frame = pd.DataFrame({"r": raters, "y": correct})
    by_rater = [g["y"].to_numpy() for _, g in frame.groupby("r")]
    loop_rng = np.random.default_rng(99)
    estimates = []
    for _ in range(4000):
        picked = [by_rater[i] for i in loop_rng.integers(0, 30, size=30)]
        estimates.append(np.concatenate(picked).mean())
    ref_lo, ref_hi = np.quantile(estimates, [0.025, 0.975])
    assert lo == pytest.approx(ref_lo, abs=0.015) and hi == pytest.approx(ref_hi, abs=0.015)
    # Clustering widens the interval relative to Wilson's, which treats the answers as independent.
    w_lo, w_hi = stats.wilson_interval(int(correct.sum()), len(correct))
    assert hi - lo > w_hi - w_lo


def test_cluster_bootstrap_of_identical_raters_collapses():
    correct = [1, 1, 0, 1] * 5  # five raters, each 3 of 4 correct
    clusters = np.repeat(np.arange(5), 4)
    assert stats.cluster_bootstrap_interval(correct, clusters, n_boot=200) == pytest.approx((0.75, 0.75))


# A hand-computed study: two methods in one setup, two raters each, plus a semantic setup for method "m".
HAND = [
    *[("r1", "m", "random", "test", a, "A") for a in "AAAB"],  # 3/4
    *[("r2", "m", "random", "test", a, "A") for a in "AABB"],  # 2/4
    *[("r3", "n", "random", "test", a, "B") for a in "BBBB"],  # 4/4
    *[("r4", "n", "random", "test", a, "B") for a in "BBBA"],  # 3/4
    *[("r1", "m", "random", "pre", a, "A") for a in "DDAB"],  # 1/4 correct, 2 don't know
    *[("r2", "m", "random", "pre", a, "A") for a in "DDDD"],  # 0/4, 4 don't know
]


def test_accuracy_dont_know_and_gain_by_hand():
    rows = tidy(HAND)
    acc = stats.accuracy_table(stats.analysed_test_rows(rows), n_boot=500).set_index("method")
    assert acc.loc["m", "accuracy"] == 5 / 8 and acc.loc["n", "accuracy"] == 7 / 8
    assert acc.loc["m", "n_raters"] == 2 and acc.loc["m", "n_responses"] == 8
    # Rater bootstrap of m: both raters -> 5/8, r1 twice -> 6/8, r2 twice -> 4/8.
    assert {acc.loc["m", "bootstrap_low"], acc.loc["m", "bootstrap_high"]} <= {4 / 8, 5 / 8, 6 / 8}
    assert acc.loc["m", "wilson_low"] == pytest.approx(stats.wilson_interval(5, 8)[0])

    dk = stats.dont_know_table(rows).set_index("method")
    assert dk.loc["m", "dont_know_rate"] == 6 / 8 and dk.loc["m", "n_dont_know"] == 6

    gain = stats.learning_gain_table(rows, n_boot=500).set_index("method")
    assert gain.loc["m", "pre_accuracy"] == 1 / 8
    assert gain.loc["m", "gain"] == pytest.approx(5 / 8 - 1 / 8)
    assert gain.loc["m", ["gain_bootstrap_low", "gain_bootstrap_high"]].notna().all()
    # Below the minimum number of raters neither rater bootstrap is shown (2 raters: 3 distinct resamples).
    few = stats.learning_gain_table(rows, n_boot=500, min_bootstrap_raters=3)
    assert few["gain_bootstrap_low"].isna().all() and few["gain_bootstrap_high"].isna().all()
    assert few.set_index("method").loc["m", "gain"] == gain.loc["m", "gain"]
    acc_few = stats.accuracy_table(stats.analysed_test_rows(rows), n_boot=500, min_bootstrap_raters=3)
    assert acc_few["bootstrap_low"].isna().all() and acc_few["wilson_low"].notna().all()


def test_gee_with_one_answer_per_rater_is_the_pooled_odds_ratio():
    # 6/10 correct with method a, 9/10 with b, every answer from its own rater. The cell-means GEE gives the
    # logits of the pooled proportions: log OR = log(9/1) - log(6/4) = 1.791759. The sandwich variance is
    # Woolf's 1/6 + 1/4 + 1/9 + 1/1 = 1.527778; the bias reduction divides each residual by 1 - 1/10
    # (the leverage of one of ten answers in its cell), so the variance is 1.527778 * (10/9)^2 = 1.886145.
    records = [(f"a{i}", "a", "random", "test", "A" if i < 6 else "B", "A") for i in range(10)]
    records += [(f"b{i}", "b", "random", "test", "A" if i < 9 else "B", "A") for i in range(10)]
    rows = stats.analysed_test_rows(tidy(records))
    fit = stats.fit_gee(rows)
    table = stats.contrast_table(fit, stats.contrasts_for(["a", "b"], ["random"]))
    assert table.loc[0, "log_odds_ratio"] == pytest.approx(1.791759, abs=1e-5)
    assert table.loc[0, "odds_ratio"] == pytest.approx(6.0, abs=1e-4)
    assert table.loc[0, "se"] ** 2 == pytest.approx(1.886145, rel=1e-3)
    assert table.loc[0, "model"] == stats.GEE_MODEL


def test_contrasts_name_pairwise_and_interaction_comparisons():
    contrasts = stats.contrasts_for(["a", "b", "c"], ["random", "consistent"])
    kinds = [c.kind for c in contrasts]
    assert kinds.count("pairwise") == 6 and kinds.count("interaction") == 3
    inter = next(c for c in contrasts if c.kind == "interaction" and c.method_b == "c" and c.method_a == "a")
    assert inter.weights == {
        ("c", "consistent"): 1,
        ("a", "consistent"): -1,
        ("c", "random"): -1,
        ("a", "random"): 1,
    }


def test_models_recover_a_known_interaction():
    truth = {
        ("a", "random"): 0.75,
        ("b", "random"): 0.75,
        ("a", "consistent"): 0.6,
        ("b", "consistent"): 0.85,
    }
    rows = stats.analysed_test_rows(
        simulate_rows(truth, raters_per_condition=25, pairs_per_rater=2, rater_sd=0.5, image_sd=0.2, seed=11)
    )
    result = stats.significance(rows)
    comp = result["comparisons"].set_index(["model", "comparison"])
    for model in (stats.GEE_MODEL, stats.MIXED_MODEL):
        assert comp.loc[(model, "b vs a | consistent"), "p_holm"] < 0.01
        assert comp.loc[(model, "b vs a | random"), "p"] > 0.01
        assert comp.loc[(model, "(b vs a) x (consistent vs random)"), "odds_ratio"] > 1.5
    # Holm never lowers a p-value; the joint interaction test has one degree of freedom with two methods.
    assert (result["comparisons"]["p_holm"] >= result["comparisons"]["p"] - 1e-12).all()
    assert set(result["interaction"]["df"]) == {1} and (result["interaction"]["p"] < 0.01).all()
    cross = result["crosscheck"].set_index("comparison")
    assert cross.loc["b vs a | consistent", "p_fisher"] < 0.01
    semantic = cross.loc["b vs a | consistent"]
    assert semantic["cohens_h"] == pytest.approx(
        stats.cohens_h(semantic["accuracy_a"], semantic["accuracy_b"])
    )


def test_exclusions_by_rule():
    records = [
        ("ok", "m", "random", "test", "A", "A", False, 900),
        ("ok", "m", "random", "test", "A", "A", True, 900),  # catch passed
        ("fast", "m", "random", "test", "A", "A", False, 150),
        ("fast", "m", "random", "test", "B", "A", False, 250),
        ("catchy", "m", "random", "test", "B", "A", True, 800),  # catch failed
        ("catchy", "m", "random", "pre", "D", "A", True, 800),  # catch failed ("don't know" is not right)
    ]
    rows = tidy(records)
    raters = pd.DataFrame(
        {"rater": ["ok", "fast", "catchy", "quit", "banned"],
         "assignment_status": ["completed", "completed", "completed", "returned", "excluded"]}
    )  # fmt: skip
    rules = {"failed_catch_trials": 2, "median_rt_below_ms": 300, "incomplete": True}
    out = stats.exclusions_evaluate(raters, rows, rules).set_index("rater")
    assert not out.loc["ok", "excluded"]
    assert out.loc["fast", "reasons"] == ["median_rt_below_ms: median 200 ms (floor 300 ms)"]
    assert out.loc["catchy", "reasons"] == ["failed_catch_trials: 2 failed (limit 2)"]
    assert out.loc["quit", "reasons"] == ["incomplete: assignment returned"]
    assert out.loc["banned", "reasons"] == ["excluded by the researcher"]
    counts = stats.exclusion_counts(out.reset_index(), rules).set_index("rule")["raters_excluded"]
    assert counts.to_dict() == {
        "failed_catch_trials": 1,
        "median_rt_below_ms": 1,
        "incomplete": 1,
        "excluded by the researcher": 1,
        "dropped by correction": 0,
        "any rule (total)": 4,
        "raters kept": 1,
    }
    # A higher limit keeps the rater with two failed catch trials.
    assert (
        not stats.exclusions_evaluate(raters, rows, {"failed_catch_trials": 3})
        .set_index("rater")
        .loc["catchy", "excluded"]
    )
    with pytest.raises(ValueError, match="unknown exclusion rules \\['speed'\\]"):
        stats.exclusions_evaluate(raters, rows, {"speed": 1})


def test_power_by_hand():
    # p1 = 0.65, p2 = 0.80: pbar = 0.725, sqrt(2 * 0.725 * 0.275) = 0.631467, sqrt(0.2275 + 0.16) = 0.622495;
    # n = (1.959964 * 0.631467 + 0.841621 * 0.622495)^2 / 0.15^2 = 1.761557^2 / 0.0225 = 137.915 responses;
    # design effect 1 + 9 * 0.1 = 1.9 -> 262.04 responses -> 26.2 raters of 10 trials -> 27.
    assert power.responses_per_condition(0.65, 0.80) == pytest.approx(137.915, abs=0.01)
    assert power.design_effect(10, 0.1) == pytest.approx(1.9)
    n = power.raters_per_condition(0.65, 0.80, trials_per_rater=10, icc=0.1)
    assert n == 27
    assert power.power_of(0.65, 0.80, raters=n, trials_per_rater=10, icc=0.1) >= 0.8
    assert power.power_of(0.65, 0.80, raters=n - 1, trials_per_rater=10, icc=0.1) < 0.8
    with pytest.raises(ValueError, match="p2=1.2"):
        power.raters_per_condition(0.6, 1.2, trials_per_rater=10, icc=0.1)
    with pytest.raises(ValueError, match="no difference"):
        power.raters_per_condition(0.7, 0.7, trials_per_rater=10, icc=0.1)


def test_icc_anova_by_hand_and_on_simulated_raters():
    # Two raters of 4 answers: 4/4 and 0/4. p = 0.5; MSB = 4 * 0.25 * 2 / 1 = 2; MSW = 0; ICC = 1.
    assert power.icc_anova([1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 2, 2, 2, 2]) == pytest.approx(1.0)
    # Same proportions within raters: MSB = 0 -> clipped to 0.
    assert power.icc_anova([1, 0, 1, 0], [1, 1, 2, 2]) == 0.0
    from analysis.simulate import latent_icc

    rows = simulate_rows({("a", "random"): 0.7}, raters_per_condition=400, rater_sd=1.0, seed=5)
    test = rows[rows["phase"] == "test"]
    assert power.icc_anova(test["correct"], test["rater"]) == pytest.approx(latent_icc(0.7, 1.0), abs=0.03)


def test_metrics_correlate_with_accuracy_across_pairs():
    rng = np.random.default_rng(0)
    cells = [(pair, m, "random") for pair in range(6) for m in ("a", "b")]
    explanations, rows = [], []
    for pair, method, setup in cells:
        same_kp = rng.random()
        for _ in range(3):
            explanations.append({"pair": pair, "method": method, "setup": setup, "same_kp": same_kp,
                                 "near_kp": rng.random(), "flip_rate": 1.0})  # fmt: skip
        accuracy = 0.5 + 0.4 * same_kp
        for i in range(200):
            rows.append({"pair": pair, "method": method, "setup": setup, "correct": int(i < 200 * accuracy)})
    result = stats.metrics_vs_accuracy(pd.DataFrame(explanations), pd.DataFrame(rows))
    corr = result["metric_correlations"].set_index("metric")
    assert corr.loc["same_kp", "spearman_rho"] > 0.95 and corr.loc["same_kp", "n_cells"] == 12
    assert abs(corr.loc["near_kp", "pearson_r"]) < corr.loc["same_kp", "pearson_r"]
    assert math.isnan(corr.loc["cout", "spearman_rho"])  # missing metric: no correlation, no error
    assert math.isnan(corr.loc["flip_rate", "spearman_rho"])  # constant metric
    assert set(result["metrics_by_condition"]["method"]) == {"a", "b"}


def test_a_separated_fit_gives_infinite_odds_ratios_not_an_overflow():
    # Complete separation drives a GEE's log odds and standard errors to hundreds: math.exp overflowed and
    # stopped the whole report. The table shows inf (and 0) instead, with the p-value of the Wald test.
    contrast = stats.contrasts_for(["a", "b"], ["random"])[0]
    fit = stats.Fit("GEE", [("a", "random"), ("b", "random")], np.array([0.0, 40.0]), np.diag([1.0, 1e6]))
    row = stats.contrast_table(fit, [contrast]).iloc[0]
    assert row["odds_ratio"] == pytest.approx(math.exp(40)) and row["or_high"] == math.inf
    assert row["or_low"] == 0.0 and 0 < row["p"] < 1
