"""Chaos soak: about 5,000 deliveries due over about three minutes while consumers are
SIGKILLed at random, the broker loses everything once, PostgreSQL restarts once and the
providers misbehave; then a drain; then the count. Exits 1 unless no letter was lost and none
was sent twice.

    consumers   2 × `huey_consumer huey_app.huey -w 4 -k thread --graceful-signal TERM
                --shutdown-timeout 45`; every few seconds (uniform --kill-every) one of them,
                at random, is SIGKILLed and restarted after 0-3 s
    broker      once (--wipe-at s after the first due time) every key of our prefix is deleted:
                what FLUSHALL takes from us
    PostgreSQL  once (--pg-at s): `pg_ctlcluster --skip-systemctl-redirect <ver> main restart`
                and wait for pg_isready (--pg-restart, the default; it restarts the SHARED server,
                every other client is disconnected too), or with --no-pg-restart every
                connection to our own database is ended with pg_terminate_backend
    providers   the fake Resend + Postmark server: 10 % 503, 5 % accept-then-stall (5 s), 2 % 429
                with Retry-After, on both; the client's read timeout is 2 s, so a stall is an
                ambiguous outcome ("maybe sent")
    settings    CAPSULE_LEASE_SECONDS=30, CAPSULE_GRACE_SECONDS=15, CAPSULE_PROVIDER_READ_TIMEOUT=2,
                CAPSULE_BACKOFF_BASE_SECONDS=5, CAPSULE_BACKOFF_MAX_SECONDS=60,
                CAPSULE_DISPATCH_HORIZON_SECONDS=120 (so the dispatcher, not only the seeding,
                puts tasks in Redis); everything else at its default (rate limit 50/s per
                provider shared through Redis, circuit breaker 5 failures / 60 s, 5 attempts)
    drain       after the last due time the chaos stops, both consumers run, and the soak waits
                until every row is sent or failed (or --drain-timeout)

    lost        rows neither sent nor failed after the drain
    duplicates  messages at the fake provider for one letter beyond the first (found by its key,
                or by its delivery_id when it went in a batch under the batch's key)
"""

from __future__ import annotations

import argparse
import random
import subprocess
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select, text

from benchmarks.common import (
    Bench,
    base_parser,
    dispatch_all,
    load,
    log,
    machine,
    provider_env,
    provider_server,
    seed_scheduled,
    spread,
    table,
    write_results,
)
from core.db import session_scope
from core.models import AuditEvent, Delivery, DeliveryAttempt, ReconcilerRun, Status
from core.policy import utcnow

SOAK_SETTINGS = {
    "CAPSULE_LEASE_SECONDS": "30",
    "CAPSULE_GRACE_SECONDS": "15",
    "CAPSULE_PROVIDER_READ_TIMEOUT": "2",
    "CAPSULE_BACKOFF_BASE_SECONDS": "5",
    "CAPSULE_BACKOFF_MAX_SECONDS": "60",
    "CAPSULE_DISPATCH_HORIZON_SECONDS": "120",
}
# Per provider request: refused before storing (503, 429), or stored and then a stall past the
# read timeout, a dropped connection or a 503 (`--stored-5xx`). The sender cannot tell a 503
# before storing from one after, so every 5xx pins the letter to its provider (docs/providers.md).
FAULTS = {
    "p_5xx": 0.10,
    "p_stall": 0.05,
    "p_429": 0.02,
    "p_drop": 0.03,
    "stall_seconds": 5.0,
}


