"""The rater's way through a study, through the real views: consent, instructions, trials, debrief."""

from urllib.parse import parse_qs, urlparse

import pytest
from django.urls import reverse

from studies.models import Assignment, Phase, Response, Trial
from tests.studies.builders import live_study
from tests.studies.walk import ClientRater

PROLIFIC = {"PROLIFIC_PID": "5f1a2b3c4d", "STUDY_ID": "st-1", "SESSION_ID": "se-1"}


@pytest.mark.django_db
def test_a_prolific_rater_completes_the_whole_assignment_and_returns_with_the_code():
    study = live_study(prolific_completion_code="C1A2B3")
    rater = ClientRater()
    done, trials = rater.finish(reverse("studies:entry", args=[study.pk]), PROLIFIC)
    assignment = Assignment.objects.get(study=study)
    n_trials = Trial.objects.filter(block__assignment=assignment).count()
    assert len(trials) == n_trials == 2 * (4 + 2 + 4)
    assert Response.objects.filter(trial__block__assignment=assignment).count() == n_trials
    assert assignment.status == Assignment.Status.COMPLETED
    assert done.code == "C1A2B3"  # Prolific's code for the study; the rater's own code is stored besides
    assert len(assignment.completion_code) == 10 and assignment.completion_code != "C1A2B3"
    # Progress as the rater saw it, phase by phase.
    assert trials[0].progress == "Pair 1 of 2 · Warm-up 1 of 4"
    assert trials[4].progress == "Pair 1 of 2 · Learning 1 of 2"
    assert trials[6].progress == "Pair 1 of 2 · Test 1 of 4"
    assert trials[-1].progress == "Pair 2 of 2 · Test 4 of 4"
    assert [t.phase for t in trials[:10]] == ["pre"] * 4 + ["learning"] * 2 + ["test"] * 4
    # Pre-learning offers "don't know"; the test does not; learning only goes on.
    assert {v for _, v in trials[0].form.buttons} == {"A", "B", "D"}
    assert {v for _, v in trials[4].form.buttons} == {"seen"}
    assert {v for _, v in trials[6].form.buttons} == {"A", "B"}
    finish = rater.client.get(rater.url("finish"))
    assert finish.status_code == 302
    url = urlparse(finish["Location"])
    assert (url.scheme, url.netloc, url.path) == ("https", "app.prolific.com", "/submissions/complete")
    assert parse_qs(url.query) == {"cc": ["C1A2B3"]}


@pytest.mark.django_db
def test_prolific_is_not_sent_back_before_the_last_answer_is_saved():
    study = live_study(prolific_completion_code="C1A2B3")
    rater = ClientRater()
    page = rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC))
    finish = rater.client.get(rater.url("finish"))
    assert finish.status_code == 302 and finish["Location"] == rater.url("go")
    assert page.step == "instructions"


@pytest.mark.django_db
def test_the_learning_phase_shows_the_conditions_stimuli_and_pre_and_test_show_the_same_images():
    study = live_study(n_pairs=1, catch_trials_per_pair=2)
    rater = ClientRater()
    rater.finish(reverse("studies:entry", args=[study.pk]), PROLIFIC)
    block = Assignment.objects.get(study=study).blocks.get()
    pre = Trial.objects.filter(block=block, phase=Phase.PRE_LEARNING)
    test = Trial.objects.filter(block=block, phase=Phase.TEST)
    learning = Trial.objects.filter(block=block, phase=Phase.LEARNING).select_related("explanation")
    assert {t.image_id for t in pre} == {t.image_id for t in test.filter(is_catch=False)}
    assert sorted(t.correct_answer for t in pre) == ["A", "A", "B", "B"]
    assert all(t.explanation.condition_id == block.condition_id for t in learning)
    assert all(t.explanation.pair_id == block.pair_id for t in learning)
    catches = list(test.filter(is_catch=True).select_related("explanation"))
    assert len(catches) == 2 and test.count() == 6
    for catch in catches:
        assert catch.explanation_id in {t.explanation_id for t in learning}
        truth = block.pair.class_a_id if catch.correct_answer == "A" else block.pair.class_b_id
        assert catch.image.class_label_id == truth


@pytest.mark.django_db
def test_the_instructions_explain_an_example_stimulus_from_the_raters_condition():
    study = live_study(n_pairs=2, pairs_per_assignment=1)
    rater = ClientRater()
    page = rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), **PROLIFIC))
    assert page.step == "instructions" and len(page.images) == 2
    assignment = Assignment.objects.get(study=study)
    example = assignment.example_explanation
    block = assignment.blocks.get()
    assert example.condition_id == block.condition_id and example.pair_id != block.pair_id
    assert rater.images(page)[0] != b""
