"""The task that processes one stored provider webhook event. It carries only the row id; the
backstop processes any event whose task was lost."""

from __future__ import annotations

from core.policy import utcnow
from core.webhooks import process_and_notify
from tasks.delivery import get_app
from tasks.queue import huey


@huey.task(name="capsule.process_webhook")
def process_webhook(event_id: int) -> None:
    process_and_notify(get_app(), int(event_id), now=utcnow())
