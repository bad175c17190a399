"""`manage.py report STUDY [--out DIR]`: the study's report as HTML, PDF, figures and CSV tables.

`manage.py report --demo` first creates a study answered by simulated raters (analysis.demo) and reports it.
"""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from analysis.demo import demo_study_create
from analysis.report import report_build, report_write
from analysis.selectors import COLUMN_NAMES, data_dictionary, responses_tidy, rows_to_csv
from studies.models import Study

STEPS = 7  # the progress steps report_build announces


class Command(BaseCommand):
    help = "Write a study's report (report.html, report.pdf, figures/*.png, tables/*.csv, the tidy export)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("study", nargs="?", type=int, help="Study id (see the admin).")
        parser.add_argument("--out", type=Path, help="Where to write (default: FOIL_REPORT_ROOT/study-<id>).")
        parser.add_argument("--demo", action="store_true", help="Create a study of simulated raters first.")
        parser.add_argument(
            "--seed", type=int, help="Seed of the bootstrap and model fits (default: the study's)."
        )
        parser.add_argument("--bootstrap", type=int, default=2000, help="Bootstrap resamples (default 2000).")
        parser.add_argument(
            "--no-mixed", action="store_true", help="Skip the Bayesian mixed model (GEE only)."
        )

    def handle(self, *args, study: int | None, out: Path | None, demo: bool, seed: int | None,
               bootstrap: int, no_mixed: bool, **options) -> None:  # fmt: skip
        if demo and study is not None:
            raise CommandError("give either a study id or --demo, not both")
        if demo:
            found = demo_study_create(seed=seed or 0)
            self.stdout.write(f"Created simulated study {found.pk}: {found.title!r}")
        elif study is None:
            ids = ", ".join(str(pk) for pk in Study.objects.order_by("pk").values_list("pk", flat=True)[:20])
            raise CommandError(f"give a study id (existing: {ids or 'none'}) or --demo for a simulated study")
        else:
            found = Study.objects.filter(pk=study).first()
            if found is None:
                ids = ", ".join(
                    str(pk) for pk in Study.objects.order_by("pk").values_list("pk", flat=True)[:20]
                )
                raise CommandError(f"no study has id {study}; existing ids: {ids or 'none'}")
        if bootstrap < 100:
            raise CommandError(
                f"--bootstrap {bootstrap} is too few resamples for a 95% interval; use 1000 or more"
            )
        out = out or Path(settings.FOIL_REPORT_ROOT) / f"study-{found.pk}"
        bar = tqdm(total=STEPS, desc=f"report of study {found.pk}", unit="step")

        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        report = report_build(study=found, n_boot=bootstrap, seed=seed, mixed=not no_mixed, progress=progress)
        written = report_write(report, out)
        rows = responses_tidy(study=found)
        (out / "responses.csv").write_text(rows_to_csv(rows, COLUMN_NAMES), encoding="utf-8")
        dictionary = data_dictionary()
        (out / "data_dictionary.csv").write_text(
            rows_to_csv(dictionary, ["column", "type", "description"]), encoding="utf-8"
        )
        bar.close()
        meta = report.meta
        if meta["simulated_raters"]:
            self.stdout.write(f"Note: {meta['simulated_raters']} of {meta['raters']} raters are simulated.")
        self.stdout.write(f"HTML:   {written['html']}")
        self.stdout.write(f"PDF:    {written['pdf']}")
        self.stdout.write(f"Tables: {out / 'tables'} ({len(report.tables)} CSV files)")
        self.stdout.write(f"Export: {out / 'responses.csv'} ({len(rows)} responses) + data_dictionary.csv")
