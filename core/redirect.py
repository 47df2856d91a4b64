"""Send a letter that could not reach its address to a corrected one.

    failed            → canceled (credit refunded)    + a new delivery, scheduled, due now
    bounced (hard)    → bounced (unchanged)           + a new delivery, scheduled, due now

The owner wrote to an address that no longer works (a hard bounce years later, or an address
the provider refused) and tells support the one that does. The letter is the same row, still
sealed; the new delivery has its own idempotency key, attempts, credit and audit trail, and
the old one stays as the record of what happened. The new delivery takes a credit like any
other (a failed row's own credit is refunded first, so redirecting a failure costs nothing
more; a bounced letter's credit paid for the send the provider accepted).

A letter has at most one delivery that may still reach someone: a sibling that is scheduled,
processing, held, failed (redirect that one instead), sent, delivered, soft-bounced or
complained refuses the redirect; canceled and hard-bounced siblings do not.

One transaction: the old row's compare-and-set, the new row, its credit and both audit events.
Two operators redirecting the same delivery at once: one wins, the other gets
InvalidTransition. Nothing changes when any check fails.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from core import audit, credits
from core.db import session_scope
from core.deliveries import _load, _transition
from core.deps import Deps
from core.dispatch import dispatch
from core.errors import InvalidTransition, ValidationError
from core.models import BounceKind, Delivery, Status
from core.validation import normalize_address
from core.webhooks import live_suppression


@dataclass(frozen=True)
class Redirected:
    old_id: uuid.UUID
    new_id: uuid.UUID
    task_id: str | None  # None: the broker was down; the dispatcher queues it


def _hard_bounced(status: str, bounce_kind: str | None) -> bool:
    return status == Status.BOUNCED and bounce_kind == BounceKind.HARD


def redirectable(status: str, bounce_kind: str | None) -> bool:
    """Whether a delivery in this state may be redirected (the console asks before it offers)."""
    return status == Status.FAILED or _hard_bounced(status, bounce_kind)


def _spent(row: Delivery) -> bool:
    """A sibling that can no longer reach anyone."""
    return row.status == Status.CANCELED or _hard_bounced(row.status, row.bounce_kind)


def redirect_delivery(
    deps: Deps,
    delivery_id: uuid.UUID,
    recipient: str,
    *,
    now: datetime,
    actor: str,
    reason: str,
) -> Redirected:
    """Schedule the letter of a failed or hard-bounced delivery to `recipient`, due now."""
    if not reason.strip():
        raise ValidationError("reason", "a redirect needs a reason")
    address = normalize_address(recipient)
    new_id = uuid.uuid4()
    with session_scope(deps.session_factory) as session:
        row = _load(session, delivery_id)
        if not redirectable(row.status, row.bounce_kind):
            shown = f"{row.status} ({row.bounce_kind})" if row.bounce_kind else row.status
            raise InvalidTransition(row.id, shown, "redirect")
        if address.lower() == row.recipient_email.lower():  # as the suppression list compares
            raise ValidationError(
                "recipient", f"{address} is the address it could not reach; give a new one"
            )
        suppressed = live_suppression(session, address)
        if suppressed is not None:
            raise ValidationError(
                "recipient",
                f"{address} is on the suppression list ({suppressed.reason}); "
                "remove it first or give another address",
            )
        for sibling in session.scalars(
            select(Delivery).where(Delivery.letter_id == row.letter_id, Delivery.id != row.id)
        ):
            if not _spent(sibling):
                raise ValidationError(
                    "delivery",
                    f"this letter already has delivery {sibling.id} ({sibling.status}); "
                    "a letter is redirected from its latest delivery only",
                )
        if row.status == Status.FAILED:
            _transition(
                session,
                row,
                "redirect",
                {Status.FAILED},
                now,
                status=Status.CANCELED,
                canceled_at=now,
                task_id=None,
                lease_until=None,
            )
            credits.refund(session, row.user_id, row.id, now)
        else:  # the bounced row keeps its status; the version makes a racing redirect fail
            _transition(session, row, "redirect", {Status.BOUNCED}, now)
        session.add(
            Delivery.scheduled(
                id=new_id,
                letter_id=row.letter_id,
                user_id=row.user_id,
                recipient_email=address,
                deliver_at=now,
                now=now,
            )
        )
        session.flush()
        credits.reserve(session, row.user_id, new_id, now)
        audit.record(
            session,
            "delivery.redirected",
            actor=actor,
            now=now,
            delivery_id=row.id,
            reason=reason,
            data={"from": row.status, "to_delivery": str(new_id), "address": address},
        )
        audit.record(
            session,
            "delivery.scheduled",
            actor=actor,
            now=now,
            delivery_id=new_id,
            reason=reason,
            data={"deliver_at": now.isoformat(), "redirected_from": str(row.id)},
        )
        session.commit()
    task_id = dispatch(deps.session_factory, deps.enqueuer, new_id, now, now)
    return Redirected(delivery_id, new_id, task_id)
