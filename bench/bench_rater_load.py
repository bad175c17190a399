"""Load benchmark: many simulated raters at once over HTTP against gunicorn and PostgreSQL on loopback.

Each rater is a studies.http_rater.HttpRater: it walks the real pages (consent, instructions, every trial with
its images, the debrief) as a browser without JavaScript would, thinking a little before each answer. Prints
latency of the consent (which creates the rater's assignment), the trial page, the answer submission and the
image, beside what each kind of request costs inside the server (CPU per request, SQL queries per request,
bytes; bench/server_stats.py) and the machine's load average (other work on the same cores slows it down),
then checks the database: every answer a rater got an acknowledgement for is stored exactly once (lost and
duplicated must both be 0).

The server runs as in production: gunicorn with config/gunicorn.conf.py, the file docker-compose's web service
and `make demo` use (flags here override it, to compare other settings).

    .venv/bin/python bench/bench_rater_load.py                 # 100 raters
    .venv/bin/python bench/bench_rater_load.py --raters 300    # a larger crowd at once
    .venv/bin/python bench/bench_rater_load.py --worker-class sync --workers 4  # another server setting

It uses its own database (<DATABASE_URL's name>_bench, created and dropped) and a throwaway media directory.
"""

import argparse
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GUNICORN_CONFIG = "config/gunicorn.conf.py"


def bench_database_url() -> str:
    url = urlparse(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/foil"))
    return urlunparse(url._replace(path=url.path.rstrip("/") + "_bench"))


def recreate_database(url: str) -> None:
    import psycopg

    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    admin = urlunparse(parsed._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(url: str) -> None:
    import psycopg

    parsed = urlparse(url)
    with psycopg.connect(urlunparse(parsed._replace(path="/postgres")), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parsed.path.lstrip("/")}" WITH (FORCE)')


def _png(rng: random.Random, size: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3))).save(out, format="PNG")
    return out.getvalue()


def build_study(n_pairs: int, n_images: int, n_learning: int, image_size: int) -> int:
    """A live study with two conditions and real PNG stimuli; returns its id."""
    from django.core.files.base import ContentFile

    from explain.models import Classifier, ClassLabel, Dataset, Explanation, ExplanationDistractor, Image
    from studies.models import ClassPair, Condition, Study

    rng = random.Random(0)
    dataset = Dataset.objects.create(name="bench", kind=Dataset.Kind.IMAGE_FOLDER, root_path="/bench")
    classifier = Classifier.objects.create(
        dataset=dataset,
        name="bench",
        architecture="small_cnn",
        checkpoint_path="/x",
        split_point="f",
        input_size=28,
    )
    study = Study.objects.create(
        title="load bench",
        dataset=dataset,
        classifier=classifier,
        n_prelearning=n_images,
        n_test=n_images,
        n_learning=n_learning,
        min_learning_seconds=0.5,
        min_rt_ms=0,
    )
    conditions = [
        Condition.objects.create(study=study, method="cve", setup=s) for s in Condition.Setup.values
    ]
    labels = [
        ClassLabel.objects.create(dataset=dataset, index=i, name=f"class {i}") for i in range(2 * n_pairs)
    ]

    def image(label, split, n):
        return Image.objects.create(
            dataset=dataset,
            class_label=label,
            source_id=f"{label.index}-{split}-{n}",
            split=split,
            file=ContentFile(_png(rng, image_size), name="i.png"),
        )

    for label in labels:
        for n in range(n_images):
            image(label, "test", n)
    for p in range(n_pairs):
        pair = ClassPair.objects.create(study=study, class_a=labels[2 * p], class_b=labels[2 * p + 1])
        for condition in conditions:
            for n in range(n_learning):
                e = Explanation.objects.create(
                    study=study,
                    pair=pair,
                    condition=condition,
                    key=f"{pair.pk}-{condition.pk}-{n}",
                    query_image=image(pair.class_a, "train", f"{condition.pk}-{n}"),
                    flipped=True,
                    masks=ContentFile(b"m", name="m.npz"),
                    query_stimulus=ContentFile(_png(rng, image_size), name="q.png"),
                    distractor_stimulus=ContentFile(_png(rng, image_size), name="d.png"),
                    config={"method": "cve"},
                )
                ExplanationDistractor.objects.create(
                    explanation=e, image=image(pair.class_b, "train", f"{condition.pk}-{n}"), rank=0
                )
    study.status = Study.Status.LIVE
    study.save(update_fields=["status"])
    return study.pk


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"gunicorn did not answer on 127.0.0.1:{port} within {timeout} s")


