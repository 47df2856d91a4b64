"""What every benchmark shares: the machine's description, a fresh deployment to run against
(its own PostgreSQL database, Redis key prefix and var directory), the fake provider server as
its own process, fast seeding of rows that look exactly like `schedule_delivery`'s, tables and
JSON results.

A `Bench` owns only what it created: the database `capsule_bench_<random>` (dropped at the end),
the Redis keys under its prefix in its own db number (deleted at the end; never FLUSHDB), the
consumer processes it started and the provider server process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, func, insert, select, text, update
from sqlalchemy.engine import make_url

from benchmarks.fakes.provider_server import AdminClient
from benchmarks.harness import Consumer, System, wait_for
from core.bootstrap import App, build_app
from core.config import Settings
from core.crypto import Keyring, generate_key_entry
from core.db import session_scope
from core.deliveries import create_user
from core.migrate import upgrade
from core.models import AuditEvent, CreditEntry, Delivery, Letter, Status
from core.policy import utcnow
from tasks.delivery import HueyEnqueuer
from tasks.queue import make_huey

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PYTHON = sys.executable
PG_ADMIN_URL = os.environ.get(
    "CAPSULE_BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE = os.environ.get("CAPSULE_BENCH_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("CAPSULE_BENCH_REDIS_DB", "12"))
# The production consumer flags (README "Running consumers in production"), one process per core.
CONSUMER_WORKERS = 4
PRODUCTION_FLAGS = ("--graceful-signal", "TERM", "--shutdown-timeout", "45")


# ---------------------------------------------------------------- the machine


def load() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """nproc, memory, CPU model, and the versions the figures depend on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    import huey

    pg_version = "unknown"
    with contextlib.suppress(Exception):
        engine = create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            pg_version = str(conn.scalar(text("show server_version")))
        engine.dispose()
    redis_version = "unknown"
    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(REDIS_BASE)
        redis_version = str(client.info("server")["redis_version"])
        client.close()
    return {
        "nproc": os.cpu_count(),
        "memory": memory,
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "redis": redis_version,
        "huey": huey.__version__,
        "load_at_start": load(),
    }


