"""Console operators: who they are, what their role allows, and how a password is checked.

    viewer  <  support  <  ops
    reads      + triage     + bulk operations
               (requeue, cancel, notify one by one)

Roles are enforced by the service functions (`core.triage`, `core.bulk`) through `require`, not
only by hiding buttons. Local accounts keep a salted scrypt hash (never the password) in the
console's secrets file; `verify_password` compares in constant time.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import PermissionDenied, ValidationError


class Role(enum.StrEnum):
    VIEWER = "viewer"
    SUPPORT = "support"
    OPS = "ops"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """True when this role is `needed` or above it."""
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 0, Role.SUPPORT: 1, Role.OPS: 2}


@dataclass(frozen=True)
class Operator:
    """A signed-in console user. `identity` is what audit events record as the actor."""

    identity: str
    role: Role
    name: str = ""
    source: str = "local"  # local | oidc | demo

    @property
    def label(self) -> str:
        return self.name or self.identity

    def can(self, needed: Role) -> bool:
        return self.role.allows(needed)


DEMO_OPERATOR = Operator(identity="demo", role=Role.OPS, name="Demo operator", source="demo")


def parse_role(value: str) -> Role:
    """The role named by `value` (case-insensitive); ValidationError for anything else."""
    try:
        return Role(str(value).strip().lower())
    except ValueError:
        names = ", ".join(r.value for r in Role)
        raise ValidationError("role", f"unknown role {value!r}: expected one of {names}") from None


def require(operator: Operator, needed: Role, action: str) -> None:
    """Raise PermissionDenied unless the operator's role is `needed` or above."""
    if not operator.can(needed):
        raise PermissionDenied(operator.identity, action)


# ---------------------------------------------------------------- passwords

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
MIN_PASSWORD_CHARS = 10


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=_KEY_BYTES, maxmem=256 * 1024 * 1024
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash` with a fresh random salt per call."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValidationError(
            "password", f"the password must have at least {MIN_PASSWORD_CHARS} characters"
        )
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of `password` against a `hash_password` string; False if malformed."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        actual = _scrypt(password, salt, int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# Checked when the username is unknown, so a wrong name costs the same time as a wrong password.
_DUMMY_HASH = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(b'0' * 16)}${_b64(b'0' * 32)}"


def authenticate(
    accounts: Mapping[str, Mapping[str, Any]], username: str, password: str
) -> Operator | None:
    """The local operator `username` if `password` matches its stored hash, else None.

    `accounts` is the `[operators]` table of the console's secrets:
    `{username: {"password_hash": ..., "role": ..., "name": ...}}`.
    """
    entry = accounts.get(username.strip()) if username else None
    stored = str(entry.get("password_hash", "")) if entry else ""
    ok = verify_password(password, stored or _DUMMY_HASH)
    if not (entry and stored and ok):
        return None
    try:
        role = parse_role(str(entry.get("role", "")))
    except ValidationError:
        return None
    return Operator(
        identity=username.strip(), role=role, name=str(entry.get("name", "")), source="local"
    )


def operator_for_email(
    roles: Mapping[str, Any], email: str | None, name: str = ""
) -> Operator | None:
    """The OIDC user's operator from the `[roles]` table (email → role); None if not listed."""
    if not email:
        return None
    wanted = email.strip().lower()
    for listed, role in roles.items():
        if str(listed).strip().lower() == wanted:
            try:
                return Operator(
                    identity=wanted, role=parse_role(str(role)), name=name, source="oidc"
                )
            except ValidationError:
                return None
    return None


_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def validate_username(username: str) -> str:
    name = username.strip()
    if not _USERNAME.match(name):
        raise ValidationError(
            "username", f"{username!r} is not a valid username (letters, digits, . _ @ + -)"
        )
    return name


def secrets_entry(username: str, role: Role, password_hash: str, name: str = "") -> str:
    """The TOML table for one local operator, to paste into .streamlit/secrets.toml."""
    key = username if _BARE_KEY.match(username) else json.dumps(username)
    lines = [
        f"[operators.{key}]",
        f"role = {json.dumps(role.value)}",
        f"password_hash = {json.dumps(password_hash)}",
    ]
    if name:
        lines.append(f"name = {json.dumps(name)}")
    return "\n".join(lines) + "\n"
