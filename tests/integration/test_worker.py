"""The delivery worker against the fake Resend/Postmark server, on PostgreSQL (and SQLite where
marked): exactly once, failover only on a definite refusal, owner told once."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from benchmarks.fakes.provider_server import FakeProviderServer
from core.bootstrap import App, build_app
from core.config import Settings
from core.db import make_engine, session_scope
from core.deliveries import create_user, schedule_delivery
from core.models import DeliveryAttempt, Notification, Status
from core.policy import utcnow
from core.worker import run_delivery
from tests.conftest import RecordingEnqueuer
from tests.fakes.fixtures import fake_provider_settings
from tests.integration.test_transitions import events, row


def provider_settings(
    server: FakeProviderServer, tmp_path: Path, database_url: str, **extra: object
) -> Settings:
    """The fake server's Resend and Postmark on `database_url`, failing over without tripping a
    circuit."""
    values: dict[str, Any] = {"circuit_failure_threshold": 100, **extra}
    return fake_provider_settings(server, tmp_path, database_url=database_url, **values)


@pytest.fixture
def world(
    provider_server: FakeProviderServer,
    tmp_path: Path,
    database_url: str,
    keyring,
    enqueuer: RecordingEnqueuer,
):
    settings = provider_settings(provider_server, tmp_path, database_url)
    engine = make_engine(settings)
    app = build_app(settings, enqueuer, engine=engine, keyring=keyring)
    yield app
    app.chain.close()
    engine.dispose()


def due_now(app: App, owner_email: str = "owner@example.com") -> uuid.UUID:
    """A delivery whose time has just come (scheduled a second ago for half a second later)."""
    now = utcnow()
    with session_scope(app.session_factory) as session:
        user = create_user(session, owner_email, "Owner", now, 5)
        session.commit()
    result = schedule_delivery(
        app,
        user_id=user.id,
        recipient="future@example.com",
        subject="To me",
        body="Dear future me",
        deliver_at=now - timedelta(milliseconds=500),
        now=now - timedelta(seconds=1),
        actor=owner_email,
    )
    return result.delivery_id


def attempts(app: App, delivery_id: uuid.UUID) -> list[DeliveryAttempt]:
    with session_scope(app.session_factory) as session:
        return list(
            session.scalars(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id == delivery_id)
                .order_by(DeliveryAttempt.id)
            )
        )


def key_of(app: App, delivery_id: uuid.UUID) -> str:
    return row(app, delivery_id).idempotency_key


def test_sent_once_with_one_attempt_row_per_provider_call(
    world: App, provider_server: FakeProviderServer
) -> None:
    delivery_id = due_now(world)

    assert run_delivery(world, delivery_id, "task-1") == Status.SENT

    stored = row(world, delivery_id)
    assert (
        stored.status == Status.SENT and stored.provider == "resend" and stored.provider_message_id
    )
    [message] = provider_server.messages()
    assert message.idempotency_key == stored.idempotency_key and message.text == "Dear future me"
    [attempt] = attempts(world, delivery_id)
    assert (
        attempt.provider,
        attempt.outcome,
        attempt.status_code,
        attempt.task_id,
        attempt.run_number,
    ) == ("resend", "accepted", 200, "task-1", 1)
    assert attempt.duration_ms >= 0 and attempt.provider_message_id == stored.provider_message_id


def test_racing_threads_send_exactly_one_message(
    world: App, provider_server: FakeProviderServer
) -> None:
    delivery_id = due_now(world)
    results: list[str | None] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        results.append(run_delivery(world, delivery_id, f"twin-{i}"))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(results, key=str) == [None] * 7 + [Status.SENT]
    # Counted at the provider: one send request (a twin's would be a Resend replay, which
    # stores nothing new but is a duplicate wherever the key is not remembered)
    key = key_of(world, delivery_id)
    assert provider_server.requests_for_key(key) == 1
    assert provider_server.replays_for_key(key) == 0
    assert len(provider_server.messages()) == 1


@pytest.mark.parametrize("fault", ["stall:1.0", "stored:503"])
def test_accepted_then_timed_out_retries_the_same_provider_with_the_same_key(
    world: App, provider_server: FakeProviderServer, fault: str
) -> None:
    # Given Resend accepts the message but answers after the client's read timeout, or
    # stores it and then answers 503
    provider_server.set_faults("resend", [fault])
    delivery_id = due_now(world)

    # When the delivery runs, the outcome is ambiguous: retry later, pinned to Resend
    assert run_delivery(world, delivery_id, "t1") == Status.SCHEDULED
    stored = row(world, delivery_id)
    assert stored.error_class == "ambiguous" and stored.pinned_provider == "resend"

    # When it runs again after the stall ends (clock moved to the retry time)
    provider_server.wait_idle()  # the fake server's own stall must finish first
    later = stored.next_attempt_at + timedelta(seconds=1)
    assert run_delivery(world, delivery_id, "t2", clock=lambda: later) == Status.SENT

    # Then the second request carried the same key (Resend replayed it: one message) and
    # Postmark was never tried
    key = stored.idempotency_key
    assert provider_server.requests_for_key(key, "resend") == 2
    assert provider_server.replays_for_key(key) == 1
    assert provider_server.count_for_key(key) == 1
    assert provider_server.requests_for_key(key, "postmark") == 0
    assert [a.provider for a in attempts(world, delivery_id)] == ["resend", "resend"]
    assert [a.outcome for a in attempts(world, delivery_id)] == ["ambiguous", "accepted"]


@pytest.mark.parametrize("fault", ["401", "refused"])
def test_resend_refusing_or_401_fails_over_to_postmark(
    world: App,
    provider_server: FakeProviderServer,
    fault: str,
    tmp_path: Path,
    database_url: str,
    keyring,
) -> None:
    app = world
    if fault == "refused":
        from tests.fakes.smtp_server import free_port

        settings = provider_settings(
            provider_server,
            tmp_path,
            database_url,
            resend_base_url=f"http://127.0.0.1:{free_port()}",
        )
        app = build_app(settings, RecordingEnqueuer(), engine=world.engine, keyring=keyring)
    else:
        provider_server.set_faults("resend", ["401"])
    delivery_id = due_now(app)

    assert run_delivery(app, delivery_id, "t1") == Status.SENT

    stored = row(app, delivery_id)
    assert stored.provider == "postmark"
    [message] = provider_server.messages()
    assert (
        message.provider == "postmark"
        and message.metadata["idempotency_key"] == stored.idempotency_key
    )
    calls = [(a.provider, a.outcome) for a in attempts(app, delivery_id)]
    assert calls == [("resend", "transient"), ("postmark", "accepted")]
    assert provider_server.requests_for_key(stored.idempotency_key, "postmark") == 1
    assert provider_server.requests_for_key(stored.idempotency_key, "resend") == (
        0 if fault == "refused" else 1
    )
    if fault == "401":
        assert attempts(app, delivery_id)[0].status_code == 401


def test_resend_422_fails_at_once_and_tells_the_owner_exactly_once(
    world: App, provider_server: FakeProviderServer
) -> None:
    provider_server.set_faults("resend", ["422"])
    delivery_id = due_now(world, "owner@example.com")

    assert run_delivery(world, delivery_id, "t1") == Status.FAILED

    stored = row(world, delivery_id)
    assert stored.error_class == "permanent" and stored.attempt_count == 1
    assert [(a.provider, a.outcome, a.status_code) for a in attempts(world, delivery_id)] == [
        ("resend", "permanent", 422)
    ]
    notices = [m for m in provider_server.messages() if m.to == ["owner@example.com"]]
    assert (
        len(notices) == 1
        and "could not be" in notices[0].text
        and "Dear future me" not in notices[0].text
    )
    assert provider_server.messages("postmark") == []

    # A second request to notify (support, another path) sends nothing more
    from core import notifications

    with session_scope(world.session_factory) as session:
        assert not notifications.request(
            session,
            delivery_id,
            stored.user_id,
            stored.idempotency_key,
            requested_by="support",
            now=utcnow(),
        )
        session.commit()
    notifications.send_pending(world, now=utcnow())
    assert len([m for m in provider_server.messages() if m.to == ["owner@example.com"]]) == 1
    # Counted at the provider: the notice's key reached it once (a second notice with the
    # same key would be a replay at the fake, a duplicate at Postmark or after 24 h)
    assert provider_server.requests_for_key(f"{stored.idempotency_key}-delivery_failed") == 1
    with session_scope(world.session_factory) as session:
        note = session.scalars(select(Notification)).one()
    assert note.status == "sent"


def test_transient_everywhere_backs_off_then_fails_and_keeps_the_credit_for_the_retrier(
    world: App, provider_server: FakeProviderServer
) -> None:
    # 429s: a definite "not now" from both (a 5xx would pin the letter to the first)
    provider_server.set_faults("all", p_429=1.0)
    delivery_id = due_now(world)
    now = utcnow()
    statuses = []
    for i in range(world.settings.max_attempts):
        statuses.append(run_delivery(world, delivery_id, f"t{i}", clock=lambda now=now: now))
        nxt = row(world, delivery_id).next_attempt_at
        now = max(now, nxt) + timedelta(seconds=1)

    assert statuses[-1] == Status.FAILED and set(statuses[:-1]) == {Status.SCHEDULED}
    assert row(world, delivery_id).error_class == "transient"
    assert len(attempts(world, delivery_id)) == 2 * world.settings.max_attempts


def test_an_outage_that_opens_every_circuit_delays_a_letter_but_never_fails_it(
    provider_server: FakeProviderServer,
    tmp_path: Path,
    database_url: str,
    keyring,
    enqueuer: RecordingEnqueuer,
) -> None:
    settings = provider_settings(
        provider_server, tmp_path, database_url, circuit_failure_threshold=1, max_attempts=2
    )
    engine = make_engine(settings)
    app = build_app(settings, enqueuer, engine=engine, keyring=keyring)
    try:
        # Given both providers down: the first run's 503 may hide a stored message, so the
        # letter is pinned to Resend (never failed over) and Resend's circuit opens
        provider_server.set_faults("all", p_5xx=1.0)
        delivery_id = due_now(app)
        now = utcnow()
        assert run_delivery(app, delivery_id, "t0", clock=lambda: now) == Status.SCHEDULED
        assert row(app, delivery_id).pinned_provider == "resend"
        calls = len(attempts(app, delivery_id))
        opened_until = now + timedelta(seconds=settings.circuit_reset_seconds)

        # When its last allowed run comes while both circuits are still open
        now = row(app, delivery_id).next_attempt_at
        assert now < opened_until
        assert run_delivery(app, delivery_id, "t1", clock=lambda: now) == Status.SCHEDULED

        # Then that run reached no provider, did not count, and waits for the circuits
        stored = row(app, delivery_id)
        assert stored.round_attempts == 1 and stored.next_attempt_at >= opened_until
        assert [a.outcome for a in attempts(app, delivery_id)[calls:]] == ["skipped"]
        assert events(app, delivery_id)[-1] == "delivery.deferred"

        # And once the providers are back, the half-open trial sends it
        provider_server.set_faults("all")
        now = stored.next_attempt_at
        assert run_delivery(app, delivery_id, "t2", clock=lambda: now) == Status.SENT
        key = key_of(app, delivery_id)
        assert provider_server.count_for_key(key) == 1
        # one 503 in the first run, nothing while the circuit was open, one trial with the
        # same key; Postmark never
        assert provider_server.requests_for_key(key, "resend") == 2
        assert provider_server.requests_for_key(key, "postmark") == 0
    finally:
        app.chain.close()
        engine.dispose()


def test_a_canceled_or_rescheduled_later_delivery_sends_nothing_when_its_old_task_wakes(
    world: App, provider_server: FakeProviderServer
) -> None:
    from core.deliveries import cancel_delivery, reschedule_delivery

    canceled = due_now(world, "a@example.com")
    moved = due_now(world, "b@example.com")
    now = utcnow()
    cancel_delivery(world, canceled, now=now, actor="a@example.com")
    reschedule_delivery(
        world,
        moved,
        now + timedelta(days=1),
        now=now,
        actor="b@example.com",
    )

    assert run_delivery(world, canceled, "old-task") is None
    assert run_delivery(world, moved, "old-task") is None
    assert provider_server.stats()["requests"] == {}  # no request reached the provider
    assert attempts(world, canceled) == [] and attempts(world, moved) == []
