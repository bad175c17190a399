"""`manage.py precompute STUDY`: plan a study's precompute, send it to the workers, optionally follow it."""

import json
import time

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from explain.precompute import plan_progress, study_precompute, training_summary
from studies.models import Study
from studies.selectors import study_by_ref


def study_find(ref: str) -> Study:
    """A study by id or by exact title."""
    try:
        return study_by_ref(ref)
    except Study.DoesNotExist as exc:
        raise CommandError(str(exc)) from None


class Command(BaseCommand):
    help = (
        "Plan the precompute of a study (models, candidate image pairs, one work unit per pair x condition "
        "x image pair) and send it to the Celery workers on the explain queue. Running it again creates "
        "nothing twice and resumes lost work."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("study", help="the study's id or exact title")
        parser.add_argument("--queue", help="Celery queue (default: explain)")
        parser.add_argument("--semantic-pool", type=int, help="candidates per learning pair, semantic setup")
        parser.add_argument(
            "--method-config",
            help='JSON: constructor arguments per method, e.g. \'{"cve": {"max_edits": 10}}\'',
        )
        parser.add_argument("--wait", action="store_true", help="follow the progress until it stops")
        parser.add_argument("--timeout", type=float, default=None, help="with --wait: give up after seconds")

    def handle(self, *args, study: str, queue, semantic_pool, method_config, wait: bool, timeout, **options):
        target = study_find(study)
        try:
            config = json.loads(method_config) if method_config else None
        except json.JSONDecodeError as exc:
            raise CommandError(f"--method-config is not valid JSON ({exc}): {method_config!r}") from None
        try:
            plan = study_precompute(
                study=target, queue=queue, method_config=config, semantic_pool=semantic_pool
            )
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        self.stdout.write(
            f"Planned {plan.units.count()} work units for {target.title!r} on queue {plan.queue!r}."
        )
        if wait:
            self._follow(target, timeout)

    def _follow(self, study: Study, timeout: float | None) -> None:
        start = time.monotonic()
        progress = plan_progress(study=study)
        with tqdm(total=progress["total"], unit="unit", desc="precompute") as bar:
            while progress["state"] == "running":
                if timeout is not None and time.monotonic() - start > timeout:
                    raise CommandError(
                        f"still running after {timeout} s; the workers go on, rerun with --wait"
                    )
                time.sleep(1)
                progress = plan_progress(study=study)
                bar.total = progress["total"]
                bar.set_postfix_str(training_summary(progress), refresh=False)  # models' steps, time left
                bar.update(progress["finished"] - bar.n)
        for row in progress["conditions"]:
            self.stdout.write(
                f"{row['method']:>10} / {row['setup']:<8} stimuli {row['stimuli']}/{row['need']}  "
                f"replaced {row['replaced']}  failed {row['failed']}"
            )
        study.refresh_from_db()
        self.stdout.write(f"State: {progress['state']}; study is {study.status}.")
        if progress["failures"]:
            raise CommandError(
                f"{len(progress['failures'])} work units failed; see the progress page to retry"
            )
