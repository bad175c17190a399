"""Planning a study's precompute: the models each method's declaration needs, a seeded stream of candidate
image pairs per class pair, and one unit per (class pair, condition, candidate); the planner refuses a
condition whose config departs from its method's defaults without a variant name."""

from __future__ import annotations

import random
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ValidationError
from django.db import transaction

from explain.methods import Registered, is_registered, method_names, registered
from explain.methods.declaration import MethodDeclaration, Model
from explain.models import Backbone, Dataset, Image, PrecomputePlan, WorkUnit
from explain.precompute.advancing import plan_advance
from explain.precompute.units import (
    DEFAULT_QUEUE,
    DEFAULT_SEMANTIC_POOL,
    backbone_key,
    dataset_backbone,
    enqueue,
    pair_model_backbone,
    pair_model_key,
    plan_explanation,
)
from explain.quality_gate import quality_check
from studies.models import ClassPair, Condition, Study


def pair_images(*, study: Study, label_id: int, split: str, n: int) -> list[Image]:
    """Up to ``n`` images of one class in one split, in an order fixed by the study's seed: only those the
    study's classifier classifies correctly when its predictions are stored (``classifier_evaluate``; the
    worker checks again and replaces a pair it gets wrong)."""
    images = Image.objects.filter(dataset=study.dataset_id, class_label=label_id, split=split)
    if study.classifier.predictions.filter(image__split=split).exists():
        images = images.filter(predictions__classifier=study.classifier, predictions__correct=True)
    ids = list(images.order_by("id").values_list("id", flat=True))
    random.Random(f"{study.seed}:{label_id}:{split}").shuffle(ids)
    by_id = Image.objects.in_bulk(ids[:n])
    return [by_id[i] for i in ids[:n]]


def candidate_stream(*, study: Study, pair: ClassPair, length: int) -> list[list[int]]:
    """``length`` (or fewer) seeded [query image id, distractor image id] pairs from the training split."""
    queries = pair_images(study=study, label_id=pair.class_a_id, split=Image.Split.TRAIN, n=length)
    distractors = pair_images(study=study, label_id=pair.class_b_id, split=Image.Split.TRAIN, n=length)
    return [[q.pk, d.pk] for q, d in zip(queries, distractors, strict=False)]


def _stream_length(study: Study, pool: int) -> int:
    return max(20, 4 * study.n_learning * pool)


def study_precompute(
    *,
    study: Study,
    queue: str | None = None,
    method_config: dict[str, dict[str, Any]] | None = None,
    backbone_params: dict[str, dict[str, Any]] | None = None,
    semantic_pool: int | None = None,
    quality_override: str | None = None,
) -> PrecomputePlan:
    """Plan (or extend, or resume) the precompute of ``study`` and send the runnable units to the workers.

    ``method_config``: constructor arguments per condition name (a method or a variant), stored with each
    result; they may size the computation (``chunk_size``) but not depart from the paper's defaults or the
    variant's registered config: a departure is a variant declared beside the method, with its reason.
    ``backbone_params``: training options per backbone kind for the models this plan must train.
    ``semantic_pool``: candidates explained per learning pair in the semantic setup (default 3).
    ``quality_override``: why this study may run on backbones that fail their quality card (otherwise such a
    backbone is refused, here or when the worker reaches it; ``explain.quality_gate``).
    Running it again creates nothing twice and re-sends units that are queued or were running (a lost task).
    """
    with transaction.atomic():
        study = Study.objects.select_for_update().select_related("dataset", "classifier").get(pk=study.pk)
        if method_config is None:  # planned again: the stored config is checked as a given one
            stored = (
                PrecomputePlan.objects.filter(study=study).values_list("method_config", flat=True).first()
            )
            method_config = stored or None
        pairs, conditions = _check_plannable(study, method_config, backbone_params, semantic_pool)
        plan, _ = PrecomputePlan.objects.get_or_create(
            study=study,
            defaults={
                "queue": queue or DEFAULT_QUEUE,
                "semantic_pool": semantic_pool or DEFAULT_SEMANTIC_POOL,
            },
        )
        if queue:
            plan.queue = queue
        if semantic_pool:
            plan.semantic_pool = semantic_pool
        if method_config is not None:
            plan.method_config = method_config
        if quality_override is not None:
            plan.quality_override = {"reason": quality_override} if quality_override else {}
        plan.finished_at = None

        model_keys: dict[tuple[int, str], list[str]] = {}  # (pair id, method) -> keys of models it waits for
        for method in {c.method for c in conditions}:
            models = registered(method).declaration.models
            existing = [dataset_backbone(study, m.kind) for m in models if m.scope != "pair"]
            existing += [
                pair_model_backbone(study, p, m.kind) for p in pairs for m in models if m.scope == "pair"
            ]
            quality_check(method=method, backbones=[b for b in existing if b], override=plan.quality_override)
            dataset_keys = [
                _plan_backbone(study, model, plan.queue, (backbone_params or {}).get(model.kind, {}))
                for model in models
                if model.scope != "pair"
            ]
            for pair in pairs:
                pair_keys = [
                    _plan_pair_model(study, pair, m, plan.queue, (backbone_params or {}).get(m.kind, {}))
                    for m in models
                    if m.scope == "pair"
                ]
                model_keys[(pair.pk, method)] = [k for k in dataset_keys + pair_keys if k]

        length = _stream_length(study, plan.semantic_pool)
        for pair in pairs:
            stream = plan.candidates.get(str(pair.pk))
            if not stream or len(stream) < length:
                stream = candidate_stream(study=study, pair=pair, length=length)
                plan.candidates[str(pair.pk)] = stream
            if len(stream) < study.n_learning:
                raise ValidationError(
                    f"Class pair {pair} has {len(stream)} candidate image pairs in the training split, but "
                    f"the learning phase shows {study.n_learning}. Import more images of these classes or "
                    "lower the number of explanations in learning."
                )
        plan.save()

        for pair in pairs:
            stream = plan.candidates[str(pair.pk)]
            for condition in conditions:
                pool = plan.semantic_pool if condition.setup == Condition.Setup.CONSISTENT else 1
                for candidate in range(min(study.n_learning * pool, len(stream))):
                    plan_explanation(
                        plan, study, pair, condition, candidate, model_keys[(pair.pk, condition.method)]
                    )

        if study.status in {Study.Status.DRAFT, Study.Status.READY}:
            study.status = Study.Status.PRECOMPUTING
            study.save(update_fields=["status", "updated_at"])

        # Resume: units queued or running have a task that may have been lost with the broker; send it again
        # (a unit already finished when its task arrives is left alone).
        lost = WorkUnit.objects.filter(status__in=[WorkUnit.Status.QUEUED, WorkUnit.Status.RUNNING])
        enqueue(list(lost.filter(plan=plan)))
        enqueue(list(lost.filter(key__in=[k for keys in model_keys.values() for k in keys])))
    plan_advance(plan_id=plan.pk)
    return plan


