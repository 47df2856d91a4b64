"""The process-wide App for entry points that run next to the Huey instance."""

from __future__ import annotations

import functools
import uuid
from datetime import datetime

from huey import Huey, RedisHuey
from huey.constants import EmptyData
from huey.exceptions import HueyException
from redis import Redis
from redis.exceptions import RedisError

from core.bootstrap import App, build_app
from core.errors import EnqueueError

MARKER_KEY = "capsule:broker-marker"


class HueyEnqueuer:
    """core.dispatch.Enqueuer over Huey: the only place the domain meets the broker."""

    def __init__(self, queue: Huey) -> None:
        from tasks.delivery import deliver

        self.queue = queue
        # A queue other than huey_app's (tests, tools) must know the task to serialize it;
        # consumers resolve it by the same registered name.
        registry = queue._registry
        if registry.task_to_string(deliver.task_class) not in registry._registry:
            registry.register(deliver.task_class)

    def enqueue(self, delivery_id: uuid.UUID, eta: datetime) -> str:
        from tasks.delivery import deliver

        task_id = uuid.uuid4().hex
        try:
            # Built through the task wrapper (its registered name) but put into *this* queue,
            # so an enqueuer can target any Huey instance (tests, tools) and not only huey_app's.
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


@functools.cache
def get_app() -> App:
    import huey_app

    huey_app.prepare_broker(huey_app.huey)
    settings = huey_app.settings
    redis_client = (
        Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        if settings.redis_url
        else None
    )
    return build_app(settings, HueyEnqueuer(huey_app.huey), redis_client=redis_client)
