"""Background jobs: record one, send it to a worker (by task name), run it there with a progress counter."""

import socket
import traceback

from celery import current_app
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from explain.models import Job
from explain.services.job_kinds import JOB_KINDS

JOB_TASK = "explain.tasks.job_run"


def job_create(*, kind: str, params: dict, queue: str | None = None) -> Job:
    """Record a job and send it to a worker once the surrounding transaction commits."""
    if kind not in JOB_KINDS:
        raise ValidationError(f"Unknown job kind {kind!r}; known kinds: {', '.join(sorted(JOB_KINDS))}.")
    job = Job(kind=kind, params=params)
    job.full_clean()
    job.save()

    options = {"queue": queue} if queue else {}
    transaction.on_commit(lambda: current_app.send_task(JOB_TASK, args=[job.pk], **options))
    return job


def job_progress(*, job: Job, done: int, total: int) -> None:
    job.done, job.total = done, total
    job.save(update_fields=["done", "total"])


def job_execute(*, job_id: int) -> Job:
    """Run a job here. A job already done is left alone, so a redelivered task does nothing twice."""
    job = Job.objects.get(pk=job_id)
    if job.status == Job.Status.DONE:
        return job
    job.status, job.started_at, job.error = Job.Status.RUNNING, timezone.now(), ""
    job.worker = socket.gethostname()
    job.save(update_fields=["status", "started_at", "error", "worker"])
    try:
        result = JOB_KINDS[job.kind](job, lambda done, total: job_progress(job=job, done=done, total=total))
    except Exception as exc:
        job.status, job.finished_at = Job.Status.FAILED, timezone.now()
        job.error = f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"
        job.save(update_fields=["status", "finished_at", "error"])
        raise
    job.status, job.result, job.finished_at = Job.Status.DONE, result, timezone.now()
    job.save(update_fields=["status", "result", "finished_at"])
    return job
