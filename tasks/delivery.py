"""The ETA task that delivers one letter, the enqueuer that is the only code putting it in a
queue, and the process's App built around that enqueuer.

They share one module because each needs the other: the task runs the App, and the App's
enqueuer builds the task. The task cannot move to another module: Huey finds a queued task by
its module and name (`tasks.delivery.capsule.deliver`), so a move would drop every letter
already waiting in the broker. The task carries only the delivery id; the row decides.
"""

from __future__ import annotations

import functools
import uuid
from datetime import datetime

from huey import Huey, RedisHuey
from huey.api import Task
from huey.constants import EmptyData
from huey.exceptions import HueyException
from redis.exceptions import RedisError

from core.bootstrap import App, bootstrap
from core.config import Settings
from core.errors import EnqueueError
from core.logs import delivery_context
from core.worker import run_delivery
from tasks.queue import huey, prepare_broker, settings

MARKER_KEY = "capsule:broker-marker"


@huey.task(name="capsule.deliver", context=True)
def deliver(delivery_id: str, task: Task | None = None) -> None:
    assert task is not None
    with delivery_context(delivery_id, task.id):
        run_delivery(get_app(), uuid.UUID(delivery_id), task.id)


class HueyEnqueuer:
    """core.dispatch.Enqueuer over Huey: the only place the domain meets the broker."""

    def __init__(self, queue: Huey) -> None:
        self.queue = queue
        # A queue other than tasks.queue's (tests, tools) must know the task to serialize it;
        # consumers resolve it by the same registered name.
        registry = queue._registry
        if registry.task_to_string(deliver.task_class) not in registry._registry:
            registry.register(deliver.task_class)

    def enqueue(self, delivery_id: uuid.UUID, eta: datetime) -> str:
        task_id = uuid.uuid4().hex
        try:
            # Built through the task wrapper (its registered name) but put into *this* queue,
            # so an enqueuer can target any Huey instance (tests, tools), not only tasks.queue's.
            self.queue.enqueue(deliver.s(str(delivery_id), eta=eta, id=task_id))
        except (RedisError, HueyException, OSError) as exc:
            raise EnqueueError(delivery_id, str(exc)) from exc
        except Exception as exc:  # sqlite3 errors from SqliteHuey, pickling errors
            raise EnqueueError(delivery_id, f"{type(exc).__name__}: {exc}") from exc
        return task_id

    def revoke(self, task_id: str) -> None:
        # revoke_once: the flag is dropped when the task is checked, so flags do not pile up.
        self.queue.revoke_by_id(task_id, revoke_once=True)

    def ping(self) -> bool:
        try:
            if isinstance(self.queue, RedisHuey):
                return bool(self.queue.storage.conn.ping())
            self.queue.pending_count()
            return True
        except Exception:
            return False

    def has_marker(self) -> bool:
        return self.queue.storage.peek_data(MARKER_KEY) is not EmptyData

    def set_marker(self) -> None:
        self.queue.storage.put_data(MARKER_KEY, b"1")


def queue_enqueuer(queue: Huey, settings: Settings) -> HueyEnqueuer:
    """`queue`, its broker prepared (the embedded queue's file and tables), as an Enqueuer."""
    prepare_broker(queue, settings)
    return HueyEnqueuer(queue)


@functools.cache
def get_app() -> App:
    """The App of a consumer or CLI process, over the queue of tasks.queue."""
    return bootstrap(settings, queue_enqueuer(huey, settings))
