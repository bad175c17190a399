"""The rater's pages, mounted under /s/ (config/urls.py). After consent every URL carries the assignment's
unguessable token (``r/<token>/``), so no cookie is needed (MTurk's cross-site iframe)."""

from django.urls import path

from . import views

app_name = "studies"
urlpatterns = [
    path("<int:study_id>/", views.study_entry, name="entry"),
    path("<int:study_id>/preview/example/<int:slot>/", views.preview_example_image, name="preview-example"),
    path("r/<slug:token>/", views.assignment_go, name="go"),
    path("r/<slug:token>/instructions/", views.instructions_done, name="instructions"),
    path("r/<slug:token>/example/<int:slot>/", views.example_image, name="example"),
    path("r/<slug:token>/events/", views.rater_event, name="events"),
    path("r/<slug:token>/finish/", views.assignment_finish, name="finish"),
    path("r/<slug:token>/t/<uuid:key>/", views.trial_answer, name="answer"),
    path("r/<slug:token>/t/<uuid:key>/img/<int:slot>/", views.trial_image, name="image"),
]
