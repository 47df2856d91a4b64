"""The circuit breaker (shared through the database) and the rate limiters (local and Redis).

Time never passes by sleeping: the breaker takes `now`, the local limiter takes a clock.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine, event, select

from core.config import Settings
from core.db import SessionFactory, make_engine, make_session_factory, session_scope
from core.models import Base, ProviderState
from core.providers.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from core.providers.ratelimit import LocalRateLimiter, RedisRateLimiter
from tests.fakes.fixtures import RATELIMIT_REDIS_URL
from tests.fakes.smtp_server import free_port

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Opened:
    """Records on_open calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, provider: str, message: str) -> None:
        self.calls.append((provider, message))


def breaker(sessions: SessionFactory, **kwargs: Any) -> CircuitBreaker:
    options: dict[str, Any] = {"threshold": 3, "reset_seconds": 60}
    options.update(kwargs)
    return CircuitBreaker(sessions, **options)


def fail(circuit: CircuitBreaker, times: int, now: datetime, provider: str = "resend") -> None:
    for _ in range(times):
        circuit.record_failure(provider, now=now, message="503 from the fake")


def engine_of(sessions: SessionFactory) -> Engine:
    bind = sessions.kw["bind"]
    assert isinstance(bind, Engine)
    return bind


# ---------------------------------------------------------------- circuit breaker


def test_opens_after_threshold_consecutive_failures_and_calls_on_open_once(
    circuit_sessions: SessionFactory,
) -> None:
    opened = Opened()
    circuit = breaker(circuit_sessions, on_open=opened)

    fail(circuit, 2, T0)
    assert circuit.allow("resend", now=T0)
    fail(circuit, 2, T0)

    assert not circuit.allow("resend", now=at(1))
    assert circuit.state("resend", now=at(1)).status(at(1)) == OPEN
    assert len(opened.calls) == 1
    provider, message = opened.calls[0]
    assert provider == "resend" and "3 consecutive failures" in message
    assert circuit.allow("postmark", now=at(1))  # per provider


def test_a_success_resets_the_consecutive_count(circuit_sessions: SessionFactory) -> None:
    circuit = breaker(circuit_sessions)

    fail(circuit, 2, T0)
    circuit.record_success("resend", now=T0)
    fail(circuit, 2, T0)

    assert circuit.allow("resend", now=T0)
    assert circuit.state("resend", now=T0).consecutive_failures == 2


def test_half_open_after_reset_admits_one_trial_and_a_success_closes(
    circuit_sessions: SessionFactory,
) -> None:
    circuit = breaker(circuit_sessions)
    fail(circuit, 3, T0)

    assert not circuit.allow("resend", now=at(59))
    assert circuit.state("resend", now=at(60)).status(at(60)) == HALF_OPEN
    assert circuit.allow("resend", now=at(60))  # the trial
    assert not circuit.allow("resend", now=at(60.5))  # only one
    circuit.record_success("resend", now=at(61))

    assert circuit.allow("resend", now=at(61))
    state = circuit.state("resend", now=at(61))
    assert (state.status(at(61)), state.consecutive_failures) == (CLOSED, 0)


def test_a_failed_trial_keeps_it_open_for_another_reset_period(
    circuit_sessions: SessionFactory,
) -> None:
    opened = Opened()
    circuit = breaker(circuit_sessions, on_open=opened)
    fail(circuit, 3, T0)

    assert circuit.allow("resend", now=at(60))
    fail(circuit, 1, at(60.2))

    assert not circuit.allow("resend", now=at(119))
    assert circuit.allow("resend", now=at(120))
    assert len(opened.calls) == 1  # still the same outage


