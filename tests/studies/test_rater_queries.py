"""The three requests a crowd of raters makes cost a few queries each, however long the assignment."""

import random
import uuid
from collections import Counter

import pytest
from django.core.cache import cache
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from studies import services
from studies.models import Assignment, Condition, Phase, Rater, Response, Trial
from studies.selectors import assignment_by_token, assignment_upcoming, rater_trial, trial_image_name
from tests.studies.builders import data_guards_off, live_study
from tests.studies.walk import ClientRater, body

PROLIFIC = {"PROLIFIC_PID": "counted", "STUDY_ID": "s", "SESSION_ID": "x"}


def _queries_per_request(study) -> dict[str, set[int]]:
    """Walk every trial; the numbers of SQL statements the trial page, its images and the answer ran."""
    rater = ClientRater()
    page = rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC))
    page = rater.post(page.form.action, dict(page.form.fields))
    counts: dict[str, set[int]] = {"page": set(), "image": set(), "answer": set()}
    go = rater.url("go")
    while page.step == "trial":
        for src in page.images:
            with CaptureQueriesContext(connection) as queries:
                response = rater.client.get(src)
            assert response.status_code == 200 and body(response)
            counts["image"].add(len(queries))
        with CaptureQueriesContext(connection) as queries:
            response = rater.client.post(
                page.form.action, {**page.form.fields, "answer": page.form.buttons[0][1]}
            )
        assert response.status_code == 302
        counts["answer"].add(len(queries))
        with CaptureQueriesContext(connection) as queries:
            page = rater._page(rater.client.get(go))
        if page.step == "trial":
            counts["page"].add(len(queries))
    assert page.step == "done"
    assert Response.objects.count() == Trial.objects.count()
    return counts


@pytest.mark.django_db
def test_trial_page_answer_and_image_run_a_constant_few_queries():
    small = _queries_per_request(live_study(n_pairs=1, n_images=2, n_learning=1))
    large = _queries_per_request(live_study(n_pairs=3, n_images=6, n_learning=3, catch_trials_per_pair=2))
    assert small == large  # no query per trial, block or response
    # The page: the assignment, the current step (one query), the time it was first shown.
    assert large["page"] == {3}
    # The answer: the trial, the current step, the insert in its savepoint; the last answer also completes the
    # assignment in a transaction of its own (savepoint, lock, count of unanswered trials, the check that the
    # rater's new completion code is unique, update).
    assert large["answer"] == {5, 5 + 6}
    assert large["image"] == {1}


def _consent_queries(study, arrivals: int = 3) -> list[int]:
    """The SQL statements of each of ``arrivals`` new raters' consent POSTs (each creates an assignment)."""
    counts = []
    for i in range(arrivals):
        rater = ClientRater()
        query = {**PROLIFIC, "PROLIFIC_PID": f"arrival-{study.pk}-{i}"}
        page = rater.get(reverse("studies:entry", args=[study.pk]), **query)
        assert page.step == "consent"
        with CaptureQueriesContext(connection) as queries:
            response = rater.client.post(page.form.action, {**page.form.fields, "consent": "yes"})
        assert response.status_code == 302, response.content[:300]
        counts.append(len(queries))
    return counts


@pytest.mark.django_db
def test_a_new_assignment_at_consent_runs_a_constant_few_queries():
    small = live_study(n_pairs=1, n_images=2, n_learning=1, setups=(Condition.Setup.RANDOM,))
    large = live_study(n_pairs=4, n_images=6, n_learning=3, catch_trials_per_pair=2)
    counts = {"small": _consent_queries(small), "large": _consent_queries(large)}
    trials = {
        name: Trial.objects.filter(block__assignment__study=study).count() // 3
        for name, study in [("small", small), ("large", large)]
    }
    assert trials["large"] >= 8 * trials["small"]  # 4 blocks of 17 trials against 1 block of 5
    assert counts["small"] == counts["large"]  # no query per pair, condition, block, trial or stimulus
    first, second, third = counts["large"]
    # Every arrival: the study; the rater's identity (savepoint, look-up, two inserts, release); the
    # assignment (savepoint, time-outs, lock, existing, balance counts, three inserts, release).
    assert third == 1 + 5 + 9
    # The first reads the study's material (pairs, conditions, two for test images, explanations,
    # distractors), kept in the cache, and stores the consent text (savepoint, look-up, insert in a savepoint
    # of its own, release). The second finds the text (savepoint, look-up, release) and caches it; in
    # production the first arrival caches it once its insert commits (the test's transaction never commits).
    assert first == third + 6 + 6 and second == third + 3


@pytest.mark.django_db
def test_the_cached_material_makes_the_same_assignments_as_a_fresh_read():
    study = live_study(n_pairs=3, n_images=4, n_learning=2, catch_trials_per_pair=2, pairs_per_assignment=2)

    def layout(seed: int) -> tuple[list, int]:
        """A new assignment's whole layout and the statements it took, then rolled back (same state)."""
        with transaction.atomic(), CaptureQueriesContext(connection) as queries:
            rater = Rater.objects.create()
            a = services.assignment_create(study=study, rater=rater, provider="direct", seed=seed)
            trials = Trial.objects.filter(block__assignment=a).order_by(
                "block__position", "phase", "position"
            )
            blocks = a.blocks.order_by("position").values_list("pair_id", "condition_id", "a_on_left")
            found = [a.example_explanation_id, list(blocks)] + [
                (t.phase, t.image_id, t.explanation_id, t.correct_answer, t.is_catch) for t in trials
            ]
            transaction.set_rollback(True)
        return found, len(queries)

    for seed in range(6):
        cache.clear()
        fresh, fresh_queries = layout(seed)
        cached, cached_queries = layout(seed)
        assert cached == fresh
        assert fresh_queries == cached_queries + 6  # the material came from the cache the second time


