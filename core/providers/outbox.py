"""The file outbox of the embedded default: one `.eml` file per idempotency key.

A file is written whole under a temporary name and renamed into place, so a reader never sees
half a message; a key whose file exists is already sent, so a retry writes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from core.errors import ProviderError, TransientProviderError
from core.files import private_dir
from core.providers.base import Accepted, BatchResult, Email
from core.providers.http import short
from core.providers.smtp import message_bytes, message_id_for

log = logging.getLogger(__name__)

NAME = "outbox"
BATCH_LIMIT = 500
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


class OutboxProvider:
    """Writes each message to `{directory}/{idempotency_key}.eml`."""

    name = NAME
    can_look_up = True
    batch_limit = BATCH_LIMIT
    replays_batches = False
    lookup_lags = False

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def path_for(self, idempotency_key: str) -> Path:
        """Where this key's message lives; keys unsafe as file names are hashed."""
        if _SAFE_KEY.fullmatch(idempotency_key):
            stem = idempotency_key
        else:
            stem = "sha256-" + hashlib.sha256(idempotency_key.encode()).hexdigest()
        return self.directory / f"{stem}.eml"

    def send(self, email: Email) -> Accepted:
        """Write the message once; a second call with the same key changes nothing."""
        path = self.path_for(email.idempotency_key)
        try:
            if not path.exists():
                data = message_bytes(email, NAME)  # MessageBuildError: permanent, nothing written
                private_dir(self.directory)  # letters: 0700; mkstemp makes each file 0600
                _write_atomically(path, data)
        except OSError as exc:
            # Nothing was written, so the letter is retried; but a directory that cannot be
            # written is a deployment fault that retries will not cure: report it as an error.
            log.error("outbox %s cannot be written", self.directory, exc_info=True)
            raise _translate(exc) from exc
        return self._accepted(email)

    def batch_body(self, emails: Sequence[Email]) -> bytes:
        """The files a batch writes stand for its request."""
        return "\n".join(self.path_for(e.idempotency_key).name for e in emails).encode()

    def send_batch(self, emails: Sequence[Email], key: str) -> BatchResult:
        """Many files: each message written once, each with its own answer."""
        results: BatchResult = []
        for email in emails:
            try:
                results.append(self.send(email))
            except ProviderError as exc:
                results.append(exc)
        return results

    def find_sent(self, email: Email) -> Accepted | None:
        """The message if its file exists."""
        return self._accepted(email) if self.path_for(email.idempotency_key).exists() else None

    def _accepted(self, email: Email) -> Accepted:
        return Accepted(NAME, message_id_for(email.idempotency_key))


def _write_atomically(path: Path, data: bytes) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _translate(exc: OSError) -> ProviderError:
    """A full disk or a missing permission: nothing was written, so try later or elsewhere."""
    return TransientProviderError(
        NAME, short(f"{type(exc).__name__}: {exc}"), error_code=type(exc).__name__
    )
