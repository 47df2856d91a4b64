"""Recording a run's outcome: `core.outcomes.decide` says what each letter comes to (pure);
this module writes it, in the caller's one transaction (a whole batch at once).

    sent          → sent, on (id, status in processing | scheduled): a success is kept even
                    after the lease ran out (a twin run would reuse the same key)
    retry | defer → scheduled again at the decided time, on (id, processing, task_id)
    fail          → failed, on (id, processing, task_id); a permanent failure refunds the
                    credit, and the owner is told (once)
    row moved on  → nothing but a "delivery.outcome_discarded" audit event

Attempt rows and audit events are multi-row INSERTs: the ORM unit of work is costly on this
hot path.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, insert, update
from sqlalchemy.orm import Session

from core import audit, credits, notifications
from core.claims import Claim
from core.config import Settings
from core.models import AuditEvent, Delivery, DeliveryAttempt, ErrorClass, Status
from core.outcomes import DEFER, RETRY, SENT, Decision, Outcome, decide


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
    writer = _Writer(session, now)
    recorded = [writer.write(c, o, d) for c, o, d in decided]
    if writer.events:
        session.execute(insert(AuditEvent), writer.events)
    return recorded


@dataclass
class _Writer:
    """One transaction's row updates; the audit events are collected for one INSERT."""

    session: Session
    now: datetime
    events: list[dict[str, Any]] = field(default_factory=list)

    def write(self, claimed: Claim, outcome: Outcome, decision: Decision) -> Recorded:
        if decision.action == SENT:
            return self.sent(claimed, outcome)
        if decision.action in (RETRY, DEFER):
            return self.retry(claimed, outcome, decision)
        return self.failed(claimed, outcome, decision)

    def sent(self, claimed: Claim, outcome: Outcome) -> Recorded:
        result = self.session.execute(
            update(Delivery)
            .execution_options(synchronize_session=False)
            .where(
                Delivery.id == claimed.delivery_id,
                Delivery.status.in_([Status.PROCESSING, Status.SCHEDULED]),
            )
            .values(
                status=Status.SENT,
                sent_at=self.now,
                provider=outcome.provider,
                provider_message_id=outcome.provider_message_id,
                error_class=None,
                last_error=None,
                **_common(self.now),
            )
        )
        status: str | None = Status.SENT if _changed(result) else None
        event = "delivery.sent" if status else "delivery.outcome_discarded"
        self.event(event, claimed, {**_data(claimed), "provider": outcome.provider})
        return Recorded(status)

    def retry(self, claimed: Claim, outcome: Outcome, decision: Decision) -> Recorded:
        deferred = decision.action == DEFER
        next_at = decision.next_attempt_at
        assert next_at is not None
        changed = self.update_ours(
            claimed,
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
        )
        if not changed:
            return self.discarded(claimed, outcome)
        self.event(
            "delivery.deferred" if deferred else "delivery.retry_scheduled",
            claimed,
            {
                **_data(claimed),
                "error_class": outcome.error_class,
                "next_attempt_at": next_at.isoformat(),
            },
            reason=outcome.error,
        )
        return Recorded(Status.SCHEDULED, next_attempt_at=next_at)

    def failed(self, claimed: Claim, outcome: Outcome, decision: Decision) -> Recorded:
        failed_class = decision.error_class
        changed = self.update_ours(
            claimed,
            status=Status.FAILED,
            failed_at=self.now,
            task_id=None,
            error_class=failed_class,
            last_error=outcome.error,
            pinned_provider=outcome.pinned_provider,
            batch_id=None,
        )
        if not changed:
            return self.discarded(claimed, outcome)
        refunded = False
        if outcome.error_class == ErrorClass.PERMANENT:
            refunded = credits.refund(self.session, claimed.user_id, claimed.delivery_id, self.now)
        self.event(
            "delivery.failed",
            claimed,
            {**_data(claimed), "error_class": failed_class, "refunded": refunded},
            reason=outcome.error,
        )
        notify = notifications.request(
            self.session,
            claimed.delivery_id,
            claimed.user_id,
            claimed.idempotency_key,
            requested_by=audit.SYSTEM,
            now=self.now,
        )
        return Recorded(Status.FAILED, notify=notify)

    def update_ours(self, claimed: Claim, **values: Any) -> bool:
        """The compare-and-set of a retry, a deferral or a failure: True if the row was ours."""
        result = self.session.execute(
            update(Delivery)
            .execution_options(synchronize_session=False)
            .where(*_ours(claimed))
            .values(**values, **_common(self.now))
        )
        return _changed(result)

    def discarded(self, claimed: Claim, outcome: Outcome) -> Recorded:
        self.event(
            "delivery.outcome_discarded",
            claimed,
            {**_data(claimed), "error_class": outcome.error_class},
            reason=outcome.error,
        )
        return Recorded(None)

    def event(
        self, type: str, claimed: Claim, data: dict[str, Any], reason: str | None = None
    ) -> None:
        self.events.append(
            {
                "type": type,
                "actor": audit.SYSTEM,
                "delivery_id": claimed.delivery_id,
                "reason": reason,
                "data": data,
                "created_at": self.now,
            }
        )


def _ours(claimed: Claim) -> tuple[ColumnElement[bool], ...]:
    """The row as this run claimed it: only the run that still holds it records a failure."""
    return (
        Delivery.id == claimed.delivery_id,
        Delivery.status == Status.PROCESSING,
        Delivery.task_id == claimed.task_id,
    )


def _common(now: datetime) -> dict[str, Any]:
    """What every outcome sets on the row: a new version, and the lease released."""
    return {"version": Delivery.version + 1, "updated_at": now, "lease_until": None}


def _data(claimed: Claim) -> dict[str, Any]:
    """The audit data every outcome's event carries: the run, and its batch if any."""
    data: dict[str, Any] = {"task_id": claimed.task_id, "run": claimed.run_number}
    if claimed.batch_id is not None:
        data["batch_id"] = str(claimed.batch_id)
    return data


def _changed(result: Any) -> bool:
    return bool(result.rowcount == 1)
