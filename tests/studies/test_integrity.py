"""A live study's data cannot be quietly changed: every edit and delete through the admin, the ORM
(save, queryset.update/delete) and raw SQL leaves the data as they were; corrections and the audit log are the
only ways to annotate, and they are append-only."""

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import ProtectedError
from django.forms import MultiWidget
from django.forms.models import model_to_dict
from django.urls import reverse

from explain.models import Explanation
from studies import services
from studies.models import (
    Assignment,
    AuditEntry,
    Block,
    ClassPair,
    Condition,
    Correction,
    Phase,
    Rater,
    Response,
    Study,
    Trial,
)
from tests.factories import ClassLabelFactory, ClassPairFactory, ConditionFactory
from tests.studies.builders import data_guards_off, live_study

pytestmark = pytest.mark.django_db


def snapshot(study: Study) -> dict:
    """Every row of the study's design and data, as stored."""
    study_row = Study.objects.filter(pk=study.pk).values().first()
    if study_row:
        del study_row["updated_at"]
    assignments = Assignment.objects.filter(study=study)
    blocks = Block.objects.filter(assignment__study=study)
    trials = Trial.objects.filter(block__assignment__study=study)
    return {
        "study": study_row,
        "pairs": list(ClassPair.objects.filter(study=study).order_by("pk").values()),
        "conditions": list(Condition.objects.filter(study=study).order_by("pk").values()),
        "excluded": list(study.excluded_studies.values_list("pk", flat=True)),
        "assignments": list(assignments.order_by("pk").values()),
        "blocks": list(blocks.order_by("pk").values()),
        "trials": list(trials.order_by("pk").values()),
        "responses": list(Response.objects.filter(trial__in=trials).order_by("pk").values()),
        "stimuli": list(Explanation.objects.filter(study=study).order_by("pk").values()),
    }


@pytest.fixture
def live():
    """A live study with one rater's assignment, a pre-learning and a test trial answered."""
    study = live_study(n_pairs=1, setups=("random",), n_images=2, n_learning=1)
    rater = Rater.objects.create()
    assignment = services.assignment_create(study=study, rater=rater, provider="direct", seed=5)
    for phase in (Phase.PRE_LEARNING, Phase.TEST):
        trial = Trial.objects.filter(block__assignment=assignment, phase=phase).order_by("pk").first()
        services.response_submit(trial=trial, answer=trial.correct_answer)
    return study


def first(model, study: Study):
    lookup = {
        Trial: "block__assignment__study",
        Response: "trial__block__assignment__study",
        Block: "assignment__study",
        Assignment: "study",
        ClassPair: "study",
        Condition: "study",
        Study: "pk",
    }[model]
    if model is Study:
        return study
    return model.objects.filter(**{lookup: study}).order_by("pk").first()


def flip(answer: str) -> str:
    return "A" if answer == "B" else "B"


def trial_save(study):
    trial = Trial.objects.filter(block__assignment__study=study, phase=Phase.TEST).first()
    trial.correct_answer = flip(trial.correct_answer)
    trial.save()


def trial_update(study):
    trials = Trial.objects.filter(block__assignment__study=study, phase=Phase.TEST)
    trials.update(correct_answer="A")
    trials.update(correct_answer="B")


def response_update(study):
    Response.objects.filter(trial__block__assignment__study=study, phase=Phase.TEST).update(answer="A")
    Response.objects.filter(trial__block__assignment__study=study, phase=Phase.TEST).update(answer="B")


def response_save(study):
    response = first(Response, study)
    response.client_rt_ms = 1
    response.save()


def study_save(study):
    study.refresh_from_db()
    study.n_test = 1
    study.save()


def study_reopen_as_draft(study):
    Study.objects.filter(pk=study.pk).update(status=Study.Status.DRAFT)


def pair_create(study):
    pair = first(ClassPair, study)
    extra = ClassLabelFactory(dataset=study.dataset, name="added later")
    ClassPair.objects.create(study=study, class_a=pair.class_a, class_b=extra)


def condition_update(study):
    Condition.objects.filter(study=study).update(method="scout")


def condition_create(study):
    Condition.objects.create(study=study, method="scout", setup="random")


