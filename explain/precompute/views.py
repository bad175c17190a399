"""Researcher pages for precompute: progress per method x setup (htmx polling), failures, retry, gallery.

Staff only. Every page is a full page on a normal request and a named partial when htmx asks (django-htmx).
"""

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import ValidationError
from django.core.files.storage import default_storage
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from explain.models import Explanation, WorkUnit
from explain.precompute.advancing import plan_retry_failed, work_unit_retry
from explain.precompute.planning import study_precompute
from explain.precompute.selectors import condition_gallery, plan_progress
from studies.models import Study

POLL_SECONDS = 2


@staff_member_required
def precompute_progress(request: HttpRequest, study_id: int) -> HttpResponse:
    study = get_object_or_404(Study.objects.select_related("dataset", "classifier"), pk=study_id)
    progress = plan_progress(study=study)
    context = {
        "study": study,
        "progress": progress,
        "polling": progress["plan"] is not None and progress["state"] == "running",
        "poll_seconds": POLL_SECONDS,
    }
    template = "explain/_precompute_progress.html" if request.htmx else "explain/precompute_progress.html"
    return render(request, template, context)


@staff_member_required
@require_POST
def precompute_start(request: HttpRequest, study_id: int) -> HttpResponse:
    study = get_object_or_404(Study, pk=study_id)
    try:
        plan = study_precompute(study=study)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, f"Precompute of {study.title!r} planned: {plan.units.count()} work units.")
    return redirect("explain:precompute_progress", study_id=study.pk)


@staff_member_required
@require_POST
def unit_retry(request: HttpRequest, unit_id: int) -> HttpResponse:
    unit = get_object_or_404(WorkUnit.objects.select_related("plan"), pk=unit_id)
    try:
        work_unit_retry(unit=unit)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, f"Work unit {unit.key} sent to a worker again.")
    study_id = request.POST.get("study") or (unit.plan.study_id if unit.plan_id else None)
    if study_id and str(study_id).isdigit():
        return redirect("explain:precompute_progress", study_id=int(study_id))
    return redirect(reverse("admin:explain_workunit_changelist"))


@staff_member_required
@require_POST
def retry_failed(request: HttpRequest, study_id: int) -> HttpResponse:
    study = get_object_or_404(Study.objects.select_related("precompute_plan"), pk=study_id)
    plan = getattr(study, "precompute_plan", None)
    if plan is None:
        messages.error(request, f"Study {study.title!r} has not been precomputed yet; nothing to retry.")
    else:
        n = plan_retry_failed(plan=plan)
        messages.success(request, f"{n} failed work units sent to a worker again.")
    return redirect("explain:precompute_progress", study_id=study.pk)


@staff_member_required
def gallery(request: HttpRequest, study_id: int) -> HttpResponse:
    """The kept stimuli of one condition, per class pair, so a researcher can look before launching."""
    study = get_object_or_404(Study, pk=study_id)
    conditions = list(study.conditions.order_by("method", "setup"))
    chosen = request.GET.get("condition")
    condition = next((c for c in conditions if str(c.pk) == chosen), conditions[0] if conditions else None)
    groups = condition_gallery(study=study, condition_id=condition.pk) if condition else []
    context = {"study": study, "conditions": conditions, "condition": condition, "groups": groups}
    template = "explain/_gallery.html" if request.htmx else "explain/gallery.html"
    return render(request, template, context)


FILE_ROLES = {
    "query": "query_stimulus",
    "distractor": "distractor_stimulus",
    "counterfactual": "counterfactual_image",
}


@staff_member_required
def explanation_file(request: HttpRequest, explanation_id: int, role: str) -> FileResponse:
    """A stimulus image through the storage API (file system or object store), for the gallery."""
    if role not in FILE_ROLES:
        raise Http404(f"no stimulus {role!r}; use one of {', '.join(FILE_ROLES)}")
    explanation = get_object_or_404(Explanation, pk=explanation_id)
    field = getattr(explanation, FILE_ROLES[role])
    if not field or not default_storage.exists(field.name):
        raise Http404(f"explanation {explanation_id} has no {role} image")
    return FileResponse(default_storage.open(field.name, "rb"), content_type="image/png")
