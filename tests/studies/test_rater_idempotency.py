"""Exactly one response per trial, whatever the browser does: double click, retry, back button, reload."""

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from studies import services
from studies.models import Assignment, Response, Trial
from tests.studies.builders import data_guards_off, live_study
from tests.studies.walk import ClientRater

PROLIFIC = {"PROLIFIC_PID": "idem-1", "STUDY_ID": "s", "SESSION_ID": "x"}


def _first_trial(study):
    rater = ClientRater()
    page = rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC))
    page = rater.post(page.form.action, dict(page.form.fields))
    assert page.step == "trial"
    return rater, page


@pytest.mark.django_db
def test_a_double_click_and_a_network_retry_leave_one_response():
    study = live_study()
    rater, page = _first_trial(study)
    for _ in range(3):
        rater.client.post(page.form.action, {**page.form.fields, "answer": "A", "client_rt_ms": "800"})
    assert Response.objects.count() == 1
    assert Response.objects.get().answer == "A"


@pytest.mark.django_db
def test_the_first_answer_stands_when_a_changed_answer_comes_back_through_the_back_button():
    study = live_study()
    rater, first = _first_trial(study)
    second = rater.answer(first, "B")
    assert second.trial != first.trial
    back = rater.answer(first, "D")  # the old page, re-sent with another answer
    assert back.trial == second.trial  # shown where the rater really is
    assert Response.objects.count() == 1
    assert Response.objects.get(trial__key=first.trial).answer == "B"


@pytest.mark.django_db
def test_a_reload_resumes_at_the_first_unanswered_trial():
    study = live_study()
    rater, page = _first_trial(study)
    for answer in ["A", "B", "D"]:
        page = rater.answer(page, answer)
    again = rater.get(rater.url("go"))
    assert (
        (again.trial, again.progress)
        == (page.trial, page.progress)
        == (page.trial, "Pair 1 of 2 · Warm-up 4 of 4")
    )
    # Coming back through the study link resumes too (a new tab, or Prolific's link again).
    assert rater.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC).trial == page.trial
    # A new browser of the same Prolific participant also resumes, and creates nothing new.
    fresh = ClientRater()
    assert fresh.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC).trial == page.trial
    assert Assignment.objects.count() == 1


@pytest.mark.django_db
def test_answering_a_trial_not_reached_yet_is_refused():
    study = live_study()
    rater, page = _first_trial(study)
    later = Trial.objects.exclude(key=page.trial).filter(block__position=1).first()
    shown = rater.post(rater.url("answer", key=later.key), {"answer": "A"})
    assert shown.trial == page.trial
    assert Response.objects.count() == 0


@pytest.mark.django_db
def test_htmx_answers_swap_in_the_next_trial_and_the_last_one_redirects_to_the_debrief():
    study = live_study(n_pairs=1)
    rater, page = _first_trial(study)
    seen = []
    while True:
        response = rater.client.post(
            page.form.action,
            {**page.form.fields, "answer": page.form.buttons[0][1]},
            headers={"HX-Request": "true"},
        )
        assert response.status_code == 200
        if "HX-Redirect" in response:
            assert response["HX-Redirect"] == rater.url("go")
            break
        html = response.content.decode()
        assert "<html" not in html  # a partial, not a page
        page = rater._page(response)
        seen.append(page.trial)
    assert len(seen) == Trial.objects.count() - 1 == Response.objects.count() - 1
    assert Assignment.objects.get().status == Assignment.Status.COMPLETED


@pytest.mark.django_db(transaction=True)
def test_simultaneous_duplicate_submissions_store_one_response():
    study = live_study(n_pairs=1)
    rater, page = _first_trial(study)
    assignment = Assignment.objects.get()
    barrier = threading.Barrier(6)
    outcomes, errors = [], []

    def submit():
        try:
            barrier.wait()
            outcomes.append(services.trial_answer(assignment=assignment, trial_key=page.trial, answer="A"))
        except Exception as error:  # collected and asserted on below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Response.objects.count() == 1
    assert sum(o.created for o in outcomes) == 1


@pytest.mark.django_db
def test_a_learning_stimulus_is_left_only_after_the_minimum_viewing_time():
    study = live_study(n_pairs=1, n_images=1, min_learning_seconds=30)
    rater, page = _first_trial(study)
    page = rater.answer(page, "D")
    assert page.phase == "learning"
    assert page.form.min_ms == 30_000
    again = rater.answer(page, "seen")
    assert again.trial == page.trial and "longer" in again.text
    assert Response.objects.filter(trial__key=page.trial).count() == 0
    with data_guards_off():
        Trial.objects.filter(key=page.trial).update(shown_at=timezone.now() - timedelta(seconds=31))
    after = rater.answer(page, "seen")
    assert after.trial != page.trial
    response = Response.objects.get(trial__key=page.trial)
    assert response.server_rt_ms >= 30_000