def excluded_study_add(study):
    other = Study.objects.create(title="other", dataset=study.dataset, classifier=study.classifier)
    study.excluded_studies.add(other)


def assignment_seed(study):
    Assignment.objects.filter(study=study).update(seed=1)


def block_update(study):
    Block.objects.filter(assignment__study=study).update(a_on_left=False)
    Block.objects.filter(assignment__study=study).update(a_on_left=True)


def shown_at_rewrite(study):
    from django.utils import timezone

    trial = Trial.objects.filter(block__assignment__study=study, shown_at__isnull=True).first()
    services.trial_shown(trial=trial)  # allowed: filled in once
    Trial.objects.filter(pk=trial.pk).update(shown_at=timezone.now())  # refused: rewritten


ORM_EDITS = {
    "trial answer key, save()": trial_save,
    "trial answer keys, queryset.update()": trial_update,
    "responses, queryset.update()": response_update,
    "response, save()": response_save,
    "study design, save()": study_save,
    "study back to draft": study_reopen_as_draft,
    "pair added": pair_create,
    "pair deleted": lambda s: ClassPair.objects.filter(study=s).delete(),
    "condition changed": condition_update,
    "condition added": condition_create,
    "excluded study added": excluded_study_add,
    "assignment seed": assignment_seed,
    "block sides": block_update,
    "trial shown_at rewritten": shown_at_rewrite,
    "trials deleted": lambda s: Trial.objects.filter(block__assignment__study=s).delete(),
    "responses deleted": lambda s: Response.objects.filter(trial__block__assignment__study=s).delete(),
    "response deleted": lambda s: first(Response, s).delete(),
    "blocks deleted": lambda s: Block.objects.filter(assignment__study=s).delete(),
    "assignment deleted": lambda s: Assignment.objects.filter(study=s).delete(),
    "study deleted": lambda s: Study.objects.filter(pk=s.pk).delete(),
    "explanations deleted": lambda s: s.explanations.all().delete(),
}


@pytest.mark.parametrize("edit", list(ORM_EDITS), ids=list(ORM_EDITS))
def test_orm_edits_and_deletes_of_a_live_study_are_refused(live, edit):
    before = snapshot(live)
    with pytest.raises((IntegrityError, ProtectedError)), transaction.atomic():
        ORM_EDITS[edit](live)
    assert snapshot(live) == before


TRIALS_OF_STUDY = (
    "SELECT t.id FROM studies_trial t JOIN studies_block b ON b.id = t.block_id "
    "JOIN studies_assignment a ON a.id = b.assignment_id WHERE a.study_id = %s"
)
RAW_SQL = {
    "answer key": f"UPDATE studies_trial SET correct_answer = 'A' WHERE id IN ({TRIALS_OF_STUDY})",
    "response": f"UPDATE studies_response SET answer = 'B' WHERE trial_id IN ({TRIALS_OF_STUDY})",
    "responses deleted": f"DELETE FROM studies_response WHERE trial_id IN ({TRIALS_OF_STUDY})",
    "design": "UPDATE studies_study SET seed = seed + 1 WHERE id = %s",
    "conditions deleted": "DELETE FROM studies_condition WHERE study_id = %s",
}


@pytest.mark.parametrize("name", list(RAW_SQL), ids=list(RAW_SQL))
def test_raw_sql_cannot_change_a_live_study(live, name):
    before = snapshot(live)
    with pytest.raises(IntegrityError) as refused, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(RAW_SQL[name], [live.pk])
    assert "read-only" in str(refused.value) and live.title in str(refused.value)
    assert snapshot(live) == before


def test_the_refusal_says_which_study_and_what_to_do(live):
    with pytest.raises(IntegrityError) as refused, transaction.atomic():
        trial_save(live)
    message = str(refused.value)
    assert f"study {live.pk} '{live.title}' is live (version 1)" in message
    assert "Record a correction" in message and "copy the study" in message


