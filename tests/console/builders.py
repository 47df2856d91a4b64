"""Rows for console tests, written directly (what the transitions would have left behind).

The letter's ciphertext is a placeholder: the console never opens a letter.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from core import credits
from core.models import (
    AuditEvent,
    CreditEntry,
    Delivery,
    DeliveryAttempt,
    Letter,
    Notification,
    Status,
    User,
)


def add_user(session: Session, email: str, now: datetime, credit: int = 10) -> int:
    user = User(email=email, name=email.split("@")[0].title(), created_at=now)
    session.add(user)
    session.flush()
    if credit:
        credits.grant(session, user.id, credit, now)
    return user.id


def add_delivery(
    session: Session,
    user_id: int,
    *,
    status: str,
    deliver_at: datetime,
    now: datetime,
    recipient: str = "future@example.com",
    sent_at: datetime | None = None,
    failed_at: datetime | None = None,
    error_class: str | None = None,
    last_error: str | None = None,
    next_attempt_at: datetime | None = None,
    lease_until: datetime | None = None,
    attempts: Sequence[tuple[str, str, int | None]] = (),
    hold_credit: bool = True,
    notified: str | None = None,
) -> uuid.UUID:
    """One delivery in `status`; `attempts` are (provider, outcome, status_code) in order."""
    letter = Letter(
        id=uuid.uuid4(),
        user_id=user_id,
        key_id="test1",
        subject_ciphertext=b"sealed",
        body_ciphertext=b"sealed",
        created_at=now,
    )
    session.add(letter)
    session.flush()
    delivery = Delivery(
        id=uuid.uuid4(),
        letter_id=letter.id,
        user_id=user_id,
        recipient_email=recipient,
        status=status,
        deliver_at=deliver_at,
        next_attempt_at=next_attempt_at or deliver_at,
        idempotency_key=uuid.uuid4().hex,
        attempt_count=len(attempts),
        round_attempts=len(attempts),
        sent_at=sent_at,
        failed_at=failed_at,
        error_class=error_class,
        last_error=last_error,
        lease_until=lease_until,
        task_id=uuid.uuid4().hex if status == Status.PROCESSING else None,
        provider=attempts[-1][0] if attempts and status == Status.SENT else None,
        created_at=now,
        updated_at=now,
    )
    session.add(delivery)
    session.flush()
    session.add(
        CreditEntry(
            user_id=user_id, delivery_id=delivery.id, amount=-1, reason="reserve", created_at=now
        )
    )
    if not hold_credit:
        session.add(
            CreditEntry(
                user_id=user_id, delivery_id=delivery.id, amount=1, reason="refund", created_at=now
            )
        )
    for run, (provider, outcome, code) in enumerate(attempts, start=1):
        session.add(
            DeliveryAttempt(
                delivery_id=delivery.id,
                run_number=run,
                task_id=f"task-{run}",
                provider=provider,
                outcome=outcome,
                status_code=code,
                error_message=None if outcome == "accepted" else f"{provider} said {code}",
                duration_ms=100 + run,
                started_at=deliver_at + timedelta(seconds=run),
            )
        )
    if notified:
        session.add(
            Notification(
                delivery_id=delivery.id,
                user_id=user_id,
                kind="delivery_failed",
                status=notified,
                idempotency_key=f"{delivery.idempotency_key}-delivery_failed",
                requested_by="system",
                attempts=1,
                created_at=failed_at or now,
                sent_at=(failed_at or now) if notified == "sent" else None,
            )
        )
    session.flush()
    return delivery.id


def add_failed(
    session: Session,
    user_id: int,
    *,
    failed_at: datetime,
    error_class: str = "permanent",
    provider: str = "resend",
    code: int | None = 422,
    recipient: str = "future@example.com",
    **extra: Any,
) -> uuid.UUID:
    return add_delivery(
        session,
        user_id,
        status=Status.FAILED,
        deliver_at=failed_at - timedelta(minutes=5),
        now=failed_at - timedelta(days=1),
        failed_at=failed_at,
        error_class=error_class,
        last_error=f"{provider} answered {code}",
        attempts=[(provider, error_class, code)],
        recipient=recipient,
        hold_credit=error_class != "permanent",
        **extra,
    )


def add_event(
    session: Session,
    type_: str,
    actor: str,
    at: datetime,
    delivery_id: uuid.UUID | None = None,
    reason: str | None = None,
) -> None:
    session.add(
        AuditEvent(
            type=type_, actor=actor, delivery_id=delivery_id, reason=reason, data={}, created_at=at
        )
    )