def server_config(overrides: dict) -> dict:
    """config/gunicorn.conf.py's settings with the command line's overrides."""
    settings: dict = {}
    exec(compile((ROOT / GUNICORN_CONFIG).read_text(), GUNICORN_CONFIG, "exec"), settings)
    return {k: settings.get(k) for k in ("worker_class", "workers", "threads", "keepalive")} | {
        k: v for k, v in overrides.items() if v is not None
    }


def process_cpu_seconds(root_pid: int) -> float:
    """User + system CPU time of a process and its children (gunicorn's master and workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def server_stats(folder: str) -> dict[str, dict[str, float]]:
    """The per-kind totals every gunicorn worker wrote when it exited (bench/server_stats.py), summed."""
    totals: dict[str, dict[str, float]] = {}
    for path in Path(folder).glob("worker-*.json"):
        for kind, values in json.loads(path.read_text()).items():
            into = totals.setdefault(kind, dict.fromkeys(values, 0))
            for key, value in values.items():
                into[key] += value
    return totals


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--raters", type=int, default=100, help="simulated raters, all at once (default 100)")
    parser.add_argument(
        "--workers", type=int, help=f"gunicorn worker processes (default: {GUNICORN_CONFIG}'s)"
    )
    parser.add_argument("--threads", type=int, help=f"threads per worker (default: {GUNICORN_CONFIG}'s)")
    parser.add_argument("--worker-class", help=f"gunicorn worker class (default: {GUNICORN_CONFIG}'s)")
    parser.add_argument("--port", type=int, default=8105)
    parser.add_argument("--pairs", type=int, default=2, help="class pairs per rater (default 2)")
    parser.add_argument(
        "--images", type=int, default=4, help="pre-learning = test images per pair (default 4)"
    )
    parser.add_argument("--learning", type=int, default=2, help="learning stimuli per pair (default 2)")
    parser.add_argument("--image-size", type=int, default=64, help="stimulus side in pixels (default 64)")
    parser.add_argument(
        "--think", type=float, nargs=2, default=(1.5, 3.5), metavar=("MIN", "MAX"),
        help="seconds a rater looks at a trial before answering, uniform in [MIN, MAX] (default 1.5 3.5)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=30.0,
        help="seconds a rater waits for an answer before giving up, an error (default 30)",
    )  # fmt: skip
    args = parser.parse_args()

    db_url = bench_database_url()
    media = tempfile.mkdtemp(prefix="foil-bench-media-")
    stats_dir = tempfile.mkdtemp(prefix="foil-bench-stats-")
    hooks = Path(stats_dir) / "gunicorn.conf.py"
    hooks.write_text(
        f"exec(compile(open({str(ROOT / GUNICORN_CONFIG)!r}).read(), {GUNICORN_CONFIG!r}, 'exec'))\n"
        "from bench.server_stats import post_request, pre_request, worker_exit  # noqa: F401\n"
    )
    server = server_config(
        {"workers": args.workers, "threads": args.threads, "worker_class": args.worker_class}
    )
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DJANGO_DEBUG": "0",
        "DJANGO_MEDIA_ROOT": media,
        "DJANGO_LOG_LEVEL": "WARNING",
        "FOIL_BENCH_STATS_DIR": stats_dir,
    }
    os.environ.update({k: env[k] for k in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "DJANGO_MEDIA_ROOT")})
    print(f"database {db_url} (recreated), media {media}")
    recreate_database(db_url)
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)

    import django

    django.setup()
    study_id = build_study(args.pairs, args.images, args.learning, args.image_size)
    from django.db import connection

    connection.close()

    gunicorn = subprocess.Popen(
        [
            str(Path(python).with_name("gunicorn")),
            "config.wsgi:application",
            "--config", str(hooks),
            "--bind", f"127.0.0.1:{args.port}",
            "--workers", str(server["workers"]),
            "--threads", str(server["threads"]),
            "--worker-class", server["worker_class"],
            "--log-level", "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,  # the access log (written, as in production, but not shown)
    )  # fmt: skip
    try:
        wait_for_port(args.port)
        import requests

        for _ in range(4 * server["workers"]):  # every worker has loaded Django and opened its connection
            requests.get(f"http://127.0.0.1:{args.port}/s/{study_id}/", timeout=30)
        server_cpu_before, client_cpu_before = process_cpu_seconds(gunicorn.pid), time.process_time()
        results, errors, raters = {}, [], []
        from tqdm import tqdm

        from studies.http_rater import HttpRater

        base = f"http://127.0.0.1:{args.port}"
        bar = tqdm(total=args.raters, desc="raters done", unit="rater")
        start_line = threading.Barrier(args.raters)

        def one(i: int) -> None:
            rng = random.Random(i)
            rater = HttpRater(
                base,
                f"/s/{study_id}/",
                query={"PROLIFIC_PID": f"bench-{i}", "STUDY_ID": "bench", "SESSION_ID": f"s{i}"},
                policy=lambda page, images: rng.choice([v for n, v in page.form.buttons if n == "answer"]),
                think=lambda page: rng.uniform(*args.think),
                timeout=args.timeout,
            )
            raters.append(rater)
            try:
                start_line.wait()
                results[f"bench-{i}"] = rater.run()
            except Exception as error:  # reported in the table
                errors.append(f"rater {i}: {error}")
            finally:
                bar.update(1)

        load_before = os.getloadavg()[0]
        loads, running = [], threading.Event()

        def sample_load() -> None:  # the 1-minute load average every 5 s while the raters run
            while not running.wait(5.0):
                loads.append(os.getloadavg()[0])

        sampler = threading.Thread(target=sample_load, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.raters)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
        running.set()
        server_cpu = process_cpu_seconds(gunicorn.pid) - server_cpu_before
        client_cpu = time.process_time() - client_cpu_before
        bar.close()
    finally:
        gunicorn.terminate()
        gunicorn.wait(timeout=30)
    inside = server_stats(stats_dir)

    from django.db.models import Count

    from studies.models import Assignment, Response, Trial

    stored = {str(k): a for k, a in Response.objects.values_list("trial__key", "answer")}
    sent = {key: answer for r in results.values() for key, answer in r.answers.items()}
    lost = sum(1 for key, answer in sent.items() if stored.get(key) != answer)
    extra = sum(1 for key in stored if key not in sent)
    duplicated = Response.objects.values("trial").annotate(n=Count("pk")).filter(n__gt=1).count() + extra
    completed = Assignment.objects.filter(study_id=study_id, status="completed").count()
    n_trials = Trial.objects.filter(block__assignment__study_id=study_id).count()

    timings = [t for r in raters for t in r.timings]
    threads = f" x {server['threads']} threads" if server["worker_class"] == "gthread" else ""
    print()
    print(
        f"{args.raters} raters at once; gunicorn -c {GUNICORN_CONFIG}: {server['worker_class']}, "
        f"{server['workers']} workers{threads}, keep-alive {server['keepalive']} s; PostgreSQL on loopback; "
        f"think {args.think[0]}-{args.think[1]} s; rater timeout {args.timeout:g} s; {wall:.1f} s wall"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load_before:.1f} before, "
        f"{statistics.fmean(loads or [load_after]):.1f} on average during the run, {load_after:.1f} after "
        "(other work on the machine shares the CPUs)"
    )
    print(
        f"{'request':<20}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>7}"
        f"{'srv CPU ms':>11}{'queries':>8}{'bytes':>7}"
    )
    rows = [
        ("consent", "consent (POST)"),
        ("page", "trial page (GET)"),
        ("submit", "answer (POST)"),
        ("image", "image (GET)"),
    ]
    for kind, label in rows:
        ms = [s * 1000 for k, s, _ in timings if k == kind]
        bad = sum(1 for k, _, status in timings if k == kind and status >= 400)
        srv = inside.get(kind, {"n": 0})
        n = srv["n"] or float("nan")
        print(
            f"{label:<20}{len(ms):>6}{statistics.median(ms):>9.1f}{percentile(ms, 95):>9.1f}"
            f"{percentile(ms, 99):>9.1f}{max(ms):>9.1f}{bad:>7}"
            f"{1000 * srv.get('cpu_s', 0) / n:>11.2f}{srv.get('queries', 0) / n:>8.1f}"
            f"{srv.get('bytes', 0) / n:>7.0f}"
        )
    served = len(timings)
    print(
        f"CPU per request, all {served} requests: gunicorn processes {1000 * server_cpu / served:.2f} ms "
        "(srv CPU above plus HTTP parsing, connections, keep-alive), "
        f"load generator {1000 * client_cpu / served:.2f} ms"
    )
    print(f"raters completed: {completed} of {args.raters}; rater errors: {len(errors)}")
    print(f"responses: sent and acknowledged {len(sent)}, stored {len(stored)}, trials {n_trials}")
    print(f"lost responses: {lost}; duplicated responses: {duplicated}")
    for error in errors[:5]:
        print("  ", error)
    connection.close()
    drop_database(db_url)
    if lost or duplicated or errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
