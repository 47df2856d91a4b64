"""Dispatcher, backstop, failed retrier, single runner, alerts and heartbeat — with an injected
clock, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from core import alerts
from core.bootstrap import App
from core.claims import claim
from core.config import Settings
from core.db import session_scope
from core.locks import single_runner
from core.models import Alert, AuditEvent, Delivery, ReconcilerRun, Status
from core.reconcile import (
    BACKSTOP,
    DISPATCHER,
    FAILED_RETRIER,
    run_backstop,
    run_dispatcher,
    run_failed_retrier,
    run_safety_net,
    slot_for,
)
from tests.conftest import T0, RecordingEnqueuer, set_row
from tests.fakes.alert_webhook import Webhook
from tests.integration.test_transitions import LATER, SOON, fail, make_user, row, schedule


def with_settings(app: App, **changes: object) -> App:
    app.settings = Settings(**{**app.settings.__dict__, **changes})
    return app


# ---------------------------------------------------------------- dispatcher


def test_dispatcher_dispatches_rows_entering_the_horizon_and_only_once(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    # Given a letter a month ahead, with nothing in the broker
    result = schedule(app, make_user(app), at=LATER)
    assert enqueuer.enqueued == []
    enqueuer.marker = True

    # When the dispatcher runs today, nothing happens
    assert run_dispatcher(app, now=T0).found == 0

    # When it runs 30 minutes before the letter is due, the letter gets its task
    report = run_dispatcher(app, now=LATER - timedelta(minutes=30))
    assert (report.found, report.requeued) == (1, 1)
    assert row(app, result.delivery_id).task_id == enqueuer.enqueued[0][2]
    assert enqueuer.enqueued[0][1] == LATER

    # And a second run finds it already dispatched
    assert run_dispatcher(app, now=LATER - timedelta(minutes=29)).found == 0


def test_dispatcher_picks_up_rows_whose_enqueue_failed_at_schedule_time(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    enqueuer.fail = True
    result = schedule(app, make_user(app))
    enqueuer.fail = False
    enqueuer.marker = True

    report = run_dispatcher(app, now=T0 + timedelta(seconds=30))

    assert report.requeued == 1
    assert row(app, result.delivery_id).task_id == enqueuer.ids_for(result.delivery_id)[0]


def test_dispatcher_redispatches_everything_in_the_horizon_when_the_broker_lost_its_data(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    # Given three letters dispatched to a broker that then loses everything (marker gone)
    user_id = make_user(app, credit=5)
    ids = [schedule(app, user_id, at=SOON + timedelta(minutes=i)).delivery_id for i in range(3)]
    far = schedule(app, user_id, at=LATER).delivery_id
    assert len(enqueuer.enqueued) == 3 and not enqueuer.marker

    # When the dispatcher runs
    report = run_dispatcher(app, now=T0 + timedelta(minutes=1))

    # Then each is dispatched again, the far one is left alone, and the marker is set
    assert report.recovered == 3 and report.requeued == 3
    assert all(len(enqueuer.ids_for(i)) == 2 for i in ids)
    assert enqueuer.ids_for(far) == []
    assert enqueuer.marker
    assert run_dispatcher(app, now=T0 + timedelta(minutes=2)).found == 0


# ---------------------------------------------------------------- backstop


def test_backstop_redispatches_due_rows_unclaimed_past_grace_only(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    result = schedule(app, make_user(app))
    first_task = result.task_id

    # Within grace after the due time, the task may still be on its way
    assert run_backstop(app, now=SOON + timedelta(seconds=59)).found == 0

    # Past grace, the row is dispatched again, due now
    now = SOON + timedelta(seconds=61)
    report = run_backstop(app, now=now)
    assert (report.found, report.requeued) == (1, 1)
    stored = row(app, result.delivery_id)
    assert stored.task_id != first_task and stored.dispatched_at == now

    # And not again until another grace period has passed
    assert run_backstop(app, now=now + timedelta(seconds=30)).found == 0
    assert run_backstop(app, now=now + timedelta(seconds=61)).found == 1


def test_backstop_recovers_expired_leases_with_the_same_idempotency_key(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    result = schedule(app, make_user(app))
    key = row(app, result.delivery_id).idempotency_key
    with session_scope(app.session_factory) as session:
        assert claim(session, result.delivery_id, "died", now=SOON, lease_seconds=60)
        session.commit()

    assert run_backstop(app, now=SOON + timedelta(seconds=59)).recovered == 0
    report = run_backstop(app, now=SOON + timedelta(seconds=61))

    stored = row(app, result.delivery_id)
    assert report.recovered == 1
    assert stored.status == Status.SCHEDULED and stored.idempotency_key == key
    assert stored.error_class == "lease_expired"
    assert stored.task_id == enqueuer.enqueued[-1][2]


def test_backstop_with_a_dead_broker_counts_errors_and_leaves_rows_for_the_next_run(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    result = schedule(app, make_user(app))
    enqueuer.fail = True

    report = run_backstop(app, now=SOON + timedelta(minutes=5))

    assert report.found == 1 and report.errors == 1 and report.requeued == 0
    assert row(app, result.delivery_id).status == Status.SCHEDULED
    enqueuer.fail = False
    assert run_backstop(app, now=SOON + timedelta(minutes=7)).requeued == 1


def test_backstop_stops_at_its_time_budget(app: App) -> None:
    user_id = make_user(app, credit=10)
    for _ in range(4):
        schedule(app, user_id)
    with_settings(app, backstop_batch_size=1)
    ticks = iter([True, True, False, False])

    report = run_backstop(app, now=SOON + timedelta(minutes=5), budget=lambda: next(ticks))

    assert report.found == 2


# ---------------------------------------------------------------- failed retrier


def test_failed_retrier_requeues_old_transient_failures_never_permanent_and_honours_the_cap(
    app: App,
) -> None:
    user_id = make_user(app, credit=10)
    transient, permanent, capped, recent = (schedule(app, user_id).delivery_id for _ in range(4))
    for delivery_id in (transient, capped, recent):
        fail(app, delivery_id, "transient")
    fail(app, permanent, "permanent")
    with session_scope(app.session_factory) as session:
        session.execute(
            Delivery.__table__.update()
            .where(Delivery.id == capped)
            .values(attempt_count=app.settings.retry_max_total_attempts)
        )
        session.execute(
            Delivery.__table__.update()
            .where(Delivery.id == recent)
            .values(failed_at=SOON + timedelta(hours=2))
        )
        session.commit()

    report = run_failed_retrier(app, now=SOON + timedelta(hours=25))

    assert report.requeued == 1
    assert row(app, transient).status == Status.SCHEDULED
    assert row(app, permanent).status == Status.FAILED
    assert row(app, capped).status == Status.FAILED
    assert row(app, recent).status == Status.FAILED  # only 23 h old
    with session_scope(app.session_factory) as session:
        event = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.delivery_id == transient)
            .order_by(AuditEvent.id.desc())
        ).first()
    assert (
        event is not None and event.type == "delivery.auto_retry" and event.actor == FAILED_RETRIER
    )


# ---------------------------------------------------------------- single runner and slots


def test_a_slot_runs_once_and_each_run_is_recorded(app: App, enqueuer: RecordingEnqueuer) -> None:
    now = SOON + timedelta(minutes=3, seconds=5)
    schedule(app, make_user(app))

    first = run_safety_net(
        app, BACKSTOP, now=now, runner="a", slot=slot_for(BACKSTOP, now), clock=lambda: now
    )
    second = run_safety_net(
        app,
        BACKSTOP,
        now=now + timedelta(seconds=20),
        runner="b",
        slot=slot_for(BACKSTOP, now),
        clock=lambda: now,
    )

    assert first.ran and first.requeued == 1 and not second.ran
    with session_scope(app.session_factory) as session:
        runs = session.scalars(select(ReconcilerRun)).all()
    assert [(r.kind, r.runner, r.found, r.requeued, r.ok) for r in runs] == [
        (BACKSTOP, "a", 1, 1, True)
    ]
    assert runs[0].slot == now.replace(second=0) and runs[0].finished_at == now


def test_a_slot_whose_runner_died_mid_run_is_run_again_in_the_same_slot(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    # Given the dispatcher's run for this minute started and its consumer was SIGKILLed:
    # its row exists, unfinished, and the lock it held died with it
    now = SOON + timedelta(minutes=3, seconds=5)
    slot = slot_for(DISPATCHER, now)
    with session_scope(app.session_factory) as session:
        session.add(ReconcilerRun(kind=DISPATCHER, runner="killed", slot=slot, started_at=now))
        session.commit()
    result = schedule(app, make_user(app), at=now + timedelta(seconds=30))
    set_row(app, result.delivery_id, task_id=None)  # its task was lost with the broker

    # When another consumer's dispatcher fires in the same minute
    later = now + timedelta(seconds=20)
    report = run_safety_net(app, DISPATCHER, now=later, runner="b", slot=slot, clock=lambda: later)

    # Then it takes the slot over and does the work, and the slot still has one row
    assert report.ran and report.requeued == 1
    with session_scope(app.session_factory) as session:
        runs = session.scalars(select(ReconcilerRun)).all()
    assert [(r.runner, r.requeued, r.finished_at) for r in runs] == [("b", 1, later)]
    again = run_safety_net(app, DISPATCHER, now=later, runner="c", slot=slot, clock=lambda: later)
    assert not again.ran


def test_a_held_lock_makes_other_runners_skip(app: App) -> None:
    now = SOON
    with single_runner(
        app.engine, f"safety-net-{DISPATCHER}", app.settings.var_path / "locks"
    ) as held:
        assert held
        report = run_safety_net(
            app, DISPATCHER, now=now, runner="b", slot=slot_for(DISPATCHER, now), clock=lambda: now
        )
    assert not report.ran
    after = run_safety_net(
        app, DISPATCHER, now=now, runner="b", slot=slot_for(DISPATCHER, now), clock=lambda: now
    )
    assert after.ran


def test_a_crashing_run_is_recorded_as_failed_and_alerts(app: App, webhook) -> None:
    with_settings(app, alert_webhook_url=webhook.url)

    def broken(app: App, **_: object):
        raise RuntimeError("database exploded")

    import core.reconcile as reconcile

    original = reconcile.RUNNERS[BACKSTOP]
    reconcile.RUNNERS[BACKSTOP] = broken
    try:
        report = run_safety_net(app, BACKSTOP, now=SOON, runner="a", slot=None, clock=lambda: SOON)
    finally:
        reconcile.RUNNERS[BACKSTOP] = original

    assert report.error_message == "RuntimeError: database exploded"
    with session_scope(app.session_factory) as session:
        run = session.scalars(select(ReconcilerRun)).one()
    assert not run.ok and run.errors == 1
    assert [p["text"] for p in webhook.posts] == [
        ":rotating_light: Capsule [run_error] backstop run failed: RuntimeError: database exploded"
    ]
    assert webhook.heartbeats == 0


# ---------------------------------------------------------------- alerts and heartbeat


def test_stuck_rows_raise_one_alert_per_window_and_every_good_run_pings_the_heartbeat(
    app: App, webhook: Webhook
) -> None:
    with_settings(
        app,
        alert_webhook_url=webhook.url,
        heartbeat_url=webhook.heartbeat_url,
        alert_stuck_threshold=2,
    )
    user_id = make_user(app, credit=10)
    for _ in range(3):
        schedule(app, user_id)

    for minute in (5, 7, 25):
        now = SOON + timedelta(minutes=minute)
        run_safety_net(
            app,
            BACKSTOP,
            now=now,
            runner="a",
            slot=slot_for(BACKSTOP, now),
            clock=lambda now=now: now,
        )

    # 3 stuck rows each time (past grace again); the 2nd alert is inside the 15-minute window
    assert [p["text"].split("]")[0] for p in webhook.posts] == [
        ":rotating_light: Capsule [stuck_rows"
    ] * 2
    assert webhook.heartbeats == 3
    with session_scope(app.session_factory) as session:
        rows = session.scalars(select(Alert).order_by(Alert.id)).all()
    assert [(a.kind, a.delivered, a.suppressed) for a in rows] == [
        ("stuck_rows", True, False),
        ("stuck_rows", False, True),
        ("stuck_rows", True, False),
    ]


def test_a_failing_webhook_does_not_break_the_run(app: App, webhook: Webhook) -> None:
    webhook.answer(500)
    with_settings(
        app,
        alert_webhook_url=webhook.url,
        heartbeat_url=webhook.heartbeat_url,
        alert_stuck_threshold=0,
    )
    result = schedule(app, make_user(app))

    report = run_safety_net(
        app, BACKSTOP, now=SOON + timedelta(minutes=5), runner="a", slot=None, clock=lambda: SOON
    )

    assert report.ran and report.requeued == 1 and report.error_message is None
    assert len(webhook.posts) == 1  # tried, answered 500
    assert webhook.heartbeats == 1
    assert row(app, result.delivery_id).task_id is not None


def test_an_unreachable_webhook_and_heartbeat_are_swallowed(app: App) -> None:
    with_settings(
        app, alert_webhook_url="http://127.0.0.1:9/hook", heartbeat_url="http://127.0.0.1:9/ping"
    )
    alerter = alerts.Alerter(app.settings, app.session_factory)
    assert alerter.alert(alerts.CIRCUIT_OPEN, "resend circuit opened", now=T0) is False
    assert alerter.heartbeat() is False


def test_runs_of_each_kind_are_independent(app: App) -> None:
    now = SOON
    kinds = [DISPATCHER, BACKSTOP, FAILED_RETRIER]
    reports = [
        run_safety_net(app, k, now=now, runner="a", slot=slot_for(k, now), clock=lambda: now)
        for k in kinds
    ]
    assert all(r.ran for r in reports)
    assert slot_for(FAILED_RETRIER, now + timedelta(minutes=7)) == now.replace(minute=0)


def test_backstop_with_zero_grace_takes_each_row_once_per_run(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    user_id = make_user(app, credit=5)
    ids = [schedule(app, user_id).delivery_id for _ in range(3)]
    enqueuer.enqueued.clear()

    report = run_backstop(app, now=SOON, grace_seconds=0)

    assert (report.found, report.requeued) == (3, 3)
    assert sorted(d for d, _, _ in enqueuer.enqueued) == sorted(ids)


def test_a_provider_circuit_opening_posts_one_alert(
    app: App, webhook: Webhook, provider_server
) -> None:
    from core.providers.base import Email

    with_settings(
        app,
        alert_webhook_url=webhook.url,
        providers=("resend",),
        resend_api_key=provider_server.resend_api_key,
        resend_base_url=provider_server.url,
        circuit_failure_threshold=2,
        provider_read_timeout=2.0,
    )
    provider_server.set_faults("resend", p_5xx=1.0)
    email = Email(
        to="a@example.com", sender="s@example.com", subject="s", text="t", idempotency_key="k1"
    )

    outcomes = [app.chain.send(email, now=SOON) for _ in range(4)]

    # two 503s (unknown outcomes) open the circuit; the next two runs are skipped
    assert [o.error_class for o in outcomes] == ["ambiguous", "ambiguous", "transient", "transient"]
    assert [c.outcome for c in outcomes[-1].calls] == ["skipped"]  # the circuit is open
    assert [p["text"].split("]")[0] for p in webhook.posts] == [
        ":rotating_light: Capsule [circuit_open"
    ]
    assert "resend circuit opened" in webhook.posts[0]["text"]
    app.chain.close()


def test_failed_retrier_leaves_ambiguous_failures_to_people(app: App) -> None:
    delivery_id = schedule(app, make_user(app)).delivery_id
    fail(app, delivery_id, "ambiguous")

    report = run_failed_retrier(app, now=SOON + timedelta(days=3))

    assert report.found == 0 and row(app, delivery_id).status == Status.FAILED
