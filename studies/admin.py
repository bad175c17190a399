"""The researcher's admin: a study page that drives the workflow (precompute, launch, pause, close, copy, try
as a rater, monitor), every change in the study's audit log, and a frozen study's data read-only."""

import json
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, QuerySet
from django.forms import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils.html import format_html

from explain.models import Dataset
from explain.precompute import study_precompute
from explain.selectors import dataset_blur_preview

from . import services
from .forms import CorrectionForm, StudyForm
from .models import (
    Assignment,
    AuditEntry,
    Block,
    ClassPair,
    ConsentText,
    Correction,
    ProviderIdentity,
    Rater,
    RaterEvent,
    Response,
    Study,
    Trial,
)
from .selectors import study_audit_log, study_list_with_counts


class FrozenStudyFormSet(BaseInlineFormSet):
    """Refuses adding, changing or deleting a frozen study's pairs, saying why."""

    def clean(self) -> None:
        super().clean()
        study = self.instance
        if not study.pk:
            return
        stored = Study.objects.get(pk=study.pk)
        edited = any(form.has_changed() for form in self.forms) or bool(self.deleted_forms)
        if stored.is_frozen and edited:
            raise ValidationError(stored.frozen_message())


class ClassPairInline(admin.TabularInline):
    model = ClassPair
    formset = FrozenStudyFormSet
    extra = 1
    fields = ("class_a", "class_b", "mined_by", "confusion_score")

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        field = super().formfield_for_foreignkey(db_field, request, **kwargs)
        if db_field.name in {"class_a", "class_b"}:
            field.queryset = field.queryset.select_related("dataset")
            field.label_from_instance = lambda label: f"{label.dataset.name}: {label.index} {label.name}"
        return field

    def has_add_permission(self, request: HttpRequest, obj: Study | None = None) -> bool:
        return super().has_add_permission(request, obj) and not (obj and obj.is_frozen)

    def has_change_permission(self, request: HttpRequest, obj: Study | None = None) -> bool:
        return super().has_change_permission(request, obj) and not (obj and obj.is_frozen)

    def has_delete_permission(self, request: HttpRequest, obj: Study | None = None) -> bool:
        return super().has_delete_permission(request, obj) and not (obj and obj.is_frozen)


def _jsonable(value: Any) -> Any:
    """A field value as the audit log stores it (JSON)."""
    if hasattr(value, "pk"):
        return value.pk
    try:
        json.dumps(value)
    except TypeError:
        return str(value)
    return value


