"""Every transition and its guards, on SQLite and PostgreSQL (the `db_kind` parameter)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from core import credits
from core.bootstrap import App
from core.claims import Claim, claim, recover_expired_lease
from core.config import Settings
from core.db import session_scope
from core.deliveries import (
    cancel_delivery,
    create_user,
    requeue_delivery,
    reschedule_delivery,
    schedule_delivery,
)
from core.errors import (
    DeliveryNotFound,
    InsufficientCredit,
    InvalidAddress,
    InvalidDeliveryTime,
    InvalidTransition,
    LetterTooLarge,
    UserNotFound,
    ValidationError,
)
from core.models import AuditEvent, CreditEntry, Delivery, Letter, Notification, Status
from core.outcomes import Outcome
from core.recording import Recorded, record_outcome
from tests.conftest import T0, RecordingEnqueuer

SOON = T0 + timedelta(minutes=10)  # within the default one-hour horizon
LATER = T0 + timedelta(days=30)  # beyond it


def make_user(app: App, credit: int = 3, email: str = "ada@example.com") -> int:
    with session_scope(app.session_factory) as session:
        user = create_user(session, email, "Ada", T0, credit)
        session.commit()
        return user.id


def schedule(app: App, owner: int, at=SOON, **overrides):
    args = dict(
        user_id=owner,
        recipient="future-ada@example.com",
        subject="Hello",
        body="Dear future me",
        deliver_at=at,
        now=T0,
        actor="ada@example.com",
    )
    args.update(overrides)
    return schedule_delivery(app, **args)


def row(app: App, delivery_id: uuid.UUID) -> Delivery:
    with session_scope(app.session_factory) as session:
        found = session.get(Delivery, delivery_id)
        assert found is not None
        return found


def events(app: App, delivery_id: uuid.UUID) -> list[str]:
    with session_scope(app.session_factory) as session:
        return list(
            session.scalars(
                select(AuditEvent.type)
                .where(AuditEvent.delivery_id == delivery_id)
                .order_by(AuditEvent.id)
            )
        )


def balance(app: App, user_id: int) -> int:
    with session_scope(app.session_factory) as session:
        return credits.balance(session, user_id)


def counts(app: App) -> tuple[int, int, int, int]:
    with session_scope(app.session_factory) as session:
        return tuple(  # type: ignore[return-value]
            session.scalar(select(func.count()).select_from(model))
            for model in (Delivery, Letter, CreditEntry, AuditEvent)
        )


def settings_with(app: App, **changes: Any) -> Settings:
    """The app's settings with `changes`, e.g. `max_attempts=1`."""
    return app.settings.__class__(**{**app.settings.__dict__, **changes})


def take(app: App, delivery_id: uuid.UUID, task_id: str = "t1", *, now=SOON) -> Claim | None:
    """A worker's claim, committed in its own transaction."""
    with session_scope(app.session_factory) as session:
        claimed = claim(session, delivery_id, task_id, now=now, lease_seconds=60)
        session.commit()
        return claimed


def record(
    app: App, claimed: Claim, outcome: Outcome, *, now, settings: Settings | None = None
) -> Recorded:
    """A run's outcome, recorded in its own transaction."""
    with session_scope(app.session_factory) as session:
        recorded = record_outcome(session, claimed, outcome, settings or app.settings, now=now)
        session.commit()
        return recorded


def run(
    app: App,
    delivery_id: uuid.UUID,
    outcome: Outcome,
    *,
    task_id: str = "t1",
    now=SOON,
    settings: Settings | None = None,
) -> tuple[Claim, Recorded]:
    """Claim a due delivery and record the run's outcome, in one transaction."""
    with session_scope(app.session_factory) as session:
        claimed = claim(session, delivery_id, task_id, now=now, lease_seconds=60)
        assert claimed is not None
        recorded = record_outcome(session, claimed, outcome, settings or app.settings, now=now)
        session.commit()
        return claimed, recorded


def recover(app: App, delivery_id: uuid.UUID, *, now) -> bool:
    """The backstop's recovery of an expired lease, committed."""
    with session_scope(app.session_factory) as session:
        recovered = recover_expired_lease(session, delivery_id, now=now)
        session.commit()
        return recovered


