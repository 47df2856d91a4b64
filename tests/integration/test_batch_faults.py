# ruff: noqa: F811  (`live` is test_consumers' fixture, imported to be used by name)
"""Batch sends against the fake Resend and Postmark (benchmarks/fakes/provider_server.py) with each
batch fault: refused before storing, stored then 5xx, stored then stalled past the read
timeout, stored then dropped, a 429 past the quota. First driven run by run (SQLite and
PostgreSQL), then by real consumers on PostgreSQL + Redis. "Sent once" is counted at the fake:
stored messages per letter, and requests / replays per batch key."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from benchmarks.fakes.provider_server import FakeProviderServer
from benchmarks.harness import wait_for
from core.bootstrap import App, build_app
from core.db import make_engine, session_scope
from core.models import Delivery, DeliveryBatch, ErrorClass, Status
from core.policy import utcnow
from core.worker import run_delivery
from tests.conftest import T0, RecordingEnqueuer, set_row
from tests.integration.scenario_world import World
from tests.integration.test_consumers import live, reconfigure  # noqa: F401
from tests.integration.test_transitions import make_user, row, schedule
from tests.integration.test_worker import provider_settings

DUE = T0 + timedelta(minutes=10)
AT_DUE = DUE + timedelta(seconds=1)


def make_world(server: FakeProviderServer, tmp_path: Path, url: str, keyring, **extra) -> App:  # type: ignore[no-untyped-def]
    settings = provider_settings(server, tmp_path, url, **extra)
    return build_app(settings, RecordingEnqueuer(), engine=make_engine(settings), keyring=keyring)


@pytest.fixture
def resend_world(provider_server, tmp_path, database_url, keyring):  # type: ignore[no-untyped-def]
    app = make_world(provider_server, tmp_path, database_url, keyring, providers=("resend",))
    yield app
    app.chain.close()
    app.engine.dispose()


@pytest.fixture
def postmark_world(provider_server, tmp_path, database_url, keyring):  # type: ignore[no-untyped-def]
    app = make_world(
        provider_server,
        tmp_path,
        database_url,
        keyring,
        providers=("postmark",),
        lookup_settle_seconds=5,
    )
    yield app
    app.chain.close()
    app.engine.dispose()


def due_letters(app: App, count: int) -> list[uuid.UUID]:
    owner = make_user(app, credit=count)
    return [schedule(app, owner, at=DUE, body=f"letter {i}").delivery_id for i in range(count)]


def the_batch(app: App) -> DeliveryBatch:
    with session_scope(app.session_factory) as session:
        [batch] = session.scalars(select(DeliveryBatch))
        return batch


def stored_per_letter(server: FakeProviderServer, ids: list[uuid.UUID]) -> list[int]:
    return [len(server.messages_for_delivery(str(i))) for i in ids]


def statuses(app: App, ids: list[uuid.UUID]) -> list[str]:
    return [row(app, i).status for i in ids]


# ---------------------------------------------------------------- Resend, run by run


def test_resend_batch_sends_every_letter_in_one_request_under_the_batch_key(
    resend_world: App, provider_server: FakeProviderServer
) -> None:
    ids = due_letters(resend_world, 5)

    assert run_delivery(resend_world, ids[0], "t1", clock=lambda: AT_DUE) == Status.SENT

    batch = the_batch(resend_world)
    assert statuses(resend_world, ids) == [Status.SENT] * 5
    assert stored_per_letter(provider_server, ids) == [1] * 5
    assert provider_server.stats()["requests"] == {"resend": 1}
    assert provider_server.requests_for_key(batch.idempotency_key) == 1
    ids_at_fake = {m.tags["delivery_id"]: m.id for m in provider_server.messages()}
    assert {str(i): row(resend_world, i).provider_message_id for i in ids} == ids_at_fake


def test_refused_before_storing_retries_each_letter_in_a_new_batch_and_sends_once(
    resend_world: App, provider_server: FakeProviderServer
) -> None:
    # Given the fake refuses the first batch call as a whole (422: nothing stored). A 5xx
    # could follow a stored batch, so it is an unknown outcome: see the replay tests.
    provider_server.set_faults("resend", ["422"])
    ids = due_letters(resend_world, 4)

    # When the batch runs: every letter is retried later, unpinned, out of the batch
    assert run_delivery(resend_world, ids[0], "t1", clock=lambda: AT_DUE) == Status.SCHEDULED
    first = the_batch(resend_world)
    assert first.state == "done" and provider_server.messages() == []
    rows = [row(resend_world, i) for i in ids]
    assert {(r.error_class, r.pinned_provider, r.batch_id) for r in rows} == {
        (ErrorClass.TRANSIENT, None, None)
    }

    # When the retries come due
    later = max(r.next_attempt_at for r in rows) + timedelta(seconds=1)
    assert run_delivery(resend_world, ids[0], "t2", clock=lambda: later) == Status.SENT

    # Then each letter went once, in a second batch under a new key
    assert statuses(resend_world, ids) == [Status.SENT] * 4
    assert stored_per_letter(provider_server, ids) == [1] * 4
    assert provider_server.requests_for_key(first.idempotency_key) == 1


@pytest.mark.parametrize("fault", ["503", "stored:503", "drop", "stall:1.0"])
def test_an_unknown_outcome_is_settled_by_replaying_the_identical_batch_with_its_key(
    resend_world: App, provider_server: FakeProviderServer, fault: str
) -> None:
    # Given the fake answers 503 (stored or not: the client cannot tell), or stores the batch
    # and drops the connection, or stalls past the client's 0.5 s read timeout
    provider_server.set_faults("resend", [fault])
    ids = due_letters(resend_world, 4)

    # When the batch runs, its outcome is unknown: every letter waits in the batch, pinned
    assert run_delivery(resend_world, ids[0], "t1", clock=lambda: AT_DUE) == Status.SCHEDULED
    batch = the_batch(resend_world)
    assert batch.state == "live"
    rows = [row(resend_world, i) for i in ids]
    assert {(r.error_class, r.pinned_provider, r.batch_id) for r in rows} == {
        (ErrorClass.AMBIGUOUS, "resend", batch.id)
    }
    provider_server.wait_idle(timeout=10)  # a stall ends at the fake first

    # When one member's retry comes due, the whole batch is replayed with the same key
    first_due = min(rows, key=lambda r: r.next_attempt_at)
    later = first_due.next_attempt_at + timedelta(seconds=1)
    assert run_delivery(resend_world, first_due.id, "t2", clock=lambda: later) == Status.SENT

    # Then each letter is stored once: the fake answered the replay with the first ids (or,
    # when nothing was stored, took the replay as the first call)
    assert statuses(resend_world, ids) == [Status.SENT] * 4
    assert stored_per_letter(provider_server, ids) == [1] * 4
    key = batch.idempotency_key
    replays = 0 if fault == "503" else 1
    assert (provider_server.requests_for_key(key), provider_server.replays_for_key(key)) == (
        2,
        replays,
    )
    assert the_batch(resend_world).state == "done"


def test_a_replay_while_the_first_call_is_in_flight_waits_and_sends_nothing_new(
    resend_world: App, provider_server: FakeProviderServer
) -> None:
    provider_server.set_faults("resend", ["stall:3"])
    ids = due_letters(resend_world, 3)
    run_delivery(resend_world, ids[0], "t1", clock=lambda: AT_DUE)

    def first_due() -> Delivery:
        return min((row(resend_world, i) for i in ids), key=lambda r: r.next_attempt_at)

    # the fake still holds the first call: 409 concurrent, still unknown, still in the batch
    early = first_due()
    later = early.next_attempt_at + timedelta(seconds=1)
    assert run_delivery(resend_world, early.id, "t2", clock=lambda: later) == Status.SCHEDULED
    assert {row(resend_world, i).pinned_provider for i in ids} == {"resend"}
    assert provider_server.messages() and stored_per_letter(provider_server, ids) == [1] * 3

    provider_server.wait_idle(timeout=10)
    early = first_due()
    much_later = early.next_attempt_at + timedelta(seconds=1)
    assert run_delivery(resend_world, early.id, "t3", clock=lambda: much_later) == Status.SENT
    assert statuses(resend_world, ids) == [Status.SENT] * 3
    assert stored_per_letter(provider_server, ids) == [1] * 3
    key = the_batch(resend_world).idempotency_key
    assert (provider_server.requests_for_key(key), provider_server.replays_for_key(key)) == (3, 1)


def test_a_429_past_the_quota_defers_the_whole_batch_without_using_attempts(
    resend_world: App, provider_server: FakeProviderServer
) -> None:
    provider_server.set_quota("resend", 1)
    provider_server.set_faults("resend", ["429:3"])
    ids = due_letters(resend_world, 3)

    assert run_delivery(resend_world, ids[0], "t1", clock=lambda: AT_DUE) == Status.SCHEDULED

    rows = [row(resend_world, i) for i in ids]
    assert {(r.round_attempts, r.error_class, r.pinned_provider) for r in rows} == {
        (0, ErrorClass.TRANSIENT, None)
    }
    # all come back at one instant, as one batch again, just after the Retry-After
    [back] = {r.next_attempt_at for r in rows}
    assert AT_DUE + timedelta(seconds=3) <= back <= AT_DUE + timedelta(seconds=6)
    assert provider_server.messages() == []


def test_past_the_key_window_an_unknown_batch_goes_to_people_and_is_never_resent(
    resend_world: App, provider_server: FakeProviderServer
) -> None:
    provider_server.set_faults("resend", ["drop"])
    ids = due_letters(resend_world, 3)
    run_delivery(resend_world, ids[0], "t1", clock=lambda: AT_DUE)
    key = the_batch(resend_world).idempotency_key

    a_day_later = AT_DUE + timedelta(hours=24)
    assert run_delivery(resend_world, ids[1], "t2", clock=lambda: a_day_later) == Status.FAILED

    assert statuses(resend_world, ids) == [Status.FAILED] * 3
    assert {row(resend_world, i).error_class for i in ids} == {ErrorClass.AMBIGUOUS}
    assert provider_server.requests_for_key(key) == 1  # nothing was sent again


def test_one_refused_letter_in_a_permissive_batch_fails_alone(
    resend_world: App, provider_server: FakeProviderServer
) -> None:
    ids = due_letters(resend_world, 3)
    set_row(resend_world, ids[1], recipient_email="not an address")

    run_delivery(resend_world, ids[0], "t1", clock=lambda: AT_DUE)

    assert statuses(resend_world, ids) == [Status.SENT, Status.FAILED, Status.SENT]
    assert row(resend_world, ids[1]).error_class == ErrorClass.PERMANENT
    assert stored_per_letter(provider_server, ids) == [1, 0, 1]


# ---------------------------------------------------------------- Postmark, run by run


def test_postmark_batch_refusal_of_one_message_fails_only_that_letter(
    postmark_world: App, provider_server: FakeProviderServer
) -> None:
    provider_server.mark_inactive("dead@example.com")
    ids = due_letters(postmark_world, 3)
    set_row(postmark_world, ids[2], recipient_email="dead@example.com")

    run_delivery(postmark_world, ids[0], "t1", clock=lambda: AT_DUE)

    assert statuses(postmark_world, ids) == [Status.SENT, Status.SENT, Status.FAILED]
    assert stored_per_letter(provider_server, ids) == [1, 1, 0]
    keys = [row(postmark_world, i).idempotency_key for i in ids]
    assert [provider_server.requests_for_key(k) for k in keys] == [1, 1, 1]
    assert provider_server.stats()["requests"] == {"postmark": 2}  # the batch, the owner's notice


def test_postmark_unknown_batch_outcome_is_settled_by_looking_each_letter_up(
    postmark_world: App, provider_server: FakeProviderServer
) -> None:
    # Given Postmark stores the batch and then answers 503
    provider_server.set_faults("postmark", ["stored:503"])
    ids = due_letters(postmark_world, 3)
    assert run_delivery(postmark_world, ids[0], "t1", clock=lambda: AT_DUE) == Status.SCHEDULED
    rows = [row(postmark_world, i) for i in ids]
    assert {(r.pinned_provider, r.batch_id) for r in rows} == {("postmark", None)}

    # When each letter comes due after the settle window, it is looked up, not sent again
    later = max(r.next_attempt_at for r in rows) + timedelta(seconds=10)
    for i in ids:
        assert run_delivery(postmark_world, i, f"r-{i}", clock=lambda: later) == Status.SENT

    assert stored_per_letter(provider_server, ids) == [1] * 3
    keys = [r.idempotency_key for r in rows]
    assert [provider_server.requests_for_key(k) for k in keys] == [1] * 3
    assert [provider_server.lookups_for_key(k) for k in keys] == [1] * 3


# ---------------------------------------------------------------- real consumers


def batch_env(live: World, **extra: str) -> None:
    env = {
        "CAPSULE_BATCH_SIZE": "100",
        "CAPSULE_PROVIDERS": "resend",
        "CAPSULE_PROVIDER_READ_TIMEOUT": "1",
        "CAPSULE_BACKOFF_BASE_SECONDS": "1",
        "CAPSULE_LEASE_SECONDS": "30",
    }
    reconfigure(live, **{**env, **extra})


def assert_each_letter_stored_once(live: World) -> None:
    ids = [str(r.id) for r in live.rows()]
    counts = {i: len(live.server.messages_for_delivery(i)) for i in ids}
    assert {c for c in counts.values()} == {1}, {i: c for i, c in counts.items() if c != 1}


def batch_keys(live: World) -> list[str]:
    with session_scope(live.app.session_factory) as session:
        return list(session.scalars(select(DeliveryBatch.idempotency_key)))


@pytest.mark.parametrize("fault", ["503", "stored:503", "stall:2", "drop", "429:1"])
def test_a_real_consumer_sends_each_letter_once_through_a_batch_fault(
    live: World, fault: str
) -> None:
    # Given a fake that fails the first batch call with `fault`, 40 letters due at one instant,
    # and then a consumer (started after the letters, so that a busy machine, slow to schedule
    # 40 letters, cannot have it send the first ones alone as each falls due)
    batch_env(live)
    live.server.set_faults("resend", [fault])
    due = utcnow() + timedelta(seconds=2)
    for _ in range(40):
        live.schedule(due)
    live.consumer(workers=2)

    # When they have all been sent (retries come back within seconds: backoff base 1 s)
    wait_for(lambda: live.count(Status.SENT) == 40, timeout=90, interval=0.5, what="40 sent")

    # Then each letter is stored once at the fake, and few requests carried them (the first
    # task may find its letter alone and send it alone, under the letter's own key)
    assert_each_letter_stored_once(live)
    counts = live.server.key_counts()
    requests, replays = sum(counts["requests"].values()), sum(counts["replays"].values())
    assert requests - replays <= 10, (requests, replays, len(batch_keys(live)))
    if fault in {"stored:503", "drop", "stall:2"}:
        assert replays >= 1  # the unknown outcome was settled by a replay, same key


def test_a_consumer_killed_mid_batch_is_recovered_by_replaying_the_batch(live: World) -> None:
    # Given a fake that stores the batch and stalls 6 s, and a client that waits 20 s
    batch_env(live, CAPSULE_PROVIDER_READ_TIMEOUT="20", CAPSULE_LEASE_SECONDS="60")
    live.server.set_faults("resend", ["stall:6"])
    due = utcnow() + timedelta(seconds=1)
    for _ in range(10):
        live.schedule(due)
    consumer = live.consumer(workers=1)  # after the letters: one batch, however slow scheduling

    # When the consumer is SIGKILLed while the call is in flight
    wait_for(lambda: len(live.server.messages()) == 10, timeout=30, what="batch stored")
    consumer.kill()
    stuck = live.rows()
    assert {r.status for r in stuck} == {Status.PROCESSING}

    # Then after the lease, the backstop recovers the letters and one run replays the batch
    from core.reconcile import run_backstop

    later = max(r.lease_until for r in stuck if r.lease_until) + timedelta(seconds=1)
    live.server.wait_idle(timeout=30)
    assert run_backstop(live.app, now=later).recovered == 10
    assert run_delivery(live.app, stuck[0].id, "rerun", clock=lambda: later) == Status.SENT

    assert live.count(Status.SENT) == 10
    assert_each_letter_stored_once(live)
    [key] = batch_keys(live)
    assert (live.server.requests_for_key(key), live.server.replays_for_key(key)) == (2, 1)


def test_a_letter_waiting_for_its_batch_replay_cannot_be_canceled_or_moved(
    resend_world: App, provider_server: FakeProviderServer
) -> None:
    from core.deliveries import cancel_delivery, reschedule_delivery
    from core.errors import InvalidTransition

    provider_server.set_faults("resend", ["drop"])
    ids = due_letters(resend_world, 2)
    run_delivery(resend_world, ids[0], "t1", clock=lambda: AT_DUE)

    app = resend_world
    with pytest.raises(InvalidTransition, match="batch"):
        cancel_delivery(app, ids[1], now=AT_DUE, actor="ada")
    with pytest.raises(InvalidTransition, match="batch"):
        reschedule_delivery(
            app,
            ids[1],
            AT_DUE + timedelta(days=3),
            now=AT_DUE,
            actor="ada",
        )
    assert row(app, ids[1]).status == Status.SCHEDULED


def test_a_batch_is_one_provider_request_and_every_letter_a_claimed_run_in_the_metrics(
    resend_world: App, provider_server: FakeProviderServer
) -> None:
    from core import metrics

    def value(counter: object, *labels: str) -> float:
        return float(counter.labels(*labels)._value.get())  # type: ignore[attr-defined]

    ids = due_letters(resend_world, 5)
    requests = value(metrics.PROVIDER_REQUESTS, "resend", "accepted")
    claims = value(metrics.CLAIMS, "claimed")

    run_delivery(resend_world, ids[0], "t1", clock=lambda: AT_DUE)

    assert value(metrics.PROVIDER_REQUESTS, "resend", "accepted") - requests == 1
    assert value(metrics.CLAIMS, "claimed") - claims == 5
