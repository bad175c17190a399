"""Celery tasks of the explain app: thin wrappers that take ids and call one service.

Services send these by name (``explain.tasks.<name>``), so nothing imports this module but the worker.
"""

from celery import shared_task

from .precompute import work_units_run as run_units
from .services import job_execute


@shared_task(name="explain.tasks.job_run")
def job_run(job_id: int) -> None:
    job_execute(job_id=job_id)


@shared_task(name="explain.tasks.work_units_run")
def work_units_run(unit_ids: list[int]) -> None:
    """Precompute work units (one, or a batch where the method batches); see ``explain.precompute``."""
    run_units(unit_ids=unit_ids)
