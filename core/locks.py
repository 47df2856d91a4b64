"""One runner at a time for periodic work, across processes and machines.

PostgreSQL: a session-level advisory try-lock; the server drops it when the holder's
connection dies, so a SIGKILLed consumer cannot keep it. SQLite (one machine): an flock on a
file under var/, which the kernel drops when the process dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, func, select

from core.files import FILE_MODE, private_dir


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_lock."""
    return int.from_bytes(
        hashlib.sha256(f"capsule:{name}".encode()).digest()[:8], "big", signed=True
    )


@contextmanager
def single_runner(engine: Engine, name: str, lock_dir: Path) -> Iterator[bool]:
    """Yield True if this process holds the lock for `name`, False if another one does."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            key = lock_key(name)
            held = bool(conn.scalar(select(func.pg_try_advisory_lock(key))))
            conn.commit()
            try:
                yield held
            finally:
                if held:
                    conn.scalar(select(func.pg_advisory_unlock(key)))
                    conn.commit()
        return
    private_dir(lock_dir)
    with open(lock_dir / f"{name}.lock", "a", opener=_private_opener) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, FILE_MODE)