# The workflow buttons of the study page: action -> (label, statuses it applies to).
WORKFLOW_BUTTONS = {
    "precompute": ("Precompute stimuli", {"draft", "ready"}),
    "launch": ("Launch", {"ready", "closed"}),
    "resume": ("Resume", {"paused"}),
    "pause": ("Pause", {"live"}),
    "close": ("Close", {"live", "paused"}),
    "copy": ("Copy into a new draft", {"draft", "precomputing", "ready", "live", "paused", "closed"}),
    "pilot": ("Try as a rater (pilot)", {"ready", "live", "paused"}),
}


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):
    form = StudyForm
    change_form_template = "admin/studies/study/change_form.html"
    list_display = (
        "title",
        "status",
        "version",
        "dataset",
        "classifier",
        "n_pairs",
        "n_conditions",
        "n_explanations",
        "n_assignments_started",
        "n_assignments_completed",
        "n_responses",
        "precompute_links",
    )
    list_filter = ("status", "dataset")
    search_fields = ("title",)
    readonly_fields = (
        "status",
        "version",
        "launched_at",
        "copied_from",
        "copied_from_version",
        "unblinded_at",
        "preregistered_at",
    )
    inlines = [ClassPairInline]
    actions = ["precompute", "launch", "close"]
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "title",
                    "description",
                    ("status", "version", "launched_at"),
                    ("copied_from", "copied_from_version", "unblinded_at"),
                )
            },
        ),
        ("Data and model", {"fields": ("dataset", "classifier")}),
        ("Conditions", {"fields": ("conditions_grid",)}),
        (
            "Phases",
            {
                "fields": (
                    "n_prelearning",
                    "n_learning",
                    "n_test",
                    "catch_trials_per_pair",
                    "min_learning_seconds",
                    "min_rt_ms",
                    "time_limit_minutes",
                )
            },
        ),
        (
            "What raters see",
            {"fields": ("label_a", "label_b", "blur_sigma", "stimulus_region", "example_pair")},
        ),
        ("Assignment", {"fields": ("design", "pairs_per_assignment", "seed")}),
        (
            "Exclusions and analysis plan",
            {"fields": ("exclusion_rules", "excluded_studies", "preregistration", "preregistered_at")},
        ),
        (
            "Consent and debrief",
            {
                "fields": (
                    "consent_text",
                    "pay",
                    "expected_minutes",
                    "contact",
                    "ethics_reference",
                    "debrief_text",
                )
            },
        ),
        (
            "Recruitment",
            {
                "fields": (
                    "direct_link_open",
                    "max_raters",
                    "completion_code",
                    "prolific_completion_code",
                    "prolific_failed_check_code",
                    "prolific_timeout_code",
                    "mturk_sandbox",
                )
            },
        ),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Study]:
        return study_list_with_counts()

    def get_fieldsets(self, request: HttpRequest, obj: Study | None = None):
        """The fieldsets above, and any study field they do not name yet under "More" (none is left out)."""
        listed = {
            name
            for _, options in self.fieldsets
            for entry in options["fields"]
            for name in (entry if isinstance(entry, tuple) else (entry,))
        }
        hidden = {"id", "created_at", "updated_at", "unblinded_by"}
        more = [
            f.name
            for f in [*Study._meta.concrete_fields, *Study._meta.many_to_many]
            if f.name not in listed | hidden and not f.auto_created
        ]
        return (*self.fieldsets, ("More", {"fields": more})) if more else self.fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Study | None = None):
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and obj.is_frozen:  # all but the few fields the database lets change
            editable = [
                f.name for f in [*Study._meta.concrete_fields, *Study._meta.many_to_many] if f.editable
            ]
            fields += [f for f in editable if f not in Study.EDITABLE_WHEN_FROZEN and f not in fields]
        return fields

    def has_delete_permission(self, request: HttpRequest, obj: Study | None = None) -> bool:
        return super().has_delete_permission(request, obj) and not (obj and obj.is_frozen)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Study]) -> None:
        frozen = [s.title for s in queryset if s.is_frozen]
        if frozen:
            self.message_user(
                request,
                f"Not deleted: {', '.join(frozen)} (live, paused or closed studies are kept).",
                messages.ERROR,
            )
        super().delete_queryset(request, queryset.exclude(status__in=Study.FROZEN_STATUSES))

    # --- the audit log: every change made here ---

    def save_model(self, request: HttpRequest, obj: Study, form, change: bool) -> None:
        before = Study.objects.filter(pk=obj.pk).first() if change else None
        super().save_model(request, obj, form, change)
        if before is None:
            services.audit_record(study=obj, user=request.user, action="created", detail={})
            return
        changed = {
            name: [_jsonable(getattr(before, name)), _jsonable(getattr(obj, name))]
            for name in form.changed_data
            if name not in {"conditions_grid", "excluded_studies"} and hasattr(obj, name)
        }
        if changed:
            services.audit_record(study=obj, user=request.user, action="changed", detail=changed)

    def save_related(self, request: HttpRequest, form, formsets, change: bool) -> None:
        study = form.instance
        excluded_before = set(study.excluded_studies.values_list("pk", flat=True)) if change else set()
        super().save_related(request, form, formsets, change)
        excluded_after = set(study.excluded_studies.values_list("pk", flat=True))
        if excluded_after != excluded_before:
            services.audit_record(
                study=study,
                user=request.user,
                action="excluded studies changed",
                detail={"before": sorted(excluded_before), "after": sorted(excluded_after)},
            )
        if "conditions_grid" in form.cleaned_data and not form.fields["conditions_grid"].disabled:
            services.conditions_set(
                study=study, chosen=form.cleaned_data["conditions_grid"], user=request.user
            )

    def save_formset(self, request: HttpRequest, form, formset, change: bool) -> None:
        super().save_formset(request, form, formset, change)
        detail = {
            "added": [str(o) for o in formset.new_objects],
            "changed": [str(o) for o, _ in formset.changed_objects],
            "removed": [str(o) for o in formset.deleted_objects],
        }
        if any(detail.values()):
            services.audit_record(
                study=form.instance, user=request.user, action="class pairs changed", detail=detail
            )

    # --- the study page ---

    def get_urls(self):
        def view(fn):
            return self.admin_site.admin_view(fn)

        return [
            path("<int:pk>/workflow/<str:action>/", view(self.workflow_view), name="studies_study_workflow"),
            path("<int:pk>/blur-preview.png", view(self.blur_preview), name="studies_study_blur_preview"),
            path(
                "blur-preview.png", view(self.dataset_blur_preview), name="studies_study_dataset_blur_preview"
            ),
            path("<int:pk>/mine-pairs/", view(self.mine_pairs_view), name="studies_study_mine_pairs"),
            *super().get_urls(),
        ]

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context=None):
        study = self.get_object(request, object_id)
        extra = dict(extra_context or {})
        if study is not None:
            extra |= {
                "workflow_buttons": [
                    (action, label)
                    for action, (label, statuses) in WORKFLOW_BUTTONS.items()
                    if study.status in statuses
                ],
                "audit_log": [
                    {**e, "detail": json.dumps(e["detail"], sort_keys=True, ensure_ascii=False)}
                    for e in study_audit_log(study=study)
                ],
                "corrections": study.corrections.select_related("author").order_by("created_at"),
                "study": study,
            }
        return super().change_view(request, object_id, form_url, extra)

    def _study_or_404(self, request: HttpRequest, pk: int) -> Study:
        if not self.has_view_permission(request):
            raise PermissionDenied
        return get_object_or_404(Study, pk=pk)

    def workflow_view(self, request: HttpRequest, pk: int, action: str) -> HttpResponse:
        """The buttons of the study page (POST only); each calls one service, recorded in the audit log."""
        if request.method != "POST" or action not in WORKFLOW_BUTTONS:
            return HttpResponse(
                f"Unknown workflow step {action!r}; POST one of {', '.join(WORKFLOW_BUTTONS)}.", status=405
            )
        if not self.has_change_permission(request):
            raise PermissionDenied
        study = get_object_or_404(Study, pk=pk)
        back = reverse("admin:studies_study_change", args=[study.pk])
        status_before = study.status
        try:
            if action == "precompute":
                plan = study_precompute(study=study)
                services.audit_record(
                    study=study,
                    user=request.user,
                    action="precompute started",
                    detail={"units": plan.units.count()},
                )
                return HttpResponseRedirect(reverse("explain:precompute_progress", args=[study.pk]))
            if action == "copy":
                copy = services.study_copy(study=study, user=request.user)
                self.message_user(request, f"Copied into the new draft {copy.title!r}.", messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:studies_study_change", args=[copy.pk]))
            if action == "pilot":
                assignment = services.pilot_assignment_create(study=study, user=request.user)
                go = reverse("studies:go", kwargs={"token": assignment.token})
                return _bind(HttpResponseRedirect(go), assignment)
            service = {
                "launch": services.study_launch,
                "resume": services.study_launch,
                "pause": services.study_pause,
                "close": services.study_close,
            }[action]
            study = service(study=study)
        except ValidationError as exc:
            self.message_user(request, " ".join(exc.messages), messages.ERROR)
            return HttpResponseRedirect(back)
        services.audit_record(
            study=study,
            user=request.user,
            action=f"{action}ed" if not action.endswith("e") else f"{action}d",
            detail={"status": [status_before, study.status], "version": study.version},
        )
        self.message_user(
            request, f"Study {study.title!r} is {study.status} (version {study.version}).", messages.SUCCESS
        )
        return HttpResponseRedirect(back)

    def blur_preview(self, request: HttpRequest, pk: int) -> HttpResponse:
        """One image of the study's data set as a learning stimulus shows it: its centre in focus, the rest
        blurred at ``?sigma=`` (pixels of the displayed 224 px image; the study's blur when absent)."""
        study = self._study_or_404(request, pk)
        return _blur_png(request, study.dataset_id, request.GET.get("sigma", str(study.blur_sigma)))

    def dataset_blur_preview(self, request: HttpRequest) -> HttpResponse:
        """The same preview for ``?dataset=<id>&sigma=``: the add form shows it before the study exists."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        dataset = request.GET.get("dataset", "")
        if not dataset.isdigit() or not Dataset.objects.filter(pk=int(dataset)).exists():
            return HttpResponse(f"dataset={dataset!r} is not a data set's id; choose a data set.", status=400)
        return _blur_png(request, int(dataset), request.GET.get("sigma", "8"))

    def mine_pairs_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        study = self._study_or_404(request, pk)
        url = reverse("admin:explain_classifier_pairs", args=[study.classifier_id])
        return HttpResponseRedirect(f"{url}?study={study.pk}")

    @admin.display(description="pairs", ordering="n_pairs")
    def n_pairs(self, study: Study) -> int:
        return study.n_pairs

    @admin.display(description="conditions", ordering="n_conditions")
    def n_conditions(self, study: Study) -> int:
        return study.n_conditions

    @admin.display(description="explanations", ordering="n_explanations")
    def n_explanations(self, study: Study) -> int:
        return study.n_explanations

    @admin.display(description="raters in progress", ordering="n_assignments_started")
    def n_assignments_started(self, study: Study) -> int:
        return study.n_assignments_started

    @admin.display(description="raters done", ordering="n_assignments_completed")
    def n_assignments_completed(self, study: Study) -> int:
        return study.n_assignments_completed

    @admin.display(description="responses", ordering="n_responses")
    def n_responses(self, study: Study) -> int:
        return study.n_responses

    def _each(self, request: HttpRequest, queryset: QuerySet[Study], service, verb: str) -> None:
        for study in queryset:
            before = study.status
            try:
                study = service(study=study)
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), messages.ERROR)
            else:
                services.audit_record(
                    study=study,
                    user=request.user,
                    action=verb,
                    detail={"status": [before, study.status], "version": study.version},
                )
                self.message_user(request, f"Study {study.title!r} {verb}.", messages.SUCCESS)

    @admin.display(description="precompute")
    def precompute_links(self, study: Study) -> str:
        return format_html(
            '<a href="{}">progress</a> · <a href="{}">gallery</a> · <a href="{}">monitor</a>',
            reverse("explain:precompute_progress", args=[study.pk]),
            reverse("explain:gallery", args=[study.pk]),
            reverse("analysis:monitor", args=[study.pk]),
        )

    @admin.action(description="Precompute the stimuli of the selected studies (on the workers)")
    def precompute(self, request: HttpRequest, queryset: QuerySet[Study]) -> None:
        for study in queryset:
            try:
                plan = study_precompute(study=study)
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), messages.ERROR)
            else:
                services.audit_record(
                    study=study,
                    user=request.user,
                    action="precompute started",
                    detail={"units": plan.units.count()},
                )
                url = reverse("explain:precompute_progress", args=[study.pk])
                self.message_user(
                    request,
                    format_html(
                        'Precompute of {} planned: {} work units. <a href="{}">Follow its progress</a>.',
                        repr(study.title),
                        plan.units.count(),
                        url,
                    ),
                    messages.SUCCESS,
                )

    @admin.action(description="Launch the selected studies (freezes their design)")
    def launch(self, request: HttpRequest, queryset: QuerySet[Study]) -> None:
        self._each(request, queryset, services.study_launch, "is live")

    @admin.action(description="Close the selected studies")
    def close(self, request: HttpRequest, queryset: QuerySet[Study]) -> None:
        self._each(request, queryset, services.study_close, "is closed")


def _blur_png(request: HttpRequest, dataset_id: int, sigma_text: str) -> HttpResponse:
    try:
        sigma = float(sigma_text)
    except ValueError:
        return HttpResponse(f"sigma={sigma_text!r} is not a number; give e.g. sigma=8.", status=400)
    if not 0 <= sigma <= 100:
        return HttpResponse(f"sigma={sigma} is out of range; use 0 to 100.", status=400)
    return HttpResponse(dataset_blur_preview(dataset_id=dataset_id, sigma=sigma), content_type="image/png")


def _bind(response: HttpResponse, assignment: Assignment) -> HttpResponse:
    """This browser becomes the pilot rater (the rater pages' own signed cookie)."""
    from .views import _bind as bind_rater

    return bind_rater(response, assignment)


class CorrectionAdmin(admin.ModelAdmin):
    """Corrections of a frozen study's data: added, never edited or deleted (the database refuses too)."""

    form = CorrectionForm
    list_display = (
        "id",
        "study",
        "kind",
        "trial",
        "assignment",
        "corrected_answer",
        "author",
        "created_at",
        "reason",
    )
    list_filter = ("kind", "study")
    list_select_related = ("study", "author")
    raw_id_fields = ("trial", "assignment", "withdrawn")

    def has_change_permission(self, request: HttpRequest, obj: Correction | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Correction | None = None) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Correction | None = None):
        return [f.name for f in Correction._meta.fields] if obj else []

    def save_model(self, request: HttpRequest, obj: Correction, form, change: bool) -> None:
        saved = services.correction_add(
            study=obj.study,
            kind=obj.kind,
            reason=obj.reason,
            author=request.user,
            trial=obj.trial,
            assignment=obj.assignment,
            corrected_answer=obj.corrected_answer,
            withdrawn=obj.withdrawn,
        )
        obj.pk = saved.pk

    def get_form(self, request: HttpRequest, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)
        if "author" in form.base_fields:
            del form.base_fields["author"]
        return form


admin.site.register(Correction, CorrectionAdmin)


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """The audit log, read only (the database refuses edits and deletes)."""

    list_display = ("at", "study", "user", "action", "detail")
    list_filter = ("action", "study")
    list_select_related = ("study", "user")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEntry | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEntry | None = None) -> bool:
        return False


