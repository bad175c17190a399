"""Reads for studies: lists with counts, what a study still lacks, and where a rater stands."""

import functools
import random
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import Count, F, Model, Q, QuerySet

from explain.models import Explanation, Image
from explain.selectors import related_count, usable_explanations

from .models import (
    Assignment,
    Block,
    ClassPair,
    Condition,
    Phase,
    ProviderIdentity,
    Rater,
    Response,
    Study,
    Trial,
)


def study_list_with_counts() -> QuerySet[Study]:
    """Studies with their counts of pairs, conditions, explanations, assignments and responses (one query).
    Pilot assignments (the researcher trying the study) count only as ``n_pilot_assignments``."""
    counted = Assignment.objects.filter(is_pilot=False)
    started = counted.filter(status=Assignment.Status.STARTED)
    completed = counted.filter(status=Assignment.Status.COMPLETED)
    return Study.objects.select_related("dataset", "classifier").annotate(
        n_pairs=related_count(ClassPair.objects.all(), "study"),
        n_conditions=related_count(Condition.objects.all(), "study"),
        n_explanations=related_count(Explanation.objects.all(), "study"),
        n_assignments_started=related_count(started, "study"),
        n_assignments_completed=related_count(completed, "study"),
        n_pilot_assignments=related_count(Assignment.objects.filter(is_pilot=True), "study"),
        n_responses=related_count(
            Response.objects.filter(trial__block__assignment__is_pilot=False),
            "trial__block__assignment__study",
        ),
    )


def study_missing_stimuli(*, study: Study) -> list[dict]:
    """Every (class pair, condition) with fewer learning stimuli than the learning phase shows."""
    have = {
        (row["pair"], row["condition"]): row["n"]
        for row in usable_explanations(Explanation.objects.filter(study=study))
        .values("pair", "condition")
        .annotate(n=Count("pk"))
    }
    missing = []
    conditions = list(study.conditions.all())
    for pair in study.pairs.exclude(pk=study.example_pair_id).select_related("class_a", "class_b"):
        for condition in conditions:
            n = have.get((pair.pk, condition.pk), 0)
            if n < study.n_learning:
                need = study.n_learning
                missing.append({"pair": str(pair), "condition": str(condition), "have": n, "need": need})
    return missing


def pair_test_images(*, study: Study, pair: ClassPair) -> list[tuple[int, str]]:
    """The test images of a class pair, the same for every condition and rater: (image id, "A" or "B").

    Chosen deterministically from the study's seed among the data set's test-split images of the pair's
    two classes (those the study's classifier classifies correctly, once it has been evaluated), half of
    class A and half of class B, as many as the longer of pre-learning and test needs.
    """
    return study_test_images(study=study, pairs=[pair])[pair.pk]


