"""The study report: every table of the analysis, its figures, an HTML page, a PDF, and CSV files.

``report_build`` reads a study through the selectors and runs the pure statistics; ``report_html``,
``report_pdf`` and ``report_write`` render the result. Everything random is seeded from the study's seed (or
the one given), figures carry no time stamps and the PDF no creation date, so the same data and code give the
same files byte for byte.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from django.conf import settings
from django.template.loader import render_to_string

from explain.models import Explanation, Image
from studies.models import Study
from studies.preregistration import plan_deviations, plan_document, plan_resolve

from . import figures, power, primary, selectors, stats
from .stimulus_quality import stimulus_quality, stimulus_quality_table

PDF_TITLE = "Foil analysis report"
MIN_BOOTSTRAP_RATERS = 10  # fewer raters in a cell: no rater-bootstrap interval (too few distinct resamples)
SMALL_CELL_RATERS = 10  # fewer raters in a cell: flagged on the first page with the power the design has
FLAG_DIFFERENCE = 0.10  # the accuracy difference whose power the small-study warning states

# Table name -> caption: what it shows and which model each number comes from. In report order.
CAPTIONS = {
    "table5": (
        "Table 5 of Vandenhende et al. (2022), section 4.4: test accuracy per method (rows) and "
        "pair-selection "
        "setup (columns) as 'accuracy % [95% interval] (raters)'. The interval is Wilson's on the effective "
        "number of answers n / DE, with Kish's design effect DE = 1 + (m - 1) ICC (m answers per rater, the "
        "ICC of the power_assumptions table): one rater's answers are not independent. Raw proportions, no "
        "model."
    ),
    "primary": (
        "PRIMARY (pre-registered). Each contrast's accuracy difference (B - A; interactions: the change of "
        "B - A "
        "from the first setup) with its 95% min F' interval, and the primary p: the larger of the min F' p "
        "(raters and stimuli random) and the rater permutation p (exact when 'exact'), adjusted across the "
        "primary contrasts as pre-registered. 'generalises_over' says what a significant result claims."
    ),
    "small_cells": (
        f"Conditions with fewer than {SMALL_CELL_RATERS} raters, and the power the primary test has to "
        "detect a "
        f"{FLAG_DIFFERENCE * 100:.0f}-point accuracy difference between two such conditions with these "
        "raters "
        "and the study's class pairs (analysis.power.primary_power)."
    ),
    "accuracy": (
        "Test accuracy per method x setup with three 95% intervals: Wilson (answers as independent; too "
        "narrow when raters differ), Wilson on the effective number of answers (design effect), and the "
        f"percentile bootstrap over raters, shown only for cells of at least {MIN_BOOTSTRAP_RATERS} raters."
    ),
    "accuracy_by_pair": (
        "Test accuracy per class pair, method and setup, with the same intervals (secondary, descriptive)."
    ),
    "dont_know": (
        "Pre-learning 'don't know' rate per method x setup, with Wilson intervals (answers as independent)."
    ),
    "learning_gain": (
        "Pre-learning accuracy ('don't know' counts as wrong), test accuracy and the gain, with a rater-"
        f"bootstrap interval of the gain, shown only for cells of at least {MIN_BOOTSTRAP_RATERS} raters "
        "(secondary, descriptive)."
    ),
    "comparisons": (
        "SECONDARY. Pairwise method comparisons within each setup and method-pair x setup interaction "
        "contrasts as odds ratios (B vs A). The 'model' column says which model each row comes from: GEE "
        "(binomial, exchangeable within rater, bias-reduced sandwich; normal reference, stimuli fixed: "
        "anticonservative with few raters or stimuli that vary); Bayesian mixed GLM (rater + image random "
        "intercepts; VB variance components, Laplace). p_holm is Holm-corrected within each model."
    ),
    "interaction": (
        "SECONDARY. Joint Wald test that the method x setup interaction is zero, per model (same caveats)."
    ),
    "crosscheck": (
        "SECONDARY. Plain cross-check on pooled counts that ignores clustering (anticonservative when raters "
        "differ): Pearson chi-square and Fisher exact for pairwise comparisons, Woolf's test for "
        "interactions; Cohen's h from the raw accuracies."
    ),
    "exclusions": (
        "Raters excluded by each rule declared before launch (a rater may fall under several rules)."
    ),
    "excluded_raters": ("Every excluded rater (opaque id) and the reasons."),
    "corrections": (
        "Researchers' corrections of the collected data (who, when, why), applied by this analysis; the data "
        "themselves are kept as collected."
    ),
    "audit_log": (
        "Every change researchers made to the study, its conditions, pairs, exclusions and launch state, "
        "including any unblinding of accuracy before the study closed."
    ),
    # Stimulus quality (issue 15; analysis.stimulus_quality): a block of its own.
    "stimulus_quality": (
        "Stimulus quality beside human accuracy, per method x setup: flip rate, COUT, L1, the region area "
        "(mean and quartiles), NFE, and the quality card of every backbone the stimuli were made with. A "
        "weak backbone the study accepted is named with the study's reason (quality_override): a method may "
        "have lost because its backbone was weak, not because it teaches badly."
    ),
    "raters": ("Raters per condition kept in the analysis, people and simulated."),
    "power": (
        "SECONDARY. Raters per condition a pooled two-proportion test would need for 80% power to detect the "
        "observed difference, and its power now (normal approximation x design effect; raters only, pairs "
        "fixed). For planning the primary test use power_plan."
    ),
    "power_assumptions": (
        "Intraclass correlation (one-way ANOVA estimate, within rater x condition), mean test trials per "
        "rater and condition, design effect, alpha and target power used by the power tables."
    ),
    "power_plan": (
        "Raters per condition and class pairs planned together for the primary test to reach 80% power for "
        "the largest observed difference between two methods of a setup (analysis.power.primary_plan; rater "
        "ability SD 0.6 and pair x condition SD 0.3 on the logit scale assumed)."
    ),
    "metrics_by_condition": (
        "Mean automatic metrics of each method x setup next to its human test accuracy."
    ),
    "metric_correlations": (
        "Correlation of each automatic metric with human test accuracy across class pair x condition "
        "cells (Spearman and Pearson): which metric predicts teaching (secondary)."
    ),
    "metrics_by_pair": (
        "Automatic metrics and human test accuracy per class pair x condition (the cells correlated above)."
    ),
    "provenance_conditions": (
        "Provenance: each condition's method, variant and every setting, read from the configs stored with "
        "its explanations (one row per distinct config)."
    ),
    "provenance_models": (
        "Provenance: the classifier and the backbones the explanations name, with the SHA-256 of their "
        "weights as found on this machine (empty: file absent) and their quality cards."
    ),
    "provenance_images": (
        "Provenance: image ids per class pair in pre-learning, test and as learning queries, and their "
        "overlaps (pre-learning and test show the same images, as in the paper; learning images should not "
        "be test images)."
    ),
    "model_notes": ("Warnings from the model fits, if any."),
}
APPENDIX = ("provenance_conditions", "provenance_models", "provenance_images", "model_notes")


def software_version() -> str:
    """``git describe`` of the checkout when there is one, else the version in pyproject.toml."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=settings.BASE_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return f"foil {out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        with open(Path(settings.BASE_DIR) / "pyproject.toml", "rb") as f:
            return f"foil {tomllib.load(f)['project']['version']}"


def library_versions() -> str:
    names = ["statsmodels", "scipy", "numpy", "pandas", "matplotlib", "reportlab"]
    return ", ".join(f"{n} {metadata.version(n)}" for n in names)


@dataclass
class Report:
    study_id: int
    title: str
    meta: dict
    tables: dict[str, pd.DataFrame]
    figures: dict[str, bytes] = field(default_factory=dict)

    def table_records(self, name: str) -> list[dict]:
        return json.loads(self.tables[name].to_json(orient="records"))


def _example_stimuli(study: Study) -> list[tuple[str, np.ndarray | None, np.ndarray | None]]:
    from PIL import Image as PILImage

    examples = []
    for condition in study.conditions.order_by("method", "setup"):
        e = Explanation.objects.filter(study=study, condition=condition).order_by("pk").first()
        if e is None:
            continue
        arrays = []
        for file in (e.query_stimulus, e.distractor_stimulus):
            try:
                with file.open("rb") as f:
                    arrays.append(np.asarray(PILImage.open(f).convert("RGB")))
            except (OSError, ValueError):
                arrays.append(None)
        examples.append((f"{condition.method} / {condition.setup}", arrays[0], arrays[1]))
    return examples


def _significance(test: pd.DataFrame, seed: int, mixed: bool) -> dict[str, pd.DataFrame]:
    empty = {"comparisons": pd.DataFrame(), "interaction": pd.DataFrame(), "crosscheck": pd.DataFrame()}
    if test.empty or test[["method", "setup"]].drop_duplicates().shape[0] < 2:
        return empty | {
            "model_notes": pd.DataFrame([{"note": "fewer than two method x setup cells: no tests"}])
        }
    try:
        result = stats.significance(test, seed=seed, mixed=mixed)
    except (np.linalg.LinAlgError, ValueError) as error:
        return empty | {"model_notes": pd.DataFrame([{"note": f"model fit failed: {error}"}])}
    notes = result["comparisons"][["model", "note"]].drop_duplicates()
    notes = notes[notes["note"] != ""]
    result["comparisons"] = result["comparisons"].drop(columns="note")
    result["model_notes"] = notes.reset_index(drop=True)
    return result


def _plan(study: Study) -> tuple[dict, dict, list[str]]:
    """The frozen plan, the plan the analysis used, and the deviations between them."""
    frozen = plan_resolve(study.preregistration or {}, exclusion_rules=study.exclusion_rules or {})
    used = dict(frozen, exclusion_rules=study.exclusion_rules or {})
    return frozen, used, plan_deviations(frozen, used)


def _primary_contrasts(test: pd.DataFrame, which: str) -> list[stats.Contrast]:
    methods, setups = sorted(test["method"].unique()), stats.setup_order(test["setup"].unique())
    contrasts = stats.contrasts_for(methods, setups)
    return [c for c in contrasts if which == "all" or c.kind == which]


def _primary(test: pd.DataFrame, plan: dict, design: str, seed: int) -> tuple[pd.DataFrame, list[str]]:
    if test.empty or test[["method", "setup"]].drop_duplicates().shape[0] < 2:
        return pd.DataFrame(), ["fewer than two method x setup cells: no primary test"]
    table = primary.primary_tests(
        test,
        contrasts=_primary_contrasts(test, plan["contrasts"]),
        design=design,
        unit=plan["generalise_over"],
        test=plan["primary_test"],
        correction=plan["correction"],
        n_perm=plan["permutations"],
        seed=seed,
        alpha=plan["alpha"],
    )
    notes = []
    if table["p_min_f"].isna().all() and plan["primary_test"] != "permutation":
        notes.append(
            f"the min F' test is undefined for every contrast (fewer than two {plan['generalise_over']} or "
            "raters per condition): no primary result can be significant"
        )
    return table, notes


def _finite(value: object) -> bool:
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def _headline(table: pd.DataFrame, plan: dict, accuracy: pd.DataFrame) -> tuple[str, bool]:
    """The headline comparison in words, and whether it was chosen after the data (no pre-registered one)."""
    if table.empty:
        return "No primary comparison could be tested.", False
    chosen_after = not plan["headline"]
    if plan["headline"]:
        match = table[table["comparison"] == plan["headline"]]
        if match.empty:
            return (
                f"The pre-registered headline comparison {plan['headline']!r} is not in the data "
                f"(comparisons: {', '.join(table['comparison'][:6])}).",
                False,
            )
        row = match.iloc[0]
    else:
        row = table.sort_values(["p", "comparison"], na_position="last").iloc[0]
    acc = accuracy.set_index(["method", "setup"])["accuracy"]
    verdict = "significant" if bool(row["significant"]) else "not significant"
    what = row["comparison"]
    if row["kind"] == "pairwise":
        a, b = acc.get((row["method_a"], row["setup"])), acc.get((row["method_b"], row["setup"]))
        a, b = (f"{v:.1%}" if _finite(v) else "not measured" for v in (a, b))
        levels = f"test accuracy {b} with {row['method_b']} vs {a} with {row['method_a']} "
        levels += f"({row['setup']} setup): "
    else:
        levels = "change of the method gap between setups: "
    if not _finite(row["estimate"]):
        ci = "difference not estimable (too few raters or stimuli in the compared conditions)"
    elif _finite(row["ci_low"]) and _finite(row["ci_high"]):
        ci = (
            f"{row['estimate'] * 100:+.1f} points (95% CI {row['ci_low'] * 100:+.1f} to "
            f"{row['ci_high'] * 100:+.1f}, min F', unadjusted)"
        )
    else:
        ci = f"{row['estimate'] * 100:+.1f} points (no interval: too few raters or stimuli)"
    # Which p the primary p is: the larger of the two halves (an interval that excludes 0 can sit beside a
    # primary p above alpha when the rater permutation, not the min F', decides).
    halves = (
        f" (the larger of the min F' p {_fmt(row['p_min_f'])} and the rater-permutation p "
        f"{_fmt(row['p_permutation'])})"
        if _finite(row.get("p_min_f")) and _finite(row.get("p_permutation"))
        else ""
    )
    test = (
        f"primary test p = {_fmt(row['p'])}{halves}, {plan['correction']}-adjusted "
        f"{_fmt(row['p_adjusted'])}: {verdict} at alpha {plan['alpha']}"
        if _finite(row["p"])
        else "the primary test could not be computed: not significant"
    )
    text = (
        f"{what}: {levels}{ci}; {test}. A significant result would generalise over {row['generalises_over']}."
    )
    if chosen_after:
        text += " (No headline comparison was pre-registered: this is the one with the smallest p.)"
    return text, chosen_after


def _small_cells(raters: pd.DataFrame, test: pd.DataFrame, n_pairs: int, plan: dict) -> pd.DataFrame:
    """Conditions under SMALL_CELL_RATERS raters, with the primary test's power for a FLAG_DIFFERENCE gap."""
    columns = ["method", "setup", "raters", "power_10_points"]
    if raters.empty:
        return pd.DataFrame(columns=columns)
    small = raters[raters["raters"] < SMALL_CELL_RATERS]
    p = float(test["correct"].mean()) if len(test) else 0.7
    p1 = min(max(p - FLAG_DIFFERENCE / 2, 0.01), 0.99 - FLAG_DIFFERENCE)
    per_rater = test.groupby(["rater", "method", "setup"]).size()
    blocks = test.groupby(["rater", "pair"]).ngroups / max(test["rater"].nunique(), 1)
    trials = float(per_rater.mean() / max(blocks, 1)) if len(per_rater) else 10.0
    records = []
    for row in small.itertuples():
        value = math.nan
        if row.raters >= 2 and n_pairs >= 2:
            value = power.primary_power(p1=p1, p2=p1 + FLAG_DIFFERENCE, raters=int(row.raters), pairs=n_pairs,
                                        trials_per_pair=max(1, round(trials)),
                                        pairs_per_rater=max(1, round(blocks)),
                                        alpha=plan["alpha"])  # fmt: skip
        records.append({"method": row.method, "setup": row.setup, "raters": int(row.raters),
                        "power_10_points": value})  # fmt: skip
    return pd.DataFrame.from_records(records, columns=columns)


def _small_cell_text(row) -> str:
    """One small condition for the first page: 'cve / random: 3 raters, power 0.00'."""
    raters = f"{row.raters} rater" + ("" if row.raters == 1 else "s")
    power_text = (
        f"power {row.power_10_points:.2f}"
        if _finite(row.power_10_points)
        else "no power (the primary test needs 2 raters and 2 class pairs)"
    )
    return f"{row.method} / {row.setup}: {raters}, {power_text}"


def _small_note(small: pd.DataFrame) -> str:
    """Why a small condition's power is 0, when one is."""
    if small.empty or not (small["power_10_points"] == 0).any():
        return ""
    return (
        "Power 0.00: with 3 or fewer raters per condition the exact rater permutation test cannot reach a p "
        "below alpha (3 vs 3 raters: its smallest p is 0.1), so no primary contrast between such conditions "
        "can be significant."
    )


def _table5(accuracy: pd.DataFrame) -> pd.DataFrame:
    if accuracy.empty:
        return pd.DataFrame(columns=["method"])
    cells = {}
    for row in accuracy.itertuples():
        cells[(row.method, row.setup)] = (
            f"{row.accuracy * 100:.1f} [{row.effective_low * 100:.1f}, {row.effective_high * 100:.1f}] "
            f"({row.n_raters})"
        )
    setups = stats.setup_order(accuracy["setup"].unique())
    records = [
        {"method": m, **{s: cells.get((m, s), "") for s in setups}}
        for m in sorted(accuracy["method"].unique())
    ]
    return pd.DataFrame.from_records(records, columns=["method", *setups])


def _power_plan(accuracy: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    gaps = []
    for setup, group in accuracy.groupby("setup"):
        values = group["accuracy"].to_numpy(float)
        # The largest gap between two methods whose accuracies a power calculation can take (not 0 or 1).
        values = np.unique(values[(values > 0) & (values < 1)])
        if len(values) >= 2:
            gaps.append((float(values.max() - values.min()), float(values.min()), float(values.max()), setup))
    if not gaps:
        return pd.DataFrame()
    gap, low, high, setup = max(gaps)
    plan = power.primary_plan(p1=low, p2=high)
    plan.insert(0, "difference", f"{low:.3f} vs {high:.3f} ({setup})")
    return plan


def _record_tables(study: Study) -> dict[str, pd.DataFrame]:
    """The corrections the analysis applied and the study's audit log (both from ``studies.selectors``)."""
    from studies.selectors import study_audit_log, study_corrections

    correction_columns = [
        "correction",
        "kind",
        "trial",
        "assignment",
        "corrected_answer",
        "author",
        "at",
        "reason",
    ]
    audit = [{**e, "detail": json.dumps(e["detail"], sort_keys=True)} for e in study_audit_log(study=study)]
    return {
        "corrections": pd.DataFrame(study_corrections(study=study), columns=correction_columns),
        "audit_log": pd.DataFrame(audit, columns=["at", "user", "action", "detail"]),
    }


def report_build(
    *,
    study: Study,
    n_boot: int = 2000,
    seed: int | None = None,
    mixed: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Compute every table and figure of the report of ``study``."""
    step = progress or (lambda _: None)
    seed = study.seed if seed is None else seed
    step("reading responses")
    rows = selectors.responses_frame(study=study)
    assignments = selectors.study_assignments(study=study)
    exclusions = selectors.rater_exclusions(study=study)
    rules = study.exclusion_rules or {}
    frozen, plan, deviations = _plan(study)
    # Pairs and images by their names in the data (class names, the data set's image ids), not database ids:
    # the report of a study imported from its archive into another Foil is the same, byte for byte.
    pair_labels = {p.pk: str(p) for p in study.pairs.select_related("class_a", "class_b")}
    image_ids = dict(Image.objects.filter(dataset=study.dataset_id).values_list("pk", "source_id"))
    rows["pair"] = rows["pair"].map(pair_labels)
    rows["image"] = rows["image"].map(image_ids)
    test = stats.analysed_test_rows(rows) if not rows.empty else rows.assign(correct=pd.Series(dtype=int))

    step("accuracy and intervals")
    tables: dict[str, pd.DataFrame] = {}
    icc = (
        power.icc_anova(
            test["correct"], test["rater"].astype(str) + "|" + test["method"] + "|" + test["setup"]
        )
        if not test.empty
        else 0.0
    )
    tables["accuracy"] = stats.accuracy_table(
        test, n_boot=n_boot, seed=seed, icc=icc, min_bootstrap_raters=MIN_BOOTSTRAP_RATERS
    )
    tables["table5"] = _table5(tables["accuracy"])
    by_pair = stats.accuracy_table(
        test,
        ["pair", "method", "setup"],
        n_boot=n_boot,
        seed=seed,
        icc=icc,
        min_bootstrap_raters=MIN_BOOTSTRAP_RATERS,
    )
    tables["accuracy_by_pair"] = by_pair.rename(columns={"pair": "pair_label"})
    tables["dont_know"] = stats.dont_know_table(rows) if not rows.empty else pd.DataFrame()
    tables["learning_gain"] = (
        stats.learning_gain_table(rows, n_boot=n_boot, seed=seed, min_bootstrap_raters=MIN_BOOTSTRAP_RATERS)
        if not rows.empty
        else pd.DataFrame()
    )

    step("primary test (pre-registered)")
    tables["primary"], primary_notes = _primary(test, plan, study.design, seed)
    deviations = deviations + primary_notes

    step("secondary models (GEE, mixed model, cross-checks)")
    tables |= _significance(test, seed, mixed)

    step("exclusions and power")
    tables["exclusions"] = stats.exclusion_counts(exclusions, rules)
    excluded = exclusions[exclusions["excluded"]].copy()
    excluded["reasons"] = excluded["reasons"].map("; ".join)
    tables["excluded_raters"] = excluded.drop(columns="excluded").reset_index(drop=True)
    tables |= _record_tables(study)
    kept = test.drop_duplicates("rater")
    raters = (
        kept.groupby(["method", "setup"]).agg(raters=("rater", "count"), simulated=("rater_simulated", "sum"))
        if not kept.empty
        else pd.DataFrame(columns=["raters", "simulated"])
    )
    tables["raters"] = raters.reset_index()
    if not test.empty:
        power_rows, assumptions = power.power_table(test)
    else:
        power_rows, assumptions = pd.DataFrame(), {}
    tables["power"] = power_rows
    tables["power_assumptions"] = pd.DataFrame([assumptions]) if assumptions else pd.DataFrame()
    tables["power_plan"] = _power_plan(tables["accuracy"], test)
    n_pairs = study.pairs.count()
    tables["small_cells"] = _small_cells(tables["raters"], test, n_pairs, plan)

    step("automatic metrics and provenance")
    explanations = selectors.explanation_metrics(study=study)
    explanations["pair"] = explanations["pair"].map(pair_labels)
    metrics = stats.metrics_vs_accuracy(explanations.drop(columns="explanation"), test)
    metrics["metrics_by_pair"] = metrics["metrics_by_pair"].rename(columns={"pair": "pair_label"})
    tables |= metrics
    tables["provenance_conditions"] = selectors.condition_provenance(study=study)
    tables["provenance_models"] = selectors.model_provenance(study=study)
    tables["provenance_images"] = selectors.image_provenance(study=study)
    tables.setdefault("model_notes", pd.DataFrame())
    tables["stimulus_quality"] = stimulus_quality_table(stimulus_quality(study=study), tables["accuracy"])
    tables = {name: tables[name] for name in CAPTIONS if name in tables}

    headline, chosen_after = _headline(tables["primary"], plan, tables["accuracy"])
    n_simulated = int(assignments["rater_simulated"].sum()) if not assignments.empty else 0
    versions = sorted(set(assignments["study_version"])) if not assignments.empty else []
    conditions = [str(c) for c in study.conditions.order_by("method", "setup")]
    meta = {
        "title": study.title,
        "status": study.status,
        "study_version": study.version,
        "versions_in_data": versions,
        "design": study.design,
        "exclusion_rules": rules,
        "preregistration": frozen,
        "preregistration_document": plan_document(
            frozen, title=study.title, version=study.version, conditions=conditions
        ),
        "deviations": deviations,
        "headline": headline,
        "headline_chosen_after_data": chosen_after,
        "significant_primary": [
            r
            for r in tables["primary"].get("comparison", pd.Series(dtype=str))[
                tables["primary"].get("significant", pd.Series(dtype=bool)).astype(bool)
            ]
        ],
        "small_cells": len(tables["small_cells"]),
        "unblinded": (
            f"accuracy unblinded by {study.unblinded_by} at {study.unblinded_at:%Y-%m-%d %H:%M} UTC, "
            "before the study closed"
            if study.unblinded_at
            else ""
        ),
        "corrections": len(tables["corrections"]),
        "min_bootstrap_raters": MIN_BOOTSTRAP_RATERS,
        "small_cell_raters": SMALL_CELL_RATERS,
        "collection": selectors.collection_dates(study=study),
        "seed": seed,
        "bootstrap_resamples": n_boot,
        "software": software_version(),
        "libraries": library_versions(),
        "raters": len(assignments),
        "simulated_raters": n_simulated,
        "raters_excluded": int(exclusions["excluded"].sum()) if not exclusions.empty else 0,
        "responses": len(rows),
        "test_responses_analysed": len(test),
        "mixed_model": mixed,
    }
    report = Report(study.pk, study.title, meta, tables)

    step("figures")
    subtitle = f"{n_simulated} of {len(assignments)} raters simulated" if n_simulated else ""
    report.figures = {
        "accuracy": figures.png_bytes(figures.accuracy_figure(tables["accuracy"], subtitle=subtitle)),
        "pairs": figures.png_bytes(figures.pair_figure(tables["accuracy_by_pair"])),
        "gain": figures.png_bytes(figures.gain_figure(tables["learning_gain"])),
        "stimuli": figures.png_bytes(figures.stimuli_figure(_example_stimuli(study))),
    }
    return report


FIGURE_CAPTIONS = {
    "accuracy": (
        "Test accuracy per method and setup. Bars: 95% Wilson intervals on the effective number of answers "
        "(design effect of the rater ICC), the intervals of Table 5."
    ),
    "pairs": "Test accuracy per class pair (points; no intervals); marker: method, colour: setup.",
    "gain": "Pre-learning and test accuracy per method and setup (means, no intervals; don't know = wrong).",
    "stimuli": "One example learning stimulus per condition: the query (class A) and distractor (class B).",
}


def _fmt(value: object) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return "" if np.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return '<p class="empty">No rows.</p>'
    return frame.to_html(
        index=False, na_rep="", formatters={c: _fmt for c in frame.columns}, border=0, classes="report-table"
    )


def report_context(report: Report, *, links: dict[str, str] | None = None) -> dict:
    import base64

    return {
        "report": report,
        "meta": report.meta,
        "rules_json": json.dumps(report.meta["exclusion_rules"], sort_keys=True),
        "tables": [
            {"name": name, "caption": CAPTIONS[name], "html": _html_table(frame)}
            for name, frame in report.tables.items()
        ],
        "figures": [
            {"name": name, "caption": FIGURE_CAPTIONS[name], "b64": base64.b64encode(png).decode("ascii")}
            for name, png in report.figures.items()
        ],
        "small_cells": [_small_cell_text(r) for r in report.tables["small_cells"].itertuples()],
        "small_note": _small_note(report.tables["small_cells"]),
        "links": links or {},
    }


def report_html(report: Report, *, links: dict[str, str] | None = None) -> str:
    """The report as one self-contained HTML page (figures inlined)."""
    return render_to_string("analysis/report.html", report_context(report, links=links))


def report_latex(frame: pd.DataFrame, caption: str) -> str:
    """A table as LaTeX (booktabs rules, every cell escaped), with its caption, for a paper."""
    if frame.empty:
        return f"% {caption}\n% (no rows)\n"
    shown = frame.map(_fmt) if hasattr(frame, "map") else frame.applymap(_fmt)
    shown.columns = [str(c).replace("_", " ") for c in shown.columns]
    body = shown.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    return body.to_latex(hrules=True, caption=caption.replace("%", r"\%"), position="htbp") + ""


def report_write(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write report.html, report.pdf, figures/*.png, tables/*.csv and *.tex, preregistration.md and
    report.json (meta) under ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    written = {
        "html": out_dir / "report.html",
        "pdf": out_dir / "report.pdf",
        "meta": out_dir / "report.json",
        "preregistration": out_dir / "preregistration.md",
    }
    written["html"].write_text(report_html(report), encoding="utf-8")
    written["pdf"].write_bytes(report_pdf(report))
    written["meta"].write_text(json.dumps(report.meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written["preregistration"].write_text(report.meta["preregistration_document"], encoding="utf-8")
    for name, frame in report.tables.items():
        path = out_dir / "tables" / f"{name}.csv"
        frame.to_csv(path, index=False, float_format="%.6g", lineterminator="\n")
        written[f"table:{name}"] = path
        tex = out_dir / "tables" / f"{name}.tex"
        tex.write_text(report_latex(frame, CAPTIONS[name]), encoding="utf-8")
        written[f"latex:{name}"] = tex
    for name, png in report.figures.items():
        path = out_dir / "figures" / f"{name}.png"
        path.write_bytes(png)
        written[f"figure:{name}"] = path
    return written


def _pdf_styles() -> dict:
    from reportlab.lib import colors
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet

    base = getSampleStyleSheet()
    return {
        "title": ParagraphStyle("title", parent=base["Title"], fontSize=15, leading=18, spaceAfter=4),
        "h1": ParagraphStyle("h1", parent=base["Heading2"], fontSize=11.5, leading=14, spaceBefore=8),
        "h2": ParagraphStyle("h2", parent=base["Heading3"], fontSize=9.5, leading=12, spaceBefore=6),
        "body": ParagraphStyle("body", parent=base["BodyText"], fontSize=8.5, leading=10.5),
        "warn": ParagraphStyle(
            "warn", parent=base["BodyText"], fontSize=8.5, leading=10.5, textColor=colors.HexColor("#8a1c1c")
        ),  # fmt: skip
        "caption": ParagraphStyle(
            "caption",
            parent=base["BodyText"],
            fontSize=7.5,
            leading=9,
            textColor=colors.HexColor("#333333"),
            spaceAfter=3,
        ),  # fmt: skip
        "cell": ParagraphStyle("cell", parent=base["BodyText"], fontSize=6.5, leading=7.6, splitLongWords=1),
        "head": ParagraphStyle(
            "head",
            parent=base["BodyText"],
            fontSize=6.5,
            leading=7.6,
            fontName="Helvetica-Bold",
            splitLongWords=1,
        ),  # fmt: skip
    }


def _column_widths(texts: list[list[str]], names: list[str], width: float) -> list[float]:
    """Column widths that never break a number or a word: short columns get their natural width, long text
    columns share what is left, each at least its longest word."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    pad = 5.0
    natural, floor = [], []
    for j, name in enumerate(names):
        cells = [t[j] for t in texts]
        natural.append(max([stringWidth(c, "Helvetica", 6.5) for c in cells] + [0]) + pad)
        words = [w for c in [*cells, name] for w in c.split()] or [""]
        head = max(stringWidth(w, "Helvetica-Bold", 6.5) for w in name.split())
        floor.append(min(max(max(stringWidth(w, "Helvetica", 6.5) for w in words), head) + pad, width / 3))
    natural = [max(n, f) for n, f in zip(natural, floor, strict=True)]
    if sum(natural) <= width:
        return [n * width / sum(natural) for n in natural]
    fixed = [j for j in range(len(names)) if natural[j] <= floor[j] + 1]
    flexible = [j for j in range(len(names)) if j not in fixed]
    room = width - sum(natural[j] for j in fixed)
    wanted = sum(natural[j] for j in flexible)
    out = list(natural)
    for j in flexible:
        out[j] = max(floor[j], natural[j] * room / wanted) if wanted else floor[j]
    return out


def _pdf_table(frame: pd.DataFrame, width: float, styles: dict) -> list:
    """A typeset table: every value, cells wrapped at spaces (never inside a number), the header repeated on
    each page it runs over. A long text column with one value in every row is stated once above the table."""
    from xml.sax.saxutils import escape

    from reportlab.lib import colors
    from reportlab.platypus import LongTable, Paragraph, TableStyle

    if frame.empty:
        return [Paragraph("(no rows)", styles["caption"])]
    out = []
    constant = [
        c for c in frame.columns if frame[c].map(_fmt).nunique() == 1 and len(_fmt(frame[c].iloc[0])) > 24
    ]
    if len(frame) < 2 or len(constant) == len(frame.columns):
        constant = []
    for c in constant:
        text = f"{str(c).replace('_', ' ')} (every row): {_fmt(frame[c].iloc[0])}"
        out.append(Paragraph(escape(text), styles["caption"]))
    frame = frame.drop(columns=constant)
    texts = [[_fmt(v) for v in row] for row in frame.itertuples(index=False)]
    names = [str(c).replace("_", " ") for c in frame.columns]
    widths = _column_widths(texts, names, width)
    data = [[Paragraph(escape(n), styles["head"]) for n in names]]
    data += [[Paragraph(escape(t), styles["cell"]) for t in row] for row in texts]
    table = LongTable(data, colWidths=widths, repeatRows=1)
    table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
                ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.black),
                ("LINEBELOW", (0, 1), (-1, -1), 0.25, colors.HexColor("#cccccc")),
                ("LEFTPADDING", (0, 0), (-1, -1), 2),
                ("RIGHTPADDING", (0, 0), (-1, -1), 2),
                ("TOPPADDING", (0, 0), (-1, -1), 1.5),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
            ]
        )
    )
    return [*out, table]


