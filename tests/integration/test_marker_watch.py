"""A wiped broker is noticed in seconds, not at the next minute: a real consumer on Redis and
PostgreSQL, its broker keys deleted while letters are due; and the check itself, with an
injected clock, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from benchmarks.harness import wait_for
from core.bootstrap import App
from core.db import session_scope
from core.dispatch import dispatch_many
from core.errors import EnqueueError
from core.locks import single_runner
from core.models import Delivery, ReconcilerRun, Status
from core.policy import utcnow
from core.reconcile import DISPATCHER, redispatch_if_marker_lost
from tests.conftest import T0, RecordingEnqueuer, set_row
from tests.integration.scenario_world import World
from tests.integration.test_consumers import live, reconfigure  # noqa: F401  (fixture)
from tests.integration.test_transitions import LATER, SOON, make_user, row, schedule

LETTERS = 30


# Huey's scheduler enqueues periodic tasks when the consumer starts and every 60 s after
# (counted from the start, not on minute boundaries): the minute's dispatcher cannot rescue
# letters before the consumer's 60th second.
NEXT_PERIODIC = 57.0


@pytest.mark.slow
def test_a_wiped_broker_is_noticed_within_seconds_and_what_is_due_goes_out_once(
    live: World,  # noqa: F811  (the fixture imported above)
) -> None:
    reconfigure(live, CAPSULE_MARKER_CHECK_SECONDS="1")
    started = time.monotonic()
    consumer = live.consumer()
    # Given a consumer that has set the broker's marker (its first dispatcher run, or its watch)
    wait_for(live.app.enqueuer.has_marker, timeout=20, what="marker set")
    start = utcnow()
    # ... and letters due over a few seconds, each dispatched to Redis at scheduling, far enough
    # ahead that a busy machine has scheduled them all before the first is due: the wipe must
    # find every task still waiting in Redis, or there is nothing for the watch to rescue
    due = [start + timedelta(seconds=10 + 4 * i / LETTERS) for i in range(LETTERS)]
    ids = [live.schedule(at) for at in due]
    assert all(row.task_id for row in live.rows())
    assert utcnow() < due[0], "scheduling outlasted the first due time: nothing to rescue"

    # When the broker loses everything it held for this system
    assert live.wipe_broker() > 0
    wiped = time.monotonic()

    # Then every letter is sent once, within seconds: before the consumer's next periodic
    # dispatcher run could have noticed anything
    ceiling = min(25.0, started + NEXT_PERIODIC - wiped)
    assert ceiling > 10, "the consumer took too long to start for this test to mean anything"
    wait_for(
        lambda: live.count(Status.SENT) == LETTERS,
        timeout=ceiling,
        interval=0.2,
        what=f"{LETTERS} sent after the wipe",
    )
    live.assert_each_sent_once()
    assert len(ids) == LETTERS
    # ... and it was the watch's run (no slot) that made the dispatches again
    with session_scope(live.app.session_factory) as session:
        runs = session.scalars(
            select(ReconcilerRun).where(
                ReconcilerRun.kind == "dispatcher", ReconcilerRun.slot.is_(None)
            )
        ).all()
    assert any(run.recovered > 0 for run in runs), [(r.recovered, r.found) for r in runs]
    assert consumer.alive


# ---------------------------------------------------------------- the check itself


def test_the_marker_check_runs_the_dispatcher_only_when_the_marker_is_gone(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    # Given three letters dispatched to a broker that then lost its data (no marker)
    user_id = make_user(app, credit=5)
    ids = [schedule(app, user_id, at=SOON + timedelta(minutes=i)).delivery_id for i in range(3)]
    now = T0 + timedelta(seconds=5)

    # When a consumer's check runs: everything within the horizon is dispatched again, once
    report = redispatch_if_marker_lost(app, now=now, runner="w", clock=lambda: now)
    assert report is not None and report.ran and report.recovered == 3
    assert all(len(enqueuer.ids_for(i)) == 2 for i in ids) and enqueuer.marker

    # ... and the next checks, marker present, do nothing at all
    assert redispatch_if_marker_lost(app, now=now, runner="w", clock=lambda: now) is None
    assert all(len(enqueuer.ids_for(i)) == 2 for i in ids)


def test_the_marker_check_keeps_the_single_runner_rule_and_survives_a_dead_broker(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    user_id = make_user(app, credit=5)
    schedule(app, user_id, at=SOON)
    now = T0 + timedelta(seconds=5)

    # Another runner holds the dispatcher's lock: this check does not run it
    with single_runner(app.engine, f"safety-net-{DISPATCHER}", app.settings.var_path / "locks"):
        held = redispatch_if_marker_lost(app, now=now, runner="w", clock=lambda: now)
    assert held is not None and not held.ran and not enqueuer.marker

    # A broker that cannot be asked: nothing happens, nothing raises
    def down() -> bool:
        raise ConnectionError("refused (test)")

    enqueuer.has_marker = down  # type: ignore[method-assign]
    assert redispatch_if_marker_lost(app, now=now, runner="w", clock=lambda: now) is None
    assert len(enqueuer.enqueued) == 1


def test_dispatching_many_records_each_dispatch_in_one_go_and_never_over_a_newer_one(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    # Given three due letters with no dispatch
    user_id = make_user(app, credit=5)
    ids = [schedule(app, user_id, at=LATER).delivery_id for _ in range(3)]
    with session_scope(app.session_factory) as session:
        session.execute(update(Delivery).values(task_id=None, dispatched_at=None))
        session.commit()
    # ... and a broker that refuses the second, while the third gets a retry's own dispatch
    # between its enqueue and the bookkeeping
    original = enqueuer.enqueue

    def enqueue(delivery_id: uuid.UUID, eta: datetime) -> str:
        if delivery_id == ids[1]:
            raise EnqueueError(delivery_id, "refused (test)")
        task_id = original(delivery_id, eta)
        if delivery_id == ids[2]:
            set_row(app, ids[2], task_id="retry-task")
        return task_id

    enqueuer.enqueue = enqueue  # type: ignore[method-assign]

    # When they are dispatched together
    enqueued, refused = dispatch_many(
        app.session_factory, enqueuer, [(i, LATER) for i in ids], SOON
    )

    # Then the first is recorded, the refused one is left for the next run, and the newer
    # dispatch of the third is kept
    assert (enqueued, refused) == (2, 1)
    assert row(app, ids[0]).task_id == enqueuer.ids_for(ids[0])[0]
    assert row(app, ids[0]).dispatched_at is not None
    assert row(app, ids[1]).task_id is None
    assert row(app, ids[2]).task_id == "retry-task"
