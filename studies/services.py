"""Writes for studies, their design, raters and responses. Views, admin and tasks call these."""

import random
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID

from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Q
from django.utils import timezone

from explain.models import Classifier, ClassLabel, Dataset, Explanation, ExplanationDistractor
from explain.selectors import usable_explanations

from .models import (
    Assignment,
    AuditEntry,
    Block,
    ClassPair,
    Condition,
    ConsentText,
    Correction,
    Phase,
    ProviderIdentity,
    Rater,
    RaterEvent,
    Response,
    Study,
    Trial,
)
from .preregistration import plan_resolve
from .recruitment import ConsentDocument, consent_document, mturk_is_sandbox
from .selectors import (
    assignment_upcoming,
    rater_took_excluded_study,
    study_closed_reason,
    study_missing_stimuli,
    study_test_images,
)


@transaction.atomic
def study_create(
    *,
    title: str,
    dataset: Dataset,
    classifier: Classifier,
    methods: Iterable[str] = (),
    setups: Iterable[str] = (Condition.Setup.RANDOM, Condition.Setup.CONSISTENT),
    pairs: Iterable[tuple[ClassLabel, ClassLabel]] = (),
    **design: Any,
) -> Study:
    """A draft study with a condition per method x setup and the given (class A, class B) pairs."""
    study = Study(title=title, dataset=dataset, classifier=classifier, **design)
    study.full_clean()
    study.save()
    for method in methods:
        for setup in setups:
            condition_add(study=study, method=method, setup=setup)
    for class_a, class_b in pairs:
        class_pair_add(study=study, class_a=class_a, class_b=class_b)
    return study


def study_update(*, study: Study, **fields: Any) -> Study:
    """Change a study's fields; a live or closed study refuses design changes (``Study.clean``)."""
    for name, value in fields.items():
        setattr(study, name, value)
    study.full_clean()
    study.save(update_fields=[*fields, "updated_at"])
    return study


def class_pair_add(
    *,
    study: Study,
    class_a: ClassLabel,
    class_b: ClassLabel,
    mined_by: str = ClassPair.Mining.MANUAL,
    confusion_score: float | None = None,
) -> ClassPair:
    pair = ClassPair(
        study=study, class_a=class_a, class_b=class_b, mined_by=mined_by, confusion_score=confusion_score
    )
    pair.full_clean()
    pair.save()
    return pair


def condition_add(*, study: Study, method: str, setup: str) -> Condition:
    condition = Condition(study=study, method=method, setup=setup)
    condition.full_clean()
    condition.save()
    return condition


@transaction.atomic
def study_launch(*, study: Study) -> Study:
    """Open a ready study to raters, freezing its design. Refused, with the reason, unless every condition of
    every class pair has its learning stimuli."""
    study = Study.objects.select_for_update().get(pk=study.pk)
    if study.status == Study.Status.LIVE:
        return study
    if study.status == Study.Status.PAUSED:  # resume: same version, same raters
        study.status = Study.Status.LIVE
        study.save(update_fields=["status", "updated_at"])
        return study
    if study.status not in {Study.Status.READY, Study.Status.CLOSED}:
        raise ValidationError(
            f"Study {study.title!r} is {study.status}; only a ready study can go live. "
            "Precompute its explanations first."
        )
    problems = []
    if not study.pairs.exists():
        problems.append("it has no class pairs")
    if not study.conditions.exists():
        problems.append("it has no conditions (method x pair-selection setup)")
    missing = study_missing_stimuli(study=study)
    if (
        study.example_pair_id is not None
        and not usable_explanations(
            Explanation.objects.filter(study=study, pair_id=study.example_pair_id)
        ).exists()
    ):
        problems.append(f"its example pair {study.example_pair} has no stimulus to show; precompute it")
    if missing:
        listed = "; ".join(
            f"{m['pair']} / {m['condition']}: {m['have']} of {m['need']}" for m in missing[:10]
        )
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        problems.append(
            f"learning stimuli are missing for {len(missing)} pair x condition cells ({listed}{more})"
        )
    if problems:
        raise ValidationError(f"Study {study.title!r} cannot go live: {'; '.join(problems)}.")
    first_launch = study.status == Study.Status.READY
    if study.status == Study.Status.CLOSED:
        study.version += 1
    study.status, study.launched_at = Study.Status.LIVE, timezone.now()
    fields = ["status", "version", "launched_at", "updated_at"]
    if first_launch and study.preregistered_at is None:
        # The analysis plan is frozen at the first launch, with the exclusion rules declared then. A closed
        # study launched before plans were recorded has none, and its frozen data cannot gain one afterwards.
        study.preregistered_at = study.launched_at
        study.preregistration = plan_resolve(
            study.preregistration,
            exclusion_rules=study.exclusion_rules,
            frozen_at=study.launched_at.isoformat(),
        )
        fields += ["preregistration", "preregistered_at"]
    study.save(update_fields=fields)
    return study


