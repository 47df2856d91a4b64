"""Every file the system writes is private from its first byte: directories 0700, files 0600,
whatever the umask (docs/operations.md, "Files and their modes")."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from core.config import Settings
from core.db import make_engine
from core.files import append_private, private_dir, private_file, private_sqlite
from core.locks import single_runner
from core.providers.outbox import OutboxProvider
from tests.fakes.fixtures import make_email


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """The worst case: a umask that lets everyone read everything."""
    old = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(old)


def test_directories_are_made_0700_with_their_missing_parents(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "a" / "b")
    assert mode(made) == 0o700 and mode(tmp_path / "a") == 0o700


def test_existing_directories_are_never_changed(tmp_path: Path) -> None:
    # A misconfigured CAPSULE_VAR_DIR (/etc, run as root) must not rewrite system modes.
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)

    private_dir(shared)
    private_sqlite(shared / "capsule.db")
    append_private(shared / "keys", "k1:secret\n")

    assert mode(shared) == 0o755
    assert mode(shared / "capsule.db") == 0o600 and mode(shared / "keys") == 0o600


def test_a_database_path_pointing_at_some_other_file_leaves_it_alone(tmp_path: Path) -> None:
    other = tmp_path / "passwd"
    other.write_text("root:x:0:0:root:/root:/bin/bash\n")
    os.chmod(other, 0o644)
    private_sqlite(other)
    assert mode(other) == 0o644


def test_only_regular_files_are_tightened(tmp_path: Path) -> None:
    fifo = tmp_path / "capsule.db-wal"
    os.mkfifo(fifo, 0o644)
    private_sqlite(tmp_path / "capsule.db")  # tightens an old -wal, but only a regular file
    assert mode(fifo) == 0o644


def test_appended_secrets_are_0600_even_if_they_could_never_be_tightened_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Created with its final mode, not chmod-ed after the write: with chmod unavailable the
    # file is still private (a write-then-chmod would leave it 0666 here).
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("chmod after the fact")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse)
    path = append_private(tmp_path / "var" / "keys", "k1:secret\n")

    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert path.read_text() == "k1:secret\n"


def test_a_world_readable_file_from_an_older_version_is_tightened(tmp_path: Path) -> None:
    old = tmp_path / "keys"
    old.write_text("k1:secret\n")
    os.chmod(old, 0o644)

    append_private(old, "k2:secret\n")
    assert mode(old) == 0o600 and old.read_text().count("secret") == 2

    other = tmp_path / "capsule.db"
    other.write_bytes(b"")
    os.chmod(other, 0o664)
    private_file(other)
    assert mode(other) == 0o600

    database = tmp_path / "old.db"
    database.write_bytes(b"SQLite format 3\x00" + bytes(84))
    wal = tmp_path / "old.db-wal"
    wal.write_bytes(b"")
    os.chmod(database, 0o644)
    os.chmod(wal, 0o644)
    private_sqlite(database)
    assert mode(database) == 0o600 and mode(wal) == 0o600


def test_the_sqlite_database_and_its_wal_and_shm_are_0600_in_a_0700_var(tmp_path: Path) -> None:
    var = tmp_path / "var"
    engine = make_engine(Settings(var_dir=str(var)))
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
        with engine.connect() as conn:  # WAL mode: -wal and -shm exist while it is open
            conn.execute(text("SELECT * FROM t")).all()
            files = {p.name: mode(p) for p in var.iterdir()}
    finally:
        engine.dispose()

    assert mode(var) == 0o700
    assert files == {"capsule.db": 0o600, "capsule.db-wal": 0o600, "capsule.db-shm": 0o600}


def test_the_sqlite_queue_file_is_0600(tmp_path: Path) -> None:
    from tasks.queue import make_huey

    var = tmp_path / "var"
    queue = make_huey(Settings(var_dir=str(var)))
    queue.storage.initialize_schema()
    queue.storage.enqueue(b"payload")

    files = {p.name: mode(p) for p in var.iterdir()}
    assert mode(var) == 0o700 and "huey.db" in files
    assert set(files.values()) == {0o600}, files  # with its -wal/-shm, if any


def test_outbox_directory_and_letters_are_private(tmp_path: Path) -> None:
    outbox = tmp_path / "var" / "outbox"
    OutboxProvider(outbox).send(make_email())

    [letter] = list(outbox.glob("*.eml"))
    assert mode(outbox) == 0o700 and mode(outbox.parent) == 0o700 and mode(letter) == 0o600


def test_lock_files_are_private(tmp_path: Path) -> None:
    engine = make_engine(Settings(var_dir=str(tmp_path / "var")))
    try:
        with single_runner(engine, "backstop", tmp_path / "var" / "locks") as held:
            assert held
    finally:
        engine.dispose()
    assert mode(tmp_path / "var" / "locks") == 0o700
    assert mode(tmp_path / "var" / "locks" / "backstop.lock") == 0o600
