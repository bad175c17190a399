"""The tidy export, the researchers' API, the report command and the report page, on a study of simulated
raters stored in PostgreSQL with real image files."""

import csv
import io
import json

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from rest_framework.authtoken.models import Token

from analysis.demo import demo_study_create
from analysis.report import CAPTIONS
from analysis.selectors import COLUMN_NAMES, data_dictionary, responses_tidy
from studies.models import Assignment, ProviderIdentity, Response
from tests.studies.builders import data_guards_off

SECRET_WORKER_ID = "A1WORKERSECRET42"


@pytest.fixture
def study(db):
    study = demo_study_create(raters_per_condition=4, n_pairs=2, pairs_per_rater=2, n_test=4, n_learning=1)
    first = Assignment.objects.filter(study=study).order_by("pk").first()
    ProviderIdentity.objects.create(rater=first.rater, provider="mturk", external_id=SECRET_WORKER_ID,
                                    extra={"hitId": "HITSECRET"})  # fmt: skip
    return study


@pytest.fixture
def plain_user(db):
    return get_user_model().objects.create_user(username="rater-like", password="a-long-test-password")


def test_export_has_one_row_per_response_with_every_design_factor(study):
    rows = responses_tidy(study=study)
    assert len(rows) == Response.objects.filter(trial__block__assignment__study=study).count() > 0
    assert all(list(row) == COLUMN_NAMES for row in rows)
    assert [d["column"] for d in data_dictionary()] == COLUMN_NAMES
    responses = Response.objects.filter(trial__block__assignment__study=study)
    reference = {
        r["pk"]: r
        for r in responses.values(
            "pk", "answer", "trial__phase", "trial__correct_answer", "trial__image_id",
            "trial__explanation_id", "trial__block__pair_id", "trial__block__condition__method",
            "trial__block__condition__setup",
            "trial__block__assignment__rater__opaque_id", "trial__block__assignment__study_version",
            "client_rt_ms",
        )
    }  # fmt: skip
    for row in rows:
        ref = reference[row["response"]]
        assert row["answer"] == ref["answer"] and row["phase"] == ref["trial__phase"]
        assert row["method"] == ref["trial__block__condition__method"]
        assert row["setup"] == ref["trial__block__condition__setup"]
        assert row["pair"] == ref["trial__block__pair_id"] and row["image"] == ref["trial__image_id"]
        assert row["explanation"] == ref["trial__explanation_id"]
        assert row["rater"] == str(ref["trial__block__assignment__rater__opaque_id"])
        assert row["study_version"] == ref["trial__block__assignment__study_version"]
        assert row["client_rt_ms"] == ref["client_rt_ms"]
        if ref["trial__phase"] == "learning":
            assert row["correct"] is None
        else:
            assert row["correct"] == int(ref["answer"] == ref["trial__correct_answer"])
    assert all(row["rater_simulated"] for row in rows)


def test_export_flags_the_raters_the_declared_rules_exclude(study):
    rows = responses_tidy(study=study)
    excluded = {row["rater"]: row["exclusion_reasons"] for row in rows if row["excluded"]}
    # demo: the last rater of every other condition fails the catch trial and answers fast; one stops early.
    assert sum("failed_catch_trials" in why for why in excluded.values()) == 3
    assert sum("median_rt_below_ms" in why for why in excluded.values()) == 3
    assert sum("incomplete" in why for why in excluded.values()) == 1
    assert all(not row["exclusion_reasons"] for row in rows if not row["excluded"])


def test_provider_ids_never_leave_through_the_api(study, researcher_client):
    for url in (
        f"/api/studies/{study.pk}/responses/",
        f"/api/studies/{study.pk}/responses/?format=csv",
        f"/api/studies/{study.pk}/progress/",
        f"/api/studies/{study.pk}/analysis/?bootstrap=200&mixed=0",
        "/api/studies/",
    ):
        body = researcher_client.get(url).content.decode()
        assert SECRET_WORKER_ID not in body and "HITSECRET" not in body, url


