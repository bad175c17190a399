"""Assignment: balanced across conditions and pairs (counting completed and recent ones), seeded, recorded."""

import random
from collections import Counter
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse
from django.utils import timezone

from studies import services
from studies.models import Assignment, Block, Phase, RaterEvent, Response, Study, Trial
from studies.selectors import pair_test_images
from tests.factories import RaterFactory
from tests.studies.builders import data_guards_off, live_study
from tests.studies.walk import ClientRater


def _new(study, n: int, status=Assignment.Status.STARTED) -> list[Assignment]:
    out = []
    for _ in range(n):
        a = services.assignment_create(study=study, rater=RaterFactory(), provider="direct")
        if status != Assignment.Status.STARTED:
            a.status, a.completed_at = status, timezone.now()
            a.save(update_fields=["status", "completed_at"])
        out.append(a)
    return out


def _cells(study) -> Counter:
    live = Block.objects.filter(assignment__study=study, assignment__status__in=["started", "completed"])
    return Counter(live.values_list("pair_id", "condition_id"))


@pytest.mark.django_db
def test_between_subjects_assignments_fill_every_pair_x_condition_cell_evenly():
    study = live_study(n_pairs=3, n_images=2, n_learning=1, pairs_per_assignment=1, test_images_per_class=1)
    assignments = _new(study, 13)
    cells = _cells(study)
    assert len(cells) == 3 * 2 and max(cells.values()) - min(cells.values()) <= 1
    for a in assignments:  # one condition per rater across their pairs
        assert a.blocks.values("condition").distinct().count() == 1


@pytest.mark.django_db
def test_within_subjects_gives_each_rater_a_different_condition_per_pair():
    study = live_study(
        n_pairs=2, n_images=2, n_learning=1, design=Study.Design.WITHIN, test_images_per_class=1
    )
    for a in _new(study, 6):
        assert a.blocks.count() == 2 and a.blocks.values("condition").distinct().count() == 2
    cells = _cells(study)
    assert max(cells.values()) - min(cells.values()) <= 1


@pytest.mark.django_db
def test_dropouts_past_the_time_limit_are_refilled_and_marked_timed_out():
    study = live_study(n_pairs=1, n_images=2, n_learning=1, test_images_per_class=1, time_limit_minutes=30)
    old = _new(study, 4)
    first_condition = old[0].blocks.get().condition_id
    # The two raters in the first condition dropped out long ago.
    dropped = [a for a in old if a.blocks.get().condition_id == first_condition]
    with data_guards_off():
        Assignment.objects.filter(pk__in=[a.pk for a in dropped]).update(
            started_at=timezone.now() - timedelta(hours=2)
        )
    refill = _new(study, 2)
    assert [a.blocks.get().condition_id for a in refill] == [first_condition] * 2
    assert set(
        Assignment.objects.filter(pk__in=[a.pk for a in dropped]).values_list("status", flat=True)
    ) == {"timed_out"}


@pytest.mark.django_db
def test_completed_assignments_count_towards_balance():
    study = live_study(n_pairs=1, n_images=2, n_learning=1, test_images_per_class=1)
    done = _new(study, 1, status=Assignment.Status.COMPLETED)[0]
    nxt = _new(study, 1)[0]
    assert nxt.blocks.get().condition_id != done.blocks.get().condition_id


@pytest.mark.django_db
def test_the_seed_fixes_image_order_and_button_sides_and_is_recorded():
    study = live_study(n_pairs=2, n_images=4, n_learning=2)

    def layout(a):
        trials = Trial.objects.filter(block__assignment=a).order_by("block__position", "phase", "position")
        blocks = list(a.blocks.order_by("position").values_list("pair_id", "a_on_left"))
        return blocks, [(t.phase, t.image_id, t.explanation_id) for t in trials]

    rater = RaterFactory()
    a = services.assignment_create(study=study, rater=rater, provider="direct", seed=12345)
    assert a.seed == 12345
    first = layout(a)
    with data_guards_off():
        Assignment.objects.filter(pk=a.pk).delete()
    again = services.assignment_create(study=study, rater=rater, provider="direct", seed=12345)
    assert layout(again) == first
    sides = {b.a_on_left for s in range(2, 30) for b in [_side(study, s)]}
    assert sides == {True, False}  # both sides occur across seeds


def _side(study, seed):
    a = services.assignment_create(study=study, rater=RaterFactory(), provider="direct", seed=seed)
    return a.blocks.order_by("position").first()


