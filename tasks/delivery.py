"""The ETA task that delivers one letter. It carries only the delivery id; the row decides."""

from __future__ import annotations

import uuid

from huey.api import Task

from core.logs import delivery_context
from core.worker import run_delivery
from huey_app import huey
from tasks.runtime import get_app


@huey.task(name="capsule.deliver", context=True)
def deliver(delivery_id: str, task: Task | None = None) -> None:
    assert task is not None
    with delivery_context(delivery_id, task.id):
        run_delivery(get_app(), uuid.UUID(delivery_id), task.id)
