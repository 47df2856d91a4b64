"""Batches: many due letters claimed together and sent in one provider call (DESIGN.md
invariant 9).

    a delivery run claims its own letter (the compare-and-set of invariant 1), then
      row in a live batch     → claim the batch's other members and replay the identical call
                                (a provider that replays batches), or go alone pinned to the
                                batch's provider and look first (one that can be asked)
      unpinned, not recovering → claim up to a batch more in ONE statement (FOR UPDATE SKIP
                                LOCKED), one lease for all, and write the batch row (provider,
                                key, ordered ids) in the same transaction, before any call
      otherwise               → alone, as before

A letter is in at most one live batch: `deliveries.batch_id` is one column, set only on rows
this run holds, and cleared when the letter leaves the batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from core.claims import Claim, claimable, claimed_values
from core.models import BatchState, Delivery, DeliveryBatch, ErrorClass, Status
from core.webhooks import suppressed

# Resend keeps an idempotency key 24 h; a replay must go out well inside that window, or the
# call could be taken for a new one and send every letter twice. Past it, people decide.
KEY_WINDOW = timedelta(hours=23)


@dataclass(frozen=True)
class Batch:
    """A batch as the worker needs it."""

    id: uuid.UUID
    provider: str
    idempotency_key: str
    delivery_ids: list[uuid.UUID]
    created_at: datetime
    request_sha256: str | None
    state: str

    def key_expired(self, now: datetime) -> bool:
        """True once a replay could fall outside the provider's key window."""
        return now - self.created_at >= KEY_WINDOW


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


_RETURNING: tuple[Any, ...] = (
    Delivery.id,
    Delivery.attempt_count,
    Delivery.round_attempts,
    Delivery.idempotency_key,
    Delivery.recipient_email,
    Delivery.letter_id,
    Delivery.user_id,
    Delivery.pinned_provider,
    Delivery.error_class,
    Delivery.batch_id,
    Delivery.deliver_at,
)


def _claims(rows: Sequence[Any], task_id: str) -> list[Claim]:
    return [
        Claim(
            row.id,
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
            queued_task_id=getattr(row, "queued_task_id", None),
            deliver_at=row.deliver_at,
        )
        for row in rows
    ]


