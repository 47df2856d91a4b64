"""The delivery page: everything support may see about one delivery (metadata, never the
letter), letters that bounced or are held after sending, and the deliveries of an address."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from core import credits
from core.models import (
    AuditEvent,
    Delivery,
    DeliveryAttempt,
    DeliveryBatch,
    Notification,
    Status,
    User,
    WebhookEvent,
)
from core.queries.common import MAX_ROWS, json_text, result_frame, same_fields


@dataclass(frozen=True)
class DeliveryDetail:
    """Everything support may see about one delivery: metadata, never the letter."""

    id: str
    status: str
    recipient_email: str
    owner_email: str
    owner_name: str
    deliver_at: datetime
    next_attempt_at: datetime
    attempt_count: int
    round_attempts: int
    task_id: str | None
    dispatched_at: datetime | None
    lease_until: datetime | None
    error_class: str | None
    last_error: str | None
    pinned_provider: str | None
    provider: str | None
    provider_message_id: str | None
    sent_at: datetime | None
    failed_at: datetime | None
    canceled_at: datetime | None
    created_at: datetime
    updated_at: datetime
    version: int
    credit_held: int
    attempts: pd.DataFrame = field(repr=False)
    audit: pd.DataFrame = field(repr=False)
    notifications: pd.DataFrame = field(repr=False)
    # after sent: what the provider's webhooks said (core.webhooks), and a hold
    bounce_kind: str | None = None
    reported_at: datetime | None = None
    held_at: datetime | None = None
    provider_events: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    # the batch that holds the letter (live) or sent it: "id · provider · n letters · state"
    batch: str | None = None

    @property
    def lateness_seconds(self) -> float | None:
        if self.sent_at is None:
            return None
        return (self.sent_at - self.deliver_at).total_seconds()

    @classmethod
    def from_row(
        cls, d: Delivery, owner_email: str, owner_name: str, **history: Any
    ) -> DeliveryDetail:
        """From the delivery, its owner's email and name, and what `delivery_detail` read
        about it (credit_held, attempts, audit, notifications, provider_events, batch)."""
        return cls(
            **same_fields(
                cls, d, id=str(d.id), owner_email=owner_email, owner_name=owner_name, **history
            )
        )


def delivery_detail(
    session: Session, delivery_id: uuid.UUID, *, history_limit: int = 200
) -> DeliveryDetail | None:
    """One delivery with its attempts, audit trail and owner notifications; None if unknown."""
    row = session.execute(
        select(Delivery, User.email, User.name)
        .join(User, User.id == Delivery.user_id)
        .where(Delivery.id == delivery_id)
    ).one_or_none()
    if row is None:
        return None
    d, owner_email, owner_name = row
    limit = min(history_limit, MAX_ROWS)
    return DeliveryDetail.from_row(
        d,
        owner_email,
        owner_name,
        credit_held=credits.held_by(session, delivery_id),
        attempts=_attempts(session, delivery_id, limit),
        audit=_audit_trail(session, delivery_id, limit),
        notifications=_notifications(session, delivery_id),
        provider_events=_provider_events(session, delivery_id, limit),
        batch=_batch_line(session, d.batch_id),
    )


def _attempts(session: Session, delivery_id: uuid.UUID, limit: int) -> pd.DataFrame:
    """Every send attempt, oldest first."""
    out = result_frame(
        session.execute(
            select(
                DeliveryAttempt.started_at,
                DeliveryAttempt.run_number.label("run"),
                DeliveryAttempt.provider,
                DeliveryAttempt.outcome,
                DeliveryAttempt.status_code,
                DeliveryAttempt.provider_error_code.label("error_code"),
                DeliveryAttempt.error_message.label("error"),
                DeliveryAttempt.duration_ms,
                DeliveryAttempt.task_id,
                DeliveryAttempt.provider_message_id,
                DeliveryAttempt.batch_id,
            )
            .where(DeliveryAttempt.delivery_id == delivery_id)
            .order_by(DeliveryAttempt.id)
            .limit(limit)
        ),
    )
    out["batch_id"] = [str(v) if v is not None else None for v in out["batch_id"]]
    out["started_at"] = pd.to_datetime(out["started_at"], utc=True)
    out["status_code"] = out["status_code"].astype("Int64")
    return out


def _audit_trail(session: Session, delivery_id: uuid.UUID, limit: int) -> pd.DataFrame:
    """The delivery's audit events, oldest first."""
    out = result_frame(
        session.execute(
            select(
                AuditEvent.created_at,
                AuditEvent.type,
                AuditEvent.actor,
                AuditEvent.reason,
                AuditEvent.data,
            )
            .where(AuditEvent.delivery_id == delivery_id)
            .order_by(AuditEvent.created_at, AuditEvent.id)
            .limit(limit)
        ),
        "created_at",
    )
    out["data"] = [json_text(v) for v in out["data"]]
    return out


