"""The queue: the single Huey instance, built from settings: RedisHuey when a Redis URL is set,
else SqliteHuey under var/ (the embedded default).

Task modules import `huey` from here and `huey_app` imports this module and every task module
(Huey's own layout: the instance in one module, tasks in others, one entry module importing
both), so no module imports another that imports it back. Importing this module reads the
environment but touches no file or socket (the SQLite queue's tables are made by
`prepare_broker`).
"""

from __future__ import annotations

from huey import Huey, RedisHuey, SqliteHuey
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


def prepare_broker(queue: Huey, settings: Settings) -> None:
    """Create the embedded queue's file and tables; nothing to do for Redis."""
    if isinstance(queue, SqliteHuey):
        private_dir(settings.var_path)
        queue.storage.initialize_schema()


settings = Settings.from_env()
huey = make_huey(settings)