def _check_plannable(
    study: Study,
    method_config: dict | None,
    backbone_params: dict | None,
    semantic_pool: int | None,
) -> tuple[list[ClassPair], list[Condition]]:
    if study.is_frozen:
        raise ValidationError(
            f"Study {study.title!r} is {study.status}: its stimuli are fixed while raters see them. "
            "Copy it into a new study to precompute again."
        )
    pairs = list(study.pairs.select_related("class_a", "class_b").order_by("id"))
    conditions = list(study.conditions.order_by("id"))
    if not pairs:
        raise ValidationError(
            f"Study {study.title!r} has no class pairs; add at least one before precomputing."
        )
    if not conditions:
        raise ValidationError(
            f"Study {study.title!r} has no conditions; add a method x pair-selection setup first."
        )
    for condition in conditions:
        if not is_registered(condition.method):
            raise ValidationError(
                f"Condition {condition} uses method {condition.method!r}, which is not registered; "
                f"registered methods: {', '.join(method_names())}."
            )
    methods = {c.method for c in conditions}
    for method in sorted(methods):
        declared = registered(method).declaration
        for argument, setting in declared.settings.items():
            kind = declared.setting_models.get(argument)
            if (
                kind
                and Backbone.objects.filter(
                    dataset=study.dataset_id, kind=kind, config__registered=True
                ).exists()
            ):
                continue  # the data set's registered model stands in for the setting
            if not getattr(django_settings, setting, None):
                raise ValidationError(
                    f"Method {method!r} needs the setting {setting}, which is not set. Set the environment "
                    f"variable {setting} to its local directory (read once in config/settings/base.py) and "
                    "restart the web process and the workers"
                    + (
                        f", or register a {kind} model for data set {study.dataset.name!r} "
                        f"(manage.py register_backbone --kind {kind})"
                        if kind
                        else ""
                    )
                    + ", or remove the conditions with that method."
                )
    for name in method_config or {}:
        if name not in methods:
            raise ValidationError(
                f"method_config names {name!r}, which is not a method of this study "
                f"({', '.join(sorted(methods))}); remove it or add a condition with that method."
            )
        if not isinstance(method_config[name], dict):
            raise ValidationError(
                f"method_config[{name!r}] is {method_config[name]!r}; give the method's keyword arguments as "
                'a JSON object, e.g. {"max_edits": 5}.'
            )
    for method in sorted(methods):
        entry, given = registered(method), (method_config or {}).get(method, {})
        _check_config(entry, given)
        _check_tiles(entry, given, study.dataset)
    for kind in backbone_params or {}:
        if kind not in Backbone.Kind.values:
            raise ValidationError(
                f"backbone_params names {kind!r}, which is not a backbone kind; known: "
                f"{', '.join(Backbone.Kind.values)}."
            )
    if semantic_pool is not None and semantic_pool < 1:
        raise ValidationError(f"semantic_pool is {semantic_pool}; it must be 1 or more (default 3).")
    return pairs, conditions