def _notifications(session: Session, delivery_id: uuid.UUID) -> pd.DataFrame:
    """The owner's notifications about the delivery, oldest first."""
    return result_frame(
        session.execute(
            select(
                Notification.kind,
                Notification.status,
                Notification.requested_by,
                Notification.attempts,
                Notification.provider,
                Notification.created_at,
                Notification.sent_at,
                Notification.last_error,
            )
            .where(Notification.delivery_id == delivery_id)
            .order_by(Notification.id)
        )
    )


def _provider_events(session: Session, delivery_id: uuid.UUID, limit: int) -> pd.DataFrame:
    """What the provider's webhooks reported after sending, oldest first."""
    return result_frame(
        session.execute(
            select(
                WebhookEvent.occurred_at,
                WebhookEvent.received_at,
                WebhookEvent.provider,
                WebhookEvent.type,
                WebhookEvent.bounce_kind,
                WebhookEvent.outcome,
                WebhookEvent.event_id,
            )
            .where(WebhookEvent.delivery_id == delivery_id)
            .order_by(WebhookEvent.id)
            .limit(limit)
        ),
        "occurred_at",
        "received_at",
    )


def _batch_line(session: Session, batch_id: uuid.UUID | None) -> str | None:
    if batch_id is None:
        return None
    batch = session.get(DeliveryBatch, batch_id)
    if batch is None:
        return str(batch_id)
    return f"{batch.id} · {batch.provider} · {len(batch.delivery_ids)} letters · {batch.state}"


AFTER_SEND_PROBLEMS = (Status.BOUNCED, Status.COMPLAINED, Status.HELD)


def bounced_after_send(session: Session, *, limit: int = 200) -> pd.DataFrame:
    """Letters the provider accepted that bounced or drew a complaint, and letters held for a
    suppressed address, newest change first (ix_deliveries_status_updated)."""
    out = result_frame(
        session.execute(
            select(
                Delivery.updated_at,
                Delivery.status,
                Delivery.bounce_kind,
                Delivery.recipient_email,
                User.email.label("owner_email"),
                Delivery.provider,
                Delivery.sent_at,
                Delivery.reported_at,
                Delivery.held_at,
                Delivery.id,
            )
            .join(User, User.id == Delivery.user_id)
            .where(Delivery.status.in_([s.value for s in AFTER_SEND_PROBLEMS]))
            .order_by(Delivery.updated_at.desc())
            .limit(min(limit, MAX_ROWS))
        ),
        "updated_at",
        "sent_at",
        "reported_at",
        "held_at",
    )
    out["id"] = out["id"].astype(str)
    return out


def deliveries_for_address(session: Session, email: str, *, limit: int = 50) -> pd.DataFrame:
    """Deliveries whose recipient or owner is exactly `email`, newest first."""
    address = email.strip().lower()
    owner_ids = select(User.id).where(User.email == address).scalar_subquery()
    return result_frame(
        session.execute(
            select(
                Delivery.id,
                Delivery.status,
                Delivery.deliver_at,
                Delivery.recipient_email,
                Delivery.error_class,
            )
            .where(or_(Delivery.recipient_email == address, Delivery.user_id.in_(owner_ids)))
            .order_by(Delivery.deliver_at.desc())
            .limit(min(limit, MAX_ROWS))
        ),
        "deliver_at",
    )
