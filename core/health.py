"""Is the guarantee running? What `capsule health` and the console's health page report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.config import Settings
from core.models import Delivery, ErrorClass, Letter, ReconcilerRun, Status


@dataclass(frozen=True)
class Health:
    ok: bool
    last_backstop_at: datetime | None
    last_backstop_age_seconds: float | None
    stuck_unclaimed: int
    stuck_processing: int
    problems: list[str] = field(default_factory=list)
    # key id -> scheduled letters waiting for it (their key is not in a worker's keyring)
    waiting_for_keys: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["last_backstop_at"] = (
            self.last_backstop_at.isoformat() if self.last_backstop_at else None
        )
        return data


def count_stuck(session: Session, now: datetime, grace_seconds: float) -> tuple[int, int]:
    """(due rows unclaimed past grace, processing rows past their lease)."""
    cutoff = now - timedelta(seconds=grace_seconds)
    unclaimed = session.scalar(
        select(func.count())
        .select_from(Delivery)
        .where(Delivery.status == Status.SCHEDULED, Delivery.next_attempt_at <= cutoff)
    )
    expired = session.scalar(
        select(func.count())
        .select_from(Delivery)
        .where(Delivery.status == Status.PROCESSING, Delivery.lease_until < now)
    )
    return int(unclaimed or 0), int(expired or 0)


def waiting_for_keys(session: Session, settings: Settings, now: datetime) -> dict[str, int]:
    """Key id → how many scheduled letters a worker found sealed under it and could not open.

    Those letters stay scheduled and are tried again; they go out once the key is back. Each
    such row is due again within twice CAPSULE_MISSING_KEY_RETRY_SECONDS (the wait and its
    spread), so the count reads only the due index up to there (plus a horizon of slack for a
    setting changed meanwhile), never every scheduled row.
    """
    bound = now + timedelta(
        seconds=2 * settings.missing_key_retry_seconds + settings.dispatch_horizon_seconds
    )
    rows = session.execute(
        select(Letter.key_id, func.count())
        .join(Delivery, Delivery.letter_id == Letter.id)
        .where(
            Delivery.status == Status.SCHEDULED,
            Delivery.next_attempt_at <= bound,
            Delivery.error_class == ErrorClass.MISSING_KEY,
        )
        .group_by(Letter.key_id)
        .order_by(Letter.key_id)
    ).all()
    return {str(key_id): int(count) for key_id, count in rows}


def describe_waiting(waiting: dict[str, int]) -> str:
    """One line for an alert or a health problem: counts and key ids only, never letter text."""
    total = sum(waiting.values())
    keys = ", ".join(f"{key_id!r} ({count})" for key_id, count in waiting.items())
    return (
        f"{total} letter{'s' if total != 1 else ''} wait for encryption keys missing from the "
        f"keyring: {keys}; add the key back to CAPSULE_ENCRYPTION_KEYS and restart the consumers"
    )


def check(session: Session, settings: Settings, now: datetime) -> Health:
    last = session.scalar(
        select(func.max(ReconcilerRun.finished_at)).where(
            ReconcilerRun.kind == "backstop", ReconcilerRun.ok.is_(True)
        )
    )
    age = (now - last).total_seconds() if last else None
    # Stuck means "the backstop should have caught it by now": one full grace plus one run.
    unclaimed, expired = count_stuck(session, now, settings.grace_seconds + 60)
    problems = []
    if age is None:
        problems.append("no successful backstop run recorded")
    elif age > settings.health_max_age_seconds:
        problems.append(
            f"last successful backstop run is {age:.0f} s old (limit {settings.health_max_age_seconds})"
        )
    if unclaimed + expired > settings.health_max_stuck:
        problems.append(
            f"{unclaimed + expired} stuck deliveries (limit {settings.health_max_stuck})"
        )
    waiting = waiting_for_keys(session, settings, now)
    if waiting:
        problems.append(describe_waiting(waiting))
    return Health(not problems, last, age, unclaimed, expired, problems, waiting)
