"""The provider chain: failover only on "definitely not accepted", pinning after an ambiguous
outcome, circuit and rate-limit gates, and the wiring from settings."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Settings
from core.db import SessionFactory
from core.errors import (
    AmbiguousProviderError,
    PermanentProviderError,
    PossiblySentError,
    ProviderError,
    TransientProviderError,
)
from core.providers import build_chain
from core.providers.base import Accepted, Email
from core.providers.chain import ProviderChain
from core.providers.circuit import CircuitBreaker
from core.providers.outbox import OutboxProvider
from core.providers.postmark import PostmarkProvider
from core.providers.ratelimit import LocalRateLimiter, RedisRateLimiter
from core.providers.resend import ResendProvider
from core.providers.smtp import SmtpProvider
from tests.fakes.fixtures import make_email

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
Handler = Callable[[httpx.Request], httpx.Response]


def clock() -> datetime:
    return T0


class Scripted:
    """A provider that answers from a script: Accepted values or exceptions, in order."""

    def __init__(
        self,
        name: str,
        *script: Accepted | Exception,
        found: Accepted | Exception | None = None,
        can_look_up: bool = True,
    ):
        self.name = name
        self.can_look_up = can_look_up
        self.script = list(script)
        self.found = found
        self.sent: list[Email] = []
        self.lookups = 0

    def send(self, email: Email) -> Accepted:
        self.sent.append(email)
        result = self.script.pop(0) if self.script else Accepted(self.name, f"{self.name}-id", 200)
        if isinstance(result, Exception):
            raise result
        return result

    def find_sent(self, email: Email) -> Accepted | None:
        self.lookups += 1
        if isinstance(self.found, Exception):
            raise self.found
        return self.found


class ScriptedLimiter:
    """Answers acquire() from a list of waits, then 0."""

    def __init__(self, *waits: float, forever: float | None = None) -> None:
        self.waits = list(waits)
        self.forever = forever

    def acquire(self, provider: str) -> float:
        if self.forever is not None:
            return self.forever
        return self.waits.pop(0) if self.waits else 0.0


def transient(
    name: str, status: int = 503, retry_after: float | None = None
) -> TransientProviderError:
    return TransientProviderError(
        name, f"{status} injected", status_code=status, retry_after=retry_after
    )


def http_client(handler: Handler) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def real_resend(handler: Handler) -> ResendProvider:
    return ResendProvider(http_client(handler), api_key="re_key", base_url="https://resend.test")


def real_postmark(seen: list[httpx.Request]) -> PostmarkProvider:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"MessageID": "pm-1", "ErrorCode": 0, "Message": "OK"})

    return PostmarkProvider(
        http_client(handler), server_token="pm", base_url="https://postmark.test"
    )


def send(chain: ProviderChain, mail: Email | None = None, pinned: str | None = None) -> Any:
    return chain.send(mail or make_email(), pinned=pinned, now=T0, clock=clock)


def outcomes(result: Any) -> list[tuple[str, str]]:
    return [(call.provider, call.outcome) for call in result.calls]


# ---------------------------------------------------------------- failover


def test_first_provider_accepting_is_a_sent_outcome_with_one_call() -> None:
    first, second = Scripted("resend", Accepted("resend", "re-1", 200)), Scripted("postmark")

    result = send(ProviderChain([first, second]))

    assert result.sent
    assert (result.provider, result.provider_message_id) == ("resend", "re-1")
    (call,) = result.calls
    assert (call.provider, call.outcome, call.status_code, call.provider_message_id) == (
        "resend",
        "accepted",
        200,
        "re-1",
    )
    assert call.started_at == T0 and call.started_at.tzinfo is not None
    assert call.duration_ms >= 0
    assert second.sent == []


@pytest.mark.parametrize(
    "resend_handler",
    [
        lambda request: httpx.Response(
            429, json={"name": "rate_limit_exceeded", "message": "slow down"}
        ),
        lambda request: httpx.Response(403, json={"name": "invalid_api_key", "message": "no"}),
        lambda request: (_ for _ in ()).throw(httpx.ConnectError("refused", request=request)),
    ],
    ids=["429", "403", "connection refused"],
)
def test_fails_over_to_postmark_when_resend_definitely_did_not_accept(
    resend_handler: Handler,
) -> None:
    seen: list[httpx.Request] = []
    mail = make_email(text="the secret letter text")

    result = send(ProviderChain([real_resend(resend_handler), real_postmark(seen)]), mail)

    assert result.sent and result.provider == "postmark"
    assert outcomes(result) == [("resend", "transient"), ("postmark", "accepted")]
    assert len(seen) == 1
    assert all(mail.text not in (call.message or "") for call in result.calls)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_5xx_pins_the_letter_to_the_provider_that_answered_it(status: int) -> None:
    """A provider may store a message and then answer 5xx: failing over would send it twice."""
    seen: list[httpx.Request] = []

    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"name": "application_error", "message": "down"})

    result = send(ProviderChain([real_resend(down), real_postmark(seen)]))

    assert not result.sent and seen == []
    assert result.error_class == "ambiguous" and result.pinned_provider == "resend"
    assert outcomes(result) == [("resend", "ambiguous")]


def test_no_failover_on_an_ambiguous_outcome_and_the_provider_is_pinned() -> None:
    def stalled(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    seen: list[httpx.Request] = []

    result = send(ProviderChain([real_resend(stalled), real_postmark(seen)]))

    assert result.error_class == "ambiguous"
    assert result.pinned_provider == "resend"
    assert outcomes(result) == [("resend", "ambiguous")]
    assert seen == []


@pytest.mark.parametrize(
    ("error", "error_class"),
    [
        (PermanentProviderError("resend", "422 invalid to", status_code=422), "permanent"),
        (PossiblySentError("resend", "key reused", status_code=409), "possibly_sent"),
    ],
)
def test_permanent_answers_stop_the_chain(error: ProviderError, error_class: str) -> None:
    second = Scripted("postmark")

    result = send(ProviderChain([Scripted("resend", error), second]))

    assert result.error_class == error_class
    assert result.pinned_provider is None
    assert result.calls[0].status_code == error.status_code
    assert second.sent == []


def test_all_transient_is_transient_with_the_largest_retry_after() -> None:
    chain = ProviderChain(
        [
            Scripted("resend", transient("resend", 429, retry_after=7)),
            Scripted("postmark", transient("postmark", 503, retry_after=30)),
            Scripted("smtp", transient("smtp", 451)),
        ]
    )

    result = send(chain)

    assert result.error_class == "transient"
    assert result.retry_after == 30
    assert result.pinned_provider is None
    assert outcomes(result) == [
        ("resend", "transient"),
        ("postmark", "transient"),
        ("smtp", "transient"),
    ]
    assert "resend" in result.error and "postmark" in result.error


def test_an_unexpected_exception_is_treated_as_ambiguous() -> None:
    second = Scripted("postmark")

    result = send(ProviderChain([Scripted("resend", KeyError("bug")), second]))

    assert result.error_class == "ambiguous" and result.pinned_provider == "resend"
    assert second.sent == []


def test_an_unexpected_exception_s_text_is_not_kept() -> None:
    # A library error may quote what it choked on (a header: the subject). last_error is stored
    # and shown to support, so only the type is kept.
    subject = "Dear future me, the secret is 42"

    result = send(ProviderChain([Scripted("resend", ValueError(f"bad header {subject!r}"))]))

    assert result.error_class == "ambiguous"
    assert "ValueError" in result.error
    assert "secret" not in result.error
    assert all("secret" not in (call.message or "") for call in result.calls)


# ---------------------------------------------------------------- pinned


def test_pinned_provider_found_by_lookup_is_sent_without_sending_again() -> None:
    pinned = Scripted("postmark", found=Accepted("postmark", "pm-earlier", 200))
    other = Scripted("resend")

    result = send(ProviderChain([other, pinned]), pinned="postmark")

    assert result.sent and result.provider_message_id == "pm-earlier"
    (call,) = result.calls
    assert (call.provider, call.outcome, call.message) == (
        "postmark",
        "accepted",
        "found by lookup",
    )
    assert pinned.sent == [] and other.sent == []


def test_pinned_provider_not_found_sends_through_that_provider_only() -> None:
    pinned, other = Scripted("postmark"), Scripted("resend")

    result = send(ProviderChain([other, pinned]), pinned="postmark")

    assert result.sent and result.provider == "postmark"
    assert pinned.lookups == 1 and len(pinned.sent) == 1
    assert other.sent == []


def test_pinned_failure_never_fails_over_and_stays_pinned() -> None:
    pinned, other = (
        Scripted("resend", transient("resend", 503, retry_after=5)),
        Scripted("postmark"),
    )

    result = send(ProviderChain([pinned, other]), pinned="resend")

    assert result.error_class == "transient"
    assert result.pinned_provider == "resend"
    assert result.retry_after == 5
    assert other.sent == []


def test_pinned_lookup_failure_is_ambiguous_and_sends_nothing() -> None:
    pinned = Scripted("postmark", found=TransientProviderError("postmark", "ConnectError"))

    result = send(ProviderChain([pinned]), pinned="postmark")

    assert result.error_class == "ambiguous" and result.pinned_provider == "postmark"
    assert pinned.sent == []
    assert "lookup failed" in (result.calls[0].message or "")


def test_pinned_provider_that_is_no_longer_configured_waits() -> None:
    other = Scripted("outbox")

    result = send(ProviderChain([other]), pinned="resend")

    assert result.error_class == "ambiguous" and result.pinned_provider == "resend"
    assert result.calls == [] and other.sent == []


# ---------------------------------------------------------------- circuit


def test_provider_with_an_open_circuit_is_skipped(circuit_sessions: SessionFactory) -> None:
    breaker = CircuitBreaker(circuit_sessions, threshold=2, reset_seconds=60)
    resend = Scripted("resend", transient("resend"), transient("resend"))
    chain = ProviderChain([resend, Scripted("postmark")], breaker=breaker)
    send(chain)
    send(chain)

    result = send(chain)

    assert result.sent and result.provider == "postmark"
    assert outcomes(result) == [("resend", "skipped"), ("postmark", "accepted")]
    assert result.calls[0].message == "circuit open"
    assert len(resend.sent) == 2


def test_all_circuits_open_retries_when_the_first_one_closes(
    circuit_sessions: SessionFactory,
) -> None:
    breaker = CircuitBreaker(circuit_sessions, threshold=1, reset_seconds=60)
    breaker.record_failure("resend", now=T0 - timedelta(seconds=50), message="down")

    result = send(ProviderChain([Scripted("resend")], breaker=breaker))

    assert result.error_class == "transient"
    assert outcomes(result) == [("resend", "skipped")]
    assert result.retry_after == pytest.approx(10)


def test_ambiguous_counts_toward_the_circuit_and_permanent_does_not(
    circuit_sessions: SessionFactory,
) -> None:
    breaker = CircuitBreaker(circuit_sessions, threshold=2, reset_seconds=60)
    stalling = Scripted("resend", *[AmbiguousProviderError("resend", "ReadTimeout")] * 2)
    refusing = Scripted("postmark", *[PermanentProviderError("postmark", "inactive")] * 2)

    for _ in range(2):
        send(ProviderChain([stalling], breaker=breaker))
        send(ProviderChain([refusing], breaker=breaker))

    assert not breaker.allow("resend", now=T0)
    assert breaker.allow("postmark", now=T0)


def test_a_run_that_reaches_no_provider_is_deferred_and_one_that_calls_one_is_not(
    circuit_sessions: SessionFactory,
) -> None:
    breaker = CircuitBreaker(circuit_sessions, threshold=1, reset_seconds=60)
    breaker.record_failure("resend", now=T0 - timedelta(seconds=30), message="down")
    postmark = Scripted("postmark", transient("postmark"))

    called = send(ProviderChain([Scripted("resend"), postmark], breaker=breaker))
    skipped_only = send(ProviderChain([Scripted("resend"), postmark], breaker=breaker))
    pinned = send(ProviderChain([Scripted("resend")], breaker=breaker), pinned="resend")

    assert called.error_class == "transient" and not called.deferred
    assert outcomes(skipped_only) == [("resend", "skipped"), ("postmark", "skipped")]
    assert skipped_only.deferred and skipped_only.retry_after == pytest.approx(30)
    assert pinned.deferred and pinned.pinned_provider == "resend"


def test_a_half_open_trial_is_not_claimed_by_a_run_the_rate_limit_holds_back(
    circuit_sessions: SessionFactory,
) -> None:
    # Given a circuit whose open period is over (half-open: one trial call may go)
    breaker = CircuitBreaker(circuit_sessions, threshold=1, reset_seconds=60)
    breaker.record_failure("resend", now=T0 - timedelta(seconds=61), message="down")
    resend = Scripted("resend")

    # When a run is held back by the rate limit
    held = send(ProviderChain([resend], breaker=breaker, limiter=ScriptedLimiter(forever=5.0)))

    # Then it calls nothing, leaves the trial to the next run, and that run closes the circuit
    assert outcomes(held) == [("resend", "transient")] and held.deferred
    assert breaker.state("resend", now=T0).status(T0) == "half_open"
    result = send(ProviderChain([resend], breaker=breaker))
    assert result.sent and len(resend.sent) == 1
    assert breaker.state("resend", now=T0).status(T0) == "closed"


# ---------------------------------------------------------------- rate limit


def test_waits_briefly_for_the_rate_limit_then_sends() -> None:
    slept: list[float] = []
    chain = ProviderChain(
        [Scripted("resend")], limiter=ScriptedLimiter(0.4, 0.3), sleep=slept.append
    )

    result = send(chain)

    assert result.sent
    assert slept == [0.4, 0.3]


def test_still_rate_limited_moves_on_without_counting_a_circuit_failure(
    circuit_sessions: SessionFactory,
) -> None:
    slept: list[float] = []
    breaker = CircuitBreaker(circuit_sessions, threshold=1, reset_seconds=60)
    chain = ProviderChain(
        [Scripted("resend"), Scripted("postmark")],
        breaker=breaker,
        limiter=ScriptedLimiter(5.0),
        sleep=slept.append,
    )

    result = send(chain)

    assert result.sent and result.provider == "postmark"
    assert outcomes(result) == [("resend", "transient"), ("postmark", "accepted")]
    assert result.calls[0].error_code == "rate_limited"
    assert slept == []  # 5 s is beyond the ~1 s budget
    assert breaker.allow("resend", now=T0)


def test_the_wait_budget_is_shared_by_the_whole_send() -> None:
    slept: list[float] = []
    chain = ProviderChain(
        [Scripted("resend"), Scripted("postmark")],
        limiter=ScriptedLimiter(forever=0.6),
        sleep=slept.append,
    )

    result = send(chain)

    assert result.error_class == "transient"
    assert slept == [0.6]
    assert result.retry_after == pytest.approx(0.6)


# ---------------------------------------------------------------- wiring


def full_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "var_dir": str(tmp_path),
        "providers": ("resend", "postmark", "smtp", "outbox"),
        "resend_api_key": "re_key",
        "resend_base_url": "https://resend.test",
        "postmark_server_token": "pm",
        "postmark_base_url": "https://postmark.test",
        "provider_connect_timeout": 2.5,
        "provider_read_timeout": 17,
    }
    values.update(overrides)
    return Settings(**values)


def test_build_chain_follows_the_configured_order(
    tmp_path: Path, circuit_sessions: SessionFactory
) -> None:
    chain = build_chain(full_settings(tmp_path), circuit_sessions)

    assert chain.names == ["resend", "postmark", "smtp", "outbox"]
    kinds = [type(p) for p in chain.providers]
    assert kinds == [ResendProvider, PostmarkProvider, SmtpProvider, OutboxProvider]
    assert isinstance(chain.limiter, LocalRateLimiter)
    assert isinstance(chain.breaker, CircuitBreaker) and chain.breaker.threshold == 5
    chain.close()


def test_build_chain_applies_settings_timeouts_to_a_given_client(
    tmp_path: Path, circuit_sessions: SessionFactory
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "re-1"})

    settings = full_settings(tmp_path, providers=("resend",))
    chain = build_chain(settings, circuit_sessions, http_client=http_client(handler))

    result = send(chain)

    assert result.sent
    assert seen[0].extensions["timeout"]["connect"] == 2.5
    assert seen[0].extensions["timeout"]["read"] == 17


def test_build_chain_shares_the_rate_limit_through_redis_when_given(
    tmp_path: Path, circuit_sessions: SessionFactory
) -> None:
    class NoRedis:
        def register_script(self, source: str) -> Any:
            return lambda keys, args: b"0"

    chain = build_chain(full_settings(tmp_path), circuit_sessions, redis_client=NoRedis())  # type: ignore[arg-type]

    assert isinstance(chain.limiter, RedisRateLimiter)
    assert chain.limiter.key("resend") == "capsule:ratelimit:resend"


def test_embedded_default_is_the_outbox(tmp_path: Path, circuit_sessions: SessionFactory) -> None:
    chain = build_chain(Settings(var_dir=str(tmp_path)), circuit_sessions)
    mail = make_email()

    result = send(chain, mail)

    assert result.sent and result.provider == "outbox"
    assert (tmp_path / "outbox" / f"{mail.idempotency_key}.eml").exists()


# ---------------------------------------------------------------- after a run died mid-send


def test_look_first_finds_a_message_an_earlier_run_left_at_the_fallback_before_sending_anywhere() -> (
    None
):
    # Given the earlier run died after Postmark accepted (Resend had refused)
    resend = Scripted("resend")
    postmark = Scripted("postmark", found=Accepted("postmark", "pm-1", 200))
    chain = ProviderChain([resend, postmark])

    outcome = chain.send(make_email(), look_first=True, now=T0, clock=clock)

    # Then nothing is sent: the lookup's answer is the outcome
    assert outcome.sent and outcome.provider == "postmark" and outcome.provider_message_id == "pm-1"
    assert resend.sent == [] and postmark.sent == []
    assert [(c.provider, c.outcome, c.message) for c in outcome.calls] == [
        ("postmark", "accepted", "found by lookup")
    ]


def test_look_first_sends_normally_when_no_provider_has_it() -> None:
    resend, postmark = Scripted("resend"), Scripted("postmark")
    outcome = ProviderChain([resend, postmark]).send(
        make_email(), look_first=True, now=T0, clock=clock
    )
    assert outcome.sent and outcome.provider == "resend"
    assert (resend.lookups, postmark.lookups) == (1, 1) and len(resend.sent) == 1


def test_look_first_with_a_provider_that_cannot_answer_pins_to_it_and_sends_nothing() -> None:
    resend = Scripted("resend")
    postmark = Scripted(
        "postmark", found=TransientProviderError("postmark", "503", status_code=503)
    )
    outcome = ProviderChain([resend, postmark]).send(
        make_email(), look_first=True, now=T0, clock=clock
    )
    assert outcome.error_class == "ambiguous" and outcome.pinned_provider == "postmark"
    assert resend.sent == [] and postmark.sent == []


def test_without_look_first_no_lookup_is_made() -> None:
    postmark = Scripted("postmark", found=Accepted("postmark", "pm-1", 200))
    outcome = ProviderChain([postmark]).send(make_email(), now=T0, clock=clock)
    assert outcome.sent and postmark.lookups == 0 and len(postmark.sent) == 1


def test_after_an_unknown_outcome_a_provider_that_cannot_be_asked_is_never_failed_over_from() -> (
    None
):
    # Given an earlier run died after Resend (which cannot be asked) may have accepted it,
    # Postmark's lookup finds nothing and Resend now answers 503
    resend = Scripted(
        "resend", TransientProviderError("resend", "503", status_code=503), can_look_up=False
    )
    postmark = Scripted("postmark")

    outcome = ProviderChain([resend, postmark]).send(
        make_email(), look_first=True, now=T0, clock=clock
    )

    # Then nothing goes to Postmark: the delivery retries Resend (same key) later
    assert outcome.error_class == "transient" and outcome.pinned_provider == "resend"
    assert postmark.sent == [] and postmark.lookups == 1 and len(resend.sent) == 1


def test_after_an_unknown_outcome_the_blind_provider_is_used_even_when_it_is_not_first() -> None:
    postmark = Scripted("postmark")
    smtp = Scripted("smtp", can_look_up=False)
    outcome = ProviderChain([postmark, smtp]).send(
        make_email(), look_first=True, now=T0, clock=clock
    )
    assert outcome.sent and outcome.provider == "smtp" and postmark.sent == []