@admin.register(ConsentText)
class ConsentTextAdmin(admin.ModelAdmin):
    """Every version of a study's consent text as raters saw it, with how many agreed to it; read only (each
    assignment points at the version it agreed to)."""

    list_display = ("id", "study", "digest", "created_at", "n_agreed")
    list_filter = ("study",)
    readonly_fields = ("study", "text", "digest", "created_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).select_related("study").annotate(agreed=Count("assignments"))

    @admin.display(description="raters agreed", ordering="agreed")
    def n_agreed(self, obj: ConsentText) -> int:
        return obj.agreed

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ConsentText | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ConsentText | None = None) -> bool:
        return False


class FrozenDataAdmin(admin.ModelAdmin):
    """Rows of a frozen study's data: viewable, never changed or deleted here (the database refuses too)."""

    def _study(self, obj) -> Study | None:
        raise NotImplementedError

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return super().has_change_permission(request, obj) and not (obj and self._study(obj).is_frozen)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return super().has_delete_permission(request, obj) and not (obj and self._study(obj).is_frozen)

    def delete_queryset(self, request: HttpRequest, queryset) -> None:
        kept = [obj for obj in queryset if self._study(obj).is_frozen]
        if kept:
            self.message_user(
                request,
                f"{len(kept)} rows of live, paused or closed studies were kept: their data are read-only. "
                "Record a correction instead.",
                messages.ERROR,
            )
        super().delete_queryset(request, queryset.exclude(pk__in=[o.pk for o in kept]))


