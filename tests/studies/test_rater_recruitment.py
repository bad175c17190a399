"""Arriving by direct link, Prolific and Mechanical Turk; nobody takes a study twice or an excluded one."""

import pytest
from django.test import override_settings
from django.urls import reverse

from studies.models import Assignment, ProviderIdentity, Response
from tests.studies.builders import data_guards_off, live_study
from tests.studies.walk import ClientRater

RECORDER = "http://127.0.0.1:8119"


def mturk(assignment_id: str, worker: str = "A1WORKER", submit_to: str = "https://www.mturk.com"):
    return {"assignmentId": assignment_id, "hitId": "3HIT", "workerId": worker, "turkSubmitTo": submit_to}


@pytest.mark.django_db
def test_a_direct_link_gives_each_browser_its_own_assignment_and_the_cookie_resumes_it():
    study = live_study()
    entry = reverse("studies:entry", args=[study.pk])
    first, second = ClientRater(), ClientRater()
    page = first.consent(first.get(entry))
    assert page.step == "instructions"
    assert second.consent(second.get(entry)).step == "instructions"
    assert Assignment.objects.filter(study=study, provider="direct").count() == 2
    assert first.get(entry).step == "instructions"  # resumed, not a third assignment
    assert Assignment.objects.count() == 2
    stranger = ClientRater()
    stranger.client.cookies["foil_rater"] = "forged-value"  # not signed: worth nothing
    assert stranger.get(entry).step == "consent"


@pytest.mark.django_db
def test_an_mturk_preview_shows_the_instructions_with_inputs_disabled_and_creates_nothing():
    study = live_study()
    rater = ClientRater()
    response = rater.client.get(
        reverse("studies:entry", args=[study.pk]), mturk("ASSIGNMENT_ID_NOT_AVAILABLE")
    )
    html = response.content.decode()
    assert response.status_code == 200 and 'data-step="preview"' in html
    assert "Accept the HIT" in html and html.count("disabled") == 2
    assert Assignment.objects.count() == 0 and ProviderIdentity.objects.count() == 0


@pytest.mark.django_db
def test_an_mturk_worker_ends_with_a_form_posting_to_external_submit():
    study = live_study(n_pairs=1, completion_code="")
    rater = ClientRater()
    done, _ = rater.finish(reverse("studies:entry", args=[study.pk]), mturk("3ASSIGN"))
    form = done.forms[0]
    assert form.action == "https://www.mturk.com/mturk/externalSubmit" and form.method == "post"
    assert form.fields == {"assignmentId": "3ASSIGN", "completion_code": done.code}
    assert len(done.code) == 10 and done.code == Assignment.objects.get().completion_code
    assert "csrfmiddlewaretoken" not in form.fields  # never hand our CSRF token to another site


@pytest.mark.django_db
def test_an_mturk_link_returning_elsewhere_than_mturk_is_refused():
    study = live_study()
    response = ClientRater().client.get(
        reverse("studies:entry", args=[study.pk]), mturk("3A", submit_to="https://evil.example")
    )
    assert response.status_code == 400 and Assignment.objects.count() == 0
    with override_settings(FOIL_MTURK_SUBMIT_TO=[RECORDER]):
        rater = ClientRater()
        page = rater.get(reverse("studies:entry", args=[study.pk]), **mturk("3A", submit_to=RECORDER))
        assert page.step == "consent"


@pytest.mark.django_db
def test_the_same_worker_cannot_take_a_study_twice_and_sees_their_code_again():
    study = live_study(n_pairs=1)
    entry = reverse("studies:entry", args=[study.pk])
    done, _ = ClientRater().finish(entry, mturk("3FIRST"))
    n_responses = Response.objects.count()
    again = ClientRater()
    page = again.get(entry, **mturk("3SECOND"))  # a second HIT assignment, same worker, new browser
    assert page.step == "done" and page.code == done.code
    assert Assignment.objects.count() == 1 and Response.objects.count() == n_responses


@pytest.mark.django_db
def test_a_study_that_excludes_an_earlier_wave_turns_its_raters_away():
    wave1, wave2 = live_study(n_pairs=1), live_study(n_pairs=1)
    with data_guards_off():
        wave2.excluded_studies.add(wave1)
    prolific = {"PROLIFIC_PID": "repeat-person", "STUDY_ID": "s", "SESSION_ID": "x"}
    ClientRater().finish(reverse("studies:entry", args=[wave1.pk]), prolific)
    rater = ClientRater()
    response = rater.client.get(reverse("studies:entry", args=[wave2.pk]), prolific)
    assert response.status_code == 403 and "earlier" in response.content.decode()
    # Posting the consent form directly is refused as well.
    response = rater.client.post(reverse("studies:entry", args=[wave2.pk]), {**prolific, "consent": "yes"})
    assert response.status_code == 403
    assert not Assignment.objects.filter(study=wave2).exists()
    # Someone else is welcome.
    other = {**prolific, "PROLIFIC_PID": "newcomer"}
    assert (
        ClientRater().consent(ClientRater().get(reverse("studies:entry", args=[wave2.pk]), **other)).status
        == 200
    )


@pytest.mark.django_db
def test_provider_ids_are_kept_apart_from_assignments_and_responses():
    study = live_study(n_pairs=1)
    ClientRater().finish(reverse("studies:entry", args=[study.pk]), mturk("3KEEP", worker="AWORKERSECRET"))
    identity = ProviderIdentity.objects.get()
    assert identity.external_id == "AWORKERSECRET"
    assert identity.extra[f"study-{study.pk}"]["assignmentId"] == "3KEEP"
    for model in (Assignment, Response):
        for row in model.objects.values():
            assert "AWORKERSECRET" not in str(row)


@pytest.mark.django_db
def test_a_closed_study_takes_no_new_raters():
    study = live_study()
    study.status = study.Status.CLOSED
    study.save(update_fields=["status"])
    response = ClientRater().client.get(reverse("studies:entry", args=[study.pk]), {"PROLIFIC_PID": "p"})
    text = response.content.decode()
    assert response.status_code == 200 and "not open" in text and "return your submission on Prolific" in text
    assert 'name="consent"' not in text and Assignment.objects.count() == 0
