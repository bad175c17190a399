"""The study page drives the workflow: launch, pause, resume, close, copy, try as a rater, the conditions
grid, the blur preview, pair mining from the study, and the monitoring page with blinded accuracy."""

import io
from html import escape as html_escape

import numpy as np
import pytest
from django.test import override_settings
from django.urls import reverse
from PIL import Image as PILImage

from studies import services
from studies.models import Assignment, AuditEntry, Phase, Rater, Study, Trial
from studies.services import _cell_counts
from tests.factories import ClassPairFactory, ConditionFactory, StudyFactory
from tests.studies.builders import live_study

pytestmark = pytest.mark.django_db


def page_url(study: Study) -> str:
    return reverse("admin:studies_study_change", args=[study.pk])


def step(client, study: Study, action: str, **kwargs):
    return client.post(reverse("admin:studies_study_workflow", args=[study.pk, action]), **kwargs)


def ready_study(**design) -> Study:
    study = live_study(n_pairs=1, setups=("random", "consistent"), n_images=2, n_learning=1, **design)
    Study.objects.filter(pk=study.pk).update(status=Study.Status.CLOSED)  # frozen -> frozen is allowed
    return study


def test_launch_pause_resume_close_from_the_study_page_each_audited(researcher_client):
    study = live_study(n_pairs=1, setups=("random",), n_images=2, n_learning=1)
    page = researcher_client.get(page_url(study)).content.decode()
    assert 'value="Pause"' in page and 'value="Close"' in page and 'value="Launch"' not in page
    assert step(researcher_client, study, "pause").status_code == 302
    assert Study.objects.get(pk=study.pk).status == Study.Status.PAUSED
    before = Assignment.objects.count()
    refused = researcher_client.get(reverse("studies:entry", args=[study.pk]))
    assert "not open at the moment" in refused.content.decode()  # a paused study takes no new raters
    assert Assignment.objects.count() == before
    step(researcher_client, study, "resume")
    assert Study.objects.get(pk=study.pk).status == Study.Status.LIVE
    step(researcher_client, study, "close")
    closed = Study.objects.get(pk=study.pk)
    assert (closed.status, closed.version) == (Study.Status.CLOSED, 1)
    step(researcher_client, study, "launch")
    relaunched = Study.objects.get(pk=study.pk)
    assert (relaunched.status, relaunched.version) == (Study.Status.LIVE, 2)
    actions = list(AuditEntry.objects.filter(study=study).values_list("action", "user__username"))
    assert actions == [("paused", "ada"), ("resumed", "ada"), ("closed", "ada"), ("launched", "ada")]
    assert AuditEntry.objects.filter(study=study).last().detail == {
        "status": ["closed", "live"],
        "version": 2,
    }


def test_a_refused_step_says_why_and_changes_nothing(researcher_client):
    study = ClassPairFactory(study__status=Study.Status.READY).study
    ConditionFactory(study=study, method="cve", setup="random")
    response = step(researcher_client, study, "launch", follow=True)
    assert "cannot go live" in response.content.decode()
    assert Study.objects.get(pk=study.pk).status == Study.Status.READY
    assert not AuditEntry.objects.filter(study=study).exists()


def test_copy_makes_a_draft_with_the_same_design_pairs_and_conditions(researcher_client):
    study = ready_study(seed=11, catch_trials_per_pair=1, exclusion_rules={"incomplete": True})
    other = StudyFactory(dataset=study.dataset, classifier=study.classifier)
    response = step(researcher_client, study, "copy")
    copy = Study.objects.exclude(pk__in=[study.pk, other.pk]).get()
    assert response.status_code == 302 and response["Location"] == page_url(copy)
    assert copy.status == Study.Status.DRAFT and copy.title == f"{study.title} (copy of v1)"
    assert (copy.copied_from, copy.copied_from_version) == (study, 1)
    for field in Study.DESIGN_FIELDS:
        assert getattr(copy, field) == getattr(study, field), field
    pairs = lambda s: sorted(s.pairs.values_list("class_a", "class_b"))  # noqa: E731
    conditions = lambda s: sorted(s.conditions.values_list("method", "setup"))  # noqa: E731
    assert pairs(copy) == pairs(study) and conditions(copy) == conditions(study)
    assert AuditEntry.objects.get(study=copy).action == "created as a copy"