def test_raters_can_still_work_in_a_live_study(live):
    """The guard is not over-broad: a new assignment, its trials, answers and completion go through."""
    rater = Rater.objects.create()
    assignment = services.assignment_create(study=live, rater=rater, provider="direct", seed=9)
    trials = Trial.objects.filter(block__assignment=assignment).order_by("pk")
    for trial in trials:
        services.trial_shown(trial=trial)
        answer = "seen" if trial.phase == Phase.LEARNING else trial.correct_answer
        services.response_submit(trial=trial, answer=answer)
    assert services.assignment_complete(assignment=assignment).status == Assignment.Status.COMPLETED
    services.study_close(study=live)
    assert Study.objects.get(pk=live.pk).status == Study.Status.CLOSED


def test_a_draft_study_stays_editable():
    study = ClassPairFactory().study
    ConditionFactory(study=study, method="cve")
    Condition.objects.filter(study=study).update(method="scout")
    ClassPair.objects.filter(study=study).delete()
    assert not study.pairs.exists() and study.conditions.get().method == "scout"


# --- the admin ---


def admin_url(obj, view: str) -> str:
    app = obj._meta.app_label
    return reverse(f"admin:{app}_{type(obj).__name__.lower()}_{view}", args=[obj.pk])


def page_data(response) -> dict:
    """What the browser would post back from an admin change page as shown: every editable field of the form
    and of its inlines' stored rows, with the inlines' management forms."""
    forms, data = [response.context["adminform"].form], {}
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        management = formset.management_form
        data |= {management[name].html_name: management[name].value() for name in management.fields}
        data[f"{formset.prefix}-TOTAL_FORMS"] = formset.initial_form_count()
        forms += formset.forms[: formset.initial_form_count()]
    for form in forms:
        for name in form.fields:
            field = form[name]
            value = field.value()
            if field.field.disabled or value is None or value is False:
                continue
            if isinstance(field.field.widget, MultiWidget):  # e.g. the admin's date and time boxes
                for i, part in enumerate(field.field.widget.decompress(value)):
                    data[f"{field.html_name}_{i}"] = part
                continue
            data[field.html_name] = "on" if value is True else value
    return data


def study_page_edit(change):
    """An edit of the study page: load it, change the posted data, post it."""

    def edit(client, study):
        url = admin_url(study, "change")
        data = page_data(client.get(url))
        change(data, study)
        return client.post(url, data)

    return edit


def row_post(model, view: str, change=None):
    """A post to a row's admin page: its change form (the row's stored values, changed) or its delete page."""

    def edit(client, study):
        obj = first(model, study)
        if view == "delete":
            return client.post(admin_url(obj, "delete"), {"post": "yes"})
        data = {k: "" if v is None else v for k, v in model_to_dict(obj).items()}
        data |= page_data(client.get(admin_url(obj, "change")))  # with its inlines' management forms
        change(data, obj)
        return client.post(admin_url(obj, "change"), data)

    return edit


def bulk_delete(model, pick=first):
    def edit(client, study):
        obj = pick(model, study)
        changelist = reverse(f"admin:{obj._meta.app_label}_{model.__name__.lower()}_changelist")
        return client.post(
            changelist, {"action": "delete_selected", "_selected_action": [obj.pk], "post": "yes"}
        )

    return edit


def add_pair_row(data: dict, study: Study) -> None:
    n = int(data["pairs-TOTAL_FORMS"])
    pair = first(ClassPair, study)
    extra = ClassLabelFactory(dataset=study.dataset, name="added later")
    data |= {
        "pairs-TOTAL_FORMS": n + 1,
        f"pairs-{n}-class_a": pair.class_a_id,
        f"pairs-{n}-class_b": extra.pk,
    }
    data |= {f"pairs-{n}-mined_by": "manual", f"pairs-{n}-study": study.pk}


def change_pair_row(data: dict, study: Study) -> None:
    pair = first(ClassPair, study)
    data |= {"pairs-0-id": pair.pk, "pairs-0-study": study.pk, "pairs-0-class_a": pair.class_a_id}
    data |= {"pairs-0-class_b": ClassLabelFactory(dataset=study.dataset, name="swapped in").pk}
    data |= {"pairs-0-mined_by": "manual"}


