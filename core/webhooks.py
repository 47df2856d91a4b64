"""After "sent": what the providers' webhooks say became of a letter, and the suppression list.

    receive   store_event                     a verified, parsed event (core.webhook_payloads)
                                              → durable insert, idempotent per (provider, event id)
    process   process_event                   event → its delivery (provider message id at send,
                                              then the letter's own tag) → compare-and-set
                                              sent → delivered | bounced | complained;
                                              a hard bounce or complaint suppresses the address;
                                              a hard bounce queues the owner's notice (once)
              process_pending                 the backstop: events a lost task left unprocessed

The state after sent only ever climbs one order (`RANK`), so duplicate and out-of-order events
end in the same state, and a later `delivered` never hides an earlier hard bounce:

    sent < bounced (soft) < delivered < complained < bounced (hard)

A letter due to a suppressed address is held (`hold_if_suppressed`) for a person to release
(`release_held`, with a reason) or cancel; an address leaves the list only through
`remove_suppression`, audited. Callers pass `now`; nothing here reads the clock.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core import audit, notifications
from core.db import SessionFactory, session_scope
from core.deliveries import _load, _transition
from core.deps import Deps
from core.dispatch import dispatch
from core.errors import InvalidTransition, ValidationError
from core.models import (
    AFTER_SENT,
    AuditEvent,
    BounceKind,
    Delivery,
    DeliveryAttempt,
    Status,
    Suppression,
    SuppressionReason,
    WebhookEvent,
)
from core.validation import normalize_address
from core.webhook_payloads import BOUNCED, COMPLAINED, DELIVERED, ParsedEvent

if TYPE_CHECKING:
    from core.bootstrap import App

log = logging.getLogger(__name__)

# What processing concluded (webhook_events.outcome)
APPLIED = "applied"  # the delivery moved
UNCHANGED = "unchanged"  # a duplicate, an earlier state, or an event that moves nothing
UNMATCHED = "unmatched"  # no delivery has this message id: kept and counted
NOT_SENT = "not_sent"  # the delivery is failed, canceled or held: nothing to move


def rank(status: str, bounce_kind: str | None) -> int:
    """The order states after sent climb in; -1 for states no event may move."""
    if status == Status.SENT:
        return 0
    if status == Status.BOUNCED:
        return 4 if bounce_kind == BounceKind.HARD else 1
    return {Status.DELIVERED: 2, Status.COMPLAINED: 3}.get(Status(status), -1)


_EVENT_STATUS = {
    DELIVERED: Status.DELIVERED,
    BOUNCED: Status.BOUNCED,
    COMPLAINED: Status.COMPLAINED,
}


def _insert(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def store_event(session: Session, event: ParsedEvent, *, now: datetime) -> tuple[int, bool]:
    """Insert the event unless (provider, event id) is already there: (row id, inserted).

    The caller commits; the receiver answers 2xx only after that commit.
    """
    result = session.execute(
        _insert(session)(WebhookEvent)
        .values(
            provider=event.provider,
            event_id=event.event_id,
            type=event.type,
            bounce_kind=event.bounce_kind,
            provider_message_id=event.provider_message_id,
            recipient=event.recipient,
            occurred_at=event.occurred_at,
            received_at=now,
            payload={**event.payload, "delivery_hint": str(event.delivery_hint or "") or None},
        )
        .on_conflict_do_nothing(index_elements=["provider", "event_id"])
        .returning(WebhookEvent.id)
    )
    row = result.first()
    if row is not None:
        return int(row[0]), True
    existing = session.scalar(
        select(WebhookEvent.id).where(
            WebhookEvent.provider == event.provider, WebhookEvent.event_id == event.event_id
        )
    )
    assert existing is not None
    return int(existing), False


def find_delivery(session: Session, event: WebhookEvent) -> Delivery | None:
    """The delivery an event is about: the delivery id the letter (never a notice) carried as
    a tag, a primary-key probe; else the message id recorded at send, on the row, then on its
    attempts (both indexed)."""
    hint = (event.payload or {}).get("delivery_hint")
    if hint:
        try:
            row = session.get(Delivery, uuid.UUID(str(hint)))
        except ValueError:
            row = None
        if row is not None:
            return row
    message_id = event.provider_message_id
    if not message_id:
        return None
    row = session.scalar(
        select(Delivery).where(
            Delivery.provider_message_id == message_id, Delivery.provider == event.provider
        )
    )
    if row is not None:
        return row
    delivery_id = session.scalar(
        select(DeliveryAttempt.delivery_id)
        .where(
            DeliveryAttempt.provider_message_id == message_id,
            DeliveryAttempt.provider == event.provider,
        )
        .limit(1)
    )
    return session.get(Delivery, delivery_id) if delivery_id is not None else None


@dataclass(frozen=True)
class Processed:
    outcome: str | None  # None: left for later (its delivery is not recorded as sent yet)
    delivery_id: uuid.UUID | None = None
    status: str | None = None
    notify: bool = False
    repeated: bool = False  # processed before: nothing done this time


def process_event(session: Session, event_id: int, *, now: datetime) -> Processed:
    """Apply one stored event once; the caller commits. Safe to call again for the same event."""
    event = session.get(WebhookEvent, event_id, with_for_update=True, populate_existing=True)
    if event is None or event.processed_at is not None:
        return Processed(event.outcome if event else None, repeated=True)
    delivery = find_delivery(session, event)
    address = event.recipient or (delivery.recipient_email if delivery else None)
    reason = _dead_reason(event)
    if address and reason:
        suppress(
            session,
            address,
            reason,
            now=now,
            actor=f"webhook:{event.provider}",
            source_event_id=event.id,
            delivery_id=delivery.id if delivery else None,
        )
    if delivery is None:
        return _finish(session, event, Processed(UNMATCHED), now)
    if delivery.status in (Status.SCHEDULED, Status.PROCESSING):
        # The provider answered faster than the worker recorded "sent": the backstop comes back.
        return Processed(None, delivery.id, delivery.status)
    if delivery.status not in AFTER_SENT:
        return _finish(session, event, Processed(NOT_SENT, delivery.id, delivery.status), now)
    target = _EVENT_STATUS.get(event.type)
    if target is None:
        return _finish(session, event, Processed(UNCHANGED, delivery.id, delivery.status), now)
    return _climb(session, event, delivery, target, now)


def _dead_reason(event: WebhookEvent) -> SuppressionReason | None:
    """Why the event proves its address dead (a complaint, a hard bounce); None if it does not."""
    if event.type == COMPLAINED:
        return SuppressionReason.COMPLAINT
    if event.type == BOUNCED and event.bounce_kind == BounceKind.HARD:
        return SuppressionReason.HARD_BOUNCE
    return None


def _climb(
    session: Session, event: WebhookEvent, delivery: Delivery, target: Status, now: datetime
) -> Processed:
    """Move the delivery to `target` if that is higher in `rank`; compare again after a twin
    event moved it first."""
    kind = event.bounce_kind if target == Status.BOUNCED else None
    for _ in range(5):
        if rank(target, kind) <= rank(delivery.status, delivery.bounce_kind):
            outcome = Processed(UNCHANGED, delivery.id, delivery.status)
            return _finish(session, event, outcome, now)
        previous = delivery.status
        try:
            _transition(
                session,
                delivery,
                f"mark {target}",
                set(AFTER_SENT),
                now,
                status=target,
                bounce_kind=kind,
                reported_at=event.occurred_at or now,
            )
        except InvalidTransition:
            delivery = _load(session, delivery.id)  # a twin event moved it: compare again
            continue
        notify = _record_move(session, event, delivery, target, kind, previous, now)
        return _finish(session, event, Processed(APPLIED, delivery.id, target, notify), now)
    raise InvalidTransition(delivery.id, delivery.status, f"mark {target}")


def _record_move(
    session: Session,
    event: WebhookEvent,
    delivery: Delivery,
    target: Status,
    kind: str | None,
    previous: str,
    now: datetime,
) -> bool:
    """Audit the move; a hard bounce asks for the owner's notice. True when it asked."""
    audit.record(
        session,
        f"delivery.{target}",
        actor=f"webhook:{event.provider}",
        now=now,
        delivery_id=delivery.id,
        data={
            "from": previous,
            "event": event.event_id,
            "provider": event.provider,
            "bounce_kind": kind,
        },
    )
    if target == Status.BOUNCED and kind == BounceKind.HARD:
        return notifications.request(
            session,
            delivery.id,
            delivery.user_id,
            delivery.idempotency_key,
            requested_by=f"webhook:{event.provider}",
            now=now,
            kind=notifications.DELIVERY_BOUNCED,
        )
    return False


