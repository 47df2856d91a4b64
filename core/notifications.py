"""Telling a letter's owner that it could not be delivered.

A notification row is written in the same transaction as the failure (an outbox), then sent
after commit; a pending row that was not sent is picked up again by the backstop. The unique
(delivery, kind) constraint makes it once per delivery, however many paths ask for it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core import audit
from core.db import session_scope
from core.models import Delivery, Notification, User
from core.providers.base import Email

if TYPE_CHECKING:
    from core.bootstrap import App

DELIVERY_FAILED = "delivery_failed"
# The provider accepted the letter, then the recipient's server refused it for good.
DELIVERY_BOUNCED = "delivery_bounced"


def request(
    session: Session,
    delivery_id: uuid.UUID,
    user_id: int,
    delivery_key: str,
    *,
    requested_by: str,
    now: datetime,
    kind: str = DELIVERY_FAILED,
) -> bool:
    """Queue one notification; False when this delivery already has one of this kind."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    result = session.execute(
        insert(Notification)
        .values(
            delivery_id=delivery_id,
            user_id=user_id,
            kind=kind,
            status="pending",
            idempotency_key=f"{delivery_key}-{kind}",
            requested_by=requested_by,
            attempts=0,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["delivery_id", "kind"])
        .returning(Notification.id)
    )
    # RETURNING, not rowcount: drivers disagree on rowcount for INSERT .. ON CONFLICT.
    return result.first() is not None


MAX_NOTIFICATION_ATTEMPTS = 5
_NEXT_STEP = {
    "transient": "We will keep trying automatically for a while.\n",
    "ambiguous": "It may have reached the recipient after all; our support team is checking.\n",
    "possibly_sent": "It may have reached the recipient after all; our support team is checking.\n",
    "permanent": "Our support team has been told and will look into it.\n",
}


def _compose(delivery: Delivery, user: User, sender: str, key: str, kind: str) -> Email:
    when = delivery.deliver_at.strftime("%Y-%m-%d %H:%M UTC")
    if kind == DELIVERY_BOUNCED:
        return Email(
            to=user.email,
            sender=sender,
            subject="Your letter bounced",
            text=(
                f"Hello {user.name or user.email},\n\n"
                f"The letter you scheduled for {when} was sent, but the mail server of "
                f"{delivery.recipient_email} refused it: that address no longer receives "
                "mail.\n"
                "Your letter is kept safe. Reply to this message or write to our support team "
                "with a corrected address, and we will send it again.\n"
                f"\nReference: {delivery.id}\n\n— Capsule\n"
            ),
            idempotency_key=key,
            tags={"delivery_id": str(delivery.id), "kind": kind},
        )
    text = (
        f"Hello {user.name or user.email},\n\n"
        f"The letter you scheduled for {when} to {delivery.recipient_email} could not be "
        "delivered.\n"
        + _NEXT_STEP.get(delivery.error_class or "", _NEXT_STEP["permanent"])
        + f"\nReference: {delivery.id}\n\n— Capsule\n"
    )
    return Email(
        to=user.email,
        sender=sender,
        subject="We could not deliver your letter",
        text=text,
        idempotency_key=key,
        tags={"delivery_id": str(delivery.id), "kind": "delivery_failed"},
    )


def send_pending(
    app: App,
    *,
    now: datetime,
    delivery_id: uuid.UUID | None = None,
    older_than: datetime | None = None,
    limit: int = 100,
) -> int:
    """Send pending owner notifications (never the letter text); returns how many went out."""
    with session_scope(app.session_factory) as session:
        query = (
            select(Notification, Delivery, User)
            .join(Delivery, Delivery.id == Notification.delivery_id)
            .join(User, User.id == Notification.user_id)
            .where(Notification.status == "pending")
            .order_by(Notification.created_at)
            .limit(limit)
        )
        if delivery_id is not None:
            query = query.where(Notification.delivery_id == delivery_id)
        if older_than is not None:
            query = query.where(Notification.created_at <= older_than)
        pending = session.execute(query).all()
    sent = 0
    for note, delivery, user in pending:
        outcome = app.chain.send(
            _compose(delivery, user, app.settings.mail_from, note.idempotency_key, note.kind),
            pinned=None,
            now=now,
        )
        with session_scope(app.session_factory) as session:
            values: dict[str, object] = {"attempts": Notification.attempts + 1}
            if outcome.sent:
                values |= {
                    "status": "sent",
                    "sent_at": now,
                    "provider": outcome.provider,
                    "provider_message_id": outcome.provider_message_id,
                }
                sent += 1
            else:
                values["last_error"] = outcome.error
                if (
                    note.attempts + 1 >= MAX_NOTIFICATION_ATTEMPTS
                    or outcome.error_class == "permanent"
                ):
                    values["status"] = "failed"
            session.execute(
                update(Notification)
                .where(Notification.id == note.id, Notification.status == "pending")
                .values(**values)
            )
            audit.record(
                session,
                "notification.sent" if outcome.sent else "notification.failed_attempt",
                actor=audit.SYSTEM,
                now=now,
                delivery_id=delivery.id,
                reason=outcome.error,
                data={"kind": note.kind, "provider": outcome.provider},
            )
            session.commit()
    return sent
