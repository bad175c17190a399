"""How far a model unit's training is, seen from outside the worker: steps done and total, written to the
unit's ``timings`` as the trainer reports them, through a connection of its own (the trainer runs inside a
transaction whose writes nobody sees before it commits)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime

from django.db import connections
from django.utils import timezone

from explain.models import WorkUnit


def unit_training_progress(
    *, unit_id: int, every_s: float = 2.0
) -> tuple[Callable[[int, int], None], Callable]:
    """A ``progress(done, total)`` callback for a trainer that records the steps of unit ``unit_id`` at most
    every ``every_s`` seconds (and always the first and the last step), and a function that closes its
    connection."""
    connection = connections.create_connection("default")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done not in (0, total) and now - last[0] < every_s:
            return
        last[0] = now
        steps = {"steps_done": int(done), "steps_total": int(total), "steps_at": timezone.now().isoformat()}
        table = WorkUnit._meta.db_table
        with connection.cursor() as cursor:  # a row locked elsewhere is skipped, never waited for
            cursor.execute(
                f"UPDATE {table} SET timings = timings || %s::jsonb "
                f"WHERE id = (SELECT id FROM {table} WHERE id = %s FOR UPDATE SKIP LOCKED)",
                [json.dumps(steps), unit_id],
            )

    return progress, connection.close


def training_time_left(unit: WorkUnit, now: datetime | None = None) -> dict | None:
    """Steps done, total, percent and seconds left (from the pace so far) of a running model unit; None when
    its trainer has reported nothing yet."""
    done, total = unit.timings.get("steps_done"), unit.timings.get("steps_total")
    if unit.status != WorkUnit.Status.RUNNING or not total or done is None or unit.started_at is None:
        return None
    elapsed = ((now or timezone.now()) - unit.started_at).total_seconds()
    left = elapsed / done * (total - done) if done else None
    return {"done": done, "total": total, "percent": round(100 * done / total), "eta_s": left}
