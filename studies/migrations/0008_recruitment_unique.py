"""Every existing assignment gets its URL token and its own completion code; then both become unique.

Not atomic: PostgreSQL cannot alter a table in the transaction that updated its rows, so the data step commits on
its own first (it can simply run again if a later step fails)."""

import secrets

from django.db import migrations, models
from django.db.models import Count

import studies.models


def give_assignments_tokens_and_own_codes(apps, schema_editor):
    """Existing assignments get their URL token; a completion code several assignments shared (the old
    per-study code) gets the assignment id appended, so the old code still prefixes what raters entered."""
    Assignment = apps.get_model("studies", "Assignment")
    for assignment in Assignment.objects.filter(token__isnull=True).only("pk"):
        assignment.token = secrets.token_urlsafe(24)
        assignment.save(update_fields=["token"])
    shared = (
        Assignment.objects.exclude(completion_code="")
        .values("completion_code")
        .annotate(n=Count("pk"))
        .filter(n__gt=1)
        .values_list("completion_code", flat=True)
    )
    for assignment in Assignment.objects.filter(completion_code__in=list(shared)).only(
        "pk", "completion_code"
    ):
        assignment.completion_code = f"{assignment.completion_code}-{assignment.pk}"
        assignment.save(update_fields=["completion_code"])


class Migration(migrations.Migration):
    atomic = False
    dependencies = [
        ("studies", "0007_recruitment"),
    ]

    operations = [
        migrations.RunPython(give_assignments_tokens_and_own_codes, migrations.RunPython.noop, atomic=True),
        migrations.AlterField(
            model_name="assignment",
            name="token",
            field=models.CharField(
                default=studies.models.new_rater_token,
                editable=False,
                help_text="The rater's place in their URLs: works without cookies (MTurk's cross-site frame).",
                max_length=64,
                unique=True,
            ),
        ),
        migrations.AddConstraint(
            model_name="assignment",
            constraint=models.UniqueConstraint(
                condition=models.Q(("completion_code", ""), _negated=True),
                fields=("completion_code",),
                name="assignment_code_unique",
            ),
        ),
    ]
