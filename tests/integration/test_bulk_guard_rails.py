"""Bulk requeue guard rails, on SQLite and PostgreSQL: "any class" leaves out the failures a
requeue could send twice or cannot open; a row cap; one active operation per overlapping
filter (also when two launches race)."""

from __future__ import annotations

import contextlib
import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select

from core import bulk
from core.bootstrap import App
from core.db import session_scope
from core.errors import BulkConflict, ValidationError
from core.failed_filter import FailedFilter
from core.models import BulkOperation, CreditEntry, Delivery
from tests.conftest import T0
from tests.console.builders import add_failed
from tests.integration.test_triage_bulk import (  # noqa: F401  (failed: a fixture)
    LATER,
    OPS,
    FakeTime,
    failed,
    launch,
    status_of,
)

RISKY = ("ambiguous", "possibly_sent", "decryption")


@pytest.fixture
def risky(app: App, failed: list[uuid.UUID]) -> list[uuid.UUID]:  # noqa: F811
    """One failure of each risky class beside the fixture's three safe ones."""
    with session_scope(app.session_factory) as s:
        owner = s.scalar(select(Delivery.user_id).where(Delivery.id == failed[0]))
        assert owner is not None
        ids = [
            add_failed(s, owner, failed_at=T0 - bulk.STALE_AFTER, error_class=c, code=None)
            for c in RISKY
        ]
        # they hold their credits: give the owner enough for the refunded one to be requeued
        s.add(CreditEntry(user_id=owner, amount=5, reason="grant", created_at=T0))
        s.commit()
    return ids


def operations(app: App) -> int:
    with session_scope(app.session_factory) as s:
        return int(s.scalar(select(func.count()).select_from(BulkOperation)) or 0)


def test_any_class_leaves_out_the_risky_failures_and_the_runner_never_touches_them(
    app: App,
    failed: list[uuid.UUID],  # noqa: F811
    risky: list[uuid.UUID],
) -> None:
    # Given three safe failures and one of each risky class
    with session_scope(app.session_factory) as s:
        shown = bulk.preview(s, FailedFilter(), now=LATER)
        dry = bulk.dry_run(s, FailedFilter(), now=LATER)

    # Then "any class" counts only the safe ones and says what it leaves out, without warning
    assert shown.count == 3 and dry.count == 3
    assert shown.left_out == {c: 1 for c in RISKY} and shown.risky == {}
    assert shown.warnings == []
    assert set(dry.by_error_class) == {"transient", "permanent"}
    assert set(shown.filter.error_classes) == set(bulk.ANY_SAFE_CLASS)

    # When it is launched (the count typed must be that of the safe ones) and run, only the
    # safe three are requeued
    with pytest.raises(ValidationError, match="3 deliveries match now, not 6"):
        launch(app, FailedFilter(), count=6)
    op_id = launch(app, FailedFilter(), count=3, rate=100)
    time = FakeTime(LATER)
    result = bulk.run_operation(app, op_id, clock=time.clock, sleep=time.sleep)
    assert (result.state, result.done, result.skipped) == ("done", 3, 0)
    assert [status_of(app, i) for i in risky] == ["failed"] * 3


def test_risky_classes_join_only_when_named_and_then_carry_the_dialogs_warning(
    app: App,
    failed: list[uuid.UUID],  # noqa: F811
    risky: list[uuid.UUID],
) -> None:
    named = FailedFilter(error_classes=("transient", "ambiguous", "possibly_sent"))
    with session_scope(app.session_factory) as s:
        shown = bulk.preview(s, named, now=LATER)
        unreadable = bulk.preview(s, FailedFilter(error_classes=("decryption",)), now=LATER)
    assert shown.count == 4 and shown.risky == {"ambiguous": 1, "possibly_sent": 1}
    assert shown.left_out == {}
    [warning] = shown.warnings
    assert warning.startswith("2 of these may already have reached the recipient")
    assert unreadable.count == 1 and "could not be decrypted" in unreadable.warnings[0]

    op_id = launch(app, named, count=4, rate=100)
    time = FakeTime(LATER)
    assert bulk.run_operation(app, op_id, clock=time.clock, sleep=time.sleep).done == 4
    assert [status_of(app, i) for i in risky] == ["scheduled", "scheduled", "failed"]


def test_an_operation_above_the_row_cap_is_refused_and_nothing_is_written(
    app: App,
    failed: list[uuid.UUID],  # noqa: F811
) -> None:
    app.settings = app.settings.replace(bulk_max_rows=2)
    with pytest.raises(ValidationError, match=r"at most 2 \(CAPSULE_BULK_MAX_ROWS\)"):
        launch(app, FailedFilter(), count=3)
    assert operations(app) == 0
    # a filter within the cap is fine
    launch(app, FailedFilter(error_classes=("transient",)), count=2)
    assert operations(app) == 1


def test_one_active_operation_per_overlapping_filter(
    app: App,
    failed: list[uuid.UUID],  # noqa: F811
) -> None:
    # Given an active (pending) requeue of the transient failures
    first = launch(app, FailedFilter(error_classes=("transient",)), count=2)

    # When another operation whose filter overlaps it is launched, it is refused, naming it
    with pytest.raises(BulkConflict, match=f"bulk operation #{first} \\(pending, by olga"):
        launch(app, FailedFilter(), count=3)
    with session_scope(app.session_factory) as s:
        shown = bulk.preview(s, FailedFilter(recipient_domain="gmail.test"), now=LATER)
    assert shown.active is not None and shown.active.id == first
    assert operations(app) == 1

    # ... while a disjoint one may run beside it
    second = launch(app, FailedFilter(error_classes=("permanent",)), count=1)

    # And once the operations it overlaps have ended, the overlapping one may start
    bulk.request_abort(app.session_factory, OPS, first, now=LATER)
    with pytest.raises(BulkConflict, match=f"#{second} "):  # the permanent one is active
        launch(app, FailedFilter(), count=3)
    time = FakeTime(LATER)
    assert bulk.run_operation(app, second, clock=time.clock, sleep=time.sleep).state == "done"
    launch(app, FailedFilter(), count=2)  # the permanent one was requeued: two remain


def test_two_launches_racing_on_overlapping_filters_start_only_one(
    app: App,
    failed: list[uuid.UUID],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    barrier = threading.Barrier(2)
    outcomes: list[str] = []
    # Each launch, once it has looked for a conflict, waits up to 2 s for the other to have
    # looked too: without the launches' lock both would find none and both would start.
    looked = threading.Barrier(2, timeout=2)
    original = bulk.conflicting

    def slow_conflicting(session: Any, flt: FailedFilter) -> Any:
        found = original(session, flt)
        with contextlib.suppress(threading.BrokenBarrierError):
            looked.wait()
        return found

    monkeypatch.setattr(bulk, "conflicting", slow_conflicting)

    def go(flt: FailedFilter, count: int) -> None:
        barrier.wait()
        try:
            bulk.launch(
                app,
                OPS,
                flt,
                reason="race",
                confirm_count=count,
                rate_per_second=5,
                now=LATER,
                enqueue=lambda op: f"task-{op}",
            )
            outcomes.append("launched")
        except BulkConflict:
            outcomes.append("refused")
        except Exception as exc:  # shows in the assertion below
            outcomes.append(f"error: {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=go, args=(FailedFilter(), 3)),
        threading.Thread(target=go, args=(FailedFilter(error_classes=("transient",)), 2)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["launched", "refused"]
    assert operations(app) == 1