class ProviderIdentityInline(admin.TabularInline):
    model = ProviderIdentity
    extra = 0
    readonly_fields = ("provider", "external_id", "extra", "created_at")
    can_delete = False


@admin.register(Rater)
class RaterAdmin(admin.ModelAdmin):
    list_display = ("opaque_id", "is_simulated", "created_at")
    list_filter = ("is_simulated",)
    readonly_fields = ("opaque_id", "is_simulated", "created_at")
    inlines = [ProviderIdentityInline]


class BlockInline(admin.TabularInline):
    model = Block
    extra = 0
    readonly_fields = ("position", "pair", "condition", "a_on_left")
    can_delete = False


@admin.register(Assignment)
class AssignmentAdmin(FrozenDataAdmin):
    """A rater's assignment: before launch (pilots) its exclusion (status and reason) may be set, audited;
    once the study is frozen it is read-only: leave an assignment out with a correction (who, when, why)."""

    list_display = ("id", "study", "rater", "provider", "status", "is_pilot", "started_at", "completed_at")
    list_filter = ("status", "provider", "is_pilot", "study")
    list_select_related = ("study", "rater")
    readonly_fields = (
        "rater", "study", "study_version", "provider", "seed", "is_pilot", "started_at", "consented_at",
        "consent", "instructed_at", "completed_at", "completion_code", "example_explanation",
    )  # fmt: skip
    inlines = [BlockInline]

    def _study(self, obj: Assignment) -> Study:
        return obj.study

    def save_model(self, request: HttpRequest, obj: Assignment, form, change: bool) -> None:
        before = Assignment.objects.get(pk=obj.pk)
        super().save_model(request, obj, form, change)
        changed = {
            f: [getattr(before, f), getattr(obj, f)]
            for f in ("status", "exclusion_reason")
            if f in form.changed_data
        }
        if changed:
            services.audit_record(
                study=obj.study,
                user=request.user,
                action=f"assignment {obj.pk} exclusion changed",
                detail=changed,
            )


