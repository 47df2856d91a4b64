"""Realistic demo data: two weeks of deliveries in every state, for the console and `make run`.

Rows are written directly (not through the transitions) so seeding a few thousand takes
seconds; what they hold is what the transitions would have written.
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import credits
from core.crypto import Keyring
from core.models import (
    AuditEvent,
    CreditEntry,
    Delivery,
    DeliveryAttempt,
    Letter,
    Notification,
    ReconcilerRun,
    Status,
    User,
)

DEMO_DOMAIN = "demo.capsule.localhost"
FIRST_NAMES = [
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Ken",
    "Margaret",
    "Linus",
    "Frances",
    "Dennis",
]
SUBJECTS = [
    "To me, in five years",
    "Open on your birthday",
    "Did you keep running?",
    "A note from the old flat",
    "Read this after the move",
]
FAILURES = [
    ("transient", "resend", 503, "internal_server_error", "Resend answered 503"),
    ("transient", "postmark", 429, "rate_limited", "Postmark answered 429; retry after 30 s"),
    ("permanent", "resend", 422, "validation_error", "Invalid `to` field"),
    ("permanent", "postmark", 422, "406", "Recipient marked inactive (hard bounce)"),
    ("ambiguous", "resend", None, "read_timeout", "read timed out after the request was sent"),
    (
        "possibly_sent",
        "resend",
        409,
        "invalid_idempotent_request",
        "key reused with another payload",
    ),
]


def is_seeded(session: Session) -> bool:
    return (
        session.scalar(select(User.id).where(User.email.like(f"%@{DEMO_DOMAIN}")).limit(1))
        is not None
    )


def seed(
    session: Session, keyring: Keyring, now: datetime, *, count: int = 3000, seed: int = 7
) -> dict[str, int]:
    """Add demo users and `count` deliveries spread over the last 14 days; the caller commits."""
    rng = random.Random(seed)
    users = []
    for i, first in enumerate(FIRST_NAMES * 3):
        user = User(
            email=f"{first.lower()}{i}@{DEMO_DOMAIN}",
            name=f"{first} {i}",
            created_at=now - timedelta(days=30),
        )
        session.add(user)
        users.append(user)
    session.flush()
    for user in users:
        credits.grant(session, user.id, 1000, now - timedelta(days=30))

    counts: dict[str, int] = {}
    for _ in range(count):
        status, delivery = _one(session, keyring, rng, rng.choice(users), now)
        counts[status] = counts.get(status, 0) + 1
    for minute in range(1, 11):  # a few letters due in the next minutes, for the live demo
        _, delivery = _one(
            session, keyring, rng, rng.choice(users), now, due=now + timedelta(minutes=minute)
        )
        counts["due_soon"] = counts.get("due_soon", 0) + 1
    _runs(session, rng, now)
    return counts


def _pick_status(rng: random.Random) -> str:
    roll = rng.random()
    for status, cut in (
        ("sent", 0.74),
        ("failed", 0.82),
        ("canceled", 0.86),
        ("scheduled", 0.97),
        ("stuck", 0.985),
    ):
        if roll < cut:
            return status
    return "processing"


_Event = tuple[str, str, datetime, dict[str, Any]]


def _pick_due(rng: random.Random, status: str, created: datetime, now: datetime) -> datetime:
    """When a seeded letter is due: years ahead if still scheduled, else since its creation."""
    if status == "scheduled":
        return now + timedelta(
            days=rng.choice([2, 30, 365, 365 * 5, 365 * 20]), seconds=rng.uniform(0, 86400)
        )
    return created + timedelta(
        seconds=rng.uniform(60, max(120.0, (now - created).total_seconds() - 60))
    )


def _one(
    session: Session,
    keyring: Keyring,
    rng: random.Random,
    user: User,
    now: datetime,
    due: datetime | None = None,
) -> tuple[str, Delivery]:
    created = now - timedelta(days=14) + timedelta(seconds=rng.uniform(0, 14 * 86400 - 600))
    status = "scheduled" if due else _pick_status(rng)
    if due is None:
        due = _pick_due(rng, status, created, now)
    delivery = _write_scheduled(session, keyring, rng, user, created, due)
    events: list[_Event] = [
        ("delivery.scheduled", user.email, created, {"deliver_at": due.isoformat()})
    ]
    if status == "sent":
        events += _seed_sent(session, rng, delivery, due)
    elif status == "failed":
        events += _seed_failed(session, rng, delivery, due)
    elif status == "canceled":
        events += _seed_canceled(session, rng, delivery, created, user.email)
    elif status == "stuck":
        _seed_stuck(rng, delivery, now)
    elif status == "processing":
        _seed_processing(rng, delivery, now)
    for type_, actor, at, data in events:
        session.add(
            AuditEvent(type=type_, actor=actor, delivery_id=delivery.id, data=data, created_at=at)
        )
    return status, delivery


def _write_scheduled(
    session: Session,
    keyring: Keyring,
    rng: random.Random,
    user: User,
    created: datetime,
    due: datetime,
) -> Delivery:
    """The sealed letter, its scheduled delivery and the credit it reserved."""
    letter_id, delivery_id = uuid.uuid4(), uuid.uuid4()
    sealed = keyring.seal(
        letter_id,
        rng.choice(SUBJECTS),
        "Dear future me,\n\n" + "I hope this finds you well. " * rng.randint(2, 30),
    )
    session.add(
        Letter(
            id=letter_id,
            user_id=user.id,
            key_id=sealed.key_id,
            subject_ciphertext=sealed.subject,
            body_ciphertext=sealed.body,
            created_at=created,
        )
    )
    session.flush()  # letters before the deliveries that reference them
    delivery = Delivery.scheduled(
        id=delivery_id,
        letter_id=letter_id,
        user_id=user.id,
        recipient_email=user.email,
        deliver_at=due,
        now=created,
    )
    session.add(delivery)
    session.flush()
    session.add(
        CreditEntry(
            user_id=user.id,
            delivery_id=delivery_id,
            amount=-1,
            reason="reserve",
            created_at=created,
        )
    )
    return delivery


def _seed_sent(
    session: Session, rng: random.Random, delivery: Delivery, due: datetime
) -> list[_Event]:
    """Sent on time (or rescued by the backstop), after a failover to Postmark now and then."""
    rescued = rng.random() < 0.03
    late = rng.uniform(60, 150) if rescued else rng.lognormvariate(-1.2, 0.6)
    sent_at = due + timedelta(seconds=late)
    provider = "postmark" if rng.random() < 0.08 else "resend"
    if provider == "postmark":
        _attempt(
            session,
            delivery,
            rng,
            "resend",
            "transient",
            due,
            503,
            "internal_server_error",
            "Resend answered 503",
        )
    _attempt(
        session,
        delivery,
        rng,
        provider,
        "accepted",
        sent_at,
        200,
        None,
        None,
        message_id=uuid.uuid4().hex,
    )
    delivery.status, delivery.sent_at, delivery.provider = Status.SENT, sent_at, provider
    delivery.attempt_count = delivery.round_attempts = 1
    delivery.updated_at = sent_at
    events: list[_Event] = []
    if rescued:
        events.append(("backstop.redispatched", "backstop", due + timedelta(seconds=60), {}))
    events.append(("delivery.sent", "system", sent_at, {"provider": provider}))
    return events


def _seed_failed(
    session: Session, rng: random.Random, delivery: Delivery, due: datetime
) -> list[_Event]:
    """Failed after its attempts: refunded if permanent, its owner notified."""
    error_class, provider, code, error_code, message = rng.choice(FAILURES)
    runs = 5 if error_class == "transient" else 1
    at = due
    for run in range(runs):
        _attempt(
            session,
            delivery,
            rng,
            provider,
            error_class,
            at,
            code,
            error_code,
            message,
            run=run + 1,
        )
        at += timedelta(seconds=30 * 2**run)
    delivery.status, delivery.failed_at, delivery.error_class, delivery.last_error = (
        Status.FAILED,
        at,
        error_class,
        message,
    )
    delivery.attempt_count = delivery.round_attempts = runs
    delivery.updated_at = at
    if error_class == "permanent":
        _refund(session, delivery, at)
    session.add(
        Notification(
            delivery_id=delivery.id,
            user_id=delivery.user_id,
            kind="delivery_failed",
            status="sent",
            idempotency_key=f"{delivery.idempotency_key}-delivery_failed",
            requested_by="system",
            attempts=1,
            provider="resend",
            created_at=at,
            sent_at=at,
        )
    )
    return [("delivery.failed", "system", at, {"error_class": error_class})]


def _seed_canceled(
    session: Session, rng: random.Random, delivery: Delivery, created: datetime, actor: str
) -> list[_Event]:
    """Canceled by its owner soon after scheduling, the credit refunded."""
    at = created + timedelta(seconds=rng.uniform(10, 3600))
    delivery.status, delivery.canceled_at, delivery.updated_at = Status.CANCELED, at, at
    _refund(session, delivery, at)
    return [("delivery.canceled", actor, at, {"refunded": True})]


def _refund(session: Session, delivery: Delivery, at: datetime) -> None:
    session.add(
        CreditEntry(
            user_id=delivery.user_id,
            delivery_id=delivery.id,
            amount=1,
            reason="refund",
            created_at=at,
        )
    )


def _seed_stuck(rng: random.Random, delivery: Delivery, now: datetime) -> None:
    """Due, dispatched, never claimed: the backstop's work."""
    delivery.next_attempt_at = delivery.deliver_at = now - timedelta(minutes=rng.uniform(3, 40))
    delivery.task_id, delivery.dispatched_at = uuid.uuid4().hex, delivery.deliver_at


