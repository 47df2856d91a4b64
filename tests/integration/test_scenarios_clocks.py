"""Two consumers whose clocks disagree: one runs 3 s ahead, one 3 s behind (an injected clock per
process, tests/skewed_consumer.py). Every letter has its own ETA task plus twins that wake 6 s
early, 2 s early and 4 s late, taken by whichever consumer is free. Each letter is sent once,
and none reaches the provider earlier than the larger skew allows."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from benchmarks.harness import Consumer, wait_for
from core.models import Status
from core.policy import utcnow
from tests.integration.scenario_world import World

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

SKEW = 3.0  # seconds, each way
TWINS = (-6.0, -2.0, 4.0)  # extra tasks per letter, seconds from its due time


@pytest.fixture
def world(open_world: Callable[..., World]) -> World:
    return open_world(CAPSULE_PROVIDERS="resend")


def skewed_consumer(world: World, seconds: float) -> Consumer:
    system = dataclasses.replace(
        world.system, settings={**world.system.settings, "SKEWED_CLOCK_SECONDS": str(seconds)}
    )
    consumer = Consumer(system, workers=2)
    consumer.args = [sys.executable, "-m", "tests.skewed_consumer", *consumer.args[1:]]
    world.consumers.append(consumer.start())
    return consumer


def test_two_consumers_with_skewed_clocks_send_each_letter_once_and_never_early_past_the_skew(
    world: World,
) -> None:
    # Given two consumers, one clock 3 s ahead and one 3 s behind
    ahead, behind = skewed_consumer(world, SKEW), skewed_consumer(world, -SKEW)

    # And twenty letters due over the next few seconds, each with three twin tasks
    start = utcnow()
    due = {world.schedule(start + timedelta(seconds=8 + i / 4), now=start): i for i in range(20)}
    rows = {row.id: row for row in world.rows()}
    for delivery_id in due:
        for offset in TWINS:
            eta = rows[delivery_id].deliver_at + timedelta(seconds=offset)
            world.app.enqueuer.enqueue(delivery_id, eta)

    # When they have all run
    wait_for(lambda: world.count(Status.SENT) == 20, timeout=90, interval=0.5, what="20 sent")

    # Then each letter reached the provider once, and none earlier than the skew allows
    # (received_at is the fake provider's real clock; sent_at is the sender's skewed one)
    # (a letter may travel in a batch with others, under the batch's key: found by its id)
    sent = {row.id: row for row in world.rows()}
    received = {}
    for delivery_id in sent:
        (message,) = world.server.messages_for_delivery(str(delivery_id))  # once each
        received[delivery_id] = datetime.fromisoformat(message.received_at)
    assert len(received) == 20 and 1 <= world.requests() <= 20
    early = {
        delivery_id: (row.deliver_at - received[delivery_id]).total_seconds()
        for delivery_id, row in sent.items()
    }
    assert max(early.values()) <= SKEW, early

    # And the clocks really disagreed: the consumer ahead recorded times 3 s past real time
    drift = [
        (row.sent_at - received[delivery_id]).total_seconds() for delivery_id, row in sent.items()
    ]
    # (a record comes after the provider's answer, so only the consumer behind can be below 0)
    assert max(drift) > SKEW - 1, drift
    assert min(drift) >= -SKEW, drift
    assert ahead.alive and behind.alive