def test_responses_csv_matches_the_json(study, researcher_client):
    as_json = researcher_client.get(f"/api/studies/{study.pk}/responses/").json()
    response = researcher_client.get(f"/api/studies/{study.pk}/responses/?format=csv")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert list(parsed[0]) == COLUMN_NAMES and len(parsed) == len(as_json)
    assert [int(r["response"]) for r in parsed] == [r["response"] for r in as_json]
    dictionary = researcher_client.get(
        f"/api/studies/{study.pk}/data-dictionary/?format=csv"
    ).content.decode()
    assert dictionary.splitlines()[0] == "column,type,description" and "exclusion_reasons" in dictionary


def test_api_lists_studies_and_progress_without_the_pilots(study, researcher_client):
    pilot = Assignment.objects.filter(study=study, status=Assignment.Status.COMPLETED).order_by("pk").first()
    with data_guards_off():
        Assignment.objects.filter(pk=pilot.pk).update(is_pilot=True)
    listed = researcher_client.get("/api/studies/").json()
    mine = next(s for s in listed if s["id"] == study.pk)
    responses = Response.objects.filter(trial__block__assignment__study=study)
    assert mine["n_responses"] == responses.exclude(trial__block__assignment=pilot).count() > 0
    assert mine["n_assignments_completed"] == 22 and mine["n_pilot_assignments"] == 1
    progress = researcher_client.get(f"/api/studies/{study.pk}/progress/").json()
    assert progress["assignments"]["completed"] == 22 and progress["assignments"]["started"] == 1
    assert progress["pilot_assignments"] == 1 and progress["simulated_raters"] == 23
    assert sum(c["completed_assignments"] for c in progress["completed_per_condition"]) == 22
    assert progress["responses"] == mine["n_responses"]


def test_api_analysis_says_which_model_each_number_comes_from(study, researcher_client):
    result = researcher_client.get(f"/api/studies/{study.pk}/analysis/?bootstrap=200&mixed=0").json()
    assert result["meta"]["seed"] == study.seed and result["meta"]["simulated_raters"] == 24
    assert result["meta"]["exclusion_rules"] == study.exclusion_rules
    models = {row["model"] for row in result["tables"]["comparisons"]}
    assert models == {"GEE (binomial, exchangeable within rater, bias-reduced sandwich)"}
    assert {row["rule"] for row in result["tables"]["exclusions"]} >= set(study.exclusion_rules)
    bad = researcher_client.get(f"/api/studies/{study.pk}/analysis/?bootstrap=lots")
    assert bad.status_code == 400 and "'lots' is not a whole number" in bad.json()["bootstrap"]


@pytest.mark.parametrize(
    "path", ["/api/studies/", "/api/studies/{pk}/responses/", "/api/studies/{pk}/progress/",
             "/api/studies/{pk}/analysis/", "/api/studies/{pk}/data-dictionary/"],
)  # fmt: skip
def test_api_refuses_anyone_but_researchers(study, client, plain_user, researcher, path):
    url = path.format(pk=study.pk)
    assert client.get(url).status_code in (401, 403)
    token = Token.objects.create(user=plain_user)
    assert client.get(url, HTTP_AUTHORIZATION=f"Token {token.key}").status_code == 403
    assert client.get(url, HTTP_AUTHORIZATION="Token not-a-real-token").status_code in (401, 403)
    client.force_login(plain_user)
    assert client.get(url).status_code == 403
    client.logout()
    staff_token = Token.objects.create(user=researcher)
    assert (
        client.get(url + "?bootstrap=100&mixed=0", HTTP_AUTHORIZATION=f"Token {staff_token.key}").status_code
        == 200
    )