@admin.register(Trial)
class TrialAdmin(FrozenDataAdmin):
    list_display = ("id", "block", "phase", "position", "correct_answer", "is_catch")
    list_filter = ("phase", "is_catch")
    list_select_related = ("block__assignment__study",)
    raw_id_fields = ("block", "image", "explanation")

    def _study(self, obj: Trial) -> Study:
        return obj.block.assignment.study


@admin.register(Response)
class ResponseAdmin(FrozenDataAdmin):
    list_display = (
        "id",
        "trial",
        "phase",
        "answer",
        "client_rt_ms",
        "server_rt_ms",
        "too_fast",
        "received_at",
    )
    list_filter = ("phase", "answer", "too_fast")
    list_select_related = ("trial__block__assignment__study",)
    raw_id_fields = ("trial",)

    def _study(self, obj: Response) -> Study:
        return obj.trial.block.assignment.study

    def has_change_permission(self, request: HttpRequest, obj: Response | None = None) -> bool:
        return False  # raters' answers are data: kept as given


@admin.register(RaterEvent)
class RaterEventAdmin(admin.ModelAdmin):
    """Focus and visibility changes raters' browsers reported (read only)."""

    list_display = ("id", "assignment", "kind", "trial", "client_ms", "at")
    list_filter = ("kind",)
    list_select_related = ("assignment", "trial")
    raw_id_fields = ("assignment", "trial")

    def has_change_permission(self, request: HttpRequest, obj: RaterEvent | None = None) -> bool:
        return False
