"""One deployment under test for the scenario tests: PostgreSQL, a Redis (the shared test server
or one a test starts and stops), the fake provider server, real consumers, and an App in the
test process that reaches the database under its own application_name, so that the consumers'
backends can be told apart from the test's own in pg_stat_activity.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, func, select, text

from benchmarks.fakes.provider_server import FakeProviderServer
from benchmarks.harness import Consumer, System, wait_for
from core.bootstrap import App, build_app
from core.config import Settings
from core.crypto import Keyring
from core.db import make_engine, session_scope
from core.deliveries import create_user, schedule_delivery
from core.models import Delivery
from core.policy import utcnow
from tasks.delivery import HueyEnqueuer
from tasks.queue import make_huey
from tests.conftest import KEY_ENTRY, PG_ADMIN_URL, truncate_all
from tests.fakes.smtp_server import free_port

TEST_APPLICATION = "capsule-scenario-test"
CONSUMER_APPLICATION = "capsule"  # what core.db.make_engine names every product connection
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def provider_env(server: FakeProviderServer, **extra: str) -> dict[str, str]:
    return {
        "CAPSULE_PROVIDERS": "resend,postmark",
        "CAPSULE_RESEND_API_KEY": server.resend_api_key,
        "CAPSULE_RESEND_BASE_URL": server.url,
        "CAPSULE_POSTMARK_SERVER_TOKEN": server.postmark_token,
        "CAPSULE_POSTMARK_BASE_URL": server.url,
        "CAPSULE_PROVIDER_RATE_PER_SECOND": "1000",
        "CAPSULE_CIRCUIT_FAILURE_THRESHOLD": "1000",
        **extra,
    }


@dataclass
class World:
    system: System
    app: App
    server: FakeProviderServer
    database: str  # the PostgreSQL database name
    consumers: list[Consumer] = field(default_factory=list)
    user_id: int = 0

    @classmethod
    def open(
        cls,
        pg_url: str,
        redis_url: str,
        huey_name: str,
        server: FakeProviderServer,
        var_dir: Path,
        keyring: Keyring,
        **env: str,
    ) -> World:
        engine = create_engine(pg_url)
        truncate_all(engine)
        engine.dispose()
        system = System(
            var_dir=var_dir,
            database_url=pg_url,
            key_entry=KEY_ENTRY,
            redis_url=redis_url,
            huey_name=huey_name,
            settings=provider_env(server, **env),
        )
        world = cls(system, _app(system, keyring), server, pg_url.rsplit("/", 1)[1])
        with session_scope(world.app.session_factory) as session:
            owner = create_user(session, "owner@example.com", "Owner", utcnow(), 100_000)
            world.user_id = owner.id
            session.commit()
        return world

    def close(self) -> None:
        for consumer in self.consumers:
            consumer.kill()
        self.app.engine.dispose()

    @property
    def queue(self) -> Any:
        return self.app.enqueuer.queue  # type: ignore[attr-defined]

    def consumer(self, **kwargs: Any) -> Consumer:
        consumer = Consumer(self.system, **kwargs).start()
        self.consumers.append(consumer)
        return consumer

    def schedule(self, at: datetime, now: datetime | None = None) -> uuid.UUID:
        """One letter due `at`. Scheduled "now" by default, or just before `at` when a busy
        machine took longer to schedule the earlier letters than the test allowed (the letter
        is then already due and goes at once, as it would have seconds later)."""
        if now is None:
            now = min(utcnow(), at - timedelta(milliseconds=1))
        return schedule_letter(self.app, self.user_id, at, now=now)

    def row(self, delivery_id: uuid.UUID) -> Delivery:
        with session_scope(self.app.session_factory) as session:
            found = session.get(Delivery, delivery_id)
            assert found is not None
            return found

    def rows(self) -> list[Delivery]:
        with session_scope(self.app.session_factory) as session:
            return list(session.scalars(select(Delivery)))

    def count(self, status: str) -> int:
        with session_scope(self.app.session_factory) as session:
            query = select(func.count()).select_from(Delivery).where(Delivery.status == status)
            return int(session.scalar(query) or 0)

    def requests(self, provider: str | None = None) -> int:
        """Send requests that reached the fake provider (all keys, replays included)."""
        counts = self.server.stats()["requests"]
        return int(counts.get(provider, 0) if provider else sum(counts.values()))

    def sent_once(self, delivery_id: uuid.UUID) -> bool:
        """Stored once at the provider, alone or in a batch (under the batch's key), and never
        a second send request under the letter's own key."""
        alone = self.server.count_for_key(self.row(delivery_id).idempotency_key)
        return len(self.server.messages_for_delivery(str(delivery_id))) == 1 and alone <= 1

    def wipe_broker(self) -> int:
        """Lose everything the broker held for this system (our keys only)."""
        import redis

        assert self.system.redis_url is not None
        with redis.Redis.from_url(self.system.redis_url) as client:
            keys = list(client.scan_iter(match=f"*{self.system.huey_name}*", count=1000))
            if keys:
                client.delete(*keys)
        return len(keys)

    def assert_each_sent_once(self, *, resent_at_most: int = 0) -> None:
        """Each letter reached the provider in one send request, counted at the fake.

        Stored messages are not enough: Resend answers a known key with the first message and
        stores nothing, so twins sending one letter would look like one. `resent_at_most`:
        how many letters may have had a second request with the same key (a run killed
        mid-send is re-run with its key; the fake replays it, as Resend does within 24 h).
        """
        keys = [r.idempotency_key for r in self.rows()]
        stored = {k: self.server.count_for_key(k) for k in keys}
        requests = {k: self.server.requests_for_key(k) for k in keys}
        replays = {k: self.server.replays_for_key(k) for k in keys}
        duplicates = {k: c for k, c in stored.items() if c > 1}
        missing = [k for k, c in stored.items() if c == 0]
        assert not duplicates, f"sent more than once: {duplicates}"
        assert not missing, f"never sent: {len(missing)}"
        resent = {k: n for k, n in requests.items() if n > 1}
        assert all(requests[k] - replays[k] == 1 for k in resent), f"resent: {resent}"
        assert len(resent) <= resent_at_most, f"{len(resent)} letters sent twice: {resent}"


def schedule_letter(
    app: App,
    user_id: int,
    at: datetime,
    *,
    now: datetime | None = None,
    recipient: str = "future@example.com",
    body: str | None = None,
) -> uuid.UUID:
    """Schedule one letter through core, as its owner; a unique body unless one is given."""
    return schedule_delivery(
        app,
        user_id=user_id,
        recipient=recipient,
        subject="To me",
        body=body or f"Dear future me {uuid.uuid4()}",
        deliver_at=at,
        now=now or utcnow(),
        actor="owner@example.com",
    ).delivery_id


def _app(system: System, keyring: Keyring) -> App:
    settings = Settings.from_env(system.env)
    engine = make_engine(
        settings, connect_args={"application_name": TEST_APPLICATION, "connect_timeout": 5}
    )
    return build_app(settings, HueyEnqueuer(make_huey(settings)), engine=engine, keyring=keyring)


# ---------------------------------------------------------------- PostgreSQL, from outside


class Postgres:
    """An admin connection that watches and cuts the consumers' backends of one database."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.admin: Engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def close(self) -> None:
        self.admin.dispose()

    def consumer_backends(self, *, waiting_on_lock: bool = False) -> list[int]:
        query = (
            "SELECT pid FROM pg_stat_activity WHERE datname = :db AND application_name = :app"
            + (" AND wait_event_type = 'Lock'" if waiting_on_lock else "")
        )
        with self.admin.connect() as conn:
            rows = conn.execute(text(query), {"db": self.database, "app": CONSUMER_APPLICATION})
            return [int(pid) for (pid,) in rows]

    def terminate(self, pids: list[int]) -> int:
        with self.admin.connect() as conn:
            done = conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest(:p) pid"
                ),
                {"p": pids},
            )
            return int(done.scalar_one())


# ---------------------------------------------------------------- a Redis of our own


class RedisServer:
    """A redis-server on a free port with no persistence, in its own directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import redis

        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
                *("--logfile", str(self.directory / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(answers, timeout=20, interval=0.05, what="redis-server to answer")
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None