def delete_unused_pair_row(data: dict, study: Study) -> None:
    """Tick "delete" on the pair no rater was given (a pair in use is protected before launch too)."""
    given = Block.objects.filter(assignment__study=study).values("pair")
    unused = ClassPair.objects.filter(study=study).exclude(pk__in=given).get()
    index = next(k.split("-")[1] for k, v in data.items() if k.endswith("-id") and v == unused.pk)
    data[f"pairs-{index}-DELETE"] = "on"


def exclude_another_study(data: dict, study: Study) -> None:
    other = Study.objects.create(title="earlier", dataset=study.dataset, classifier=study.classifier)
    data["excluded_studies"] = [other.pk]


def unused_explanation(model, study):
    """A stimulus of the study no trial shows (deleting one a trial shows is refused before launch too)."""
    trials = Trial.objects.filter(block__assignment__study=study, explanation__isnull=False)
    used = trials.values("explanation")
    return model.objects.filter(study=study).exclude(pk__in=used).order_by("pk").first()


# Each admin edit: (the edit, whether it changes the study's data before launch). An edit that changes the
# data of the same study before launch is a real edit, so its failing on the live study is the guard's doing.
ADMIN_EDITS = {
    "design fields": (study_page_edit(lambda d, s: d.update(n_test=1, seed=99, blur_sigma=2)), True),
    "analysis plan timestamp": (
        study_page_edit(
            lambda d, s: d.update(preregistered_at_0="2026-01-01", preregistered_at_1="00:00:00")
        ),
        False,  # read-only before launch too: the launch sets it
    ),
    "condition added": (
        study_page_edit(
            lambda d, s: d.update(conditions_grid=["cve|random", "cve|consistent", "scout|random"])
        ),
        True,
    ),
    "pair added": (study_page_edit(add_pair_row), True),
    "pair changed": (study_page_edit(change_pair_row), True),
    "pair deleted": (study_page_edit(delete_unused_pair_row), True),
    "excluded study added": (study_page_edit(exclude_another_study), True),
    # Before launch, the study's assignments protect it from deletion too; live, the admin refuses first.
    "study deleted": (lambda c, s: c.post(admin_url(s, "delete"), {"post": "yes"}), False),
    "study deleted from the list": (bulk_delete(Study), False),
    "trial answer key": (
        row_post(Trial, "change", lambda d, t: d.update(correct_answer=flip(t.correct_answer))),
        True,
    ),
    "trial deleted": (row_post(Trial, "delete"), True),
    "trial deleted from the list": (bulk_delete(Trial), True),
    "response answer": (
        row_post(Response, "change", lambda d, r: d.update(answer=flip(r.answer))),
        False,  # raters' answers are never edited, before launch neither
    ),
    "response deleted": (row_post(Response, "delete"), True),
    "response deleted from the list": (bulk_delete(Response), True),
    "assignment seed": (row_post(Assignment, "change", lambda d, a: d.update(seed=a.seed + 1)), False),
    "assignment excluded": (
        row_post(Assignment, "change", lambda d, a: d.update(status="excluded", exclusion_reason="no")),
        True,  # before launch, audited; once live, a correction instead
    ),
    "assignment deleted": (row_post(Assignment, "delete"), True),
    "assignment deleted from the list": (bulk_delete(Assignment), True),
    "stimulus deleted": (
        lambda c, s: c.post(admin_url(unused_explanation(Explanation, s), "delete"), {"post": "yes"}),
        True,
    ),
    "stimulus deleted from the list": (bulk_delete(Explanation, unused_explanation), True),
}


def shown_errors(response) -> str:
    """The error notes, error lists and messages an admin page shows, as text."""
    import re

    page = response.content.decode()
    found = re.findall(r'<(?:p|ul) class="(?:errornote|errorlist[^"]*)"[^>]*>(.*?)</(?:p|ul)>', page, re.S)
    found += re.findall(r'<li class="(?:error|warning|success)">(.*?)</li>', page, re.S)
    found += re.findall(r"<h1>(.*?)</h1>", page, re.S)
    return " | ".join(re.sub(r"<[^>]+>", " ", f).strip() for f in found)


