"""The webhook receiver over real HTTP (uvicorn), on SQLite and PostgreSQL: what it stores, and
what it refuses without writing anything but a counter."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from benchmarks.fakes.provider_server import StoredMessage
from core import webhooks
from core.bootstrap import App, build_app
from core.db import make_engine, session_scope
from core.models import WebhookEvent
from tests.conftest import RecordingEnqueuer
from tests.fakes.provider_webhooks import WebhookSender
from tests.fakes.webhook_receiver import (
    OTHER_SECRET,
    POSTMARK_PASSWORD,
    POSTMARK_USER,
    TEST_SECRET,
    ReceiverServer,
    svix_headers,
)


@pytest.fixture
def hook_app(app: App, enqueuer: RecordingEnqueuer) -> Iterator[App]:
    settings = app.settings.replace(
        resend_webhook_secrets=(OTHER_SECRET, TEST_SECRET),  # mid-rotation: either signs
        postmark_webhook_credentials=(f"{POSTMARK_USER}:{POSTMARK_PASSWORD}",),
        webhook_max_body_bytes=4096,
    )
    engine = make_engine(settings)
    yield build_app(settings, enqueuer, engine=engine, keyring=app.keyring)
    engine.dispose()


@pytest.fixture
def receiver(hook_app: App) -> Iterator[ReceiverServer]:
    with ReceiverServer(hook_app) as server:
        yield server


def stored(app: App) -> int:
    with session_scope(app.session_factory) as s:
        return int(s.scalar(select(func.count()).select_from(WebhookEvent)) or 0)


def bounce_body(message_id: str = "re-1") -> bytes:
    event = {
        "type": "email.bounced",
        "created_at": "2030-01-01T12:00:00Z",
        "data": {
            "email_id": message_id,
            "to": ["gone@old-isp.example"],
            "subject": "private",
            "bounce": {"type": "Permanent", "subType": "General", "message": "550"},
        },
    }
    return json.dumps(event).encode()


def post_resend(server: ReceiverServer, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.url}/webhooks/resend", content=body, headers=headers, timeout=10)


def test_a_signed_resend_event_is_stored_once_and_handed_on(
    hook_app: App, receiver: ReceiverServer
) -> None:
    body = bounce_body()
    first = post_resend(receiver, body, svix_headers(TEST_SECRET, "msg_a", body))
    # the provider's retry: same svix-id, a fresh timestamp and signature
    again = post_resend(receiver, body, svix_headers(TEST_SECRET, "msg_a", body))

    assert (first.status_code, first.json()["duplicate"]) == (200, False)
    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    assert stored(hook_app) == 1
    assert len(receiver.stored) == 1  # processing handed on once


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong_secret", "bad_signature"),
        ("tampered_body", "bad_signature"),
        ("stale_timestamp", "stale_timestamp"),
        ("future_timestamp", "stale_timestamp"),
        ("unsigned", "unsigned"),
        ("garbled_signature", "malformed_signature"),
    ],
)
def test_a_resend_request_that_is_not_signed_right_is_refused_and_writes_nothing(
    hook_app: App, receiver: ReceiverServer, case: str, reason: str
) -> None:
    body = bounce_body()
    now = datetime.now(UTC)
    headers = {
        "wrong_secret": lambda: svix_headers(
            "whsec_" + base64.b64encode(b"x" * 24).decode(), "m", body
        ),
        "tampered_body": lambda: svix_headers(TEST_SECRET, "m", bounce_body("re-other")),
        "stale_timestamp": lambda: svix_headers(TEST_SECRET, "m", body, now - timedelta(minutes=6)),
        "future_timestamp": lambda: svix_headers(
            TEST_SECRET, "m", body, now + timedelta(minutes=6)
        ),
        "unsigned": lambda: {"content-type": "application/json"},
        "garbled_signature": lambda: {
            **svix_headers(TEST_SECRET, "m", body),
            "svix-signature": "v1-no-comma",
        },
    }[case]()

    response = post_resend(receiver, body, headers)

    assert response.status_code == 401
    assert stored(hook_app) == 0 and receiver.stored == []
    assert receiver.counters.snapshot() == {f"resend:{reason}": 1}


def test_a_signed_body_that_is_not_an_event_is_refused(
    hook_app: App, receiver: ReceiverServer
) -> None:
    for body in (b"not json", b'{"type": "email.bounced"}', b"[1, 2]"):
        response = post_resend(receiver, body, svix_headers(TEST_SECRET, "m", body))
        assert response.status_code == 400
    big = b'{"pad": "' + b"x" * 5000 + b'"}'
    assert post_resend(receiver, big, svix_headers(TEST_SECRET, "m", big)).status_code == 413
    assert stored(hook_app) == 0


def postmark_bounce() -> dict[str, Any]:
    return {
        "RecordType": "Bounce",
        "ID": 4242,
        "Type": "HardBounce",
        "MessageID": "pm-1",
        "Email": "gone@old-isp.example",
        "BouncedAt": "2030-01-01T12:00:00.1234567Z",
        "Subject": "private",
    }


def test_postmark_needs_its_basic_auth_and_an_allowed_source(
    hook_app: App, receiver: ReceiverServer
) -> None:
    url = f"{receiver.url}/webhooks/postmark"
    body = postmark_bounce()

    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, auth=(POSTMARK_USER, "wrong")).status_code == 401
    assert stored(hook_app) == 0

    ok = httpx.post(url, json=body, auth=(POSTMARK_USER, POSTMARK_PASSWORD))
    assert ok.status_code == 200 and stored(hook_app) == 1
    counts = receiver.counters.snapshot()
    assert counts["postmark:unauthenticated"] == 1 and counts["postmark:bad_credentials"] == 1


def test_postmark_from_a_source_outside_the_allowlist_is_refused(hook_app: App) -> None:
    settings = hook_app.settings.replace(postmark_webhook_allowed_ips=("10.9.0.0/16",))
    app = dataclasses.replace(hook_app, settings=settings)
    with ReceiverServer(app) as server:
        response = httpx.post(
            f"{server.url}/webhooks/postmark",
            json=postmark_bounce(),
            auth=(POSTMARK_USER, POSTMARK_PASSWORD),
        )
    assert response.status_code == 403
    assert stored(hook_app) == 0


@pytest.mark.parametrize("provider", ["resend", "postmark"])
def test_the_fake_providers_webhooks_reach_the_receiver_and_suppress_what_they_should(
    hook_app: App, receiver: ReceiverServer, provider: str
) -> None:
    # Given the fake's sender, duplicating and reordering every event
    sender = WebhookSender(
        receiver.url,
        resend_secret=TEST_SECRET,
        postmark_auth=(POSTMARK_USER, POSTMARK_PASSWORD),
        dead={"dead@x.example"},
        complaining={"spam@x.example"},
        duplicates=2,
        reorder=True,
        auto=False,
    )
    sender.message_stored(
        StoredMessage(
            provider=provider,
            id=f"{provider}-m1",
            idempotency_key="k",
            sender="letters@capsule.example",
            to=["dead@x.example", "spam@x.example", "ok@x.example"],
            subject="SECRET SUBJECT",
            text="SECRET BODY",
            tag="letter",
        )
    )

    # When they are sent: 5 events (2 dead, 2 complaining, 1 ok), each twice
    assert sender.flush() == 10

    # Then every request was accepted, each event stored once, and processing them puts the
    # dead and the complaining address on the list (and nothing of the letter is kept)
    assert sender.answers == {200: 10}
    assert stored(hook_app) == 5
    for event_id in receiver.stored:
        webhooks.process_and_notify(hook_app, event_id, now=datetime.now(UTC))
    with session_scope(hook_app.session_factory) as s:
        listed = {(r["address"], r["reason"]) for r in webhooks.list_suppressions(s)}
        payloads = [repr(p) for p in s.scalars(select(WebhookEvent.payload))]
    assert listed == {("dead@x.example", "hard_bounce"), ("spam@x.example", "complaint")}
    assert not any("SECRET" in p for p in payloads)