def study_test_images(*, study: Study, pairs: list[ClassPair]) -> dict[int, list[tuple[int, str]]]:
    """``pair_test_images`` of every pair in ``pairs``, by pair id, in two queries however many pairs."""
    n = max(study.n_prelearning, study.n_test)
    evaluated = Image.objects.filter(
        dataset_id=study.dataset_id, split=Image.Split.TEST, predictions__classifier_id=study.classifier_id
    ).exists()
    images = Image.objects.filter(
        dataset_id=study.dataset_id,
        split=Image.Split.TEST,
        class_label_id__in={c for pair in pairs for c in (pair.class_a_id, pair.class_b_id)},
    )
    if evaluated:  # only images the classifier gets right, as the papers' studies do
        images = images.filter(predictions__classifier_id=study.classifier_id, predictions__correct=True)
    by_class: dict[int, list[int]] = {}
    for image_id, class_id in images.order_by("pk").values_list("pk", "class_label_id"):
        by_class.setdefault(class_id, []).append(image_id)
    chosen: dict[int, list[tuple[int, str]]] = {}
    for pair in pairs:
        wanted = {"A": (pair.class_a_id, (n + 1) // 2), "B": (pair.class_b_id, n // 2)}
        rng = random.Random(f"{study.seed}:{pair.pk}")
        chosen[pair.pk] = []
        for side, (class_id, k) in wanted.items():
            ids = by_class.get(class_id, [])
            if len(ids) < k:
                raise ValidationError(
                    f"Class pair {pair.pk} needs {k} test-split images of its class {side} for "
                    f"{n} pre-learning/test trials, but the data set has {len(ids)}. Import more test images "
                    "or lower the study's n_prelearning/n_test."
                )
            chosen[pair.pk] += [(image_id, side) for image_id in sorted(rng.sample(ids, k))]
    return chosen


# The rater pages' reads run on every request (several a second per rater when a crowd arrives), so they are
# plain SQL: the ORM spends about ten times longer building such a query than PostgreSQL takes to run it
# (bench/profile_rater_requests.py). tests/studies/test_rater_queries.py checks them against the ORM.
def _columns(model: type[Model], alias: str) -> str:
    """Every concrete column of ``model``, in field order, from the table aliased ``alias``."""
    return ", ".join(f'{alias}."{f.column}"' for f in model._meta.concrete_fields)


@functools.cache
def _loader(model: type[Model]) -> tuple[list[str], list[tuple[int, Any, list]]]:
    """The attribute names of ``model``'s concrete fields, and the ORM's conversions of their database values
    (JSON text to objects, ...) by field position."""
    fields = model._meta.concrete_fields
    conversions = [
        (i, f.get_col(model._meta.db_table), f.get_db_converters(connection)) for i, f in enumerate(fields)
    ]
    return [f.attname for f in fields], [c for c in conversions if c[2]]


def _instances(row: tuple, *models: type[Model]) -> list[Model]:
    """One instance of each of ``models`` from a row of plain SQL that selected ``_columns`` of each in turn,
    converted as the ORM converts them."""
    found, start = [], 0
    for model in models:
        names, conversions = _loader(model)
        values = list(row[start : start + len(names)])
        for i, column, converters in conversions:
            for convert in converters:
                values[i] = convert(values[i], column, connection)
        found.append(model.from_db(connection.alias, names, values))
        start += len(names)
    return found


@functools.cache
def _upcoming_sql() -> str:
    """The rater's order: block by block; in a block pre-learning, learning, then test; in a phase by
    position."""
    return f"""
        SELECT {_columns(Trial, "t")}, {_columns(Block, "b")},
               (SELECT count(*) FROM studies_block WHERE assignment_id = %(assignment)s) AS n_pairs,
               (SELECT count(*) FROM studies_trial s WHERE s.block_id = t.block_id AND s.phase = t.phase)
                   AS phase_total
        FROM studies_trial t
        JOIN studies_block b ON b.id = t.block_id
        LEFT JOIN studies_response r ON r.trial_id = t.id
        WHERE b.assignment_id = %(assignment)s AND r.id IS NULL
        ORDER BY b.position, CASE t.phase WHEN %(first)s THEN 0 WHEN %(second)s THEN 1 ELSE 2 END, t.position
        LIMIT %(limit)s
    """


def assignment_upcoming(*, assignment: Assignment, limit: int = 2) -> list[Trial]:
    """The assignment's unanswered trials in the order the rater meets them (the first is the current one),
    at most ``limit``, each with its ``block``, the assignment's number of blocks (``n_pairs``) and the
    number of trials in its phase of its block (``phase_total``): one query, however long the assignment."""
    params = {
        "assignment": assignment.pk,
        "first": Phase.PRE_LEARNING,
        "second": Phase.LEARNING,
        "limit": limit,
    }
    with connection.cursor() as cursor:
        cursor.execute(_upcoming_sql(), params)
        rows = cursor.fetchall()
    trials = []
    for row in rows:
        trial, block = _instances(row, Trial, Block)
        block.assignment, trial.block = assignment, block
        trial.n_pairs, trial.phase_total = row[-2:]
        trials.append(trial)
    return trials


@dataclass(frozen=True)
class Step:
    """Where a rater is in their assignment, and the progress to show."""

    kind: str  # "consent", "instructions", "trial", "done" or "closed"
    trial: Trial | None = None
    next_trial: Trial | None = None
    pair_number: int = 0
    n_pairs: int = 0
    phase_number: int = 0
    phase_total: int = 0


def assignment_step(*, assignment: Assignment) -> Step:
    """The page the rater should see now: the first unanswered trial after consent and instructions.

    One query (``assignment_upcoming``). A block's positions run 0, 1, ... and so do a phase's trials
    (services' ``assignment_create``), so the pair and the trial number are positions plus one."""
    if assignment.status == Assignment.Status.COMPLETED:
        return Step("done")
    if assignment.status != Assignment.Status.STARTED:
        return Step("closed")
    if assignment.consented_at is None:
        return Step("consent")
    if assignment.instructed_at is None:
        return Step("instructions")
    upcoming = assignment_upcoming(assignment=assignment)
    if not upcoming:
        return Step("done")
    trial = upcoming[0]
    return Step(
        "trial",
        trial=trial,
        next_trial=upcoming[1] if len(upcoming) > 1 else None,
        pair_number=trial.block.position + 1,
        n_pairs=trial.n_pairs,
        phase_number=trial.position + 1,
        phase_total=trial.phase_total,
    )


@functools.cache
def _rater_sql(what: str) -> str:
    """The plain SQL of ``assignment_by_token`` ("assignment") and ``rater_trial`` ("trial")."""
    assignment = f"""
        SELECT {_columns(Assignment, "a")}, {_columns(Study, "s")}, {_columns(Rater, "r")}
        FROM studies_assignment a
        JOIN studies_study s ON s.id = a.study_id
        JOIN studies_rater r ON r.id = a.rater_id
        WHERE a.token = %s
    """
    if what == "assignment":
        return assignment
    return f"""
        SELECT {_columns(Trial, "t")}, {_columns(Block, "b")}, {_columns(Assignment, "a")},
               {_columns(Study, "s")}, {_columns(Rater, "r")}
        FROM studies_trial t
        JOIN studies_block b ON b.id = t.block_id
        JOIN studies_assignment a ON a.id = b.assignment_id
        JOIN studies_study s ON s.id = a.study_id
        JOIN studies_rater r ON r.id = a.rater_id
        WHERE t.key = %s AND a.token = %s
    """


def assignment_by_token(*, token: str) -> Assignment | None:
    """The assignment whose rater URL token this is, with its study and rater loaded; None when there is
    none. One query, plain SQL (as ``assignment_upcoming``): every rater page starts with it."""
    with connection.cursor() as cursor:
        cursor.execute(_rater_sql("assignment"), [token])
        row = cursor.fetchone()
    if row is None:
        return None
    assignment, study, rater = _instances(row, Assignment, Study, Rater)
    assignment.study, assignment.rater = study, rater
    return assignment


def rater_trial(*, token: str, key: UUID | str) -> Trial | None:
    """The trial with this key if it is of the assignment whose rater token this is, with its block, the
    assignment, its study and rater loaded; None otherwise. One query, plain SQL (every answer starts with
    it)."""
    with connection.cursor() as cursor:
        cursor.execute(_rater_sql("trial"), [key, token])
        row = cursor.fetchone()
    if row is None:
        return None
    trial, block, assignment, study, rater = _instances(row, Trial, Block, Assignment, Study, Rater)
    assignment.study, assignment.rater = study, rater
    block.assignment, trial.block = assignment, block
    return trial


IMAGE_SQL = """
    SELECT t.phase, t.is_catch, t.correct_answer, i.file, e.query_stimulus, e.distractor_stimulus
    FROM studies_trial t
    JOIN studies_block b ON b.id = t.block_id
    JOIN studies_assignment a ON a.id = b.assignment_id
    LEFT JOIN explain_image i ON i.id = t.image_id
    LEFT JOIN explain_explanation e ON e.id = t.explanation_id
    WHERE t.key = %s AND a.token = %s
"""


def trial_image_name(*, key: UUID, token: str, slot: int) -> str | None:
    """The stored file name of image ``slot`` of the trial with ``key``, if that trial is of the assignment
    whose rater token is ``token`` (one
    query, plain SQL as ``assignment_upcoming``). Learning trials show the query (1) and the distractor (2)
    stimulus; the others one image (1): the data set's image, or for a catch trial the learning stimulus of
    its answer."""
    with connection.cursor() as cursor:
        cursor.execute(IMAGE_SQL, [key, token])
        row = cursor.fetchone()
    if row is None:
        return None
    phase, is_catch, correct_answer, image, query, distractor = row
    if phase == Phase.LEARNING:
        return {1: query, 2: distractor}.get(slot)
    if slot != 1:
        return None
    if is_catch and query:
        return query if correct_answer == "A" else distractor
    return image


def rater_prior_assignment(*, provider: str, external_id: str, study: Study) -> Assignment | None:
    """The assignment a provider identity already has in ``study``, if any."""
    return (
        Assignment.objects.filter(
            study=study, rater__identities__provider=provider, rater__identities__external_id=external_id
        )
        .select_related("rater")
        .first()
    )


def rater_took_excluded_study(*, rater_id: int, study: Study) -> Study | None:
    """An earlier study that ``study`` excludes and the rater took part in, if any."""
    taken = Assignment.objects.filter(rater_id=rater_id, study__in=study.excluded_studies.all())
    first = taken.select_related("study").first()
    return first.study if first else None


def study_by_ref(ref: str) -> Study:
    """A study by its id or its exact title; ``Study.DoesNotExist`` says which studies there are otherwise."""
    found = Study.objects.filter(pk=int(ref)) if ref.isdigit() else Study.objects.filter(title=ref)
    studies = list(found[:2])
    if len(studies) == 1:
        return studies[0]
    what = "No study" if not studies else "Several studies"
    known = ", ".join(f"{pk}: {title!r}" for pk, title in Study.objects.values_list("pk", "title")[:10])
    raise Study.DoesNotExist(
        f"{what} with id or title {ref!r}; pass the numeric id of one of: {known or 'none yet'}."
    )


def method_unavailable_reason(name: str, *, dataset_id: int | None = None) -> str | None:
    """Why a registered method or variant cannot run on this installation (a required setting, such as a local
    model directory, is not set or names no directory here, and no registered model stands in for it), from
    its declaration; None when it can. With ``dataset_id`` only that data set's registered models stand in
    (as precompute plans them); without, any data set's."""
    from pathlib import Path

    from django.conf import settings

    from explain.methods import registered
    from explain.models import Backbone

    declared = registered(name).declaration
    missing, absent, kinds = [], [], []
    for argument, setting in declared.settings.items():
        kind = declared.setting_models.get(argument)
        value = getattr(settings, setting, None)
        if value and Path(value).is_dir():
            continue
        registered_models = Backbone.objects.filter(kind=kind, config__registered=True)
        if dataset_id is not None:
            registered_models = registered_models.filter(dataset=dataset_id)
        if kind and registered_models.exists():
            continue  # a registered model stands in for the setting (on its data set)
        (absent if value else missing).append(f"{setting}={value!r}" if value else setting)
        kinds += [kind] if kind else []
    if not missing and not absent:
        return None
    instead = f", or register a {' or '.join(kinds)} model (manage.py register_backbone)" if kinds else ""
    problems = []
    if missing:
        problems.append(
            f"needs the setting {', '.join(missing)} (a local model directory); set it and restart"
        )
    if absent:
        problems.append(f"{', '.join(absent)} is not a directory on this machine; correct it and restart")
    return "; ".join(problems) + instead


# What each kind of method shows a rater (MethodDeclaration.kind), for the study form's conditions grid.
METHOD_KIND_HELP = {
    "cell": (
        "cell method: marks regions of the query image and of a real image of the other class that tell the "
        "two classes apart (most methods: the feature cells whose swap flips the classifier's decision); "
        "raters see both images with those regions sharp"
    ),
    "generative": (
        "generative method: synthesises a counterfactual image of the other class from the query; raters see "
        "the query and the counterfactual with the changed region sharp"
    ),
}


def method_catalogue(*, dataset_id: int | None = None) -> list[dict]:
    """Every registered method and variant, from the methods' declarations: name, what it is (a variant says
    what it changes and why), its paper, and why it cannot run here (empty when it can; for a study, on its
    data set ``dataset_id``)."""
    from explain.methods import method_names, registered

    catalogue = []
    for name in method_names():
        entry = registered(name)
        title = (
            METHOD_KIND_HELP.get(entry.declaration.kind, f"{entry.declaration.kind} method")
            if entry.variant is None
            else (f"variant of {entry.method}: {entry.variant.reason}")
        )
        catalogue.append(
            {
                "name": name,
                "title": title,
                "paper": entry.declaration.paper,
                "unavailable": method_unavailable_reason(name, dataset_id=dataset_id) or "",
            }
        )
    return catalogue


def study_corrections(*, study: Study) -> list[dict]:
    """The study's corrections in force (a withdrawn one, and the withdrawal itself, are left out), oldest
    first: what the analysis applies and the report lists."""
    from .models import Correction

    all_ = list(
        Correction.objects.filter(study=study).select_related("author", "trial").order_by("created_at", "pk")
    )
    withdrawn = {c.withdrawn_id for c in all_ if c.kind == Correction.Kind.WITHDRAW}
    return [
        {
            "correction": c.pk,
            "kind": c.kind,
            "trial": c.trial_id,
            "assignment": c.assignment_id,
            "corrected_answer": c.corrected_answer,
            "reason": c.reason,
            "author": c.author.get_username(),
            "at": c.created_at.isoformat(),
        }
        for c in all_
        if c.kind != Correction.Kind.WITHDRAW and c.pk not in withdrawn
    ]


def corrections_apply(records: list[dict], corrections: list[dict]) -> list[dict]:
    """Tidy response records with the corrections applied: a corrected answer key changes ``correct_answer``
    and ``correct``; a dropped response or assignment is marked ``excluded`` with the correction's reason.
    Each touched record names its corrections in ``corrections``. The records are changed in place."""
    by_trial: dict[int, list[dict]] = {}
    by_assignment: dict[int, list[dict]] = {}
    for c in corrections:
        if c["trial"] is not None:
            by_trial.setdefault(c["trial"], []).append(c)
        if c["kind"] == "drop_assignment":
            by_assignment.setdefault(c["assignment"], []).append(c)
    for record in records:
        applied = by_trial.get(record["trial"], []) + by_assignment.get(record["assignment"], [])
        notes = []
        for c in applied:
            if c["kind"] == "answer_key":
                record["correct_answer"] = c["corrected_answer"]
                if record["correct"] is not None:
                    record["correct"] = int(record["answer"] == c["corrected_answer"])
            else:
                record["excluded"] = True
                reasons = [r for r in (record.get("exclusion_reasons") or "").split("; ") if r]
                record["exclusion_reasons"] = "; ".join(
                    [*reasons, f"correction {c['correction']}: {c['reason']}"]
                )
            notes.append(f"{c['correction']} ({c['kind']}, {c['author']}): {c['reason']}")
        record["corrections"] = "; ".join(notes)
    return records


def study_audit_log(*, study: Study) -> list[dict]:
    """Every change researchers made to the study, oldest first: when, who, what, the details."""
    from .models import AuditEntry

    return [
        {
            "at": e.at.isoformat(),
            "user": e.user.get_username() if e.user else "",
            "action": e.action,
            "detail": e.detail,
        }
        for e in AuditEntry.objects.filter(study=study).select_related("user").order_by("at", "pk")
    ]


@dataclass(frozen=True)
class MonitorCell:
    pair: ClassPair
    condition: Condition
    started: int
    completed: int
    timed_out: int
    excluded: int
    median_minutes: float | None


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def study_monitor(*, study: Study, excluded_assignments: set[int] | frozenset[int] = frozenset()) -> dict:
    """What a researcher follows while a study is live (pilot assignments left out): assignments started,
    completed, timed out and excluded per condition x pair cell with their median duration, the balance of
    completed assignments over the cells, and (when ``study.accuracy_visible``) test accuracy by condition.

    ``excluded_assignments``: ids the declared exclusion rules exclude (the analysis evaluates them); those
    with status excluded or a drop-assignment correction count as excluded too."""
    from .models import Block, Correction

    dropped = set(
        Correction.objects.filter(study=study, kind=Correction.Kind.DROP_ASSIGNMENT).values_list(
            "assignment_id", flat=True
        )
    ) | set(excluded_assignments)
    blocks = (
        Block.objects.filter(assignment__study=study, assignment__is_pilot=False)
        .select_related("assignment")
        .only(
            "pair_id",
            "condition_id",
            "assignment__status",
            "assignment__started_at",
            "assignment__completed_at",
        )
    )
    tally: dict[tuple[int, int], dict] = {}
    states: dict[int, tuple[str, float | None]] = {}  # assignment id -> (state, minutes when completed)
    for block in blocks:
        a = block.assignment
        cell = tally.setdefault(
            (block.pair_id, block.condition_id),
            {"started": 0, "completed": 0, "timed_out": 0, "excluded": 0, "minutes": []},
        )
        minutes = None
        if a.status == Assignment.Status.EXCLUDED or a.pk in dropped:
            state = "excluded"
        elif a.status == Assignment.Status.COMPLETED:
            state, minutes = "completed", (a.completed_at - a.started_at).total_seconds() / 60
            cell["minutes"].append(minutes)
        elif a.status == Assignment.Status.TIMED_OUT:
            state = "timed_out"
        elif a.status == Assignment.Status.STARTED:
            state = "started"
        else:  # returned
            continue
        cell[state] += 1
        states[a.pk] = (state, minutes)
    pairs = list(study.pairs.select_related("class_a", "class_b").order_by("pk"))
    conditions = list(study.conditions.order_by("method", "setup"))
    empty = {"started": 0, "completed": 0, "timed_out": 0, "excluded": 0, "minutes": []}
    rows = []
    for condition in conditions:
        cells = []
        for pair in pairs:
            t = tally.get((pair.pk, condition.pk), empty)
            cells.append(
                MonitorCell(
                    pair,
                    condition,
                    t["started"],
                    t["completed"],
                    t["timed_out"],
                    t["excluded"],
                    _median(t["minutes"]),
                )
            )
        rows.append({"condition": condition, "cells": cells})
    completed = [c.completed for r in rows for c in r["cells"]]
    all_minutes = [m for _, m in states.values() if m is not None]
    accuracy = study_accuracy_by_condition(study=study, excluded=dropped) if study.accuracy_visible else None
    return {
        "pairs": pairs,
        "rows": rows,
        "median_minutes": _median(all_minutes),
        "balance": {
            "min": min(completed, default=0),
            "max": max(completed, default=0),
            "balanced": (max(completed, default=0) - min(completed, default=0)) <= 1,
        },
        "totals": {  # assignments, each counted once (a cell counts each of its blocks)
            k: sum(1 for state, _ in states.values() if state == k)
            for k in ("started", "completed", "timed_out", "excluded")
        },
        "accuracy": accuracy,
    }


def study_accuracy_by_condition(*, study: Study, excluded: set[int]) -> list[dict]:
    """Test accuracy (catch trials and pilots left out, answer-key corrections applied) per condition."""
    corrections = study_corrections(study=study)
    keys = {c["trial"]: c["corrected_answer"] for c in corrections if c["kind"] == "answer_key"}
    dropped_trials = {c["trial"] for c in corrections if c["kind"] == "drop_response"}
    responses = Response.objects.filter(
        trial__block__assignment__study=study,
        trial__block__assignment__is_pilot=False,
        phase=Phase.TEST,
        trial__is_catch=False,
    ).values_list(
        "answer",
        "trial_id",
        "trial__correct_answer",
        "trial__block__condition_id",
        "trial__block__assignment_id",
    )
    tally: dict[int, list[int]] = {}
    for answer, trial_id, key, condition_id, assignment_id in responses:
        if assignment_id in excluded or trial_id in dropped_trials:
            continue
        right = answer == keys.get(trial_id, key)
        tally.setdefault(condition_id, []).append(int(right))
    return [
        {
            "condition": c,
            "responses": len(tally.get(c.pk, [])),
            "accuracy": (sum(tally[c.pk]) / len(tally[c.pk])) if tally.get(c.pk) else None,
        }
        for c in study.conditions.order_by("method", "setup")
    ]


def study_preview_example(*, study: Study) -> Explanation | None:
    """The stimulus an MTurk preview shows: the example pair's first, else the study's first."""
    candidates = usable_explanations(Explanation.objects.filter(study=study))
    if study.example_pair_id is not None:
        candidates = candidates.filter(pair_id=study.example_pair_id)
    return candidates.order_by("pk").first()


def study_closed_reason(*, study: Study, provider: str, cutoff, preview: bool = False) -> str | None:
    """Why ``study`` takes no new rater arriving through ``provider`` (said politely), or None when it does.
    ``cutoff``: assignments started before it and unfinished have run out of time and no longer count.
    ``preview``: an MTurk worker who has not accepted the HIT yet (asked not to accept it)."""
    platform = {
        ProviderIdentity.Provider.PROLIFIC: "your submission on Prolific",
        ProviderIdentity.Provider.MTURK: "the HIT on Mechanical Turk",
    }.get(provider)
    back = f" Please return {platform}; nothing else is needed." if platform else ""
    if preview:
        back = " Please do not accept this HIT."
    if study.status != Study.Status.LIVE:
        return f"Thank you for your interest. This study is not open at the moment.{back}"
    if provider == ProviderIdentity.Provider.DIRECT and not study.direct_link_open:
        return "Thank you for your interest. This study's link is closed; it takes no more participants."
    if study.max_raters is not None:
        taken = Assignment.objects.filter(study=study, is_pilot=False).filter(  # pilots take no place
            Q(status=Assignment.Status.COMPLETED)
            | Q(status=Assignment.Status.STARTED, started_at__gte=cutoff)
        )
        if taken.count() >= study.max_raters:
            return f"Thank you for your interest. This study is full: every place has been taken.{back}"
    return None


def assignment_failed_checks(*, assignment: Assignment) -> bool:
    """Whether the rater failed at least the study's declared number of attention checks (catch trials)."""
    limit = (assignment.study.exclusion_rules or {}).get("failed_catch_trials")
    if not limit:
        return False
    failed = (
        Trial.objects.filter(block__assignment=assignment, is_catch=True, response__isnull=False)
        .exclude(response__answer=F("correct_answer"))
        .count()
    )
    return failed >= limit


def assignment_prolific_code(*, assignment: Assignment) -> str:
    """The code Prolific gets for this rater's outcome (its completion codes are per study and outcome):
    failed attention checks, completed, or timed out; "" when the study set none for the outcome."""
    study = assignment.study
    if assignment.status == Assignment.Status.COMPLETED:
        if study.prolific_failed_check_code and assignment_failed_checks(assignment=assignment):
            return study.prolific_failed_check_code
        return study.prolific_completion_code or assignment.completion_code
    if assignment.status == Assignment.Status.TIMED_OUT:
        return study.prolific_timeout_code
    return ""