@pytest.fixture(params=["ready", "live"])
def study_in_admin(request):
    """The same study with one rater's answers, either still before launch (ready) or live."""
    study = live_study(n_pairs=1, setups=("random", "consistent"), n_images=2, n_learning=1)
    assignment = services.assignment_create(
        study=study, rater=Rater.objects.create(), provider="direct", seed=5
    )
    for phase in (Phase.PRE_LEARNING, Phase.TEST):
        trial = Trial.objects.filter(block__assignment=assignment, phase=phase).order_by("pk").first()
        services.response_submit(trial=trial, answer=trial.correct_answer)
    with data_guards_off():  # set-up only: a pair added after the rater started, which no rater was given
        pair = first(ClassPair, study)
        other = ClassLabelFactory(dataset=study.dataset, name="a third class")
        ClassPair.objects.create(study=study, class_a=pair.class_a, class_b=other)
    if request.param == "ready":
        with data_guards_off():  # set-up only: the same rows, before launch
            Study.objects.filter(pk=study.pk).update(status=Study.Status.READY)
    study.refresh_from_db()
    return study


@pytest.mark.parametrize("edit", list(ADMIN_EDITS), ids=list(ADMIN_EDITS))
def test_every_admin_edit_and_delete_leaves_a_live_studys_data_unchanged(
    study_in_admin, researcher_client, edit
):
    study = study_in_admin
    before = snapshot(study)
    make, changes_before_launch = ADMIN_EDITS[edit]
    response = make(researcher_client, study)
    assert response.status_code in {200, 302, 403}, response.content.decode()[-2000:]  # never a server error
    said = f"{response.status_code} {response.get('Location', '')} {shown_errors(response)}"
    if study.is_frozen:
        assert snapshot(study) == before, said
    else:
        assert (snapshot(study) != before) == changes_before_launch, said


def test_a_live_studys_page_shows_every_frozen_field_read_only(live, researcher_client):
    from importlib import import_module

    mutable = import_module("studies.migrations.0005_frozen_study_triggers").MUTABLE_COLUMNS
    assert {Study._meta.get_field(f).column for f in Study.EDITABLE_WHEN_FROZEN} <= set(mutable)
    form = researcher_client.get(admin_url(live, "change")).context["adminform"].form
    editable = {name for name, field in form.fields.items() if not field.disabled}
    assert editable == set(Study.EDITABLE_WHEN_FROZEN)


# --- corrections and the audit log ---


def test_a_correction_changes_what_the_analysis_reads_not_the_data(live, researcher):
    from analysis.selectors import responses_tidy

    response = Response.objects.filter(trial__block__assignment__study=live, phase=Phase.TEST).get()
    before = snapshot(live)
    row = next(r for r in responses_tidy(study=live) if r["response"] == response.pk)
    assert row["correct"] == 1 and row["corrections"] == ""
    correction = services.correction_add(
        study=live,
        kind=Correction.Kind.ANSWER_KEY,
        trial=response.trial,
        corrected_answer=flip(response.trial.correct_answer),
        reason="the image was filed under the wrong class",
        author=researcher,
    )
    row = next(r for r in responses_tidy(study=live) if r["response"] == response.pk)
    assert row["correct"] == 0 and row["correct_answer"] == flip(response.trial.correct_answer)
    assert "the image was filed under the wrong class" in row["corrections"] and "ada" in row["corrections"]
    assert snapshot(live) == before
    services.correction_add(
        study=live,
        kind=Correction.Kind.WITHDRAW,
        withdrawn=correction,
        reason="it was right",
        author=researcher,
    )
    row = next(r for r in responses_tidy(study=live) if r["response"] == response.pk)
    assert row["correct"] == 1 and row["corrections"] == ""


