"""PostgreSQL drops a running consumer's connections (`pg_terminate_backend`): before the claim,
between the provider's acceptance and the record, and while the record waits on a lock. Each
ends with the letter sent exactly once (requests and messages counted at the fake provider)
and the row `sent`.

The consumer is a real `huey_consumer` process; its backends are told apart from the test's own
by application_name ("capsule" for the product, another name for this test's App).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from benchmarks.harness import Consumer, wait_for
from core.db import session_scope
from core.models import AuditEvent, Delivery, DeliveryAttempt, Status
from core.policy import utcnow
from core.reconcile import run_backstop
from tests.integration.scenario_world import Postgres, World

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture
def world(open_world: Callable[..., World]) -> World:
    return open_world(
        CAPSULE_PROVIDERS="resend", CAPSULE_PROVIDER_READ_TIMEOUT="20", CAPSULE_LEASE_SECONDS="120"
    )


@pytest.fixture
def postgres(world: World) -> Iterator[Postgres]:
    pg = Postgres(world.database)
    yield pg
    pg.close()


def start_consumer(world: World, postgres: Postgres) -> Consumer:
    consumer = world.consumer(workers=1)
    # Past its first safety-net runs: it holds pooled connections to the database
    wait_for(
        lambda: " executed in " in consumer.log() and postgres.consumer_backends(),
        timeout=30,
        what="the consumer's first runs and its database connections",
    )
    return consumer


def schedule_accepted_then_stalled(world: World, provider: str, seconds: int) -> uuid.UUID:
    """A letter due in a second that `provider` stores and answers only `seconds` later;
    returns once the provider holds it."""
    world.server.set_faults(provider, [f"stall:{seconds}"])
    delivery_id = world.schedule(utcnow() + timedelta(seconds=1))
    wait_for(
        lambda: len(world.server.messages()) == 1,
        timeout=30,
        interval=0.05,
        what="the provider to accept the letter",
    )
    return delivery_id


def assert_sent_exactly_once(world: World, delivery_id: object, requests: int = 1) -> None:
    row = world.row(delivery_id)  # type: ignore[arg-type]
    assert row.status == Status.SENT and row.sent_at is not None
    assert world.server.count_for_key(row.idempotency_key) == 1
    assert world.requests() == requests, world.server.stats()
    with session_scope(world.app.session_factory) as session:
        sent_events = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.delivery_id == row.id, AuditEvent.type == "delivery.sent")
        )
        attempts = session.scalar(
            select(func.count())
            .select_from(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id == row.id)
        )
    assert (sent_events, attempts) == (1, 1)


def test_connections_dropped_before_the_claim(world: World, postgres: Postgres) -> None:
    consumer = start_consumer(world, postgres)

    # Given PostgreSQL drops every connection the consumer holds while it waits for work
    pids = postgres.consumer_backends()
    assert postgres.terminate(pids) == len(pids) >= 1
    wait_for(
        lambda: not set(pids) & set(postgres.consumer_backends()),
        timeout=10,
        what="the terminated backends to go",
    )

    # When a letter comes due: the claim is the consumer's next use of the database
    delivery_id = world.schedule(utcnow() + timedelta(seconds=1))
    wait_for(lambda: world.count(Status.SENT) == 1, timeout=30, what="the letter sent")

    # Then it was claimed on a fresh connection and sent once
    assert_sent_exactly_once(world, delivery_id)
    assert consumer.alive


def test_connections_dropped_between_the_send_and_the_record(
    world: World, postgres: Postgres
) -> None:
    consumer = start_consumer(world, postgres)

    # Given the provider accepts the letter and then answers only after 5 s
    delivery_id = schedule_accepted_then_stalled(world, "resend", 5)

    # When PostgreSQL drops the consumer's connections while the run waits for that answer
    pids = postgres.consumer_backends()
    assert postgres.terminate(pids) == len(pids) >= 1
    assert world.row(delivery_id).status == Status.PROCESSING  # the same run, not yet recorded

    # Then the run records its outcome on a new connection: sent, once
    wait_for(lambda: world.count(Status.SENT) == 1, timeout=30, what="the outcome recorded")
    assert_sent_exactly_once(world, delivery_id)
    assert consumer.alive


def test_connection_dropped_while_the_record_waits_on_a_lock(
    world: World, postgres: Postgres
) -> None:
    consumer = start_consumer(world, postgres)

    # Given the provider accepts the letter and then answers only after 4 s
    delivery_id = schedule_accepted_then_stalled(world, "resend", 4)

    # And the test holds the delivery's row lock, so the run's record blocks on it
    with world.app.engine.connect() as conn:
        transaction = conn.begin()
        conn.execute(select(Delivery.id).where(Delivery.id == delivery_id).with_for_update())
        wait_for(
            lambda: postgres.consumer_backends(waiting_on_lock=True),
            timeout=30,
            interval=0.05,
            what="the record to wait on the lock",
        )

        # When PostgreSQL drops the waiting backend
        [waiting] = postgres.consumer_backends(waiting_on_lock=True)
        assert postgres.terminate([waiting]) == 1

        # Then the run tries again on a new connection, and waits again
        wait_for(
            lambda: set(postgres.consumer_backends(waiting_on_lock=True)) - {waiting},
            timeout=20,
            interval=0.05,
            what="the record's retry to wait on the lock",
        )
        assert world.row(delivery_id).status == Status.PROCESSING
        transaction.commit()  # the lock is released

    # And once the lock is released it records the outcome: sent, once
    wait_for(lambda: world.count(Status.SENT) == 1, timeout=30, what="the outcome recorded")
    assert_sent_exactly_once(world, delivery_id)
    assert consumer.alive


@pytest.fixture
def postmark_world(open_world: Callable[..., World]) -> World:
    return open_world(
        CAPSULE_PROVIDERS="postmark", CAPSULE_PROVIDER_READ_TIMEOUT="20", CAPSULE_LEASE_SECONDS="12"
    )


def test_database_lost_for_the_whole_record_the_backstop_rerun_looks_first_and_sends_nothing(
    postmark_world: World,
) -> None:
    world = postmark_world
    postgres = Postgres(world.database)
    consumer = start_consumer(world, postgres)
    allow = 'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS {flag}'

    # Given Postmark (no idempotency key: it can only be asked) accepts the letter, then stalls
    delivery_id = schedule_accepted_then_stalled(world, "postmark", 4)
    try:
        # When PostgreSQL drops the consumer and takes no new connection until its run gave up
        with postgres.admin.connect() as conn:
            conn.execute(text(allow.format(db=world.database, flag="false")))
        postgres.terminate(postgres.consumer_backends())
        wait_for(
            lambda: "Unhandled exception in task" in consumer.log(),
            timeout=60,
            what="the run to fail to record its outcome",
        )
    finally:
        with postgres.admin.connect() as conn:
            conn.execute(text(allow.format(db=world.database, flag="true")))

    # Then the provider accepted and the database failed in the same run: still processing
    stuck = world.row(delivery_id)
    assert stuck.status == Status.PROCESSING and stuck.lease_until is not None
    assert consumer.alive

    # When the lease has run out and the backstop re-dispatches it to the consumer
    wait_for(lambda: utcnow() > stuck.lease_until, timeout=30, what="the lease to run out")
    assert run_backstop(world.app, now=utcnow()).recovered == 1
    wait_for(lambda: world.count(Status.SENT) == 1, timeout=30, what="the re-run recorded")

    # Then the re-run found the message at Postmark and sent nothing: one request, ever
    row = world.row(delivery_id)
    assert row.status == Status.SENT and world.server.count_for_key(row.idempotency_key) == 1
    assert world.requests("postmark") == 1, world.server.stats()
    postgres.close()
