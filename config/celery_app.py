"""The Celery application: configured from Django settings (``CELERY_*``), tasks found in the apps."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
# Idle OpenMP threads sleep instead of spinning (read once, when torch's OpenMP loads, so before any import
# of torch): a worker shares its cores with the web server and other jobs, and with spinning threads each of
# the cell search's many small parallel operations waits for a busy core (two threads fell to 1-4x the
# authors' code on a loaded 2-core machine, 9-19x with passive waiting: bench/bench_authors.py --omp-wait).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = Celery("foil")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
