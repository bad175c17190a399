"""Researcher-only URLs: the DRF API under api/ and the report pages under analysis/."""

from django.urls import include, path
from rest_framework.routers import DefaultRouter

from . import monitor, views
from .api import StudyViewSet

router = DefaultRouter()
router.register("studies", StudyViewSet, basename="study")

report_patterns = [
    path("studies/<int:study_id>/report/", views.report_page, name="report"),
    path("studies/<int:study_id>/report.pdf", views.report_pdf_download, name="report-pdf"),
    path("studies/<int:study_id>/tables/<str:name>.csv", views.report_table_csv, name="report-table"),
    path("studies/<int:study_id>/monitor/", monitor.monitor_page, name="monitor"),
    path("studies/<int:study_id>/unblind/", monitor.unblind, name="unblind"),
]

urlpatterns = [
    path("api/", include((router.urls, "analysis-api"))),
    path("analysis/", include((report_patterns, "analysis"))),
]
