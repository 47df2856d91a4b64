"""Files the system writes are private from their first byte: directories 0700, files 0600.

The databases, the queue, the keys file and the outbox hold letters or the keys to them. A file
created with the default umask and tightened afterwards is world-readable in between, so each
is created with its final mode (`os.open` / `mkdir` with a mode); SQLite gives its `-wal` and
`-shm` files the mode of the database file, so pre-creating that one covers them.

A file or directory made by an older version is tightened when the current user owns it.
Directories the operator already had (a configured outbox elsewhere, say) keep their mode;
only those we create, and the var directory itself, are made private.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
_GROUP_OTHER = 0o077
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def private_dir(path: Path | str, *, tighten: bool = False) -> Path:
    """Create `path` and its missing parents as 0700; `tighten`: also an existing `path`."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        # Another process may make it first; it is tightened below if asked.
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=DIR_MODE)
    if tighten or missing:
        _tighten(path)
    return path


def private_file(path: Path | str) -> Path:
    """Make sure `path` exists as a 0600 file before anything else (SQLite) opens it."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        _tighten_fd(fd)
    finally:
        os.close(fd)
    return path


def private_sqlite(path: Path | str) -> Path:
    """The SQLite database file private before its first connection, with its companions."""
    path = private_file(path)
    for suffix in SQLITE_COMPANIONS:
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            _tighten(companion)
    return path


def append_private(path: Path | str, text: str) -> Path:
    """Append `text` to a file that is created 0600 (never readable by others, not even for
    an instant) in a 0700 directory if missing."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        _tighten_fd(handle.fileno())
        handle.write(text)
    return path


def _tighten(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if _should_tighten(st):
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~_GROUP_OTHER)


def _tighten_fd(fd: int) -> None:
    st = os.fstat(fd)
    if _should_tighten(st):
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~_GROUP_OTHER)


def _should_tighten(st: os.stat_result) -> bool:
    # Never a shared directory such as /tmp (sticky bit), never someone else's file.
    return (
        bool(st.st_mode & _GROUP_OTHER)
        and not st.st_mode & stat.S_ISVTX
        and st.st_uid == os.geteuid()
    )