def test_report_command_writes_html_pdf_and_csv_identically_twice(study, tmp_path):
    for run in ("one", "two"):
        call_command("report", str(study.pk), "--out", str(tmp_path / run), "--bootstrap", "200",
                     stdout=io.StringIO())  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert {f"tables/{name}.csv" for name in CAPTIONS} <= {str(f) for f in files}
    assert {"report.html", "report.pdf", "responses.csv", "data_dictionary.csv", "figures/stimuli.png"} <= {
        str(f) for f in files
    }
    assert {f"tables/{name}.tex" for name in CAPTIONS} <= {str(f) for f in files}
    assert "\\toprule" in (one / "tables" / "table5.tex").read_text()
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    pdf = (one / "report.pdf").read_bytes()
    # The only date in the PDF is reportlab's invariant one (2000-01-01), never the time of the run.
    assert pdf.startswith(b"%PDF") and b"(D:20000101000000+00'00')" in pdf
    assert pdf.count(b"CreationDate") == 1 and b"ModDate (D:2000" in pdf
    html = (one / "report.html").read_text()
    assert "raters are\nsimulated learners" in html and "bias-reduced sandwich" in html
    meta = json.loads((one / "report.json").read_text())
    assert meta["seed"] == study.seed and meta["software"].startswith("foil ")
    assert meta["exclusion_rules"] == study.exclusion_rules and meta["study_version"] == study.version
    assert SECRET_WORKER_ID not in (one / "responses.csv").read_text()


def test_report_command_refuses_an_unknown_study(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no study has id 999999"):
        call_command("report", "999999", stdout=io.StringIO())


def test_report_page_is_for_staff_only(study, plain_user, researcher_client):
    url = f"/analysis/studies/{study.pk}/report/"
    anonymous = Client()
    assert anonymous.get(url).status_code == 302
    anonymous.force_login(plain_user)
    assert anonymous.get(url).status_code == 302  # to the admin login: not staff
    page = researcher_client.get(url)
    assert page.status_code == 200
    text = page.content.decode()
    assert "Report: " in text and "data:image/png;base64," in text and "table-comparisons" in text
    table = researcher_client.get(f"/analysis/studies/{study.pk}/tables/accuracy.csv")
    assert table.status_code == 200 and table.content.decode().startswith("method,setup,n_raters")
    assert researcher_client.get(f"/analysis/studies/{study.pk}/tables/nonsense.csv").status_code == 404


def test_report_first_page_states_the_plan_flags_deviations_and_small_cells(study):
    from analysis.report import report_build, report_html, report_pdf
    from tests.analysis.test_report_pdf import pdf_pages_text

    report = report_build(study=study, n_boot=200, mixed=False)
    meta = report.meta
    assert meta["preregistration"]["frozen_at"] and meta["deviations"] == []
    primary = report.tables["primary"]
    # No primary claim the rater permutation test does not support: the primary p is never below it.
    assert (primary["p"] >= primary["p_permutation"] - 1e-12).all()
    assert set(meta["significant_primary"]) == set(primary.loc[primary["significant"], "comparison"])
    # 4 raters per condition: every condition is flagged with its power, and no rater bootstrap is shown.
    assert len(report.tables["small_cells"]) == len(report.tables["accuracy"])
    assert report.tables["accuracy"]["bootstrap_low"].isna().all()
    assert report.tables["learning_gain"]["gain_bootstrap_low"].isna().all()
    assert report.tables["table5"].columns.tolist()[0] == "method"

    # Changing the exclusion rules after the plan was frozen is reported as a deviation, on the first page.
    from tests.studies.builders import data_guards_off

    with data_guards_off():
        type(study).objects.filter(pk=study.pk).update(exclusion_rules={"incomplete": True})
    study.refresh_from_db()
    changed = report_build(study=study, n_boot=200, mixed=False)
    assert any(d.startswith("exclusion_rules: pre-registered") for d in changed.meta["deviations"])
    html = report_html(changed)
    assert "Deviations from the plan" in html and html.index("Deviations") < html.index("table-primary")
    first_page = pdf_pages_text(report_pdf(changed))[0]  # and on the PDF's first page
    assert "Deviations from the plan" in first_page and "exclusion_rules: pre-registered" in first_page
