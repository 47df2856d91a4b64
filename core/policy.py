"""Pure time arithmetic: backoff, leases, the dispatch horizon, and reading a WHEN.

Nothing here reads the clock; entry points pass `utcnow()` and tests pass whatever they like.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from core.errors import InvalidDeliveryTime

# Where core reads the time more than once in one call (after a send, a batch): `utcnow` in
# production, a test's hand-moved time otherwise.
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The one place entry points read the clock."""
    return datetime.now(UTC)


def backoff_seconds(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Delay before run `attempt + 1`: exponential with full jitter, at least `retry_after`.

    Full jitter (a uniform draw in [base·2^(n-1)/2, base·2^(n-1)]) spreads a burst of failures
    so they do not all come back at the same instant.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling = min(cap, base * 2 ** (attempt - 1))
    draw = (rng or random).uniform(ceiling / 2, ceiling)
    return max(draw, retry_after or 0.0)


def deferral_seconds(
    retry_after: float | None, *, spread: float, rng: random.Random | None = None
) -> float:
    """Delay before retrying a run that called no provider (circuit open, rate limit closed).

    Not before the gate can open (`retry_after`), then spread uniformly over the next
    `spread` seconds (at least as long as the wait itself): every letter held back by one open
    circuit would otherwise come back at the instant it turns half-open, when it admits one.
    """
    wait = max(0.0, retry_after or 0.0)
    return wait + (rng or random).uniform(0, max(spread, wait))


def lease_until(now: datetime, lease_seconds: float) -> datetime:
    return now + timedelta(seconds=lease_seconds)


def within_horizon(due: datetime, now: datetime, horizon_seconds: float) -> bool:
    """True when a task for `due` may be put in the broker now."""
    return due <= now + timedelta(seconds=horizon_seconds)


def horizon_end(now: datetime, horizon_seconds: float) -> datetime:
    return now + timedelta(seconds=horizon_seconds)


_RELATIVE = re.compile(r"^\+(\d+)([smhdw])$")
_MAX_DIGITS = 12  # +999999999999s is already ~31,700 years
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, now: datetime) -> datetime:
    """Read `+30s`, `+2h`, `+3d` relative to `now`, or an ISO 8601 time (UTC if no offset)."""
    raw = text.strip()
    match = _RELATIVE.match(raw)
    try:
        if match:
            amount, unit = match.groups()
            if len(amount) > _MAX_DIGITS:
                raise OverflowError
            return now + timedelta(**{_UNITS[unit]: int(amount)})
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
    except OverflowError:
        # Past the year 9999 (or a count too long to read), or before the year 1 once in UTC.
        where = "too far ahead" if match else "outside the years 1 to 9999"
        raise InvalidDeliveryTime(
            "deliver_at", f"{short_repr(text)} is {where} to be a delivery time"
        ) from None
    except ValueError:
        raise InvalidDeliveryTime(
            "deliver_at",
            f"cannot read {short_repr(text)}: use ISO 8601 or +N[smhdw], e.g. +30s, +3d",
        ) from None


def short_repr(text: str, limit: int = 60) -> str:
    """`text` quoted for a one-line message, cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")