# ---------------------------------------------------------------- output


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n{title}")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |")
    out = "\n".join(lines)
    print(out, flush=True)
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 0.01 and value else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def write_results(name: str, data: dict[str, Any]) -> Path:
    """benchmarks/results/<name>-<UTC stamp>.json"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"\nresults: {path.relative_to(ROOT)}", flush=True)
    return path


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between order statistics (numpy's default, PostgreSQL's
    percentile_cont)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    h = (len(ordered) - 1) * p
    low = math.floor(h)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (h - low) * (ordered[high] - ordered[low])


def base_parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


# ---------------------------------------------------------------- the fake provider


class ProviderProcess:
    """`python -m benchmarks.fakes.provider_server` in its own process, driven over its admin API."""

    def __init__(
        self, *, latency_ms: float = 0.0, log_path: Path | None = None, quota: float = 0.0
    ) -> None:
        self.log_path = log_path
        args = [PYTHON, "-m", "benchmarks.fakes.provider_server", "--port", "0"]
        args += ["--latency-ms", str(latency_ms), "--quota", str(quota)]
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"provider server did not start: {self.url!r}")
        self.admin = AdminClient(self.url, timeout=60)

    def counts_by_key(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.admin.messages()["counts_by_key"].items()}

    def counts_by_delivery(self) -> dict[str, int]:
        """Letters stored per delivery id: "sent once" whether a letter went alone (under its
        own key) or in a batch (under the batch's key)."""
        return {str(k): int(v) for k, v in self.admin.messages()["counts_by_delivery"].items()}

    def stop(self) -> None:
        self.admin.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def provider_env(url: str, **extra: str) -> dict[str, str]:
    """Resend first, Postmark second, both on the fake server."""
    return {
        "CAPSULE_PROVIDERS": "resend,postmark",
        "CAPSULE_RESEND_API_KEY": "re_test_key",
        "CAPSULE_RESEND_BASE_URL": url,
        "CAPSULE_POSTMARK_SERVER_TOKEN": "pm-test-token",
        "CAPSULE_POSTMARK_BASE_URL": url,
        **extra,
    }


# ---------------------------------------------------------------- one deployment


@dataclass
class Bench:
    """A fresh deployment: database, Redis prefix, var dir, an App in this process, consumers."""

    name: str
    settings: dict[str, str] = field(default_factory=dict)
    provider: ProviderProcess | None = None
    keep_database: bool = False

    def __post_init__(self) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self.database = f"capsule_bench_{self.run_id}"
        self.prefix = f"capsule_bench_{self.run_id}"  # Huey keeps only [A-Za-z0-9_]
        self.redis_url = f"{REDIS_BASE}/{REDIS_DB}"
        self.var_dir = RESULTS / "runs" / f"{self.name}-{self.run_id}"
        self.consumers: list[Consumer] = []
        self._admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.database}"'))
        self.database_url = str(
            make_url(PG_ADMIN_URL).set(database=self.database).render_as_string(False)
        )
        engine = create_engine(self.database_url)
        upgrade(engine)
        engine.dispose()
        self.key_entry = generate_key_entry("bench1")
        self.redis = redis.Redis.from_url(self.redis_url)
        self.redis.ping()
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.system = System(
            var_dir=self.var_dir,
            database_url=self.database_url,
            key_entry=self.key_entry,
            redis_url=self.redis_url,
            huey_name=self.prefix,
            settings=dict(self.settings),
        )
        self.app = self._build_app()
        self.user_id = 0

    def _build_app(self) -> App:
        settings = Settings.from_env(self.system.env)
        return build_app(
            settings,
            HueyEnqueuer(make_huey(settings)),
            keyring=Keyring.parse(self.key_entry),
            redis_client=redis.Redis.from_url(self.redis_url),
        )

    @property
    def enqueuer(self) -> HueyEnqueuer:
        enqueuer = self.app.enqueuer
        assert isinstance(enqueuer, HueyEnqueuer)
        return enqueuer

    def reconfigure(self, **env: str) -> None:
        self.system.settings.update(env)
        self.app.engine.dispose()
        self.app = self._build_app()

    # consumers

    def consumer(
        self, *, workers: int = CONSUMER_WORKERS, target: str = "huey_app.huey", start: bool = True
    ) -> Consumer:
        consumer = Consumer(
            self.system,
            workers=workers,
            flags=PRODUCTION_FLAGS,
            log=self.var_dir / f"consumer-{len(self.consumers)}.log",
        )
        consumer.args[1] = target
        self.consumers.append(consumer)
        if start:
            consumer.start()
        return consumer

    # Redis

    def prefix_keys(self, prefix: str | None = None) -> list[bytes]:
        return list(self.redis.scan_iter(match=f"*{prefix or self.prefix}*", count=1000))

    def wipe_broker(self, prefix: str | None = None) -> int:
        """Delete every key of our prefix: what a FLUSHALL would take from us."""
        keys = self.prefix_keys(prefix)
        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start : start + 1000])
        return len(keys)

    def redis_bytes(self, prefix: str | None = None) -> tuple[int, int]:
        """(keys, bytes) of our prefix by MEMORY USAGE (exact: SAMPLES 0)."""
        keys = self.prefix_keys(prefix)
        total = 0
        for key in keys:
            total += int(self.redis.memory_usage(key, samples=0) or 0)
        return len(keys), total

    # database

    def make_user(self, credits: int = 1) -> int:
        with session_scope(self.app.session_factory) as session:
            self.user_id = create_user(
                session, f"owner-{self.run_id}@example.com", "Bench owner", utcnow(), credits
            ).id
            session.commit()
        return self.user_id

    def status_counts(self) -> dict[str, int]:
        with session_scope(self.app.session_factory) as session:
            rows = session.execute(select(Delivery.status, func.count()).group_by(Delivery.status))
            return {str(s): int(n) for s, n in rows}

    def count(self, status: str) -> int:
        return self.status_counts().get(status, 0)

    def sent_times(self) -> list[tuple[datetime, datetime]]:
        """(deliver_at, sent_at) of every sent row."""
        with session_scope(self.app.session_factory) as session:
            return [
                (d, s)
                for d, s in session.execute(
                    select(Delivery.deliver_at, Delivery.sent_at).where(
                        Delivery.status == Status.SENT
                    )
                )
            ]

    def idempotency_keys(self) -> dict[str, str]:
        """idempotency key → status, of every delivery."""
        with session_scope(self.app.session_factory) as session:
            return {
                str(k): str(s)
                for k, s in session.execute(select(Delivery.idempotency_key, Delivery.status))
            }

    def close(self) -> None:
        for consumer in self.consumers:
            with contextlib.suppress(Exception):
                consumer.kill()
        with contextlib.suppress(Exception):
            self.wipe_broker()
        with contextlib.suppress(Exception):
            self.redis.close()
        with contextlib.suppress(Exception):
            self.app.engine.dispose()
        if not self.keep_database:
            for attempt in range(10):  # the server may just have restarted (chaos)
                try:
                    with self._admin.connect() as conn:
                        conn.execute(
                            text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
                        )
                    break
                except Exception as exc:
                    self._admin.dispose()
                    if attempt == 9:
                        print(f"could not drop {self.database}: {exc}", flush=True)
                    time.sleep(2)
        self._admin.dispose()

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def provider_server(latency_ms: float = 0.0, quota: float = 0.0) -> Iterator[ProviderProcess]:
    server = ProviderProcess(latency_ms=latency_ms, quota=quota)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- seeding


@dataclass(frozen=True)
class Seeded:
    delivery_id: uuid.UUID
    deliver_at: datetime
    idempotency_key: str


