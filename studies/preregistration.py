"""The analysis plan a study fixes before launch (its pre-registration): what is tested, how, at what level.

A researcher chooses on the study (``Study.preregistration``, a JSON object; any key left out takes the
default below); ``study_launch`` freezes the resolved plan with the study's exclusion rules and the time.
The report tests exactly this plan as *primary*, labels everything else *secondary*, and flags on its first
page any way the analysis departs from it. Pure Python, no Django: the analysis and the archive read it too.
"""

from __future__ import annotations

import math

PLAN_DEFAULTS: dict[str, object] = {
    # analysis.primary: max of min F' (raters and stimuli random) and the rater permutation test; or the
    # permutation test alone (claims about these stimuli only).
    "primary_test": "min_f_permutation",
    # The stimulus unit the primary test generalises over: class pairs (and their images) or test images with
    # the pairs fixed.
    "generalise_over": "pairs",
    # Which contrasts are primary: every method pair within each setup and their setup interactions ("all"),
    # only the within-setup comparisons ("pairwise"), or only the interactions ("interaction").
    "contrasts": "all",
    # The one comparison the summary states in words, as labelled in the report ("ours vs cve | consistent");
    # empty: the primary comparison with the smallest p, which the report flags as chosen after the data.
    "headline": "",
    "correction": "holm",
    "alpha": 0.05,
    "permutations": 2000,
}
CHOICES: dict[str, tuple[str, ...]] = {
    "primary_test": ("min_f_permutation", "permutation"),
    "generalise_over": ("pairs", "images"),
    "contrasts": ("all", "pairwise", "interaction"),
    "correction": ("holm", "bonferroni", "none"),
}
PLAN_KEYS = (*PLAN_DEFAULTS, "exclusion_rules", "frozen_at")


def plan_problem(plan: object) -> str | None:
    """Why ``plan`` is not a valid analysis plan (before defaults are filled in), or None when it is."""
    if not isinstance(plan, dict):
        return f"The pre-registration must be a JSON object, not {plan!r}."
    for key, value in plan.items():
        if key not in PLAN_KEYS:
            return f"Unknown pre-registration key {key!r}; known keys: {', '.join(PLAN_DEFAULTS)}."
        if key in CHOICES and value not in CHOICES[key]:
            return f"Pre-registration {key!r} is {value!r}; choose one of {', '.join(CHOICES[key])}."
    alpha = plan.get("alpha", PLAN_DEFAULTS["alpha"])
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 0.5:
        return f"Pre-registration 'alpha' is {alpha!r}; give a significance level such as 0.05 (below 0.5)."
    n_perm = plan.get("permutations", PLAN_DEFAULTS["permutations"])
    if isinstance(n_perm, bool) or not isinstance(n_perm, int) or not 200 <= n_perm <= 100_000:
        return f"Pre-registration 'permutations' is {n_perm!r}; give a whole number from 200 to 100000."
    if not isinstance(plan.get("headline", ""), str):
        return (
            f"Pre-registration 'headline' is {plan['headline']!r}; give a comparison label or leave it empty."
        )
    return None


def plan_resolve(plan: dict, *, exclusion_rules: dict, frozen_at: str | None = None) -> dict:
    """The full plan: the researcher's choices over the defaults, the exclusion rules, and when it was
    frozen (ISO time; None while the study is a draft)."""
    problem = plan_problem(plan)
    if problem:
        raise ValueError(problem)
    resolved = {key: plan.get(key, default) for key, default in PLAN_DEFAULTS.items()}
    resolved["exclusion_rules"] = dict(plan.get("exclusion_rules", exclusion_rules))
    resolved["frozen_at"] = plan.get("frozen_at", frozen_at)
    return resolved


def plan_deviations(frozen: dict, used: dict) -> list[str]:
    """Every way the analysis ``used`` departs from the ``frozen`` plan, in words (empty: none)."""
    if not frozen.get("frozen_at"):
        return [
            "no pre-registration was frozen at launch: the plan below is the default, fixed after the data"
        ]
    out = []
    for key in (*PLAN_DEFAULTS, "exclusion_rules"):
        a, b = frozen.get(key), used.get(key)
        same = math.isclose(a, b) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            out.append(f"{key}: pre-registered {a!r}, analysed with {b!r}")
    return out


def plan_document(plan: dict, *, title: str, version: int, conditions: list[str]) -> str:
    """The plan as a plain-text document (Markdown) for the archive and the report's first page."""
    rules = plan["exclusion_rules"] or {}
    lines = [
        f"# Pre-registration: {title}",
        "",
        f"Frozen at launch: {plan.get('frozen_at') or 'not frozen (draft)'}; study version {version}.",
        "",
        f"- Conditions: {', '.join(conditions) or '(none yet)'}",
        f"- Primary test: {plan['primary_test']} (analysis.primary), "
        f"generalising over {plan['generalise_over']}",
        f"- Primary contrasts: {plan['contrasts']}; headline: {plan['headline'] or '(smallest primary p)'}",
        f"- Correction: {plan['correction']} across the primary contrasts; alpha {plan['alpha']}",
        f"- Permutations: {plan['permutations']} (exact enumeration when there are fewer relabellings)",
        f"- Exclusion rules: {', '.join(f'{k} = {v}' for k, v in sorted(rules.items())) or 'none'}",
        "- Everything else in the report (GEE, Bayesian mixed model, pooled cross-checks, per-pair tables,"
        " metrics) is secondary.",
        "",
    ]
    return "\n".join(lines)
