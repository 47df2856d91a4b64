"""State transitions of a delivery, one function each.

    scheduled → processing → sent | failed        scheduled | failed → canceled
    processing → scheduled (retry, lease recovery)  failed → scheduled (requeue)

Every transition is one transaction with its audit event (and attempt rows, credit entries,
notification rows). Rows change only through compare-and-set updates on (id, status, version),
so two actors racing on one row cannot both win. Callers pass `now`; nothing here reads the
clock. Enqueueing happens after commit and is best effort (DESIGN.md invariant 3).
"""

from __future__ import annotations

import random
import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, insert, select, update
from sqlalchemy.orm import Session

from core import audit, credits, notifications
from core.config import Settings
from core.crypto import Keyring
from core.db import SessionFactory, session_scope
from core.dispatch import Enqueuer, dispatch, revoke_quietly
from core.errors import (
    DeliveryNotFound,
    InvalidAddress,
    InvalidDeliveryTime,
    InvalidTransition,
    LetterTooLarge,
    UserNotFound,
    ValidationError,
)
from core.models import AuditEvent, Delivery, DeliveryAttempt, ErrorClass, Letter, Status, User
from core.operators import validate_display_name
from core.outcomes import Outcome
from core.policy import backoff_seconds, deferral_seconds, lease_until, within_horizon

_ADDRESS = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
MAX_SUBJECT_CHARS = 300


def normalize_address(value: str, field: str = "recipient") -> str:
    """A trimmed address with a lower-cased domain; raises InvalidAddress."""
    candidate = (value or "").strip()
    if len(candidate) > 254 or ".." in candidate or not _ADDRESS.match(candidate):
        raise InvalidAddress(field, f"{field} {value!r} is not a valid email address")
    local, _, domain = candidate.rpartition("@")
    return f"{local}@{domain.lower()}"


def validate_deliver_at(deliver_at: datetime, now: datetime, max_years: int) -> None:
    if deliver_at.tzinfo is None:
        raise InvalidDeliveryTime("deliver_at", "deliver_at must be timezone-aware")
    if deliver_at <= now:
        raise InvalidDeliveryTime(
            "deliver_at", f"deliver_at {deliver_at.isoformat()} is not in the future"
        )
    if deliver_at > now + timedelta(days=366 * max_years):
        raise InvalidDeliveryTime(
            "deliver_at",
            f"deliver_at {deliver_at.isoformat()} is more than {max_years} years ahead",
        )


# A subject is one line of text. Control characters (Cc: CR, LF, VT, FF, U+0085, NUL, ESC, TAB
# too), line and paragraph separators (Zl, Zp) and invisible format characters (Cf: bidi
# overrides, zero-width spaces, BOM) cannot be put in a mail header or would let a subject
# look like something else; such a letter could never be sent. Zero-width (non-)joiners are
# kept, and emoji tag characters: emoji sequences and several scripts need them. Surrogates (Cs) are text that was not
# UTF-8 and cannot be stored.
_SUBJECT_REFUSED = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_SUBJECT_ALLOWED = frozenset({"\u200c", "\u200d"})
_CONTROL_NAMES = {
    "\t": "TAB",
    "\n": "LINE FEED",
    "\x0b": "VERTICAL TAB",
    "\x0c": "FORM FEED",
    "\r": "CARRIAGE RETURN",
    "\x85": "NEXT LINE",
    "\x00": "NUL",
    "\x1b": "ESCAPE",
}


def subject_problem(subject: str) -> str | None:
    """Why `subject` cannot be a mail subject line, or None; never quotes the subject."""
    for position, char in enumerate(subject, start=1):
        if char in _SUBJECT_ALLOWED or "\U000e0020" <= char <= "\U000e007f":
            continue  # joiners and emoji tag sequences (subdivision flags)
        category = unicodedata.category(char)
        if category in _SUBJECT_REFUSED:
            name = _CONTROL_NAMES.get(char) or unicodedata.name(char, "")
            label = f"U+{ord(char):04X}" + (f" {name}" if name else "")
            kind = (
                "text that is not UTF-8" if category == "Cs" else "a control or invisible character"
            )
            return f"the subject contains {kind} ({label}, character {position}); use one line of plain text"
    return None


