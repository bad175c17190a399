"""A researcher creates a study in the admin; invalid designs and edits of live studies are refused."""

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from studies.models import Assignment, ClassPair, Condition, Study
from tests.factories import (
    ClassifierFactory,
    ClassLabelFactory,
    ClassPairFactory,
    ConditionFactory,
    DatasetFactory,
    ExplanationFactory,
    StudyFactory,
)
from tests.studies.builders import live_study
from tests.studies.walk import ClientRater

pytestmark = pytest.mark.django_db

ADD_URL = reverse("admin:studies_study_add")


def inline(prefix: str, rows: list[dict], initial: int = 0) -> dict:
    data = {
        f"{prefix}-TOTAL_FORMS": str(len(rows)),
        f"{prefix}-INITIAL_FORMS": str(initial),
        f"{prefix}-MIN_NUM_FORMS": "0",
        f"{prefix}-MAX_NUM_FORMS": "1000",
    }
    for i, row in enumerate(rows):
        data.update({f"{prefix}-{i}-{key}": value for key, value in row.items()})
    return data


def study_form(dataset, classifier, pairs, conditions, **overrides) -> dict:
    data = {
        "title": "Shirts and coats",
        "description": "",
        "dataset": dataset.pk,
        "classifier": classifier.pk,
        "n_prelearning": 10,
        "n_learning": 10,
        "n_test": 10,
        "min_learning_seconds": 3,
        "time_limit_minutes": 60,
        "label_a": "class A",
        "label_b": "class B",
        "blur_sigma": 8,
        "stimulus_region": "first-edit",
        "design": "between",
        "pairs_per_assignment": "",
        "seed": 7,
        "catch_trials_per_pair": 0,
        "min_rt_ms": 200,
        "exclusion_rules": "{}",
        "completion_code": "",
        "prolific_completion_code": "",
        "mturk_sandbox": "on",
        **inline("pairs", [{"class_a": a.pk, "class_b": b.pk, "mined_by": "manual"} for a, b in pairs]),
        "conditions_grid": [f"{m}|{s}" for m, s in conditions],
    }
    data.update(overrides)
    return data


@pytest.fixture
def garments():
    dataset = DatasetFactory(name="garments")
    classifier = ClassifierFactory(dataset=dataset, name="garment-cnn")
    labels = [
        ClassLabelFactory(dataset=dataset, index=i, name=n) for i, n in enumerate(["Shirt", "Coat", "Bag"])
    ]
    return dataset, classifier, labels


def errors_of(response) -> str:
    """All error text the admin form page shows."""
    assert response.status_code == 200, "the form should be shown again with errors"
    return response.content.decode()


