"""Gunicorn hooks that measure each request inside the server, for bench/bench_rater_load.py.

The benchmark starts gunicorn with config/gunicorn.conf.py plus these hooks. For every request a worker thread
records the CPU time it spent (``time.thread_time``, from the parsed request to the last byte handed to
the socket), the SQL queries it ran and the bytes of the body, by kind of request; each worker writes its
totals to ``FOIL_BENCH_STATS_DIR`` as JSON when it exits. The load generator shares the cores; its CPU use
does not show up here.
"""

import json
import os
import re
import threading
import time
from collections import defaultdict

# The rater URLs (studies/urls.py); tests/studies/test_rater_queries.py checks them against ``reverse``.
KINDS = [
    ("consent", "POST", re.compile(r"^/s/\d+/$")),
    ("image", "GET", re.compile(r"^/s/r/[\w-]+/t/[0-9a-f-]+/img/\d+/$")),
    ("submit", "POST", re.compile(r"^/s/r/[\w-]+/t/[0-9a-f-]+/$")),
    ("page", "GET", re.compile(r"^/s/r/[\w-]+/$")),
]

_local = threading.local()
_lock = threading.Lock()
_totals: dict[str, dict[str, float]] = defaultdict(lambda: {"n": 0, "cpu_s": 0.0, "queries": 0, "bytes": 0})


def request_kind(method: str, path: str) -> str:
    """consent, image, submit, page (a trial page or other step of the rater's run) or other."""
    return next((kind for kind, m, pattern in KINDS if m == method and pattern.match(path)), "other")


def _count_query(execute, sql, params, many, context):
    _local.queries += 1
    return execute(sql, params, many, context)


def pre_request(worker, req) -> None:
    from django.db import connection

    _local.queries = 0
    _local.wrapper = connection.execute_wrapper(_count_query)
    _local.wrapper.__enter__()
    _local.cpu = time.thread_time()


def post_request(worker, req, environ, resp) -> None:
    cpu = time.thread_time() - _local.cpu
    _local.wrapper.__exit__(None, None, None)
    kind = request_kind(req.method, req.path)
    with _lock:
        totals = _totals[kind]
        totals["n"] += 1
        totals["cpu_s"] += cpu
        totals["queries"] += _local.queries
        totals["bytes"] += (resp.response_length or 0) if resp is not None else 0


def worker_exit(server, worker) -> None:
    folder = os.environ.get("FOIL_BENCH_STATS_DIR")
    if folder:
        with open(os.path.join(folder, f"worker-{os.getpid()}.json"), "w") as out:
            json.dump(dict(_totals), out)
