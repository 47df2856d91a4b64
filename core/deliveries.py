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
from collections.abc import Sequence
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
from core.models import (
    AuditEvent,
    Delivery,
    DeliveryAttempt,
    ErrorClass,
    Letter,
    Status,
    User,
)
from core.operators import validate_display_name
from core.outcomes import DEFER, RETRY, SENT, Decision, Outcome, decide
from core.policy import lease_until, within_horizon

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
    batch_id: uuid.UUID | None = None  # the live batch it is claimed in
    # The Huey task queued for this letter before a batch took it: revoked, best effort, so
    # that it does not run only to find nothing to claim.
    queued_task_id: str | None = None


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


@dataclass(frozen=True)
class Recorded:
    status: str | None  # the row's new status; None when the row was no longer ours
    next_attempt_at: datetime | None = None
    notify: bool = False


BATCH_DEFER_SPREAD = 1.0  # seconds: a deferred batch is one request when it comes back


def record_outcome(
    session: Session,
    claimed: Claim,
    outcome: Outcome,
    settings: Settings,
    *,
    now: datetime,
    rng: random.Random | None = None,
) -> Recorded:
    """Write one run's attempts and move its row to sent, back to scheduled, or to failed.

    A success is recorded even if the lease ran out meanwhile (the message is out; a twin run
    would reuse the same idempotency key). A failure is recorded only by the run that still
    holds the row. The caller commits.
    """
    return record_outcomes(session, [(claimed, outcome)], settings, now=now, rng=rng)[0]


def record_outcomes(
    session: Session,
    results: Sequence[tuple[Claim, Outcome]],
    settings: Settings,
    *,
    now: datetime,
    rng: random.Random | None = None,
    together: bool = False,
) -> list[Recorded]:
    """Decide each letter's outcome (`core.outcomes.decide`, pure), then write them all in the
    caller's one transaction: one attempt row per provider call naming its batch, one
    compare-and-set per row, audit events, refunds and owner notices. The caller commits.

    `together` (a batch): letters deferred or retried together come back at the same instant
    (one draw for all, a deferral spread over a second), so they can travel together again;
    letters drawn apart would come back one by one, each as its own request.
    """
    seed = (rng or random).random()

    def decide_one(claimed: Claim, outcome: Outcome) -> Decision:
        if not together:
            return decide(claimed.round_attempts, outcome, settings, now=now, rng=rng)
        return decide(
            claimed.round_attempts,
            outcome,
            settings,
            now=now,
            rng=random.Random(seed),
            defer_spread=BATCH_DEFER_SPREAD,
        )

    decided = [(c, o, decide_one(c, o)) for c, o in results]
    return write_outcomes(session, decided, now=now)


def write_outcomes(
    session: Session,
    decided: Sequence[tuple[Claim, Outcome, Decision]],
    *,
    now: datetime,
) -> list[Recorded]:
    """The write step of `record_outcomes`: every row's compare-and-set of today (a success
    on (id, status in processing|scheduled), anything else on (id, processing, task_id)),
    batched INSERTs for attempts and audit events."""
    attempts = [
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
            "batch_id": claimed.batch_id,
        }
        for claimed, outcome, _ in decided
        for call in outcome.calls
    ]
    if attempts:
        # One multi-row INSERT: the ORM unit of work is costly on this hot path.
        session.execute(insert(DeliveryAttempt), attempts)
    events: list[dict[str, Any]] = []
    recorded = [_write_one(session, c, o, d, now, events) for c, o, d in decided]
    if events:
        session.execute(insert(AuditEvent), events)
    return recorded


def _event(
    events: list[dict[str, Any]],
    type: str,
    claimed: Claim,
    now: datetime,
    data: dict[str, Any],
    reason: str | None = None,
) -> None:
    events.append(
        {
            "type": type,
            "actor": audit.SYSTEM,
            "delivery_id": claimed.delivery_id,
            "reason": reason,
            "data": data,
            "created_at": now,
        }
    )


def _write_one(
    session: Session,
    claimed: Claim,
    outcome: Outcome,
    decision: Decision,
    now: datetime,
    events: list[dict[str, Any]],
) -> Recorded:
    ours = (
        Delivery.id == claimed.delivery_id,
        Delivery.status == Status.PROCESSING,
        Delivery.task_id == claimed.task_id,
    )
    common = {"version": Delivery.version + 1, "updated_at": now, "lease_until": None}
    data: dict[str, Any] = {"task_id": claimed.task_id, "run": claimed.run_number}
    if claimed.batch_id is not None:
        data["batch_id"] = str(claimed.batch_id)

    if decision.action == SENT:
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
        _event(events, event, claimed, now, {**data, "provider": outcome.provider})
        return Recorded(status)

    if decision.action in (RETRY, DEFER):
        deferred = decision.action == DEFER
        next_at = decision.next_attempt_at
        assert next_at is not None
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
                batch_id=claimed.batch_id if outcome.keep_batch else None,
                attempt_count=Delivery.attempt_count - (1 if decision.uncounted else 0),
                **common,
            )
        )
        if not _changed(result):
            return _discarded(claimed, outcome, now, data, events)
        _event(
            events,
            "delivery.deferred" if deferred else "delivery.retry_scheduled",
            claimed,
            now,
            {**data, "error_class": outcome.error_class, "next_attempt_at": next_at.isoformat()},
            reason=outcome.error,
        )
        return Recorded(Status.SCHEDULED, next_attempt_at=next_at)

    failed_class = decision.error_class
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
            batch_id=None,
            **common,
        )
    )
    if not _changed(result):
        return _discarded(claimed, outcome, now, data, events)
    refunded = False
    if outcome.error_class == ErrorClass.PERMANENT:
        refunded = credits.refund(session, claimed.user_id, claimed.delivery_id, now)
    _event(
        events,
        "delivery.failed",
        claimed,
        now,
        {**data, "error_class": failed_class, "refunded": refunded},
        reason=outcome.error,
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
    claimed: Claim,
    outcome: Outcome,
    now: datetime,
    data: dict[str, Any],
    events: list[dict[str, Any]],
) -> Recorded:
    _event(
        events,
        "delivery.outcome_discarded",
        claimed,
        now,
        {**data, "error_class": outcome.error_class},
        reason=outcome.error,
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