def _check_config(entry: Registered, given: dict[str, Any]) -> None:
    """Refuse a config that departs from the paper's defaults under a plain method's name, or from a variant's
    registered config under the variant's name: a departure is a named variant with its reason."""
    declared = entry.declaration
    filled = sorted(declared.platform_arguments & set(given))
    if filled:
        raise ValidationError(
            f"method_config[{entry.name!r}] sets {', '.join(filled)}, which the platform fills from the "
            "study's models and settings; remove them."
        )
    unknown = sorted(set(given) - set(entry.defaults))
    if unknown:
        raise ValidationError(
            f"method_config[{entry.name!r}] sets {', '.join(unknown)}, which {declared.target} does not "
            f"take; its settings are {', '.join(sorted(entry.defaults))}."
        )
    config = {**entry.config(), **given}
    if entry.departures(config) == entry.departures(entry.config()):
        return
    differ = ", ".join(
        f"{key} ({change['default']!r} -> {change['value']!r})"
        for key, change in entry.departures(config).items()
        if entry.config().get(key, entry.defaults.get(key)) != change["value"]
    )
    named = [v.name for v in declared.variants]
    raise ValidationError(
        f"The conditions named {entry.name!r} would run with settings that depart from "
        + (f"variant {entry.name!r}'s registered config" if entry.variant else "the paper's defaults")
        + f": {differ}. Name a variant instead"
        + (f" (registered: {', '.join(named)})" if named else "")
        + f", or declare one with its reason beside the method in {_declared_in(declared)}."
    )


def _declared_in(declared: MethodDeclaration) -> str:
    """The method file that holds ``declared`` (where a new variant is declared)."""
    return f"explain/methods/{declared.target.partition(':')[0].rpartition('.')[2]}.py"


def _check_tiles(entry: Registered, given: dict[str, Any], dataset: Dataset) -> None:
    """Refuse cells (a declaration's ``tiles``) that do not tile the data set's images, whose size is known
    (an image size that varies is checked by the method itself, on the images it is given)."""
    height, width = dataset.image_height, dataset.image_width
    if not height or not width:
        return
    config = {**entry.defaults, **entry.config(), **given}

    def tile(side: Any) -> bool:
        return isinstance(side, int) and height % side == 0 and width % side == 0

    declared = entry.declaration
    for argument in sorted(declared.tiles):
        side = config.get(argument)
        if not isinstance(side, int) or tile(side):
            continue
        fitting = [v.name for v in declared.variants if tile(v.overrides.get(argument))]
        raise ValidationError(
            f"Method {entry.name!r} cuts images into {side}-pixel cells ({argument} = {side}), which do not "
            f"tile data set {dataset.name!r}'s {width} x {height} images: the authors' code reshapes an "
            f"image into whole cells and fails on this size. Name a variant whose {argument} divides "
            + (f"{height}" if height == width else f"{height} and {width}")
            + (f" (registered: {', '.join(fitting)})" if fitting else "")
            + f", or declare one with its reason beside the method in {_declared_in(declared)}."
        )


def _plan_backbone(study: Study, model: Model, queue: str, params: dict) -> str | None:
    """The key of the unit training ``model`` for the study's data set, or None when such a model exists."""
    kind = model.kind
    if dataset_backbone(study, kind) is not None:
        return None
    key = backbone_key(study.dataset_id, kind)
    if model.scope == "classifier":
        key, params = f"{key}:c{study.classifier_id}", {**params, "classifier": study.classifier_id}
    unit, created = WorkUnit.objects.get_or_create(
        key=key,
        defaults={
            "kind": WorkUnit.Kind.BACKBONE,
            "dataset_id": study.dataset_id,
            "backbone_kind": kind,
            "queue": queue,
            "params": params,
            "status": WorkUnit.Status.QUEUED,
        },
    )
    if created:
        enqueue([unit])
    elif unit.status == WorkUnit.Status.DONE:  # trained once, but the model was deleted since: train again
        unit.status, unit.attempts, unit.queue, unit.params = WorkUnit.Status.QUEUED, 0, queue, params
        unit.save(update_fields=["status", "attempts", "queue", "params"])
        enqueue([unit])
    return key


def _plan_pair_model(study: Study, pair: ClassPair, model: Model, queue: str, params: dict) -> str | None:
    """The key of the unit training ``model`` for this classifier and class pair, or None when one exists."""
    kind = model.kind
    if pair_model_backbone(study, pair, kind) is not None:
        return None
    key = pair_model_key(study.classifier_id, pair, kind)
    unit, created = WorkUnit.objects.get_or_create(
        key=key,
        defaults={
            "kind": WorkUnit.Kind.PAIR_MODEL,
            "dataset_id": study.dataset_id,
            "pair": pair,
            "backbone_kind": kind,
            "queue": queue,
            "params": {**params, "classifier": study.classifier_id},
            "status": WorkUnit.Status.QUEUED,
        },
    )
    if created:
        enqueue([unit])
    return key
