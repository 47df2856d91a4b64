"""Letters at rest: AES-256-GCM with a keyring.

Each letter records the id of the key that sealed it; the newest key seals new letters and
`rotate_letters` re-seals old ones in resumable batches. The associated data binds a ciphertext
to its letter id and field, so a subject cannot be swapped for another letter's or for a body.
A Keyring's repr never shows key material.
"""

from __future__ import annotations

import base64
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, select

from core.db import SessionFactory
from core.errors import ConfigError, CryptoError, DecryptionFailed, UnknownKeyId
from core.models import Letter

NONCE_BYTES = 12
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Sealed:
    key_id: str
    subject: bytes
    body: bytes


class Keyring:
    """Key id → 256-bit key; the last key added is the one that encrypts."""

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        self._keys: dict[str, AESGCM] = {}
        self._order: list[str] = []
        for key_id, key in keys:
            if not _KEY_ID.match(key_id):
                raise CryptoError(f"invalid key id {key_id!r}")
            if len(key) != 32:
                raise CryptoError(f"key {key_id!r} must be 32 bytes, got {len(key)}")
            if key_id in self._keys:
                raise CryptoError(f"key id {key_id!r} appears twice")
            self._keys[key_id] = AESGCM(key)
            self._order.append(key_id)
        if not self._order:
            raise CryptoError("the keyring is empty")

    def __repr__(self) -> str:
        return f"Keyring(ids={self._order!r})"

    @property
    def active_id(self) -> str:
        return self._order[-1]

    @property
    def ids(self) -> list[str]:
        return list(self._order)

    @classmethod
    def parse(cls, spec: str, *, variable: str = "CAPSULE_ENCRYPTION_KEYS") -> Keyring:
        """Read `id:base64key` entries separated by commas or newlines."""
        entries = []
        for raw in re.split(r"[,\n]", spec):
            item = raw.strip()
            if not item or item.startswith("#"):
                continue
            key_id, sep, encoded = item.partition(":")
            if not sep:
                raise ConfigError(variable, "each key must look like id:base64key")
            try:
                key = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise ConfigError(variable, f"key {key_id!r} is not valid base64") from None
            entries.append((key_id.strip(), key))
        try:
            return cls(entries)
        except CryptoError as exc:
            raise ConfigError(variable, str(exc)) from None

    def _aad(self, letter_id: uuid.UUID, field: str) -> bytes:
        return f"{letter_id}:{field}".encode()

    def encrypt(self, letter_id: uuid.UUID, field: str, plaintext: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        cipher = self._keys[self.active_id]
        return nonce + cipher.encrypt(nonce, plaintext.encode(), self._aad(letter_id, field))

    def decrypt(self, key_id: str, letter_id: uuid.UUID, field: str, blob: bytes) -> str:
        cipher = self._keys.get(key_id)
        if cipher is None:
            raise UnknownKeyId(key_id)
        nonce, ciphertext = blob[:NONCE_BYTES], blob[NONCE_BYTES:]
        try:
            return cipher.decrypt(nonce, ciphertext, self._aad(letter_id, field)).decode()
        except (InvalidTag, ValueError):
            raise DecryptionFailed(letter_id) from None

    def seal(self, letter_id: uuid.UUID, subject: str, body: str) -> Sealed:
        return Sealed(
            self.active_id,
            self.encrypt(letter_id, "subject", subject),
            self.encrypt(letter_id, "body", body),
        )

    def open(
        self, key_id: str, letter_id: uuid.UUID, subject: bytes, body: bytes
    ) -> tuple[str, str]:
        return (
            self.decrypt(key_id, letter_id, "subject", subject),
            self.decrypt(key_id, letter_id, "body", body),
        )


def generate_key_entry(key_id: str) -> str:
    """A new `id:base64key` line for the keyring."""
    if not _KEY_ID.match(key_id):
        raise CryptoError(f"invalid key id {key_id!r}")
    return f"{key_id}:{base64.b64encode(os.urandom(32)).decode()}"


def load_keyring(spec: str, keys_path: Path) -> Keyring:
    """The keyring from CAPSULE_ENCRYPTION_KEYS, or else from the embedded keys file."""
    if spec.strip():
        return Keyring.parse(spec)
    if not keys_path.exists():
        raise ConfigError(
            "CAPSULE_ENCRYPTION_KEYS",
            f"not set and {keys_path} does not exist: run `capsule keys generate`",
        )
    return Keyring.parse(keys_path.read_text(), variable=str(keys_path))


@dataclass(frozen=True)
class Skipped:
    """A letter rotation could not open: its id, its key id and why (never its text)."""

    letter_id: uuid.UUID
    key_id: str
    reason: str  # missing_key | decryption


@dataclass(frozen=True)
class Rotation:
    """What `rotate_letters` did: letters re-sealed, and those it left as they were."""

    rotated: int
    skipped: list[Skipped] = field(default_factory=list)


def letters_to_rotate(session_factory: SessionFactory, keyring: Keyring) -> int:
    """How many letters are not under the active key (what `rotate_letters` will walk)."""
    with session_factory() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Letter).where(Letter.key_id != keyring.active_id)
            )
            or 0
        )


def rotate_letters(
    session_factory: SessionFactory,
    keyring: Keyring,
    *,
    batch_size: int = 500,
    progress: Callable[[int, int], None] | None = None,
) -> Rotation:
    """Re-seal every letter not under the active key; commits per batch, so it can resume.

    A letter that cannot be opened (its key is not in the keyring, or its ciphertext fails
    authentication) is left untouched and reported; the rest are rotated all the same. The
    walk goes by letter id, so a skipped letter is met once per call, never again and again.
    `progress(rotated, skipped)` is called after each committed batch.
    """
    rotated = 0
    skipped: list[Skipped] = []
    after: uuid.UUID | None = None
    while True:
        with session_factory() as session:
            query = select(Letter).where(Letter.key_id != keyring.active_id)
            if after is not None:
                query = query.where(Letter.id > after)
            letters = session.scalars(query.order_by(Letter.id).limit(batch_size)).all()
            if not letters:
                return Rotation(rotated, skipped)
            for letter in letters:
                try:
                    subject, body = keyring.open(
                        letter.key_id, letter.id, letter.subject_ciphertext, letter.body_ciphertext
                    )
                except UnknownKeyId:
                    skipped.append(Skipped(letter.id, letter.key_id, "missing_key"))
                    continue
                except DecryptionFailed:
                    skipped.append(Skipped(letter.id, letter.key_id, "decryption"))
                    continue
                sealed = keyring.seal(letter.id, subject, body)
                letter.key_id = sealed.key_id
                letter.subject_ciphertext = sealed.subject
                letter.body_ciphertext = sealed.body
                rotated += 1
            after = letters[-1].id
            session.commit()
        if progress is not None:
            progress(rotated, len(skipped))
