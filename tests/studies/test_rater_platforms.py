"""What the crowd platforms and a review board need: MTurk's re-accepted HITs and preview, per-rater codes,
Prolific's outcome codes, a closable and fillable study, consent text per study kept with its version, and an
instructions example that is never one of the rater's own stimuli."""

from datetime import timedelta
from urllib.parse import parse_qs, urlparse

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse
from django.utils import timezone

from analysis.selectors import responses_tidy
from studies import services
from studies.models import Assignment, ConsentText, Response, Study, Trial
from tests.studies.builders import data_guards_off, live_study
from tests.studies.walk import ClientRater

MTURK = "https://www.mturk.com"
SANDBOX = "https://workersandbox.mturk.com"


def mturk(assignment_id: str, worker: str = "A1WORKER", **more) -> dict:
    return {
        "assignmentId": assignment_id,
        "hitId": "3HIT",
        "workerId": worker,
        "turkSubmitTo": MTURK,
        **more,
    }


def prolific(pid: str = "p1") -> dict:
    return {"PROLIFIC_PID": pid, "STUDY_ID": "s", "SESSION_ID": f"x-{pid}"}


def _entry(study) -> str:
    return reverse("studies:entry", args=[study.pk])


@pytest.mark.django_db
def test_a_returned_and_re_accepted_hit_posts_the_new_assignment_id():
    study = live_study(n_pairs=1)
    rater = ClientRater(cookies=False)
    page = rater.consent(rater.get(_entry(study), **mturk("3FIRST")))
    page = rater.post(page.form.action, dict(page.form.fields))
    page = rater.answer(page, "A")
    # The worker returns the HIT and accepts it again: MTurk opens the frame with a new assignmentId.
    again = ClientRater(cookies=False)
    page = again.get(_entry(study), **mturk("3SECOND"))
    assert page.step == "trial" and again.token == rater.token and Response.objects.count() == 1
    while page.step == "trial":
        page = again.answer(page, page.form.buttons[0][1])
    assert page.forms[0].action == f"{MTURK}/mturk/externalSubmit"
    assert page.forms[0].fields["assignmentId"] == "3SECOND"
    assert Assignment.objects.count() == 1


@pytest.mark.django_db
def test_an_mturk_preview_without_turk_submit_to_shows_the_consent_summary_and_the_example():
    study = live_study(
        n_pairs=3,
        pay="USD 2.00",
        expected_minutes=12,
        contact="Dr. A. Researcher, a.researcher@uni.example",
        ethics_reference="IRB-2026-117",
    )
    study.example_pair = study.pairs.order_by("pk").last()
    with data_guards_off():  # chosen before launch in a real study (the design is frozen once live)
        study.save(update_fields=["example_pair"])
    rater = ClientRater()
    page = rater.get(_entry(study), assignmentId="ASSIGNMENT_ID_NOT_AVAILABLE", hitId="3HIT")
    assert page.status == 200 and page.step == "preview"
    for shown in (
        "USD 2.00",
        "about 12 minutes",
        "a.researcher@uni.example",
        "IRB-2026-117",
        "Accept the HIT",
    ):
        assert shown in page.text, shown
    assert len(page.images) == 2 and all("/preview/example/" in src for src in page.images)
    assert all(image[:8] == b"\x89PNG\r\n\x1a\n" for image in rater.images(page))
    assert Assignment.objects.count() == 0


@pytest.mark.django_db
def test_every_rater_gets_their_own_stored_completion_code_and_the_export_shows_it():
    study = live_study(n_pairs=1, completion_code="WAVE3")
    codes = []
    for n in range(4):
        done, _ = ClientRater().finish(_entry(study), mturk(f"3A{n}", worker=f"AW{n}"))
        codes.append(done.code)
    assert len(set(codes)) == 4 and all(code.startswith("WAVE3-") and len(code) == 16 for code in codes)
    stored = dict(Assignment.objects.values_list("pk", "completion_code"))
    assert sorted(stored.values()) == sorted(codes)
    exported = {(row["assignment"], row["completion_code"]) for row in responses_tidy(study=study)}
    assert exported == set(stored.items())
    fresh = services.completion_code_new(prefix="WAVE3")
    assert fresh not in codes and fresh.startswith("WAVE3-")


