"""After sent, end to end on PostgreSQL + Redis: a real consumer sends through the fake Resend,
which posts its (signed, duplicated, reordered) webhooks to the real receiver — `capsule
webhooks serve` in its own process — over HTTP; the consumer processes them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from benchmarks.fakes.provider_server import FakeProviderServer
from benchmarks.harness import BIN, ROOT, Consumer, System, wait_for
from core.bootstrap import App, build_app
from core.config import Settings
from core.db import session_scope
from core.deliveries import create_user
from core.models import Delivery, Notification, Suppression, WebhookEvent
from core.policy import utcnow
from core.queries import delivery
from tasks.delivery import HueyEnqueuer
from tasks.queue import make_huey
from tests.conftest import KEY_ENTRY, truncate_all
from tests.fakes.provider_webhooks import WebhookSender
from tests.fakes.webhook_receiver import OTHER_SECRET, TEST_SECRET, svix_headers
from tests.integration.scenario_world import schedule_letter

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

DEAD = "gone@old-isp.example"
OWNER = "owner@example.com"


@dataclass
class World:
    system: System
    app: App
    server: FakeProviderServer
    sender: WebhookSender
    receiver_url: str
    user_id: int

    def schedule(self, to: str) -> uuid.UUID:
        now = utcnow()
        return schedule_letter(
            self.app,
            self.user_id,
            now + timedelta(seconds=1),
            now=now,
            recipient=to,
            body="Dear future me",
        )

    def status(self, delivery_id: uuid.UUID) -> str:
        with session_scope(self.app.session_factory) as s:
            return str(s.scalar(select(Delivery.status).where(Delivery.id == delivery_id)))

    def count(self, model: object, *where: object) -> int:
        with session_scope(self.app.session_factory) as s:
            query = select(func.count()).select_from(model).where(*where)  # type: ignore[arg-type]
            return int(s.scalar(query) or 0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def world(
    pg_database: str,
    redis_prefix: str,
    redis_url: str,
    provider_server: FakeProviderServer,
    tmp_path: Path,
    keyring: object,
) -> Iterator[World]:
    engine = create_engine(pg_database)
    truncate_all(engine)
    engine.dispose()
    port = free_port()
    system = System(
        var_dir=tmp_path / "var",
        database_url=pg_database,
        key_entry=KEY_ENTRY,
        redis_url=redis_url,
        huey_name=redis_prefix,
        settings={
            "CAPSULE_PROVIDERS": "resend",
            "CAPSULE_RESEND_API_KEY": provider_server.resend_api_key,
            "CAPSULE_RESEND_BASE_URL": provider_server.url,
            "CAPSULE_PROVIDER_RATE_PER_SECOND": "1000",
            "CAPSULE_RESEND_WEBHOOK_SECRETS": TEST_SECRET,
        },
    )
    settings = Settings.from_env(system.env)
    app = build_app(settings, HueyEnqueuer(make_huey(settings)), keyring=keyring)  # type: ignore[arg-type]
    receiver_url = f"http://127.0.0.1:{port}"
    sender = WebhookSender(
        receiver_url, resend_secret=TEST_SECRET, dead={DEAD}, duplicates=2, reorder=True, auto=False
    )
    provider_server.state.webhooks = sender
    log = (tmp_path / "receiver.log").open("wb")
    receiver = subprocess.Popen(
        [str(BIN / "capsule"), "webhooks", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=system.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )

    def receiver_up() -> bool:
        try:
            return httpx.get(f"{receiver_url}/webhooks/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return receiver.poll() is not None  # stop waiting if it died

    consumer = None
    try:
        wait_for(receiver_up, timeout=30, what="the webhook receiver")
        assert receiver.poll() is None, (tmp_path / "receiver.log").read_text()
        consumer = Consumer(system, workers=2).start()
        with session_scope(app.session_factory) as s:
            user_id = create_user(s, OWNER, "Owner", utcnow(), 100).id
            s.commit()
        yield World(system, app, provider_server, sender, receiver_url, user_id)
    finally:
        if consumer is not None:
            consumer.kill()
        os.killpg(receiver.pid, signal.SIGTERM)
        receiver.wait(15)
        log.close()
        app.engine.dispose()


@pytest.mark.slow
def test_a_letter_to_a_dead_address_bounces_tells_its_owner_once_and_holds_the_next(
    world: World,
) -> None:
    # Given a letter to an address the provider will report dead
    first = world.schedule(DEAD)
    wait_for(lambda: world.status(first) == "sent", timeout=60, what="the letter sent")

    # When the provider's webhooks arrive (hard bounce first, then a soft one: reordered; each
    # twice: duplicated), over HTTP to the receiver, processed by the consumer
    assert world.sender.flush() == 4
    wait_for(lambda: world.status(first) == "bounced", timeout=60, what="the bounce applied")
    wait_for(
        lambda: world.count(Notification, Notification.status == "sent") == 1,
        timeout=60,
        what="the owner's notice sent",
    )

    # Then `capsule status` says bounced (hard), with the provider's events
    shown = world.system.capsule("status", str(first))
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert (status["status"], status["bounce_kind"]) == ("bounced", "hard")
    assert sorted(e["bounce_kind"] for e in status["provider_events"]) == ["hard", "soft"]
    # and so does the console's detail data
    with session_scope(world.app.session_factory) as s:
        detail = delivery.delivery_detail(s, first)
    assert detail is not None and detail.status == "bounced"
    assert len(detail.provider_events) == 2  # two events, each stored once despite duplicates
    assert world.count(WebhookEvent) == 2
    assert world.count(Suppression, Suppression.address == DEAD) == 1
    assert world.sender.answers[200] == 4

    # The owner got exactly one notice; a redelivery of every event changes nothing
    notices = [m for m in world.server.messages("resend") if OWNER in m.to]
    assert len(notices) == 1 and "bounced" in notices[0].subject
    world.sender.flush()  # the notice's own "delivered"
    # the letter's facts again, as new events (new ids): the state does not move
    world.sender.message_stored(world.server.messages("resend")[0])
    world.sender.flush()
    wait_for(
        lambda: world.count(WebhookEvent, WebhookEvent.processed_at.is_(None)) == 0,
        timeout=30,
        what="every event processed",
    )
    assert world.status(first) == "bounced"
    assert world.count(Notification) == 1
    assert len([m for m in world.server.messages("resend") if OWNER in m.to]) == 1

    # And the next letter to that address is held, never sent
    second = world.schedule(DEAD)
    wait_for(lambda: world.status(second) == "held", timeout=60, what="the second letter held")
    with session_scope(world.app.session_factory) as s:
        key = s.scalar(select(Delivery.idempotency_key).where(Delivery.id == second))
    assert world.server.requests_for_key(str(key)) == 0

    # A request signed with the wrong secret, a tampered body or a stale stamp is refused
    body = b'{"type": "email.delivered", "data": {"email_id": "x", "to": ["a@b.example"]}}'
    url = f"{world.receiver_url}/webhooks/resend"
    stale = utcnow() - timedelta(minutes=10)
    stored = world.count(WebhookEvent)
    for headers, content in (
        (svix_headers(OTHER_SECRET, "msg_w", body), body),
        (svix_headers(TEST_SECRET, "msg_t", body), body.replace(b"x", b"y")),
        (svix_headers(TEST_SECRET, "msg_s", body, stale), body),
    ):
        assert httpx.post(url, content=content, headers=headers).status_code == 401
    assert world.count(WebhookEvent) == stored