@pytest.mark.django_db
def test_pair_test_images_are_the_same_for_everyone_half_a_half_b_and_from_the_test_split():
    study = live_study(n_pairs=1, n_images=4, test_images_per_class=4)
    pair = study.pairs.get()
    chosen = pair_test_images(study=study, pair=pair)
    assert chosen == pair_test_images(study=study, pair=pair)
    assert Counter(side for _, side in chosen) == {"A": 2, "B": 2}
    # Reference: the plain definition, on the same rows.
    from explain.models import Image

    for image_id, side in chosen:
        image = Image.objects.get(pk=image_id)
        assert image.split == "test"
        assert image.class_label_id == (pair.class_a_id if side == "A" else pair.class_b_id)
    for a in _new(study, 3):
        pre = set(
            Trial.objects.filter(block__assignment=a, phase=Phase.PRE_LEARNING).values_list(
                "image_id", "correct_answer"
            )
        )
        assert pre == set(chosen)
    study.n_test = study.n_prelearning = 12
    with pytest.raises(ValidationError, match="needs 6 test-split images of its class A.*has 4"):
        pair_test_images(study=study, pair=pair)


@pytest.mark.django_db
def test_concurrent_style_arrivals_of_the_same_rater_get_one_assignment():
    study = live_study(n_pairs=1)
    first = services.assignment_for(study=study, provider="prolific", external_id="same")
    second = services.assignment_for(study=study, provider="prolific", external_id="same")
    assert first.pk == second.pk and Assignment.objects.count() == 1
    with pytest.raises(services.RaterRefused, match="participant id"):
        services.assignment_for(study=study, provider="prolific", external_id="  ")


@pytest.mark.django_db
def test_too_fast_answers_are_flagged_and_focus_events_logged():
    study = live_study(n_pairs=1, min_rt_ms=300)
    rater = ClientRater()
    page = rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), PROLIFIC_PID="q"))
    page = rater.post(page.form.action, dict(page.form.fields))
    events = rater.url("events")
    assert (
        rater.client.post(events, {"kind": "blur", "trial": page.trial, "client_ms": "1234"}).status_code
        == 204
    )
    assert rater.client.post(events, {"kind": "focus"}).status_code == 204
    assert rater.client.post(events, {"kind": "keylogger"}).status_code == 400
    first_trial = page.trial
    page = rater.answer(page, "A", rt_ms=120)
    rater.answer(page, "B", rt_ms=950)
    fast, slow = Response.objects.order_by("received_at")
    assert (fast.too_fast, fast.client_rt_ms, slow.too_fast, slow.client_rt_ms) == (True, 120, False, 950)
    assert fast.server_rt_ms is not None and fast.server_rt_ms >= 0
    logged = list(RaterEvent.objects.order_by("pk").values_list("kind", "client_ms", "trial__key"))
    assert (
        [k for k, _, _ in logged] == ["blur", "focus"]
        and logged[0][1] == 1234
        and str(logged[0][2]) == first_trial
    )


@pytest.mark.django_db
def test_an_assignment_past_its_time_limit_is_timed_out_and_takes_no_more_answers():
    study = live_study(n_pairs=1, time_limit_minutes=10)
    rater = ClientRater()
    page = rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), PROLIFIC_PID="slow"))
    page = rater.post(page.form.action, dict(page.form.fields))
    with data_guards_off():
        Assignment.objects.update(started_at=timezone.now() - timedelta(minutes=11))
    after = rater.answer(page, "A")
    assert after.step == "ended" and "run out" in after.text
    assert Assignment.objects.get().status == Assignment.Status.TIMED_OUT
    assert Response.objects.count() == 0


@pytest.mark.django_db
def test_a_study_needs_its_stimuli_and_images_before_raters_are_assigned():
    study = live_study(n_pairs=1, n_learning=2)
    study.n_learning = 5
    with data_guards_off():
        study.save(update_fields=["n_learning"])
    with pytest.raises(ValidationError, match="has 2 flipped explanations; the learning phase shows 5"):
        services.assignment_create(study=study, rater=RaterFactory(), provider="direct")
    assert Assignment.objects.count() == 0
    rater = ClientRater()
    form = rater.get(reverse("studies:entry", args=[study.pk])).form
    response = rater.client.post(form.action, {**form.fields, "consent": "yes"})
    assert response.status_code == 503 and "Precompute" in response.content.decode()


def test_ties_are_broken_by_the_rng_only():
    rng = random.Random(0)
    picks = Counter(services._least([1, 2, 3], lambda o: 0, rng) for _ in range(300))
    assert set(picks) == {1, 2, 3}
    assert services._least([5, 1, 3], lambda o: o, rng) == 1
