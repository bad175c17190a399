"""Study services: invalid designs are refused with messages that name the problem; answers are saved once."""

import pytest
from django.core.exceptions import ValidationError

from studies import services
from studies.models import Assignment, Condition, Response, Study
from tests.factories import (
    ClassifierFactory,
    ClassLabelFactory,
    ClassPairFactory,
    ConditionFactory,
    DatasetFactory,
    ExplanationFactory,
    StudyFactory,
    TrialFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def data():
    dataset = DatasetFactory(name="garments")
    classifier = ClassifierFactory(dataset=dataset, name="cnn")
    shirt = ClassLabelFactory(dataset=dataset, index=0, name="Shirt")
    coat = ClassLabelFactory(dataset=dataset, index=1, name="Coat")
    return dataset, classifier, shirt, coat


def messages(exc_info) -> str:
    return " ".join(exc_info.value.messages)


def test_study_create_builds_every_condition_and_pair(data):
    dataset, classifier, shirt, coat = data
    study = services.study_create(
        title="Garments", dataset=dataset, classifier=classifier, methods=["cve"], pairs=[(shirt, coat)]
    )
    assert study.status == Study.Status.DRAFT
    conditions = sorted(study.conditions.values_list("method", "setup"))
    assert conditions == [("cve", "consistent"), ("cve", "random")]
    pair = study.pairs.get()
    assert (pair.class_a, pair.class_b) == (shirt, coat)


@pytest.mark.parametrize("field", ["n_prelearning", "n_learning", "n_test"])
def test_zero_images_in_a_phase_is_refused(data, field):
    dataset, classifier, *_ = data
    with pytest.raises(ValidationError) as info:
        services.study_create(title="t", dataset=dataset, classifier=classifier, **{field: 0})
    assert field in info.value.message_dict
    assert "at least one" in messages(info) and "is 0" in messages(info)
    assert not Study.objects.exists()


def test_pair_of_the_same_class_is_refused(data):
    dataset, classifier, shirt, _ = data
    with pytest.raises(ValidationError) as info:
        services.study_create(title="t", dataset=dataset, classifier=classifier, pairs=[(shirt, shirt)])
    assert "two different classes" in messages(info) and "'Shirt'" in messages(info)
    assert not Study.objects.exists()  # atomic: nothing half-made is left behind


def test_pair_with_a_class_of_another_dataset_is_refused(data):
    dataset, classifier, shirt, _ = data
    bird = ClassLabelFactory(dataset=DatasetFactory(name="birds"), name="Cardinal")
    with pytest.raises(ValidationError) as info:
        services.study_create(title="t", dataset=dataset, classifier=classifier, pairs=[(shirt, bird)])
    assert "'Cardinal' belongs to data set 'birds'" in messages(info)
    assert "'garments'" in messages(info)


def test_unregistered_method_is_refused(data):
    dataset, classifier, *_ = data
    with pytest.raises(ValidationError) as info:
        services.study_create(title="t", dataset=dataset, classifier=classifier, methods=["deep-magic"])
    assert "'deep-magic'" in messages(info) and "cve" in messages(info)


def test_classifier_of_another_dataset_is_refused(data):
    dataset, *_ = data
    other = ClassifierFactory(dataset=DatasetFactory(name="birds"), name="bird-vgg")
    with pytest.raises(ValidationError) as info:
        services.study_create(title="t", dataset=dataset, classifier=other)
    assert "'bird-vgg' was trained on data set 'birds'" in messages(info)


def ready_study(n_learning: int = 2) -> Study:
    pair = ClassPairFactory(study__n_learning=n_learning, study__status=Study.Status.READY)
    condition = ConditionFactory(study=pair.study)
    for _ in range(n_learning):
        ExplanationFactory(pair=pair, condition=condition)
    return pair.study


def test_launch_freezes_the_design():
    study = services.study_launch(study=ready_study())
    assert study.status == Study.Status.LIVE and study.launched_at is not None
    with pytest.raises(ValidationError) as info:
        services.study_update(study=study, n_test=5)
    assert "frozen" in messages(info) and "n_test" in messages(info)
    study.refresh_from_db()
    assert study.n_test == 10
    # Not a design change: the description may still be edited.
    services.study_update(study=study, description="Wave 1")
    with pytest.raises(ValidationError, match="frozen"):
        services.class_pair_add(
            study=study,
            class_a=ClassLabelFactory(dataset=study.dataset),
            class_b=ClassLabelFactory(dataset=study.dataset),
        )
    with pytest.raises(ValidationError, match="frozen"):
        services.condition_add(study=study, method="cve", setup=Condition.Setup.CONSISTENT)


def test_launch_refused_while_stimuli_are_missing():
    pair = ClassPairFactory(study__status=Study.Status.READY, study__n_learning=3)
    condition = ConditionFactory(study=pair.study, method="cve", setup="consistent")
    ExplanationFactory(pair=pair, condition=condition)
    ExplanationFactory(pair=pair, condition=condition, flipped=False)  # not a usable stimulus
    with pytest.raises(ValidationError) as info:
        services.study_launch(study=pair.study)
    assert "cve / consistent: 1 of 3" in messages(info)
    pair.study.refresh_from_db()
    assert pair.study.status == Study.Status.READY


def test_launch_refused_for_a_draft():
    with pytest.raises(ValidationError, match="only a ready study can go live"):
        services.study_launch(study=StudyFactory())


def test_relaunch_after_close_raises_the_version():
    study = services.study_launch(study=ready_study())
    services.study_close(study=study)
    study = services.study_launch(study=study)
    assert (study.status, study.version) == (Study.Status.LIVE, 2)


def test_response_submit_is_idempotent():
    trial = TrialFactory()
    first, created = services.response_submit(trial=trial, answer="A", client_rt_ms=900)
    again, created_again = services.response_submit(trial=trial, answer="A", client_rt_ms=950)
    assert created and not created_again
    assert again.pk == first.pk and again.client_rt_ms == 900
    assert Response.objects.filter(trial=trial).count() == 1


def test_response_submit_refuses_a_changed_answer():
    trial = TrialFactory()
    services.response_submit(trial=trial, answer="A")
    with pytest.raises(services.ResponseConflict, match="already answered 'A'"):
        services.response_submit(trial=trial, answer="B")
    assert Response.objects.get(trial=trial).answer == "A"


def test_response_submit_refuses_dont_know_in_test():
    with pytest.raises(ValidationError, match="not allowed in the test phase"):
        services.response_submit(trial=TrialFactory(), answer="D")


def test_response_submit_refuses_a_finished_assignment():
    trial = TrialFactory(block__assignment__status=Assignment.Status.TIMED_OUT)
    with pytest.raises(ValidationError, match="timed_out"):
        services.response_submit(trial=trial, answer="A")
    assert not Response.objects.exists()


def test_rater_identify_returns_the_same_rater():
    first = services.rater_identify(provider="prolific", external_id="5f00", extra={"STUDY_ID": "s"})
    again = services.rater_identify(provider="prolific", external_id="5f00")
    other = services.rater_identify(provider="mturk", external_id="5f00")
    assert first.pk == again.pk != other.pk
    assert first.identities.get().extra == {"STUDY_ID": "s"}


def test_scout_regions_are_stimuli_whether_or_not_they_flip():
    pair = ClassPairFactory(study__status=Study.Status.READY, study__n_learning=2)
    condition = ConditionFactory(study=pair.study, method="scout", setup="random")
    ExplanationFactory(pair=pair, condition=condition, flipped=True)
    ExplanationFactory(pair=pair, condition=condition, flipped=False)
    assert services.study_launch(study=pair.study).status == Study.Status.LIVE