def study_close(*, study: Study) -> Study:
    if study.status not in {Study.Status.LIVE, Study.Status.PAUSED}:
        raise ValidationError(
            f"Study {study.title!r} is {study.status}; only a live or paused study can be closed."
        )
    study.status = Study.Status.CLOSED
    study.save(update_fields=["status", "updated_at"])
    return study


def study_pause(*, study: Study) -> Study:
    """Stop taking new raters; those already working may finish. Launch resumes it (same version)."""
    if study.status != Study.Status.LIVE:
        raise ValidationError(f"Study {study.title!r} is {study.status}; only a live study can be paused.")
    study.status = Study.Status.PAUSED
    study.save(update_fields=["status", "updated_at"])
    return study


# What a copy does not take over: identity, state and history. Every other field (the design, recruitment
# settings, and fields added later) is copied.
NOT_COPIED = {
    "id", "title", "status", "version", "launched_at", "created_at", "updated_at", "copied_from",
    "copied_from_version", "unblinded_at", "unblinded_by",
}  # fmt: skip


@transaction.atomic
def study_copy(*, study: Study, user: Any = None, title: str = "") -> Study:
    """A new draft with the same design, class pairs, conditions and excluded studies; it notes the study
    and the version it was copied from. Its stimuli are precomputed afresh."""
    copy = Study(
        title=title or f"{study.title} (copy of v{study.version})",
        copied_from=study,
        copied_from_version=study.version,
        **{
            f.attname: getattr(study, f.attname)
            for f in Study._meta.concrete_fields
            if f.name not in NOT_COPIED and not f.auto_created
        },
    )
    copy.full_clean()
    copy.save()
    copy.excluded_studies.set(study.excluded_studies.all())
    for pair in study.pairs.all():
        class_pair_add(
            study=copy,
            class_a=pair.class_a,
            class_b=pair.class_b,
            mined_by=pair.mined_by,
            confusion_score=pair.confusion_score,
        )
    for condition in study.conditions.all():
        condition_add(study=copy, method=condition.method, setup=condition.setup)
    audit_record(
        study=copy,
        user=user,
        action="created as a copy",
        detail={"copied_from": study.pk, "copied_from_version": study.version},
    )
    audit_record(study=study, user=user, action="copied", detail={"copy": copy.pk})
    return copy


def audit_record(*, study: Study, user: Any, action: str, detail: dict | None = None) -> AuditEntry:
    """Append one researcher change to the study's audit log (never edited, never deleted)."""
    user_id = getattr(user, "pk", None)
    return AuditEntry.objects.create(study=study, user_id=user_id, action=action, detail=detail or {})


@transaction.atomic
def conditions_set(*, study: Study, chosen: Iterable[tuple[str, str]], user: Any = None) -> dict:
    """Make the study's conditions exactly ``chosen`` (method, setup) pairs; returns what was added and
    removed. A frozen study refuses any change."""
    wanted = set(chosen)
    current = {(c.method, c.setup): c for c in study.conditions.all()}
    added, removed = sorted(wanted - set(current)), sorted(set(current) - wanted)
    if (added or removed) and study.is_frozen:
        raise ValidationError(study.frozen_message())
    for method, setup in removed:
        current[(method, setup)].delete()
    for method, setup in added:
        condition_add(study=study, method=method, setup=setup)
    if added or removed:
        audit_record(
            study=study,
            user=user,
            action="conditions changed",
            detail={"added": [f"{m} / {s}" for m, s in added], "removed": [f"{m} / {s}" for m, s in removed]},
        )
    return {"added": added, "removed": removed}


def study_unblind(*, study: Study, user: Any) -> Study:
    """Show accuracy by condition before the study closes; recorded here, in the audit log and the report."""
    if study.unblinded_at is None:
        study.unblinded_at, study.unblinded_by = timezone.now(), user
        study.save(update_fields=["unblinded_at", "unblinded_by", "updated_at"])
        audit_record(study=study, user=user, action="unblinded accuracy by condition", detail={})
    return study


@transaction.atomic
def correction_add(
    *,
    study: Study,
    kind: str,
    reason: str,
    author: Any,
    trial: Trial | None = None,
    assignment: Assignment | None = None,
    corrected_answer: str = "",
    withdrawn: Correction | None = None,
) -> Correction:
    """Annotate a frozen study's data; the analysis applies it, the report lists it, the data stay as is."""
    if trial is not None and trial.block.assignment.study_id != study.pk:
        raise ValidationError(f"Trial {trial.pk} belongs to another study, not to {study.title!r}.")
    if assignment is not None and assignment.study_id != study.pk:
        raise ValidationError(f"Assignment {assignment.pk} belongs to another study, not to {study.title!r}.")
    if withdrawn is not None and withdrawn.study_id != study.pk:
        raise ValidationError(f"Correction {withdrawn.pk} belongs to another study, not to {study.title!r}.")
    if kind == Correction.Kind.ANSWER_KEY and trial is not None and trial.phase == Phase.LEARNING:
        raise ValidationError(f"Trial {trial.pk} is a learning trial; it has no answer key to correct.")
    if not reason or not reason.strip():
        raise ValidationError("A correction needs a reason; say why, it is printed in the report.")
    correction = Correction(
        study=study,
        kind=kind,
        trial=trial,
        assignment=assignment,
        corrected_answer=corrected_answer,
        withdrawn=withdrawn,
        reason=reason.strip(),
        author=author,
    )
    correction.full_clean()
    correction.save()
    audit_record(
        study=study,
        user=author,
        action="correction recorded",
        detail={"correction": correction.pk, "kind": kind, "reason": correction.reason},
    )
    return correction


