"""One delivery run: claim, open the letter(s), send through the provider chain, record.

    hold                             ─ address on the suppression list → held, for a person
    claim (compare-and-set + lease)  ─ nothing to claim → stop quietly
      + more due letters, or the rest of the letter's live batch (core.batches)
    decrypt                          ─ key not in the keyring → stays scheduled, tried later
                                       (error class "missing_key", no attempt spent)
                                     ─ unreadable → failed (error class "decryption")
    send with the delivery's key     ─ the chain fails over only on "definitely not accepted"
      or the batch in one call under the batch's key
    record the outcome(s)            ─ sent | retry later (backoff) | failed (+ owner notice),
                                       a whole batch in one transaction

Database hiccups around the send are retried; if the outcome still cannot be written, the row
keeps its lease and the backstop re-runs it later with the same idempotency key (a batch
member: the same batch, the same batch key).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import batches, metrics, notifications
from core.batches import Batch
from core.bootstrap import App
from core.claims import Claim, claim
from core.db import retry_db, session_scope
from core.dispatch import dispatch, revoke_quietly
from core.errors import CryptoError, UnknownKeyId
from core.models import BatchState, Delivery, ErrorClass, Letter, Status
from core.outcomes import Outcome
from core.policy import Clock, utcnow, within_horizon
from core.providers.base import BatchProvider, Email, batch_limit
from core.recording import Recorded, record_outcome, record_outcomes
from core.webhooks import hold_if_suppressed

log = logging.getLogger(__name__)


@dataclass
class _Batched:
    """A claimed batch: the claims this run holds and the request's emails, in order."""

    batch: Batch
    claims: list[Claim]
    emails: list[Email]  # the request, in the batch's order (members we do not hold too)
    replay: bool
    # outcomes known before any call: unreadable letters, an expired key, a changed request
    early: dict[uuid.UUID, Outcome] = field(default_factory=dict)


def _missing_key(app: App, claimed: Claim, exc: UnknownKeyId, *, replay: bool = False) -> Outcome:
    # A configuration problem, not the letter's: it waits for the key, spending nothing,
    # and keeps its pin (a pinned letter may have reached its provider already). A member of
    # a batch being replayed stays in it: its first call may have carried the letter. A letter
    # whose earlier run died mid-send keeps that mark, so its next run still looks first.
    unknown = claimed.error_class == ErrorClass.LEASE_EXPIRED and claimed.pinned_provider is None
    return Outcome(
        error_class=ErrorClass.LEASE_EXPIRED if unknown else ErrorClass.MISSING_KEY,
        error=f"{exc}; the earlier run's outcome is unknown" if unknown else str(exc),
        waits_for_key=True,
        deferred=True,
        retry_after=app.settings.missing_key_retry_seconds,
        pinned_provider=claimed.pinned_provider,
        keep_batch=replay,
    )


def _email(app: App, claimed_key: str, to: str, delivery_id: uuid.UUID, letter: Letter) -> Email:
    subject, body = app.keyring.open(
        letter.key_id, letter.id, letter.subject_ciphertext, letter.body_ciphertext
    )
    return Email(
        to=to,
        sender=app.settings.mail_from,
        subject=subject,
        text=body,
        idempotency_key=claimed_key,
        tags={"delivery_id": str(delivery_id), "kind": "letter"},
    )


def _claim(
    app: App, delivery_id: uuid.UUID, task_id: str, now: datetime
) -> tuple[Claim, Letter] | _Batched | None:
    # Chosen before the transaction: the circuit state is read through its own session, which
    # must not wait on the claim's write lock (SQLite).
    provider = app.chain.batch_provider(now) if app.settings.batch_size > 1 else None
    with session_scope(app.session_factory) as session:
        if hold_if_suppressed(session, delivery_id, now=now):
            session.commit()  # held for a person: its address is on the suppression list
            return None
        claimed = claim(
            session, delivery_id, task_id, now=now, lease_seconds=app.settings.lease_seconds
        )
        if claimed is None:
            return None
        work: tuple[Claim, Letter] | _Batched | None = None
        if claimed.batch_id is not None:
            work, claimed = _rejoin(app, session, claimed, now)
        elif provider is not None and _may_batch(app, claimed):
            work = _gather(app, session, claimed, provider, now)
        if work is None:
            letter = session.get(Letter, claimed.letter_id)
            assert letter is not None
            work = (claimed, letter)
        session.commit()
    return work


def _may_batch(app: App, claimed: Claim) -> bool:
    return (
        app.settings.batch_size > 1
        and claimed.pinned_provider is None
        and claimed.error_class != ErrorClass.LEASE_EXPIRED
    )


