"""Providers against real servers: the fake Resend/Postmark HTTP server, aiosmtpd, Redis.

Stalls are the fake server holding its answer longer than the client's read timeout (0.5 s);
nothing here sleeps to make time pass.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.fakes.provider_server import AdminClient, FakeProviderServer
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
from core.providers.postmark import PostmarkProvider
from core.providers.ratelimit import RedisRateLimiter
from core.providers.resend import ResendProvider
from core.providers.smtp import SmtpProvider
from tests.fakes.fixtures import fake_provider_settings, make_email
from tests.fakes.smtp_server import FakeSmtpServer

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
STALL = "stall:2"  # the client gives up after 0.5 s


def resend_for(server: FakeProviderServer, client: httpx.Client) -> ResendProvider:
    return ResendProvider(client, api_key=server.resend_api_key, base_url=server.url)


def postmark_for(server: FakeProviderServer, client: httpx.Client) -> PostmarkProvider:
    return PostmarkProvider(client, server_token=server.postmark_token, base_url=server.url)


def smtp_for(server: FakeSmtpServer, port: int | None = None) -> SmtpProvider:
    return SmtpProvider(server.host, port or server.port, connect_timeout=1, read_timeout=0.5)


# ---------------------------------------------------------------- Resend


def test_resend_same_key_twice_is_one_message_with_one_id(
    provider_server: FakeProviderServer, provider_client: httpx.Client
) -> None:
    resend = resend_for(provider_server, provider_client)
    mail = make_email()

    first, second = resend.send(mail), resend.send(mail)

    assert first.message_id == second.message_id
    assert provider_server.count_for_key(mail.idempotency_key) == 1
    (stored,) = provider_server.messages("resend")
    assert (stored.to, stored.subject, stored.text) == ([mail.to], mail.subject, mail.text)


def test_resend_same_key_with_another_body_is_possibly_sent(
    provider_server: FakeProviderServer, provider_client: httpx.Client
) -> None:
    resend = resend_for(provider_server, provider_client)
    mail = make_email()
    resend.send(mail)

    with pytest.raises(PossiblySentError) as caught:
        resend.send(make_email(idempotency_key=mail.idempotency_key, subject="edited"))

    assert caught.value.error_code == "invalid_idempotent_request"
    assert provider_server.count_for_key(mail.idempotency_key) == 1


def test_resend_accept_then_stall_is_ambiguous_and_the_retry_does_not_duplicate(
    provider_server: FakeProviderServer, provider_client: httpx.Client
) -> None:
    # Given Resend accepts the message but its answer never arrives in time
    resend = resend_for(provider_server, provider_client)
    provider_server.set_faults("resend", [STALL])
    mail = make_email()

    with pytest.raises(AmbiguousProviderError):
        resend.send(mail)
    stored = provider_server.messages("resend")

    # When the run is retried with the same key while Resend still holds the first request,
    # it is refused as concurrent: still unknown, never a second message
    with pytest.raises(AmbiguousProviderError) as during:
        resend.send(mail)
    assert during.value.error_code == "concurrent_idempotent_requests"

    # When it is retried once the first request is over
    provider_server.wait_idle()
    again = resend.send(mail)

    # Then there is still one message, and we learn its id
    assert [m.id for m in stored] == [again.message_id]
    assert provider_server.count_for_key(mail.idempotency_key) == 1
    assert provider_server.requests_for_key(mail.idempotency_key) == 3
    assert provider_server.replays_for_key(mail.idempotency_key) == 1


def test_resend_concurrent_requests_with_one_key_send_once(provider_client: httpx.Client) -> None:
    with FakeProviderServer(latency_ms=300) as server:
        resend = resend_for(server, provider_client)
        mail = make_email()
        results: list[Any] = []
        barrier = threading.Barrier(2)

        def attempt() -> None:
            barrier.wait()
            try:
                results.append(resend.send(mail))
            except ProviderError as exc:
                results.append(exc)

        threads = [threading.Thread(target=attempt) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        errors = [r for r in results if isinstance(r, ProviderError)]
        assert len(errors) == 1
        assert type(errors[0]) is AmbiguousProviderError  # never failed over elsewhere
        assert errors[0].error_code == "concurrent_idempotent_requests"
        assert server.count_for_key(mail.idempotency_key) == 1


@pytest.mark.parametrize(
    ("fault", "expected", "retry_after"),
    [
        ("503", AmbiguousProviderError, None),  # it may have stored the message first
        ("stored:503", AmbiguousProviderError, None),
        ("401", TransientProviderError, None),
        ("429:3", TransientProviderError, 3.0),
        ("422", PermanentProviderError, None),
        ("drop", AmbiguousProviderError, None),
    ],
)
def test_resend_injected_faults_are_classified(
    provider_server: FakeProviderServer,
    provider_client: httpx.Client,
    fault: str,
    expected: type[ProviderError],
    retry_after: float | None,
) -> None:
    provider_server.set_faults("resend", [fault])

    with pytest.raises(ProviderError) as caught:
        resend_for(provider_server, provider_client).send(make_email())

    assert type(caught.value) is expected
    assert caught.value.retry_after == retry_after


def test_resend_malformed_recipient_is_permanent(
    provider_server: FakeProviderServer, provider_client: httpx.Client
) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        resend_for(provider_server, provider_client).send(make_email(to="not-an-address"))

    assert (caught.value.status_code, caught.value.error_code) == (422, "validation_error")


def test_stopped_server_refuses_connections_even_to_a_pooled_client(
    provider_server: FakeProviderServer, provider_client: httpx.Client
) -> None:
    resend = resend_for(provider_server, provider_client)
    resend.send(make_email())  # leaves a keep-alive connection in the pool

    provider_server.stop()

    with pytest.raises(TransientProviderError) as caught:
        resend.send(make_email())
    assert caught.value.error_code == "ConnectError"


# ---------------------------------------------------------------- Postmark


def test_postmark_lookup_finds_a_message_sent_before_a_stall(
    provider_server: FakeProviderServer, provider_client: httpx.Client
) -> None:
    postmark = postmark_for(provider_server, provider_client)
    provider_server.set_faults("postmark", [STALL])
    mail = make_email()

    with pytest.raises(AmbiguousProviderError):
        postmark.send(mail)
    found = postmark.find_sent(mail)

    (stored,) = provider_server.messages("postmark")
    assert found is not None and found.message_id == stored.id
    assert stored.metadata["idempotency_key"] == mail.idempotency_key
    assert postmark.find_sent(make_email()) is None


def test_postmark_inactive_recipient_is_permanent(
    provider_server: FakeProviderServer, provider_client: httpx.Client
) -> None:
    provider_server.mark_inactive("gone@example.com")

    with pytest.raises(PermanentProviderError) as caught:
        postmark_for(provider_server, provider_client).send(make_email(to="gone@example.com"))

    assert caught.value.error_code == "406"


# ---------------------------------------------------------------- the chain over HTTP


def test_chain_fails_over_from_a_refusing_resend_to_postmark(
    provider_server: FakeProviderServer, tmp_path: Path, circuit_sessions: SessionFactory
) -> None:
    provider_server.set_faults("resend", ["401"])
    chain = build_chain(fake_provider_settings(provider_server, tmp_path), circuit_sessions)

    result = chain.send(make_email(), pinned=None, now=T0)
    chain.close()

    assert result.sent and result.provider == "postmark"
    assert [(c.provider, c.outcome, c.status_code) for c in result.calls] == [
        ("resend", "transient", 401),
        ("postmark", "accepted", 200),
    ]
    assert len(provider_server.messages("resend")) == 0
    assert len(provider_server.messages("postmark")) == 1


@pytest.mark.parametrize("fault", ["503", "stored:503"])
def test_chain_never_fails_over_after_a_5xx_and_the_pinned_retry_sends_once(
    provider_server: FakeProviderServer,
    tmp_path: Path,
    circuit_sessions: SessionFactory,
    fault: str,
) -> None:
    # Given Resend answers 503, having stored the message or not (the client cannot tell)
    provider_server.set_faults("resend", [fault])
    chain = build_chain(fake_provider_settings(provider_server, tmp_path), circuit_sessions)
    mail = make_email()

    first = chain.send(mail, pinned=None, now=T0)
    # When the pinned retry repeats the call under the same key
    second = chain.send(mail, pinned=first.pinned_provider, now=T0)
    chain.close()

    # Then nothing reached Postmark and exactly one message exists, whichever 503 it was
    assert first.error_class == "ambiguous" and first.pinned_provider == "resend"
    assert second.sent and second.provider == "resend"
    assert provider_server.requests_for_key(mail.idempotency_key, "postmark") == 0
    assert provider_server.count_for_key(mail.idempotency_key) == 1
    assert len(provider_server.messages("resend")) == 1


def test_chain_does_not_fail_over_on_a_stall_and_the_pinned_retry_sends_once(
    provider_server: FakeProviderServer, tmp_path: Path, circuit_sessions: SessionFactory
) -> None:
    provider_server.set_faults("resend", [STALL])
    chain = build_chain(fake_provider_settings(provider_server, tmp_path), circuit_sessions)
    mail = make_email()

    first = chain.send(mail, pinned=None, now=T0)
    provider_server.wait_idle()  # the stalled request is over on Resend's side
    retry = chain.send(mail, pinned=first.pinned_provider, now=T0)
    chain.close()

    assert (first.error_class, first.pinned_provider) == ("ambiguous", "resend")
    assert retry.sent and retry.provider == "resend"
    assert provider_server.requests_for_key(mail.idempotency_key, "postmark") == 0
    assert provider_server.requests_for_key(mail.idempotency_key, "resend") == 2
    assert provider_server.replays_for_key(mail.idempotency_key) == 1
    assert provider_server.count_for_key(mail.idempotency_key) == 1


def test_postmark_pinned_retry_finds_the_message_instead_of_sending(
    provider_server: FakeProviderServer, tmp_path: Path, circuit_sessions: SessionFactory
) -> None:
    provider_server.set_faults("postmark", [STALL])
    settings = fake_provider_settings(provider_server, tmp_path, providers=("postmark", "resend"))
    chain = build_chain(settings, circuit_sessions)
    mail = make_email()

    first = chain.send(mail, pinned=None, now=T0)
    retry = chain.send(mail, pinned=first.pinned_provider, now=T0)
    chain.close()

    assert first.pinned_provider == "postmark"
    assert retry.sent and retry.calls[0].message == "found by lookup"
    assert provider_server.count_for_key(mail.idempotency_key) == 1
    assert provider_server.requests_for_key(mail.idempotency_key) == 1
    assert provider_server.lookups_for_key(mail.idempotency_key) == 1


# ---------------------------------------------------------------- driving the server over HTTP


def test_admin_api_drives_faults_and_reports_messages(provider_server: FakeProviderServer) -> None:
    admin = AdminClient(provider_server.url)
    admin.set_faults("resend", ["503"])
    mail = make_email()
    with httpx.Client(timeout=2) as client:
        with pytest.raises(AmbiguousProviderError):
            resend_for(provider_server, client).send(mail)
        resend_for(provider_server, client).send(mail)

    report = admin.messages()
    stats = admin.stats()
    admin.reset()

    assert report["total"] == 1 and report["counts_by_key"] == {mail.idempotency_key: 1}
    assert stats["responses"]["resend"] == {"503": 1, "200": 1}
    assert admin.messages()["total"] == 0
    admin.close()


def test_standalone_server_prints_its_url_and_serves(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.fakes.provider_server",
            "--port",
            "0",
            "--p-5xx",
            "1.0",
            "--seed",
            "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        with httpx.Client(timeout=2) as client:
            with pytest.raises(AmbiguousProviderError):  # p_5xx = 1: every send is a 503
                ResendProvider(client, api_key="re_test_key", base_url=url).send(make_email())
            AdminClient(url).set_faults("all")
            accepted = ResendProvider(client, api_key="re_test_key", base_url=url).send(
                make_email()
            )
        assert accepted.message_id
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


# ---------------------------------------------------------------- SMTP


def test_smtp_delivers_with_the_deterministic_message_id(smtp_server: FakeSmtpServer) -> None:
    mail = make_email(text="Dear future me,\nça va ?\n")

    accepted = smtp_for(smtp_server).send(mail)

    (received,) = smtp_server.messages
    assert accepted.message_id == received.message_id == f"<{mail.idempotency_key}@capsule>"
    assert received.mail_from == "letters@capsule.localhost"
    assert received.rcpt_tos == (mail.to,)
    assert received.subject == mail.subject
    assert received.text.replace("\r\n", "\n") == mail.text


@pytest.mark.parametrize(
    ("stage", "reply", "expected"),
    [
        ("rcpt", "550 5.1.1 No such user", PermanentProviderError),
        ("rcpt", "451 4.7.1 Greylisted, try again", TransientProviderError),
        ("data", "451 4.3.0 Try again later", TransientProviderError),
        ("data", "554 5.7.1 Rejected", PermanentProviderError),
        ("data", "stall", AmbiguousProviderError),
        ("data", "drop", AmbiguousProviderError),
    ],
)
def test_smtp_replies_are_classified(
    smtp_server: FakeSmtpServer, stage: str, reply: str, expected: type[ProviderError]
) -> None:
    smtp_server.fail_next(stage, reply, seconds=2)

    with pytest.raises(ProviderError) as caught:
        smtp_for(smtp_server).send(make_email())

    assert type(caught.value) is expected


def test_smtp_server_down_is_transient(closed_port: int) -> None:
    provider = SmtpProvider("127.0.0.1", closed_port, connect_timeout=1, read_timeout=0.5)

    with pytest.raises(TransientProviderError):
        provider.send(make_email())


def test_smtp_after_a_stall_the_retry_carries_the_same_message_id(
    smtp_server: FakeSmtpServer,
) -> None:
    smtp = smtp_for(smtp_server)
    smtp_server.fail_next("data", "stall", seconds=2)
    mail = make_email()

    with pytest.raises(AmbiguousProviderError):
        smtp.send(mail)
    smtp.send(mail)

    ids = {m.message_id for m in smtp_server.messages}
    assert ids == {f"<{mail.idempotency_key}@capsule>"}  # a receiver can drop the repeat


# ---------------------------------------------------------------- shared rate limit


@pytest.mark.redis
def test_redis_rate_limit_is_shared_by_consumers_of_the_chain(
    ratelimit_redis: tuple[Any, str], tmp_path: Path, circuit_sessions: SessionFactory
) -> None:
    client, prefix = ratelimit_redis
    settings = Settings(var_dir=str(tmp_path), huey_name=prefix, provider_rate_per_second=2)
    consumers = [build_chain(settings, circuit_sessions, redis_client=client) for _ in range(2)]
    for chain in consumers:
        assert isinstance(chain.limiter, RedisRateLimiter)

    waits = [consumers[i % 2].limiter.acquire("outbox") for i in range(2)]  # type: ignore[union-attr]

    # paced evenly (no burst): the second consumer waits for the first one's request
    assert waits[0] == 0.0
    assert 0 < waits[1] <= 0.5
