"""GET /media/<path>: the stored files (stimuli, masks, exports) for researchers only, in every configuration.

The rater pages never link here (raters get their images through their trial's unguessable key); the admin's
file fields do, and with DEBUG off Django serves no media at all, so those links were dead in production. The
files are served by this view to signed-in staff, from MEDIA_ROOT only (no path may leave it)."""

from pathlib import Path

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.http import FileResponse, Http404, HttpRequest
from django.views.decorators.http import require_GET


@require_GET
@staff_member_required
def media_file(request: HttpRequest, path: str) -> FileResponse:
    root = Path(settings.MEDIA_ROOT).resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise Http404(f"no stored file {path!r}")
    response = FileResponse(target.open("rb"))
    response["Cache-Control"] = "private, no-store"
    response["X-Content-Type-Options"] = "nosniff"
    return response
