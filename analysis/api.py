"""The researchers' API (DRF): studies, their progress, the tidy responses export and the analysis results.

Staff only (session or token authentication; ``IsAdminUser``): raters and anonymous callers get 401/403. Every
answer here is read through ``analysis.selectors``, which never reads provider identities.
"""

from __future__ import annotations

import json

from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import IsAdminUser
from rest_framework.renderers import BaseRenderer, BrowsableAPIRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from studies.models import Study
from studies.selectors import study_audit_log, study_list_with_counts

from .report import report_build
from .selectors import COLUMN_NAMES, data_dictionary, responses_tidy, rows_to_csv, study_progress


class CSVRenderer(BaseRenderer):
    """Lists of flat dicts as CSV; the view names the columns in ``response.data_columns``."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> str:
        response = (renderer_context or {}).get("response")
        if not isinstance(data, list):  # an error body
            return rows_to_csv(
                [data] if isinstance(data, dict) else [], list(data) if isinstance(data, dict) else []
            )
        columns = getattr(response, "data_columns", None) or (list(data[0]) if data else [])
        return rows_to_csv(data, columns)


class StudyOutputSerializer(serializers.ModelSerializer):
    n_pairs = serializers.IntegerField(read_only=True)
    n_conditions = serializers.IntegerField(read_only=True)
    n_explanations = serializers.IntegerField(read_only=True)
    n_assignments_started = serializers.IntegerField(read_only=True)
    n_assignments_completed = serializers.IntegerField(read_only=True)
    n_pilot_assignments = serializers.IntegerField(read_only=True)
    n_responses = serializers.IntegerField(read_only=True)

    class Meta:
        model = Study
        fields = [
            "id", "title", "status", "version", "design", "seed", "exclusion_rules", "n_prelearning",
            "n_learning", "n_test", "launched_at", "created_at", "n_pairs", "n_conditions", "n_explanations",
            "n_assignments_started", "n_assignments_completed", "n_pilot_assignments", "n_responses",
        ]  # fmt: skip


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError({name: f"{raw!r} is not a whole number; give e.g. {name}={default}"}) from None
    if not low <= value <= high:
        raise ValidationError({name: f"{value} is out of range; use {low} to {high}"})
    return value


class StudyViewSet(viewsets.ReadOnlyModelViewSet):
    """Studies with counts; per study: progress, responses (JSON or ?format=csv), dictionary, analysis."""

    permission_classes = [IsAdminUser]
    serializer_class = StudyOutputSerializer

    def get_queryset(self):
        return study_list_with_counts().order_by("pk")

    @action(detail=True)
    def progress(self, request: Request, pk: str | None = None) -> Response:
        return Response(study_progress(study=self.get_object()))

    @action(detail=True, renderer_classes=[JSONRenderer, CSVRenderer, BrowsableAPIRenderer])
    def responses(self, request: Request, pk: str | None = None) -> Response:
        """The tidy export: one row per response, columns as in the data dictionary."""
        response = Response(responses_tidy(study=self.get_object()))
        response.data_columns = COLUMN_NAMES
        if request.accepted_renderer.format == "csv":
            response["Content-Disposition"] = f'attachment; filename="study-{pk}-responses.csv"'
        return response

    @action(detail=True, renderer_classes=[JSONRenderer, CSVRenderer, BrowsableAPIRenderer])
    def audit(self, request: Request, pk: str | None = None) -> Response:
        """The study's audit log (every researcher change, oldest first), exported beside the responses."""
        rows = [
            {**e, "detail": json.dumps(e["detail"], sort_keys=True)}
            for e in study_audit_log(study=self.get_object())
        ]
        response = Response(rows)
        response.data_columns = ["at", "user", "action", "detail"]
        return response

    @action(detail=True, url_path="data-dictionary", renderer_classes=[JSONRenderer, CSVRenderer])
    def data_dictionary(self, request: Request, pk: str | None = None) -> Response:
        self.get_object()
        response = Response(data_dictionary())
        response.data_columns = ["column", "type", "description"]
        return response

    @action(detail=True)
    def analysis(self, request: Request, pk: str | None = None) -> Response:
        """Every table of the report as JSON records, with the report's metadata (seed, versions, rules).
        Query parameters: bootstrap (resamples, default 2000), seed, mixed=0 to skip the mixed model."""
        study = self.get_object()
        n_boot = _int_param(request, "bootstrap", 2000, 100, 20000)
        seed = _int_param(request, "seed", study.seed, 0, 2**31 - 1)
        mixed = request.query_params.get("mixed", "1") not in {"0", "false", "no"}
        report = report_build(study=study, n_boot=n_boot, seed=seed, mixed=mixed)
        return Response({"meta": report.meta, "tables": {n: report.table_records(n) for n in report.tables}})