def validate_letter(subject: str, body: str, max_bytes: int) -> None:
    """Refuse a letter that could never be sent as given (ValidationError naming the field)."""
    if not subject.strip():
        raise ValidationError("subject", "the subject is empty")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise ValidationError(
            "subject", f"the subject is longer than {MAX_SUBJECT_CHARS} characters"
        )
    problem = subject_problem(subject)
    if problem:
        raise ValidationError("subject", problem)
    if not body.strip():
        raise ValidationError("body", "the letter is empty")
    if any("\ud800" <= char <= "\udfff" for char in body):
        raise ValidationError("body", "the letter contains text that is not UTF-8")
    size = len(subject.encode()) + len(body.encode())
    if size > max_bytes:
        raise LetterTooLarge("body", f"the letter is {size} bytes; the limit is {max_bytes}")


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
    session_factory: SessionFactory,
    enqueuer: Enqueuer,
    keyring: Keyring,
    settings: Settings,
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
    address = normalize_address(recipient)
    validate_deliver_at(deliver_at, now, settings.max_schedule_years)
    validate_letter(subject, body, settings.max_letter_bytes)
    letter_id, delivery_id = uuid.uuid4(), uuid.uuid4()
    sealed = keyring.seal(letter_id, subject, body)
    with session_scope(session_factory) as session:
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
            Delivery(
                id=delivery_id,
                letter_id=letter_id,
                user_id=user_id,
                recipient_email=address,
                status=Status.SCHEDULED,
                deliver_at=deliver_at,
                next_attempt_at=deliver_at,
                idempotency_key=uuid.uuid4().hex,
                created_at=now,
                updated_at=now,
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
        task_id = dispatch(session_factory, enqueuer, delivery_id, deliver_at, now)
    return Scheduled(delivery_id, letter_id, deliver_at, task_id)


def cancel_delivery(
    session_factory: SessionFactory,
    enqueuer: Enqueuer,
    delivery_id: uuid.UUID,
    *,
    now: datetime,
    actor: str,
    reason: str | None = None,
) -> None:
    """scheduled | failed | held → canceled; refunds the credit and revokes the queued task."""
    with session_scope(session_factory) as session:
        row = _load(session, delivery_id)
        old_task = row.task_id
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
    revoke_quietly(enqueuer, old_task)


def reschedule_delivery(
    session_factory: SessionFactory,
    enqueuer: Enqueuer,
    settings: Settings,
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
    validate_deliver_at(deliver_at, now, settings.max_schedule_years)
    with session_scope(session_factory) as session:
        row = _load(session, delivery_id)
        old_task, old_time = row.task_id, row.deliver_at
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
    revoke_quietly(enqueuer, old_task)
    if within_horizon(deliver_at, now, settings.dispatch_horizon_seconds):
        return dispatch(session_factory, enqueuer, delivery_id, deliver_at, now)
    return None


def requeue_delivery(
    session_factory: SessionFactory,
    enqueuer: Enqueuer,
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
    with session_scope(session_factory) as session:
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
    return dispatch(session_factory, enqueuer, delivery_id, now, now)


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
        .where(
            Delivery.id == delivery_id,
            Delivery.status == Status.SCHEDULED,
            Delivery.next_attempt_at <= now,
        )
        .values(
            status=Status.PROCESSING,
            lease_until=lease_until(now, lease_seconds),
            task_id=task_id,
            attempt_count=Delivery.attempt_count + 1,
            round_attempts=Delivery.round_attempts + 1,
            version=Delivery.version + 1,
            updated_at=now,
        )
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


RETRYABLE = {ErrorClass.TRANSIENT, ErrorClass.AMBIGUOUS, ErrorClass.LEASE_EXPIRED}
# Classes a run may defer without spending an attempt. A missing key is never a failure: the
# letter waits for its key however long that takes.
DEFERRABLE = RETRYABLE | {ErrorClass.MISSING_KEY}


@dataclass(frozen=True)
class Recorded:
    status: str | None  # the row's new status; None when the row was no longer ours
    next_attempt_at: datetime | None = None
    notify: bool = False


def record_outcome(
    session: Session,
    claimed: Claim,
    outcome: Outcome,
    settings: Settings,
    *,
    now: datetime,
    rng: random.Random | None = None,
) -> Recorded:
    """Write the attempts and move the row to sent, back to scheduled (retry), or to failed.

    A success is recorded even if the lease ran out meanwhile (the message is out; a twin run
    would reuse the same idempotency key). A failure is recorded only by the run that still
    holds the row. The caller commits.
    """
    if outcome.calls:
        # One multi-row INSERT: this runs once per delivery and the ORM unit of work is costly.
        session.execute(
            insert(DeliveryAttempt),
            [
                {
                    "delivery_id": claimed.delivery_id,
                    "run_number": claimed.run_number,
                    "task_id": claimed.task_id,
                    "provider": call.provider,
                    "outcome": call.outcome,
                    "status_code": call.status_code,
                    "provider_error_code": call.error_code,
                    "error_message": call.message,
                    "provider_message_id": call.provider_message_id,
                    "duration_ms": call.duration_ms,
                    "started_at": call.started_at,
                }
                for call in outcome.calls
            ],
        )
    ours = (
        Delivery.id == claimed.delivery_id,
        Delivery.status == Status.PROCESSING,
        Delivery.task_id == claimed.task_id,
    )
    common = {"version": Delivery.version + 1, "updated_at": now, "lease_until": None}
    event_data: dict[str, Any] = {"task_id": claimed.task_id, "run": claimed.run_number}

    if outcome.sent:
        result = session.execute(
            update(Delivery)
            .execution_options(synchronize_session=False)
            .where(
                Delivery.id == claimed.delivery_id,
                Delivery.status.in_([Status.PROCESSING, Status.SCHEDULED]),
            )
            .values(
                status=Status.SENT,
                sent_at=now,
                provider=outcome.provider,
                provider_message_id=outcome.provider_message_id,
                error_class=None,
                last_error=None,
                **common,
            )
        )
        status: str | None = Status.SENT if _changed(result) else None
        event = "delivery.sent" if status else "delivery.outcome_discarded"
        audit.record(
            session,
            event,
            actor=audit.SYSTEM,
            now=now,
            delivery_id=claimed.delivery_id,
            data={**event_data, "provider": outcome.provider},
        )
        return Recorded(status)

    # A run that reached no provider (circuits open, rate limit closed) tried nothing: it
    # gives its attempt back and comes again once the gate may open, whatever the count.
    deferred = outcome.deferred and outcome.error_class in DEFERRABLE
    # No provider was asked at all: the run is not counted in the delivery's total either, or
    # a letter that waited days for its key would reach the failed retrier's cap unsent.
    uncounted = deferred and outcome.error_class == ErrorClass.MISSING_KEY and not outcome.calls
    retry = deferred or (
        outcome.error_class in RETRYABLE and claimed.round_attempts < settings.max_attempts
    )
    if retry:
        if deferred:
            delay = deferral_seconds(
                outcome.retry_after, spread=settings.backoff_base_seconds, rng=rng
            )
        else:
            delay = backoff_seconds(
                claimed.round_attempts,
                base=settings.backoff_base_seconds,
                cap=settings.backoff_max_seconds,
                retry_after=outcome.retry_after,
                rng=rng,
            )
        next_at = now + timedelta(seconds=delay)
        result = session.execute(
            update(Delivery)
            .execution_options(synchronize_session=False)
            .where(*ours)
            .values(
                status=Status.SCHEDULED,
                next_attempt_at=next_at,
                task_id=None,
                dispatched_at=None,
                error_class=outcome.error_class,
                last_error=outcome.error,
                pinned_provider=outcome.pinned_provider,
                round_attempts=Delivery.round_attempts - (1 if deferred else 0),
                attempt_count=Delivery.attempt_count - (1 if uncounted else 0),
                **common,
            )
        )
        if not _changed(result):
            return _discarded(session, claimed, outcome, now, event_data)
        audit.record(
            session,
            "delivery.deferred" if deferred else "delivery.retry_scheduled",
            actor=audit.SYSTEM,
            now=now,
            delivery_id=claimed.delivery_id,
            reason=outcome.error,
            data={
                **event_data,
                "error_class": outcome.error_class,
                "next_attempt_at": next_at.isoformat(),
            },
        )
        return Recorded(Status.SCHEDULED, next_attempt_at=next_at)

    # A delivery pinned after an ambiguous outcome may have arrived, whatever the last try
    # said: it fails as ambiguous, for a person to check, never for a blind automatic retry.
    failed_class = (
        ErrorClass.AMBIGUOUS
        if outcome.pinned_provider and outcome.error_class == ErrorClass.TRANSIENT
        else outcome.error_class
    )
    result = session.execute(
        update(Delivery)
        .execution_options(synchronize_session=False)
        .where(*ours)
        .values(
            status=Status.FAILED,
            failed_at=now,
            task_id=None,
            error_class=failed_class,
            last_error=outcome.error,
            pinned_provider=outcome.pinned_provider,
            **common,
        )
    )
    if not _changed(result):
        return _discarded(session, claimed, outcome, now, event_data)
    refunded = False
    if outcome.error_class == ErrorClass.PERMANENT:
        refunded = credits.refund(session, claimed.user_id, claimed.delivery_id, now)
    audit.record(
        session,
        "delivery.failed",
        actor=audit.SYSTEM,
        now=now,
        delivery_id=claimed.delivery_id,
        reason=outcome.error,
        data={**event_data, "error_class": failed_class, "refunded": refunded},
    )
    notify = notifications.request(
        session,
        claimed.delivery_id,
        claimed.user_id,
        claimed.idempotency_key,
        requested_by=audit.SYSTEM,
        now=now,
    )
    return Recorded(Status.FAILED, notify=notify)


def _changed(result: Any) -> bool:
    return bool(result.rowcount == 1)


def _discarded(
    session: Session, claimed: Claim, outcome: Outcome, now: datetime, data: dict[str, Any]
) -> Recorded:
    audit.record(
        session,
        "delivery.outcome_discarded",
        actor=audit.SYSTEM,
        now=now,
        delivery_id=claimed.delivery_id,
        reason=outcome.error,
        data={**data, "error_class": outcome.error_class},
    )
    return Recorded(None)


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
    if not _changed(result):
        return False
    audit.record(
        session, "delivery.lease_recovered", actor="backstop", now=now, delivery_id=delivery_id
    )
    return True