@transaction.atomic
def pilot_assignment_create(*, study: Study, user: Any) -> Assignment:
    """A new pilot assignment for a researcher trying the study as a rater (before or after launch): its
    responses are flagged pilot, it does not count towards balance and the analysis leaves it out."""
    rater = Rater.objects.create()
    ProviderIdentity.objects.create(
        rater=rater,
        provider=ProviderIdentity.Provider.DIRECT,
        external_id=f"pilot-{getattr(user, 'pk', 'anonymous')}-{secrets.token_hex(6)}",
        extra={"pilot": True},
    )
    consent = consent_text_store(study=study, document=consent_document(study))
    assignment = assignment_create(  # consented: the researcher starts at the instructions
        study=study, rater=rater, provider=ProviderIdentity.Provider.DIRECT, pilot=True, consent=consent
    )
    audit_record(study=study, user=user, action="pilot assignment", detail={"assignment": assignment.pk})
    return assignment


def rater_identify(
    *, provider: str, external_id: str, extra: dict | None = None, simulated: bool = False
) -> Rater:
    """The rater behind a provider identity, created on first sight."""
    return _identity_get_or_create(provider, external_id, extra or {}, simulated)[0].rater


@transaction.atomic
def _identity_get_or_create(
    provider: str, external_id: str, extra: dict, simulated: bool
) -> tuple[ProviderIdentity, bool]:
    """The provider identity (with its rater), and whether it was created now. The database's unique
    constraint keeps it unique: a concurrent arrival of the same person raises ``IntegrityError`` here."""
    found = (
        ProviderIdentity.objects.select_related("rater")
        .filter(provider=provider, external_id=external_id)
        .first()
    )
    if found is not None:
        return found, False
    rater = Rater.objects.create(is_simulated=simulated)
    identity = ProviderIdentity(rater=rater, provider=provider, external_id=external_id, extra=extra)
    identity.full_clean(exclude=["rater"], validate_unique=False, validate_constraints=False)
    identity.save()
    return identity, True


class ResponseConflict(ValidationError):
    """A trial already has a different answer."""


def response_submit(
    *,
    trial: Trial,
    answer: str,
    client_rt_ms: int | None = None,
    client_sent_at: datetime | None = None,
    server_rt_ms: int | None = None,
    too_fast: bool = False,
) -> tuple[Response, bool]:
    """Save the answer to a trial, once. Returns (response, created).

    A repeat of the same answer (double click, network retry, reload) returns the stored response unchanged; a
    different answer to an answered trial is refused, so a rater cannot revise an answer with the back button.
    """
    allowed = {
        Phase.PRE_LEARNING: {"A", "B", "D"},
        Phase.LEARNING: {"seen"},
        Phase.TEST: {"A", "B"},
    }[Phase(trial.phase)]
    if answer not in allowed:
        raise ValidationError(
            f"Answer {answer!r} is not allowed in the {Phase(trial.phase).label} phase; "
            f"allowed: {', '.join(sorted(allowed))}."
        )
    if trial.block.assignment.status != Assignment.Status.STARTED:
        raise ValidationError(
            f"Assignment {trial.block.assignment_id} is {trial.block.assignment.status}; "
            "it takes no more answers."
        )
    response = Response(
        trial=trial,
        phase=trial.phase,
        answer=answer,
        client_rt_ms=client_rt_ms,
        client_sent_at=client_sent_at,
        server_rt_ms=server_rt_ms,
        too_fast=too_fast,
    )
    # The answer was checked against the phase above; the database checks it again (a CheckConstraint).
    response.full_clean(exclude=["trial"], validate_unique=False, validate_constraints=False)
    try:
        with transaction.atomic():
            response.save()
        return response, True
    except IntegrityError:  # answered before: a repeat, or a concurrent duplicate that won the race
        existing = Response.objects.get(trial=trial)
    if existing.answer != answer:
        raise ResponseConflict(
            f"Trial {trial.pk} was already answered {existing.answer!r}; "
            f"the new answer {answer!r} is refused."
        )
    return existing, False


# --- Assignment: which pairs and conditions a rater gets, and their trials ---


