"""GET /healthz/: 200 when this web process can reach the database, 503 (with the reason) when it cannot. The
docker-compose health check of the web service calls it."""

from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET


@require_GET
def healthz(request: HttpRequest) -> HttpResponse:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return HttpResponse(f"database unreachable: {exc}", status=503, content_type="text/plain")
    return HttpResponse("ok", content_type="text/plain")
