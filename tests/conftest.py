"""Shared fixtures: databases (SQLite and a fresh PostgreSQL database per run), Redis (own db
number and key prefix), a keyring, a recording enqueuer, and the App wired from them.

Locally a missing PostgreSQL or Redis skips the tests that need it; under CI (CI=true) it fails.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text, update

from core.bootstrap import App, build_app
from core.config import Settings
from core.crypto import Keyring, generate_key_entry
from core.db import make_engine, session_scope
from core.errors import EnqueueError
from core.migrate import upgrade
from core.models import Base, Delivery

pytest_plugins = ["tests.fakes.fixtures"]

PG_ADMIN_URL = os.environ.get(
    "CAPSULE_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("CAPSULE_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("CAPSULE_TEST_REDIS_DB", "11"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
RUN_ID = uuid.uuid4().hex[:8]
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
KEY_ENTRY = generate_key_entry("test1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that wait minutes on real consumers or drive a browser go first. Under
    `pytest -n N --dist load` (make test) the first worker's opening run of tests holds them, so
    their waits overlap the rest of the suite instead of ending the run alone. (Dealt one per
    worker instead, three browsers starting at once on a starved machine each took over 30 s
    to show the sign-in form.)"""
    if not hasattr(config, "workerinput"):  # one process: the usual order
        return
    items.sort(key=lambda item: not any(item.get_closest_marker(m) for m in ("slow", "browser")))


def service_missing(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable: {exc}"
    if IN_CI:
        pytest.fail(message + " (CI requires it)", pytrace=False)
    pytest.skip(message)


class RecordingEnqueuer:
    """An Enqueuer that remembers what it was asked; can be told to fail like a dead broker."""

    def __init__(self) -> None:
        self.enqueued: list[tuple[uuid.UUID, datetime, str]] = []
        self.revoked: list[str] = []
        self.fail = False
        self.marker = False

    def enqueue(self, delivery_id: uuid.UUID, eta: datetime) -> str:
        if self.fail:
            raise EnqueueError(delivery_id, "connection refused (test)")
        task_id = uuid.uuid4().hex
        self.enqueued.append((delivery_id, eta, task_id))
        return task_id

    def revoke(self, task_id: str) -> None:
        if self.fail:
            raise ConnectionError("broker down (test)")
        self.revoked.append(task_id)

    def ping(self) -> bool:
        return not self.fail

    def has_marker(self) -> bool:
        return self.marker

    def set_marker(self) -> None:
        self.marker = True

    def ids_for(self, delivery_id: uuid.UUID) -> list[str]:
        return [t for d, _, t in self.enqueued if d == delivery_id]


# ---------------------------------------------------------------- databases


@contextmanager
def fresh_pg_database(name: str) -> Iterator[str]:
    """A new, empty PostgreSQL database `name` (its URL), dropped on exit. A PostgreSQL that
    does not answer skips the test (fails it under CI)."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        service_missing("PostgreSQL", exc)
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this run, migrated once, dropped at the end."""
    with fresh_pg_database(f"capsule_test_{RUN_ID}") as url:
        engine = create_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "capsule.db"
    engine = create_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


def truncate_all(engine: Engine) -> None:
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


def set_row(app: App, delivery_id: uuid.UUID, **values: object) -> None:
    """Write `values` straight into a delivery's row: what an earlier run, an older version or
    another process left there."""
    with session_scope(app.session_factory) as session:
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))
        session.commit()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(db_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if db_kind == "sqlite":
        path = tmp_path / "capsule.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("pg_database")
    engine = create_engine(url)
    truncate_all(engine)
    engine.dispose()
    return url


# ---------------------------------------------------------------- app


@pytest.fixture(scope="session")
def keyring() -> Keyring:
    return Keyring.parse(KEY_ENTRY)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(var_dir=str(tmp_path), database_url=database_url)


@pytest.fixture
def enqueuer() -> RecordingEnqueuer:
    return RecordingEnqueuer()


@pytest.fixture
def app(settings: Settings, enqueuer: RecordingEnqueuer, keyring: Keyring) -> Iterator[App]:
    engine = make_engine(settings)
    yield build_app(settings, enqueuer, engine=engine, keyring=keyring)
    engine.dispose()


# ---------------------------------------------------------------- redis


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix owned by this test in the test Redis db; only its keys are deleted."""
    import redis

    prefix = f"capsule_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"  # Huey keeps only [A-Za-z0-9_]
    client = redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}")
    try:
        client.ping()
    except Exception as exc:
        service_missing("Redis", exc)
    yield prefix
    for key in client.scan_iter(match=f"*{prefix}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def redis_url() -> str:
    return f"{REDIS_URL}/{REDIS_DB}"