def assignment_cutoff(*, study: Study, now: datetime | None = None) -> datetime:
    """Assignments started before this and still unfinished have run out of time."""
    return (now or timezone.now()) - timedelta(minutes=study.time_limit_minutes)


def assignments_time_out(*, study: Study, now: datetime | None = None) -> int:
    """Mark the study's started assignments that passed its time limit as timed out; returns how many."""
    return Assignment.objects.filter(
        study=study, status=Assignment.Status.STARTED, started_at__lt=assignment_cutoff(study=study, now=now)
    ).update(status=Assignment.Status.TIMED_OUT)


def _least(options: list, key, rng: random.Random):
    """The option with the smallest key; ties broken by ``rng``."""
    best = min(key(o) for o in options)
    return rng.choice([o for o in options if key(o) == best])


def _cell_counts(study: Study, now: datetime) -> Counter:
    """(pair id, condition id) -> blocks of completed assignments and of those started within the limit."""
    live = Q(assignment__status=Assignment.Status.COMPLETED) | Q(
        assignment__status=Assignment.Status.STARTED,
        assignment__started_at__gte=assignment_cutoff(study=study, now=now),
    )
    rows = (
        Block.objects.filter(live, assignment__study=study, assignment__is_pilot=False)
        .values("pair_id", "condition_id")
        .annotate(n=Count("pk"))
    )
    return Counter({(r["pair_id"], r["condition_id"]): r["n"] for r in rows})


def _blocks_plan(
    study: Study, pairs: list[int], conditions: list[int], counts: Counter, rng: random.Random
) -> list[tuple[int, int]]:
    """Balanced (pair id, condition id) blocks for one new rater, in the order they will see them."""
    k = min(study.pairs_per_assignment or len(pairs), len(pairs))
    plan: list[tuple[int, int]] = []
    if study.design == Study.Design.BETWEEN:
        condition = _least(conditions, lambda c: sum(counts[(p, c)] for p in pairs), rng)
        remaining = list(pairs)
        for _ in range(k):
            pair = _least(remaining, lambda p: counts[(p, condition)], rng)
            remaining.remove(pair)
            plan.append((pair, condition))
    else:
        remaining = list(pairs)
        used: Counter = Counter()
        for _ in range(k):
            pair = _least(remaining, lambda p: sum(counts[(p, c)] for c in conditions), rng)
            remaining.remove(pair)
            condition = _least(conditions, lambda c, p=pair: (used[c], counts[(p, c)]), rng)
            used[condition] += 1
            plan.append((pair, condition))
    rng.shuffle(plan)
    return plan


class Stimulus(NamedTuple):
    """A usable explanation as a new assignment needs it (ids only)."""

    pk: int
    pair_id: int
    condition_id: int
    query_image_id: int
    distractor_image_ids: tuple[int, ...]  # by rank


@dataclass(frozen=True)
class StudyMaterial:
    """What every new assignment of a study draws from, whoever the rater: the assignable pairs and the
    conditions (ids, by pk), each pair's test images (``pair_test_images``) and each (pair, condition) cell's
    usable explanations (by pk)."""

    pairs: list[int]
    conditions: list[int]
    test_images: dict[int, list[tuple[int, str]]]
    stimuli: dict[tuple[int, int], list[Stimulus]]


# A frozen study's material changes only if its explanations or its data set's images are edited while it is
# live; a new assignment may draw from a copy this many seconds old (each web process reads it once a period).
MATERIAL_CACHE_SECONDS = 60


def study_material(*, study: Study) -> StudyMaterial:
    """The study's ``StudyMaterial``: six queries, however many pairs, conditions and stimuli; for a live or
    paused study read once and kept in the cache (``MATERIAL_CACHE_SECONDS``), keyed by everything of the
    study it depends on, so a relaunch (a new version) reads it afresh."""
    key = None
    if study.is_frozen:
        depends_on = (
            study.pk, study.version, study.launched_at and study.launched_at.timestamp(), study.seed,
            study.n_prelearning, study.n_test, study.dataset_id, study.classifier_id, study.example_pair_id,
        )  # fmt: skip
        key = "foil:study-material:" + ":".join(str(v) for v in depends_on)
        found = cache.get(key)
        if found is not None:
            return found
    pairs = list(study.pairs.exclude(pk=study.example_pair_id).order_by("pk"))
    conditions = list(study.conditions.order_by("pk").values_list("pk", flat=True))
    test_images = study_test_images(study=study, pairs=pairs) if pairs and conditions else {}
    usable = usable_explanations(Explanation.objects.filter(study=study)).order_by("pk")
    distractors: dict[int, list[int]] = {}
    for explanation_id, image_id in ExplanationDistractor.objects.filter(
        explanation__study=study
    ).values_list("explanation_id", "image_id"):  # by explanation and rank (the model's ordering)
        distractors.setdefault(explanation_id, []).append(image_id)
    stimuli: dict[tuple[int, int], list[Stimulus]] = {}
    for pk, pair_id, condition_id, query_image_id in usable.values_list(
        "pk", "pair_id", "condition_id", "query_image_id"
    ):
        stimuli.setdefault((pair_id, condition_id), []).append(
            Stimulus(pk, pair_id, condition_id, query_image_id, tuple(distractors.get(pk, ())))
        )
    material = StudyMaterial([p.pk for p in pairs], conditions, test_images, stimuli)
    if key is not None:
        cache.set(key, material, timeout=MATERIAL_CACHE_SECONDS)
    return material


