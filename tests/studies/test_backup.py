"""`manage.py backup` dumps PostgreSQL and the media; `manage.py restore` puts a live study into a new
database with the same responses (and the same guards on its data)."""

import uuid
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection

from studies import services
from studies.models import Phase, Rater, Response, Trial
from tests.studies.builders import live_study

pytestmark = pytest.mark.django_db(transaction=True)  # pg_dump reads committed rows only


def base_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}"


@pytest.fixture
def restored_database():
    name = f"foil_restore_test_{uuid.uuid4().hex[:8]}"
    yield f"{base_url()}/{name}"
    with psycopg.connect(f"{base_url()}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def answered_live_study():
    study = live_study(n_pairs=1, setups=("random",), n_images=2, n_learning=1)
    assignment = services.assignment_create(
        study=study, rater=Rater.objects.create(), provider="direct", seed=3
    )
    for trial in Trial.objects.filter(block__assignment=assignment).order_by("pk"):
        answer = "seen" if trial.phase == Phase.LEARNING else trial.correct_answer
        services.response_submit(trial=trial, answer=answer, client_rt_ms=trial.pk % 997)
    return study


RESPONSES = "SELECT id, trial_id, phase, answer, client_rt_ms, received_at FROM studies_response ORDER BY id"


def test_backup_and_restore_a_live_study_into_a_new_database(tmp_path, restored_database):
    study = answered_live_study()
    media_file = Path(settings.MEDIA_ROOT) / "backup-probe.txt"
    media_file.write_text("a media file")
    try:
        call_command("backup", str(tmp_path / "backup"))
    finally:
        media_file.unlink()
    assert {p.name for p in (tmp_path / "backup").iterdir()} == {
        "database.dump",
        "media.tar.gz",
        "manifest.json",
    }

    call_command(
        "restore", str(tmp_path / "backup"), database_url=restored_database, media_root=tmp_path / "media"
    )
    with connection.cursor() as cursor:
        cursor.execute(RESPONSES)
        original = cursor.fetchall()
    assert len(original) == Response.objects.count() > 0
    with psycopg.connect(restored_database) as conn:
        assert conn.execute(RESPONSES).fetchall() == original
        title, status = conn.execute(
            "SELECT title, status FROM studies_study WHERE id = %s", [study.pk]
        ).fetchone()
        assert (title, status) == (study.title, "live")
        with pytest.raises(psycopg.errors.RestrictViolation, match="read-only"):
            conn.execute("UPDATE studies_response SET answer = 'A' WHERE phase = 'test'")
    assert (tmp_path / "media" / "backup-probe.txt").read_text() == "a media file"


def test_restore_refuses_a_database_that_is_not_empty(tmp_path):
    answered_live_study()
    call_command("backup", str(tmp_path / "backup"), no_media=True)
    with pytest.raises(CommandError, match="already has .* tables; restore into a new, empty database"):
        call_command(
            "restore",
            str(tmp_path / "backup"),
            database_url=f"{base_url()}/{connection.settings_dict['NAME']}",
        )


def test_restore_refuses_a_damaged_backup(tmp_path, restored_database):
    call_command("backup", str(tmp_path / "backup"), no_media=True)
    dump = tmp_path / "backup" / "database.dump"
    dump.write_bytes(dump.read_bytes()[:-10])
    with pytest.raises(CommandError, match="does not match its checksum"):
        call_command("restore", str(tmp_path / "backup"), database_url=restored_database)


def test_backup_refuses_to_overwrite(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "database.dump").write_text("an earlier backup")
    with pytest.raises(CommandError, match="is not empty"):
        call_command("backup", str(tmp_path / "old"))