def _reference_upcoming(assignment) -> list[tuple]:
    """The plain ORM version of ``assignment_upcoming``: every trial, sorted and counted in Python."""
    order = {Phase.PRE_LEARNING: 0, Phase.LEARNING: 1, Phase.TEST: 2}
    trials = sorted(
        Trial.objects.filter(block__assignment=assignment).select_related("block"),
        key=lambda t: (t.block.position, order[t.phase], t.position),
    )
    answered = set(Response.objects.filter(trial__in=trials).values_list("trial_id", flat=True))
    n_blocks = len({t.block_id for t in trials})
    phase_size = Counter((t.block_id, t.phase) for t in trials)
    return [
        (t.pk, t.block.position, t.block.a_on_left, n_blocks, phase_size[(t.block_id, t.phase)])
        for t in trials
        if t.pk not in answered
    ]


@pytest.mark.django_db
def test_the_plain_sql_reads_agree_with_the_orm_on_random_answer_states():
    rng = random.Random(7)
    study = live_study(n_pairs=3, n_images=3, n_learning=2, catch_trials_per_pair=1, pairs_per_assignment=2)
    for i in range(4):
        rater = Rater.objects.create()
        assignment = services.assignment_create(study=study, rater=rater, provider="direct")
        trials = list(
            Trial.objects.filter(block__assignment=assignment).select_related("image", "explanation")
        )
        # Answers in any order, as no rater could give them: the reads must not assume the rater's order.
        for trial in rng.sample(trials, rng.randrange(len(trials) + 1)):
            Response.objects.create(trial=trial, phase=trial.phase, answer=trial.correct_answer or "seen")
        want = _reference_upcoming(assignment)
        for limit in (1, 2, len(trials)):
            got = [
                (t.pk, t.block.position, t.block.a_on_left, t.n_pairs, t.phase_total)
                for t in assignment_upcoming(assignment=assignment, limit=limit)
            ]
            assert got == want[:limit], (i, limit)
        for trial in trials:
            if trial.phase == Phase.LEARNING:
                expected = {
                    1: trial.explanation.query_stimulus.name,
                    2: trial.explanation.distractor_stimulus.name,
                }
            elif trial.is_catch:
                e = trial.explanation
                expected = {
                    1: (e.query_stimulus if trial.correct_answer == "A" else e.distractor_stimulus).name
                }
            else:
                expected = {1: trial.image.file.name}
            for slot in (1, 2, 3):
                name = trial_image_name(key=trial.key, token=assignment.token, slot=slot)
                assert name == expected.get(slot), (trial.phase, slot)
                other = trial_image_name(key=trial.key, token=uuid.uuid4().hex, slot=slot)
                assert other is None


def _fields(instance) -> dict:
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


@pytest.mark.django_db
def test_the_plain_sql_rater_look_ups_agree_with_the_orm():
    study = live_study(n_pairs=2, n_images=2, n_learning=1, catch_trials_per_pair=1)
    # JSON, dates and nullable fields with values, so that every conversion is exercised.
    study.exclusion_rules = {"failed_catch_trials": 1, "too_fast_share": 0.5}
    study.launched_at = study.preregistered_at = timezone.now()
    with data_guards_off():
        study.save()
    assignments = [
        services.assignment_create(study=study, rater=Rater.objects.create(), provider="direct")
        for _ in range(2)
    ]
    for assignment in assignments:
        got = assignment_by_token(token=assignment.token)
        want = Assignment.objects.select_related("study", "rater").get(token=assignment.token)
        assert _fields(got) == _fields(want)
        assert _fields(got.study) == _fields(want.study) and _fields(got.rater) == _fields(want.rater)
        assert (
            isinstance(got.study.exclusion_rules, dict) and got.study.exclusion_rules["too_fast_share"] == 0.5
        )
        for trial in Trial.objects.filter(block__assignment=assignment):
            got = rater_trial(token=assignment.token, key=trial.key)
            want = Trial.objects.select_related("block__assignment__study", "block__assignment__rater").get(
                pk=trial.pk
            )
            for a, b in [
                (got, want),
                (got.block, want.block),
                (got.block.assignment, want.block.assignment),
                (got.block.assignment.study, want.block.assignment.study),
                (got.block.assignment.rater, want.block.assignment.rater),
            ]:
                assert type(a) is type(b) and _fields(a) == _fields(b)
            other = assignments[1 - assignments.index(assignment)]
            assert rater_trial(token=other.token, key=trial.key) is None  # another rater's token
    assert assignment_by_token(token="no-such-token") is None


def test_the_load_benchmark_counts_each_rater_url_under_its_kind():
    from bench.server_stats import request_kind

    token, key = "Zx-9_aQ" * 4, uuid.uuid4()
    assert request_kind("POST", reverse("studies:entry", args=[12])) == "consent"
    assert request_kind("GET", reverse("studies:go", kwargs={"token": token})) == "page"
    assert request_kind("POST", reverse("studies:answer", kwargs={"token": token, "key": key})) == "submit"
    image = reverse("studies:image", kwargs={"token": token, "key": key, "slot": 2})
    assert request_kind("GET", image) == "image"
    assert request_kind("POST", image) == "other"
    assert request_kind("GET", reverse("studies:entry", args=[12])) == "other"
    assert request_kind("POST", reverse("studies:instructions", kwargs={"token": token})) == "other"