def _example_for(study: Study, material: StudyMaterial, plan: list[tuple[int, int]]) -> int | None:
    """The instructions' example for a rater taught ``plan``: from the study's example pair when it has one,
    else from a pair the rater is not assigned (never one of their own stimuli), preferring the rater's
    conditions; None when there is none."""
    pair_ids, condition_ids = {p for p, _ in plan}, {c for _, c in plan}
    candidates = [
        e
        for (pair_id, _), found in material.stimuli.items()
        if pair_id not in pair_ids and (study.example_pair_id is None or pair_id == study.example_pair_id)
        for e in found
    ]
    example = min(candidates, key=lambda e: (e.condition_id not in condition_ids, e.pk), default=None)
    return example.pk if example else None


def _block_trials(
    study: Study,
    block: Block,
    test_images: list[tuple[int, str]],
    usable: list[Stimulus],
    rng: random.Random,
) -> list[Trial]:
    """Pre-learning, learning and test trials of one block (the first ``n_learning`` of its cell's ``usable``
    explanations); orders drawn from the rater's ``rng``."""
    explanations = usable[: study.n_learning]
    if len(explanations) < study.n_learning:
        raise ValidationError(
            f"Pair {block.pair_id} / condition {block.condition_id} has {len(explanations)} flipped "
            f"explanations; the learning phase shows {study.n_learning}. Precompute the missing ones."
        )
    trials = [
        Trial(block=block, phase=Phase.PRE_LEARNING, position=i, image_id=image_id, correct_answer=side)
        for i, (image_id, side) in enumerate(rng.sample(test_images, len(test_images))[: study.n_prelearning])
    ]
    trials += [
        Trial(block=block, phase=Phase.LEARNING, position=i, explanation_id=e.pk)
        for i, e in enumerate(rng.sample(explanations, len(explanations)))
    ]
    test = [
        Trial(phase=Phase.TEST, image_id=image_id, correct_answer=side)
        for image_id, side in rng.sample(test_images, len(test_images))[: study.n_test]
    ]
    for i, e in enumerate(rng.sample(explanations, min(study.catch_trials_per_pair, len(explanations)))):
        # A catch trial shows a learning stimulus again; the rater was just told which class it shows.
        if i % 2 == 1 and e.distractor_image_ids:
            catch = Trial(phase=Phase.TEST, image_id=e.distractor_image_ids[0], correct_answer="B")
        else:
            catch = Trial(phase=Phase.TEST, image_id=e.query_image_id, correct_answer="A")
        catch.explanation_id, catch.is_catch = e.pk, True
        test.insert(rng.randrange(len(test) + 1), catch)
    for i, trial in enumerate(test):
        trial.block, trial.position = block, i
    return trials + test


