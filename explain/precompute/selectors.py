"""Reads of a study's precompute: progress per condition (with each variant's departures) and the gallery."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import Count, Min, Q
from django.utils import timezone

from explain.methods import registered
from explain.models import Explanation, PrecomputePlan, WorkUnit
from explain.precompute.training_progress import training_time_left
from explain.selectors import usable_explanations
from studies.models import Study
from studies.selectors import study_missing_stimuli


def plan_progress(*, study: Study, window_s: float = 600.0) -> dict[str, Any]:
    """Where a study's precompute stands, per condition (method x setup): counts, rate and time left.

    ``rate_per_min`` counts the units finished in the last ``window_s`` seconds (or since the first one
    started, when that is shorter); ``eta_s`` is the units still to run divided by that rate.
    """
    plan = PrecomputePlan.objects.filter(study=study).first()
    if plan is None:
        return {
            "plan": None,
            "conditions": [],
            "models": [],
            "failures": [],
            "replacements": {},
            "state": "not planned",
        }
    now = timezone.now()
    status = WorkUnit.Status
    counts = {s: Count("pk", filter=Q(status=s)) for s in status.values}
    by_condition = {
        row["condition"]: row
        for row in plan.units.values("condition").annotate(total=Count("pk"), **counts).order_by()
    }
    stimuli = dict(
        usable_explanations(Explanation.objects.filter(study=study))
        .values("condition")
        .annotate(n=Count("pk"))
        .values_list("condition", "n")
    )
    n_pairs = study.pairs.count()
    rows = []
    for condition in study.conditions.order_by("method", "setup"):
        row = by_condition.get(condition.pk, {"total": 0, **{s: 0 for s in status.values}})
        finished = sum(row[s] for s in WorkUnit.TERMINAL)
        entry = registered(condition.method)
        config = {**entry.config(), **plan.method_config.get(condition.method, {})}
        rows.append(
            {
                "condition": condition,
                "method": condition.method,
                "declared_method": entry.method,
                "variant": entry.variant,
                "departures": entry.departures(config),
                "setup": condition.setup,
                "total": row["total"],
                "finished": finished,
                "done": row[status.DONE],
                "running": row[status.RUNNING],
                "waiting": row[status.QUEUED] + row[status.PENDING],
                "pending": row[status.PENDING],
                "failed": row[status.FAILED],
                "replaced": row[status.UNEXPLAINABLE],
                "discarded": row[status.DISCARDED],
                "stimuli": stimuli.get(condition.pk, 0),
                "need": n_pairs * study.n_learning,
                "percent": round(100 * finished / row["total"]) if row["total"] else 0,
            }
        )

    first_start = plan.units.aggregate(t=Min("started_at"))["t"]
    window = min(window_s, (now - first_start).total_seconds()) if first_start else 0.0
    recent = plan.units.filter(
        status__in=WorkUnit.TERMINAL, finished_at__gte=now - timedelta(seconds=window_s)
    )
    finished_recently = recent.count()
    rate = finished_recently / (window / 60) if window > 0 and finished_recently else 0.0
    remaining = max(0, sum(r["total"] - r["finished"] for r in rows))
    needed = {k for needs in plan.units.values_list("needs", flat=True) for k in needs}
    models = list(WorkUnit.objects.filter(key__in=needed).select_related("backbone").order_by("id"))
    for unit in models:
        unit.training = training_time_left(unit, now)
    failures = list(
        WorkUnit.objects.filter(Q(plan=plan) | Q(key__in=needed), status=status.FAILED)
        .select_related("condition", "pair__class_a", "pair__class_b", "query_image", "distractor_image")
        .order_by("id")
    )
    replacements = dict(
        plan.units.filter(status=status.UNEXPLAINABLE)
        .values("condition__method")
        .annotate(n=Count("pk"))
        .values_list("condition__method", "n")
    )
    if remaining == 0 and not study_missing_stimuli(study=study):
        state = "done"
    elif failures and all(r["running"] == 0 and r["waiting"] - r["pending"] == 0 for r in rows):
        state = "stopped: failures need attention"
    elif remaining == 0:
        state = "finished, but some conditions lack stimuli"
    else:
        state = "running"
    return {
        "plan": plan,
        "conditions": rows,
        "models": models,
        "failures": failures,
        "replacements": replacements,
        "state": state,
        "finished": sum(r["finished"] for r in rows),
        "total": sum(r["total"] for r in rows),
        "remaining": remaining,
        "rate_per_min": rate,
        "eta_s": remaining / rate * 60 if rate > 0 else None,
    }


def method_is_generative(method: str) -> bool:
    """Whether ``method`` (a method or variant name) makes a counterfactual image; False for a name no longer
    registered (its stored stimuli are still shown)."""
    try:
        return registered(method).declaration.kind == "generative"
    except KeyError:
        return False


def stimulus_caption(explanation: Explanation, *, generative: bool) -> str:
    """The figures that fit the method, for the gallery and docs/stimuli.png: a generative method's region
    area, L1, COUT and network evaluations; a cell method's edits (and Same-KP where keypoints exist). Whether
    it flipped is shown beside it."""
    m = explanation.metrics or {}
    if generative:
        parts = []
        if m.get("region_area") is not None:
            parts.append(f"region {100 * float(m['region_area']):.0f}%")
        if m.get("l1") is not None:
            parts.append(f"L1 {float(m['l1']):.3f}")
        if m.get("cout") is not None:
            parts.append(f"COUT {float(m['cout']):.2f}")
        if m.get("nfe") is not None:
            parts.append(f"NFE {int(m['nfe'])}")
        return ", ".join(parts)
    edits = int(m.get("n_edits") or 0)
    text = f"{edits} edit{'s' if edits != 1 else ''}"
    if m.get("same_kp_first") is not None:
        text += f", Same-KP {float(m['same_kp_first']):.2f}"
    return text


def condition_gallery(*, study: Study, condition_id: int) -> list[dict[str, Any]]:
    """The kept explanations of one condition, grouped by class pair, for the researcher's gallery, each
    with its caption (``caption``)."""
    explanations = (
        Explanation.objects.filter(study=study, condition=condition_id)
        .select_related("pair__class_a", "pair__class_b", "query_image", "condition")
        .order_by("pair_id", "id")
    )
    groups: dict[int, dict[str, Any]] = {}
    for explanation in explanations:
        explanation.caption = stimulus_caption(
            explanation, generative=method_is_generative(explanation.condition.method)
        )
        group = groups.setdefault(explanation.pair_id, {"pair": explanation.pair, "explanations": []})
        group["explanations"].append(explanation)
    return list(groups.values())


def training_summary(progress: dict[str, Any]) -> str:
    """The models training now, for a terminal bar: "training autoencoder 120/200 steps, 35 s left; ..."."""
    parts = []
    for unit in progress.get("models", []):
        left = getattr(unit, "training", None)
        if left:
            eta = f", {left['eta_s']:.0f} s left" if left["eta_s"] is not None else ""
            parts.append(f"{unit.backbone_kind} {left['done']}/{left['total']} steps{eta}")
    return f"training {'; '.join(parts)}" if parts else ""