def claim_more(
    session: Session,
    task_id: str,
    *,
    limit: int,
    now: datetime,
    lease_seconds: float,
) -> list[Claim]:
    """Claim up to `limit` more due letters that may share a batch, in one statement.

    Due, scheduled, unpinned, not recovering an unknown outcome, in no batch. Rows another
    run has locked are skipped, not waited for (PostgreSQL); SQLite's BEGIN IMMEDIATE already
    serialises writers. The status and due conditions are repeated on the UPDATE itself, so
    the claim stays a compare-and-set whatever the subquery saw. The caller commits.
    """
    if limit < 1:
        return []
    due = claimable(now)
    picked = (
        select(Delivery.id, Delivery.task_id)
        .where(
            *due,
            Delivery.pinned_provider.is_(None),
            Delivery.batch_id.is_(None),
            or_(Delivery.error_class.is_(None), Delivery.error_class != ErrorClass.LEASE_EXPIRED),
            # a letter to a suppressed address is left to its own run, which holds it
            ~suppressed(),
        )
        .order_by(Delivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        # A CTE, evaluated once: PostgreSQL may rescan a plain IN (subquery), and each
        # rescan with SKIP LOCKED returns other rows, past the LIMIT.
        .cte("picked")
    )
    claimed = (
        update(Delivery)
        .execution_options(synchronize_session=False)
        .values(**claimed_values(task_id, now, lease_seconds))
    )
    if session.get_bind().dialect.name == "postgresql":
        # UPDATE … FROM picked: RETURNING can name the task each letter had queued, so the
        # caller can revoke it (PostgreSQL only; SQLite's RETURNING sees the updated table only)
        statement = claimed.where(Delivery.id == picked.c.id, *due).returning(
            *_RETURNING, picked.c.task_id.label("queued_task_id")
        )
    else:
        statement = claimed.where(Delivery.id.in_(select(picked.c.id)), *due).returning(*_RETURNING)
    claims = _claims(session.execute(statement).all(), task_id)
    return sorted(claims, key=lambda c: c.delivery_id.hex)


def open_batch(
    session: Session,
    claims: Sequence[Claim],
    provider: str,
    *,
    now: datetime,
) -> tuple[Batch, list[Claim]]:
    """Write the batch row (provider, a fresh key, the ordered ids) and mark its members.

    Runs in the claim's transaction, before any call: whatever happens to the call, the batch
    a replay must repeat is on disk. The caller commits.
    """
    batch = Batch(
        id=uuid.uuid4(),
        provider=provider,
        idempotency_key=f"batch-{uuid.uuid4().hex}",
        delivery_ids=[c.delivery_id for c in claims],
        created_at=now,
        request_sha256=None,
        state=BatchState.LIVE,
    )
    session.execute(
        insert(DeliveryBatch).values(
            id=batch.id,
            provider=provider,
            idempotency_key=batch.idempotency_key,
            delivery_ids=[str(i) for i in batch.delivery_ids],
            state=BatchState.LIVE,
            task_id=claims[0].task_id,
            created_at=now,
            updated_at=now,
        )
    )
    session.execute(
        update(Delivery)
        .execution_options(synchronize_session=False)
        .where(
            Delivery.id.in_(batch.delivery_ids),
            Delivery.status == Status.PROCESSING,
            Delivery.task_id == claims[0].task_id,
        )
        .values(batch_id=batch.id)
    )
    members = [dataclasses.replace(c, batch_id=batch.id) for c in claims]
    return batch, members


def load_batch(session: Session, batch_id: uuid.UUID) -> Batch | None:
    row = session.get(DeliveryBatch, batch_id, populate_existing=True)
    if row is None:
        return None
    return Batch(
        id=row.id,
        provider=row.provider,
        idempotency_key=row.idempotency_key,
        delivery_ids=[uuid.UUID(i) for i in row.delivery_ids],
        created_at=row.created_at,
        request_sha256=row.request_sha256,
        state=row.state,
    )


def claim_members(
    session: Session,
    batch: Batch,
    task_id: str,
    *,
    now: datetime,
    lease_seconds: float,
) -> list[Claim]:
    """For a replay: claim every other member of the batch that is waiting for it (scheduled)
    or whose run died (processing with an expired lease), in one statement. The caller commits."""
    result = session.execute(
        update(Delivery)
        .execution_options(synchronize_session=False)
        .where(
            Delivery.batch_id == batch.id,
            or_(
                Delivery.status == Status.SCHEDULED,
                and_(Delivery.status == Status.PROCESSING, Delivery.lease_until < now),
            ),
        )
        .values(**claimed_values(task_id, now, lease_seconds))
        .returning(*_RETURNING)
    )
    return _claims(result.all(), task_id)


def set_fingerprint(session: Session, batch_id: uuid.UUID, sha256: str, now: datetime) -> None:
    session.execute(
        update(DeliveryBatch)
        .where(DeliveryBatch.id == batch_id, DeliveryBatch.request_sha256.is_(None))
        .values(request_sha256=sha256, updated_at=now)
    )


def settle(session: Session, batch_id: uuid.UUID, task_id: str, *, now: datetime) -> str:
    """After a batch's outcomes are written: the batch stays live while any letter still
    waits for it (kept for a replay, or held by another run); else it is done."""
    waiting = session.scalar(
        select(func.count())
        .select_from(Delivery)
        .where(
            Delivery.batch_id == batch_id,
            Delivery.status.in_([Status.SCHEDULED, Status.PROCESSING]),
        )
    )
    state = BatchState.LIVE if waiting else BatchState.DONE
    session.execute(
        update(DeliveryBatch)
        .where(DeliveryBatch.id == batch_id)
        .values(state=state, task_id=task_id, updated_at=now)
    )
    return state
