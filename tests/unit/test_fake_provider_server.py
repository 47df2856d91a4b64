"""The fake Resend + Postmark server holds what the real services hold (benchmarks/fakes).

The suite sees the outside world through this fake: where it is kinder than the real service
(keys remembered forever, a search that sees a message at once), a broken invariant can pass.
Each test drives the fake over real HTTP with plain httpx, as a provider would.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from benchmarks.fakes.provider_server import AdminClient, FakeProviderServer

BODY = {"from": "Capsule <letters@capsule.localhost>", "to": ["me@example.com"], "subject": "Hi"}


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as fake:
        yield fake


@pytest.fixture
def client(server: FakeProviderServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(5.0)) as http:
        yield http


def resend(
    client: httpx.Client, server: FakeProviderServer, key: str, **body: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.resend_api_key}", "Idempotency-Key": key}
    return client.post("/emails", json={**BODY, **body}, headers=headers)


def postmark(
    client: httpx.Client, server: FakeProviderServer, metadata: dict[str, str]
) -> httpx.Response:
    body = {
        "From": "letters@capsule.localhost",
        "To": "me@example.com",
        "Subject": "Hi",
        "TextBody": "x",
        "Metadata": metadata,
    }
    return client.post("/email", json=body, headers={"X-Postmark-Server-Token": "pm-test-token"})


def search(client: httpx.Client, key: str, **params: str) -> httpx.Response:
    query = {"count": "1", "offset": "0", "metadata_idempotency_key": key, **params}
    return client.get(
        "/messages/outbound",
        params={k: v for k, v in query.items() if v != ""},
        headers={"X-Postmark-Server-Token": "pm-test-token"},
    )


# ---------------------------------------------------------------- Resend keys


def test_resend_replays_a_key_within_24_hours_and_counts_every_request(
    server: FakeProviderServer, client: httpx.Client
) -> None:
    key = uuid.uuid4().hex

    first, second = resend(client, server, key), resend(client, server, key)

    assert first.json()["id"] == second.json()["id"]
    assert server.count_for_key(key) == 1  # one stored message...
    assert server.requests_for_key(key) == 2  # ...but two requests reached the provider
    assert server.replays_for_key(key) == 1


def test_resend_forgets_a_key_after_24_hours_of_its_clock(
    server: FakeProviderServer, client: httpx.Client
) -> None:
    key = uuid.uuid4().hex
    first = resend(client, server, key).json()["id"]

    server.advance(24 * 3600 - 60)
    assert resend(client, server, key).json()["id"] == first
    server.advance(60)
    later = resend(client, server, key).json()["id"]

    assert later != first
    assert server.count_for_key(key) == 2
    assert server.requests_for_key(key) == 3 and server.replays_for_key(key) == 1


def test_resend_refuses_a_key_over_256_characters(
    server: FakeProviderServer, client: httpx.Client
) -> None:
    assert resend(client, server, "k" * 256).status_code == 200

    refused = resend(client, server, "k" * 257)

    assert refused.status_code == 400
    assert refused.json()["name"] == "invalid_idempotency_key"
    assert server.count_for_key("k" * 257) == 0


def test_resend_a_retry_during_a_stall_is_refused_as_concurrent(
    server: FakeProviderServer,
) -> None:
    # Given a send that Resend stores and then holds (the client gives up after 0.3 s)
    server.set_faults("resend", ["stall:1.5"])
    key = uuid.uuid4().hex
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(0.3, connect=2.0)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            resend(impatient, server, key)

        # When the run retries with the same key while the first request still runs
        during = resend(impatient, server, key)

        # Then it is told the key is in flight, and no second message exists
        assert during.status_code == 409
        assert during.json()["name"] == "concurrent_idempotent_requests"

        # And once the stall is over, the same key returns the first message
        server.wait_idle()
        after = resend(impatient, server, key)
    (stored,) = server.messages("resend")
    assert after.json()["id"] == stored.id
    assert server.requests_for_key(key) == 3 and server.replays_for_key(key) == 1


@pytest.mark.parametrize("provider", ["resend", "postmark"])
def test_a_stored_then_5xx_fault_keeps_the_message(
    server: FakeProviderServer, client: httpx.Client, provider: str
) -> None:
    server.set_faults(provider, ["stored:503"])
    key = uuid.uuid4().hex

    if provider == "resend":
        answer = resend(client, server, key)
        replay = resend(client, server, key)
        assert replay.status_code == 200 and replay.json()["id"] == server.messages()[0].id
    else:
        answer = postmark(client, server, {"idempotency_key": key})

    assert answer.status_code == 503
    assert server.count_for_key(key) == 1
    assert server.stats()["responses"][provider]["stored_503"] == 1


def test_random_stored_then_5xx_and_dropped_faults_keep_the_message(
    server: FakeProviderServer, client: httpx.Client
) -> None:
    # The soak's random faults that leave the sender not knowing: stored, then a 503 or a
    # closed connection
    server.set_faults("postmark", p_stored_5xx=0.5, p_drop=0.5, seed=7)
    answers = []
    for _ in range(6):
        try:
            answers.append(postmark(client, server, {"idempotency_key": uuid.uuid4().hex}))
        except httpx.TransportError:
            answers.append(None)

    assert len(server.messages("postmark")) == 6
    assert {a.status_code for a in answers if a is not None} == {503}
    assert None in answers


# ---------------------------------------------------------------- Postmark search and metadata


def test_postmark_search_sees_a_message_only_after_its_lag(
    server: FakeProviderServer, client: httpx.Client
) -> None:
    server.search_lag_seconds = 90
    key = uuid.uuid4().hex
    assert postmark(client, server, {"idempotency_key": key}).status_code == 200

    assert search(client, key).json()["TotalCount"] == 0
    server.advance(89)
    assert search(client, key).json()["TotalCount"] == 0
    server.advance(1)
    found = search(client, key).json()

    assert found["TotalCount"] == 1
    assert found["Messages"][0]["Metadata"]["idempotency_key"] == key
    assert server.lookups_for_key(key) == 3 and server.requests_for_key(key) == 1


def test_postmark_search_lag_defaults_to_zero(
    server: FakeProviderServer, client: httpx.Client
) -> None:
    key = uuid.uuid4().hex
    postmark(client, server, {"idempotency_key": key})

    assert search(client, key).json()["TotalCount"] == 1


@pytest.mark.parametrize("missing", ["count", "offset"])
def test_postmark_search_requires_count_and_offset(
    server: FakeProviderServer, client: httpx.Client, missing: str
) -> None:
    answer = search(client, "any", **{missing: ""})

    assert answer.status_code == 422


@pytest.mark.parametrize(
    "metadata",
    [
        {"n" * 21: "v"},
        {"name": "v" * 81},
        {f"field{i}": "v" for i in range(11)},
    ],
    ids=["name-over-20", "value-over-80", "over-10-fields"],
)
def test_postmark_refuses_metadata_over_its_limits(
    server: FakeProviderServer, client: httpx.Client, metadata: dict[str, str]
) -> None:
    answer = postmark(client, server, metadata)

    assert answer.status_code == 422 and answer.json()["ErrorCode"] == 300
    assert server.messages() == []


def test_postmark_accepts_metadata_at_its_limits(
    server: FakeProviderServer, client: httpx.Client
) -> None:
    metadata = {f"f{i}".ljust(20, "x"): "v" * 80 for i in range(10)}

    assert postmark(client, server, metadata).status_code == 200


# ---------------------------------------------------------------- the admin API


def test_admin_api_moves_the_clock_sets_the_lag_and_reports_counts_per_key(
    server: FakeProviderServer, client: httpx.Client
) -> None:
    admin = AdminClient(server.url)
    key = uuid.uuid4().hex
    try:
        admin.set_search_lag(30)
        postmark(client, server, {"idempotency_key": key})
        assert search(client, key).json()["TotalCount"] == 0
        admin.advance(30)
        assert search(client, key).json()["TotalCount"] == 1
        resend(client, server, key)
        resend(client, server, key)

        counts = admin.key_counts()
        assert counts["requests"][key] == 3  # one Postmark send, two Resend sends
        assert counts["replays"][key] == 1 and counts["lookups"][key] == 2
        assert admin.key_counts("postmark")["requests"][key] == 1
        assert admin.messages()["requests_by_key"][key] == 3
    finally:
        admin.close()


def test_set_now_moves_the_clock_and_reset_brings_it_back(server: FakeProviderServer) -> None:
    later = datetime(2031, 6, 1, tzinfo=UTC)

    server.set_now(later)
    assert abs((server.state.now() - later).total_seconds()) < 5
    server.reset()

    assert abs((server.state.now() - datetime.now(UTC)).total_seconds()) < 5


def test_concurrent_requests_with_one_key_are_all_counted() -> None:
    with FakeProviderServer(latency_ms=300) as server:
        key = uuid.uuid4().hex
        barrier = threading.Barrier(3)
        answers: list[int] = []

        def attempt() -> None:
            with httpx.Client(base_url=server.url, timeout=5.0) as http:
                barrier.wait()
                answers.append(resend(http, server, key).status_code)

        threads = [threading.Thread(target=attempt) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert sorted(answers) == [200, 409, 409]
    assert server.requests_for_key(key) == 3 and server.count_for_key(key) == 1
