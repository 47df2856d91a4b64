"""The compare-and-set guards of the delivery row, each caught in the act (SQLite and PostgreSQL).

Written for the mutation check (tests/mutate.py, docs/mutation.md): every guard here was found
redundant by the rest of the suite, so removing it broke no test. Each test builds the one
interleaving the guard exists for: a stale read acting after a claim or another transition,
a run whose row a twin holds now, an outcome recorded twice.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.bootstrap import App
from core.claims import claim, recover_expired_lease
from core.db import session_scope
from core.deliveries import _transition, cancel_delivery
from core.errors import InvalidTransition
from core.models import AuditEvent, Delivery, Status
from core.outcomes import Outcome
from core.recording import record_outcome
from tests.integration.test_transitions import SOON, T0, balance, make_user, row, schedule

LEASE = 60
FAILED = Outcome(error_class="permanent", error="422 injected")
SENT = Outcome(error_class=None, provider="resend", provider_message_id="m-1")


def _claim(app: App, delivery_id: uuid.UUID, task_id: str, now=SOON):
    with session_scope(app.session_factory) as session:
        claimed = claim(session, delivery_id, task_id, now=now, lease_seconds=LEASE)
        session.commit()
    assert claimed is not None
    return claimed


def _record(app: App, claimed, outcome: Outcome, now):
    with session_scope(app.session_factory) as session:
        recorded = record_outcome(session, claimed, outcome, app.settings, now=now)
        session.commit()
    return recorded


def _recover(app: App, delivery_id: uuid.UUID, now) -> None:
    with session_scope(app.session_factory) as session:
        assert recover_expired_lease(session, delivery_id, now=now)
        session.commit()


def _sent_events(app: App, delivery_id: uuid.UUID) -> int:
    with session_scope(app.session_factory) as session:
        return len(
            session.scalars(
                select(AuditEvent.id).where(
                    AuditEvent.delivery_id == delivery_id, AuditEvent.type == "delivery.sent"
                )
            ).all()
        )


# ---------------------------------------------------------------- the claim


def test_a_claim_moves_the_version_so_a_stale_read_cannot_act(app: App) -> None:
    # Given a row read before a worker claimed it
    result = schedule(app, make_user(app))
    before = row(app, result.delivery_id)

    # When a worker claims it
    _claim(app, result.delivery_id, "worker")

    # Then the row is another version: anything decided on the old read must be refused
    after = row(app, result.delivery_id)
    assert after.status == Status.PROCESSING
    assert after.version == before.version + 1


# ---------------------------------------------------------------- record_outcome


def test_a_failure_from_a_run_whose_row_a_twin_holds_now_is_discarded(app: App) -> None:
    # Given a slow run whose lease expired, and the row claimed again by another run
    result = schedule(app, make_user(app))
    slow = _claim(app, result.delivery_id, "slow")
    _recover(app, result.delivery_id, SOON + timedelta(seconds=LEASE + 1))
    _claim(app, result.delivery_id, "twin", now=SOON + timedelta(seconds=LEASE + 2))

    # When the slow run records its failure
    recorded = _record(app, slow, FAILED, SOON + timedelta(seconds=LEASE + 3))

    # Then it is discarded: the twin's run still holds the row
    assert recorded.status is None
    stored = row(app, result.delivery_id)
    assert (stored.status, stored.task_id) == (Status.PROCESSING, "twin")


def test_a_failure_recorded_again_after_the_letter_was_sent_is_discarded(app: App) -> None:
    # Given a run that recorded its success
    result = schedule(app, make_user(app))
    claimed = _claim(app, result.delivery_id, "run")
    assert _record(app, claimed, SENT, SOON).status == Status.SENT

    # When a failure arrives for the same run (a retried write, a duplicated outcome)
    recorded = _record(app, claimed, FAILED, SOON + timedelta(seconds=1))

    # Then the sent row stays sent
    assert recorded.status is None
    assert row(app, result.delivery_id).status == Status.SENT


def test_a_late_success_never_revives_a_canceled_letter(app: App) -> None:
    # Given a run whose lease expired, and the recovered letter canceled by its owner
    owner = make_user(app)
    result = schedule(app, owner)
    slow = _claim(app, result.delivery_id, "slow")
    _recover(app, result.delivery_id, SOON + timedelta(seconds=LEASE + 1))
    cancel_delivery(
        app,
        result.delivery_id,
        now=SOON + timedelta(seconds=LEASE + 2),
        actor="ada",
    )

    # When the slow run's success arrives
    recorded = _record(app, slow, SENT, SOON + timedelta(seconds=LEASE + 3))

    # Then the cancel stands (the credit was refunded; the outcome is in the audit only)
    assert recorded.status is None
    assert row(app, result.delivery_id).status == Status.CANCELED
    assert balance(app, owner) == 3


def test_a_success_recorded_twice_keeps_the_first(app: App) -> None:
    result = schedule(app, make_user(app))
    claimed = _claim(app, result.delivery_id, "run")
    assert _record(app, claimed, SENT, SOON).status == Status.SENT

    again = _record(app, claimed, SENT, SOON + timedelta(seconds=5))

    assert again.status is None
    assert row(app, result.delivery_id).sent_at == SOON
    assert _sent_events(app, result.delivery_id) == 1


# ---------------------------------------------------------------- cancel / reschedule / requeue


def _stale(app: App, delivery_id: uuid.UUID) -> tuple[Session, Delivery]:
    """A session and the row as it read it; the read transaction is over (WAL, no lock)."""
    session = app.session_factory()
    stale = session.get(Delivery, delivery_id)
    assert stale is not None
    session.commit()  # expire_on_commit=False: the object keeps what was read
    return session, stale


def test_a_transition_from_a_stale_read_loses_to_a_claim(app: App) -> None:
    # Given support read the row while it was scheduled
    result = schedule(app, make_user(app))
    session, stale = _stale(app, result.delivery_id)
    try:
        # When a worker claims it, and then support's cancel acts on what it read
        _claim(app, result.delivery_id, "worker")
        with pytest.raises(InvalidTransition):
            _transition(
                session,
                stale,
                "cancel",
                {Status.SCHEDULED, Status.FAILED},
                T0,
                status=Status.CANCELED,
                canceled_at=T0,
                task_id=None,
                lease_until=None,
            )
        session.rollback()
    finally:
        session.close()

    # Then the letter is still the worker's
    assert row(app, result.delivery_id).status == Status.PROCESSING


def test_a_transition_from_a_stale_read_loses_to_another_transition(app: App) -> None:
    # Given support read the row while it was scheduled for SOON
    result = schedule(app, make_user(app))
    session, stale = _stale(app, result.delivery_id)
    moved = SOON + timedelta(days=2)
    try:
        # When the owner moves it (still scheduled, a new version), then support's stale
        # reschedule acts on what it read
        with session_scope(app.session_factory) as other:
            fresh = other.get(Delivery, result.delivery_id)
            assert fresh is not None
            _transition(
                other,
                fresh,
                "reschedule",
                {Status.SCHEDULED},
                T0,
                deliver_at=moved,
                next_attempt_at=moved,
            )
            other.commit()
        with pytest.raises(InvalidTransition):
            _transition(
                session,
                stale,
                "reschedule",
                {Status.SCHEDULED},
                T0,
                deliver_at=SOON + timedelta(days=1),
                next_attempt_at=SOON + timedelta(days=1),
            )
        session.rollback()
    finally:
        session.close()

    # Then the owner's change stands
    assert row(app, result.delivery_id).deliver_at == moved