def _gather(
    app: App, session: Session, claimed: Claim, provider: BatchProvider, now: datetime
) -> _Batched | None:
    """More due letters for the same provider, claimed in one statement; None if there are none
    (a lone letter goes alone, at once)."""
    limit = min(app.settings.batch_size, batch_limit(provider)) - 1
    more = batches.claim_more(
        session, claimed.task_id, limit=limit, now=now, lease_seconds=app.settings.lease_seconds
    )
    if not more:
        return None
    batch, members = batches.open_batch(session, [claimed, *more], provider.name, now=now)
    work = _prepare(app, session, batch, members, replay=False)
    body = provider.batch_body(work.emails) if work.emails else b""
    batches.set_fingerprint(session, batch.id, batches.fingerprint(body), now)
    return work


def _rejoin(
    app: App, session: Session, claimed: Claim, now: datetime
) -> tuple[_Batched | None, Claim]:
    """A letter claimed while in a batch: replay the batch, or go alone pinned to its provider."""
    assert claimed.batch_id is not None
    batch = batches.load_batch(session, claimed.batch_id)
    provider = app.chain.provider(batch.provider) if batch else None
    if (
        batch is None
        or provider is None
        or batch.state != BatchState.LIVE
        or not getattr(provider, "replays_batches", False)
    ):
        # A provider that can be asked (Postmark, the outbox) is asked about this letter alone;
        # one that cannot (SMTP) is retried alone, as after any ambiguous outcome. Either way
        # only the batch's provider: nothing else can hold the message.
        pinned = claimed.pinned_provider or (batch.provider if batch else None)
        return None, dataclasses.replace(claimed, pinned_provider=pinned)
    others = batches.claim_members(
        session, batch, claimed.task_id, now=now, lease_seconds=app.settings.lease_seconds
    )
    work = _prepare(app, session, batch, [claimed, *others], replay=True)
    if batch.key_expired(now):
        expired = Outcome(
            ErrorClass.AMBIGUOUS,
            error=f"batch {batch.id}: unknown outcome and its key has expired; check by hand",
            pinned_provider=batch.provider,
            final=True,
        )
        work.early.update({c.delivery_id: expired for c in work.claims})
        return work, claimed
    body = provider.batch_body(work.emails) if work.emails else b""  # type: ignore[attr-defined]
    if batch.request_sha256 and batches.fingerprint(body) != batch.request_sha256:
        changed = Outcome(
            ErrorClass.POSSIBLY_SENT,
            error=f"batch {batch.id}: a replay would differ from the first call; check by hand",
            pinned_provider=batch.provider,
            final=True,
        )
        work.early.update(
            {c.delivery_id: changed for c in work.claims if c.delivery_id not in work.early}
        )
    return work, claimed


def _prepare(
    app: App, session: Session, batch: Batch, claims: Sequence[Claim], *, replay: bool
) -> _Batched:
    """The request's emails in the batch's order; unreadable letters are left out of it."""
    rows = {
        row.id: row
        for row in session.execute(
            select(
                Delivery.id,
                Delivery.recipient_email,
                Delivery.idempotency_key,
                Letter,
            )
            .join(Letter, Letter.id == Delivery.letter_id)
            .where(Delivery.id.in_(batch.delivery_ids))
        )
    }
    held = {c.delivery_id: c for c in claims}
    work = _Batched(batch, [held[i] for i in batch.delivery_ids if i in held], [], replay)
    for delivery_id in batch.delivery_ids:
        row = rows.get(delivery_id)
        if row is None:
            continue
        try:
            email = _email(app, row.idempotency_key, row.recipient_email, delivery_id, row.Letter)
        except UnknownKeyId as exc:
            if delivery_id in held:
                work.early[delivery_id] = _missing_key(app, held[delivery_id], exc, replay=replay)
            continue
        except CryptoError as exc:
            if delivery_id in held:
                work.early[delivery_id] = Outcome(ErrorClass.DECRYPTION, error=str(exc))
            continue
        work.emails.append(email)
    return work


def _send(app: App, claimed: Claim, letter: Letter, clock: Clock) -> Outcome:
    try:
        email = _email(
            app, claimed.idempotency_key, claimed.recipient_email, claimed.delivery_id, letter
        )
    except UnknownKeyId as exc:
        return _missing_key(app, claimed, exc)
    except CryptoError as exc:
        return Outcome(error_class=ErrorClass.DECRYPTION, error=str(exc))
    settle = timedelta(seconds=app.settings.lookup_settle_seconds)
    return app.chain.send(
        email,
        pinned=claimed.pinned_provider,
        look_first=claimed.error_class == ErrorClass.LEASE_EXPIRED,
        now=clock(),
        settle_until=claimed.ambiguous_at + settle if claimed.ambiguous_at else None,
    )


