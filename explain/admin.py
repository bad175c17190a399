"""Admin for data sets, models, explanations and background jobs."""

from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from studies.models import Study
from studies.services import audit_record, study_pairs_add

from .forms import BackboneRegisterForm, DatasetImportForm, MinePairsForm
from .models import (
    Backbone,
    Classifier,
    ClassLabel,
    Dataset,
    Explanation,
    ExplanationDistractor,
    Image,
    Job,
    PrecomputePlan,
    WorkUnit,
)
from .precompute import work_unit_retry
from .selectors import dataset_list_with_counts, mined_pairs
from .services import job_create
from .services.registration import backbone_formats


class ClassLabelInline(admin.TabularInline):
    model = ClassLabel
    extra = 0


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "n_classes", "n_images", "image_width", "image_height", "created_at")
    list_filter = ("kind",)
    readonly_fields = ("summary", "created_at")
    inlines = [ClassLabelInline]
    actions = ["verify", "train_classifier", "train_auxiliary"]
    change_list_template = "admin/explain/dataset_change_list.html"

    def get_urls(self):
        own = [path("import/", self.admin_site.admin_view(self.import_view), name="explain_dataset_import")]
        return own + super().get_urls()

    def import_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_add_permission(request):
            return HttpResponseRedirect(reverse("admin:index"))
        form = DatasetImportForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            params = {k: v for k, v in form.cleaned_data.items() if v not in ("", None)}
            job = job_create(kind="dataset_import", params=params)
            self.message_user(request, f"Importing on a worker: job {job.pk}.", messages.INFO)
            return HttpResponseRedirect(reverse("admin:explain_job_change", args=[job.pk]))
        context = {**self.admin_site.each_context(request), "form": form, "title": "Import a data set"}
        return TemplateResponse(request, "admin/explain/dataset_import.html", context)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Dataset]:
        return dataset_list_with_counts()

    @admin.display(description="classes", ordering="n_classes")
    def n_classes(self, dataset: Dataset) -> int:
        return dataset.n_classes

    @admin.display(description="images", ordering="n_images")
    def n_images(self, dataset: Dataset) -> int:
        return dataset.n_images

    @admin.action(description="Check every image of the selected data sets (on a worker)")
    def verify(self, request: HttpRequest, queryset: QuerySet[Dataset]) -> None:
        for dataset in queryset:
            job = job_create(kind="dataset_verify", params={"dataset_id": dataset.pk})
            self.message_user(request, f"Checking {dataset.name!r}: job {job.pk}.", messages.INFO)

    @admin.action(description="Train the built-in CNN on the selected data sets (on a worker)")
    def train_classifier(self, request: HttpRequest, queryset: QuerySet[Dataset]) -> None:
        for dataset in queryset:
            name = f"{dataset.name} CNN"
            taken = Classifier.objects.filter(name__startswith=name).count()
            params = {"dataset_id": dataset.pk, "name": f"{name} {taken + 1}" if taken else name}
            job = job_create(kind="classifier_train", params=params)
            self.message_user(request, f"Training {params['name']!r}: job {job.pk}.", messages.INFO)

    @admin.action(description="Train the SimSiam auxiliary model on the selected data sets (on a worker)")
    def train_auxiliary(self, request: HttpRequest, queryset: QuerySet[Dataset]) -> None:
        for dataset in queryset:
            name = f"{dataset.name} SimSiam"
            taken = Backbone.objects.filter(name__startswith=name).count()
            params = {"dataset_id": dataset.pk, "name": f"{name} {taken + 1}" if taken else name}
            job = job_create(kind="auxiliary_train", params=params)
            self.message_user(request, f"Training {params['name']!r}: job {job.pk}.", messages.INFO)


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    list_display = ("id", "dataset", "source_id", "class_label", "split")
    list_filter = ("dataset", "split")
    list_select_related = ("dataset", "class_label")
    search_fields = ("source_id",)