def _pdf_first_page(report: Report, styles: dict, width: float) -> list:
    from xml.sax.saxutils import escape

    from reportlab.platypus import Paragraph, Spacer

    m = report.meta
    plan = m["preregistration"]
    out = [Paragraph(escape(f"Report: {m['title']}"), styles["title"])]
    if m["simulated_raters"]:
        out.append(Paragraph(f"<b>Simulated data:</b> {m['simulated_raters']} of {m['raters']} raters are "
                             "simulated learners, not people.", styles["warn"]))  # fmt: skip
    if m.get("unblinded"):
        out.append(Paragraph(escape(f"Unblinded: {m['unblinded']}."), styles["warn"]))
    out += [Paragraph("Summary", styles["h1"]), Paragraph(escape(m["headline"]), styles["body"])]
    significant = m["significant_primary"]
    out.append(
        Paragraph(
            escape(
                f"Primary contrasts significant after {plan['correction']} adjustment: "
                + (", ".join(significant) if significant else "none")
                + f" (of {len(report.tables['primary'])})."
            ),
            styles["body"],
        )
    )
    out.append(Paragraph("Pre-registered analysis plan", styles["h1"]))
    frozen = plan.get("frozen_at") or "not frozen"
    rules = ", ".join(f"{k} = {v}" for k, v in sorted((plan["exclusion_rules"] or {}).items())) or "none"
    lines = [
        f"Frozen at launch: {frozen}. Primary test: {plan['primary_test']}, generalising over "
        f"{plan['generalise_over']}; contrasts: {plan['contrasts']}; "
        f"headline: {plan['headline'] or '(none)'}; "
        f"correction: {plan['correction']}; alpha {plan['alpha']}; {plan['permutations']} permutations.",
        f"Exclusion rules: {rules}. Everything not in the primary table is secondary.",
    ]
    out += [Paragraph(escape(line), styles["body"]) for line in lines]
    if m["deviations"]:
        out += [Paragraph("<b>Deviations from the plan:</b>", styles["warn"])]
        out += [Paragraph(escape(f"- {d}"), styles["warn"]) for d in m["deviations"]]
    else:
        out.append(Paragraph("No deviations from the plan.", styles["body"]))
    small = report.tables["small_cells"]
    if not small.empty:
        listed = "; ".join(_small_cell_text(r) for r in small.itertuples())
        out.append(Paragraph("Small study", styles["h1"]))
        out.append(
            Paragraph(
                escape(
                    f"{len(small)} conditions have fewer than {SMALL_CELL_RATERS} raters. Power of the "
                    "primary "
                    f"test to detect a {FLAG_DIFFERENCE * 100:.0f}-point difference between two of them: "
                    f"{listed}. {_small_note(small)} Rater-bootstrap intervals are not shown for cells "
                    f"under {MIN_BOOTSTRAP_RATERS} raters."
                ),
                styles["warn"],
            )
        )
    out += [Paragraph("Table 5", styles["h1"]), Paragraph(escape(CAPTIONS["table5"]), styles["caption"])]
    out += _pdf_table(report.tables["table5"], width, styles)
    out.append(Spacer(1, 4))
    c = m["collection"]
    out.append(
        Paragraph(
            escape(
                f"Design {m['design']}; raters {m['raters']} ({m['simulated_raters']} simulated), "
                f"{m['raters_excluded']} excluded; {m['test_responses_analysed']} test answers analysed. "
                f"Launched {c['launched_at'] or '-'}; answers from {c['first_response'] or '-'} to "
                f"{c['last_response'] or '-'}. Seed {m['seed']}; {m['software']}."
            ),
            styles["caption"],
        )
    )
    return out


