"""Where a rater request's server CPU goes: each kind of request measured and profiled inside Django.

Builds the load benchmark's study (bench_rater_load.build_study) in its own database, then walks raters one
after another through it with Django's test client: the whole middleware stack, URL routing, views and
templates as gunicorn's worker calls them, without the HTTP parsing and sockets. For each kind of request
(consent, which creates the assignment; the trial page; the answer; an image) it prints the CPU per request
(this thread's CPU time; median and mean) and the queries per request of the raters after the first, then
where that CPU goes: a profile (cProfile with a CPU-time clock) of as many more raters, split by package, with
the functions that cost most.
The profiler itself slows Python calls down, so its shares matter more than its milliseconds.

    .venv/bin/python bench/profile_rater_requests.py              # 6 raters, 20 trials each
    .venv/bin/python bench/profile_rater_requests.py --raters 12 --top 15

It uses its own database (<DATABASE_URL's name>_profile, created and dropped) and a throwaway media directory.
"""

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_rater_load import build_study, drop_database, recreate_database  # noqa: E402

KINDS = [
    ("consent", "consent (POST, new assignment)"),
    ("page", "trial page (GET)"),
    ("submit", "answer (POST)"),
    ("image", "image (GET)"),
]
# Where a function's CPU is counted: the first pattern its file name contains.
PLACES = [
    ("SQL building (Django ORM)", ("django/db/models/",)),
    ("database driver (psycopg, Django's backend)", ("psycopg", "django/db/backends/", "django/db/utils")),
    ("templates", ("django/template/", "templatetags")),
    ("this project (studies/, config/)", ("/studies/", "/config/")),
    ("Django request/response, middleware, URLs", ("django/", "whitenoise", "django_htmx")),
]


def place(filename: str) -> str:
    if filename == "~" or filename.startswith("<"):
        return "Python built-ins (called from all of the above)"
    return next((name for name, parts in PLACES if any(p in filename for p in parts)), "other Python")


class Recorder:
    """Runs requests, recording CPU and queries per kind, and profiling the ones asked for."""

    def __init__(self) -> None:
        from django.db import connection

        self.connection = connection
        self.cpu: dict[str, list[float]] = {kind: [] for kind, _ in KINDS}
        self.queries: dict[str, list[int]] = {kind: [] for kind, _ in KINDS}
        self.profiles = {kind: cProfile.Profile(time.thread_time) for kind, _ in KINDS}
        self.profiled = dict.fromkeys(self.cpu, 0)
        self.profiling = False
        self._n = 0

    def _count(self, execute, sql, params, many, context):
        self._n += 1
        return execute(sql, params, many, context)

    def request(self, kind: str | None, call):
        """``call()`` (a test-client request), its streamed body read as gunicorn would."""

        def whole():
            response = call()
            if response.streaming:
                response.read_body = b"".join(response.streaming_content)
                response.close()
            return response

        if kind is None:
            return whole()
        self._n = 0
        with self.connection.execute_wrapper(self._count):
            if self.profiling:
                response = self.profiles[kind].runcall(whole)
                self.profiled[kind] += 1
            else:
                start = time.thread_time()
                response = whole()
                self.cpu[kind].append(time.thread_time() - start)
        self.queries[kind].append(self._n)
        return response


