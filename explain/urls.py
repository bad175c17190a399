"""Researcher pages of the explain app, mounted under ``research/`` (staff only)."""

from django.urls import path

from .precompute import views

app_name = "explain"

urlpatterns = [
    path("studies/<int:study_id>/precompute/", views.precompute_progress, name="precompute_progress"),
    path("studies/<int:study_id>/precompute/start/", views.precompute_start, name="precompute_start"),
    path(
        "studies/<int:study_id>/precompute/retry-failed/", views.retry_failed, name="precompute_retry_failed"
    ),
    path("studies/<int:study_id>/gallery/", views.gallery, name="gallery"),
    path("units/<int:unit_id>/retry/", views.unit_retry, name="unit_retry"),
    path("explanations/<int:explanation_id>/<str:role>.png", views.explanation_file, name="explanation_file"),
]