@pytest.mark.django_db
def test_prolific_gets_the_study_code_for_each_outcome_completed_failed_checks_and_timed_out():
    study = live_study(
        n_pairs=1,
        catch_trials_per_pair=2,
        exclusion_rules={"failed_catch_trials": 1},
        prolific_completion_code="OK-CODE",
        prolific_failed_check_code="CHECK-CODE",
        prolific_timeout_code="TIME-CODE",
    )

    def cc(rater: ClientRater) -> list[str]:
        return parse_qs(urlparse(rater.client.get(rater.url("finish"))["Location"]).query)["cc"]

    def catch_answer(right: bool):
        def choose(page) -> str:
            trial = Trial.objects.get(key=page.trial)
            if trial.phase == "learning":
                return "seen"
            wrong = "B" if trial.correct_answer == "A" else "A"
            return trial.correct_answer if (right or not trial.is_catch) else wrong

        return choose

    careful = ClientRater()
    done, _ = careful.finish(_entry(study), prolific("careful"), choose=catch_answer(True))
    assert done.code == "OK-CODE" and cc(careful) == ["OK-CODE"]
    careless = ClientRater()
    done, _ = careless.finish(_entry(study), prolific("careless"), choose=catch_answer(False))
    assert done.code == "CHECK-CODE" and cc(careless) == ["CHECK-CODE"]
    # The export shows the code each rater took back to Prolific, to match its submission list.
    took_back = {(row["assignment"], row["completion_code"]) for row in responses_tidy(study=study)}
    by_pid = dict(Assignment.objects.values_list("rater__identities__external_id", "pk"))
    assert took_back == {(by_pid["careful"], "OK-CODE"), (by_pid["careless"], "CHECK-CODE")}
    slow = ClientRater()
    slow.consent(slow.get(_entry(study), **prolific("slow")))
    with data_guards_off():  # backdate the start: the rater ran out of time
        Assignment.objects.filter(rater__identities__external_id="slow").update(
            started_at=timezone.now() - timedelta(minutes=study.time_limit_minutes + 1)
        )
    page = slow.get(slow.url("go"))
    assert page.step == "ended" and page.code == "TIME-CODE" and cc(slow) == ["TIME-CODE"]
    study.prolific_timeout_code = ""
    study.save(update_fields=["prolific_timeout_code"])
    page = slow.get(slow.url("go"))
    assert page.step == "ended" and not page.code and not page.forms
    assert slow.client.get(slow.url("finish"))["Location"] == slow.url("go")  # nothing to send back


@pytest.mark.django_db
def test_a_closed_direct_link_and_a_full_study_say_so_politely_and_make_no_assignment():
    study = live_study(n_pairs=1, direct_link_open=False, max_raters=2)
    page = ClientRater().get(_entry(study))
    assert page.status == 200 and "link is closed" in page.text and not page.forms
    assert Assignment.objects.count() == 0
    first = ClientRater()
    first.consent(first.get(_entry(study), **prolific("one")))  # Prolific's link still works
    ClientRater().finish(_entry(study), prolific("two"))
    assert Assignment.objects.count() == 2
    page = ClientRater().get(_entry(study), **prolific("three"))
    assert page.status == 200 and "full" in page.text and "return your submission" in page.text
    form = ClientRater().get(_entry(study), **prolific("four"))  # a form opened before it filled
    assert not form.forms
    # An MTurk worker previewing the HIT of a full study is told before accepting it.
    preview = ClientRater().get(_entry(study), assignmentId="ASSIGNMENT_ID_NOT_AVAILABLE", hitId="3HIT")
    assert preview.step == "preview" and "full" in preview.text and "do not accept this HIT" in preview.text
    assert "Accept the HIT to begin" not in preview.text and "return" not in preview.text
    assert Assignment.objects.count() == 2
    assert first.get(_entry(study), **prolific("one")).step == "instructions"  # those who started go on
    # A started assignment that ran out of time frees its place.
    with data_guards_off():  # backdate the start: the rater ran out of time
        Assignment.objects.filter(rater__identities__external_id="one").update(
            started_at=timezone.now() - timedelta(minutes=study.time_limit_minutes + 1)
        )
    assert ClientRater().get(_entry(study), **prolific("five")).step == "consent"