class RaterRefused(Exception):
    """A person may not (or no longer) take part; ``reason`` is a short code, ``message`` is for them."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@transaction.atomic
def assignment_create(
    *,
    study: Study,
    rater: Rater,
    provider: str,
    seed: int | None = None,
    now: datetime | None = None,
    pilot: bool = False,
    consent: ConsentText | None = None,
) -> Assignment:
    """A new assignment with all its blocks and trials, balanced across conditions and class pairs.

    Balance counts completed assignments plus those started within the time limit, so that dropouts are
    refilled. The study row is locked while counting, so concurrent arrivals are balanced too (and a full
    study, ``Study.max_raters``, refuses with ``RaterRefused``). ``seed`` (drawn at random when not given, and
    recorded) fixes the rater's image orders and answer-button sides. The example pair is never assigned.
    ``consent``: the consent text the rater agreed to, recorded with the assignment.

    A constant number of statements, however many pairs and trials: the study's material (``study_material``,
    cached), the time-out update, then under the study lock the existing assignment, the balance counts and
    three inserts (the assignment, its blocks, its trials).
    """
    now = now or timezone.now()
    if consent is not None and consent.study_id != study.pk:
        raise ValidationError(
            f"Consent text {consent.pk} belongs to study {consent.study_id}, not to study {study.pk}."
        )
    # Everything that does not depend on the other raters is read before the study row is locked: when a crowd
    # arrives at once, their arrivals queue on that lock, so it is held only for counting and writing.
    assignments_time_out(study=study, now=now)
    material = study_material(study=study)
    if not material.pairs or not material.conditions:
        raise ValidationError(
            f"Study {study.title!r} has {len(material.pairs)} class pairs and {len(material.conditions)} "
            "conditions; it needs at least one of each before raters can be assigned."
        )
    study = Study.objects.select_for_update().get(pk=study.pk)
    existing = Assignment.objects.filter(rater=rater, study=study).first()
    if existing is not None:
        return existing
    if study.max_raters is not None and not pilot:
        closed = study_closed_reason(
            study=study, provider=provider, cutoff=assignment_cutoff(study=study, now=now)
        )
        if closed is not None:
            raise RaterRefused("closed", closed)
    seed = secrets.randbits(62) if seed is None else seed
    rng = random.Random(seed)
    plan = _blocks_plan(study, material.pairs, material.conditions, _cell_counts(study, now), rng)
    assignment = Assignment(
        rater=rater, study=study, study_version=study.version, provider=provider, seed=seed, is_pilot=pilot
    )
    if consent is not None:
        assignment.consent, assignment.consented_at = consent, now
    blocks: list[Block] = []
    trials: list[Trial] = []
    for position, (pair_id, condition_id) in enumerate(plan):
        block = Block(
            assignment=assignment,
            position=position,
            pair_id=pair_id,
            condition_id=condition_id,
            a_on_left=rng.random() < 0.5,
        )
        blocks.append(block)
        trials += _block_trials(
            study,
            block,
            material.test_images[pair_id],
            material.stimuli.get((pair_id, condition_id), []),
            rng,
        )
    assignment.example_explanation_id = _example_for(study, material, plan)
    assignment.save()
    Block.objects.bulk_create(blocks)
    Trial.objects.bulk_create(trials)
    return assignment


def _identify(
    provider: str, external_id: str, extra: dict, simulated: bool, study: Study
) -> tuple[Rater, bool]:
    """The rater, and whether they are new. ``extra`` (the platform's ids) is kept for ``study`` as
    ``identity_extra_update`` keeps it, in the same write as the identity for a new rater."""
    stored = {**extra, f"study-{study.pk}": extra} if extra else {}
    try:
        identity, created = _identity_get_or_create(provider, external_id, stored, simulated)
    except IntegrityError:  # the same person arrived twice at once; the other request created them
        identity = ProviderIdentity.objects.select_related("rater").get(
            provider=provider, external_id=external_id
        )
        created = False
    if extra and not created:
        _identity_extra_keep(identity, study, extra)
    return identity.rater, created


def assignment_for(
    *,
    study: Study,
    provider: str,
    external_id: str,
    extra: dict | None = None,
    simulated: bool = False,
    now: datetime | None = None,
    consent: ConsentText | None = None,
) -> Assignment:
    """The assignment of the person behind a provider identity: theirs if they have one (to resume, or to see
    their completion code again), else a new one (consented to ``consent`` when given). Refused
    (``RaterRefused``) when the study is not live, when they ran out of time or returned it, or when they took
    a study this one excludes."""
    now = now or timezone.now()
    if external_id is None or not str(external_id).strip():
        raise RaterRefused("no_id", f"No {provider} participant id was given; open the study from its link.")
    rater, new = _identify(provider, str(external_id).strip(), extra or {}, simulated, study)
    # A rater first seen now has no assignment, in this study or an excluded one.
    assignment = None if new else Assignment.objects.filter(rater=rater, study=study).first()
    if assignment is not None:
        assignment.rater = rater
    if assignment is None:
        earlier = None if new else rater_took_excluded_study(rater_id=rater.pk, study=study)
        if earlier is not None:
            raise RaterRefused(
                "excluded",
                "Thank you for your interest. You took part in an earlier, related study, so you "
                "cannot take part in this one.",
            )
        # A HIT from MTurk's sandbox is someone trying it unpaid: a pilot, never data, and only while the
        # study takes sandbox workers.
        sandbox = provider == ProviderIdentity.Provider.MTURK and mturk_is_sandbox(
            (extra or {}).get("turkSubmitTo", "")
        )
        if sandbox and not study.mturk_sandbox:
            raise RaterRefused(
                "sandbox",
                "This study no longer takes workers from Mechanical Turk's sandbox. Please return the HIT; "
                "nothing you did here is counted.",
            )
        closed = study_closed_reason(
            study=study, provider=provider, cutoff=assignment_cutoff(study=study, now=now)
        )
        if closed is not None:
            raise RaterRefused("closed", closed)
        try:
            assignment = assignment_create(
                study=study, rater=rater, provider=provider, now=now, consent=consent, pilot=sandbox
            )
        except IntegrityError:  # a concurrent request of the same rater created it first
            assignment = Assignment.objects.get(rater=rater, study=study)
    return assignment_check_time(assignment=assignment, now=now)


def identity_extra_update(*, rater: Rater, provider: str, study: Study, extra: dict) -> ProviderIdentity:
    """Keep the platform's latest ids for this study (MTurk gives a new assignmentId when a worker returns a
    HIT and accepts it again; the final form must post the new one, or MTurk refuses it and the worker is not
    paid)."""
    return _identity_extra_keep(ProviderIdentity.objects.get(rater=rater, provider=provider), study, extra)


def _identity_extra_keep(identity: ProviderIdentity, study: Study, extra: dict) -> ProviderIdentity:
    key = f"study-{study.pk}"
    if identity.extra.get(key) != extra:
        identity.extra = {**identity.extra, key: extra}
        identity.save(update_fields=["extra"])
    return identity


def assignment_check_time(*, assignment: Assignment, now: datetime | None = None) -> Assignment:
    """Mark a started assignment past its study's time limit as timed out."""
    if assignment.status == Assignment.Status.STARTED and assignment.started_at < assignment_cutoff(
        study=assignment.study, now=now
    ):
        assignment.status = Assignment.Status.TIMED_OUT
        assignment.save(update_fields=["status"])
    return assignment


