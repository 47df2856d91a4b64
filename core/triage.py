"""Support's one-by-one actions on failed deliveries, checked against the operator's role.

Each action needs a reason, runs through the delivery's own transition (which re-checks the
row's state in its transaction) and leaves an audit event naming the operator:

    requeue        failed → scheduled, due now          delivery.requeued
    cancel         scheduled | failed → canceled        delivery.canceled
    notify owner   queue (and send) the failure notice  notification.requested
                   or, when one exists already          notification.already_requested
    release        held → scheduled, due now            delivery.released
                   (a letter held for a suppressed address: support decided it may go)
    redirect       failed | bounced (hard): the letter  delivery.redirected
                   to a corrected address, due now      (one delivery at a time: `redirect`)

A role below support gets PermissionDenied before anything is read.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from core import audit, notifications
from core.bootstrap import App
from core.db import session_scope
from core.deliveries import cancel_delivery, requeue_delivery
from core.errors import (
    CapsuleError,
    DeliveryNotFound,
    InvalidTransition,
    ValidationError,
)
from core.models import Delivery, Notification, Status
from core.operators import Operator, Role, require
from core.redirect import Redirected, redirect_delivery

log = logging.getLogger(__name__)

REQUEUE = "requeue"
CANCEL = "cancel"
NOTIFY = "notify"
RELEASE = "release"
ACTIONS = {
    REQUEUE: "requeue deliveries",
    CANCEL: "cancel deliveries",
    NOTIFY: "notify letter owners",
    RELEASE: "release held deliveries",
}
REDIRECT_ACTION = "redirect letters to a corrected address"
MAX_REASON_CHARS = 2000


def required_reason(reason: str | None) -> str:
    """The trimmed reason; ValidationError when it is empty or too long."""
    text = (reason or "").strip()
    if not text:
        raise ValidationError("reason", "a reason is required")
    if len(text) > MAX_REASON_CHARS:
        raise ValidationError("reason", f"the reason is longer than {MAX_REASON_CHARS} characters")
    return text


def requeue(
    app: App, operator: Operator, delivery_id: uuid.UUID, *, reason: str, now: datetime
) -> str | None:
    """Send a failed delivery again now; returns the new task id (None if the broker is down)."""
    require(operator, Role.SUPPORT, ACTIONS[REQUEUE])
    return requeue_delivery(
        app,
        delivery_id,
        now=now,
        actor=operator.identity,
        reason=required_reason(reason),
    )


def cancel(
    app: App, operator: Operator, delivery_id: uuid.UUID, *, reason: str, now: datetime
) -> None:
    """Cancel a failed (or still scheduled) delivery and refund its credit."""
    require(operator, Role.SUPPORT, ACTIONS[CANCEL])
    cancel_delivery(
        app,
        delivery_id,
        now=now,
        actor=operator.identity,
        reason=required_reason(reason),
    )


@dataclass(frozen=True)
class Notified:
    """What asking to notify the owner did."""

    delivery_id: uuid.UUID
    outcome: str  # sent | queued | already
    existing_status: str | None = None  # for "already": the earlier notice's status
    existing_sent_at: datetime | None = None

    @property
    def message(self) -> str:
        if self.outcome == "sent":
            return "the owner has been notified"
        if self.outcome == "queued":
            return "the notice is queued; the backstop sends it if it did not go out now"
        when = f" on {self.existing_sent_at:%Y-%m-%d %H:%M} UTC" if self.existing_sent_at else ""
        return f"the owner was already notified (notice {self.existing_status}{when})"


def notify_owner(
    app: App, operator: Operator, delivery_id: uuid.UUID, *, reason: str, now: datetime
) -> Notified:
    """Tell the owner of a failed delivery that it could not be sent, once per delivery.

    The notification row and the audit event commit together; sending happens after commit
    and is best effort (a pending notice is retried by the backstop).
    """
    require(operator, Role.SUPPORT, ACTIONS[NOTIFY])
    why = required_reason(reason)
    with session_scope(app.session_factory) as session:
        row = session.get(Delivery, delivery_id, populate_existing=True)
        if row is None:
            raise DeliveryNotFound(delivery_id)
        if row.status != Status.FAILED:
            raise InvalidTransition(row.id, row.status, "notify the owner of")
        # Look first: the notice is once per delivery, and an earlier one is what we report.
        existing = session.scalar(
            select(Notification).where(
                Notification.delivery_id == row.id,
                Notification.kind == notifications.DELIVERY_FAILED,
            )
        )
        queued = existing is None
        if queued:
            notifications.request(
                session,
                row.id,
                row.user_id,
                row.idempotency_key,
                requested_by=operator.identity,
                now=now,
            )
        audit.record(
            session,
            "notification.requested" if queued else "notification.already_requested",
            actor=operator.identity,
            now=now,
            delivery_id=row.id,
            reason=why,
            data={"kind": notifications.DELIVERY_FAILED}
            | ({"existing_status": existing.status} if existing is not None else {}),
        )
        session.commit()
    if existing is not None:
        return Notified(delivery_id, "already", existing.status, existing.sent_at)
    try:
        sent = notifications.send_pending(app, now=now, delivery_id=delivery_id)
    except Exception as exc:  # the row is committed; the backstop sends a pending notice
        log.warning("could not send the notice for %s now: %s", delivery_id, exc)
        sent = 0
    return Notified(delivery_id, "sent" if sent else "queued")


def redirect(
    app: App,
    operator: Operator,
    delivery_id: uuid.UUID,
    *,
    recipient: str,
    reason: str,
    now: datetime,
) -> Redirected:
    """Send the letter of a failed or hard-bounced delivery to the address its owner gave
    support (core.redirect); returns the new delivery's id."""
    require(operator, Role.SUPPORT, REDIRECT_ACTION)
    return redirect_delivery(
        app,
        delivery_id,
        recipient,
        now=now,
        actor=operator.identity,
        reason=required_reason(reason),
    )


@dataclass(frozen=True)
class ActionResult:
    """One delivery's outcome in a batch of support actions."""

    delivery_id: uuid.UUID
    ok: bool
    message: str


def apply(
    app: App,
    operator: Operator,
    action: str,
    delivery_ids: Sequence[uuid.UUID],
    *,
    reason: str,
    now: datetime,
) -> list[ActionResult]:
    """Run `action` on each id in turn; a row that moved on is reported, not fatal.

    Role and reason are checked once, before any row is touched.
    """
    if action not in ACTIONS:
        raise ValidationError("action", f"unknown action {action!r}")
    require(operator, Role.SUPPORT, ACTIONS[action])
    why = required_reason(reason)
    results = []
    for delivery_id in delivery_ids:
        try:
            if action == REQUEUE:
                task_id = requeue(app, operator, delivery_id, reason=why, now=now)
                message = "requeued" + ("" if task_id else " (the dispatcher will queue it)")
            elif action == CANCEL:
                cancel(app, operator, delivery_id, reason=why, now=now)
                message = "canceled; credit refunded"
            elif action == RELEASE:
                from core.webhooks import release_held

                release_held(
                    app,
                    delivery_id,
                    now=now,
                    actor=operator.identity,
                    reason=why,
                )
                message = "released; it is sent now"
            else:
                message = notify_owner(app, operator, delivery_id, reason=why, now=now).message
            results.append(ActionResult(delivery_id, True, message))
        except (InvalidTransition, DeliveryNotFound) as exc:
            results.append(ActionResult(delivery_id, False, f"skipped: {exc}"))
        except CapsuleError as exc:
            results.append(ActionResult(delivery_id, False, str(exc)))
    return results
