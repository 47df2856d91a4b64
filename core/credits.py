"""The credit ledger: append-only entries; a balance is their sum.

One delivery holds one credit from schedule until it is sent (kept), canceled or permanently
failed (refunded). What a delivery holds is derived from its own entries, so a refund can never
be paid twice and a requeue after a refund reserves again.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.errors import InsufficientCredit, ValidationError
from core.models import CreditEntry, User

MAX_GRANT = 10_000_000  # a whole benchmark seeding in one grant
MAX_BALANCE = 1_000_000_000  # well inside a 32-bit INTEGER column


def balance(session: Session, user_id: int) -> int:
    total = session.scalar(
        select(func.coalesce(func.sum(CreditEntry.amount), 0)).where(CreditEntry.user_id == user_id)
    )
    return int(total or 0)


def held_expr(delivery_id: Any) -> Any:
    """Credits a delivery holds (0 or 1), as a SQL scalar subquery: `delivery_id` may be a
    column, so one statement can read it for many rows."""
    return (
        select(func.coalesce(-func.sum(CreditEntry.amount), 0))
        .where(CreditEntry.delivery_id == delivery_id)
        .scalar_subquery()
    )


def held_by(session: Session, delivery_id: uuid.UUID) -> int:
    """Credits the delivery currently holds (0 or 1)."""
    return int(session.scalar(select(held_expr(delivery_id))) or 0)


def grant(
    session: Session, user_id: int, amount: int, now: datetime, reason: str = "grant"
) -> None:
    """Add `amount` credits; ValidationError unless 1 ≤ amount ≤ MAX_GRANT and the balance stays
    within MAX_BALANCE (the ledger's integer column and its sums must never overflow)."""
    if not 1 <= amount <= MAX_GRANT:
        raise ValidationError("credits", f"a grant must be between 1 and {MAX_GRANT} credits")
    if balance(session, user_id) + amount > MAX_BALANCE:
        raise ValidationError(
            "credits", f"the balance would exceed {MAX_BALANCE} credits; grant fewer"
        )
    session.add(CreditEntry(user_id=user_id, amount=amount, reason=reason, created_at=now))


def reserve(session: Session, user_id: int, delivery_id: uuid.UUID, now: datetime) -> None:
    """Take one credit for the delivery; raises InsufficientCredit when none is left.

    On PostgreSQL the user's row is locked first so two concurrent schedules cannot both spend
    the last credit; SQLite transactions here are already serialised (BEGIN IMMEDIATE).
    """
    session.execute(select(User.id).where(User.id == user_id).with_for_update())
    current = balance(session, user_id)
    if current < 1:
        raise InsufficientCredit(user_id, current)
    session.add(
        CreditEntry(
            user_id=user_id, delivery_id=delivery_id, amount=-1, reason="reserve", created_at=now
        )
    )


def refund(session: Session, user_id: int, delivery_id: uuid.UUID, now: datetime) -> bool:
    """Give back what the delivery holds; False when it held nothing."""
    if held_by(session, delivery_id) < 1:
        return False
    session.add(
        CreditEntry(
            user_id=user_id, delivery_id=delivery_id, amount=1, reason="refund", created_at=now
        )
    )
    return True