def test_try_as_a_rater_gives_a_pilot_assignment_left_out_of_balance_and_analysis(researcher_client):
    from analysis.selectors import responses_tidy, study_assignments

    study = live_study(n_pairs=1, setups=("random",), n_images=2, n_learning=1)
    response = step(researcher_client, study, "pilot")
    pilot = Assignment.objects.get(study=study)
    assert response.status_code == 302
    assert response["Location"] == reverse("studies:go", kwargs={"token": pilot.token})
    assert pilot.is_pilot
    consent = researcher_client.get(response["Location"], follow=True)
    assert consent.status_code == 200  # the browser is now the pilot rater
    trial = Trial.objects.filter(block__assignment=pilot, phase=Phase.PRE_LEARNING).first()
    services.response_submit(trial=trial, answer="A")
    assert _cell_counts(study, pilot.started_at) == {}
    assert responses_tidy(study=study) == [] and study_assignments(study=study).empty
    assert AuditEntry.objects.get(study=study).action == "pilot assignment"


def grid(page: str) -> str:
    start = page.index('<table class="condition-grid"')
    return page[start : page.index("</table>", start)]


@override_settings(FOIL_STABLE_DIFFUSION_PATH="")
def test_conditions_grid_shows_papers_and_disables_methods_that_cannot_run_here(researcher_client, tmp_path):
    study = ClassPairFactory().study
    ConditionFactory(study=study, method="cve", setup="random")
    html = grid(researcher_client.get(page_url(study)).content.decode())
    assert (
        "Vandenhende et al., Making Heads or Tails" in html and "Goyal et al., Counterfactual Visual" in html
    )
    assert 'value="cve|random" id="id_conditions_grid_cve_random" checked>' in html
    assert 'value="ldce-txt|random" id="id_conditions_grid_ldce-txt_random" disabled>' in html
    assert "cannot run here: needs the setting FOIL_STABLE_DIFFUSION_PATH" in html
    with override_settings(FOIL_STABLE_DIFFUSION_PATH=str(tmp_path / "not-there")):
        html = grid(researcher_client.get(page_url(study)).content.decode())
        assert 'value="ldce-txt|random" id="id_conditions_grid_ldce-txt_random" disabled>' in html
        absent = f"FOIL_STABLE_DIFFUSION_PATH='{tmp_path / 'not-there'}' is not a directory on this machine"
        assert html_escape(absent) in html
    with override_settings(FOIL_STABLE_DIFFUSION_PATH=str(tmp_path)):
        html = grid(researcher_client.get(page_url(study)).content.decode())
        assert 'value="ldce-txt|random" id="id_conditions_grid_ldce-txt_random">' in html
    assert "cell method: marks regions" in html and "generative method: synthesises" in html
    assert "semantically consistent image pairs" in html and "the replaced regions show the same part" in html


def test_excluded_studies_do_not_offer_the_study_itself(researcher_client):
    study = StudyFactory(title="This one")
    StudyFactory(title="An earlier one")
    form = researcher_client.get(page_url(study)).context["adminform"].form
    offered = list(form.fields["excluded_studies"].queryset.values_list("title", flat=True))
    assert "An earlier one" in offered and "This one" not in offered


def fields_without_help(response) -> list[str]:
    """The fields of an admin form page (editable or read-only) shown without help text."""
    missing = []
    for fieldset in response.context["adminform"]:
        for line in fieldset:
            for field in line:
                name = field.field["name"] if field.is_readonly else field.field.name
                text = field.field["help_text"] if field.is_readonly else field.field.help_text
                if not str(text).strip():
                    missing.append(name)
    return missing