def _send_batch(app: App, work: _Batched, clock: Clock) -> list[tuple[Claim, Outcome]]:
    """One call for the whole batch; each held letter gets its own outcome."""
    outcomes: dict[uuid.UUID, Outcome] = dict(work.early)
    if work.emails and not (work.early and len(work.early) == len(work.claims)):
        answers = app.chain.send_batch(
            work.batch.provider,
            work.emails,
            work.batch.idempotency_key,
            replay=work.replay,
            now=clock(),
        )
        for email, answer in zip(work.emails, answers, strict=True):
            delivery_id = uuid.UUID(email.tags["delivery_id"])
            outcomes.setdefault(delivery_id, answer)
    return [(c, outcomes[c.delivery_id]) for c in work.claims if c.delivery_id in outcomes]


def _record(app: App, claimed: Claim, outcome: Outcome, now: datetime) -> Recorded:
    def write() -> Recorded:
        with session_scope(app.session_factory) as session:
            recorded = record_outcome(session, claimed, outcome, app.settings, now=now)
            session.commit()
            return recorded

    return retry_db(write)


def _record_batch(
    app: App, work: _Batched, results: list[tuple[Claim, Outcome]], now: datetime
) -> list[Recorded]:
    def write() -> list[Recorded]:
        with session_scope(app.session_factory) as session:
            recorded = record_outcomes(session, results, app.settings, now=now, together=True)
            batches.settle(session, work.batch.id, work.claims[0].task_id, now=now)
            session.commit()
            return recorded

    return retry_db(write)


def _after(
    app: App, delivery_id: uuid.UUID, recorded: Recorded, now: datetime, clock: Clock
) -> None:
    retry_at = recorded.next_attempt_at
    horizon = app.settings.dispatch_horizon_seconds
    if recorded.status == Status.SCHEDULED and retry_at and within_horizon(retry_at, now, horizon):
        dispatch(app.session_factory, app.enqueuer, delivery_id, retry_at, now)
    if recorded.notify:
        notifications.send_pending(app, now=clock(), delivery_id=delivery_id)


def run_delivery(
    app: App, delivery_id: uuid.UUID, task_id: str, *, clock: Clock = utcnow
) -> str | None:
    """Run one delivery (and the batch it leads, if any); returns this delivery's new status,
    or None if there was nothing to claim."""
    work = retry_db(lambda: _claim(app, delivery_id, task_id, clock()))
    if work is None:
        metrics.observe_run(delivery_id, task_id, None)
        log.debug("delivery %s: nothing to claim for task %s", delivery_id, task_id)
        return None
    if isinstance(work, _Batched):
        return _run_batch(app, delivery_id, work, clock)
    claimed, letter = work
    outcome = _send(app, claimed, letter, clock)
    now = clock()
    recorded = _record(app, claimed, outcome, now)
    metrics.observe_run(delivery_id, task_id, claimed, outcome, status=recorded.status, now=now)
    _after(app, delivery_id, recorded, now, clock)
    return recorded.status


def _run_batch(app: App, delivery_id: uuid.UUID, work: _Batched, clock: Clock) -> str | None:
    # The companions' own tasks would only find nothing to claim; under a burst they are most
    # of the queue, and a revoked task costs the consumer one Redis read instead of a
    # database transaction. Best effort: a task that runs anyway finds nothing.
    for member in work.claims:
        if member.queued_task_id and member.queued_task_id != member.task_id:
            revoke_quietly(app.enqueuer, member.queued_task_id)
    results = _send_batch(app, work, clock)
    now = clock()
    recorded = _record_batch(app, work, results, now)
    own: str | None = None
    counted = False
    for (claimed, outcome), result in zip(results, recorded, strict=True):
        if claimed.delivery_id == delivery_id:
            own = result.status
        # every letter is a claimed run (and, if sent, a lateness); the call is one request,
        # counted with the first letter that carries it
        metrics.observe_run(
            claimed.delivery_id,
            claimed.task_id,
            claimed,
            outcome if not counted else dataclasses.replace(outcome, calls=[]),
            status=result.status,
            now=now,
        )
        counted = counted or bool(outcome.calls)
        _after(app, claimed.delivery_id, result, now, clock)
    log.info(
        "batch %s via %s: %d letters, %d sent%s",
        work.batch.id,
        work.batch.provider,
        len(results),
        sum(1 for r in recorded if r.status == Status.SENT),
        " (replay)" if work.replay else "",
    )
    return own
