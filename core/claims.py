"""The claim: a worker's compare-and-set `scheduled → processing` on a due row, under a lease
(DESIGN.md invariant 1), and the backstop's recovery of a lease that ran out.

    claim                  scheduled and due → processing, lease_until = now + lease
    recover_expired_lease  processing, lease expired → scheduled, due now, same key

Both run in the caller's transaction; the caller commits. `claimable` and `claimed_values` are
the claim's condition and its writes, shared with the batch claims (core.batches).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, CursorResult, select, update
from sqlalchemy.orm import Session

from core import audit
from core.models import AuditEvent, Delivery, DeliveryAttempt, ErrorClass, Status
from core.policy import lease_until


@dataclass(frozen=True)
class Claim:
    """A delivery this worker now holds under lease."""

    delivery_id: uuid.UUID
    task_id: str
    run_number: int
    round_attempts: int
    idempotency_key: str
    recipient_email: str
    letter_id: uuid.UUID
    user_id: int
    pinned_provider: str | None
    error_class: str | None  # of the previous run; "lease_expired" means its outcome is unknown
    # When the last call whose outcome is unknown ended (the pinned provider's last ambiguous
    # call; for a recovered lease, the recovery): a lagging search is trusted only a settle
    # window after it (DESIGN.md invariant 7). None when no earlier run left anything unknown.
    ambiguous_at: datetime | None = None
    deliver_at: datetime | None = None  # the user's intent: lateness is measured from it
    batch_id: uuid.UUID | None = None  # the live batch it is claimed in
    # The Huey task queued for this letter before a batch took it: revoked, best effort, so
    # that it does not run only to find nothing to claim.
    queued_task_id: str | None = None


def claimable(now: datetime) -> tuple[ColumnElement[bool], ...]:
    """The claim's compare-and-set condition (DESIGN.md invariant 1): scheduled, and due.

    Every claim puts it on the UPDATE itself, whatever a query before it saw: the one letter a
    task names, a batch's pick of more letters and that pick's UPDATE.
    """
    return (Delivery.status == Status.SCHEDULED, Delivery.next_attempt_at <= now)


def claimed_values(task_id: str, now: datetime, lease_seconds: float) -> dict[str, Any]:
    """What a claim writes: processing under a lease, held by `task_id`, one more run."""
    return {
        "status": Status.PROCESSING,
        "lease_until": lease_until(now, lease_seconds),
        "task_id": task_id,
        "attempt_count": Delivery.attempt_count + 1,
        "round_attempts": Delivery.round_attempts + 1,
        "version": Delivery.version + 1,
        "updated_at": now,
    }


def claim(
    session: Session,
    delivery_id: uuid.UUID,
    task_id: str,
    *,
    now: datetime,
    lease_seconds: float,
) -> Claim | None:
    """The compare-and-set `scheduled → processing` on a due row (DESIGN.md invariant 1).

    None when there is nothing to claim: canceled, sent, claimed by a twin, or not yet due
    (rescheduled later). The caller commits.
    """
    result = session.execute(
        update(Delivery)
        .execution_options(synchronize_session=False)
        .where(Delivery.id == delivery_id, *claimable(now))
        .values(**claimed_values(task_id, now, lease_seconds))
        .returning(
            Delivery.attempt_count,
            Delivery.round_attempts,
            Delivery.idempotency_key,
            Delivery.recipient_email,
            Delivery.letter_id,
            Delivery.user_id,
            Delivery.pinned_provider,
            Delivery.error_class,
            Delivery.deliver_at,
            Delivery.batch_id,
        )
    )
    row = result.one_or_none()
    if row is None:
        return None
    ambiguous_at = None
    if row.pinned_provider is not None:
        ambiguous_at = _last_ambiguous_call(session, delivery_id, row.pinned_provider)
    elif row.error_class == ErrorClass.LEASE_EXPIRED:
        ambiguous_at = _lease_recovered_at(session, delivery_id)
    return Claim(
        delivery_id,
        task_id,
        run_number=row.attempt_count,
        round_attempts=row.round_attempts,
        idempotency_key=row.idempotency_key,
        recipient_email=row.recipient_email,
        letter_id=row.letter_id,
        user_id=row.user_id,
        pinned_provider=row.pinned_provider,
        error_class=row.error_class,
        batch_id=row.batch_id,
        ambiguous_at=ambiguous_at,
        deliver_at=row.deliver_at,
    )


def _last_ambiguous_call(
    session: Session, delivery_id: uuid.UUID, provider: str
) -> datetime | None:
    """When the last call to `provider` with an unknown outcome ended (its attempt row)."""
    call = session.execute(
        select(DeliveryAttempt.started_at, DeliveryAttempt.duration_ms)
        .where(
            DeliveryAttempt.delivery_id == delivery_id,
            DeliveryAttempt.provider == provider,
            DeliveryAttempt.outcome == ErrorClass.AMBIGUOUS,
        )
        .order_by(DeliveryAttempt.id.desc())
        .limit(1)
    ).one_or_none()
    if call is None:
        return None
    started: datetime = call.started_at
    return started + timedelta(milliseconds=int(call.duration_ms))


def _lease_recovered_at(session: Session, delivery_id: uuid.UUID) -> datetime | None:
    """When the backstop recovered the lease: the dead run's send, if any, ended before."""
    recovered: datetime | None = session.scalar(
        select(AuditEvent.created_at)
        .where(AuditEvent.delivery_id == delivery_id, AuditEvent.type == "delivery.lease_recovered")
        .order_by(AuditEvent.id.desc())
        .limit(1)
    )
    return recovered


def recover_expired_lease(session: Session, delivery_id: uuid.UUID, *, now: datetime) -> bool:
    """processing with an expired lease → scheduled, due now, same idempotency key.

    The run that held it may have sent the message before dying; the re-run sends with the
    same key, which the provider (or our lookup) turns into "already sent". The caller commits.
    """
    result = session.execute(
        update(Delivery)
        .execution_options(synchronize_session=False)
        .where(
            Delivery.id == delivery_id,
            Delivery.status == Status.PROCESSING,
            Delivery.lease_until < now,
        )
        .values(
            status=Status.SCHEDULED,
            next_attempt_at=now,
            lease_until=None,
            task_id=None,
            dispatched_at=None,
            error_class=ErrorClass.LEASE_EXPIRED,
            last_error="lease expired while processing; recovered by the backstop",
            version=Delivery.version + 1,
            updated_at=now,
        )
    )
    assert isinstance(result, CursorResult)
    if result.rowcount != 1:
        return False
    audit.record(
        session, "delivery.lease_recovered", actor="backstop", now=now, delivery_id=delivery_id
    )
    return True
