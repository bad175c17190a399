"""The researcher's study page and monitoring page in real Chromium: workflow buttons, the conditions grid
with a method that cannot run here, the blur preview, the monitor refreshing itself (htmx) and the pilot.
Screenshots go to test-artifacts/browser/<test>/."""

import pytest
from django.contrib.auth import get_user_model
from django.test import override_settings
from playwright.sync_api import expect

from studies import services
from studies.models import Assignment, Phase, Rater, Trial
from tests.studies.builders import live_study

pytestmark = pytest.mark.django_db(transaction=True)


def login(page, base: str) -> None:
    get_user_model().objects.create_user(
        username="grace", password="a-long-test-password", is_staff=True, is_superuser=True
    )
    page.goto(f"{base}/admin/login/")
    page.fill("#id_username", "grace")
    page.fill("#id_password", "a-long-test-password")
    page.click("input[type=submit]")
    expect(page.locator("#user-tools")).to_contain_text("grace")


def complete(assignment: Assignment) -> None:
    for trial in Trial.objects.filter(block__assignment=assignment).order_by("pk"):
        answer = "seen" if trial.phase == Phase.LEARNING else trial.correct_answer
        services.response_submit(trial=trial, answer=answer)
    services.assignment_complete(assignment=assignment)


@override_settings(FOIL_STABLE_DIFFUSION_PATH="")
def test_the_study_page_drives_the_workflow_and_the_monitor_refreshes(live_server, browser_page):
    page = browser_page
    study = live_study(n_pairs=2, n_images=2, n_learning=1, title="Shirts and coats, wave 1")
    complete(services.assignment_create(study=study, rater=Rater.objects.create(), provider="direct", seed=1))
    services.assignment_create(study=study, rater=Rater.objects.create(), provider="direct", seed=2)
    login(page, live_server.url)

    page.goto(f"{live_server.url}/admin/studies/study/{study.pk}/change/")
    workflow = page.locator("#workflow")
    for label in ("Pause", "Close", "Copy into a new draft", "Try as a rater (pilot)"):
        expect(workflow.locator(f'input[value="{label}"]')).to_be_visible()
    expect(workflow.locator('input[value="Launch"]')).to_have_count(0)
    expect(page.locator('input[value="ldce-txt|random"]')).to_be_disabled()
    expect(page.locator(".condition-grid")).to_contain_text("cannot run here")
    expect(page.locator('input[value="cve|consistent"]')).to_be_checked()
    page.wait_for_function(
        "() => { const i = document.querySelector('img.blur-preview'); return i && i.naturalWidth === 224; }"
    )
    page.shot("study-page")

    page.goto(f"{live_server.url}/analysis/studies/{study.pk}/monitor/")
    expect(page.locator("#monitor")).to_contain_text("1 in progress, 1 completed")
    expect(page.locator("#blinded")).to_be_visible()
    page.shot("monitor")
    services.assignment_create(study=study, rater=Rater.objects.create(), provider="direct", seed=3)
    expect(page.locator("#monitor")).to_contain_text(
        "2 in progress, 1 completed", timeout=12_000
    )  # no reload
    page.once("dialog", lambda dialog: dialog.accept())
    page.click('input[value="Unblind accuracy now"]')
    expect(page.locator("#accuracy")).to_be_visible()
    expect(page.locator(".errornote")).to_contain_text("Unblinded by grace")
    page.shot("monitor-unblinded")

    page.goto(f"{live_server.url}/admin/studies/study/{study.pk}/change/")
    expect(page.locator("#audit-log")).to_contain_text("unblinded accuracy by condition")
    page.click('input[value="Try as a rater (pilot)"]')
    expect(page.locator('[data-step="instructions"]')).to_be_visible()
    page.shot("pilot-instructions")
    assert Assignment.objects.get(study=study, is_pilot=True)


def textured_png(seed: int):
    """A 28 x 28 grey image with stripes and noise, so that the blur preview shows what blur does."""
    import io

    import numpy as np
    from django.core.files.base import ContentFile
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    pixels = (np.indices((28, 28)).sum(axis=0) % 6 < 3) * 160 + rng.integers(0, 90, (28, 28))
    out = io.BytesIO()
    PILImage.fromarray(pixels.astype(np.uint8), mode="L").save(out, format="PNG")
    return ContentFile(out.getvalue(), name="textured.png")