def fail(app: App, delivery_id: uuid.UUID, error_class: str = "permanent") -> None:
    """Drive a delivery to failed through claim + record_outcome."""
    outcome = Outcome(error_class=error_class, error="test failure")
    run(app, delivery_id, outcome, task_id="t-fail", settings=settings_with(app, max_attempts=1))


# ---------------------------------------------------------------- schedule


def test_schedule_reserves_a_credit_stores_sealed_letter_and_dispatches_within_horizon(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    user_id = make_user(app)

    result = schedule(app, user_id)

    stored = row(app, result.delivery_id)
    assert stored.status == Status.SCHEDULED
    assert stored.deliver_at == SOON and stored.next_attempt_at == SOON
    assert stored.task_id == result.task_id == enqueuer.ids_for(result.delivery_id)[0]
    assert stored.dispatched_at == T0
    assert len(stored.idempotency_key) == 32
    assert balance(app, user_id) == 2
    assert events(app, result.delivery_id) == ["delivery.scheduled"]
    with session_scope(app.session_factory) as session:
        letter = session.get(Letter, result.letter_id)
        assert letter is not None and b"Dear future me" not in letter.body_ciphertext
        assert app.keyring.open(
            letter.key_id, letter.id, letter.subject_ciphertext, letter.body_ciphertext
        ) == ("Hello", "Dear future me")


def test_schedule_beyond_the_horizon_puts_nothing_in_the_broker(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    result = schedule(app, make_user(app), at=LATER)

    assert result.task_id is None and enqueuer.enqueued == []
    assert row(app, result.delivery_id).task_id is None


def test_enqueue_failure_at_schedule_time_still_succeeds_and_leaves_an_undispatched_row(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    # Given a broker that refuses every task
    enqueuer.fail = True
    user_id = make_user(app)

    # When a letter due soon is scheduled
    result = schedule(app, user_id)

    # Then the call succeeds, the row is scheduled with no task, and the credit is held
    stored = row(app, result.delivery_id)
    assert result.task_id is None
    assert (
        stored.status == Status.SCHEDULED
        and stored.task_id is None
        and stored.dispatched_at is None
    )
    assert balance(app, user_id) == 2


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"recipient": "not-an-address"}, InvalidAddress),
        ({"recipient": "a@b"}, InvalidAddress),
        ({"recipient": "two@@example.com"}, InvalidAddress),
        ({"deliver_at": T0 - timedelta(seconds=1)}, InvalidDeliveryTime),
        ({"deliver_at": T0}, InvalidDeliveryTime),
        ({"deliver_at": T0 + timedelta(days=366 * 51)}, InvalidDeliveryTime),
        ({"body": "x" * 300_000}, LetterTooLarge),
        ({"body": "   "}, ValidationError),
        ({"subject": ""}, ValidationError),
        ({"user_id": 999_999}, UserNotFound),
    ],
)
def test_bad_input_is_refused_with_a_clear_error_and_writes_nothing(
    app: App, enqueuer: RecordingEnqueuer, overrides, error
) -> None:
    user_id = make_user(app)
    before = counts(app)

    with pytest.raises(error) as caught:
        schedule(app, user_id, **overrides)

    assert str(caught.value)
    assert counts(app) == before
    assert enqueuer.enqueued == []


def test_no_credit_is_refused_and_writes_nothing(app: App) -> None:
    user_id = make_user(app, credit=1)
    schedule(app, user_id)
    before = counts(app)

    with pytest.raises(InsufficientCredit, match="no delivery credit"):
        schedule(app, user_id)

    assert counts(app) == before
    assert balance(app, user_id) == 0


# ---------------------------------------------------------------- cancel


def test_cancel_refunds_revokes_and_audits(app: App, enqueuer: RecordingEnqueuer) -> None:
    user_id = make_user(app)
    result = schedule(app, user_id)

    cancel_delivery(
        app, result.delivery_id, now=T0, actor="ada@example.com", reason="changed my mind"
    )

    stored = row(app, result.delivery_id)
    assert stored.status == Status.CANCELED and stored.canceled_at == T0 and stored.task_id is None
    assert enqueuer.revoked == [result.task_id]
    assert balance(app, user_id) == 3
    assert events(app, result.delivery_id) == ["delivery.scheduled", "delivery.canceled"]


