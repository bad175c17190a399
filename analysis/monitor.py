"""The monitoring page of a live study (staff only, in the admin's look): assignments per condition x pair
cell, durations and the balance of the design, refreshed by htmx; accuracy by condition stays blinded until
the study closes unless a researcher unblinds it (recorded in the audit log and the report)."""

from django.contrib import admin, messages
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from studies.models import Assignment, Study
from studies.selectors import study_monitor
from studies.services import study_unblind

from .selectors import rater_exclusions


def rule_excluded_assignments(*, study: Study) -> set[int]:
    """Assignments whose raters the study's declared exclusion rules exclude (as the analysis evaluates)."""
    if not study.exclusion_rules:
        return set()
    verdicts = rater_exclusions(study=study)
    raters = list(verdicts.loc[verdicts["excluded"], "rater"]) if not verdicts.empty else []
    return set(
        Assignment.objects.filter(study=study, rater__opaque_id__in=raters).values_list("pk", flat=True)
    )


@staff_member_required
@require_GET
def monitor_page(request: HttpRequest, study_id: int) -> HttpResponse:
    """The full page, or (htmx) the partial it refreshes every few seconds."""
    study = get_object_or_404(Study.objects.select_related("unblinded_by"), pk=study_id)
    context = {
        **admin.site.each_context(request),
        "title": f"Monitoring {study.title}",
        "study": study,
        "monitor": study_monitor(study=study, excluded_assignments=rule_excluded_assignments(study=study)),
        "opts": Study._meta,
    }
    template = "admin/studies/study/_monitor.html" if request.htmx else "admin/studies/study/monitor.html"
    return TemplateResponse(request, template, context)


@staff_member_required
@require_POST
def unblind(request: HttpRequest, study_id: int) -> HttpResponse:
    study = get_object_or_404(Study, pk=study_id)
    study_unblind(study=study, user=request.user)
    messages.warning(request, "Accuracy by condition unblinded; the audit log and the report say so.")
    return HttpResponseRedirect(reverse("analysis:monitor", args=[study.pk]))
