"""Engine settings that make database trouble quick and classifiable (audit scenarios 2, 14)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from core.config import Settings
from core.db import is_transient_db_error, make_engine, retry_db


def test_postgresql_engine_has_a_bounded_pool_pre_ping_and_timeouts(
    pg_database: str, tmp_path: Path
) -> None:
    settings = Settings(
        var_dir=str(tmp_path),
        database_url=pg_database,
        db_pool_size=3,
        db_max_overflow=2,
        db_pool_timeout=4,
        db_pool_recycle=600,
        db_statement_timeout_ms=1234,
    )
    engine = make_engine(settings)
    try:
        pool = engine.pool
        assert pool.size() == 3 and pool._max_overflow == 2 and pool._timeout == 4  # type: ignore[attr-defined]
        assert pool._recycle == 600 and pool._pre_ping  # type: ignore[attr-defined]
        with engine.connect() as conn:
            assert conn.scalar(text("SHOW statement_timeout")) == "1234ms"
            assert conn.scalar(text("SHOW application_name")) == "capsule"
            # A statement past the timeout fails fast instead of hanging a worker
            with pytest.raises(OperationalError) as caught:
                conn.execute(text("SELECT pg_sleep(3)"))
            assert is_transient_db_error(caught.value)
    finally:
        engine.dispose()


def test_unreachable_postgresql_fails_within_the_connect_timeout(tmp_path: Path) -> None:
    settings = Settings(
        var_dir=str(tmp_path),
        database_url="postgresql://postgres@127.0.0.1:1/none",
        db_connect_timeout=2,
    )
    engine = make_engine(settings)
    with pytest.raises(OperationalError) as caught, engine.connect():
        pass
    assert is_transient_db_error(caught.value)


def test_sqlite_engine_uses_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(Settings(var_dir=str(tmp_path), sqlite_busy_timeout_ms=4321))
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 4321
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()
    assert (tmp_path / "capsule.db").exists()


def test_retry_db_retries_transient_errors_with_backoff_and_gives_up() -> None:
    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return "ok"

    assert retry_db(flaky, sleep=sleeps.append) == "ok"
    assert sleeps == [0.25, 0.5]

    def down() -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    with pytest.raises(OperationalError):
        retry_db(down, attempts=3, sleep=sleeps.append)


def test_retry_db_does_not_retry_a_constraint_violation() -> None:
    calls = []

    def duplicate() -> None:
        calls.append(1)
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        retry_db(duplicate, sleep=lambda _: None)
    assert len(calls) == 1
