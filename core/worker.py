"""One delivery run: claim, open the letter, send through the provider chain, record.

    hold                             ─ address on the suppression list → held, for a person
    claim (compare-and-set + lease)  ─ nothing to claim → stop quietly
    decrypt                          ─ key not in the keyring → stays scheduled, tried later
                                       (error class "missing_key", no attempt spent)
                                     ─ unreadable → failed (error class "decryption")
    send with the delivery's key     ─ the chain fails over only on "definitely not accepted"
    record the outcome               ─ sent | retry later (backoff) | failed (+ owner notice)

Database hiccups around the send are retried; if the outcome still cannot be written, the row
keeps its lease and the backstop re-runs it later with the same idempotency key.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from core import metrics, notifications
from core.bootstrap import App
from core.db import retry_db, session_scope
from core.deliveries import Claim, Recorded, claim, record_outcome
from core.dispatch import dispatch
from core.errors import CryptoError, UnknownKeyId
from core.models import ErrorClass, Letter, Status
from core.outcomes import Outcome
from core.policy import utcnow, within_horizon
from core.providers.base import Email
from core.webhooks import hold_if_suppressed

log = logging.getLogger(__name__)
Clock = Callable[[], datetime]


def _claim(
    app: App, delivery_id: uuid.UUID, task_id: str, now: datetime
) -> tuple[Claim, Letter] | None:
    with session_scope(app.session_factory) as session:
        if hold_if_suppressed(session, delivery_id, now=now):
            session.commit()  # held for a person: its address is on the suppression list
            return None
        claimed = claim(
            session, delivery_id, task_id, now=now, lease_seconds=app.settings.lease_seconds
        )
        if claimed is None:
            return None
        letter = session.get(Letter, claimed.letter_id)
        session.commit()
    assert letter is not None
    return claimed, letter


def _send(app: App, claimed: Claim, letter: Letter, clock: Clock) -> Outcome:
    try:
        subject, body = app.keyring.open(
            letter.key_id, letter.id, letter.subject_ciphertext, letter.body_ciphertext
        )
    except UnknownKeyId as exc:
        # A configuration problem, not the letter's: it waits for the key, spending nothing,
        # and keeps its pin (a pinned letter may have reached its provider already).
        return Outcome(
            error_class=ErrorClass.MISSING_KEY,
            error=str(exc),
            deferred=True,
            retry_after=app.settings.missing_key_retry_seconds,
            pinned_provider=claimed.pinned_provider,
        )
    except CryptoError as exc:
        return Outcome(error_class=ErrorClass.DECRYPTION, error=str(exc))
    email = Email(
        to=claimed.recipient_email,
        sender=app.settings.mail_from,
        subject=subject,
        text=body,
        idempotency_key=claimed.idempotency_key,
        tags={"delivery_id": str(claimed.delivery_id), "kind": "letter"},
    )
    settle = timedelta(seconds=app.settings.lookup_settle_seconds)
    return app.chain.send(
        email,
        pinned=claimed.pinned_provider,
        look_first=claimed.error_class == ErrorClass.LEASE_EXPIRED,
        now=clock(),
        settle_until=claimed.ambiguous_at + settle if claimed.ambiguous_at else None,
    )


def _record(app: App, claimed: Claim, outcome: Outcome, now: datetime) -> Recorded:
    def write() -> Recorded:
        with session_scope(app.session_factory) as session:
            recorded = record_outcome(session, claimed, outcome, app.settings, now=now)
            session.commit()
            return recorded

    return retry_db(write)


def run_delivery(
    app: App, delivery_id: uuid.UUID, task_id: str, *, clock: Clock = utcnow
) -> str | None:
    """Run one delivery; returns the row's new status, or None if there was nothing to claim."""
    claimed_pair = retry_db(lambda: _claim(app, delivery_id, task_id, clock()))
    if claimed_pair is None:
        metrics.observe_run(delivery_id, task_id, None)
        log.debug("delivery %s: nothing to claim for task %s", delivery_id, task_id)
        return None
    claimed, letter = claimed_pair
    outcome = _send(app, claimed, letter, clock)
    now = clock()
    recorded = _record(app, claimed, outcome, now)
    metrics.observe_run(delivery_id, task_id, claimed, outcome, status=recorded.status, now=now)
    retry_at = recorded.next_attempt_at
    horizon = app.settings.dispatch_horizon_seconds
    if recorded.status == Status.SCHEDULED and retry_at and within_horizon(retry_at, now, horizon):
        dispatch(app.session_factory, app.enqueuer, delivery_id, retry_at, now)
    if recorded.notify:
        notifications.send_pending(app, now=clock(), delivery_id=delivery_id)
    return recorded.status