def _finish(session: Session, event: WebhookEvent, result: Processed, now: datetime) -> Processed:
    session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == event.id)
        .values(processed_at=now, outcome=result.outcome, delivery_id=result.delivery_id)
    )
    if result.outcome == UNMATCHED:
        log.info("webhook event %s from %s matches no delivery", event.id, event.provider)
    return result


def process_and_notify(app: App, event_id: int, *, now: datetime) -> Processed:
    """Process one event in its own transaction, then send the owner's notice if it asked one."""
    with session_scope(app.session_factory) as session:
        result = process_event(session, event_id, now=now)
        session.commit()
        kind = session.execute(
            select(WebhookEvent.provider, WebhookEvent.type).where(WebhookEvent.id == event_id)
        ).one_or_none()
    if result.outcome is not None and kind is not None and not result.repeated:
        from core.metrics import WEBHOOK_EVENTS

        WEBHOOK_EVENTS.labels(kind.provider, kind.type, result.outcome).inc()
    if result.notify and result.delivery_id is not None:
        notifications.send_pending(app, now=now, delivery_id=result.delivery_id)
    return result


def process_pending(app: App, *, now: datetime, older_than: datetime, limit: int = 500) -> int:
    """The backstop's share: events stored but not processed (a lost task, an event that came
    before its delivery was recorded as sent). Returns how many were processed."""
    with session_scope(app.session_factory) as session:
        ids = session.scalars(
            select(WebhookEvent.id)
            .where(WebhookEvent.processed_at.is_(None), WebhookEvent.received_at <= older_than)
            .order_by(WebhookEvent.received_at)
            .limit(limit)
        ).all()
    done = 0
    for event_id in ids:
        try:
            if process_and_notify(app, event_id, now=now).outcome is not None:
                done += 1
        except Exception:
            log.exception("webhook event %s could not be processed", event_id)
    return done