def test_researcher_creates_a_study_with_pairs_and_conditions(researcher_client, garments):
    dataset, classifier, (shirt, coat, bag) = garments
    data = study_form(
        dataset, classifier, [(shirt, coat), (bag, coat)], [("cve", "random"), ("cve", "consistent")]
    )
    response = researcher_client.post(ADD_URL, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    study = Study.objects.get(title="Shirts and coats")
    assert study.status == Study.Status.DRAFT and study.seed == 7
    assert set(study.pairs.values_list("class_a__name", "class_b__name")) == {
        ("Shirt", "Coat"),
        ("Bag", "Coat"),
    }
    assert set(study.conditions.values_list("method", "setup")) == {("cve", "random"), ("cve", "consistent")}


def test_changelist_shows_status_and_counts(researcher_client):
    pair = ClassPairFactory(study__title="Counted")
    condition = ConditionFactory(study=pair.study)
    ExplanationFactory(pair=pair, condition=condition)
    ExplanationFactory(pair=pair, condition=condition)
    response = researcher_client.get(reverse("admin:studies_study_changelist"))
    assert response.status_code == 200
    row = next(r for r in response.context["cl"].result_list if r.title == "Counted")
    assert (row.n_pairs, row.n_conditions, row.n_explanations) == (1, 1, 2)
    assert "Counted" in response.content.decode() and "draft" in response.content.decode()


def test_zero_images_in_a_phase_is_refused(researcher_client, garments):
    dataset, classifier, (shirt, coat, _) = garments
    data = study_form(dataset, classifier, [(shirt, coat)], [("cve", "random")], n_test=0)
    page = errors_of(researcher_client.post(ADD_URL, data))
    assert "Each phase needs at least one item; images in test is 0" in page
    assert not Study.objects.exists()


def test_pair_of_the_same_class_is_refused(researcher_client, garments):
    dataset, classifier, (shirt, *_) = garments
    page = errors_of(researcher_client.post(ADD_URL, study_form(dataset, classifier, [(shirt, shirt)], [])))
    assert "A pair needs two different classes; both are &#x27;Shirt&#x27;." in page
    assert not Study.objects.exists()


def test_pair_with_a_class_not_in_the_dataset_is_refused(researcher_client, garments):
    dataset, classifier, (shirt, *_) = garments
    cardinal = ClassLabelFactory(dataset=DatasetFactory(name="birds"), name="Cardinal")
    page = errors_of(
        researcher_client.post(ADD_URL, study_form(dataset, classifier, [(shirt, cardinal)], []))
    )
    assert "Class &#x27;Cardinal&#x27; belongs to data set &#x27;birds&#x27;" in page
    assert not ClassPair.objects.exists()


def test_unregistered_method_is_refused(researcher_client, garments):
    dataset, classifier, (shirt, coat, _) = garments
    data = study_form(dataset, classifier, [(shirt, coat)], [("deep-magic", "random")])
    page = errors_of(researcher_client.post(ADD_URL, data))
    assert "No counterfactual method is registered for the condition deep-magic|random" in page
    assert not Condition.objects.exists()


def test_classifier_of_another_dataset_is_refused(researcher_client, garments):
    dataset, _, (shirt, coat, _) = garments
    bird_vgg = ClassifierFactory(dataset=DatasetFactory(name="birds"), name="bird-vgg")
    page = errors_of(researcher_client.post(ADD_URL, study_form(dataset, bird_vgg, [(shirt, coat)], [])))
    assert "Classifier &#x27;bird-vgg&#x27; was trained on data set &#x27;birds&#x27;" in page


def live_study_with_form(garments):
    dataset, classifier, (shirt, coat, _) = garments
    study = StudyFactory(dataset=dataset, classifier=classifier, title="Live one", seed=7)
    pair = ClassPairFactory(study=study, class_a=shirt, class_b=coat)
    ConditionFactory(study=study, method="cve", setup="random")
    Study.objects.filter(pk=study.pk).update(status=Study.Status.LIVE)
    study.refresh_from_db()
    data = study_form(dataset, classifier, [], [("cve", "random")], title="Live one")
    data.update(
        inline("pairs", [{"id": pair.pk, "class_a": shirt.pk, "class_b": coat.pk, "mined_by": "manual"}], 1)
    )
    return study, data


def test_a_live_study_shows_its_design_read_only_and_ignores_edits(researcher_client, garments):
    study, data = live_study_with_form(garments)
    url = reverse("admin:studies_study_change", args=[study.pk])
    page = researcher_client.get(url).content.decode()
    assert "is live (version 1): its design is frozen" in page
    assert 'name="n_test"' not in page and 'name="title"' in page  # design read-only, title editable
    response = researcher_client.post(url, {**data, "n_test": 5, "conditions_grid": ["cve|consistent"]})
    assert response.status_code == 302  # a valid post: the edits were ignored, not refused as malformed
    study.refresh_from_db()
    assert study.n_test == 10
    assert list(study.conditions.values_list("method", "setup")) == [("cve", "random")]


def test_deleting_a_pair_of_a_live_study_is_refused(researcher_client, garments):
    study, data = live_study_with_form(garments)
    url = reverse("admin:studies_study_change", args=[study.pk])
    researcher_client.post(url, {**data, "pairs-0-DELETE": "on"})
    assert study.pairs.count() == 1
    assert 'name="pairs-0-DELETE"' not in researcher_client.get(url).content.decode()


def test_unchanged_save_of_a_live_study_is_accepted(researcher_client, garments):
    study, data = live_study_with_form(garments)
    url = reverse("admin:studies_study_change", args=[study.pk])
    response = researcher_client.post(url, {**data, "description": "Now recruiting wave 2"})
    assert response.status_code == 302
    study.refresh_from_db()
    assert study.description == "Now recruiting wave 2"


def test_launch_action_refuses_with_the_missing_stimuli(researcher_client):
    pair = ClassPairFactory(study__status=Study.Status.READY, study__title="Not yet")
    ConditionFactory(study=pair.study, method="cve", setup="random")
    url = reverse("admin:studies_study_changelist")
    response = researcher_client.post(
        url, {"action": "launch", "_selected_action": [pair.study.pk]}, follow=True
    )
    page = response.content.decode()
    assert "cannot go live" in page and "cve / random: 0 of 10" in page
    pair.study.refresh_from_db()
    assert pair.study.status == Study.Status.READY


def test_launch_action_makes_a_ready_study_live(researcher_client):
    pair = ClassPairFactory(study__status=Study.Status.READY, study__n_learning=1)
    ExplanationFactory(pair=pair, condition=ConditionFactory(study=pair.study))
    url = reverse("admin:studies_study_changelist")
    researcher_client.post(url, {"action": "launch", "_selected_action": [pair.study.pk]})
    pair.study.refresh_from_db()
    assert pair.study.status == Study.Status.LIVE


@pytest.mark.parametrize("staff", [False, True])
def test_admin_is_for_researchers_only(client, staff):
    user = get_user_model().objects.create_user(username="someone", password="pw-123456789", is_staff=staff)
    client.force_login(user)
    response = client.get(reverse("admin:studies_study_changelist"))
    if staff:
        assert response.status_code == 403  # staff without the study permissions
    else:
        assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_anonymous_visitor_is_sent_to_login(client):
    response = client.get(reverse("admin:studies_study_changelist"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_consent_versions_are_listed_read_only_with_how_many_agreed_and_an_assignment_names_its_own(
    researcher_client,
):
    study = live_study(n_pairs=1, ethics_reference="IRB-2026-117")
    for pid in ("p1", "p2"):
        rater = ClientRater()
        rater.consent(rater.get(reverse("studies:entry", args=[study.pk]), PROLIFIC_PID=pid))
    page = researcher_client.get(reverse("admin:studies_consenttext_changelist")).content.decode()
    assert study.consent_texts.get().digest in page and '<td class="field-n_agreed">2</td>' in page
    consent = study.consent_texts.get()
    detail = researcher_client.get(reverse("admin:studies_consenttext_change", args=[consent.pk]))
    assert "IRB-2026-117" in detail.content.decode() and 'name="text"' not in detail.content.decode()
    delete = reverse("admin:studies_consenttext_delete", args=[consent.pk])
    assert researcher_client.post(delete).status_code == 403
    assignment = Assignment.objects.first()
    shown = researcher_client.get(reverse("admin:studies_assignment_change", args=[assignment.pk]))
    html = shown.content.decode()
    assert str(consent) in html and 'name="consent"' not in html  # shown, read only
