"""Scenarios on a real Redis broker with real consumers: a canceled letter's ETA task revoked in
Redis never runs it; a Redis server that dies and comes back loses nothing that was scheduled
meanwhile, and the consumer lives through it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from benchmarks.fakes.provider_server import FakeProviderServer
from benchmarks.harness import wait_for
from core.crypto import Keyring
from core.deliveries import cancel_delivery
from core.models import Status
from core.policy import utcnow
from tests.integration.scenario_world import RedisServer, World

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture
def world(open_world: Callable[..., World]) -> World:
    return open_world(marker=False)


# ---------------------------------------------------------------- revoke


def test_a_canceled_letters_eta_task_is_revoked_in_redis_and_never_runs(world: World) -> None:
    # A broker that still holds its marker, and a consumer past its first safety-net runs
    # (a missing marker makes the dispatcher re-dispatch, replacing the tasks under test)
    world.app.enqueuer.set_marker()
    consumer = world.consumer(workers=2)
    wait_for(
        lambda: "capsule.dispatcher" in consumer.log() and " executed in " in consumer.log(),
        timeout=30,
        what="the consumer's first dispatcher run",
    )

    # Given two letters due in a few seconds, each with its ETA task in Redis's schedule (the
    # consumer takes an ETA task from the queue and parks it in the schedule until it is due)
    due = utcnow() + timedelta(seconds=20)  # room for a busy machine before they fall due
    canceled, control = world.schedule(due), world.schedule(due)
    task_id, control_task = world.row(canceled).task_id, world.row(control).task_id
    assert task_id and control_task
    wait_for(
        lambda: {t.id for t in world.queue.scheduled()} == {task_id, control_task},
        timeout=15,
        interval=0.05,
        what="both ETA tasks in Redis's schedule",
    )
    assert utcnow() < due

    # When one is canceled before it is due
    cancel_delivery(
        world.app,
        canceled,
        now=utcnow(),
        actor="owner@example.com",
    )

    # Then Redis holds the revocation, while the task still sits in the schedule
    assert world.queue.is_revoked(task_id)
    assert task_id in {t.id for t in world.queue.scheduled()}

    # When the consumer runs past the due time (the other letter goes out)
    wait_for(lambda: world.count(Status.SENT) == 1, timeout=60, what="the control letter sent")

    def about_the_task() -> list[str]:
        return [line for line in consumer.log().splitlines() if task_id in line]

    wait_for(
        lambda: any("revoked" in line or "Executing" in line for line in about_the_task()),
        timeout=30,
        what="the consumer to take the canceled letter's task",
    )

    # Then Huey dropped the task as revoked: it never ran, the provider saw no request for it
    lines = about_the_task()
    assert any("was revoked, not executing" in line for line in lines), lines
    assert not any("Executing" in line for line in lines), lines
    assert world.server.count_for_key(world.row(canceled).idempotency_key) == 0
    assert world.requests() == 1 and world.sent_once(control)
    assert world.row(canceled).status == Status.CANCELED
    assert world.queue.scheduled_count() == 0 and world.queue.pending_count() == 0
    assert not world.queue.is_revoked(task_id)  # revoke_once: the flag went with the task


# ---------------------------------------------------------------- a dead Redis


@pytest.mark.slow
def test_a_dead_redis_loses_no_schedule_and_the_consumer_survives_until_it_returns(
    pg_database: str, provider_server: FakeProviderServer, tmp_path: Path, keyring: Keyring
) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    world = World.open(
        pg_database,
        redis.url,
        "capsule_dead_redis",
        provider_server,
        tmp_path / "var",
        keyring,
        CAPSULE_GRACE_SECONDS="5",
    )
    try:
        consumer = world.consumer(workers=2)

        # Given Redis dies under a running consumer
        redis.stop()
        wait_for(
            lambda: "Error reading from queue" in consumer.log() or not consumer.alive,
            timeout=30,
            what="the consumer to notice Redis is gone",
        )

        # When letters are scheduled meanwhile, through the CLI and through core
        done = world.system.capsule(
            "schedule",
            *("--user", "owner@example.com", "--to", "future@example.com", "--at", "+3s"),
            *("--subject", "Hi", "--body", "Dear future me"),
        )
        from_core = world.schedule(utcnow() + timedelta(seconds=3))

        # Then scheduling succeeded: the rows are committed, with no task anywhere
        assert done.returncode == 0, done.stderr
        rows = world.rows()
        assert len(rows) == 2 and from_core in {r.id for r in rows}
        assert all(r.status == Status.SCHEDULED and r.task_id is None for r in rows)

        # And the consumer is still alive once they are due, having sent nothing
        wait_for(lambda: utcnow() > max(r.deliver_at for r in rows), timeout=10, what="due")
        assert consumer.alive, consumer.log()[-2000:]
        assert world.requests() == 0

        # When Redis comes back (empty: no persistence)
        redis.start()

        # Then the safety nets find both rows and the same consumer delivers each, once
        wait_for(
            lambda: world.count(Status.SENT) == 2,
            timeout=150,
            interval=1,
            what="both letters sent after Redis returned",
        )
        assert consumer.alive
        assert all(world.sent_once(r.id) for r in rows)
        # each alone, or both in one batch when they fell due together (a busy machine)
        assert len(world.server.messages()) == 2 and world.requests() in {1, 2}
    finally:
        world.close()
        redis.stop()