def test_state_is_shared_between_breakers_through_the_database(tmp_path: Path) -> None:
    # Given two consumers, each with its own engine on the same database file
    def consumer() -> CircuitBreaker:
        engine = make_engine(Settings(var_dir=str(tmp_path)))
        Base.metadata.create_all(engine)
        return breaker(make_session_factory(engine))

    first, second = consumer(), consumer()

    # When the first sees the provider fail
    fail(first, 3, T0)

    # Then the second skips it, and only one of them gets the half-open trial
    assert not second.allow("resend", now=at(1))
    assert second.allow("resend", now=at(60))
    assert not first.allow("resend", now=at(60))
    second.record_success("resend", now=at(61))
    assert first.allow("resend", now=at(64))


def test_exactly_one_consumer_gets_the_half_open_trial(circuit_sessions: SessionFactory) -> None:
    consumers = [breaker(circuit_sessions) for _ in range(4)]
    fail(consumers[0], 3, T0)
    # all of them have just read "half-open", so each will try to claim the trial
    assert {c.state("resend", now=at(60)).status(at(60)) for c in consumers} == {HALF_OPEN}

    admitted = [c.allow("resend", now=at(60)) for c in consumers]

    assert admitted.count(True) == 1


def test_reads_come_from_a_cache_refreshed_every_two_seconds(
    circuit_sessions: SessionFactory,
) -> None:
    reader, writer = breaker(circuit_sessions), breaker(circuit_sessions)
    assert reader.allow("resend", now=T0)

    fail(writer, 3, at(0.5))

    assert reader.allow("resend", now=at(1.9))  # still the cached "closed"
    assert not reader.allow("resend", now=at(2.0))


def test_successes_of_a_healthy_provider_do_no_database_writes(
    circuit_sessions: SessionFactory,
) -> None:
    circuit = breaker(circuit_sessions)
    circuit.allow("resend", now=T0)
    statements: list[str] = []
    engine = engine_of(circuit_sessions)

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        for i in range(50):
            assert circuit.allow("resend", now=at(i * 0.01))
            circuit.record_success("resend", now=at(i * 0.01))
    finally:
        event.remove(engine, "before_cursor_execute", count)

    assert statements == []


def test_concurrent_failures_open_the_circuit_exactly_once(
    circuit_sessions: SessionFactory,
) -> None:
    opened = Opened()
    circuits = [breaker(circuit_sessions, threshold=5, on_open=opened) for _ in range(4)]
    barrier = threading.Barrier(8)

    def worker(index: int) -> None:
        barrier.wait()
        circuits[index % 4].record_failure("resend", now=T0, message="boom")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    with session_scope(circuit_sessions) as session:
        row = session.execute(select(ProviderState)).scalar_one()
    assert row.consecutive_failures == 8
    assert row.opened_until == at(60)
    assert len(opened.calls) == 1


def test_breaker_fails_open_when_the_database_is_unusable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(Settings(var_dir=str(tmp_path)))  # no schema: every query fails
    circuit = breaker(make_session_factory(engine))

    with caplog.at_level(logging.WARNING, logger="core.providers.circuit"):
        fail(circuit, 5, T0)
        allowed = circuit.allow("resend", now=T0)

    assert allowed
    assert "cannot record failure" in caplog.text
    engine.dispose()


def test_on_open_hook_errors_do_not_break_sending(circuit_sessions: SessionFactory) -> None:
    def broken(provider: str, message: str) -> None:
        raise RuntimeError("webhook down")

    circuit = breaker(circuit_sessions, on_open=broken)

    fail(circuit, 3, T0)

    assert not circuit.allow("resend", now=at(1))


@pytest.fixture
def pg_sessions(pg_database: str) -> Iterator[SessionFactory]:
    engine = make_engine(Settings(database_url=pg_database))
    yield make_session_factory(engine)
    engine.dispose()


