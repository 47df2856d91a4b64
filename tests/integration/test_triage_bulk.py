"""Support and ops actions: roles enforced in the service, an audit row for every action, and
the bulk runner's rate, re-checks and abort, on SQLite and PostgreSQL (`db_kind`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from core import bulk, credits, triage
from core.bootstrap import App
from core.db import session_scope
from core.errors import PermissionDenied, ValidationError
from core.failed_filter import FailedFilter
from core.models import (
    AuditEvent,
    BulkOperation,
    CreditEntry,
    Delivery,
    Notification,
    Status,
)
from core.operators import Operator, Role
from core.queries import bulk as bulk_queries
from tests.conftest import T0, RecordingEnqueuer
from tests.console.builders import add_failed, add_user

VIEWER = Operator("vera", Role.VIEWER)
SUPPORT = Operator("sam", Role.SUPPORT)
OPS = Operator("olga@example.com", Role.OPS, source="oidc")
LATER = T0 + timedelta(hours=1)


@dataclass
class FakeOutcome:
    sent: bool
    provider: str | None = "fake"
    provider_message_id: str | None = "msg-1"
    error: str | None = None
    error_class: str | None = None


class FakeChain:
    """Stands in for the provider chain: records what the notice said."""

    def __init__(self, works: bool = True) -> None:
        self.works = works
        self.sent: list[Any] = []

    def send(self, email: Any, *, pinned: str | None, now: datetime) -> FakeOutcome:
        if not self.works:
            raise ConnectionError("provider chain unavailable (test)")
        self.sent.append(email)
        return FakeOutcome(sent=True)


@pytest.fixture
def chain(app: App) -> FakeChain:
    fake = FakeChain()
    app.__dict__["chain"] = fake  # App.chain is a cached_property
    return fake


@pytest.fixture
def failed(app: App) -> list[uuid.UUID]:
    """Three failed deliveries: two transient from resend, one permanent (credit refunded)."""
    with session_scope(app.session_factory) as s:
        owner = add_user(s, "ada@example.com", T0 - timedelta(days=30), credit=5)
        ids = [
            add_failed(
                s,
                owner,
                failed_at=T0 - timedelta(hours=3 - i),
                error_class="transient",
                code=503,
                recipient=f"r{i}@gmail.test",
            )
            for i in range(2)
        ]
        ids.append(add_failed(s, owner, failed_at=T0 - timedelta(minutes=30)))
        s.commit()
    return ids


def events(app: App, type_: str | None = None) -> list[AuditEvent]:
    with session_scope(app.session_factory) as s:
        query = select(AuditEvent).order_by(AuditEvent.id)
        if type_:
            query = query.where(AuditEvent.type == type_)
        return list(s.scalars(query))


def status_of(app: App, delivery_id: uuid.UUID) -> str:
    with session_scope(app.session_factory) as s:
        return str(s.scalar(select(Delivery.status).where(Delivery.id == delivery_id)))


# ---------------------------------------------------------------- roles


@pytest.mark.parametrize(
    "call",
    [
        lambda app, ids: triage.requeue(app, VIEWER, ids[0], reason="r", now=LATER),
        lambda app, ids: triage.cancel(app, VIEWER, ids[0], reason="r", now=LATER),
        lambda app, ids: triage.notify_owner(app, VIEWER, ids[0], reason="r", now=LATER),
        lambda app, ids: triage.apply(app, VIEWER, "requeue", ids, reason="r", now=LATER),
        lambda app, ids: bulk.launch(
            app,
            SUPPORT,  # support may triage one by one, not run bulk operations
            FailedFilter(),
            reason="r",
            confirm_count=3,
            rate_per_second=5,
            now=LATER,
            enqueue=lambda op: "t",
        ),
        lambda app, ids: bulk.request_abort(app.session_factory, SUPPORT, 1, now=LATER),
    ],
    ids=["requeue", "cancel", "notify", "apply", "bulk-launch", "bulk-abort"],
)
def test_a_role_too_low_is_refused_by_the_service(
    app: App, failed: list[uuid.UUID], call: Callable[[App, list[uuid.UUID]], Any]
) -> None:
    before = len(events(app))
    with pytest.raises(PermissionDenied):
        call(app, failed)
    assert [status_of(app, i) for i in failed] == ["failed"] * 3
    assert len(events(app)) == before


def test_a_reason_is_required(app: App, failed: list[uuid.UUID]) -> None:
    with pytest.raises(ValidationError):
        triage.requeue(app, SUPPORT, failed[0], reason="   ", now=LATER)
    assert status_of(app, failed[0]) == "failed"


# ---------------------------------------------------------------- support actions


def test_requeue_and_cancel_leave_audit_rows_naming_the_operator(
    app: App, enqueuer: RecordingEnqueuer, failed: list[uuid.UUID]
) -> None:
    # When support requeues one failure and cancels another
    task_id = triage.requeue(app, SUPPORT, failed[0], reason="provider is back", now=LATER)
    triage.cancel(app, SUPPORT, failed[1], reason="owner asked", now=LATER)

    # Then each row moved, the requeue was dispatched, and each left an audit event
    assert status_of(app, failed[0]) == "scheduled"
    assert status_of(app, failed[1]) == "canceled"
    assert enqueuer.ids_for(failed[0]) == [task_id]
    requeued = events(app, "delivery.requeued")
    canceled = events(app, "delivery.canceled")
    assert [(e.actor, e.reason, e.delivery_id) for e in requeued] == [
        ("sam", "provider is back", failed[0])
    ]
    assert [(e.actor, e.reason, e.delivery_id) for e in canceled] == [
        ("sam", "owner asked", failed[1])
    ]


def test_apply_reports_rows_that_moved_on(app: App, failed: list[uuid.UUID]) -> None:
    # Given one of the selected rows was requeued by someone else meanwhile
    triage.requeue(app, OPS, failed[0], reason="first", now=LATER)

    # When support requeues the selection
    results = triage.apply(app, SUPPORT, "requeue", failed[:2], reason="again", now=LATER)

    # Then the moved row is skipped with its state, the other one is requeued
    assert [r.ok for r in results] == [False, True]
    assert "it is scheduled" in results[0].message
    assert len(events(app, "delivery.requeued")) == 2


def test_notify_sends_once_then_says_already(
    app: App, chain: FakeChain, failed: list[uuid.UUID]
) -> None:
    first = triage.notify_owner(app, SUPPORT, failed[2], reason="owner called", now=LATER)
    second = triage.notify_owner(app, SUPPORT, failed[2], reason="owner called again", now=LATER)

    assert first.outcome == "sent"
    assert second.outcome == "already" and "already notified" in second.message
    assert len(chain.sent) == 1 and chain.sent[0].to == "ada@example.com"
    assert "Dear" not in chain.sent[0].text  # the notice never carries the letter
    with session_scope(app.session_factory) as s:
        note = s.scalars(select(Notification)).one()
    assert (note.status, note.requested_by) == ("sent", "sam")
    assert [(e.type, e.actor) for e in events(app) if e.type.startswith("notification.")] == [
        ("notification.requested", "sam"),
        ("notification.sent", "system"),
        ("notification.already_requested", "sam"),
    ]


def test_notify_queues_when_sending_fails(app: App, failed: list[uuid.UUID]) -> None:
    app.__dict__["chain"] = FakeChain(works=False)
    result = triage.notify_owner(app, SUPPORT, failed[0], reason="owner called", now=LATER)
    assert result.outcome == "queued"
    with session_scope(app.session_factory) as s:
        assert s.scalar(select(Notification.status)) == "pending"
    assert len(events(app, "notification.requested")) == 1


def test_notify_only_for_failed_rows(app: App, failed: list[uuid.UUID]) -> None:
    triage.cancel(app, SUPPORT, failed[0], reason="dup", now=LATER)
    results = triage.apply(app, SUPPORT, "notify", [failed[0]], reason="x", now=LATER)
    assert not results[0].ok and "canceled" in results[0].message


# ---------------------------------------------------------------- bulk


@dataclass
class FakeTime:
    """A clock that only moves when the runner sleeps; `on_sleep` lets a test act mid-run."""

    now: datetime
    slept: list[float] = field(default_factory=list)
    on_sleep: Callable[[int], None] | None = None

    def clock(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)
        if self.on_sleep:
            self.on_sleep(len(self.slept))


def launch(app: App, flt: FailedFilter, count: int, rate: float = 2.0) -> int:
    launched = bulk.launch(
        app,
        OPS,
        flt,
        reason="resend outage over",
        confirm_count=count,
        rate_per_second=rate,
        now=LATER,
        enqueue=lambda op: f"task-{op}",
    )
    assert launched.state == "pending" and launched.task_id == f"task-{launched.operation_id}"
    return launched.operation_id


def operation(app: App, op_id: int) -> bulk_queries.BulkView:
    with session_scope(app.session_factory) as s:
        view = bulk_queries.bulk_operation(s, op_id)
    assert view is not None
    return view


def test_preview_and_dry_run_change_nothing(app: App, failed: list[uuid.UUID]) -> None:
    with session_scope(app.session_factory) as s:
        shown = bulk.preview(s, FailedFilter(), now=LATER, sample=2)
        dry = bulk.dry_run(s, FailedFilter(), now=LATER, rate_per_second=2)
    assert shown.count == 3 and len(shown.sample) == 2
    assert dry.count == 3
    assert dry.by_error_class == {"transient": 2, "permanent": 1}
    assert dry.by_provider == {"resend": 3}
    assert (dry.needs_credit, dry.short_of_credit) == (1, 0)  # the permanent one was refunded
    assert dry.estimated_seconds == 1.5
    assert dry.first_ids[0] == str(failed[0])
    assert [status_of(app, i) for i in failed] == ["failed"] * 3
    assert events(app) == []


def test_launch_needs_the_exact_count(app: App, failed: list[uuid.UUID]) -> None:
    with pytest.raises(ValidationError, match="3 deliveries match now"):
        launch(app, FailedFilter(), count=2)
    with pytest.raises(ValidationError, match="no failed delivery"):
        launch(app, FailedFilter(recipient_domain="nowhere.test"), count=0)
    with pytest.raises(ValidationError, match="rate"):
        launch(app, FailedFilter(), count=3, rate=0)
    with session_scope(app.session_factory) as s:
        assert s.scalar(select(func.count()).select_from(BulkOperation)) == 0


def test_launch_records_the_operation_and_its_audit(app: App, failed: list[uuid.UUID]) -> None:
    op_id = launch(app, FailedFilter(error_classes=("transient",)), count=2)
    view = operation(app, op_id)
    assert (view.state, view.actor, view.expected_count, view.rate_per_second) == (
        "pending",
        "olga@example.com",
        2,
        2.0,
    )
    assert view.filter["failed_until"] == LATER.isoformat()  # pinned at launch
    created = events(app, "bulk.created")
    assert [(e.actor, e.reason, e.data["operation_id"]) for e in created] == [
        ("olga@example.com", "resend outage over", op_id)
    ]


def test_a_broker_failure_ends_the_operation_in_error(app: App, failed: list[uuid.UUID]) -> None:
    def refuse(op_id: int) -> str:
        raise ConnectionError("redis down")

    launched = bulk.launch(
        app,
        OPS,
        FailedFilter(),
        reason="x",
        confirm_count=3,
        rate_per_second=1,
        now=LATER,
        enqueue=refuse,
    )
    view = operation(app, launched.operation_id)
    assert (launched.state, view.state) == ("error", "error")
    assert "redis down" in (view.error_message or "")
    assert [status_of(app, i) for i in failed] == ["failed"] * 3


def test_runner_requeues_at_the_rate_and_skips_rows_that_changed(
    app: App, enqueuer: RecordingEnqueuer, failed: list[uuid.UUID]
) -> None:
    # Given a confirmed bulk requeue of all three failures at 2 per second
    op_id = launch(app, FailedFilter(), count=3, rate=2.0)
    # ... then support requeues one of them by hand before the runner gets there
    triage.requeue(app, SUPPORT, failed[1], reason="by hand", now=LATER)
    # ... and a new failure arrives that matches the filter but failed after the launch
    with session_scope(app.session_factory) as s:
        owner = s.scalar(select(Delivery.user_id).where(Delivery.id == failed[0]))
        assert owner is not None
        newcomer = add_failed(s, owner, failed_at=LATER + timedelta(minutes=1))
        s.commit()

    # When the runner runs
    time = FakeTime(LATER + timedelta(minutes=2))
    result = bulk.run_operation(app, op_id, clock=time.clock, sleep=time.sleep)

    # Then the untouched rows are requeued, the changed one skipped, the newcomer left alone
    assert (result.state, result.done, result.skipped) == ("done", 2, 0)
    assert status_of(app, failed[0]) == status_of(app, failed[2]) == "scheduled"
    assert status_of(app, newcomer) == "failed"
    view = operation(app, op_id)
    assert (view.state, view.done_count, view.skipped_count) == ("done", 2, 0)
    assert view.finished_at is not None
    # paced at 2 per second: one half-second pause between the two rows it touched
    assert sum(time.slept) == pytest.approx(0.5)
    bulk_events = events(app, bulk.BULK_EVENT)
    assert [(e.delivery_id, e.actor) for e in bulk_events] == [
        (failed[0], "olga@example.com"),
        (failed[2], "olga@example.com"),
    ]
    assert all(e.reason == f"bulk #{op_id}: resend outage over" for e in bulk_events)
    assert [e.data["done"] for e in events(app, "bulk.done")] == [2]
    assert {d for d, _, _ in enqueuer.enqueued} >= {failed[0], failed[2]}

    # And running the same task again does nothing
    again = bulk.run_operation(app, op_id, clock=time.clock, sleep=time.sleep)
    assert (again.state, again.done) == ("done", 2)


def test_a_row_that_changed_is_counted_as_skipped(app: App, failed: list[uuid.UUID]) -> None:
    # Given a bulk requeue of the transient failures
    op_id = launch(app, FailedFilter(error_classes=("transient",)), count=2, rate=1.0)

    # When the second row is requeued and fails again (now permanent) while the runner paces
    def meanwhile(sleeps: int) -> None:
        triage.requeue(app, SUPPORT, failed[1], reason="by hand", now=LATER)
        with session_scope(app.session_factory) as s:
            row = s.get(Delivery, failed[1])
            assert row is not None
            row.status, row.error_class, row.failed_at = Status.FAILED, "permanent", T0
            s.commit()

    time = FakeTime(LATER, on_sleep=meanwhile)
    result = bulk.run_operation(app, op_id, clock=time.clock, sleep=time.sleep)

    # Then it no longer matches when the runner reaches it: skipped, not requeued
    assert (result.state, result.done, result.skipped) == ("done", 1, 1)
    assert status_of(app, failed[1]) == "failed"
    assert events(app, "bulk.done")[0].data["skip_reasons"] == {"changed": 1}


def test_abort_stops_the_runner_between_rows(app: App, failed: list[uuid.UUID]) -> None:
    op_id = launch(app, FailedFilter(), count=3, rate=1.0)

    def abort_after_first(sleeps: int) -> None:
        if sleeps == 1:
            state = bulk.request_abort(app.session_factory, OPS, op_id, now=LATER, reason="stop")
            assert state == "aborting"

    time = FakeTime(LATER, on_sleep=abort_after_first)
    result = bulk.run_operation(app, op_id, clock=time.clock, sleep=time.sleep)

    # The row in flight when the abort came is finished; nothing after it is touched
    assert (result.state, result.done) == ("aborted", 2)
    assert status_of(app, failed[2]) == "failed"
    view = operation(app, op_id)
    assert (view.state, view.done_count) == ("aborted", 2)
    assert [e.actor for e in events(app, "bulk.abort_requested")] == ["olga@example.com"]
    assert len(events(app, "bulk.aborted")) == 1


def test_abort_before_start_and_twice(app: App, failed: list[uuid.UUID]) -> None:
    op_id = launch(app, FailedFilter(), count=3)
    assert bulk.request_abort(app.session_factory, OPS, op_id, now=LATER) == "aborted"
    with pytest.raises(ValidationError, match="already aborted"):
        bulk.request_abort(app.session_factory, OPS, op_id, now=LATER)
    time = FakeTime(LATER)
    result = bulk.run_operation(app, op_id, clock=time.clock, sleep=time.sleep)
    assert (result.state, result.done) == ("aborted", 0)
    assert [status_of(app, i) for i in failed] == ["failed"] * 3


def test_a_dead_runner_can_be_aborted(app: App, failed: list[uuid.UUID]) -> None:
    op_id = launch(app, FailedFilter(), count=3)
    with session_scope(app.session_factory) as s:
        op = s.get(BulkOperation, op_id)
        assert op is not None
        op.state = "running"
        s.commit()
    later = LATER + bulk.STALE_AFTER + timedelta(seconds=1)
    assert bulk.request_abort(app.session_factory, OPS, op_id, now=later) == "aborted"


def test_rows_without_credit_are_skipped(app: App, failed: list[uuid.UUID]) -> None:
    # Given the owner has spent every credit, the refunded permanent failure cannot be requeued
    with session_scope(app.session_factory) as s:
        owner = s.scalar(select(Delivery.user_id).where(Delivery.id == failed[2]))
        assert owner is not None
        balance = credits.balance(s, owner)
        s.add(CreditEntry(user_id=owner, amount=-balance, reason="reserve", created_at=T0))
        s.commit()
        dry = bulk.dry_run(s, FailedFilter(), now=LATER)
    assert (dry.needs_credit, dry.short_of_credit, dry.would_requeue) == (1, 1, 2)
    op_id = launch(app, FailedFilter(), count=3, rate=100)
    time = FakeTime(LATER)
    result = bulk.run_operation(app, op_id, clock=time.clock, sleep=time.sleep)
    assert (result.done, result.skipped) == (2, 1)
    assert events(app, "bulk.done")[0].data["skip_reasons"] == {"no_credit": 1}
    with session_scope(app.session_factory) as s:
        history = bulk_queries.bulk_history(s)
        active = bulk_queries.active_bulk_operations(s)
    assert history[["state", "expected", "done", "skipped"]].iloc[0].tolist() == [
        "done",
        3,
        2,
        1,
    ]
    assert active == []