def report_pdf(report: Report) -> bytes:
    """The report as a PDF a paper can print: a one-page summary (headline, pre-registered plan and its
    deviations, small-study warnings, Table 5), every table of the HTML typeset (wrapped, paginated), the
    figures with captions that say what their intervals are, and the provenance appendix. Deterministic: no
    dates, invariant document id."""
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.lib.units import mm
    from reportlab.lib.utils import ImageReader
    from reportlab.platypus import (
        BaseDocTemplate,
        Frame,
        Image,
        KeepTogether,
        NextPageTemplate,
        PageBreak,
        PageTemplate,
        Paragraph,
    )

    styles = _pdf_styles()
    margin = 14 * mm
    buffer = io.BytesIO()
    doc = BaseDocTemplate(buffer, pagesize=A4, title=f"{PDF_TITLE}: {report.title}",
                          author="Foil", creator="Foil", subject=report.title, invariant=1)  # fmt: skip
    footer = f"Foil report: {report.title} (version {report.meta['study_version']})"

    def decorate(canvas, document) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 7)
        w = canvas._pagesize[0]
        canvas.drawString(margin, 8 * mm, footer[:120])
        canvas.drawRightString(w - margin, 8 * mm, f"page {document.page}")
        canvas.restoreState()

    def template(name: str, size) -> PageTemplate:
        w, h = size
        frame = Frame(margin, margin, w - 2 * margin, h - 2 * margin, id=name, leftPadding=0, rightPadding=0)
        return PageTemplate(id=name, frames=[frame], pagesize=size, onPage=decorate)

    doc.addPageTemplates([template("portrait", A4), template("landscape", landscape(A4))])
    portrait_width = A4[0] - 2 * margin
    landscape_width = landscape(A4)[0] - 2 * margin
    story = _pdf_first_page(report, styles, portrait_width)

    from xml.sax.saxutils import escape

    story += [NextPageTemplate("landscape"), PageBreak()]
    story.append(Paragraph("Tables", styles["h1"]))
    for name, frame in report.tables.items():
        if name in ("table5", *APPENDIX):
            continue
        story.append(KeepTogether([Paragraph(name.replace("_", " "), styles["h2"]),
                                   Paragraph(escape(CAPTIONS[name]), styles["caption"])]))  # fmt: skip
        story += _pdf_table(frame, landscape_width, styles)
    story += [NextPageTemplate("portrait"), PageBreak(), Paragraph("Figures", styles["h1"])]
    for name, png in report.figures.items():
        reader = ImageReader(io.BytesIO(png))
        w, h = reader.getSize()
        scale = min(portrait_width / w, (A4[1] - 2 * margin - 30 * mm) / h)
        story.append(KeepTogether([Image(io.BytesIO(png), width=w * scale, height=h * scale),
                                   Paragraph(escape(FIGURE_CAPTIONS[name]), styles["caption"])]))  # fmt: skip
    story += [NextPageTemplate("landscape"), PageBreak(), Paragraph("Appendix: provenance", styles["h1"])]
    m = report.meta
    versions = (
        f"Software: {m['software']}; {m['libraries']}. "
        f"Collection: launched {m['collection']['launched_at']}, "
        f"answers {m['collection']['first_response']} to {m['collection']['last_response']}."
    )
    story.append(Paragraph(escape(versions), styles["caption"]))
    for name in APPENDIX:
        story.append(KeepTogether([Paragraph(name.replace("_", " "), styles["h2"]),
                                   Paragraph(escape(CAPTIONS[name]), styles["caption"])]))  # fmt: skip
        story += _pdf_table(report.tables.get(name, pd.DataFrame()), landscape_width, styles)
    doc.build(story)
    return buffer.getvalue()
