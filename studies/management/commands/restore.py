"""`manage.py restore DIR --database-url URL`: a backup made by `manage.py backup` into a new, empty database
(created when it does not exist) and its media files into --media-root; the row counts are checked against the
backup's manifest."""

import json
import subprocess
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import psycopg
from django.core.management.base import BaseCommand, CommandError
from psycopg import sql

from studies.backup import database_counts

from .backup import sha256


class Command(BaseCommand):
    help = (
        "Restore a backup directory into a new PostgreSQL database (and media directory); verify the counts."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("backup", type=Path, help="A directory written by `manage.py backup`.")
        parser.add_argument(
            "--database-url",
            required=True,
            help="postgres://... of the database to restore into (new or empty).",
        )
        parser.add_argument(
            "--media-root", type=Path, help="Directory to unpack the media into (default: none)."
        )

    def handle(self, *args, backup: Path, database_url: str, media_root: Path | None, **options) -> None:
        manifest_path = backup / "manifest.json"
        if not manifest_path.exists():
            raise CommandError(
                f"{backup} has no manifest.json; give a directory written by `manage.py backup`"
            )
        manifest = json.loads(manifest_path.read_text())
        for name, digest in manifest["files"].items():
            if sha256(backup / name) != digest:
                raise CommandError(
                    f"{backup / name} does not match its checksum in manifest.json; it is damaged"
                )
        url = urlparse(database_url)
        if url.scheme not in {"postgres", "postgresql"}:
            raise CommandError(f"--database-url {database_url!r} is not a postgres:// URL")
        name = url.path.lstrip("/")
        maintenance = url._replace(path="/postgres").geturl()
        with psycopg.connect(maintenance, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with psycopg.connect(database_url) as conn:
            tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
        if tables:
            raise CommandError(
                f"database {name!r} already has {tables} tables; restore into a new, empty database"
            )
        result = subprocess.run(
            ["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", "--dbname", database_url,
             str(backup / "database.dump")],
            capture_output=True,
            text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise CommandError(f"pg_restore failed (exit {result.returncode}): {result.stderr.strip()}")
        with psycopg.connect(database_url) as conn:
            counts = database_counts(conn)
        differ = {t: (n, counts.get(t)) for t, n in manifest["counts"].items() if counts.get(t) != n}
        if differ:
            raise CommandError(
                f"the restored database differs from the backup (table: backup, restored): {differ}"
            )
        if media_root is not None and "media.tar.gz" in manifest["files"]:
            media_root.mkdir(parents=True, exist_ok=True)
            if any(media_root.iterdir()):
                raise CommandError(f"{media_root} is not empty; give an empty media directory")
            with tempfile.TemporaryDirectory(dir=media_root.parent) as tmp:
                with tarfile.open(backup / "media.tar.gz") as tar:
                    tar.extractall(tmp, filter="data")
                unpacked = Path(tmp) / "media"
                for item in unpacked.iterdir() if unpacked.exists() else []:
                    item.replace(media_root / item.name)
        self.stdout.write(
            f"Restored {counts['studies_study']} studies and {counts['studies_response']} responses "
            f"into {name!r} "
            f"(the same counts as the backup of {manifest['database']!r}, {manifest['created_at']})"
            + (f"; media into {media_root}" if media_root else "")
        )
