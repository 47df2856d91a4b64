"""Console operators: who they are, what their role allows, and how a password is checked.

    viewer  <  support  <  ops
    reads      + triage     + bulk operations
               (requeue, cancel, notify one by one)

Roles are enforced by the service functions (`core.triage`, `core.bulk`) through `require`, not
only by hiding buttons. Local accounts keep an Argon2id hash (never the password) in the
console's secrets file; older scrypt hashes still verify and are rehashed, into the database, at
the next successful sign-in (`sign_in`). Failed sign-ins are counted in the database per account
and per client address, so a lockout holds across browser sessions and console processes.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import hmac
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import argon2
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core import audit
from core.errors import PermissionDenied, ValidationError
from core.models import OperatorCredential, SignInAttempt


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

# Argon2id with argon2-cffi's defaults (RFC 9106's second recommendation: t=3, 64 MiB, p=4).
_HASHER = argon2.PasswordHasher()
_KEY_BYTES = 32
MIN_PASSWORD_CHARS = 10


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=_KEY_BYTES, maxmem=256 * 1024 * 1024
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str) -> str:
    """An Argon2id hash (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`), a fresh random salt per call."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValidationError(
            "password", f"the password must have at least {MIN_PASSWORD_CHARS} characters"
        )
    return _HASHER.hash(password)


def verify_password(password: str, encoded: str) -> bool:
    """Check `password` against an Argon2id hash, or a legacy `scrypt$N$r$p$salt$hash` one
    (compared in constant time); False if it does not match or the hash is malformed."""
    if encoded.startswith("$argon2"):
        try:
            return bool(_HASHER.verify(encoded, password))
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False
    try:
        scheme, n, r, p, salt_b64, digest_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        actual = _scrypt(password, salt, int(n), int(r), int(p))
    except (ValueError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(actual, expected)


def needs_rehash(encoded: str) -> bool:
    """True for a hash made with older parameters: scrypt, or Argon2 below today's settings."""
    if not encoded.startswith("$argon2id$"):
        return True
    try:
        return bool(_HASHER.check_needs_rehash(encoded))
    except argon2.exceptions.InvalidHashError:
        return True


@functools.cache
def _dummy_hash() -> str:
    """Checked when the username is unknown, so a wrong name costs the same time as a wrong
    password. Made on first use: hashing at import cost every CLI run a quarter of a second."""
    return _HASHER.hash(_b64(b"0" * 16))


def authenticate(
    accounts: Mapping[str, Mapping[str, Any]],
    username: str,
    password: str,
    *,
    upgraded: str | None = None,
) -> Operator | None:
    """The local operator `username` if `password` matches its hash, else None.

    `accounts` is the `[operators]` table of the console's secrets:
    `{username: {"password_hash": ..., "role": ..., "name": ...}}`. `upgraded`, when given, is
    checked instead of the secrets file's hash (a rehash kept in the database).
    """
    entry = accounts.get(username.strip()) if username else None
    stored = upgraded or (str(entry.get("password_hash", "")) if entry else "")
    ok = verify_password(password, stored or _dummy_hash())
    if not (entry and stored and ok):
        return None
    return account_operator(accounts, username.strip())


def account_operator(accounts: Mapping[str, Mapping[str, Any]], username: str) -> Operator | None:
    """The operator the `[operators]` table says `username` is now: None if the entry is gone
    or its role is unknown. The console asks on every page run, so a removed or demoted
    operator loses access at once."""
    entry = accounts.get(username)
    if not isinstance(entry, Mapping) or not entry.get("password_hash"):
        return None
    try:
        role = parse_role(str(entry.get("role", "")))
    except ValidationError:
        return None
    return Operator(identity=username, role=role, name=str(entry.get("name", "")), source="local")


def hash_fingerprint(encoded: str) -> str:
    """SHA-256 of a stored hash: ties a session or an upgrade to the secrets entry it came from."""
    return hashlib.sha256(encoded.encode()).hexdigest()


def operator_for_email(
    roles: Mapping[str, Any], email: str | None, name: str = "", *, email_verified: bool = False
) -> Operator | None:
    """The OIDC user's operator from the `[roles]` table (email → role); None if not listed.

    Only for an address the identity provider says is verified: an unverified claim is text
    the user typed, and anyone could type an operator's address.
    """
    if not email or email_verified is not True:
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


# ---------------------------------------------------------------- sign-in with a local account


@dataclass(frozen=True)
class SignInPolicy:
    """How many failed sign-ins lock an account, or a client address, and for how long.

    An account is locked while it has `account_failures` failures within `window` since its
    last success; a client address while it has `client_failures` within `window` (a success
    does not reset it, or one valid account would let an attacker try every other one).
    """

    account_failures: int = 5
    client_failures: int = 20
    window: timedelta = timedelta(minutes=15)


@dataclass(frozen=True)
class SignIn:
    """What a sign-in came to: the operator, or why not (`locked_until` set when locked out)."""

    operator: Operator | None
    locked_until: datetime | None = None
    fingerprint: str | None = None

    @property
    def ok(self) -> bool:
        return self.operator is not None


KEEP_ATTEMPTS = timedelta(days=30)


def _account_key(username: str) -> str:
    return username.strip().lower()[:200]


def _locked_until(
    session: Session, column: Any, value: str, since: datetime, limit: int, window: timedelta
) -> datetime | None:
    failures = session.scalars(
        select(SignInAttempt.created_at)
        .where(column == value, SignInAttempt.ok.is_(False), SignInAttempt.created_at > since)
        .order_by(SignInAttempt.created_at.desc())
        .limit(limit)
    ).all()
    return failures[-1] + window if len(failures) >= limit else None


def sign_in_locked_until(
    session: Session,
    username: str,
    client: str | None,
    *,
    now: datetime,
    policy: SignInPolicy = SignInPolicy(),
) -> tuple[datetime, str] | None:
    """(until when, "account" | "client") if sign-ins for `username` or from `client` are locked."""
    key = _account_key(username)
    last_ok = session.scalar(
        select(func.max(SignInAttempt.created_at)).where(
            SignInAttempt.username == key, SignInAttempt.ok.is_(True)
        )
    )
    since = max(now - policy.window, last_ok) if last_ok else now - policy.window
    until = _locked_until(
        session, SignInAttempt.username, key, since, policy.account_failures, policy.window
    )
    if until is not None and until > now:
        return until, "account"
    if client:
        until = _locked_until(
            session,
            SignInAttempt.client,
            client,
            now - policy.window,
            policy.client_failures,
            policy.window,
        )
        if until is not None and until > now:
            return until, "client"
    return None


def sign_in(
    session: Session,
    accounts: Mapping[str, Mapping[str, Any]],
    username: str,
    password: str,
    *,
    client: str | None,
    now: datetime,
    policy: SignInPolicy = SignInPolicy(),
) -> SignIn:
    """Check a local account's password, with a lockout kept in the database.

    A locked account or client is refused without checking the password. Every checked attempt
    is recorded; the failure that locks records an `operator.sign_in_locked` audit event. A
    success with a hash below today's parameters stores an Argon2id rehash (`OperatorCredential`)
    used from then on. The caller commits.
    """
    key = _account_key(username)
    client = client[:64] if client else None
    locked = sign_in_locked_until(session, username, client, now=now, policy=policy)
    if locked is not None:
        return SignIn(None, locked_until=locked[0])

    entry = accounts.get(username.strip()) if username else None
    stored = str(entry.get("password_hash", "")) if isinstance(entry, Mapping) else ""
    fingerprint = hash_fingerprint(stored) if stored else None
    upgrade = session.get(OperatorCredential, username.strip()) if stored else None
    if upgrade is not None and upgrade.replaces != fingerprint:
        upgrade = None  # the secrets entry changed since: it wins
    operator = authenticate(
        accounts, username, password, upgraded=upgrade.password_hash if upgrade else None
    )
    session.add(SignInAttempt(username=key, client=client, ok=operator is not None, created_at=now))
    session.flush()
    if operator is None:
        locked = sign_in_locked_until(session, username, client, now=now, policy=policy)
        if locked is not None:
            audit.record(
                session,
                "operator.sign_in_locked",
                actor=key,
                now=now,
                data={"locked": locked[1], "until": locked[0].isoformat(), "client": client},
            )
        return SignIn(None, locked_until=locked[0] if locked else None)

    # The lockout looks back one window; a month of attempts is plenty to investigate from.
    session.execute(delete(SignInAttempt).where(SignInAttempt.created_at < now - KEEP_ATTEMPTS))
    current = upgrade.password_hash if upgrade else stored
    if needs_rehash(current):
        _store_rehash(session, operator.identity, fingerprint or "", password, now)
    return SignIn(operator, fingerprint=fingerprint)


def _store_rehash(
    session: Session, username: str, replaces: str, password: str, now: datetime
) -> None:
    row = session.get(OperatorCredential, username)
    if row is None:
        row = OperatorCredential(username=username, replaces=replaces, password_hash="")
        session.add(row)
    row.replaces, row.password_hash, row.updated_at = replaces, _HASHER.hash(password), now
    audit.record(session, "operator.password_rehashed", actor=username, now=now)


MAX_DISPLAY_NAME_CHARS = 200
# Control characters, and format characters such as bidi overrides and zero-width joiners that
# make a name display as something else.
_HIDDEN = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def validate_display_name(value: str, field: str = "name") -> str:
    """A person's display name (a letter owner's or an operator's), trimmed: at most 200
    characters, one line, no control or invisible formatting characters. The console still
    renders names as text (never as Markdown); this keeps what is stored readable."""
    name = value.strip()
    if len(name) > MAX_DISPLAY_NAME_CHARS:
        raise ValidationError(
            field, f"the {field} is {len(name)} characters long; at most {MAX_DISPLAY_NAME_CHARS}"
        )
    hidden = sorted({f"U+{ord(c):04X}" for c in name if unicodedata.category(c) in _HIDDEN})
    if hidden:
        raise ValidationError(
            field, f"the {field} contains control or invisible characters ({', '.join(hidden)})"
        )
    return name


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
    name = validate_display_name(name)
    key = username if _BARE_KEY.match(username) else json.dumps(username)
    lines = [
        f"[operators.{key}]",
        f"role = {json.dumps(role.value)}",
        f"password_hash = {json.dumps(password_hash)}",
    ]
    if name:
        lines.append(f"name = {json.dumps(name)}")
    return "\n".join(lines) + "\n"