@pytest.mark.django_db
def test_the_full_check_holds_when_a_consent_form_was_opened_before_the_study_filled():
    study = live_study(n_pairs=1, max_raters=1)
    early = ClientRater()
    form = early.get(_entry(study), **prolific("early")).form
    ClientRater().finish(_entry(study), prolific("first"))
    page = early.post(form.action, {**form.fields, "consent": "yes"})
    assert page.status == 403 and "full" in page.text and Assignment.objects.count() == 1
    assert "This study is closed Thank you for your interest. This study is full" in page.text
    assert page.text.count("Thank you for your interest") == 1


@pytest.mark.django_db
def test_the_consent_page_shows_the_studys_text_and_each_assignment_keeps_the_version_agreed_to():
    study = live_study(
        n_pairs=1,
        consent_text="This study is run by the Vision Lab.\n\nYou will be paid on completion.",
        pay="GBP 1.50",
        expected_minutes=8,
        contact="lab@uni.example",
        ethics_reference="ERC-42",
    )
    rater = ClientRater()
    page = rater.get(_entry(study), **prolific("a"))
    for shown in ("run by the Vision Lab", "paid on completion", "GBP 1.50", "about 8 minutes", "ERC-42"):
        assert shown in page.text
    rater.consent(page)
    first = Assignment.objects.get().consent
    assert first.text.startswith("This study is run by the Vision Lab.\n\nYou will be paid on completion.")
    assert "Pay: GBP 1.50" in first.text and "Ethics approval: ERC-42" in first.text
    # The researcher amends the text while someone has the old form open: they are asked to read it again.
    reader = ClientRater()
    old_form = reader.get(_entry(study), **prolific("b"))
    services.study_update(study=study, ethics_reference="ERC-42, amendment 1")
    page = reader.consent(old_form)
    assert page.status == 409 and "changed" in page.text and "amendment 1" in page.text
    assert Assignment.objects.count() == 1
    page = reader.consent(page)
    assert page.step == "instructions"
    second = Assignment.objects.get(rater__identities__external_id="b").consent
    assert second.pk != first.pk and "amendment 1" in second.text
    assert Assignment.objects.get(rater__identities__external_id="a").consent_id == first.pk
    assert ConsentText.objects.count() == 2
    done, _ = ClientRater().finish(
        _entry(live_study(n_pairs=1, debrief_text="We studied teaching.")), prolific()
    )
    assert "We studied teaching." in done.text


@pytest.mark.django_db
@pytest.mark.parametrize("example_pair", [False, True])
def test_the_instructions_example_is_never_one_of_the_raters_own_stimuli_and_says_so(example_pair):
    study = live_study(n_pairs=3, pairs_per_assignment=1 if not example_pair else None)
    pairs = list(study.pairs.order_by("pk"))
    if example_pair:  # chosen before launch (the design is frozen once live)
        with data_guards_off():
            type(study).objects.filter(pk=study.pk).update(example_pair=pairs[1])
        study.refresh_from_db()
    for n in range(4):
        rater = ClientRater()
        page = rater.consent(rater.get(_entry(study), **prolific(f"r{n}")))
        assignment = Assignment.objects.get(rater__identities__external_id=f"r{n}")
        own_pairs = set(assignment.blocks.values_list("pair_id", flat=True))
        own_stimuli = set(
            Trial.objects.filter(block__assignment=assignment).values_list("explanation", flat=True)
        )
        example = assignment.example_explanation
        assert example is not None and example.pk not in own_stimuli and example.pair_id not in own_pairs
        if example_pair:
            assert example.pair_id == pairs[1].pk and own_pairs == {pairs[0].pk, pairs[2].pk}
        else:
            assert example.condition_id in set(assignment.blocks.values_list("condition_id", flat=True))
        assert len(page.images) == 2 and "another pair of kinds, one you will not see" in page.text