def _retrying(fn: Any, what: str, attempts: int = 60) -> Any:
    """Our own reads must survive the PostgreSQL restart too."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1:
                raise
            log(f"{what}: {type(exc).__name__}; retrying")
            time.sleep(1)
    return None


def restart_postgresql() -> float:
    """Restart the cluster (the shared server) and wait until it accepts connections."""
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    t0 = time.monotonic()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        timeout=120,
    )
    while (
        subprocess.run(
            ["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], check=False, timeout=10
        ).returncode
        != 0
    ):
        time.sleep(0.2)
    return time.monotonic() - t0


def _count_activity(admin_url: str, sql: str, **params: str) -> int:
    """A count over pg_stat_activity, from the admin connection (never counting itself)."""
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        n = conn.execute(text(sql + " AND pid <> pg_backend_pid()"), params).scalar()
    engine.dispose()
    return int(n or 0)


def terminate_backends(database: str, admin_url: str) -> int:
    """End every connection to our database (and only ours)."""
    return _count_activity(
        admin_url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :name",
        name=database,
    )


def other_clients(admin_url: str, ours: str) -> int:
    return _count_activity(
        admin_url,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "AND datname IS DISTINCT FROM :ours",
        ours=ours,
    )


def soak(args: Any) -> dict[str, Any]:
    rng = random.Random(args.seed)
    events: list[dict[str, Any]] = []

    def event(kind: str, **data: Any) -> None:
        events.append({"at": utcnow().isoformat(), "kind": kind, **data})
        log(f"{kind} {data if data else ''}")

    with provider_server(quota=args.quota) as server:
        env = provider_env(
            server.url, **SOAK_SETTINGS, CAPSULE_PROVIDER_RATE_PER_SECOND=str(args.rate)
        )
        with Bench("chaos", settings=env, provider=server, keep_database=args.keep) as bench:
            bench.make_user()
            bench.enqueuer.set_marker()
            server.admin.set_faults("all", seed=args.seed, p_stored_5xx=args.stored_5xx, **FAULTS)
            consumers = [bench.consumer() for _ in range(args.consumers)]
            now = utcnow()
            first_due = now + timedelta(seconds=args.lead)
            dues = spread(first_due, args.seconds, args.count)
            rows = seed_scheduled(bench.app, bench.user_id, dues, now=now)
            dispatched = dispatch_all(bench.app, rows, now=now)
            event("seeded", count=len(rows), dispatched_now=dispatched, first_due=str(first_due))

            # the chaos timeline, relative to the first due time
            end = first_due + timedelta(seconds=args.seconds)
            wipe_at = first_due + timedelta(seconds=args.wipe_at)
            pg_at = first_due + timedelta(seconds=args.pg_at)
            next_kill = first_due + timedelta(seconds=rng.uniform(*args.kill_every))
            restarts: list[tuple[datetime, Any]] = []
            wiped = pg_done = False
            while utcnow() < end:
                moment = utcnow()
                for when, consumer in list(restarts):
                    if moment >= when:
                        consumer.start()
                        restarts.remove((when, consumer))
                        event("restart", consumer=consumers.index(consumer))
                if moment >= next_kill:
                    alive = [c for c in consumers if c.alive]
                    if alive:
                        victim = rng.choice(alive)
                        victim.kill()
                        delay = rng.uniform(0, 3)
                        restarts.append((moment + timedelta(seconds=delay), victim))
                        event("sigkill", consumer=consumers.index(victim))
                    next_kill = moment + timedelta(seconds=rng.uniform(*args.kill_every))
                if not wiped and moment >= wipe_at:
                    wiped = True
                    storage = bench.enqueuer.queue.storage
                    tasks = int(bench.redis.llen(storage.queue_key)) + int(
                        bench.redis.zcard(storage.schedule_key)
                    )
                    event("broker wipe", keys=bench.wipe_broker(), tasks_lost=tasks)
                if not pg_done and moment >= pg_at:
                    pg_done = True
                    if args.pg_restart:
                        others = other_clients(_admin_url(), bench.database)
                        seconds = restart_postgresql()
                        event(
                            "postgresql restart",
                            seconds=round(seconds, 1),
                            other_clients_disconnected=others,
                        )
                    else:
                        ended = terminate_backends(bench.database, _admin_url())
                        event("pg_terminate_backend", connections=ended)
                time.sleep(0.1)
            for _when, consumer in restarts:
                consumer.start()
                event("restart", consumer=consumers.index(consumer))
            for consumer in consumers:
                if not consumer.alive:
                    consumer.start()
            event("chaos over; draining", status=_retrying(bench.status_counts, "status"))

            deadline = time.time() + args.drain_timeout
            counts: dict[str, int] = {}
            while time.time() < deadline:
                counts = _retrying(bench.status_counts, "status")
                if counts.get(Status.SCHEDULED, 0) + counts.get(Status.PROCESSING, 0) == 0:
                    break
                time.sleep(2)
            drained_at = utcnow()
            event("drained", status=counts, seconds_after_last_due=(drained_at - end).seconds)
            for consumer in consumers:
                consumer.stop()
            return _verdict(bench, rows, events, args, first_due, end, drained_at)


def _admin_url() -> str:
    from benchmarks.common import PG_ADMIN_URL

    return PG_ADMIN_URL


def _verdict(
    bench: Bench,
    rows: list[Any],
    events: list[dict[str, Any]],
    args: Any,
    first_due: datetime,
    end: datetime,
    drained_at: datetime,
) -> dict[str, Any]:
    assert bench.provider is not None
    messages = bench.provider.admin.messages()["messages"]
    # A letter's messages, by its delivery's key: a letter sent in a batch is stored under the
    # batch's key, so it is found by the delivery_id it carries (Resend tag, Postmark metadata).
    key_of = {str(r.delivery_id): r.idempotency_key for r in rows}
    by_key: dict[str, list[dict[str, Any]]] = {}
    for message in messages:
        labels = {**(message.get("metadata") or {}), **(message.get("tags") or {})}
        key = str(message.get("idempotency_key"))
        if labels.get("kind") == "letter" and labels.get("delivery_id") in key_of:
            key = key_of[labels["delivery_id"]]
        by_key.setdefault(key, []).append(message)
    status = bench.idempotency_keys()
    letter_keys = {r.idempotency_key for r in rows}
    duplicated = {k: len(by_key[k]) for k in letter_keys if len(by_key.get(k, [])) > 1}
    duplicates = sum(n - 1 for n in duplicated.values())
    lost_keys = [k for k in letter_keys if status.get(k) not in (Status.SENT, Status.FAILED)]
    sent_not_at_provider = [
        k for k in letter_keys if status.get(k) == Status.SENT and not by_key.get(k)
    ]
    failed_but_delivered = [
        k for k in letter_keys if status.get(k) == Status.FAILED and by_key.get(k)
    ]
    notice_counts = Counter(
        str(m.get("idempotency_key"))
        for m in messages
        if str(m.get("idempotency_key")).endswith("-delivery_failed")
    )
    notice_duplicates = sum(n - 1 for n in notice_counts.values() if n > 1)
    counts = Counter(status[k] for k in letter_keys)
    lateness = _lateness(bench)
    result = {
        "scheduled": len(rows),
        "sent": counts.get(Status.SENT, 0),
        "failed": counts.get(Status.FAILED, 0),
        "lost": len(lost_keys),
        "duplicates": duplicates,
        "sent_without_provider_message": len(sent_not_at_provider),
        "failed_but_at_provider": len(failed_but_delivered),
        "owner_notices": sum(notice_counts.values()),
        "owner_notice_duplicates": notice_duplicates,
        "first_due": first_due.isoformat(),
        "last_due": end.isoformat(),
        "drained_at": drained_at.isoformat(),
        "lateness": lateness,
        "events": events,
        "safety_nets": _nets(bench, first_due),
        "attempts": _attempts(bench),
        "provider_stats": bench.provider.admin.stats(),
        "load": load(),
        "database": bench.database if args.keep else None,
        "logs": str(bench.var_dir),
    }
    keys = list(duplicated) + lost_keys + failed_but_delivered + sent_not_at_provider
    if keys:
        result["investigate"] = {k: _history(bench, k, by_key.get(k, [])) for k in keys[:50]}
    return result


def _lateness(bench: Bench) -> dict[str, float]:
    from benchmarks.common import percentile

    values = [(s - d).total_seconds() for d, s in _retrying(bench.sent_times, "sent")]
    return {
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else float("nan"),
    }


def _nets(bench: Bench, since: datetime) -> dict[str, Any]:
    with session_scope(bench.app.session_factory) as session:
        rows = session.execute(
            select(
                ReconcilerRun.kind,
                func.count(),
                func.sum(ReconcilerRun.found),
                func.sum(ReconcilerRun.requeued),
                func.sum(ReconcilerRun.recovered),
                func.sum(ReconcilerRun.errors),
            )
            .where(ReconcilerRun.started_at >= since - timedelta(minutes=2))
            .group_by(ReconcilerRun.kind)
        ).all()
        events = session.execute(
            select(AuditEvent.type, func.count()).group_by(AuditEvent.type)
        ).all()
    return {
        "runs": {
            str(k): {
                "runs": int(n),
                "found": int(f or 0),
                "requeued": int(r or 0),
                "recovered": int(c or 0),
                "errors": int(e or 0),
            }
            for k, n, f, r, c, e in rows
        },
        "audit_events": {str(t): int(n) for t, n in events},
    }


def _attempts(bench: Bench) -> dict[str, int]:
    with session_scope(bench.app.session_factory) as session:
        rows = session.execute(
            select(DeliveryAttempt.provider, DeliveryAttempt.outcome, func.count()).group_by(
                DeliveryAttempt.provider, DeliveryAttempt.outcome
            )
        ).all()
    return {f"{p}:{o}": int(n) for p, o, n in rows}


def _history(bench: Bench, key: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything we know about one delivery: the row, its attempts, its audit trail, the
    provider's copies, and the consumer log lines naming it."""
    with session_scope(bench.app.session_factory) as session:
        row = session.scalar(select(Delivery).where(Delivery.idempotency_key == key))
        assert row is not None
        attempts = session.execute(
            select(
                DeliveryAttempt.id,
                DeliveryAttempt.run_number,
                DeliveryAttempt.task_id,
                DeliveryAttempt.provider,
                DeliveryAttempt.outcome,
                DeliveryAttempt.status_code,
                DeliveryAttempt.error_message,
                DeliveryAttempt.started_at,
                DeliveryAttempt.duration_ms,
                DeliveryAttempt.provider_message_id,
            )
            .where(DeliveryAttempt.delivery_id == row.id)
            .order_by(DeliveryAttempt.id)
        ).all()
        audit = session.execute(
            select(
                AuditEvent.id,
                AuditEvent.created_at,
                AuditEvent.type,
                AuditEvent.actor,
                AuditEvent.reason,
                AuditEvent.data,
            )
            .where(AuditEvent.delivery_id == row.id)
            .order_by(AuditEvent.id)
        ).all()
    delivery_id = str(row.id)
    log_lines = []
    for path in sorted(bench.var_dir.glob("consumer-*.log")):
        with path.open(errors="replace") as handle:
            log_lines += [f"{path.name}: {line.rstrip()}" for line in handle if delivery_id in line]
    return {
        "delivery_id": delivery_id,
        "row": {
            c: str(getattr(row, c))
            for c in (
                "status",
                "deliver_at",
                "next_attempt_at",
                "attempt_count",
                "round_attempts",
                "task_id",
                "dispatched_at",
                "lease_until",
                "error_class",
                "last_error",
                "pinned_provider",
                "provider",
                "provider_message_id",
                "sent_at",
                "failed_at",
                "version",
            )
        },
        "attempts": [[str(v) for v in a] for a in attempts],
        "audit": [[str(v) for v in a] for a in audit],
        "provider_messages": [
            {k: m.get(k) for k in ("provider", "id", "received_at")} for m in messages
        ],
        "log_lines": log_lines[-40:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="deliveries")
    parser.add_argument("--seconds", type=float, default=180, help="due times spread over")
    parser.add_argument("--lead", type=float, default=20, help="seconds until the first is due")
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument(
        "--kill-every",
        type=float,
        nargs=2,
        default=(2.0, 8.0),
        metavar=("MIN", "MAX"),
        help="seconds between SIGKILLs, uniform",
    )
    parser.add_argument("--wipe-at", type=float, default=60, help="broker wipe, s after first due")
    parser.add_argument("--pg-at", type=float, default=120, help="PostgreSQL event, s after due")
    parser.add_argument(
        "--pg-restart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="restart the PostgreSQL server (shared!); --no-pg-restart ends only our "
        "database's connections with pg_terminate_backend",
    )
    parser.add_argument(
        "--quota",
        type=float,
        default=5.0,
        help="requests/s each fake provider accepts before answering 429 (0: no quota)",
    )
    parser.add_argument(
        "--stored-5xx",
        type=float,
        default=0.03,
        help="share of requests stored and then answered 503 (a failover after it would duplicate)",
    )
    parser.add_argument(
        "--rate", type=float, default=4.75, help="CAPSULE_PROVIDER_RATE_PER_SECOND of the consumers"
    )
    parser.add_argument("--drain-timeout", type=float, default=900)
    parser.add_argument("--seed", type=int, default=None, help="chaos and fault seed")
    parser.add_argument("--keep", action="store_true", help="keep the database to inspect it")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1_000_000)

    info = machine()
    log(f"machine: {info}; seed {args.seed}")
    result = soak(args)
    out = {"machine": info, "args": vars(args), "settings": SOAK_SETTINGS, "faults": FAULTS}
    out["result"] = result
    ok = result["lost"] == 0 and result["duplicates"] == 0
    table(
        ["scheduled", "sent", "failed", "lost", "duplicates", "verdict"],
        [
            [
                result["scheduled"],
                result["sent"],
                result["failed"],
                result["lost"],
                result["duplicates"],
                "PASS" if ok else "FAIL",
            ]
        ],
        title=f"Chaos soak (seed {args.seed}, "
        f"{'PostgreSQL restart' if args.pg_restart else 'pg_terminate_backend'})",
    )
    kills = sum(1 for e in result["events"] if e["kind"] == "sigkill")
    table(
        ["what", "value"],
        [
            ["SIGKILLs", kills],
            ["broker wipe", next((e for e in result["events"] if "wipe" in e["kind"]), {})],
            [
                "PostgreSQL",
                next(
                    (
                        e
                        for e in result["events"]
                        if e["kind"] in ("postgresql restart", "pg_terminate_backend")
                    ),
                    {},
                ),
            ],
            ["lateness p50/p95/p99/max s", _fmt(result["lateness"])],
            ["safety nets", result["safety_nets"]["runs"]],
            ["provider attempts", result["attempts"]],
            ["sent without a provider message", result["sent_without_provider_message"]],
            ["failed but at the provider", result["failed_but_at_provider"]],
            [
                "owner notices (duplicates)",
                f"{result['owner_notices']} ({result['owner_notice_duplicates']})",
            ],
            ["load", result["load"]],
            ["consumer logs", result["logs"]],
        ],
        title="Details",
    )
    if result.get("investigate"):
        print("\nTo investigate (first 50): see 'investigate' in the results JSON")
        for key, history in list(result["investigate"].items())[:5]:
            print(f"\n--- {key} {history['delivery_id']} {history['row']['status']}")
            for line in history["attempts"]:
                print("  attempt", line)
            for line in history["audit"]:
                print("  audit  ", line)
            for line in history["provider_messages"]:
                print("  message", line)
    write_results("chaos", out)
    return 0 if ok else 1


def _fmt(values: dict[str, float]) -> str:
    return " / ".join(f"{values[k]:.1f}" for k in ("p50", "p95", "p99", "max"))


if __name__ == "__main__":
    raise SystemExit(main())
