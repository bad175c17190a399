"""Time a first and a second `make demo` (the main job) from an empty database and empty data folders.

Each run is `manage.py demo --no-serve [--simulate N]` against a fresh PostgreSQL database and fresh media,
data and report folders in a temporary directory, so the first run imports, trains and precomputes everything
and the second reuses it. The virtual environment is not part of the timing (`make` builds it once; a second
`make` reuses it in seconds).

    .venv/bin/python -m bench.bench_demo                      # the full demo, 40 simulated raters
    .venv/bin/python -m bench.bench_demo --budget tiny --simulate 12
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def run(command: list[str], env: dict[str, str], log: Path) -> tuple[float, str]:
    start = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - start
    text = log.read_text()
    if done.returncode != 0:
        sys.exit(f"`{' '.join(command)}` failed with exit code {done.returncode}; its output is in {log}")
    return seconds, text


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--budget", default="full", choices=["full", "tiny"])
    parser.add_argument("--simulate", type=int, default=40)
    parser.add_argument("--keep", action="store_true", help="Keep the database and folders afterwards.")
    args = parser.parse_args()

    base = os.environ.get("FOIL_BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432")
    name = f"foil_bench_demo_{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="foil-bench-demo-"))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "DATABASE_URL": f"{base}/{name}",
        "CELERY_BROKER_URL": os.environ.get("FOIL_BENCH_BROKER", "redis://127.0.0.1:6379/14"),
        "DJANGO_MEDIA_ROOT": str(work / "media"),
        "FOIL_DATA_ROOT": str(work / "data"),
        "FOIL_REPORT_ROOT": str(work / "reports"),
        "PYTHONUNBUFFERED": "1",
    }
    port = free_port()
    command = [sys.executable, "manage.py", "demo", "--no-serve", "--budget", args.budget]
    command += ["--port", str(port)]
    rows = []
    try:
        first_s, first = run([*command, "--simulate", str(args.simulate)], env, work / "first.log")
        steps = re.findall(r"^\s+(.+?): done in ([\d.]+) s \(load average ([\d.]+)\)$", first, flags=re.M)
        rows.append(
            ("first run (import, shipped models, precompute, raters, report)", first_s, os.getloadavg()[0])
        )
        second_s, _ = run(command, env, work / "second.log")
        rows.append(("second run (reuses everything)", second_s, os.getloadavg()[0]))
    finally:
        if not args.keep:
            with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"`make demo` on {device()}, budget {args.budget}, {args.simulate} simulated raters")
    print(f"(logs in {work})")
    if args.keep:
        kept = f"DATABASE_URL={base}/{name} DJANGO_MEDIA_ROOT={work / 'media'} FOIL_DATA_ROOT={work / 'data'}"
        print(f"kept: {kept}")
    print(f"{'run':<64} {'seconds':>9} {'minutes':>8} {'load avg':>9}")
    for label, seconds, load in rows:
        print(f"{label:<64} {seconds:>9.1f} {seconds / 60:>8.1f} {load:>9.1f}")
    print(f"\nsteps of the first run ({os.cpu_count()} cores):")
    print(f"  {'step':<70} {'seconds':>9} {'load avg':>9}")
    for label, seconds, load in steps:
        print(f"  {label:<70} {float(seconds):>9.1f} {float(load):>9.1f}")


if __name__ == "__main__":
    main()