# ---------------------------------------------------------------- suppression list


def _address(value: str) -> str:
    return normalize_address(value, "address").lower()


def suppress(
    session: Session,
    address: str,
    reason: str,
    *,
    now: datetime,
    actor: str,
    source_event_id: int | None = None,
    delivery_id: uuid.UUID | None = None,
) -> bool:
    """Put an address on the list (no-op if it is there); True when it was added. The caller
    commits."""
    try:
        clean = _address(address)
    except ValidationError:
        log.warning("webhook event %s names an unusable address; not suppressed", source_event_id)
        return False
    result = session.execute(
        _insert(session)(Suppression)
        .values(
            address=clean,
            reason=SuppressionReason(reason),
            source_event_id=source_event_id,
            created_by=actor,
            created_at=now,
        )
        .on_conflict_do_nothing(
            index_elements=["address"],
            index_where=Suppression.removed_at.is_(None),
        )
        .returning(Suppression.id)
    )
    added = result.first() is not None
    if added:
        audit.record(
            session,
            "suppression.added",
            actor=actor,
            now=now,
            delivery_id=delivery_id,
            data={"address": clean, "reason": str(reason), "event": source_event_id},
        )
    return added


def add_suppression(
    session_factory: SessionFactory, address: str, *, now: datetime, actor: str, reason: str
) -> bool:
    """Support puts an address on the list by hand (reason "manual")."""
    clean = _address(address)
    with session_scope(session_factory) as session:
        added = suppress(session, clean, SuppressionReason.MANUAL, now=now, actor=actor)
        if added:
            audit.record(
                session,
                "suppression.note",
                actor=actor,
                now=now,
                reason=reason,
                data={"address": clean},
            )
        session.commit()
    return added


