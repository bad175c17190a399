"""Work units of a precompute plan: their keys and seeds, the models a method runs with, and sending units to
the workers (by task name: the task module imports the precompute layer, never the other way round)."""

from __future__ import annotations

import hashlib

from celery import current_app
from django.core.files.storage import default_storage
from django.db import transaction

from explain.methods import registered
from explain.methods.declaration import model_of
from explain.models import Backbone, Explanation, PrecomputePlan, WorkUnit
from explain.selectors import backbones_preferred
from studies.models import ClassPair, Condition, Study

DEFAULT_QUEUE = "explain"
MAX_ATTEMPTS = 3
DEFAULT_SEMANTIC_POOL = 3
WORK_UNITS_TASK = "explain.tasks.work_units_run"


def unit_seed(study: Study, key: str) -> int:
    """A seed for one unit from the study's seed and the unit's key: the same on every machine and rerun."""
    digest = hashlib.sha256(f"{study.seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def backbone_key(dataset_id: int, kind: str) -> str:
    return f"backbone:d{dataset_id}:{kind}"


def pair_model_key(classifier_id: int, pair: ClassPair, kind: str) -> str:
    return f"pair-model:c{classifier_id}:{pair.class_a_id}-{pair.class_b_id}:{kind}"


def explanation_key(study_id: int, pair_id: int, condition_id: int, candidate: int) -> str:
    return f"explain:s{study_id}:p{pair_id}:c{condition_id}:k{candidate}"


def dataset_backbone(study: Study, kind: str) -> Backbone | None:
    """The model of ``kind`` for the study's data set (and classifier, for per-classifier kinds): a
    registered one (``manage.py register_backbone``) before any the platform trained, else the newest."""
    rows = Backbone.objects.filter(dataset=study.dataset_id, kind=kind)
    if model_of(kind).scope == "classifier":
        rows = rows.filter(config__classifier=study.classifier_id)
    return backbones_preferred(rows).first()


def pair_model_backbone(study: Study, pair: ClassPair, kind: str) -> Backbone | None:
    rows = Backbone.objects.filter(
        kind=kind,
        config__classifier=study.classifier_id,
        config__class_a=pair.class_a_id,
        config__class_b=pair.class_b_id,
    )
    return backbones_preferred(rows).first()


def method_backbones(study: Study, pair: ClassPair, method: str) -> dict[str, Backbone]:
    """The models ``method`` runs with for this study and class pair, by kind (the newest of each)."""
    models = registered(method).declaration.models
    found: dict[str, Backbone] = {}
    for model in models:
        if model.scope == "pair":
            backbone = pair_model_backbone(study, pair, model.kind)
        else:
            backbone = dataset_backbone(study, model.kind)
        if backbone is not None:
            found[model.kind] = backbone
    missing = [m.kind for m in models if m.kind not in found]
    if missing:
        raise RuntimeError(
            f"method {method!r} needs {', '.join(missing)} for data set {study.dataset.name!r}, and none "
            "exists (deleted since planning?); plan the study again to train it"
        )
    return found


def plan_explanation(
    plan: PrecomputePlan,
    study: Study,
    pair: ClassPair,
    condition: Condition,
    candidate: int,
    needs: list[str],
) -> WorkUnit:
    query_id, distractor_id = plan.candidates[str(pair.pk)][candidate]
    unit, _ = WorkUnit.objects.get_or_create(
        key=explanation_key(study.pk, pair.pk, condition.pk, candidate),
        defaults={
            "kind": WorkUnit.Kind.EXPLANATION,
            "plan": plan,
            "dataset_id": study.dataset_id,
            "pair": pair,
            "condition": condition,
            "candidate": candidate,
            "query_image_id": query_id,
            "distractor_image_id": distractor_id,
            "needs": needs,
            "queue": plan.queue,
        },
    )
    return unit


def enqueue(units: list[WorkUnit]) -> None:
    """Send units to their queue once the surrounding transaction commits, in tasks of their method's batch
    size, one condition to a task: the worker batches a task's units by condition, so a task mixing
    conditions ran as several small batches, each paying a generative method's per-step cost in full."""
    groups: dict[tuple[str, int, int | None], list[int]] = {}
    for unit in units:
        batch = registered(unit.condition.method).declaration.batch if unit.condition_id else 1
        groups.setdefault((unit.queue, batch, unit.condition_id), []).append(unit.pk)
    for (queue, batch, _), ids in groups.items():
        for begin in range(0, len(ids), batch):
            chunk = ids[begin : begin + batch]
            transaction.on_commit(
                lambda q=queue, c=chunk: current_app.send_task(WORK_UNITS_TASK, args=[c], queue=q)
            )


def files_of(explanation: Explanation) -> list[str]:
    fields = (explanation.query_stimulus, explanation.distractor_stimulus, explanation.masks)
    return [f.name for f in (*fields, explanation.counterfactual_image) if f and f.name]


def delete_files(names: list[str]) -> None:
    for name in names:
        default_storage.delete(name)