@pytest.mark.postgres
def test_breaker_on_postgresql_opens_once_and_is_shared(pg_sessions: SessionFactory) -> None:
    provider = f"p-{uuid.uuid4().hex[:8]}"
    opened = Opened()
    first = breaker(pg_sessions, on_open=opened)
    second = breaker(pg_sessions)

    fail(first, 4, T0, provider)

    assert not second.allow(provider, now=at(1))
    assert second.allow(provider, now=at(60))
    assert not first.allow(provider, now=at(60))
    second.record_success(provider, now=at(61))
    assert first.allow(provider, now=at(63))
    assert len(opened.calls) == 1


# ---------------------------------------------------------------- local rate limiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_local_limiter_allows_a_burst_then_says_how_long_to_wait() -> None:
    clock = FakeClock()
    limiter = LocalRateLimiter(5, clock=clock)

    waits = [limiter.acquire("resend") for _ in range(6)]

    assert waits[:5] == [0.0] * 5
    assert waits[5] == pytest.approx(0.2)
    assert limiter.acquire("postmark") == 0.0  # per provider


def test_local_limiter_refills_with_time_and_a_refusal_takes_nothing() -> None:
    clock = FakeClock()
    limiter = LocalRateLimiter(5, clock=clock)
    for _ in range(5):
        limiter.acquire("resend")
    assert limiter.acquire("resend") > 0
    assert limiter.acquire("resend") > 0

    clock.now += 0.2

    assert limiter.acquire("resend") == 0.0
    assert limiter.acquire("resend") > 0


def test_local_limiter_is_thread_safe() -> None:
    limiter = LocalRateLimiter(10, clock=FakeClock())  # frozen time: exactly the burst passes
    allowed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = sum(1 for _ in range(100) if limiter.acquire("resend") == 0)
        with lock:
            allowed.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(allowed) == 10


def test_limiters_refuse_a_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError):
        LocalRateLimiter(0)


# ---------------------------------------------------------------- Redis rate limiter


@pytest.mark.redis
def test_redis_limiter_budget_is_shared_by_all_consumers(ratelimit_redis: tuple[Any, str]) -> None:
    client, prefix = ratelimit_redis
    other_client = redis.Redis.from_url(RATELIMIT_REDIS_URL)
    consumers = [RedisRateLimiter(client, prefix, 5), RedisRateLimiter(other_client, prefix, 5)]

    waits = [consumers[i % 2].acquire("resend") for i in range(6)]

    assert waits[:5] == [0.0] * 5
    assert 0 < waits[5] <= 0.2 + 1e-6
    assert consumers[1].acquire("postmark") == 0.0  # per provider
    assert 0 < client.pttl(consumers[0].key("resend")) <= 3000  # the bucket expires by itself
    other_client.close()


class DeadRedis:
    """A Redis client whose every command fails; counts how often it was asked."""

    def __init__(self) -> None:
        self.calls = 0

    def register_script(self, source: str) -> Any:
        def run(keys: list[str], args: list[float]) -> Any:
            self.calls += 1
            raise redis.ConnectionError(
                "Error 111 connecting to 127.0.0.1:6379. Connection refused."
            )

        return run


def test_redis_limiter_fails_open_warns_once_and_limits_locally_meanwhile(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead, clock = DeadRedis(), FakeClock()
    limiter = RedisRateLimiter(dead, "capsule-test", 2, retry_seconds=10, clock=clock)  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING, logger="core.providers.ratelimit"):
        waits = [limiter.acquire("resend") for _ in range(4)]
        clock.now += 10
        after_retry = limiter.acquire("resend")

    assert waits[:3] == [0.0, 0.0, 0.0]  # fails open, then the local bucket (burst 2) ...
    assert waits[3] > 0  # ... limits until Redis is asked again
    assert after_retry == 0.0
    assert dead.calls == 2  # once at first, once after retry_seconds: not on every send
    assert caplog.text.count("Redis unavailable") == 1


def test_redis_limiter_with_a_real_unreachable_server_allows_sending() -> None:
    unreachable = redis.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    limiter = RedisRateLimiter(unreachable, "capsule-test-dead", 5)

    assert limiter.acquire("resend") == 0.0