def live_suppression(session: Session, address: str) -> Suppression | None:
    return session.scalar(
        select(Suppression).where(
            Suppression.address == address.strip().lower(), Suppression.removed_at.is_(None)
        )
    )


def remove_suppression(
    session_factory: SessionFactory, address: str, *, now: datetime, actor: str, reason: str
) -> None:
    """Take an address off the list (kept as removed, with who and why); held letters to it
    stay held until someone releases them."""
    clean = _address(address)
    with session_scope(session_factory) as session:
        row = live_suppression(session, clean)
        if row is None:
            raise ValidationError("address", f"{clean} is not on the suppression list")
        session.execute(
            update(Suppression)
            .where(Suppression.id == row.id, Suppression.removed_at.is_(None))
            .values(removed_at=now, removed_by=actor, removed_reason=reason)
        )
        audit.record(
            session,
            "suppression.removed",
            actor=actor,
            now=now,
            reason=reason,
            data={"address": clean, "was": row.reason},
        )
        session.commit()


def list_suppressions(session: Session, *, include_removed: bool = False) -> list[dict[str, Any]]:
    query = select(Suppression).order_by(Suppression.id)
    if not include_removed:
        query = query.where(Suppression.removed_at.is_(None))
    return [
        {
            "address": s.address,
            "reason": s.reason,
            "created_at": s.created_at,
            "created_by": s.created_by,
            "removed_at": s.removed_at,
            "removed_by": s.removed_by,
            "removed_reason": s.removed_reason,
        }
        for s in session.scalars(query)
    ]


# ---------------------------------------------------------------- held letters


def suppressed() -> ColumnElement[bool]:
    """For a query on deliveries: the row's address is on the list, and no one released the
    row since the address was listed. Batch claims leave such rows to their own run (held)."""
    live = and_(
        Suppression.address == func.lower(Delivery.recipient_email),
        Suppression.removed_at.is_(None),
    )
    released_since = exists().where(
        AuditEvent.delivery_id == Delivery.id,
        AuditEvent.type == "delivery.released",
        AuditEvent.created_at >= Suppression.created_at,
    )
    return exists().where(live, ~released_since)


def hold_if_suppressed(session: Session, delivery_id: uuid.UUID, *, now: datetime) -> bool:
    """scheduled (due, in no live batch) → held when `suppressed()`. Runs before the claim;
    the caller commits. True when it held."""
    result = session.execute(
        update(Delivery)
        .execution_options(synchronize_session=False)
        .where(
            Delivery.id == delivery_id,
            Delivery.status == Status.SCHEDULED,
            Delivery.next_attempt_at <= now,
            # still in its batch: a replay repeats the identical request, this letter included
            Delivery.batch_id.is_(None),
            suppressed(),
        )
        .values(
            status=Status.HELD,
            held_at=now,
            task_id=None,
            dispatched_at=None,
            version=Delivery.version + 1,
            updated_at=now,
        )
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    audit.record(
        session,
        "delivery.held",
        actor=audit.SYSTEM,
        now=now,
        delivery_id=delivery_id,
        reason="the recipient address is on the suppression list",
    )
    return True


def release_held(
    deps: Deps,
    delivery_id: uuid.UUID,
    *,
    now: datetime,
    actor: str,
    reason: str,
) -> str | None:
    """held → scheduled, due now: support decided it may go to this address after all (the
    release is remembered, so the suppression does not hold it again). Returns the task id."""
    if not reason.strip():
        raise ValidationError("reason", "a release needs a reason")
    with session_scope(deps.session_factory) as session:
        row = _load(session, delivery_id)
        _transition(
            session,
            row,
            "release",
            {Status.HELD},
            now,
            status=Status.SCHEDULED,
            next_attempt_at=now,
            held_at=None,
            task_id=None,
            dispatched_at=None,
        )
        audit.record(
            session,
            "delivery.released",
            actor=actor,
            now=now,
            delivery_id=row.id,
            reason=reason,
            data={"address": row.recipient_email},
        )
        session.commit()
    return dispatch(deps.session_factory, deps.enqueuer, delivery_id, now, now)