@admin.register(Classifier)
class ClassifierAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "dataset",
        "architecture",
        "input_size",
        "split_point",
        "test_accuracy",
        "pairs_link",
    )
    list_filter = ("architecture", "dataset")
    list_select_related = ("dataset",)
    readonly_fields = ("test_accuracy", "confusion_matrix", "evaluation", "provenance", "created_at")
    actions = ["evaluate"]

    def get_urls(self):
        view = self.admin_site.admin_view(self.pairs_view)
        return [path("<int:pk>/pairs/", view, name="explain_classifier_pairs"), *super().get_urls()]

    @admin.display(description="class pairs")
    def pairs_link(self, classifier: Classifier) -> str:
        return format_html(
            '<a href="{}">mine pairs</a>', reverse("admin:explain_classifier_pairs", args=[classifier.pk])
        )

    @admin.action(description="Evaluate on the train and test splits (on a worker)")
    def evaluate(self, request: HttpRequest, queryset: QuerySet[Classifier]) -> None:
        for classifier in queryset:
            job = job_create(kind="classifier_evaluate", params={"classifier_id": classifier.pk})
            self.message_user(request, f"Evaluating {classifier.name!r}: job {job.pk}.", messages.INFO)

    def pairs_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """The mined pairs with their scores; the chosen ones are added to a study not yet frozen (reached
        from the study page with ?study=<id>, which preselects it)."""
        classifier = get_object_or_404(Classifier.objects.select_related("dataset"), pk=pk)
        form = MinePairsForm(
            request.POST or (request.GET if "method" in request.GET else None),
            initial={"method": "most_confused", "k": 10},
        )
        method, k = "most_confused", 10
        if form.is_bound and form.is_valid():
            method, k = form.cleaned_data["method"], form.cleaned_data["k"]
        pairs, error = [], ""
        try:
            pairs = mined_pairs(classifier=classifier, method=method, k=k)
        except ValidationError as exc:
            error = " ".join(exc.messages)
        studies = Study.objects.filter(
            classifier=classifier, status__in=[Study.Status.DRAFT, Study.Status.READY]
        ).order_by("-created_at")
        if request.method == "POST" and self.has_change_permission(request):
            chosen = set(request.POST.getlist("pair"))
            study = get_object_or_404(studies, pk=request.POST.get("study"))
            picked = [p for p in pairs if f"{p['class_a'].index}-{p['class_b'].index}" in chosen]
            try:
                added = study_pairs_add(study=study, pairs=picked)
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), messages.ERROR)
            else:
                if added:
                    audit_record(
                        study=study,
                        user=request.user,
                        action="class pairs mined and added",
                        detail={"added": [f"{p} ({p.mined_by}, score {p.confusion_score})" for p in added]},
                    )
                self.message_user(request, f"Added {len(added)} pairs to {study.title!r}.", messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:studies_study_change", args=[study.pk]))
        context = {
            **self.admin_site.each_context(request),
            "title": f"Class pairs of {classifier.name}",
            "classifier": classifier,
            "form": form,
            "pairs": pairs,
            "error": error,
            "method": method,
            "k": k,
            "studies": studies,
            "selected_study": request.POST.get("study") or request.GET.get("study") or "",
            "study": studies.filter(pk=request.GET.get("study")).first()
            if (request.GET.get("study") or "").isdigit()
            else None,
            "score_name": "attribute distance" if method == "attributes" else "confusion rate",
        }
        return TemplateResponse(request, "admin/explain/classifier_pairs.html", context)


@admin.register(Backbone)
class BackboneAdmin(admin.ModelAdmin):
    """Models trained by the platform and registered from a researcher's files (``register/``: the same
    service as ``manage.py register_backbone``, run on a worker where the files are)."""

    list_display = ("name", "kind", "dataset", "registered", "path", "created_at")
    list_filter = ("kind",)
    list_select_related = ("dataset",)
    change_list_template = "admin/explain/backbone_change_list.html"

    def get_urls(self):
        view = self.admin_site.admin_view(self.register_view)
        return [path("register/", view, name="explain_backbone_register"), *super().get_urls()]

    @admin.display(description="registered", boolean=True)
    def registered(self, backbone: Backbone) -> bool:
        return bool(backbone.config.get("registered"))

    def register_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_add_permission(request):
            return HttpResponseRedirect(reverse("admin:index"))
        form = BackboneRegisterForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            params = {
                "dataset_id": data["dataset"].pk,
                "kind": data["kind"],
                "path": data["path"],
                "format_name": data["format_name"],
                "name": data["name"],
                "options": data["options"],
            }
            if data["classifier"]:
                params["classifier_id"] = data["classifier"].pk
            job = job_create(kind="backbone_register", params=params)
            self.message_user(request, f"Checking {data['name']!r} on a worker: job {job.pk}.", messages.INFO)
            return HttpResponseRedirect(reverse("admin:explain_job_change", args=[job.pk]))
        context = {
            **self.admin_site.each_context(request),
            "form": form,
            "formats": backbone_formats(),
            "title": "Register a model from local files",
        }
        return TemplateResponse(request, "admin/explain/backbone_register.html", context)


class DistractorInline(admin.TabularInline):
    model = ExplanationDistractor
    extra = 0
    raw_id_fields = ("image",)


@admin.register(Explanation)
class ExplanationAdmin(admin.ModelAdmin):
    """Precomputed stimuli: a live, paused or closed study's are viewable, never changed or deleted here (the
    database refuses too)."""

    list_display = ("id", "study", "pair", "condition", "flipped", "created_at")
    list_filter = ("flipped", "condition__method", "condition__setup")
    list_select_related = ("study", "pair__class_a", "pair__class_b", "condition")
    raw_id_fields = ("study", "pair", "condition", "query_image")
    inlines = [DistractorInline]

    def has_change_permission(self, request: HttpRequest, obj: Explanation | None = None) -> bool:
        return super().has_change_permission(request, obj) and not (obj and obj.study.is_frozen)

    def has_delete_permission(self, request: HttpRequest, obj: Explanation | None = None) -> bool:
        return super().has_delete_permission(request, obj) and not (obj and obj.study.is_frozen)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Explanation]) -> None:
        frozen = queryset.filter(study__status__in=Study.FROZEN_STATUSES)
        if frozen.exists():
            self.message_user(
                request,
                f"{frozen.count()} stimuli of live, paused or closed studies were kept: a frozen study's "
                "stimuli are read-only. Copy the study into a new draft to precompute others.",
                messages.ERROR,
            )
        super().delete_queryset(request, queryset.exclude(study__status__in=Study.FROZEN_STATUSES))


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "status", "progress", "worker", "created_at", "finished_at")
    list_filter = ("kind", "status")
    readonly_fields = [f.name for f in Job._meta.fields]

    @admin.display(description="progress")
    def progress(self, job: Job) -> str:
        return f"{job.done} / {job.total}" if job.total else "-"


