"""`manage.py study_archive STUDY --out FILE.zip` writes a study's archive; `--import FILE.zip` reads one in.

The archive (analysis.archive) holds the design, the pre-registration, the stimuli with their configs, the
anonymised responses, the report and its data dictionary, each file checksummed; importing it recreates the
study, closed, and its report is the archived one byte for byte.
"""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from analysis.archive import study_archive_import, study_archive_write
from studies.models import Study


class Command(BaseCommand):
    help = "Write a study's archive (zip) or import one as a closed study."

    def add_arguments(self, parser) -> None:
        parser.add_argument("study", nargs="?", type=int, help="Study id to archive.")
        parser.add_argument("--out", type=Path, help="Archive to write (default study-<id>.zip).")
        parser.add_argument("--import", dest="source", type=Path, help="Archive to import.")
        parser.add_argument("--bootstrap", type=int, default=2000, help="Bootstrap resamples of the report.")

    def handle(self, *args, study: int | None, out: Path | None, source: Path | None, bootstrap: int,
               **options) -> None:  # fmt: skip
        if (study is None) == (source is None):
            raise CommandError("give a study id to archive, or --import FILE.zip, not both")
        if source is not None:
            if not source.is_file():
                raise CommandError(f"no archive at {source}; give the path of a study zip")
            try:
                imported = study_archive_import(path=source)
            except ValueError as error:
                raise CommandError(str(error)) from error
            self.stdout.write(f"Imported study {imported.pk}: {imported.title!r} (closed)")
            return
        found = Study.objects.filter(pk=study).first()
        if found is None:
            raise CommandError(f"no study has id {study}; see the admin for ids")
        path = study_archive_write(study=found, path=out or Path(f"study-{found.pk}.zip"), n_boot=bootstrap)
        self.stdout.write(f"Wrote {path}")