def test_the_report_lists_the_corrections_in_force(live, researcher):
    from analysis.report import report_build, report_html

    trial = Trial.objects.filter(block__assignment__study=live, phase=Phase.TEST).first()
    kept = services.correction_add(
        study=live, kind="answer_key", trial=trial, corrected_answer=flip(trial.correct_answer),
        reason="the image was filed under the wrong class", author=researcher,
    )  # fmt: skip
    withdrawn = services.correction_add(
        study=live, kind="drop_response", trial=trial, reason="a slip of the hand", author=researcher
    )
    services.correction_add(
        study=live, kind="withdraw", withdrawn=withdrawn, reason="it was no slip", author=researcher
    )
    report = report_build(study=live, n_boot=50, mixed=False)
    table = report.tables["corrections"]
    assert list(table["correction"]) == [kept.pk]  # the withdrawn one and the withdrawal are not in force
    row = table.iloc[0]
    assert (row["kind"], row["trial"], row["author"]) == ("answer_key", trial.pk, "ada")
    assert row["reason"] == "the image was filed under the wrong class"
    assert "the image was filed under the wrong class" in report_html(report)


def test_dropping_an_assignment_excludes_its_rows_with_the_reason(live, researcher):
    from analysis.selectors import responses_tidy

    assignment = Assignment.objects.get(study=live)
    services.correction_add(
        study=live,
        kind=Correction.Kind.DROP_ASSIGNMENT,
        assignment=assignment,
        reason="the rater wrote that they had seen the study before",
        author=researcher,
    )
    rows = responses_tidy(study=live)
    assert rows and all(r["excluded"] for r in rows)
    assert all(r["exclusion_reasons"].count("seen the study before") == 1 for r in rows)
    # The exclusion tables count the dropped rater too.
    from analysis.selectors import rater_exclusions
    from analysis.stats import exclusion_counts

    raters = rater_exclusions(study=live)
    assert list(raters["excluded"]) == [True]
    counts = exclusion_counts(raters, live.exclusion_rules or {}).set_index("rule")["raters_excluded"]
    assert counts["dropped by correction"] == 1 and counts["raters kept"] == 0


def test_a_correction_needs_a_reason_and_its_own_study(live, researcher):
    trial = Trial.objects.filter(block__assignment__study=live, phase=Phase.TEST).first()
    with pytest.raises(Exception, match="needs a reason"):
        services.correction_add(
            study=live, kind="answer_key", trial=trial, corrected_answer="A", reason=" ", author=researcher
        )
    other = live_study(n_pairs=1, setups=("random",))
    with pytest.raises(Exception, match="belongs to another study"):
        services.correction_add(
            study=other, kind="answer_key", trial=trial, corrected_answer="A", reason="x", author=researcher
        )


def test_corrections_and_audit_entries_are_append_only(live, researcher):
    trial = Trial.objects.filter(block__assignment__study=live, phase=Phase.TEST).first()
    correction = services.correction_add(
        study=live, kind="answer_key", trial=trial, corrected_answer="A", reason="typo", author=researcher
    )
    entry = AuditEntry.objects.filter(study=live).latest("pk")
    for queryset, change in (
        (Correction.objects.filter(pk=correction.pk), {"reason": "nothing happened"}),
        (AuditEntry.objects.filter(pk=entry.pk), {"action": "nothing happened"}),
    ):
        with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
            queryset.update(**change)
        with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
            queryset.delete()
    assert Correction.objects.get(pk=correction.pk).reason == "typo"


def test_the_admin_records_a_correction_with_its_author(live, researcher_client):
    trial = Trial.objects.filter(block__assignment__study=live, phase=Phase.TEST).first()
    response = researcher_client.post(
        reverse("admin:studies_correction_add"),
        {
            "study": live.pk,
            "kind": "answer_key",
            "trial": trial.pk,
            "corrected_answer": flip(trial.correct_answer),
            "reason": "mislabelled image",
        },
    )
    assert response.status_code == 302, response.content.decode()[-2000:]
    correction = Correction.objects.get(study=live)
    assert correction.author.username == "ada" and correction.reason == "mislabelled image"
    assert Trial.objects.get(pk=trial.pk).correct_answer == trial.correct_answer
    page = researcher_client.get(admin_url(live, "change")).content.decode()
    assert "mislabelled image" in page and "correction recorded" in page


def test_a_live_study_may_still_be_renamed_and_its_recruitment_settings_changed(live):
    Study.objects.filter(pk=live.pk).update(
        title="Wave 1 (renamed)", description="now on Prolific", completion_code="C0DE", mturk_sandbox=False
    )
    assert Study.objects.get(pk=live.pk).title == "Wave 1 (renamed)"