def consent_text_store(*, study: Study, document: ConsentDocument) -> ConsentText:
    """The stored version of a consent document (one row per distinct text of a study). A stored text never
    changes (its digest is its identity), so the row is kept in the cache once read."""
    key = f"foil:consent-text:{study.pk}:{document.digest}"
    found = cache.get(key)
    if found is not None:
        return found
    try:
        with transaction.atomic():
            found, created = ConsentText.objects.get_or_create(
                study=study, digest=document.digest, defaults={"text": document.text}
            )
    except IntegrityError:  # stored by a concurrent request
        found, created = ConsentText.objects.get(study=study, digest=document.digest), False
    if created:  # kept once it is sure to stay
        transaction.on_commit(lambda: cache.set(key, found, timeout=None))
    else:
        cache.set(key, found, timeout=None)
    return found


def assignment_consent(*, assignment: Assignment, consent: ConsentText) -> Assignment:
    """Record that the rater agreed, and to which text."""
    if consent.study_id != assignment.study_id:
        raise ValidationError(
            f"Consent text {consent.pk} belongs to study {consent.study_id}, not to the assignment's study "
            f"{assignment.study_id}."
        )
    if assignment.consented_at is None:
        assignment.consented_at, assignment.consent = timezone.now(), consent
        assignment.save(update_fields=["consented_at", "consent"])
    return assignment


def assignment_instructed(*, assignment: Assignment) -> Assignment:
    if assignment.consented_at is None:
        raise ValidationError("The instructions come after consent; give consent first.")
    if assignment.instructed_at is None:
        assignment.instructed_at = timezone.now()
        assignment.save(update_fields=["instructed_at"])
    return assignment


def trial_shown(*, trial: Trial, now: datetime | None = None) -> Trial:
    """Record when a trial was first sent to the rater (the server's start of its reaction time)."""
    if trial.shown_at is None:
        now = now or timezone.now()
        # Plain SQL, as the rater pages' reads (studies.selectors): every new trial page runs it.
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE studies_trial SET shown_at = %s WHERE id = %s AND shown_at IS NULL", [now, trial.pk]
            )
        trial.shown_at = now
    return trial


@transaction.atomic
def assignment_complete(*, assignment: Assignment, now: datetime | None = None) -> Assignment:
    """Mark an assignment whose every trial is answered as completed and give it its completion code."""
    assignment = Assignment.objects.select_for_update().select_related("study").get(pk=assignment.pk)
    if assignment.status == Assignment.Status.COMPLETED:
        return assignment
    unanswered = Trial.objects.filter(block__assignment=assignment, response__isnull=True).count()
    if unanswered:
        raise ValidationError(f"Assignment {assignment.pk} still has {unanswered} unanswered trials.")
    assignment.status, assignment.completed_at, assignment.completion_code = (
        Assignment.Status.COMPLETED,
        now or timezone.now(),
        completion_code_new(prefix=assignment.study.completion_code),
    )
    assignment.save(update_fields=["status", "completed_at", "completion_code"])
    return assignment


# Letters and digits that cannot be misread for one another (no I/1, O/0); 10 of them carry 50 random bits.
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def completion_code_new(*, prefix: str = "", length: int = 10) -> str:
    """A completion code no assignment has yet: ``prefix-`` and random letters (unique in the database
    too)."""
    for _ in range(100):
        code = (f"{prefix}-" if prefix else "") + "".join(
            secrets.choice(CODE_ALPHABET) for _ in range(length)
        )
        if not Assignment.objects.filter(completion_code=code).exists():
            return code
    raise ValidationError(
        f"No unused completion code with prefix {prefix!r} in 100 draws; lengthen the codes."
    )


class TrialNotCurrent(ValidationError):
    """An answer to a trial the rater has not reached yet (or one their assignment no longer takes)."""


class TooSoon(ValidationError):
    """A learning stimulus left before the study's minimum viewing time."""


@dataclass(frozen=True)
class AnswerOutcome:
    response: Response
    created: bool  # False for a repeat (double click, retry, back button, reload)
    completed: bool  # whether this answer finished the assignment