def seed_scheduled(
    app: App,
    user_id: int,
    dues: Sequence[datetime],
    *,
    now: datetime,
    actor: str = "bench",
    batch: int = 2000,
) -> list[Seeded]:
    """Rows exactly as `schedule_delivery` leaves them, in bulk.

    Per letter: a sealed `letters` row (AES-GCM under the active key, the letter id as
    associated data), a `deliveries` row (scheduled, next_attempt_at = deliver_at, a fresh
    idempotency key, version 1), a credit reserve (-1) and a `delivery.scheduled` audit event.
    The owner is granted the credits first. No task is enqueued here: see `dispatch_all`.
    """
    keyring = app.keyring
    out: list[Seeded] = []
    with session_scope(app.session_factory) as session:
        from core import credits

        credits.grant(session, user_id, len(dues), now)
        session.commit()
    for start in range(0, len(dues), batch):
        letters, deliveries, ledger, events = [], [], [], []
        for i, due in enumerate(dues[start : start + batch], start):
            letter_id, delivery_id = uuid.uuid4(), uuid.uuid4()
            sealed = keyring.seal(letter_id, f"Letter {i}", f"Dear future me, number {i}.")
            key = uuid.uuid4().hex
            letters.append(
                {
                    "id": letter_id,
                    "user_id": user_id,
                    "key_id": sealed.key_id,
                    "subject_ciphertext": sealed.subject,
                    "body_ciphertext": sealed.body,
                    "created_at": now,
                }
            )
            deliveries.append(
                {
                    "id": delivery_id,
                    "letter_id": letter_id,
                    "user_id": user_id,
                    "recipient_email": f"future{i % 997}@example.com",
                    "status": Status.SCHEDULED.value,
                    "deliver_at": due,
                    "next_attempt_at": due,
                    "attempt_count": 0,
                    "round_attempts": 0,
                    "idempotency_key": key,
                    "version": 1,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            ledger.append(
                {
                    "user_id": user_id,
                    "delivery_id": delivery_id,
                    "amount": -1,
                    "reason": "reserve",
                    "created_at": now,
                }
            )
            events.append(
                {
                    "type": "delivery.scheduled",
                    "actor": actor,
                    "delivery_id": delivery_id,
                    "reason": None,
                    "data": {"deliver_at": due.isoformat()},
                    "created_at": now,
                }
            )
            out.append(Seeded(delivery_id, due, key))
        with session_scope(app.session_factory) as session:
            session.execute(insert(Letter), letters)
            session.execute(insert(Delivery), deliveries)
            session.execute(insert(CreditEntry), ledger)
            session.execute(insert(AuditEvent), events)
            session.commit()
    return out


def dispatch_all(
    app: App, rows: Sequence[Seeded], *, now: datetime, horizon_seconds: float | None = None
) -> int:
    """What `core.dispatch.dispatch` does per row, batched: enqueue the ETA task through the
    production HueyEnqueuer, then record task_id and dispatched_at on the row. Only rows due
    within the horizon get a task (the others are the dispatcher's). Returns the count."""
    horizon = app.settings.dispatch_horizon_seconds if horizon_seconds is None else horizon_seconds
    end = now + timedelta(seconds=horizon)
    done = 0
    pending: list[dict[str, Any]] = []
    for row in rows:
        if row.deliver_at > end:
            continue
        task_id = app.enqueuer.enqueue(row.delivery_id, row.deliver_at)
        pending.append({"id": row.delivery_id, "task_id": task_id, "dispatched_at": now})
        done += 1
        if len(pending) >= 2000:
            _record_dispatches(app, pending)
            pending = []
    if pending:
        _record_dispatches(app, pending)
    return done


def _record_dispatches(app: App, values: list[dict[str, Any]]) -> None:
    with session_scope(app.session_factory) as session:
        session.execute(update(Delivery), values)  # bulk UPDATE by primary key
        session.commit()


def spread(start: datetime, seconds: float, count: int, *, jitter: bool = False) -> list[datetime]:
    """`count` due times evenly over [start, start + seconds) (shuffled if jitter)."""
    step = seconds / max(count, 1)
    dues = [start + timedelta(seconds=i * step) for i in range(count)]
    if jitter:
        random.shuffle(dues)
    return dues


def wait_until(moment: datetime) -> None:
    delay = (moment - utcnow()).total_seconds()
    if delay > 0:
        time.sleep(delay)


def duplicates(counts: dict[str, int], keys: Iterable[str]) -> tuple[int, int, dict[str, int]]:
    """(messages beyond one per key, keys never sent, the duplicated keys) for these keys."""
    extra, missing, dupes = 0, 0, {}
    for key in keys:
        n = counts.get(key, 0)
        if n == 0:
            missing += 1
        elif n > 1:
            extra += n - 1
            dupes[key] = n
    return extra, missing, dupes


__all__ = [
    "Bench",
    "ProviderProcess",
    "Seeded",
    "base_parser",
    "dispatch_all",
    "duplicates",
    "load",
    "log",
    "machine",
    "percentile",
    "provider_env",
    "provider_server",
    "seed_scheduled",
    "spread",
    "table",
    "wait_for",
    "wait_until",
    "write_results",
]
