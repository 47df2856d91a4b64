"""State transitions of a delivery, one function each.

    scheduled → processing → sent | failed        scheduled | failed | held → canceled
    processing → scheduled (retry, lease recovery)  failed → scheduled (requeue)

Here: schedule, cancel, reschedule and requeue, each taking the app's dependencies (`Deps`)
and running in its own transaction. The claim and the lease recovery are `core.claims`; the
recording of a run's outcome is `core.recording` (deciding it: `core.outcomes.decide`); the
checks on input are `core.validation`.

Every transition is one transaction with its audit event (and attempt rows, credit entries,
notification rows). Rows change only through compare-and-set updates on (id, status, version),
so two actors racing on one row cannot both win. Callers pass `now`; nothing here reads the
clock. Enqueueing happens after commit and is best effort (DESIGN.md invariant 3).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from core import audit, credits
from core.db import session_scope
from core.deps import Deps
from core.dispatch import dispatch, revoke_quietly
from core.errors import DeliveryNotFound, InvalidTransition, UserNotFound
from core.models import Delivery, Letter, Status, User
from core.operators import validate_display_name
from core.policy import within_horizon
from core.validation import normalize_address, validate_deliver_at, validate_letter


@dataclass(frozen=True)
class Scheduled:
    delivery_id: uuid.UUID
    letter_id: uuid.UUID
    deliver_at: datetime
    task_id: str | None


def _load(session: Session, delivery_id: uuid.UUID) -> Delivery:
    row = session.get(Delivery, delivery_id, populate_existing=True)
    if row is None:
        raise DeliveryNotFound(delivery_id)
    return row


def _transition(
    session: Session,
    row: Delivery,
    action: str,
    allowed: set[Status],
    now: datetime,
    **values: Any,
) -> None:
    """Compare-and-set the row from its current (status, version); InvalidTransition if it moved."""
    if row.status not in allowed:
        raise InvalidTransition(row.id, row.status, action)
    result = session.execute(
        update(Delivery)
        .execution_options(synchronize_session=False)
        .where(
            Delivery.id == row.id, Delivery.status == row.status, Delivery.version == row.version
        )
        .values(version=Delivery.version + 1, updated_at=now, **values)
    )
    assert isinstance(result, CursorResult)
    if result.rowcount != 1:
        fresh = _load(session, row.id)
        raise InvalidTransition(row.id, fresh.status, action)


def _not_waiting_for_a_batch(row: Delivery, action: str) -> None:
    """A scheduled letter still in a batch waits for that batch's replay (its first call's
    outcome is unknown): the replay repeats the identical request, this letter included, so it
    cannot be canceled or moved until the batch has settled (seconds to minutes)."""
    if row.batch_id is not None and row.status == Status.SCHEDULED:
        raise InvalidTransition(
            row.id, "waiting for its batch's outcome (try again shortly)", action
        )


def find_user(session: Session, email: str) -> User:
    user = session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None:
        raise UserNotFound(email)
    return user


def create_user(session: Session, email: str, name: str, now: datetime, credit: int = 0) -> User:
    """Add an account (idempotent on email) and grant it `credit`."""
    address = normalize_address(email, "email").lower()
    name = validate_display_name(name)
    user = session.scalar(select(User).where(User.email == address))
    if user is None:
        user = User(email=address, name=name, created_at=now)
        session.add(user)
        session.flush()
    if credit:
        credits.grant(session, user.id, credit, now)
    return user


def schedule_delivery(
    deps: Deps,
    *,
    user_id: int,
    recipient: str,
    subject: str,
    body: str,
    deliver_at: datetime,
    now: datetime,
    actor: str,
    reason: str | None = None,
) -> Scheduled:
    """Validate, reserve a credit, store the sealed letter and its delivery; then dispatch.

    The row is committed before the broker is touched. Only a letter due within the dispatch
    horizon is enqueued; a broker failure is logged, not raised: the dispatcher finds the row.
    """
    settings = deps.settings
    address = normalize_address(recipient)
    validate_deliver_at(deliver_at, now, settings.max_schedule_years)
    validate_letter(subject, body, settings.max_letter_bytes)
    letter_id, delivery_id = uuid.uuid4(), uuid.uuid4()
    sealed = deps.keyring.seal(letter_id, subject, body)
    with session_scope(deps.session_factory) as session:
        if session.get(User, user_id) is None:
            raise UserNotFound(user_id)
        session.add(
            Letter(
                id=letter_id,
                user_id=user_id,
                key_id=sealed.key_id,
                subject_ciphertext=sealed.subject,
                body_ciphertext=sealed.body,
                created_at=now,
            )
        )
        session.flush()  # the letter row first: deliveries reference it
        session.add(
            Delivery.scheduled(
                id=delivery_id,
                letter_id=letter_id,
                user_id=user_id,
                recipient_email=address,
                deliver_at=deliver_at,
                now=now,
            )
        )
        session.flush()
        credits.reserve(session, user_id, delivery_id, now)
        audit.record(
            session,
            "delivery.scheduled",
            actor=actor,
            now=now,
            delivery_id=delivery_id,
            reason=reason,
            data={"deliver_at": deliver_at.isoformat()},
        )
        session.commit()
    task_id = None
    if within_horizon(deliver_at, now, settings.dispatch_horizon_seconds):
        task_id = dispatch(deps.session_factory, deps.enqueuer, delivery_id, deliver_at, now)
    return Scheduled(delivery_id, letter_id, deliver_at, task_id)


def cancel_delivery(
    deps: Deps,
    delivery_id: uuid.UUID,
    *,
    now: datetime,
    actor: str,
    reason: str | None = None,
) -> None:
    """scheduled | failed | held → canceled; refunds the credit and revokes the queued task."""
    with session_scope(deps.session_factory) as session:
        row = _load(session, delivery_id)
        old_task = row.task_id
        _not_waiting_for_a_batch(row, "cancel")
        _transition(
            session,
            row,
            "cancel",
            {Status.SCHEDULED, Status.FAILED, Status.HELD},
            now,
            status=Status.CANCELED,
            canceled_at=now,
            task_id=None,
            lease_until=None,
        )
        refunded = credits.refund(session, row.user_id, row.id, now)
        audit.record(
            session,
            "delivery.canceled",
            actor=actor,
            now=now,
            delivery_id=row.id,
            reason=reason,
            data={"from": row.status, "refunded": refunded},
        )
        session.commit()
    revoke_quietly(deps.enqueuer, old_task)


def reschedule_delivery(
    deps: Deps,
    delivery_id: uuid.UUID,
    deliver_at: datetime,
    *,
    now: datetime,
    actor: str,
    reason: str | None = None,
) -> str | None:
    """Move a scheduled delivery to a new time in one transaction.

    The task dispatched for the old time is revoked best effort; if it runs anyway, the claim
    checks the row's new due time and finds nothing to claim.
    """
    settings = deps.settings
    validate_deliver_at(deliver_at, now, settings.max_schedule_years)
    with session_scope(deps.session_factory) as session:
        row = _load(session, delivery_id)
        old_task, old_time = row.task_id, row.deliver_at
        _not_waiting_for_a_batch(row, "reschedule")
        _transition(
            session,
            row,
            "reschedule",
            {Status.SCHEDULED},
            now,
            deliver_at=deliver_at,
            next_attempt_at=deliver_at,
            task_id=None,
            dispatched_at=None,
        )
        audit.record(
            session,
            "delivery.rescheduled",
            actor=actor,
            now=now,
            delivery_id=row.id,
            reason=reason,
            data={"from": old_time.isoformat(), "to": deliver_at.isoformat()},
        )
        session.commit()
    revoke_quietly(deps.enqueuer, old_task)
    if within_horizon(deliver_at, now, settings.dispatch_horizon_seconds):
        return dispatch(deps.session_factory, deps.enqueuer, delivery_id, deliver_at, now)
    return None


def requeue_delivery(
    deps: Deps,
    delivery_id: uuid.UUID,
    *,
    now: datetime,
    actor: str,
    reason: str | None = None,
    event: str = "delivery.requeued",
    expected_version: int | None = None,
) -> str | None:
    """failed → scheduled, due now, with a fresh round of attempts; returns the new task id.

    A credit refunded on a permanent failure is reserved again (InsufficientCredit if none).
    `expected_version`: refuse unless the row is still the version the caller examined.
    """
    with session_scope(deps.session_factory) as session:
        row = _load(session, delivery_id)
        if expected_version is not None and row.version != expected_version:
            raise InvalidTransition(
                row.id, f"{row.status} (changed since it was checked)", "requeue"
            )
        previous = {"error_class": row.error_class, "attempt_count": row.attempt_count}
        _transition(
            session,
            row,
            "requeue",
            {Status.FAILED},
            now,
            status=Status.SCHEDULED,
            next_attempt_at=now,
            round_attempts=0,
            task_id=None,
            dispatched_at=None,
            failed_at=None,
            error_class=None,
        )
        if credits.held_by(session, row.id) < 1:
            credits.reserve(session, row.user_id, row.id, now)
        audit.record(
            session, event, actor=actor, now=now, delivery_id=row.id, reason=reason, data=previous
        )
        session.commit()
    return dispatch(deps.session_factory, deps.enqueuer, delivery_id, now, now)