def _seed_processing(rng: random.Random, delivery: Delivery, now: datetime) -> None:
    """A worker died holding it: lease expired."""
    delivery.deliver_at = delivery.next_attempt_at = now - timedelta(minutes=rng.uniform(10, 30))
    delivery.status, delivery.task_id = Status.PROCESSING, uuid.uuid4().hex
    delivery.lease_until = now - timedelta(minutes=rng.uniform(1, 5))
    delivery.attempt_count = delivery.round_attempts = 1


def _attempt(
    session: Session,
    delivery: Delivery,
    rng: random.Random,
    provider: str,
    outcome: str,
    at: datetime,
    code: int | None,
    error_code: str | None,
    message: str | None,
    *,
    run: int = 1,
    message_id: str | None = None,
) -> None:
    session.add(
        DeliveryAttempt(
            delivery_id=delivery.id,
            run_number=run,
            task_id=uuid.uuid4().hex,
            provider=provider,
            outcome=outcome,
            status_code=code,
            provider_error_code=error_code,
            error_message=message,
            provider_message_id=message_id,
            duration_ms=int(rng.lognormvariate(4.5, 0.5)),
            started_at=at,
        )
    )


def _runs(session: Session, rng: random.Random, now: datetime) -> None:
    start = (now - timedelta(days=14)).replace(second=0, microsecond=0)
    slot = start
    while slot < now - timedelta(minutes=2):
        found = rng.choice([0] * 20 + [1, 1, 2, 3, 12])
        session.add(
            ReconcilerRun(
                kind="backstop",
                runner="demo",
                slot=slot,
                started_at=slot,
                finished_at=slot + timedelta(milliseconds=rng.uniform(5, 80)),
                found=found,
                requeued=found,
                recovered=1 if found > 2 else 0,
                errors=0,
                ok=True,
            )
        )
        slot += timedelta(minutes=10)
