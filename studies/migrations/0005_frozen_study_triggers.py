"""The database itself refuses changes to a frozen (live, paused or closed) study's data.

Forms and services already refuse; these PostgreSQL triggers also stop the ORM (save, queryset.update/delete),
raw SQL and psql. Each raises SQLSTATE 23001 (restrict_violation, an IntegrityError in Django) with a message
that names the row and says what to do instead. Corrections and the audit log are append-only.
On the embedded SQLite fallback (a first look only) nothing is installed.
"""

from django.db import migrations

# The columns of a frozen study that may still change: its state and history, its title and description, and
# recruitment settings raters never see as part of the design. Every other column (the design, Study.DESIGN_FIELDS,
# and any column added later until a migration lists it here) is frozen.
MUTABLE_COLUMNS = (
    "status", "version", "launched_at", "updated_at", "title", "description", "completion_code",
    "prolific_completion_code", "mturk_sandbox", "unblinded_at", "unblinded_by_id", "copied_from_id",
    "copied_from_version",
    # Recruitment (migration 0007): closing the direct link, the number of places, Prolific's outcome codes, and
    # the consent and debrief texts (each assignment keeps the exact consent text its rater agreed to).
    "direct_link_open", "max_raters", "prolific_failed_check_code", "prolific_timeout_code", "consent_text",
    "pay", "expected_minutes", "contact", "ethics_reference", "debrief_text",
)  # fmt: skip
FROZEN = "('live', 'paused', 'closed')"
FIX = "Record a correction (admin: Corrections) or copy the study into a new draft."

_mutable = "ARRAY[" + ", ".join(f"'{c}'" for c in MUTABLE_COLUMNS) + "]"
_design_changed = f"(to_jsonb(NEW) - {_mutable}) IS DISTINCT FROM (to_jsonb(OLD) - {_mutable})"