@override_settings(FOIL_STABLE_DIFFUSION_PATH="")
def test_a_new_study_from_the_add_page_to_mined_pairs_and_training_progress(live_server, browser_page):
    """The add page (help text on every field, the conditions grid, the blur preview of the data set chosen),
    mining pairs from the study with their scores, and the precompute page while a model trains."""
    from datetime import timedelta

    from django.utils import timezone

    from explain.models import PrecomputePlan, WorkUnit
    from studies.models import Study
    from tests.factories import ClassifierFactory, ClassLabelFactory, DatasetFactory, ImageFactory

    page = browser_page
    dataset = DatasetFactory(name="garments")
    labels = [
        ClassLabelFactory(dataset=dataset, index=i, name=n) for i, n in enumerate(["Coat", "Shirt", "Bag"])
    ]
    for i, label in enumerate(labels):
        for j in range(3):
            ImageFactory(class_label=label, split="train", file=textured_png(3 * i + j))
    classifier = ClassifierFactory(
        dataset=dataset, name="garment-cnn", confusion_matrix=[[80, 15, 5], [30, 65, 5], [2, 3, 95]]
    )
    login(page, live_server.url)

    page.goto(f"{live_server.url}/admin/studies/study/add/")
    expect(page.locator(".blur-preview-note")).to_be_visible()  # no data set chosen yet
    page.select_option("#id_dataset", str(dataset.pk))
    page.wait_for_function(
        "() => { const i = document.querySelector('img.blur-preview'); return i && i.complete"
        " && i.naturalWidth === 224; }"
    )
    expect(page.locator(".condition-grid")).to_contain_text("semantically consistent image pairs")
    expect(page.locator('input[value="ldce-txt|random"]')).to_be_disabled()
    page.fill("#id_title", "Coats and shirts")
    page.select_option("#id_classifier", str(classifier.pk))
    page.fill("#id_blur_sigma", "12")
    page.locator("#id_blur_sigma").dispatch_event("change")
    page.wait_for_function(
        "() => document.querySelector('img.blur-preview').src.includes('sigma=12')"
        " && document.querySelector('img.blur-preview').complete"
    )
    page.check('input[value="cve|random"]')
    page.check('input[value="cve|consistent"]')
    page.shot("add-study")
    page.click('input[name="_continue"]')
    expect(page.locator("#audit-log")).to_contain_text("created")
    study = Study.objects.get(title="Coats and shirts")
    assert sorted(study.conditions.values_list("setup", flat=True)) == ["consistent", "random"]

    page.click(f"text=Mine pairs from {classifier.name}")
    expect(page.locator("body")).to_contain_text("0.3000")  # Shirt -> Coat: 30 of 100 shirts taken for coats
    page.shot("mine-pairs")
    page.check('input[name="pair"][value="1-0"]')
    page.click('input[value="Add to study"]')
    expect(page.locator("#audit-log")).to_contain_text("class pairs mined and added")
    assert list(study.pairs.values_list("class_a__name", "class_b__name")) == [("Shirt", "Coat")]
    page.shot("study-with-mined-pair")

    # The precompute page while a model trains: its steps and the time left.
    Study.objects.filter(pk=study.pk).update(status=Study.Status.PRECOMPUTING)
    model = WorkUnit.objects.create(
        key=f"backbone:d{dataset.pk}:autoencoder", kind=WorkUnit.Kind.BACKBONE, backbone_kind="autoencoder",
        dataset=dataset, status=WorkUnit.Status.RUNNING, started_at=timezone.now() - timedelta(seconds=30),
        timings={"steps_done": 120, "steps_total": 400},
    )  # fmt: skip
    plan = PrecomputePlan.objects.create(study=study)
    for condition in study.conditions.all():
        WorkUnit.objects.create(
            key=f"explanation:{condition.pk}", kind=WorkUnit.Kind.EXPLANATION, dataset=dataset, plan=plan,
            condition=condition, pair=study.pairs.get(), needs=[model.key], candidate=0,
            query_image=labels[1].images.first(), distractor_image=labels[0].images.first(),
        )  # fmt: skip
    page.goto(f"{live_server.url}/research/studies/{study.pk}/precompute/")
    expect(page.locator(".model-training")).to_contain_text("step 120 / 400, about")
    page.shot("precompute-training")
