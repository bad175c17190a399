"""Advancing a plan: release units whose models are ready, keep the semantic setup's best candidates, mark the
study ready; and retrying failed units from the admin or the progress page."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from explain.models import PrecomputePlan, WorkUnit
from explain.precompute.units import delete_files, enqueue, files_of
from studies.models import Condition, Study
from studies.selectors import study_missing_stimuli


def plan_advance(*, plan_id: int, group: tuple[int, int] | None = None) -> None:
    """Release units whose models are ready, select finished semantic groups, and mark the study ready.

    ``group`` = (condition id, pair id) limits the selection to the group a unit just finished in.
    """
    with transaction.atomic():
        plan = PrecomputePlan.objects.select_for_update().select_related("study").get(pk=plan_id)
        _release(plan)
        groups = [group] if group else plan.units.values_list("condition", "pair").distinct()
        for condition_id, pair_id in groups:
            _select_semantic(plan, condition_id, pair_id)
        _finish_if_complete(plan)


def _release(plan: PrecomputePlan) -> None:
    pending = list(plan.units.filter(status=WorkUnit.Status.PENDING).select_related("condition"))
    if not pending:
        return
    keys = {k for unit in pending for k in unit.needs}
    done = set(
        WorkUnit.objects.filter(key__in=keys, status=WorkUnit.Status.DONE).values_list("key", flat=True)
    )
    ready = [unit for unit in pending if set(unit.needs) <= done]
    WorkUnit.objects.filter(pk__in=[u.pk for u in ready]).update(status=WorkUnit.Status.QUEUED)
    enqueue(ready)


def _select_semantic(plan: PrecomputePlan, condition_id: int, pair_id: int) -> None:
    """Keep the ``n_learning`` best explained candidates of a finished semantic group; drop the rest."""
    units = list(
        plan.units.filter(condition=condition_id, pair=pair_id).select_related("condition", "explanation")
    )
    if not units or units[0].condition.setup != Condition.Setup.CONSISTENT:
        return
    if any(u.status not in WorkUnit.TERMINAL for u in units):
        return
    explained = [u for u in units if u.status == WorkUnit.Status.DONE]
    explained.sort(key=lambda u: (-_score(u), u.candidate))
    keep = plan.study.n_learning
    for rank, unit in enumerate(explained):
        unit.outcome = {**unit.outcome, "selection_rank": rank}
        if rank >= keep:
            unit.status = WorkUnit.Status.DISCARDED
            if unit.explanation is not None:
                files = files_of(unit.explanation)
                unit.explanation.delete()
                unit.explanation = None
                transaction.on_commit(lambda f=files: delete_files(f))
        unit.save(update_fields=["outcome", "status", "explanation"])


def _score(unit: WorkUnit) -> float:
    score = unit.outcome.get("selection_score")
    return float("-inf") if score is None else float(score)


def _finish_if_complete(plan: PrecomputePlan) -> None:
    study = plan.study
    if plan.units.exclude(status__in=WorkUnit.TERMINAL).exists():
        return
    if study_missing_stimuli(study=study):
        return  # finished with failures or too few explainable pairs: the progress page lists them
    if plan.finished_at is None:
        plan.finished_at = timezone.now()
        plan.save(update_fields=["finished_at", "updated_at"])
    if study.status in {Study.Status.DRAFT, Study.Status.PRECOMPUTING}:
        study.status = Study.Status.READY
        study.save(update_fields=["status", "updated_at"])


def work_unit_retry(*, unit: WorkUnit) -> WorkUnit:
    """Send a failed unit to a worker again (its attempts start from zero); the study precomputes again."""
    with transaction.atomic():
        unit = WorkUnit.objects.select_for_update(of=("self",)).select_related("condition").get(pk=unit.pk)
        if unit.status != WorkUnit.Status.FAILED:
            raise ValidationError(f"Work unit {unit.key} is {unit.status}; only failed units can be retried.")
        unit.status, unit.attempts, unit.finished_at = WorkUnit.Status.QUEUED, 0, None
        unit.save(update_fields=["status", "attempts", "finished_at"])
        enqueue([unit])
        if unit.plan_id:
            study_ids = [unit.plan.study_id]
        else:  # a model: every study waiting for it precomputes again
            waiting = WorkUnit.objects.filter(status=WorkUnit.Status.PENDING, needs__contains=[unit.key])
            study_ids = list(waiting.values_list("plan__study", flat=True).distinct())
        Study.objects.filter(pk__in=study_ids, status__in=[Study.Status.DRAFT, Study.Status.READY]).update(
            status=Study.Status.PRECOMPUTING, updated_at=timezone.now()
        )
    return unit


def plan_retry_failed(*, plan: PrecomputePlan) -> int:
    """Retry every failed unit of a plan and the failed models it waits for; returns how many."""
    waiting_for = {k for needs in plan.units.values_list("needs", flat=True) for k in needs}
    units = list(
        WorkUnit.objects.filter(Q(plan=plan) | Q(key__in=waiting_for), status=WorkUnit.Status.FAILED)
    )
    for unit in units:
        work_unit_retry(unit=unit)
    return len(units)