INSTALL = f"""
CREATE OR REPLACE FUNCTION foil_frozen_study(study bigint) RETURNS text AS $$
    SELECT format('study %s %L is %s (version %s)', id, title, status, version)
    FROM studies_study WHERE id = study AND status IN {FROZEN}
$$ LANGUAGE sql STABLE;

CREATE OR REPLACE FUNCTION foil_refuse(what text, frozen text) RETURNS void AS $$
BEGIN
    RAISE EXCEPTION 'Refused: % of % — its data are read-only. {FIX}', what, frozen
        USING ERRCODE = 'restrict_violation';
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION foil_guard_study() RETURNS trigger AS $$
BEGIN
    IF OLD.status IN {FROZEN} THEN
        IF TG_OP = 'DELETE' THEN
            PERFORM foil_refuse('deleting the study', foil_frozen_study(OLD.id));
        ELSIF {_design_changed} OR NEW.status NOT IN {FROZEN} OR NEW.version < OLD.version THEN
            PERFORM foil_refuse('changing the design', foil_frozen_study(OLD.id));
        END IF;
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$ LANGUAGE plpgsql;

-- Pairs and conditions: no insert, update or delete while the study is frozen.
CREATE OR REPLACE FUNCTION foil_guard_design_row() RETURNS trigger AS $$
DECLARE
    frozen text := foil_frozen_study(CASE WHEN TG_OP = 'INSERT' THEN NEW.study_id ELSE OLD.study_id END);
BEGIN
    IF frozen IS NULL AND TG_OP = 'UPDATE' THEN
        frozen := foil_frozen_study(NEW.study_id);
    END IF;
    IF frozen IS NOT NULL THEN
        PERFORM foil_refuse(lower(TG_OP) || ' of a ' || TG_ARGV[0], frozen);
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$ LANGUAGE plpgsql;

-- Assignments: raters arrive and finish while live (status, consent, completion code change); who, which
-- study, which version, which seed and whether it is a pilot never change, and none is deleted.
CREATE OR REPLACE FUNCTION foil_guard_assignment() RETURNS trigger AS $$
DECLARE
    frozen text := foil_frozen_study(OLD.study_id);
BEGIN
    IF frozen IS NOT NULL THEN
        IF TG_OP = 'DELETE' THEN
            PERFORM foil_refuse('deleting assignment ' || OLD.id, frozen);
        ELSIF NEW.rater_id IS DISTINCT FROM OLD.rater_id OR NEW.study_id IS DISTINCT FROM OLD.study_id
              OR NEW.study_version IS DISTINCT FROM OLD.study_version OR NEW.seed IS DISTINCT FROM OLD.seed
              OR NEW.provider IS DISTINCT FROM OLD.provider OR NEW.is_pilot IS DISTINCT FROM OLD.is_pilot
              OR NEW.started_at IS DISTINCT FROM OLD.started_at THEN
            PERFORM foil_refuse('changing assignment ' || OLD.id, frozen);
        END IF;
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION foil_assignment_study(assignment bigint) RETURNS text AS $$
    SELECT foil_frozen_study(study_id) FROM studies_assignment WHERE id = assignment
$$ LANGUAGE sql STABLE;

-- Blocks: written once when the assignment is made.
CREATE OR REPLACE FUNCTION foil_guard_block() RETURNS trigger AS $$
DECLARE
    frozen text := foil_assignment_study(OLD.assignment_id);
BEGIN
    IF frozen IS NOT NULL THEN
        PERFORM foil_refuse(lower(TG_OP) || ' of block ' || OLD.id, frozen);
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$ LANGUAGE plpgsql;

-- Trials (and their answer keys): only the time a trial was first shown may be filled in, once.
CREATE OR REPLACE FUNCTION foil_guard_trial() RETURNS trigger AS $$
DECLARE
    frozen text := (SELECT foil_assignment_study(b.assignment_id) FROM studies_block b WHERE b.id = OLD.block_id);
BEGIN
    IF frozen IS NOT NULL THEN
        IF TG_OP = 'DELETE' THEN
            PERFORM foil_refuse('deleting trial ' || OLD.id, frozen);
        ELSIF (to_jsonb(NEW) - 'shown_at') IS DISTINCT FROM (to_jsonb(OLD) - 'shown_at')
              OR (OLD.shown_at IS NOT NULL AND NEW.shown_at IS DISTINCT FROM OLD.shown_at) THEN
            PERFORM foil_refuse('changing trial ' || OLD.id, frozen);
        END IF;
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$ LANGUAGE plpgsql;

-- Responses: kept exactly as given.
CREATE OR REPLACE FUNCTION foil_guard_response() RETURNS trigger AS $$
DECLARE
    frozen text := (
        SELECT foil_assignment_study(b.assignment_id)
        FROM studies_trial t JOIN studies_block b ON b.id = t.block_id WHERE t.id = OLD.trial_id
    );
BEGIN
    IF frozen IS NOT NULL THEN
        PERFORM foil_refuse(lower(TG_OP) || ' of response ' || OLD.id, frozen);
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$ LANGUAGE plpgsql;

-- Stimuli raters were taught with.
CREATE OR REPLACE FUNCTION foil_guard_explanation() RETURNS trigger AS $$
DECLARE
    frozen text := foil_frozen_study(OLD.study_id);
BEGIN
    IF frozen IS NOT NULL THEN
        PERFORM foil_refuse('deleting explanation ' || OLD.id, frozen);
    END IF;
    RETURN OLD;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION foil_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'Refused: % of % row % — % are append-only; add a new entry instead.',
        lower(TG_OP), TG_TABLE_NAME, OLD.id, TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END $$ LANGUAGE plpgsql;

CREATE TRIGGER foil_guard_study BEFORE UPDATE OR DELETE ON studies_study
    FOR EACH ROW EXECUTE FUNCTION foil_guard_study();
CREATE TRIGGER foil_guard_classpair BEFORE INSERT OR UPDATE OR DELETE ON studies_classpair
    FOR EACH ROW EXECUTE FUNCTION foil_guard_design_row('class pair');
CREATE TRIGGER foil_guard_condition BEFORE INSERT OR UPDATE OR DELETE ON studies_condition
    FOR EACH ROW EXECUTE FUNCTION foil_guard_design_row('condition');
CREATE TRIGGER foil_guard_excluded_studies BEFORE INSERT OR UPDATE OR DELETE ON studies_study_excluded_studies
    FOR EACH ROW EXECUTE FUNCTION foil_guard_design_row_m2m();
CREATE TRIGGER foil_guard_assignment BEFORE UPDATE OR DELETE ON studies_assignment
    FOR EACH ROW EXECUTE FUNCTION foil_guard_assignment();
CREATE TRIGGER foil_guard_block BEFORE UPDATE OR DELETE ON studies_block
    FOR EACH ROW EXECUTE FUNCTION foil_guard_block();
CREATE TRIGGER foil_guard_trial BEFORE UPDATE OR DELETE ON studies_trial
    FOR EACH ROW EXECUTE FUNCTION foil_guard_trial();
CREATE TRIGGER foil_guard_response BEFORE UPDATE OR DELETE ON studies_response
    FOR EACH ROW EXECUTE FUNCTION foil_guard_response();
CREATE TRIGGER foil_guard_explanation BEFORE DELETE ON explain_explanation
    FOR EACH ROW EXECUTE FUNCTION foil_guard_explanation();
CREATE TRIGGER foil_append_only BEFORE UPDATE OR DELETE ON studies_correction
    FOR EACH ROW EXECUTE FUNCTION foil_append_only();
CREATE TRIGGER foil_append_only BEFORE UPDATE OR DELETE ON studies_auditentry
    FOR EACH ROW EXECUTE FUNCTION foil_append_only();
"""

