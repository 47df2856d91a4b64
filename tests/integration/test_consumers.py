"""Real `huey_consumer` processes on PostgreSQL + Redis (and one on the embedded default):
racing twins, SIGKILLs, a flushed broker, two consumers sharing the periodic work.

The slow tests run for one to four minutes of wall time because Huey's periodic tasks fire on
minute boundaries; they measure, they do not sleep to fake time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from benchmarks.fakes.provider_server import FakeProviderServer
from benchmarks.harness import Consumer, System, wait_for
from core.config import Settings
from core.db import session_scope
from core.models import ReconcilerRun, Status
from core.policy import utcnow
from core.reconcile import run_backstop
from core.worker import run_delivery
from tasks.delivery import HueyEnqueuer
from tests.conftest import KEY_ENTRY
from tests.integration import scenario_world
from tests.integration.scenario_world import World

# These tests count one send request per letter key: the one-letter path. Batches (one request,
# one key for many letters) are tested in test_batch_faults.py.
ONE_LETTER = {"CAPSULE_BATCH_SIZE": "1"}


def provider_env(server: FakeProviderServer, **extra: str) -> dict[str, str]:
    return scenario_world.provider_env(server, **{**ONE_LETTER, **extra})


@pytest.fixture
def live(open_world: Callable[..., World]) -> World:
    return open_world(marker=False, **ONE_LETTER)


def reconfigure(live: World, **env: str) -> None:
    live.system.settings.update(env)
    live.app.settings = Settings.from_env(live.system.env)


# ---------------------------------------------------------------- exactly once


def test_two_consumer_processes_with_duplicate_tasks_send_each_letter_once(live: World) -> None:
    # Given two consumers and 30 letters due in two seconds, each with three extra twin tasks
    live.consumer()
    live.consumer()
    due = utcnow() + timedelta(seconds=2)
    ids = [live.schedule(due) for _ in range(30)]
    for delivery_id in ids:
        for _ in range(3):
            live.app.enqueuer.enqueue(delivery_id, due)

    # When they have run
    wait_for(lambda: live.count(Status.SENT) == 30, timeout=60, what="30 sent")

    # Then every letter reached the provider exactly once: one send request per key
    live.assert_each_sent_once()
    assert len(live.server.messages()) == 30
    assert sum(live.server.key_counts()["requests"].values()) == 30


@pytest.mark.parametrize("provider", ["resend", "postmark"])
def test_consumer_killed_after_claim_before_record_sends_no_second_message_on_recovery(
    live: World, provider: str
) -> None:
    # Given a provider that accepts and then stalls for 6 s, and a client that waits 20 s
    reconfigure(
        live,
        CAPSULE_PROVIDERS=provider,
        CAPSULE_PROVIDER_READ_TIMEOUT="20",
        CAPSULE_LEASE_SECONDS="60",
    )
    live.server.set_faults(provider, ["stall:6"])
    consumer = live.consumer(workers=1)
    delivery_id = live.schedule(utcnow() + timedelta(seconds=1))

    # When the consumer is SIGKILLed after the provider stored the message, before the outcome
    wait_for(
        lambda: len(live.server.messages()) == 1, timeout=30, what="message stored at the provider"
    )
    consumer.kill()

    # Then the row stays processing under its lease
    [stuck] = live.rows()
    assert stuck.status == Status.PROCESSING and stuck.lease_until is not None
    assert stuck.lease_until > utcnow()

    # When the lease has expired (clock moved forward) and the backstop recovers and re-runs it
    later = stuck.lease_until + timedelta(seconds=1)
    live.server.wait_idle(timeout=30)  # the fake provider's stall (server side) ends first
    report = run_backstop(live.app, now=later)
    assert report.recovered == 1
    assert run_delivery(live.app, delivery_id, "rerun", clock=lambda: later) == Status.SENT

    # Then no second message exists: Resend deduplicated the key, Postmark was looked up
    assert len(live.server.messages()) == 1
    key = stuck.idempotency_key
    assert live.server.count_for_key(key) == 1
    if provider == "resend":  # the re-run repeated the request with the same key: a replay
        assert (live.server.requests_for_key(key), live.server.replays_for_key(key)) == (2, 1)
    else:  # the re-run found the message and sent nothing
        assert live.server.requests_for_key(key) == 1 and live.server.lookups_for_key(key) == 1


def test_embedded_default_consumer_delivers_to_the_outbox(tmp_path: Path) -> None:
    # The `make run` shape: SQLite + SqliteHuey + file outbox, no services
    system = System(var_dir=tmp_path / "var", database_url="", key_entry=KEY_ENTRY)
    system.settings = {"CAPSULE_DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'capsule.db'}"}
    assert system.capsule("db", "upgrade").returncode == 0
    assert system.capsule("user", "add", "me@example.com", "--credits", "1").returncode == 0
    consumer = Consumer(system, workers=2).start()
    try:
        scheduled = system.capsule(
            "schedule",
            "--user",
            "me@example.com",
            "--to",
            "future@example.com",
            "--at",
            "+3s",
            "--subject",
            "Hi",
            "--body",
            "Dear future me",
        )
        assert scheduled.returncode == 0, scheduled.stderr
        delivery_id = scheduled.stdout.strip()
        outbox = tmp_path / "var" / "outbox"
        wait_for(lambda: any(outbox.glob("*.eml")), timeout=30, what="an .eml in the outbox")
        wait_for(
            lambda: '"status": "sent"' in system.capsule("status", delivery_id).stdout,
            timeout=15,
            what="sent status",
        )
    finally:
        consumer.stop()
    [eml] = list(outbox.glob("*.eml"))
    assert "Dear future me" in eml.read_text()


# ---------------------------------------------------------------- safety nets, real time


@pytest.mark.slow
def test_broker_flushed_with_500_due_all_sent_once_within_two_minutes(live: World) -> None:
    # Given a running consumer and 500 letters due over the next 30 s, all dispatched
    live.consumer()
    start = utcnow()
    due = {
        live.schedule(start + timedelta(seconds=5 + i * 25 / 500)): start
        + timedelta(seconds=5 + i * 25 / 500)
        for i in range(500)
    }
    assert len(live.rows()) == 500

    # When the broker loses everything
    assert live.wipe_broker() > 0

    # Then every letter is sent, exactly once, within two minutes of its due time
    wait_for(lambda: live.count(Status.SENT) == 500, timeout=180, interval=1, what="500 sent")
    live.assert_each_sent_once()
    lateness = [(row.sent_at - due[row.id]).total_seconds() for row in live.rows()]
    assert max(lateness) < 120, f"latest {max(lateness):.1f} s"


@pytest.mark.slow
def test_consumer_sigkilled_mid_batch_and_restarted_sends_every_letter_once(live: World) -> None:
    # The fake's search has no lag here: a short settle window keeps the recovered rows quick
    reconfigure(
        live,
        CAPSULE_LEASE_SECONDS="20",
        CAPSULE_GRACE_SECONDS="10",
        CAPSULE_LOOKUP_SETTLE_SECONDS="2",
    )
    # A send takes most of a run (300 ms at the provider), so a kill lands inside one
    live.server.set_faults("all", latency_ms=300)
    consumer = live.consumer(workers=4)
    start = utcnow()
    due = start + timedelta(seconds=3)
    for _ in range(200):
        live.schedule(due, now=start)

    wait_for(
        lambda: live.count(Status.SENT) >= 20 and live.count(Status.PROCESSING) > 0,
        timeout=60,
        interval=0.05,
        what="first sends, and some in flight",
    )
    consumer.kill()
    # The kill must land mid-run, or this test shows nothing: rows claimed and not recorded
    # (a dead process cannot move them any more) are the deliveries it had in flight.
    in_flight = [row for row in live.rows() if row.status == Status.PROCESSING]
    assert in_flight, "no delivery was in flight when the consumer was killed"
    live.consumer(workers=4)

    wait_for(lambda: live.count(Status.SENT) == 200, timeout=200, interval=1, what="all 200 sent")
    live.assert_each_sent_once(resent_at_most=len(in_flight))  # only a killed run's letter repeats
    assert len(live.server.messages()) == 200
    assert {row.id for row in live.rows() if row.status == Status.SENT} >= {
        row.id for row in in_flight
    }


@pytest.mark.slow
def test_two_consumers_share_one_backstop_run_per_minute_and_survive_losing_the_runner(
    live: World,
) -> None:
    first, second = live.consumer(), live.consumer()
    by_pid = {str(first.process.pid): first, str(second.process.pid): second}  # type: ignore[union-attr]

    def backstop_runs() -> list[ReconcilerRun]:
        with session_scope(live.app.session_factory) as session:
            return list(
                session.scalars(
                    select(ReconcilerRun)
                    .where(ReconcilerRun.kind == "backstop")
                    .order_by(ReconcilerRun.slot)
                )
            )

    # Three minutes with both consumers running
    wait_for(lambda: len(backstop_runs()) >= 3, timeout=320, interval=1, what="three backstop runs")
    runs = backstop_runs()
    slots = [r.slot for r in runs]
    assert len(slots) == len(set(slots)), "a slot ran twice"
    # Each consumer checks its periodic tasks once a minute at its own second, and a run takes
    # the minute it starts in: on a busy machine a run queued in one minute can start in the
    # next, whose slot is then taken, so a minute may pass without a run, never two.
    gaps = [b - a for a, b in zip(slots, slots[1:], strict=False)]
    assert all(timedelta(minutes=1) <= gap <= timedelta(minutes=2) for gap in gaps), slots
    assert all(r.ok for r in runs)

    # Kill the consumer that ran the latest backstop; the other takes the next slot
    holder_pid = runs[-1].runner.rsplit(":", 1)[1]
    killed_at = utcnow()
    by_pid[holder_pid].kill()
    survivor_pid = next(pid for pid in by_pid if pid != holder_pid)
    wait_for(
        lambda: any(r.started_at > killed_at for r in backstop_runs()),
        timeout=135,
        interval=1,
        what="a run after the kill",
    )
    after = [r for r in backstop_runs() if r.started_at > killed_at]
    assert after[0].runner.endswith(f":{survivor_pid}")
    # The survivor's next minute check, plus the time its queue takes on a busy machine
    assert after[0].started_at - killed_at < timedelta(seconds=130)


# ---------------------------------------------------------------- horizon and the far future


def test_a_letter_twenty_years_ahead_waits_outside_redis_and_is_sent_once_after_rotation_and_wipe(
    live: World,
) -> None:
    now = utcnow()
    far = now + timedelta(days=365 * 20)
    queue = live.app.enqueuer.queue  # type: ignore[attr-defined]

    # Scheduling puts nothing in Redis; neither do the safety nets today
    delivery_id = live.schedule(far, now=now)
    from core.reconcile import run_dispatcher

    run_dispatcher(live.app, now=now)
    assert queue.scheduled_count() == 0 and queue.pending_count() == 0
    assert live.wipe_broker() <= 1  # at most the dispatcher's marker

    # Twenty years later, minus half an hour: the key was rotated meanwhile
    from core.crypto import Keyring, generate_key_entry, rotate_letters

    rotated = Keyring.parse(KEY_ENTRY + "," + generate_key_entry("k2037"))
    live.app._keyring = rotated
    assert rotate_letters(live.app.session_factory, rotated).rotated == 1
    then = far - timedelta(minutes=30)
    first = run_dispatcher(live.app, now=then)
    assert first.requeued == 1 and queue.pending_count() == 1
    first_task = live.rows()[0].task_id

    # Redis is wiped; the dispatcher sees its marker gone and dispatches again
    live.wipe_broker()
    second = run_dispatcher(live.app, now=then + timedelta(minutes=1))
    assert second.recovered == 1 and second.requeued == 1
    second_task = live.rows()[0].task_id
    assert second_task != first_task

    # Both tasks wake at the due time (say the first survived somewhere): one message
    at = far + timedelta(seconds=1)
    results = [
        run_delivery(live.app, delivery_id, t, clock=lambda: at) for t in (first_task, second_task)
    ]
    assert results == [Status.SENT, None]
    [message] = live.server.messages()
    assert live.server.requests_for_key(message.idempotency_key or "") == 1
    assert message.text.startswith("Dear future me")


# ---------------------------------------------------------------- the backup for the backup


def test_reconcile_inline_delivers_due_letters_with_the_broker_down(live: World) -> None:
    from tests.fakes.smtp_server import free_port

    # Given letters that came due while the broker was down (no task was ever queued)
    live.app.enqueuer = _DeadBroker()
    # (scheduled two seconds ago for one second ago: due now on the CLI's real clock)
    start = utcnow() - timedelta(seconds=2)
    ids = [live.schedule(start + timedelta(seconds=1), now=start) for _ in range(5)]
    later = live.schedule(start + timedelta(days=3), now=start)
    assert all(row.task_id is None for row in live.rows())

    # When the CLI runs with Redis unreachable
    live.system.redis_url = f"redis://127.0.0.1:{free_port()}/0"
    done = live.system.capsule("reconcile", "--inline")

    # Then it delivers them in-process, each once, and leaves the future letter alone
    assert done.returncode == 0, done.stderr
    assert '"delivered_inline": 5' in done.stdout
    by_id = {row.id: row for row in live.rows()}
    assert all(by_id[i].status == Status.SENT for i in ids)
    assert by_id[later].status == Status.SCHEDULED and by_id[later].task_id is None
    assert sorted(live.server.count_for_key(by_id[i].idempotency_key) for i in ids) == [1] * 5
    assert sorted(live.server.requests_for_key(by_id[i].idempotency_key) for i in ids) == [1] * 5
    assert len(live.server.messages()) == 5


class _DeadBroker(HueyEnqueuer):
    def __init__(self) -> None:
        pass

    def enqueue(self, delivery_id: uuid.UUID, eta: datetime) -> str:
        from core.errors import EnqueueError

        raise EnqueueError(delivery_id, "connection refused")