def walk(client, recorder: Recorder, study_id: int, name: str) -> int:
    """One rater from the study link to the completion code; returns the number of answers."""
    from studies.http_rater import parse_page

    def page_of(response):
        while response.status_code in (301, 302, 303):
            response = recorder.request("page", lambda r=response: client.get(r["Location"]))
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.content[:300]!r}")
        return parse_page(response.content.decode())

    query = {"PROLIFIC_PID": name, "STUDY_ID": "profile", "SESSION_ID": name}
    page = page_of(recorder.request(None, lambda: client.get(f"/s/{study_id}/", query)))
    form = page.form
    consent = recorder.request(
        "consent", lambda: client.post(form.action, {**form.fields, **form.checkboxes})
    )
    page = page_of(consent)
    form = page.form
    page = page_of(recorder.request(None, lambda: client.post(form.action, form.fields)))
    answers = 0
    while page.step == "trial":
        for src in page.images:
            image = recorder.request("image", lambda s=src: client.get(s))
            assert image.status_code == 200 and image.read_body, src
        data = {**page.form.fields, "answer": next(v for n, v in page.form.buttons if n == "answer")}
        if page.phase == "learning":
            time.sleep(0.5)  # the study's minimum viewing time
        page = page_of(recorder.request("submit", lambda a=page.form.action, d=data: client.post(a, d)))
        answers += 1
    if page.step != "done":
        raise RuntimeError(f"rater {name} ended on a {page.step!r} page: {page.text[:300]}")
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--raters", type=int, default=6, help="raters, one after another (default 6)")
    parser.add_argument("--top", type=int, default=10, help="functions listed per kind (default 10)")
    parser.add_argument("--dump", type=Path, help="also write each kind's profile to DUMP/<kind>.prof")
    args = parser.parse_args()
    if args.raters < 2:
        parser.error(f"--raters {args.raters}: needs 2 or more (the first warms up, the rest are profiled)")

    url = urlparse(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/foil"))
    db_url = urlunparse(url._replace(path=url.path.rstrip("/") + "_profile"))
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DJANGO_DEBUG": "0",
        "DJANGO_MEDIA_ROOT": tempfile.mkdtemp(prefix="foil-profile-media-"),
        "DJANGO_LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    recreate_database(db_url)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    import django

    django.setup()
    from django.db import connection
    from django.test import Client

    try:
        study_id = build_study(n_pairs=2, n_images=4, n_learning=2, image_size=64)
        recorder = Recorder()
        # Half the raters timed (after one to warm up), then half profiled; each a new browser.
        timed = [walk(Client(HTTP_HOST="localhost"), recorder, study_id, f"p{i}") for i in range(args.raters)]
        for kind in recorder.cpu:
            recorder.cpu[kind] = recorder.cpu[kind][len(recorder.cpu[kind]) // args.raters :]
        recorder.profiling = True
        for i in range(args.raters):
            walk(Client(HTTP_HOST="localhost"), recorder, study_id, f"q{i}")
    finally:
        connection.close()
        drop_database(db_url)

    print(
        f"\n{args.raters} + {args.raters} raters, {timed[0]} answers each, one after another (Django test "
        f"client, config.settings.base, PostgreSQL on loopback); machine: {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'request':<32}{'n':>5}{'CPU ms p50':>11}{'mean':>7}{'queries':>8}")
    for kind, label in KINDS:
        cpu = [1000 * s for s in recorder.cpu[kind]]
        queries = recorder.queries[kind]
        print(
            f"{label:<32}{len(cpu):>5}{statistics.median(cpu):>11.2f}{statistics.fmean(cpu):>7.2f}"
            f"{statistics.fmean(queries):>8.1f}"
        )
    for kind, label in KINDS:
        stats = pstats.Stats(recorder.profiles[kind])
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            stats.dump_stats(args.dump / f"{kind}.prof")
        n = recorder.profiled[kind]
        total = sum(tt for _, _, tt, _, _ in stats.stats.values())
        by_place: dict[str, float] = {}
        for (filename, _, _), (_, _, tt, _, _) in stats.stats.items():
            by_place[place(filename)] = by_place.get(place(filename), 0.0) + tt
        print(f"\n{label}: profiled {n} requests, {1000 * total / n:.2f} ms CPU each under the profiler")
        for name, tt in sorted(by_place.items(), key=lambda item: -item[1]):
            print(f"  {100 * tt / total:5.1f} %  {name}")
        print("  top functions (own CPU per request, ms; calls per request):")
        ranked = sorted(stats.stats.items(), key=lambda item: -item[1][2])[: args.top]
        for (filename, line, function), (_, calls, tt, _, _) in ranked:
            where = f"{Path(filename).parent.name}/{Path(filename).name}:{line}" if line else filename
            print(f"    {1000 * tt / n:6.3f}  {calls / n:6.1f}  {function}  ({where})")


if __name__ == "__main__":
    main()