# The excluded-studies table names its study column from_study_id.
INSTALL = INSTALL.replace(
    "CREATE TRIGGER foil_guard_excluded_studies",
    """CREATE OR REPLACE FUNCTION foil_guard_design_row_m2m() RETURNS trigger AS $$
DECLARE
    frozen text := foil_frozen_study(CASE WHEN TG_OP = 'INSERT' THEN NEW.from_study_id ELSE OLD.from_study_id END);
BEGIN
    IF frozen IS NOT NULL THEN
        PERFORM foil_refuse(lower(TG_OP) || ' of an excluded study', frozen);
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$ LANGUAGE plpgsql;

CREATE TRIGGER foil_guard_excluded_studies""",
)

TRIGGERS = {
    "studies_study": ["foil_guard_study"],
    "studies_classpair": ["foil_guard_classpair"],
    "studies_condition": ["foil_guard_condition"],
    "studies_study_excluded_studies": ["foil_guard_excluded_studies"],
    "studies_assignment": ["foil_guard_assignment"],
    "studies_block": ["foil_guard_block"],
    "studies_trial": ["foil_guard_trial"],
    "studies_response": ["foil_guard_response"],
    "explain_explanation": ["foil_guard_explanation"],
    "studies_correction": ["foil_append_only"],
    "studies_auditentry": ["foil_append_only"],
}
FUNCTIONS = (
    "foil_guard_study()", "foil_guard_design_row()", "foil_guard_design_row_m2m()", "foil_guard_assignment()",
    "foil_guard_block()", "foil_guard_trial()", "foil_guard_response()", "foil_guard_explanation()",
    "foil_append_only()", "foil_assignment_study(bigint)", "foil_refuse(text, text)", "foil_frozen_study(bigint)",
)  # fmt: skip
UNINSTALL = "".join(
    f"DROP TRIGGER IF EXISTS {name} ON {table};\n" for table, names in TRIGGERS.items() for name in names
) + "".join(f"DROP FUNCTION IF EXISTS {f};\n" for f in FUNCTIONS)


def _run(schema_editor, sql: str) -> None:
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cursor:
            cursor.execute(sql)  # no parameters: the % of RAISE and format() stay literal


def install(apps, schema_editor) -> None:
    _run(schema_editor, INSTALL)


def uninstall(apps, schema_editor) -> None:
    _run(schema_editor, UNINSTALL)


class Migration(migrations.Migration):
    dependencies = [
        ("studies", "0004_workflow_corrections_audit_pilot"),
        ("explain", "0004_merge_20261125_0459"),
    ]

    operations = [migrations.RunPython(install, uninstall)]
