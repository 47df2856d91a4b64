"""Engines and sessions.

PostgreSQL gets a bounded pool with pre-ping, recycling and connect / statement timeouts, so a
throttled or restarting database yields quick, classifiable errors instead of hung workers
(audit scenarios 2 and 14). SQLite gets WAL, a busy timeout and foreign keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.files import private_sqlite

T = TypeVar("T")
SessionFactory = sessionmaker[Session]


def make_engine(settings: Settings, **overrides: Any) -> Engine:
    """Build the engine the settings describe."""
    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(settings, str(url), **overrides)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    options: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout,
        "pool_recycle": settings.db_pool_recycle,
        "pool_pre_ping": True,
        "connect_args": {
            "connect_timeout": settings.db_connect_timeout,
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
            "application_name": "capsule",
        },
    }
    options.update(overrides)
    return create_engine(url, **options)


def _sqlite_engine(settings: Settings, url: str, **overrides: Any) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        # Created 0600 (in a 0700 directory) before SQLite opens it; -wal/-shm follow its mode.
        private_sqlite(database)
    options: dict[str, Any] = {
        "connect_args": {
            "timeout": settings.sqlite_busy_timeout_ms / 1000,
            "check_same_thread": False,
        },
    }
    options.update(overrides)
    engine = create_engine(url, **options)
    busy_ms = settings.sqlite_busy_timeout_ms

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when a transaction starts: BEGIN IMMEDIATE makes
        # writers queue on the lock up front instead of failing to upgrade a read lock later.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: SessionFactory) -> Iterator[Session]:
    """A unit of work: rolls back unless the body called `session.commit()`."""
    session = factory()
    try:
        yield session
    finally:
        # close() rolls back whatever was not committed and detaches the loaded objects
        # without expiring them, so plain reads can hand rows out of the scope.
        session.close()


def is_transient_db_error(exc: BaseException) -> bool:
    """Connection loss, server restart, lock timeouts: worth another try shortly."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_db(
    fn: Callable[[], T],
    *,
    attempts: int = 4,
    base_delay: float = 0.25,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `fn`, retrying transient database errors with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except DBAPIError as exc:
            if attempt == attempts or not is_transient_db_error(exc):
                raise
            sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
