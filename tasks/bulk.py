"""The background runner of an ops bulk operation. It carries only the operation id."""

from __future__ import annotations

import time

from core.bulk import run_operation
from core.policy import utcnow
from tasks.delivery import get_app
from tasks.queue import huey


@huey.task(name="capsule.bulk_run")
def bulk_run(operation_id: int) -> None:
    run_operation(get_app(), operation_id, clock=utcnow, sleep=time.sleep)


def enqueue(operation_id: int) -> str:
    """Put the runner for `operation_id` in the queue now; returns the Huey task id."""
    task = bulk_run.s(operation_id)
    huey.enqueue(task)
    return str(task.id)
