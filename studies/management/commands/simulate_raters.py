"""`manage.py simulate_raters STUDY --n N`: simulated learners through the real pages, over HTTP.

Each simulated rater is an ``HttpRater`` (the pages and POSTs a browser without JavaScript makes) whose
answers come from a ``SimulatedLearner``: it remembers the sharp region of each learning stimulus with its
label (the caption under it) and classifies test images by the nearest remembered region, with noise.
Raters are marked simulated (``Rater.is_simulated``) so that exports and reports say so.
"""

import random
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.http import HttpRequest
from tqdm import tqdm

from studies.http_rater import HttpRater, Page, RaterError
from studies.learner import SimulatedLearner
from studies.models import Study
from studies.selectors import study_by_ref
from studies.services import raters_mark_simulated
from studies.views import rater_opaque_id


def learner_policy(learner: SimulatedLearner, study: Study):
    """The answer a learner gives on a page: learn on learning pages, classify on the others."""
    sides = {study.label_a: "A", study.label_b: "B"}

    def policy(page: Page, images: list[bytes]) -> str:
        offered = [value for name, value in page.form.buttons if name == "answer"]
        learner.enter(page.phase)
        if page.phase == "learning":
            for png, caption in zip(images, page.captions, strict=True):
                if caption not in sides:
                    raise RaterError(
                        f"a learning stimulus is captioned {caption!r}, not one of {list(sides)}"
                    )
                learner.learn(png, sides[caption])
            return offered[0]
        return learner.classify(images[0], allow_dont_know="D" in offered)

    return policy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Command(BaseCommand):
    help = (
        "Send N simulated learners through a live study's real pages over HTTP; they learn from the stimuli."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("study", help="The study's id or exact title.")
        parser.add_argument("--n", type=int, required=True, help="How many simulated raters.")
        parser.add_argument(
            "--base-url",
            help="A running Foil site (e.g. http://127.0.0.1:8000); without it a server runs meanwhile.",
        )
        parser.add_argument("--noise", type=float, default=0.1, help="Probability of a random answer.")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--concurrency", type=int, default=8, help="Raters walking the site at once.")
        parser.add_argument(
            "--think-ms", type=int, default=400, help="Time each rater looks at a trial before answering."
        )

    def handle(self, *args, study: str, n: int, base_url: str | None, noise: float, seed: int, **options):
        if n < 1:
            raise CommandError(f"--n must be at least 1, got {n}")
        try:
            found = study_by_ref(study)
        except Study.DoesNotExist as exc:
            raise CommandError(str(exc)) from None
        if found.status != Study.Status.LIVE:
            raise CommandError(
                f"Study {found.title!r} is {found.status}; raters can only take a live study. Launch it "
                "(admin action 'Launch', after its explanations are precomputed)."
            )
        server = None
        if base_url is None:
            server, base_url = self._start_server()
        try:
            codes = self._run(found, n, base_url, noise, seed, options["concurrency"], options["think_ms"])
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=20)
        self.stdout.write(
            self.style.SUCCESS(
                f"{len(codes)} simulated raters completed study {found.title!r} (id {found.pk})."
            )
        )

    def _run(
        self, study: Study, n: int, base_url: str, noise: float, seed: int, concurrency: int, think_ms: int
    ) -> list[str]:
        def one(index: int) -> tuple[str, str]:
            rng = np.random.default_rng([seed, index])
            learner = SimulatedLearner(noise=noise, rng=rng)
            jitter = random.Random(f"{seed}-{index}")
            rater = HttpRater(
                base_url,
                f"/s/{study.pk}/",
                policy=learner_policy(learner, study),
                think=lambda page: think_ms / 1000 * (0.5 + jitter.random()),
            )
            result = rater.run()
            # The rater is known by the signed cookie the site set; read it back as the site does.
            request = HttpRequest()
            request.COOKIES = dict(rater.session.cookies.items())
            opaque_id = rater_opaque_id(request)
            if opaque_id is None:
                raise RaterError("the site set no valid rater cookie; cannot tell which rater this was")
            return result.code, str(opaque_id)

        codes, opaque_ids, errors = [], [], []
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = [pool.submit(one, i) for i in range(n)]
            for future in tqdm(as_completed(futures), total=n, desc="simulated raters", unit="rater"):
                try:
                    code, opaque_id = future.result()
                except (RaterError, OSError) as exc:
                    errors.append(str(exc))
                    continue
                codes.append(code)
                opaque_ids.append(opaque_id)
        raters_mark_simulated(opaque_ids=opaque_ids)
        if errors:
            raise CommandError(
                f"{len(errors)} of {n} simulated raters could not finish; the first said: {errors[0]}"
            )
        return codes

    def _start_server(self) -> tuple[subprocess.Popen, str]:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload", "--skip-checks"],
            cwd=settings.BASE_DIR,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise CommandError(f"the web server for the simulation exited with code {server.returncode}")
            try:
                with urllib.request.urlopen(f"{base_url}/admin/login/", timeout=2):
                    return server, base_url
            except OSError:
                time.sleep(0.3)
        server.terminate()
        raise CommandError(f"the web server for the simulation did not answer on {base_url} within 60 s")
