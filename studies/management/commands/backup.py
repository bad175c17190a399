"""`manage.py backup DIR`: the database (pg_dump, custom format) and the media files, with a manifest to check
a restore against. `manage.py restore DIR --database-url URL` puts them back (README: Backup and restore)."""

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.utils import timezone

from studies.backup import database_counts


def connection_string() -> str:
    """libpq connection string of the database Django uses now (also the test database under pytest)."""
    from psycopg.conninfo import make_conninfo

    db = connection.settings_dict
    parts = {"dbname": db["NAME"], "user": db["USER"], "password": db["PASSWORD"], "host": db["HOST"]}
    return make_conninfo(
        **{k: v for k, v in parts.items() if v}, **({"port": db["PORT"]} if db["PORT"] else {})
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Command(BaseCommand):
    help = "Back up the PostgreSQL database and the media files into DIR (a new or empty directory)."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "out", type=Path, help="Directory to write database.dump, media.tar.gz, manifest.json"
        )
        parser.add_argument(
            "--no-media", action="store_true", help="Only the database (media kept elsewhere)."
        )

    def handle(self, *args, out: Path, no_media: bool, **options) -> None:
        if not settings.DATABASE_IS_POSTGRES:
            raise CommandError(
                f"backup needs PostgreSQL; the database is {settings.DATABASE_SOURCE}. Set DATABASE_URL."
            )
        if out.exists() and any(out.iterdir()):
            raise CommandError(
                f"{out} is not empty; give a new directory so that no earlier backup is overwritten"
            )
        out.mkdir(parents=True, exist_ok=True)
        dump = out / "database.dump"
        result = subprocess.run(
            ["pg_dump", "--format=custom", "--no-owner", "--no-privileges", "--file", str(dump),
             "--dbname", connection_string()],
            capture_output=True,
            text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise CommandError(f"pg_dump failed (exit {result.returncode}): {result.stderr.strip()}")
        files = {"database.dump": sha256(dump)}
        media_root = Path(settings.MEDIA_ROOT)
        if not no_media:
            if "S3" in settings.STORAGES["default"]["BACKEND"]:
                raise CommandError(
                    "media live in object storage (S3); back the bucket up there and pass --no-media"
                )
            archive = out / "media.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                if media_root.exists():
                    tar.add(media_root, arcname="media")
            files["media.tar.gz"] = sha256(archive)
        manifest = {
            "created_at": timezone.now().isoformat(),
            "database": connection.settings_dict["NAME"],
            "files": files,
            "counts": database_counts(connection),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        counts = manifest["counts"]
        self.stdout.write(
            f"Backed up {counts['studies_study']} studies, {counts['studies_response']} responses"
            f"{'' if no_media else ' and the media files'} into {out}"
        )
