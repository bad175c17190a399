"""The researcher's precompute pages: progress per method x setup (full page and htmx partial), failures with
retry, the stimulus gallery, the admin action; staff only."""

import io
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from explain.models import WorkUnit
from explain.precompute import study_precompute
from studies.models import Study
from tests.factories import (
    ClassLabelFactory,
    ClassPairFactory,
    ConditionFactory,
    ExplanationFactory,
    ImageFactory,
    StudyFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def study():
    study = StudyFactory(title="Garments", n_learning=2)
    coat = ClassLabelFactory(dataset=study.dataset, name="Coat")
    shirt = ClassLabelFactory(dataset=study.dataset, name="Shirt")
    for label in (coat, shirt):
        ImageFactory.create_batch(6, class_label=label, split="train")
    ClassPairFactory(study=study, class_a=coat, class_b=shirt)
    ConditionFactory(study=study, method="cve", setup="random")
    ConditionFactory(study=study, method="cve", setup="consistent")
    return study


def progress_url(study) -> str:
    return reverse("explain:precompute_progress", args=[study.pk])


def test_progress_page_counts_units_per_method_and_setup_and_polls_while_running(researcher_client, study):
    plan = study_precompute(study=study, semantic_pool=2)
    random_units = plan.units.filter(condition__setup="random").order_by("id")
    first = random_units.first()
    first.status, first.started_at, first.finished_at = WorkUnit.Status.DONE, timezone.now(), timezone.now()
    first.save()
    WorkUnit.objects.filter(pk=random_units.last().pk).update(status=WorkUnit.Status.RUNNING)

    page = researcher_client.get(progress_url(study))
    html = page.content.decode()
    assert page.status_code == 200 and "<html" in html
    assert 'hx-trigger="every 2s"' in html and "htmx-2.min.js" in html and "X-CSRFToken" in html
    row_random = html.split('<td class="text">random')[1].split("</tr>")[0]
    assert "1 / 2" in row_random and "50%" in row_random  # finished / total
    row_consistent = html.split('<td class="text">consistent')[1].split("</tr>")[0]
    assert "0 / 4" in row_consistent
    assert "per minute" in html and "s left" in html

    partial = researcher_client.get(progress_url(study), HTTP_HX_REQUEST="true")
    body = partial.content.decode()
    assert "<html" not in body and body.lstrip().startswith('<div id="precompute-progress"')
    assert "1 / 2" in body


def test_progress_stops_polling_when_done_and_lists_failures_with_retry(researcher_client, study):
    plan = study_precompute(study=study, semantic_pool=1)
    plan.units.update(status=WorkUnit.Status.DONE, finished_at=timezone.now())
    broken = plan.units.first()
    WorkUnit.objects.filter(pk=broken.pk).update(
        status=WorkUnit.Status.FAILED, error="RuntimeError: CUDA out of memory (tried 2 GiB)"
    )

    html = researcher_client.get(progress_url(study)).content.decode()
    assert "hx-trigger" not in html  # no work left that could change: no polling
    assert "CUDA out of memory (tried 2 GiB)" in html and broken.key in html
    assert reverse("explain:unit_retry", args=[broken.pk]) in html

    response = researcher_client.post(reverse("explain:unit_retry", args=[broken.pk]), {"study": study.pk})
    assert response.status_code == 302 and response.url == progress_url(study)
    broken.refresh_from_db()
    assert broken.status == WorkUnit.Status.QUEUED and broken.attempts == 0
    study.refresh_from_db()
    assert study.status == Study.Status.PRECOMPUTING

    WorkUnit.objects.filter(pk=broken.pk).update(status=WorkUnit.Status.FAILED)
    researcher_client.post(reverse("explain:precompute_retry_failed", args=[study.pk]))
    broken.refresh_from_db()
    assert broken.status == WorkUnit.Status.QUEUED


def test_start_button_plans_or_says_why_not(researcher_client, study):
    response = researcher_client.post(reverse("explain:precompute_start", args=[study.pk]), follow=True)
    assert "work units" in response.content.decode()
    assert WorkUnit.objects.filter(plan__study=study).count() == 2 + 2 * 3

    empty = StudyFactory(title="Empty")
    response = researcher_client.post(reverse("explain:precompute_start", args=[empty.pk]), follow=True)
    assert "has no class pairs" in response.content.decode()


def test_gallery_shows_the_stimuli_of_one_condition_and_serves_them(researcher_client, study):
    random_c, semantic_c = study.conditions.get(setup="random"), study.conditions.get(setup="consistent")
    pair = study.pairs.get()
    shown = ExplanationFactory.create_batch(
        2, study=study, pair=pair, condition=random_c, metrics={"n_edits": 3}
    )
    hidden = ExplanationFactory(study=study, pair=pair, condition=semantic_c)

    html = researcher_client.get(
        reverse("explain:gallery", args=[study.pk]), {"condition": random_c.pk}
    ).content
    html = html.decode()
    assert all(f'id="explanation-{e.pk}"' in html for e in shown)
    assert f'id="explanation-{hidden.pk}"' not in html
    assert "3 edits" in html and "Coat (class A) vs Shirt (class B)" in html
    partial = researcher_client.get(
        reverse("explain:gallery", args=[study.pk]), {"condition": semantic_c.pk}, HTTP_HX_REQUEST="true"
    ).content.decode()
    assert f'id="explanation-{hidden.pk}"' in partial and "<html" not in partial

    image = researcher_client.get(reverse("explain:explanation_file", args=[shown[0].pk, "query"]))
    assert image.status_code == 200 and image["Content-Type"] == "image/png"
    with shown[0].query_stimulus.open("rb") as fh:
        assert b"".join(image.streaming_content) == fh.read()
    missing = researcher_client.get(reverse("explain:explanation_file", args=[shown[0].pk, "counterfactual"]))
    assert missing.status_code == 404
    assert researcher_client.get(f"/research/explanations/{shown[0].pk}/label.png").status_code == 404


def test_the_gallery_captions_each_method_with_the_figures_that_fit_it(researcher_client, study):
    """Issue 15: generative stimuli were all captioned "0 edits". A generative condition (a variant too)
    shows region area, L1, COUT and NFE; a cell method its edits; either says whether it flipped."""
    pair = study.pairs.get()
    generative = ConditionFactory(study=study, method="ldce-cls-fashion-mnist", setup="random")
    metrics = {"n_edits": 0, "region_area": 0.3814, "l1": 0.14279, "cout": 0.3078, "nfe": 220}
    flipped = ExplanationFactory(study=study, pair=pair, condition=generative, metrics=metrics)
    unflipped = ExplanationFactory(
        study=study, pair=pair, condition=generative, metrics=metrics, flipped=False
    )
    cell = ExplanationFactory(
        study=study, pair=pair, condition=study.conditions.get(method="cve", setup="random"),
        metrics={"n_edits": 1},
    )  # fmt: skip

    def caption(condition, explanation) -> str:
        html = researcher_client.get(
            reverse("explain:gallery", args=[study.pk]), {"condition": condition.pk}
        ).content.decode()
        figure = html.split(f'id="explanation-{explanation.pk}"', 1)[1].split("</figure>", 1)[0]
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", figure.split("<figcaption>", 1)[1])).strip()

    assert caption(generative, flipped) == "flips, region 38%, L1 0.143, COUT 0.31, NFE 220"
    assert caption(generative, unflipped) == "no flip, region 38%, L1 0.143, COUT 0.31, NFE 220"
    assert caption(cell.condition, cell) == "flips, 1 edit"


def test_pages_are_for_staff_only(client, study):
    user = get_user_model().objects.create_user(username="rater", password="a-long-test-password")
    client.force_login(user)
    explanation = ExplanationFactory(study=study, pair=study.pairs.get(), condition=study.conditions.first())
    for url in (
        progress_url(study),
        reverse("explain:gallery", args=[study.pk]),
        reverse("explain:explanation_file", args=[explanation.pk, "query"]),
    ):
        response = client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response.url, url
    assert client.post(reverse("explain:precompute_start", args=[study.pk])).status_code == 302
    assert not WorkUnit.objects.exists()


def test_admin_action_precompute_plans_the_selected_studies(researcher_client, study):
    response = researcher_client.post(
        reverse("admin:studies_study_changelist"),
        {"action": "precompute", "_selected_action": [study.pk]},
        follow=True,
    )
    html = response.content.decode()
    assert "Precompute of &#x27;Garments&#x27; planned: 8 work units" in html
    assert progress_url(study) in html
    study.refresh_from_db()
    assert study.status == Study.Status.PRECOMPUTING

    listing = researcher_client.get(reverse("admin:studies_study_changelist")).content.decode()
    assert reverse("explain:gallery", args=[study.pk]) in listing


def test_admin_lists_failed_units_with_their_error_and_retries_them(researcher_client, study):
    plan = study_precompute(study=study, semantic_pool=1)
    unit = plan.units.first()
    WorkUnit.objects.filter(pk=unit.pk).update(
        status=WorkUnit.Status.FAILED, error="ValueError: bad image 17"
    )
    changelist = reverse("admin:explain_workunit_changelist")
    html = researcher_client.get(changelist, {"status__exact": "failed"}).content.decode()
    assert "ValueError: bad image 17" in html and unit.key in html
    researcher_client.post(changelist, {"action": "retry", "_selected_action": [unit.pk]})
    unit.refresh_from_db()
    assert unit.status == WorkUnit.Status.QUEUED


def test_command_plans_a_study_by_id_or_title_and_names_a_missing_one(study):
    out = io.StringIO()
    call_command("precompute", "Garments", "--semantic-pool", "1", stdout=out)
    assert "Planned 4 work units for 'Garments' on queue 'explain'" in out.getvalue()
    with pytest.raises(CommandError, match="No study with id or title 'Nope'"):
        call_command("precompute", "Nope")
    with pytest.raises(CommandError, match="not valid JSON"):
        call_command("precompute", str(study.pk), "--method-config", "{cve")
    with pytest.raises(CommandError, match="not a method of this study"):
        call_command("precompute", str(study.pk), "--method-config", '{"ldce-cls": {}}')