@admin.register(PrecomputePlan)
class PrecomputePlanAdmin(admin.ModelAdmin):
    list_display = ("study", "queue", "semantic_pool", "created_at", "finished_at")
    list_select_related = ("study",)
    readonly_fields = ("study", "candidates", "created_at", "updated_at", "finished_at")


@admin.register(WorkUnit)
class WorkUnitAdmin(admin.ModelAdmin):
    """Every unit of precompute work; failures keep their error text and can be retried from here."""

    list_display = ("key", "kind", "status", "attempts", "device", "worker", "short_error", "finished_at")
    list_filter = ("status", "kind", "condition__method", "condition__setup")
    list_select_related = ("condition",)
    search_fields = ("key", "error")
    readonly_fields = [f.name for f in WorkUnit._meta.fields]
    actions = ["retry"]

    @admin.display(description="error")
    def short_error(self, unit: WorkUnit) -> str:
        return unit.error.splitlines()[0][:200] if unit.error else ""

    @admin.action(description="Retry the selected failed units")
    def retry(self, request: HttpRequest, queryset: QuerySet[WorkUnit]) -> None:
        retried = 0
        for unit in queryset:
            try:
                work_unit_retry(unit=unit)
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), messages.WARNING)
            else:
                retried += 1
        self.message_user(request, f"{retried} work units sent to a worker again.", messages.SUCCESS)
