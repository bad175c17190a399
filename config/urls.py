from django.contrib import admin
from django.urls import include, path

from .health import healthz
from .media import media_file

admin.site.site_header = "Foil — machine-teaching studies"
admin.site.site_title = "Foil"
admin.site.index_title = "Studies, data sets and explanations"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("research/", include("explain.urls")),
    path("", include("analysis.urls")),  # researchers' API (api/) and reports (analysis/)
    path("s/", include("studies.urls")),
    path("healthz/", healthz, name="healthz"),
    path("media/<path:path>", media_file, name="media"),  # researchers only; see config/media.py
]
