"""The single Huey instance, built from settings: RedisHuey when a Redis URL is set, else
SqliteHuey under var/ (the embedded default).

`huey_consumer huey_app.huey` imports this module; importing it reads the environment but
touches no file or socket (the SQLite queue's tables are made by `prepare_broker`).
"""

from __future__ import annotations

from typing import Any

from huey import Huey, RedisHuey, SqliteHuey
from huey.consumer_options import ConsumerConfig
from huey.storage import SqliteStorage
from redis import ConnectionPool

from core.config import Settings
from core.files import private_dir, private_sqlite


class PrivateSqliteStorage(SqliteStorage):
    """SqliteHuey's storage, whose file is created 0600 before SQLite first opens it."""

    def _create_connection(self):  # type: ignore[no-untyped-def]
        private_sqlite(self.filename)
        return super()._create_connection()


def make_huey(settings: Settings) -> Huey:
    if settings.redis_url:
        # Short connect timeout: scheduling must not hang when Redis is down (the row is
        # already committed; the dispatcher will enqueue it later).
        pool = ConnectionPool.from_url(
            settings.redis_url,
            socket_connect_timeout=2,
            socket_timeout=10,
            health_check_interval=30,
        )
        return RedisHuey(settings.huey_name, connection_pool=pool, results=False, utc=True)
    return SqliteHuey(
        settings.huey_name,
        filename=str(settings.huey_sqlite_path),
        results=False,
        utc=True,
        create_tables=False,
        timeout=15,
        storage_class=PrivateSqliteStorage,
    )


def prepare_broker(queue: Huey) -> None:
    """Create the embedded queue's file and tables; nothing to do for Redis."""
    if isinstance(queue, SqliteHuey):
        private_dir(settings.var_path)
        queue.storage.initialize_schema()


settings = Settings.from_env()
huey = make_huey(settings)


def _consumer_logging(config: ConsumerConfig, logger: Any = None) -> None:
    """`huey_consumer` calls this once, before the consumer starts: our logging (format and
    level from CAPSULE_LOG_FORMAT and CAPSULE_LOG_LEVEL; Huey's -v / -q set the default level) instead of Huey's own
    handler, so Huey's lines come out in the same format as ours."""
    from core.logs import configure_logging

    configure_logging(settings, default_level=config.loglevel)


ConsumerConfig.setup_logger = _consumer_logging  # type: ignore[method-assign]


@huey.on_startup(name="capsule.telemetry")
def start_telemetry() -> None:
    """Each worker calls this when the consumer starts; the first call does the work:
    Sentry (with its Huey integration) and, with CAPSULE_METRICS_PORT, the /metrics server."""
    from sentry_sdk.integrations.huey import HueyIntegration

    from core.metrics import serve_metrics
    from core.telemetry import init_sentry

    init_sentry(settings, component="consumer", integrations=[HueyIntegration()])
    if settings.metrics_port:
        serve_metrics(settings.metrics_port, settings.metrics_addr)


import tasks.bulk  # noqa: E402
import tasks.delivery  # noqa: E402  (registers the tasks with `huey`)
import tasks.periodic  # noqa: E402
import tasks.webhooks  # noqa: E402,F401
