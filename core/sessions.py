"""Console sign-in sessions for local operators, kept in the database.

A session token is `<id>.<secret>.<expires>.<signature>`: a random id and secret, the expiry
as Unix seconds, and an HMAC-SHA256 over the three with the console's session key. The browser
keeps it in a cookie; the `console_sessions` row keeps the id, a SHA-256 of the secret, the
operator's username and the fingerprint of the password hash they signed in with.

A token resumes a session only when all of these hold: the signature matches (a forged or
edited token is refused before any query), it has not expired, the row exists with that
secret, it is not revoked and its own expiry has not passed. The console then checks the
operator's secrets entry as on every page run (still there, same password hash).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from core.models import ConsoleSession

DEFAULT_TTL = timedelta(hours=12)
PURGE_AFTER = timedelta(days=7)  # revoked or expired rows are deleted this long after


@dataclass(frozen=True)
class Resumed:
    """A live session, as a token resumed it."""

    id: str
    username: str
    fingerprint: str
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> bytes:
    """A random session key (for a console process that has none configured)."""
    return secrets.token_bytes(32)


def issue(
    session: Session,
    *,
    username: str,
    fingerprint: str,
    key: bytes,
    now: datetime,
    ttl: timedelta = DEFAULT_TTL,
) -> str:
    """Start a session for `username` and return its token. Old dead rows are purged."""
    if ttl <= timedelta(0):
        raise ValueError("a session needs a positive lifetime")
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now - PURGE_AFTER))
    sid, secret = secrets.token_hex(16), _b64(secrets.token_bytes(32))
    expires = now + ttl
    session.add(
        ConsoleSession(
            id=sid,
            secret_hash=_digest(secret),
            username=username,
            fingerprint=fingerprint,
            created_at=now,
            expires_at=expires,
        )
    )
    payload = f"{sid}.{secret}.{int(expires.timestamp())}"
    return f"{payload}.{_sign(key, payload)}"


def _parse(token: str, key: bytes, now: datetime) -> tuple[str, str] | None:
    """(id, secret) of a well-formed, correctly signed, unexpired token; else None."""
    parts = token.split(".") if isinstance(token, str) and len(token) <= 256 else []
    if len(parts) != 4 or not all(parts):
        return None
    sid, secret, expires, signature = parts
    if not hmac.compare_digest(signature, _sign(key, f"{sid}.{secret}.{expires}")):
        return None
    if not expires.isdigit() or int(expires) <= now.timestamp():
        return None
    return sid, secret


def resume(session: Session, token: str, *, key: bytes, now: datetime) -> Resumed | None:
    """The live session `token` stands for, or None (forged, expired, unknown or revoked)."""
    parsed = _parse(token, key, now)
    if parsed is None:
        return None
    sid, secret = parsed
    row = session.get(ConsoleSession, sid)
    if row is None or not hmac.compare_digest(row.secret_hash, _digest(secret)):
        return None
    if row.revoked_at is not None or row.expires_at <= now:
        return None
    return Resumed(row.id, row.username, row.fingerprint, row.expires_at)


def revoke(session: Session, token: str, *, key: bytes, now: datetime) -> bool:
    """End the session `token` stands for; True if a live one was ended."""
    found = resume(session, token, key=key, now=now)
    if found is None:
        return False
    session.execute(
        update(ConsoleSession).where(ConsoleSession.id == found.id).values(revoked_at=now)
    )
    return True
