"""gunicorn settings for the web process: `make demo`, the docker-compose web service, the README and
bench/bench_rater_load.py all serve with this file.

    gunicorn config.wsgi:application --config config/gunicorn.conf.py --bind 0.0.0.0:8000

Threaded workers (gthread), one process per CPU core and up to 32 threads each by default: a rater's request
spends part of its time waiting on PostgreSQL, and another thread of the same process serves another rater
meanwhile, while the processes use every core. Connections are kept alive between a rater's requests (a trial
page, its images, the answer), so a browser does not open a new TCP connection for each. Measured with
bench/bench_rater_load.py (README, "Rater load").

Environment: FOIL_WEB_WORKERS (processes, default one per CPU), FOIL_WEB_THREADS (threads per process,
default 32, fewer when many processes share PostgreSQL's connections), FOIL_WEB_TIMEOUT (seconds, default
60). The bind address comes from the command line.
"""

import os

worker_class = "gthread"
workers = int(os.environ.get("FOIL_WEB_WORKERS") or os.cpu_count() or 2)
# Threads: a consent waits its turn for the study's lock (balanced assignment), and while it waits it holds a
# thread; with 8 threads per process a crowd's consents took them all and the trial pages queued behind (p95
# 123 ms at 100 raters), with 32 they do not (p95 17 ms; README, "Rater load"). Every busy thread holds one
# PostgreSQL connection (CONN_MAX_AGE 0), so all processes together stay under 90 of PostgreSQL's default 100.
threads = int(os.environ.get("FOIL_WEB_THREADS") or max(2, min(32, 90 // workers)))
timeout = int(os.environ.get("FOIL_WEB_TIMEOUT", "60"))
# Seconds an idle connection stays open for the rater's next request (a rater looks at a trial for seconds).
keepalive = 10
# Connections waiting to be accepted when a crowd arrives at once.
backlog = 2048
accesslog = "-"
errorlog = "-"
forwarded_allow_ips = os.environ.get("FOIL_FORWARDED_ALLOW_IPS", "127.0.0.1")
# No runtime control socket (gunicornc): every server on a machine would share its default path.
control_socket_disable = True
