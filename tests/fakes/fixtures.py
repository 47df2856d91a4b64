"""Fixtures for the fake provider and SMTP servers (registered by tests/conftest.py).

provider_server      a started FakeProviderServer (Resend + Postmark), stopped after the test
smtp_server          a started FakeSmtpServer (aiosmtpd)
provider_client      an httpx.Client with short timeouts (connect 1 s, read 0.5 s)
email_factory        email_factory(**overrides) -> Email with a fresh idempotency key
closed_port          a localhost port nothing listens on (connection refused)
circuit_sessions     a session factory on a fresh SQLite file with the schema
ratelimit_redis      (redis client on db 15, a key prefix owned by this test)
webhook              an alert webhook + heartbeat URL that records what it gets (alert_webhook)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.fakes.provider_server import FakeProviderServer
from core.config import Settings
from core.db import SessionFactory, make_engine, make_session_factory
from core.models import Base
from core.providers.base import Email
from tests.fakes.alert_webhook import Webhook
from tests.fakes.smtp_server import FakeSmtpServer, free_port

RATELIMIT_REDIS_URL = os.environ.get("CAPSULE_TEST_RATELIMIT_REDIS", "redis://127.0.0.1:6379/15")
SHORT_TIMEOUT = httpx.Timeout(0.5, connect=1.0)


def make_email(**overrides: Any) -> Email:
    """An Email with a unique idempotency key; any field can be overridden."""
    key = uuid.uuid4().hex
    fields: dict[str, Any] = {
        "to": "future.me@example.com",
        "sender": "Capsule <letters@capsule.localhost>",
        "subject": "A letter from your past self",
        "text": "Dear future me,\nI hope the garden grew.\n",
        "idempotency_key": key,
        "tags": {"delivery_id": str(uuid.uuid4()), "kind": "letter"},
    }
    fields.update(overrides)
    return Email(**fields)


def fake_provider_settings(
    server: FakeProviderServer, tmp_path: Path, **overrides: Any
) -> Settings:
    """Settings whose Resend and Postmark point at the fake server, on SQLite in tmp_path."""
    values: dict[str, Any] = {
        "var_dir": str(tmp_path),
        "providers": ("resend", "postmark"),
        "resend_api_key": server.resend_api_key,
        "resend_base_url": server.url,
        "postmark_server_token": server.postmark_token,
        "postmark_base_url": server.url,
        "provider_connect_timeout": 1.0,
        "provider_read_timeout": 0.5,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def provider_server() -> Iterator[FakeProviderServer]:
    """The fake Resend + Postmark server on a free port; `.url`, `.set_faults()`, `.messages()`."""
    server = FakeProviderServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp_server() -> Iterator[FakeSmtpServer]:
    """An aiosmtpd server on a free port; `.host`, `.port`, `.messages`, `.fail_next()`."""
    server = FakeSmtpServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def provider_client() -> Iterator[httpx.Client]:
    """An HTTP client with timeouts short enough for stall tests."""
    with httpx.Client(timeout=SHORT_TIMEOUT) as client:
        yield client


@pytest.fixture
def email_factory() -> Callable[..., Email]:
    return make_email


@pytest.fixture
def closed_port() -> int:
    return free_port()


@pytest.fixture
def circuit_sessions(tmp_path: Path) -> Iterator[SessionFactory]:
    """A session factory on a fresh SQLite file holding the schema."""
    engine = make_engine(Settings(var_dir=str(tmp_path)))
    Base.metadata.create_all(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def ratelimit_redis() -> Iterator[tuple[Any, str]]:
    """A Redis client on the test db and a key prefix owned by this test; only its keys are
    deleted afterwards. Skips when Redis is down (fails under CI=true)."""
    import redis

    client = redis.Redis.from_url(RATELIMIT_REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        message = f"Redis is not reachable at {RATELIMIT_REDIS_URL}: {exc}"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    prefix = f"capsule-test-{uuid.uuid4().hex[:12]}"
    try:
        yield client, prefix
    finally:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    """An alert webhook and heartbeat URL on a free port; `.posts`, `.heartbeats`, `.answer()`."""
    hook = Webhook()
    yield hook
    hook.close()
