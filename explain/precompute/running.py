"""Running a unit on a worker: claim it, train a model or explain an image pair (``worker``), and store the
result and the unit's status in one transaction; a redelivered unit does nothing twice."""

from __future__ import annotations

import logging
import socket
import traceback
import uuid
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from django.core.files.base import ContentFile
from django.db import IntegrityError, transaction
from django.utils import timezone

from explain.methods import registered
from explain.methods.declaration import model_of
from explain.models import Explanation, ExplanationDistractor, PrecomputePlan, WorkUnit
from explain.precompute.advancing import plan_advance
from explain.precompute.training_progress import unit_training_progress
from explain.precompute.units import (
    MAX_ATTEMPTS,
    delete_files,
    enqueue,
    files_of,
    method_backbones,
    plan_explanation,
    unit_seed,
)
from explain.quality_gate import quality_refusal
from explain.services.provenance import code_version

logger = logging.getLogger(__name__)


def _resolve(target: str):
    module_name, _, name = target.partition(":")
    return getattr(import_module(module_name), name)


def work_units_run(*, unit_ids: list[int]) -> list[WorkUnit]:
    """Run several units in this process (a batch of one task); each is claimed and stored on its own.

    Explanation units of one generative method that share their plan, condition and models are explained
    together, in one ``explain_batch`` (each with its own seed and draws; the results are those of running
    them one by one up to the float rounding of batched network passes, which SLC's and RCSB's Adam steps
    can amplify, so each explanation's config names its batch); every other unit runs on its own, and so
    does each unit of a batch that failed as a whole."""
    finished: dict[int, WorkUnit] = {}
    for group in _generative_batches(unit_ids):
        finished.update(_run_generative_batch(group))
    return [finished.get(unit_id) or work_unit_run(unit_id=unit_id) for unit_id in unit_ids]


def work_unit_run(*, unit_id: int) -> WorkUnit:
    """Run one unit here. A unit already finished is left alone, so a redelivered task does nothing twice."""
    unit = _claim(unit_id)
    if unit is None:
        return WorkUnit.objects.get(pk=unit_id)
    return _run_claimed(unit)