def test_cancel_twice_is_an_invalid_transition_and_refunds_once(app: App) -> None:
    user_id = make_user(app)
    result = schedule(app, user_id)
    cancel_delivery(app, result.delivery_id, now=T0, actor="ada", reason="x")

    with pytest.raises(InvalidTransition, match="canceled"):
        cancel_delivery(app, result.delivery_id, now=T0, actor="ada", reason="x")

    assert balance(app, user_id) == 3


def test_cancel_a_failed_delivery_refunds_only_what_it_still_holds(app: App) -> None:
    user_id = make_user(app)
    transient = schedule(app, user_id)
    permanent = schedule(app, user_id)
    fail(app, transient.delivery_id, "transient")  # keeps its credit
    fail(app, permanent.delivery_id, "permanent")  # refunded on failure
    assert balance(app, user_id) == 2

    cancel_delivery(app, transient.delivery_id, now=SOON, actor="support", reason="x")
    cancel_delivery(app, permanent.delivery_id, now=SOON, actor="support", reason="x")

    assert balance(app, user_id) == 3


def test_cancel_survives_a_dead_broker(app: App, enqueuer: RecordingEnqueuer) -> None:
    result = schedule(app, make_user(app))
    enqueuer.fail = True

    cancel_delivery(app, result.delivery_id, now=T0, actor="ada", reason="x")

    assert row(app, result.delivery_id).status == Status.CANCELED


@pytest.mark.parametrize("status", [Status.PROCESSING, Status.SENT])
def test_cancel_refuses_processing_and_sent(app: App, status: Status) -> None:
    result = schedule(app, make_user(app))
    if status == Status.SENT:
        run(app, result.delivery_id, Outcome(None, provider="outbox", provider_message_id="m1"))
    else:
        assert take(app, result.delivery_id) is not None

    with pytest.raises(InvalidTransition, match=str(status)):
        cancel_delivery(app, result.delivery_id, now=SOON, actor="ada", reason="x")
    assert row(app, result.delivery_id).status == status


def test_unknown_delivery_is_not_found(app: App) -> None:
    with pytest.raises(DeliveryNotFound):
        cancel_delivery(app, uuid.uuid4(), now=T0, actor="ada", reason="x")
    with pytest.raises(DeliveryNotFound):
        requeue_delivery(app, uuid.uuid4(), now=T0, actor="ada", reason="x")


# ---------------------------------------------------------------- reschedule and claim


