"""Batch sends of each provider and of the chain, with the transport replaced
(httpx.MockTransport, a scripted SMTP object): request shape, per-message results, and how a
failed call as a whole is classified (docs/providers.md, Batches)."""

from __future__ import annotations

import json
import smtplib
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from core.errors import (
    AmbiguousProviderError,
    PermanentProviderError,
    PossiblySentError,
    ProviderError,
    TransientProviderError,
)
from core.models import ErrorClass
from core.providers.base import Accepted
from core.providers.chain import ProviderChain
from core.providers.outbox import OutboxProvider
from core.providers.ratelimit import LocalRateLimiter
from core.providers.smtp import SmtpProvider
from tests.fakes.fixtures import make_email
from tests.unit.test_providers import BASE, Handler, answer, postmark, raising, resend

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def recording(handler: Handler, seen: list[httpx.Request]) -> Handler:
    def wrapped(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    return wrapped


def batch_error(provider: Any, count: int = 2) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        provider.send_batch([make_email() for _ in range(count)], "batch-key")
    return caught.value


# ---------------------------------------------------------------- Resend


def test_resend_batch_is_one_post_under_one_key_permissive_and_byte_identical_on_replay() -> None:
    seen: list[httpx.Request] = []
    ok = answer(200, {"data": [{"id": "re-1"}, {"id": "re-2"}]})
    provider = resend(recording(ok, seen))
    emails = [make_email(), make_email()]

    first = provider.send_batch(emails, "batch-key")
    second = provider.send_batch(emails, "batch-key")

    assert first == second == [Accepted("resend", "re-1", 200), Accepted("resend", "re-2", 200)]
    assert [r.url for r in seen] == [f"{BASE}/emails/batch"] * 2
    assert seen[0].headers["Idempotency-Key"] == "batch-key"
    assert seen[0].headers["x-batch-validation"] == "permissive"
    assert seen[0].content == seen[1].content == provider.batch_body(emails)
    body = json.loads(seen[0].content)
    assert [m["to"] for m in body] == [[e.to] for e in emails]


def test_resend_permissive_errors_fail_only_their_message() -> None:
    reply = {
        "data": [{"id": "re-1"}, {"id": "re-3"}],
        "errors": [{"index": 1, "message": "bad to"}],
    }
    provider = resend(answer(200, reply))

    results = provider.send_batch([make_email() for _ in range(3)], "k")

    assert results[0] == Accepted("resend", "re-1", 200)
    assert isinstance(results[1], PermanentProviderError) and "bad to" in str(results[1])
    assert results[2] == Accepted("resend", "re-3", 200)


@pytest.mark.parametrize(
    ("handler", "kind"),
    [
        (answer(500, {"name": "internal_server_error"}), AmbiguousProviderError),
        (answer(503, {}), AmbiguousProviderError),
        (raising(httpx.ReadTimeout), AmbiguousProviderError),
        (raising(httpx.RemoteProtocolError), AmbiguousProviderError),
        (raising(httpx.ConnectError), TransientProviderError),
        (
            answer(429, {"name": "rate_limit_exceeded"}, {"retry-after": "2"}),
            TransientProviderError,
        ),
        (answer(422, {"name": "validation_error"}), TransientProviderError),
        (answer(409, {"name": "invalid_idempotent_request"}), PossiblySentError),
        (answer(409, {"name": "concurrent_idempotent_requests"}), AmbiguousProviderError),
        (answer(200, {"data": [{"id": "only-one"}]}), AmbiguousProviderError),
    ],
)
def test_resend_batch_call_failures_are_classified(handler: Handler, kind: type) -> None:
    assert type(batch_error(resend(handler))) is kind


def test_resend_429_reads_ratelimit_reset_when_there_is_no_retry_after() -> None:
    error = batch_error(resend(answer(429, {}, {"ratelimit-reset": "3"})))

    assert isinstance(error, TransientProviderError) and error.retry_after == 3.0


# ---------------------------------------------------------------- Postmark


def test_postmark_batch_gives_each_message_its_own_answer() -> None:
    seen: list[httpx.Request] = []
    reply = [
        {"ErrorCode": 0, "Message": "OK", "MessageID": "pm-1"},
        {"ErrorCode": 406, "Message": "Inactive recipient"},
        {"ErrorCode": 405, "Message": "Not allowed to send"},
    ]
    provider = postmark(recording(answer(200, reply), seen))
    emails = [make_email() for _ in range(3)]

    results = provider.send_batch(emails, "batch-key")

    assert results[0] == Accepted("postmark", "pm-1", 200)
    assert isinstance(results[1], PermanentProviderError) and results[1].error_code == "406"
    assert isinstance(results[2], TransientProviderError)  # about the account, not the letter
    assert seen[0].url == f"{BASE}/email/batch"
    body = json.loads(seen[0].content)
    assert [m["Metadata"]["idempotency_key"] for m in body] == [e.idempotency_key for e in emails]


@pytest.mark.parametrize(
    ("handler", "kind"),
    [
        (answer(500, {}), AmbiguousProviderError),
        (raising(httpx.ReadTimeout), AmbiguousProviderError),
        (raising(httpx.ConnectError), TransientProviderError),
        (answer(429, {}), TransientProviderError),
        (answer(422, {"ErrorCode": 300, "Message": "Invalid"}), TransientProviderError),
        (answer(200, [{"ErrorCode": 0, "MessageID": "x"}]), AmbiguousProviderError),
    ],
)
def test_postmark_batch_call_failures_are_classified(handler: Handler, kind: type) -> None:
    assert type(batch_error(postmark(handler))) is kind


# ---------------------------------------------------------------- SMTP and the outbox


class ScriptedSmtp:
    """Accepts every message except those scripted: {index: "refuse" | "hang-up"}."""

    def __init__(self, script: dict[int, str]) -> None:
        self.script = script
        self.sock = None
        self.connects = 0
        self.datas: list[bytes] = []
        self.index = -1

    def connect(self, host: str, port: int) -> tuple[int, bytes]:
        self.connects += 1
        return 220, b"ready"

    def ehlo_or_helo_if_needed(self) -> None: ...

    def mail(self, sender: str) -> tuple[int, bytes]:
        self.index += 1
        return 250, b"ok"

    def rcpt(self, to: str) -> tuple[int, bytes]:
        if self.script.get(self.index) == "refuse":
            return 550, b"no such user"
        return 250, b"ok"

    def data(self, message: bytes) -> tuple[int, bytes]:
        if self.script.get(self.index) == "hang-up":
            raise smtplib.SMTPServerDisconnected("connection closed")
        self.datas.append(message)
        return 250, b"queued"

    def rset(self) -> tuple[int, bytes]:
        return 250, b"ok"

    def quit(self) -> None: ...

    def close(self) -> None: ...


def test_smtp_batch_is_one_connection_and_a_refusal_fails_only_its_message() -> None:
    scripted = ScriptedSmtp({1: "refuse"})
    provider = SmtpProvider("mx.test", 25, smtp_factory=lambda: scripted)  # type: ignore[arg-type,return-value]

    results = provider.send_batch([make_email() for _ in range(3)], "k")

    assert scripted.connects == 1 and len(scripted.datas) == 2
    assert isinstance(results[0], Accepted) and isinstance(results[2], Accepted)
    assert isinstance(results[1], PermanentProviderError)


def test_smtp_hang_up_mid_batch_is_ambiguous_for_that_message_and_not_sent_for_the_rest() -> None:
    scripted = ScriptedSmtp({1: "hang-up"})
    provider = SmtpProvider("mx.test", 25, smtp_factory=lambda: scripted)  # type: ignore[arg-type,return-value]

    results = provider.send_batch([make_email() for _ in range(3)], "k")

    assert isinstance(results[0], Accepted)
    assert isinstance(results[1], AmbiguousProviderError)
    assert isinstance(results[2], TransientProviderError)
    assert len(scripted.datas) == 1


def test_outbox_batch_writes_one_file_per_message(tmp_path: Any) -> None:
    provider = OutboxProvider(tmp_path)
    emails = [make_email() for _ in range(3)]

    results = provider.send_batch(emails, "k")

    assert all(isinstance(r, Accepted) for r in results)
    assert sorted(p.name for p in tmp_path.glob("*.eml")) == sorted(
        f"{e.idempotency_key}.eml" for e in emails
    )


# ---------------------------------------------------------------- the chain


class BatchScripted:
    """A batch provider answering from a script; counts calls."""

    can_look_up = False
    batch_limit = 100

    def __init__(self, name: str, answer: Any, *, replays: bool = True) -> None:
        self.name = name
        self.answer = answer
        self.replays_batches = replays
        self.calls = 0

    def send(self, email: Any) -> Accepted:
        raise AssertionError("a batch must not be sent one by one")

    def find_sent(self, email: Any) -> None:
        return None

    def batch_body(self, emails: Any) -> bytes:
        return b"body"

    def send_batch(self, emails: Any, key: str) -> Any:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def chain_batch(provider: BatchScripted, count: int = 3, **kwargs: Any) -> list[Any]:
    chain = ProviderChain([provider], **kwargs)
    emails = [make_email() for _ in range(count)]
    return chain.send_batch(provider.name, emails, "k", now=T0, clock=lambda: T0)


def test_a_429_on_a_batch_defers_every_letter_and_pauses_the_shared_limiter() -> None:
    limiter = LocalRateLimiter(100)
    error = TransientProviderError("resend", "slow down", status_code=429, retry_after=5.0)
    provider = BatchScripted("resend", error)

    results = chain_batch(provider, limiter=limiter)

    assert all(o.deferred and o.error_class == ErrorClass.TRANSIENT for o in results)
    assert all(o.retry_after == 5.0 and o.pinned_provider is None for o in results)
    assert limiter.acquire("resend") >= 4.9  # every consumer holds back, not only this run


def test_an_unknown_outcome_keeps_a_resend_batch_for_a_replay_and_pins_it() -> None:
    provider = BatchScripted("resend", AmbiguousProviderError("resend", "read timeout"))

    results = chain_batch(provider)

    assert all(o.error_class == ErrorClass.AMBIGUOUS for o in results)
    assert all(o.pinned_provider == "resend" and o.keep_batch for o in results)


def test_an_unknown_outcome_of_a_postmark_batch_pins_each_letter_for_a_lookup() -> None:
    error = AmbiguousProviderError("postmark", "read timeout")
    provider = BatchScripted("postmark", error, replays=False)

    results = chain_batch(provider)

    assert all(o.pinned_provider == "postmark" and not o.keep_batch for o in results)


def test_a_refused_call_retries_every_letter_unpinned_and_out_of_the_batch() -> None:
    provider = BatchScripted("resend", TransientProviderError("resend", "503", status_code=503))

    results = chain_batch(provider)

    assert all(o.error_class == ErrorClass.TRANSIENT and not o.deferred for o in results)
    assert all(o.pinned_provider is None and not o.keep_batch for o in results)


def test_one_refused_message_fails_alone_and_the_others_are_sent() -> None:
    refused = PermanentProviderError("resend", "bad recipient", status_code=422)
    provider = BatchScripted(
        "resend", [Accepted("resend", "a", 200), refused, Accepted("resend", "c", 200)]
    )

    results = chain_batch(provider)

    assert [o.sent for o in results] == [True, False, True]
    assert results[1].error_class == ErrorClass.PERMANENT
    assert [o.provider_message_id for o in results] == ["a", None, "c"]
    assert provider.calls == 1


def test_a_replayed_batch_keeps_every_failure_pinned_and_in_the_batch() -> None:
    provider = BatchScripted("resend", TransientProviderError("resend", "refused"))
    chain = ProviderChain([provider])

    results = chain.send_batch("resend", [make_email()], "k", replay=True, now=T0, clock=lambda: T0)

    assert results[0].pinned_provider == "resend" and results[0].keep_batch


def test_a_batch_held_back_by_the_rate_limit_calls_nothing_and_is_deferred() -> None:
    class Closed:
        def acquire(self, provider: str) -> float:
            return 60.0

    provider = BatchScripted("resend", [])

    results = chain_batch(provider, limiter=Closed(), sleep=lambda s: None)

    assert provider.calls == 0 and all(o.deferred for o in results)


def test_a_pause_of_the_shared_limiter_leaves_no_burst_after_it(
    ratelimit_redis: tuple[Any, str],
) -> None:
    from core.providers.ratelimit import RedisRateLimiter

    client, prefix = ratelimit_redis
    limiter = RedisRateLimiter(client, prefix, 5, burst=5)

    limiter.pause("resend", 1.0)

    assert 0.9 <= limiter.acquire("resend") <= 1.0
