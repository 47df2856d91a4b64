"""`capsule delivery …`: one letter's delivery (schedule, status, reschedule, cancel, requeue,
release, redirect). Commands that change a delivery record who did it and why in the audit trail."""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import select

from core.bootstrap import App
from core.db import session_scope
from core.deliveries import (
    cancel_delivery,
    find_user,
    requeue_delivery,
    reschedule_delivery,
    schedule_delivery,
)
from core.deps import Deps
from core.errors import DeliveryNotFound
from core.models import Delivery, DeliveryAttempt, WebhookEvent
from core.policy import parse_when, utcnow
from core.redirect import redirect_delivery
from core.webhooks import release_held
from tasks.cli.common import (
    ACTOR_HELP,
    Command,
    actor,
    add_audit_flags,
    delivery_id,
    get_app,
    read_stdin_text,
    reason,
)

WHEN_HELP = "ISO 8601 time or +30s, +2h, +3d, +1w"
STATUS_FIELDS = (
    "status",
    "recipient_email",
    "deliver_at",
    "next_attempt_at",
    "attempt_count",
    "task_id",
    "dispatched_at",
    "lease_until",
    "error_class",
    "last_error",
    "provider",
    "provider_message_id",
    "sent_at",
    "failed_at",
    "canceled_at",
    "bounce_kind",
    "reported_at",
    "held_at",
    "created_at",
    "updated_at",
)


def cmd_schedule(args: argparse.Namespace) -> int:
    app = get_app()
    now = utcnow()
    body = args.body if args.body is not None else read_stdin_text("the letter")
    with session_scope(app.session_factory) as session:
        user_id = find_user(session, args.user).id
    result = schedule_delivery(
        app,
        user_id=user_id,
        recipient=args.to,
        subject=args.subject,
        body=body,
        deliver_at=parse_when(args.at, now),
        now=now,
        actor=actor(args),
    )
    print(result.delivery_id)
    return 0


def _schedule_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", required=True, help="account email of the letter's owner")
    p.add_argument("--to", required=True, help="recipient address")
    p.add_argument("--at", required=True, help=WHEN_HELP)
    p.add_argument("--subject", required=True)
    p.add_argument("--body", help="letter text (default: read stdin, UTF-8)")
    p.add_argument("--actor", help=ACTOR_HELP)


def delivery_status(app: App, delivery_id: uuid.UUID) -> dict[str, Any]:
    """The delivery and its attempts as plain data, without the letter text."""
    with session_scope(app.session_factory) as session:
        row = session.get(Delivery, delivery_id)
        if row is None:
            raise DeliveryNotFound(delivery_id)
        attempts = session.scalars(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id == delivery_id)
            .order_by(DeliveryAttempt.id)
        ).all()
        events = session.scalars(
            select(WebhookEvent)
            .where(WebhookEvent.delivery_id == delivery_id)
            .order_by(WebhookEvent.id)
        ).all()
        data: dict[str, Any] = {"id": str(row.id), **{f: getattr(row, f) for f in STATUS_FIELDS}}
        data["attempts"] = [
            {
                "run": a.run_number,
                "provider": a.provider,
                "outcome": a.outcome,
                "status_code": a.status_code,
                "error_code": a.provider_error_code,
                "error": a.error_message,
                "duration_ms": a.duration_ms,
                "task_id": a.task_id,
                "started_at": a.started_at,
            }
            for a in attempts
        ]
        data["provider_events"] = [
            {
                "provider": e.provider,
                "type": e.type,
                "bounce_kind": e.bounce_kind,
                "occurred_at": e.occurred_at,
                "received_at": e.received_at,
                "outcome": e.outcome,
            }
            for e in events
        ]
    return data


def cmd_status(args: argparse.Namespace) -> int:
    data = delivery_status(get_app(), delivery_id(args.id))
    print(
        json.dumps(
            data, indent=2, default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v)
        )
    )
    return 0


def _id_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("id")


def _id_and_audit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id")
    add_audit_flags(p)


def cmd_reschedule(args: argparse.Namespace) -> int:
    who, why = actor(args), reason(args)  # refused before anything is opened
    app = get_app()
    now = utcnow()
    reschedule_delivery(
        app,
        delivery_id(args.id),
        parse_when(args.at, now),
        now=now,
        actor=who,
        reason=why,
    )
    print(f"rescheduled {args.id}")
    return 0


def _reschedule_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id")
    p.add_argument("--at", required=True, help=WHEN_HELP)
    add_audit_flags(p)


class _Change(Protocol):
    """A transition an operator asks for on one delivery (cancel, requeue, release)."""

    def __call__(
        self,
        deps: Deps,
        delivery_id: uuid.UUID,
        /,
        *,
        now: datetime,
        actor: str,
        reason: str,
    ) -> object: ...


def _change(args: argparse.Namespace, transition: _Change, done: str) -> int:
    who, why = actor(args), reason(args)  # refused before anything is opened
    app = get_app()
    transition(
        app,
        delivery_id(args.id),
        now=utcnow(),
        actor=who,
        reason=why,
    )
    print(done)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    return _change(args, cancel_delivery, f"canceled {args.id}")


def cmd_requeue(args: argparse.Namespace) -> int:
    return _change(args, requeue_delivery, f"requeued {args.id}")


def cmd_release(args: argparse.Namespace) -> int:
    return _change(args, release_held, "released")


def cmd_redirect(args: argparse.Namespace) -> int:
    who, why = actor(args), reason(args)  # refused before anything is opened
    app = get_app()
    result = redirect_delivery(
        app, delivery_id(args.id), args.to, now=utcnow(), actor=who, reason=why
    )
    print(result.new_id)
    return 0


def _redirect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id")
    p.add_argument("--to", required=True, help="the corrected recipient address")
    add_audit_flags(p)


COMMANDS = (
    Command(
        "delivery schedule",
        cmd_schedule,
        "schedule a letter; prints the delivery id",
        _schedule_arguments,
        aliases=("schedule",),
    ),
    Command(
        "delivery status",
        cmd_status,
        "print a delivery and its attempts as JSON (never the letter)",
        _id_argument,
        aliases=("status",),
    ),
    Command(
        "delivery reschedule",
        cmd_reschedule,
        "move a scheduled delivery to a new time",
        _reschedule_arguments,
        aliases=("reschedule",),
    ),
    Command(
        "delivery cancel",
        cmd_cancel,
        "cancel a scheduled or failed delivery (refunds its credit)",
        _id_and_audit_arguments,
        aliases=("cancel",),
    ),
    Command(
        "delivery requeue",
        cmd_requeue,
        "send a failed delivery again now",
        _id_and_audit_arguments,
        aliases=("requeue",),
    ),
    Command(
        "delivery release",
        cmd_release,
        "send a letter held for a suppressed address after all (due now)",
        _id_and_audit_arguments,
        aliases=("release",),
    ),
    Command(
        "delivery redirect",
        cmd_redirect,
        "send the letter of a failed or hard-bounced delivery to a corrected address, due now; "
        "prints the new delivery id",
        _redirect_arguments,
    ),
)