@pytest.mark.parametrize("status", [None, Study.Status.DRAFT, Study.Status.LIVE])
def test_every_study_field_is_on_the_form_with_help(researcher_client, status):
    """On the add page, a draft's page and a live study's page (where most fields are read-only)."""
    if status is None:
        response = researcher_client.get(reverse("admin:studies_study_add"))
    else:
        study = StudyFactory()
        Study.objects.filter(pk=study.pk).update(status=status)
        response = researcher_client.get(page_url(study))
    assert response.status_code == 200
    assert fields_without_help(response) == []
    shown = {
        field.field["name"] if field.is_readonly else field.field.name
        for fieldset in response.context["adminform"]
        for line in fieldset
        for field in line
    }
    for name in ("exclusion_rules", "catch_trials_per_pair", "min_rt_ms", "blur_sigma", "conditions_grid"):
        assert name in shown, name


def blur_png(client, study: Study, sigma) -> np.ndarray:
    response = client.get(reverse("admin:studies_study_blur_preview", args=[study.pk]), {"sigma": sigma})
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    return np.asarray(PILImage.open(io.BytesIO(response.content)).convert("L"), dtype=float)


def test_blur_preview_shows_one_image_blurred_outside_its_centre(researcher_client):
    study = live_study(n_pairs=1, setups=("random",))
    sharp, blurred = blur_png(researcher_client, study, 0), blur_png(researcher_client, study, 12)
    h, w = sharp.shape
    centre = (slice(h // 4 + 10, 3 * h // 4 - 10), slice(w // 4 + 10, 3 * w // 4 - 10))
    corner = (slice(0, h // 5), slice(0, w // 5))
    assert np.array_equal(sharp[centre], blurred[centre])  # the region stays in focus
    assert not np.array_equal(sharp[corner], blurred[corner]) or sharp[corner].std() == 0
    bad = researcher_client.get(reverse("admin:studies_study_blur_preview", args=[study.pk]), {"sigma": "x"})
    assert bad.status_code == 400 and "not a number" in bad.content.decode()


def test_the_add_page_previews_the_blur_of_the_data_set_chosen(researcher_client):
    study = live_study(n_pairs=1, setups=("random",))
    url = reverse("admin:studies_study_dataset_blur_preview")
    by_dataset = researcher_client.get(url, {"dataset": study.dataset_id, "sigma": 12})
    assert by_dataset.status_code == 200 and by_dataset["Content-Type"] == "image/png"
    by_study = researcher_client.get(
        reverse("admin:studies_study_blur_preview", args=[study.pk]), {"sigma": 12}
    )
    assert by_dataset.content == by_study.content
    missing = researcher_client.get(url, {"dataset": "999999", "sigma": 8})
    assert missing.status_code == 400 and "'999999' is not a data set's id" in missing.content.decode()
    add_page = researcher_client.get(reverse("admin:studies_study_add")).content.decode()
    assert url in add_page and 'getElementById("id_dataset")' in add_page


def test_pair_mining_is_reachable_from_the_study_and_preselects_it(researcher_client):
    study = StudyFactory()
    response = researcher_client.get(reverse("admin:studies_study_mine_pairs", args=[study.pk]))
    target = reverse("admin:explain_classifier_pairs", args=[study.classifier_id])
    assert response.status_code == 302 and response["Location"] == f"{target}?study={study.pk}"


# --- monitoring ---


def finish(assignment: Assignment, right: bool) -> None:
    for trial in Trial.objects.filter(block__assignment=assignment).order_by("pk"):
        if trial.phase == Phase.LEARNING:
            answer = "seen"
        else:
            answer = trial.correct_answer if right else ("A" if trial.correct_answer == "B" else "B")
        services.response_submit(trial=trial, answer=answer)
    services.assignment_complete(assignment=assignment)


def test_monitor_counts_each_cell_and_keeps_accuracy_blind_until_unblinded(researcher_client):
    study = live_study(n_pairs=1, setups=("random", "consistent"), n_images=2, n_learning=1)
    assignments = [
        services.assignment_create(study=study, rater=Rater.objects.create(), provider="direct", seed=i)
        for i in range(3)
    ]
    finish(assignments[0], right=True)
    finish(assignments[1], right=False)
    services.pilot_assignment_create(study=study, user=None)
    url = reverse("analysis:monitor", args=[study.pk])
    response = researcher_client.get(url)
    monitor = response.context["monitor"]
    cells = {(c.condition.setup, c.pair.pk): c for row in monitor["rows"] for c in row["cells"]}
    assert sum(c.completed for c in cells.values()) == 2 and sum(c.started for c in cells.values()) == 1
    assert monitor["totals"] == {
        "started": 1,
        "completed": 2,
        "timed_out": 0,
        "excluded": 0,
    }  # pilot left out
    assert monitor["balance"] == {"min": 1, "max": 1, "balanced": True}  # one completed in each cell
    page = response.content.decode()
    assert 'id="blinded"' in page and 'id="accuracy"' not in page and monitor["accuracy"] is None
    assert 'hx-trigger="every 5s"' in page
    partial = researcher_client.get(url, HTTP_HX_REQUEST="true")
    assert "<html" not in partial.content.decode() and 'id="monitor-table"' in partial.content.decode()

    researcher_client.post(reverse("analysis:unblind", args=[study.pk]))
    study.refresh_from_db()
    assert study.unblinded_at is not None and study.unblinded_by.username == "ada"
    assert AuditEntry.objects.filter(study=study, action="unblinded accuracy by condition").exists()
    monitor = researcher_client.get(url).context["monitor"]
    accuracy = {a["condition"].setup: a["accuracy"] for a in monitor["accuracy"] if a["responses"]}
    expected = {}
    for a, right in ((assignments[0], 1.0), (assignments[1], 0.0)):
        expected[a.blocks.get().condition.setup] = expected.get(a.blocks.get().condition.setup, []) + [right]
    assert accuracy == {k: sum(v) / len(v) for k, v in expected.items()}


def test_the_report_records_an_unblinding_and_lists_the_audit_log(researcher):
    from analysis.report import report_build

    study = live_study(n_pairs=1, setups=("random",), n_images=2, n_learning=1)
    finish(
        services.assignment_create(study=study, rater=Rater.objects.create(), provider="direct"), right=True
    )
    services.study_unblind(study=study, user=researcher)
    report = report_build(study=study, n_boot=100, mixed=False)
    assert "accuracy unblinded by ada" in report.meta["unblinded"]
    assert list(report.tables["audit_log"]["action"]) == ["unblinded accuracy by condition"]


def test_monitor_shows_accuracy_once_closed(researcher_client):
    study = live_study(n_pairs=1, setups=("random",), n_images=2, n_learning=1)
    finish(
        services.assignment_create(study=study, rater=Rater.objects.create(), provider="direct"), right=True
    )
    services.study_close(study=study)
    monitor = researcher_client.get(reverse("analysis:monitor", args=[study.pk])).context["monitor"]
    assert [a["accuracy"] for a in monitor["accuracy"]] == [1.0]


def test_admin_change_of_the_study_is_in_the_audit_log(researcher_client):
    study = ClassPairFactory(study__title="Before").study
    data = {
        f: getattr(study, f)
        for f in (
            "n_prelearning", "n_learning", "n_test", "min_learning_seconds", "time_limit_minutes", "label_a",
            "label_b", "blur_sigma", "stimulus_region", "design", "seed", "catch_trials_per_pair",
            "min_rt_ms",
        )
    }  # fmt: skip
    pair = study.pairs.get()
    data |= {
        "title": "After",
        "description": "",
        "dataset": study.dataset_id,
        "classifier": study.classifier_id,
        "pairs_per_assignment": "",
        "exclusion_rules": '{"incomplete": true}',
        "conditions_grid": ["cve|random", "cve|consistent"],
        "pairs-TOTAL_FORMS": "1",
        "pairs-INITIAL_FORMS": "1",
        "pairs-MIN_NUM_FORMS": "0",
        "pairs-MAX_NUM_FORMS": "1000",
        "pairs-0-id": pair.pk,
        "pairs-0-study": study.pk,
        "pairs-0-class_a": pair.class_a_id,
        "pairs-0-class_b": pair.class_b_id,
        "pairs-0-mined_by": "manual",
    }
    response = researcher_client.post(page_url(study), data)
    assert response.status_code == 302, response.content.decode()[-3000:]
    entries = {e.action: e.detail for e in AuditEntry.objects.filter(study=study)}
    assert entries["changed"]["title"] == ["Before", "After"]
    assert entries["changed"]["exclusion_rules"] == [{}, {"incomplete": True}]
    assert entries["conditions changed"] == {"added": ["cve / consistent", "cve / random"], "removed": []}
    page = researcher_client.get(page_url(study)).content.decode()
    assert 'id="audit-log"' in page and "conditions changed" in page and "cve / consistent" in page


def test_precompute_button_plans_the_study_and_opens_its_progress(researcher_client):
    from explain.models import WorkUnit
    from tests.factories import ClassLabelFactory, ImageFactory

    study = StudyFactory(title="Garments", n_learning=2)
    coat = ClassLabelFactory(dataset=study.dataset, name="Coat")
    shirt = ClassLabelFactory(dataset=study.dataset, name="Shirt")
    for label in (coat, shirt):
        ImageFactory.create_batch(6, class_label=label, split="train")
    ClassPairFactory(study=study, class_a=coat, class_b=shirt)
    ConditionFactory(study=study, method="cve", setup="random")
    page = researcher_client.get(page_url(study)).content.decode()
    assert 'value="Precompute stimuli"' in page and 'value="Launch"' not in page
    response = step(researcher_client, study, "precompute")
    assert response["Location"] == reverse("explain:precompute_progress", args=[study.pk])
    assert Study.objects.get(pk=study.pk).status == Study.Status.PRECOMPUTING
    units = WorkUnit.objects.filter(plan__study=study).count()
    assert units > 0
    assert AuditEntry.objects.get(study=study).detail == {"units": units}


def test_mined_pairs_are_picked_with_their_scores_into_the_study_they_were_mined_for(researcher_client):
    from tests.factories import ClassLabelFactory

    study = StudyFactory()
    labels = [
        ClassLabelFactory(dataset=study.dataset, index=i, name=n)
        for i, n in enumerate("Coat Shirt Bag".split())
    ]
    study.classifier.confusion_matrix = [[80, 15, 5], [30, 65, 5], [2, 3, 95]]
    study.classifier.save(update_fields=["confusion_matrix"])
    url = reverse("admin:explain_classifier_pairs", args=[study.classifier_id])
    page = researcher_client.get(f"{url}?study={study.pk}").content.decode()
    assert f'<option value="{study.pk}" selected>' in page and "0.3000" in page  # Shirt -> Coat, 30 of 100
    response = researcher_client.post(
        f"{url}?study={study.pk}", {"method": "most_confused", "k": 10, "pair": ["1-0"], "study": study.pk}
    )
    assert response["Location"] == page_url(study)
    pair = study.pairs.get()
    assert (pair.class_a, pair.class_b, pair.mined_by) == (labels[1], labels[0], "most_confused")
    assert pair.confusion_score == pytest.approx(0.3)
    assert AuditEntry.objects.get(study=study).action == "class pairs mined and added"


def test_the_audit_log_is_exported_with_the_data(researcher_client, researcher):
    study = live_study(n_pairs=1, setups=("random",), n_images=2, n_learning=1)
    services.study_pause(study=study)
    services.audit_record(
        study=study, user=researcher, action="paused", detail={"status": ["live", "paused"]}
    )
    rows = researcher_client.get(f"/api/studies/{study.pk}/audit/", {"format": "csv"}).content.decode()
    header, line = rows.strip().splitlines()
    assert header == "at,user,action,detail" and ",ada,paused," in line


def test_no_study_field_is_left_off_the_study_page(rf, researcher):
    from django.contrib import admin
    from django.contrib.admin.utils import flatten_fieldsets

    request = rf.get("/")
    request.user = researcher
    shown = set(flatten_fieldsets(admin.site._registry[Study].get_fieldsets(request, StudyFactory())))
    fields = {f.name for f in [*Study._meta.concrete_fields, *Study._meta.many_to_many] if f.editable}
    assert fields - {"id", "unblinded_by"} <= shown