def test_after_a_reschedule_a_claim_by_the_old_dispatch_finds_nothing(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    # Given a delivery dispatched for SOON
    result = schedule(app, make_user(app))
    old_task = result.task_id
    assert old_task

    # When it is moved a week later
    new_task = reschedule_delivery(
        app, result.delivery_id, SOON + timedelta(days=7), now=T0, actor="ada", reason="busy week"
    )

    # Then the old task, waking at SOON, cannot claim it, and nothing new is queued yet
    assert take(app, result.delivery_id, old_task) is None
    assert new_task is None
    assert enqueuer.revoked == [old_task]
    stored = row(app, result.delivery_id)
    assert stored.status == Status.SCHEDULED and stored.task_id is None
    assert stored.deliver_at == SOON + timedelta(days=7)
    assert events(app, result.delivery_id) == ["delivery.scheduled", "delivery.rescheduled"]


def test_reschedule_sooner_dispatches_for_the_new_time(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    result = schedule(app, make_user(app), at=LATER)
    target = T0 + timedelta(minutes=5)

    task_id = reschedule_delivery(app, result.delivery_id, target, now=T0, actor="ada")

    assert task_id and enqueuer.enqueued[-1][1] == target
    assert row(app, result.delivery_id).task_id == task_id


def test_reschedule_into_the_past_or_of_a_canceled_delivery_is_refused(app: App) -> None:
    result = schedule(app, make_user(app))
    with pytest.raises(InvalidDeliveryTime):
        reschedule_delivery(app, result.delivery_id, T0 - timedelta(hours=1), now=T0, actor="ada")
    cancel_delivery(app, result.delivery_id, now=T0, actor="ada")
    with pytest.raises(InvalidTransition):
        reschedule_delivery(app, result.delivery_id, LATER, now=T0, actor="ada")


def test_claim_is_a_compare_and_set_only_one_of_two_tasks_wins(app: App) -> None:
    result = schedule(app, make_user(app))

    assert take(app, result.delivery_id, "early", now=SOON - timedelta(seconds=1)) is None
    first = take(app, result.delivery_id, "a")
    second = take(app, result.delivery_id, "b")

    assert first is not None and first.run_number == 1 and first.task_id == "a"
    assert second is None
    stored = row(app, result.delivery_id)
    assert stored.status == Status.PROCESSING and stored.task_id == "a"
    assert stored.lease_until == SOON + timedelta(seconds=60)


def test_a_canceled_delivery_cannot_be_claimed(app: App) -> None:
    result = schedule(app, make_user(app))
    cancel_delivery(app, result.delivery_id, now=T0, actor="ada")
    assert take(app, result.delivery_id, result.task_id or "t") is None


# ---------------------------------------------------------------- requeue and outcomes


def test_requeue_failed_reserves_again_after_a_refund_and_stores_the_new_task(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    user_id = make_user(app, credit=1)
    result = schedule(app, user_id)
    fail(app, result.delivery_id, "permanent")
    assert balance(app, user_id) == 1

    task_id = requeue_delivery(
        app, result.delivery_id, now=SOON, actor="support@capsule", reason="address fixed"
    )

    stored = row(app, result.delivery_id)
    assert stored.status == Status.SCHEDULED and stored.next_attempt_at == SOON
    assert task_id and stored.task_id == task_id
    assert stored.round_attempts == 0 and stored.attempt_count == 1
    assert balance(app, user_id) == 0
    assert events(app, result.delivery_id)[-1] == "delivery.requeued"


def test_requeue_refuses_anything_but_failed(app: App) -> None:
    result = schedule(app, make_user(app))
    with pytest.raises(InvalidTransition, match="scheduled"):
        requeue_delivery(app, result.delivery_id, now=T0, actor="support", reason="x")


def test_requeue_without_credit_after_a_refund_is_refused_and_changes_nothing(app: App) -> None:
    user_id = make_user(app, credit=1)
    result = schedule(app, user_id)
    fail(app, result.delivery_id, "permanent")
    schedule(app, user_id)  # spends the refunded credit

    with pytest.raises(InsufficientCredit):
        requeue_delivery(app, result.delivery_id, now=SOON, actor="support", reason="x")
    assert row(app, result.delivery_id).status == Status.FAILED


def test_permanent_failure_refunds_and_queues_one_owner_notification(app: App) -> None:
    user_id = make_user(app)
    result = schedule(app, user_id)

    fail(app, result.delivery_id, "permanent")

    stored = row(app, result.delivery_id)
    assert (
        stored.status == Status.FAILED
        and stored.error_class == "permanent"
        and stored.failed_at == SOON
    )
    assert balance(app, user_id) == 3
    with session_scope(app.session_factory) as session:
        notes = session.scalars(
            select(Notification).where(Notification.delivery_id == result.delivery_id)
        ).all()
    assert [(n.kind, n.status) for n in notes] == [("delivery_failed", "pending")]


def test_transient_failure_retries_with_backoff_until_the_cap(app: App) -> None:
    result = schedule(app, make_user(app))
    now = SOON
    statuses = []
    for _ in range(app.settings.max_attempts):
        outcome = Outcome(error_class="transient", error="503", retry_after=45)
        _, recorded = run(app, result.delivery_id, outcome, task_id=uuid.uuid4().hex, now=now)
        statuses.append(recorded.status)
        if recorded.next_attempt_at:
            assert recorded.next_attempt_at - now >= timedelta(seconds=45)
            now = recorded.next_attempt_at

    assert statuses == [Status.SCHEDULED] * (app.settings.max_attempts - 1) + [Status.FAILED]
    stored = row(app, result.delivery_id)
    assert stored.attempt_count == app.settings.max_attempts and stored.deliver_at == SOON


def test_a_late_success_is_kept_even_after_the_lease_was_recovered(app: App) -> None:
    result = schedule(app, make_user(app))
    claimed = take(app, result.delivery_id, "slow")
    assert claimed is not None
    assert recover(app, result.delivery_id, now=SOON + timedelta(seconds=61))

    recorded = record(
        app,
        claimed,
        Outcome(error_class=None, provider="outbox", provider_message_id="m"),
        now=SOON + timedelta(seconds=62),
    )

    assert recorded.status == Status.SENT
    assert row(app, result.delivery_id).status == Status.SENT


def test_a_failure_from_a_run_that_lost_its_lease_is_discarded(app: App) -> None:
    result = schedule(app, make_user(app))
    claimed = take(app, result.delivery_id, "slow")
    assert claimed is not None
    recover(app, result.delivery_id, now=SOON + timedelta(seconds=61))

    recorded = record(
        app,
        claimed,
        Outcome(error_class="permanent", error="422"),
        now=SOON + timedelta(seconds=62),
    )

    assert recorded.status is None
    assert row(app, result.delivery_id).status == Status.SCHEDULED
    assert events(app, result.delivery_id)[-1] == "delivery.outcome_discarded"


def test_requeue_with_a_stale_expected_version_is_refused(app: App) -> None:
    result = schedule(app, make_user(app))
    fail(app, result.delivery_id, "transient")
    seen = row(app, result.delivery_id).version

    with pytest.raises(InvalidTransition, match="changed since it was checked"):
        requeue_delivery(
            app, result.delivery_id, now=SOON, actor="ops", reason="x", expected_version=seen - 1
        )
    requeue_delivery(
        app, result.delivery_id, now=SOON, actor="ops", reason="x", expected_version=seen
    )
    assert row(app, result.delivery_id).status == Status.SCHEDULED


def test_a_pinned_delivery_that_runs_out_of_attempts_fails_as_ambiguous(app: App) -> None:
    # Given a delivery pinned to Resend after a timeout that may have been an acceptance
    result = schedule(app, make_user(app))
    settings = settings_with(app, max_attempts=1)
    # When its last try meets an open circuit (transient)
    outcome = Outcome(
        error_class="transient", error="resend: circuit open", pinned_provider="resend"
    )
    _, recorded = run(app, result.delivery_id, outcome, settings=settings)

    # Then it fails as ambiguous, still pinned, and keeps its credit
    stored = row(app, result.delivery_id)
    assert recorded.status == Status.FAILED
    assert stored.error_class == "ambiguous" and stored.pinned_provider == "resend"


def test_a_run_that_reached_no_provider_gives_its_attempt_back(app: App) -> None:
    # Given a delivery on its last allowed attempt
    result = schedule(app, make_user(app))
    settings = settings_with(app, max_attempts=1)
    # When every provider's circuit was open, so nothing was called
    outcome = Outcome(error_class="transient", error="circuit open", retry_after=40, deferred=True)
    claimed, recorded = run(app, result.delivery_id, outcome, settings=settings)
    assert claimed.round_attempts == 1

    # Then it is not failed: it waits for the circuit, then a spread over the backoff base
    # or the wait itself, whichever is longer
    stored = row(app, result.delivery_id)
    assert recorded.status == Status.SCHEDULED and stored.status == Status.SCHEDULED
    assert stored.round_attempts == 0 and stored.attempt_count == 1
    lo = SOON + timedelta(seconds=40)
    spread = timedelta(seconds=max(settings.backoff_base_seconds, 40))
    assert lo <= stored.next_attempt_at <= lo + spread
    assert events(app, result.delivery_id)[-1] == "delivery.deferred"

    # And a real transient answer on the next run still counts and fails it at the cap
    later = stored.next_attempt_at
    outcome = Outcome(error_class="transient", error="503")
    claimed, recorded = run(
        app, result.delivery_id, outcome, task_id="t2", now=later, settings=settings
    )
    assert claimed.round_attempts == 1 and recorded.status == "failed"