def _run_claimed(unit: WorkUnit) -> WorkUnit:
    try:
        if unit.kind == WorkUnit.Kind.EXPLANATION:
            return _run_explanation(unit)
        return _run_model(unit)
    except Exception as exc:
        logger.exception("work unit %s failed", unit.key)
        return _fail(unit, f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")


def _claim(unit_id: int) -> WorkUnit | None:
    """Mark the unit running and count the attempt; None when there is nothing to run."""
    with transaction.atomic():
        unit = WorkUnit.objects.select_for_update().get(pk=unit_id)
        if unit.status in WorkUnit.TERMINAL or unit.status == WorkUnit.Status.PENDING:
            return None
        if unit.status == WorkUnit.Status.RUNNING and unit.attempts >= MAX_ATTEMPTS:
            unit.status, unit.finished_at = WorkUnit.Status.FAILED, timezone.now()
            unit.error = (
                f"A worker started this unit {unit.attempts} times and never finished it: the worker process "
                "died each time (killed, out of memory, or a crash). Fix the cause, then retry it."
            )
            unit.save(update_fields=["status", "finished_at", "error"])
            return None
        unit.status, unit.started_at = WorkUnit.Status.RUNNING, timezone.now()
        unit.attempts += 1
        unit.worker = socket.gethostname()
        unit.save(update_fields=["status", "started_at", "attempts", "worker"])
    return unit


def _fail(unit: WorkUnit, error: str) -> WorkUnit:
    with transaction.atomic():
        unit.status, unit.error, unit.finished_at = WorkUnit.Status.FAILED, error, timezone.now()
        unit.save(update_fields=["status", "error", "finished_at"])
    return unit


def _run_model(unit: WorkUnit) -> WorkUnit:
    from explain.precompute import worker

    unit.device = worker.device_name()
    start = timezone.now()
    trainer = _resolve(model_of(unit.backbone_kind).trainer)
    progress, close = unit_training_progress(unit_id=unit.pk)  # steps and time left on the progress page
    try:
        if unit.kind == WorkUnit.Kind.BACKBONE:
            backbone = trainer(dataset=unit.dataset, progress=progress, **unit.params)
        else:
            from explain.models import Classifier

            params = dict(unit.params)
            classifier = Classifier.objects.get(pk=params.pop("classifier"))
            backbone = trainer(
                classifier=classifier,
                class_a=unit.pair.class_a,
                class_b=unit.pair.class_b,
                progress=progress,
                **params,
            )
    finally:
        close()
    unit.refresh_from_db(fields=["timings"])
    with transaction.atomic():
        unit.status, unit.backbone, unit.finished_at = WorkUnit.Status.DONE, backbone, timezone.now()
        unit.timings = {**unit.timings, "total_s": (unit.finished_at - start).total_seconds()}
        unit.save(update_fields=["status", "backbone", "finished_at", "timings", "device"])
    waiting = WorkUnit.objects.filter(status=WorkUnit.Status.PENDING, needs__contains=[unit.key])
    for plan_id in set(waiting.values_list("plan_id", flat=True)):
        plan_advance(plan_id=plan_id)  # release the units that waited for this model
    return unit


def _explanation_unit(unit: WorkUnit) -> WorkUnit:
    return WorkUnit.objects.select_related(
        "plan__study__classifier__dataset", "pair", "condition", "query_image", "distractor_image"
    ).get(pk=unit.pk)


@dataclass
class _Explaining:
    """What storing an explanation unit's result needs besides the result."""

    entry: Any
    method_config: dict
    backbones: dict
    aux_backbone: Any
    seed: int
    start: Any
    batch: list[str] | None = None  # keys of the units explained in one batch with this one, in order


def _explaining(unit: WorkUnit) -> WorkUnit | _Explaining:
    """The unit's method, models and seed; or the unit, finished, when it is already stored or refused."""
    study, plan, condition = unit.plan.study, unit.plan, unit.condition
    existing = Explanation.objects.filter(key=unit.key).first()
    if existing is not None:  # stored by an earlier attempt whose status update was lost
        return _finish_explained(unit, existing, {}, {})
    entry = registered(condition.method)
    backbones = method_backbones(study, unit.pair, condition.method)
    refusal = quality_refusal(
        method=condition.method, backbones=backbones.values(), override=plan.quality_override
    )
    if refusal:  # a model the plan trained failed its card
        return _fail(unit, refusal)
    aux = entry.declaration.aux
    aux_backbone = backbones.pop(aux.kind, None) if aux else None
    return _Explaining(
        entry=entry,
        method_config=plan.method_config.get(condition.method, {}),
        backbones=backbones,
        aux_backbone=aux_backbone,
        seed=unit_seed(study, unit.key),
        start=timezone.now(),
    )


def _run_explanation(unit: WorkUnit) -> WorkUnit:
    from explain.precompute import worker

    unit = _explanation_unit(unit)
    explaining = _explaining(unit)
    if isinstance(explaining, WorkUnit):
        return explaining
    study = unit.plan.study
    result = worker.explain_pair(
        classifier=study.classifier,
        method_name=unit.condition.method,
        method_config=explaining.method_config,
        query_image=unit.query_image,
        distractor_image=unit.distractor_image,
        class_a=unit.pair.class_a.index,
        class_b=unit.pair.class_b.index,
        seed=explaining.seed,
        blur_sigma=study.blur_sigma,
        stimulus_region=study.stimulus_region,
        aux_backbone=explaining.aux_backbone,
        backbones=explaining.backbones,
    )
    return _store_explanation(unit, explaining, result)


def _generative_batches(unit_ids: list[int]) -> list[list[WorkUnit]]:
    """The explanation units among ``unit_ids`` that can share one ``explain_batch``: a generative method's,
    grouped by plan, condition and models (groups of two or more)."""
    groups: dict[tuple, list[WorkUnit]] = {}
    units = WorkUnit.objects.filter(pk__in=unit_ids, kind=WorkUnit.Kind.EXPLANATION).select_related(
        "plan__study__dataset", "pair", "condition"
    )
    for unit in units.order_by("pk"):
        if unit.status in WorkUnit.TERMINAL or unit.status == WorkUnit.Status.PENDING:
            continue
        if registered(unit.condition.method).declaration.kind != "generative":
            continue
        try:
            backbones = method_backbones(unit.plan.study, unit.pair, unit.condition.method)
        except RuntimeError:  # a model is missing: the unit fails on its own, with that message
            continue
        models = tuple(sorted((kind, backbone.pk) for kind, backbone in backbones.items()))
        groups.setdefault((unit.plan_id, unit.condition_id, models), []).append(unit)
    return [group for group in groups.values() if len(group) > 1]


def _run_generative_batch(group: list[WorkUnit]) -> dict[int, WorkUnit]:
    """Claim, explain in one batch, and store each unit of ``group``; when the batch itself fails, each
    claimed unit is explained on its own (its own error, if any, is the one kept)."""
    from explain.precompute import worker

    finished: dict[int, WorkUnit] = {}
    waiting: list[tuple[WorkUnit, _Explaining]] = []
    for member in group:
        unit = _claim(member.pk)
        if unit is None:
            finished[member.pk] = WorkUnit.objects.get(pk=member.pk)
            continue
        try:
            unit = _explanation_unit(unit)
            explaining = _explaining(unit)
        except Exception as exc:
            logger.exception("work unit %s failed", unit.key)
            finished[unit.pk] = _fail(unit, f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
            continue
        if isinstance(explaining, WorkUnit):
            finished[unit.pk] = explaining
        else:
            waiting.append((unit, explaining))
    if not waiting:
        return finished
    first, explaining = waiting[0]
    study = first.plan.study
    try:
        results = worker.explain_pairs(
            classifier=study.classifier,
            method_name=first.condition.method,
            method_config=explaining.method_config,
            pairs=[
                worker.PairImages(
                    query_image=unit.query_image,
                    distractor_image=unit.distractor_image,
                    class_a=unit.pair.class_a.index,
                    class_b=unit.pair.class_b.index,
                    seed=explaining.seed,
                )
                for unit, explaining in waiting
            ],
            blur_sigma=study.blur_sigma,
            stimulus_region=study.stimulus_region,
            backbones=explaining.backbones,
        )
    except Exception:
        logger.exception("the batch of %d units failed; running them one by one", len(waiting))
        for unit, _ in waiting:
            finished[unit.pk] = _run_claimed(unit)
        return finished
    for (unit, explaining), result in zip(waiting, results, strict=True):
        explaining.batch = [member.key for member, _ in waiting]
        try:
            finished[unit.pk] = _store_explanation(unit, explaining, result)
        except Exception as exc:
            logger.exception("work unit %s failed", unit.key)
            finished[unit.pk] = _fail(unit, f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
    return finished


def _store_explanation(unit: WorkUnit, explaining: _Explaining, result) -> WorkUnit:
    """Store an explained unit's files and row (or record why it was unexplainable)."""
    from explain.precompute import worker

    study, condition, entry = unit.plan.study, unit.condition, explaining.entry
    backbones, aux_backbone, seed = explaining.backbones, explaining.aux_backbone, explaining.seed
    method_config, start = explaining.method_config, explaining.start
    unit.device = worker.device_name()
    if result.unexplainable:
        return _finish_unexplainable(unit, result.unexplainable, result.metrics, result.timings)

    cf = result.counterfactual
    explanation = Explanation(
        study=study,
        pair=unit.pair,
        condition=condition,
        key=unit.key,
        query_image=unit.query_image,
        flipped=cf.flipped,
        edits=[[e.query_cell, e.distractor, e.distractor_cell] for e in cf.edits],
        metrics=result.metrics,
        config={
            **cf.config,
            "method": condition.method,
            "declared_method": entry.method,
            "variant": entry.variant.name if entry.variant else None,
            "departures": entry.departures({**entry.config(), **method_config}),
            "setup": condition.setup,
            "seed": seed,
            "device": unit.device,
            "code_version": code_version(),
            "classifier": study.classifier_id,
            "blur_sigma": study.blur_sigma,
            "stimulus_region": study.stimulus_region,
            "auxiliary": aux_backbone.pk if aux_backbone else None,
            "backbones": {kind: backbone.pk for kind, backbone in sorted(backbones.items())},
            "work_unit": unit.key,
            # explained in one explain_batch with these units: rerunning that batch regenerates it exactly
            # (alone it may differ by more than rounding where the method normalises its gradients)
            **({"batch": explaining.batch} if explaining.batch else {}),
        },
    )
    # Opaque names (a uuid): nothing about the classes or the condition is in a file name.
    explanation.query_stimulus.save(f"{uuid.uuid4().hex}.png", ContentFile(result.query_png), save=False)
    explanation.distractor_stimulus.save(
        f"{uuid.uuid4().hex}.png", ContentFile(result.distractor_png), save=False
    )
    explanation.masks.save(f"{uuid.uuid4().hex}.npz", ContentFile(result.masks_npz), save=False)
    if result.counterfactual_png:
        explanation.counterfactual_image.save(
            f"{uuid.uuid4().hex}.png", ContentFile(result.counterfactual_png), save=False
        )
    share = len(explaining.batch) if explaining.batch else 1  # a batch's wall time, shared
    timings = {**result.timings, "total_s": (timezone.now() - start).total_seconds() / share}
    explanation.timings = timings
    return _finish_explained(unit, explanation, result.metrics, timings)


def _finish_explained(unit: WorkUnit, explanation: Explanation, metrics: dict, timings: dict) -> WorkUnit:
    """Store the explanation and mark the unit done, in one transaction; a duplicate keeps the first."""
    with transaction.atomic():
        plan = PrecomputePlan.objects.select_for_update().get(pk=unit.plan_id)
        if explanation.pk is None:
            try:
                with transaction.atomic():
                    explanation.full_clean(exclude=["distractor_images"], validate_unique=False)
                    explanation.save()
                    ExplanationDistractor.objects.create(
                        explanation=explanation, image=unit.distractor_image, rank=0
                    )
            except (
                IntegrityError
            ):  # another worker stored this unit's explanation first (a duplicate delivery)
                files = files_of(explanation)
                transaction.on_commit(lambda: delete_files(files))
                explanation = Explanation.objects.get(key=unit.key)
        unit.status, unit.explanation, unit.finished_at = WorkUnit.Status.DONE, explanation, timezone.now()
        unit.error = ""
        unit.timings = timings or unit.timings
        unit.outcome = {**unit.outcome, **_outcome(explanation.metrics or metrics)}
        unit.save(
            update_fields=["status", "explanation", "finished_at", "error", "timings", "outcome", "device"]
        )
    plan_advance(plan_id=plan.pk, group=(unit.condition_id, unit.pair_id))
    return unit


def _outcome(metrics: dict) -> dict:
    keys = ("flipped", "n_edits", "selection_score", "selection_score_source")
    return {k: metrics[k] for k in keys if k in metrics}


def _finish_unexplainable(unit: WorkUnit, reason: str, metrics: dict, timings: dict) -> WorkUnit:
    """Record why the pair could not be explained and plan the next candidate of its class pair instead."""
    with transaction.atomic():
        plan = PrecomputePlan.objects.select_for_update().select_related("study").get(pk=unit.plan_id)
        unit.status, unit.finished_at, unit.timings = WorkUnit.Status.UNEXPLAINABLE, timezone.now(), timings
        unit.outcome = {**unit.outcome, **_outcome(metrics), "reason": reason}
        stream = plan.candidates.get(str(unit.pair_id), [])
        group = WorkUnit.objects.filter(plan=plan, condition=unit.condition_id, pair=unit.pair_id)
        following = max(group.values_list("candidate", flat=True)) + 1
        if following < len(stream):
            replacement = plan_explanation(plan, plan.study, unit.pair, unit.condition, following, unit.needs)
            WorkUnit.objects.filter(pk=replacement.pk).update(status=WorkUnit.Status.QUEUED)
            replacement.status = WorkUnit.Status.QUEUED
            unit.replaced_by = replacement
            enqueue([replacement])
        else:
            unit.outcome["reason"] += (
                f"; no candidate is left to replace it (all {len(stream)} candidate image pairs of this "
                "class pair were tried)"
            )
        unit.save(update_fields=["status", "finished_at", "timings", "outcome", "replaced_by", "device"])
    plan_advance(plan_id=plan.pk, group=(unit.condition_id, unit.pair_id))
    return unit
