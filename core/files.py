"""Files the system writes are private from their first byte: directories 0700, files 0600.

The databases, the queue, the keys file and the outbox hold letters or the keys to them. A file
created with the default umask and tightened afterwards is world-readable in between, so each
is created with its final mode (`os.open` / `mkdir` with a mode); SQLite gives its `-wal` and
`-shm` files the mode of the database file, so pre-creating that one covers them.

A database, queue or keys file made by an older version is tightened when it is a regular
file the current user owns. An existing directory is never changed: a misconfigured path
(`CAPSULE_VAR_DIR=/etc`, run as root) must not rewrite the modes of the system's directories;
the operator tightens an old `var/` once (docs/operations.md, "Files and their modes").
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
SQLITE_HEADER = b"SQLite format 3\x00"


def private_dir(path: Path | str) -> Path:
    """Create `path` and its missing parents as 0700; an existing directory is left as it is."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        # Another process may make it first: then it is theirs, made the same way.
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=DIR_MODE)
    return path


def private_file(path: Path | str, *, header: bytes | None = None) -> Path:
    """Make sure `path` exists as a 0600 file before anything else (SQLite) opens it; an
    existing one of ours is tightened, if it is empty or starts with `header` (when given)."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        start = os.read(fd, len(header)) if header else b""
        if not start or header is None or start == header:
            _tighten_fd(fd)
    finally:
        os.close(fd)
    return path


def private_sqlite(path: Path | str) -> Path:
    """The SQLite database file private before its first connection, with its companions.

    Only a file that is empty or a SQLite database is tightened: a database URL pointing at
    some other file by mistake must not change that file."""
    path = private_file(path, header=SQLITE_HEADER)
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
    # Only our own regular files: never a directory, a device, or someone else's file.
    return (
        stat.S_ISREG(st.st_mode) and bool(st.st_mode & _GROUP_OTHER) and st.st_uid == os.geteuid()
    )