# Slack for the minimum viewing time: the browser starts counting a little after the server sent the page.
MIN_VIEWING_SLACK_S = 0.25


def trial_answer(
    *,
    assignment: Assignment,
    trial_key: UUID | str,
    answer: str,
    client_rt_ms: int | None = None,
    now: datetime | None = None,
    trial: Trial | None = None,
) -> AnswerOutcome:
    """Save a rater's answer to one of their trials, exactly once.

    A repeat of an answered trial returns the stored response (whatever was sent the second time: the first
    answer stands). Only the first unanswered trial takes a new answer; a learning stimulus only after the
    study's minimum viewing time. Reaction time is kept as measured by the browser and by the server (from
    when the trial was first sent). Raises ``Trial.DoesNotExist`` for a trial that is not the rater's.
    ``trial`` (this trial with its block, assignment and study loaded) saves a query when the caller has it.
    """
    now = now or timezone.now()
    if trial is None or str(trial.key) != str(trial_key) or trial.block.assignment_id != assignment.pk:
        trial = Trial.objects.select_related("block__assignment__study").get(
            key=trial_key, block__assignment=assignment
        )
    assignment = trial.block.assignment
    study = assignment.study
    assignment_check_time(assignment=assignment, now=now)
    upcoming = []
    if assignment.status == Assignment.Status.STARTED:
        upcoming = [t.pk for t in assignment_upcoming(assignment=assignment)]
    if not upcoming or upcoming[0] != trial.pk:
        # Not the current trial: a repeat of an answer (double click, retry, back button), or out of turn.
        existing = Response.objects.filter(trial=trial).first()
        if existing is not None:
            return AnswerOutcome(existing, False, assignment.status == Assignment.Status.COMPLETED)
        if assignment.status != Assignment.Status.STARTED:
            raise TrialNotCurrent(
                f"Assignment {assignment.pk} is {assignment.status}; it takes no more answers."
            )
        raise TrialNotCurrent(f"Trial {trial.key} is not the rater's current trial.")
    server_rt_ms = round((now - trial.shown_at).total_seconds() * 1000) if trial.shown_at else None
    if trial.phase == Phase.LEARNING:
        if server_rt_ms is None or server_rt_ms < (study.min_learning_seconds - MIN_VIEWING_SLACK_S) * 1000:
            raise TooSoon(
                f"Trial {trial.key} was left after {server_rt_ms} ms; the minimum is "
                f"{study.min_learning_seconds} s."
            )
    if client_rt_ms is not None and not 0 <= client_rt_ms <= 24 * 3600 * 1000:
        client_rt_ms = None
    rt = client_rt_ms if client_rt_ms is not None else server_rt_ms
    too_fast = trial.phase != Phase.LEARNING and rt is not None and rt < study.min_rt_ms
    response, created = response_submit(
        trial=trial,
        answer=answer,
        client_rt_ms=client_rt_ms,
        server_rt_ms=server_rt_ms,
        client_sent_at=now,
        too_fast=too_fast,
    )
    completed = False
    if created and len(upcoming) == 1:  # that was the last unanswered trial
        completed = assignment_complete(assignment=assignment, now=now).status == Assignment.Status.COMPLETED
    return AnswerOutcome(response, created, completed)


def rater_event_log(
    *, assignment: Assignment, kind: str, trial_key: str | None = None, client_ms: int | None = None
) -> RaterEvent:
    """Log a focus/blur/visibility event the rater's browser reported."""
    if kind not in RaterEvent.Kind.values:
        raise ValidationError(f"Unknown event {kind!r}; known: {', '.join(RaterEvent.Kind.values)}.")
    trial = None
    if trial_key:
        trial = Trial.objects.filter(key=trial_key, block__assignment=assignment).only("pk").first()
    return RaterEvent.objects.create(assignment=assignment, trial=trial, kind=kind, client_ms=client_ms)


def raters_mark_simulated(*, opaque_ids: Iterable[str]) -> int:
    """Mark the raters with these opaque ids as simulated learners (exports and reports say so)."""
    return Rater.objects.filter(opaque_id__in=list(opaque_ids)).update(is_simulated=True)


@transaction.atomic
def study_pairs_add(*, study: Study, pairs: list[dict[str, Any]]) -> list[ClassPair]:
    """Add mined pairs (from ``explain.selectors.mined_pairs``) to a study; pairs it already has are kept."""
    added = []
    for pair in pairs:
        if ClassPair.objects.filter(study=study, class_a=pair["class_a"], class_b=pair["class_b"]).exists():
            continue
        mined_by = ClassPair.Mining.ATTRIBUTES if pair["method"] == "attributes" else pair["method"]
        added.append(
            class_pair_add(
                study=study,
                class_a=pair["class_a"],
                class_b=pair["class_b"],
                mined_by=mined_by,
                confusion_score=pair["score"],
            )
        )
    return added