@pytest.mark.django_db
def test_without_an_unassigned_pair_the_instructions_show_no_example_and_claim_none():
    study = live_study(n_pairs=2)
    rater = ClientRater()
    page = rater.consent(rater.get(_entry(study), **prolific()))
    assert page.step == "instructions" and page.images == [] and "another pair" not in page.text
    assert Assignment.objects.get().example_explanation is None
    assert rater.client.get(rater.url("example", slot=1)).status_code == 404


@pytest.mark.django_db
def test_an_example_pair_must_be_the_studys_own_and_frozen_with_the_design():
    study, other = live_study(n_pairs=1), live_study(n_pairs=1)
    with pytest.raises(ValidationError, match="Refused change to: example_pair"):
        services.study_update(study=study, example_pair=study.pairs.get())  # live: the design is frozen
    with data_guards_off():
        Study.objects.filter(pk=study.pk).update(status=Study.Status.READY)
    study.refresh_from_db()
    with pytest.raises(ValidationError, match="belongs to study"):
        services.study_update(study=study, example_pair=other.pairs.get())
    assert services.study_update(study=study, example_pair=study.pairs.get()).example_pair_id


@pytest.mark.django_db
def test_sandbox_workers_are_pilots_left_out_of_the_data_and_turned_away_once_the_study_leaves_the_sandbox():
    study = live_study(n_pairs=1)
    assert study.mturk_sandbox  # a new study takes sandbox workers, so the researcher can try the HIT there
    tried, _ = ClientRater().finish(_entry(study), mturk("3TRY", worker="ASANDBOX", turkSubmitTo=SANDBOX))
    paid, _ = ClientRater().finish(_entry(study), mturk("3PAID", worker="APAID"))
    pilots = dict(Assignment.objects.values_list("rater__identities__external_id", "is_pilot"))
    assert pilots == {"ASANDBOX": True, "APAID": False}
    # The sandbox worker's answers are stored (the researcher can look at them) but are not data.
    sandbox_assignment = Assignment.objects.get(is_pilot=True)
    assert Response.objects.filter(trial__block__assignment=sandbox_assignment).exists()
    assert {row["assignment"] for row in responses_tidy(study=study)} == {
        Assignment.objects.get(is_pilot=False).pk
    }

    # The HIT goes live: sandbox workers are turned away, politely, with no assignment made.
    Study.objects.filter(pk=study.pk).update(mturk_sandbox=False)
    before = Assignment.objects.count()
    late = ClientRater(cookies=False)
    page = late.consent(late.get(_entry(study), **mturk("3LATE", worker="ALATE", turkSubmitTo=SANDBOX)))
    assert page.status == 403 and "sandbox" in page.text and "return the HIT" in page.text
    assert Assignment.objects.count() == before
    # A live-site worker still starts.
    live, _ = ClientRater().finish(_entry(study), mturk("3LIVE", worker="ALIVE"))
    assert Assignment.objects.filter(is_pilot=False).count() == 2


@pytest.mark.django_db
def test_pilots_take_no_place_in_a_study_with_max_raters():
    study = live_study(n_pairs=1, max_raters=1)
    services.pilot_assignment_create(study=study, user=None)
    ClientRater().finish(_entry(study), mturk("3TRY", worker="ASANDBOX", turkSubmitTo=SANDBOX))
    # Two pilots (a researcher's and a sandbox worker's) are in, and the one real place is still free.
    ClientRater().finish(_entry(study), mturk("3PAID", worker="APAID"))
    assert Assignment.objects.filter(is_pilot=True).count() == 2
    assert Assignment.objects.filter(is_pilot=False).count() == 1
    full = ClientRater(cookies=False).get(_entry(study), **mturk("3MORE", worker="AMORE"))
    assert "full" in full.text and Assignment.objects.count() == 3
