"""Recovery: how long until every due letter is sent after the broker loses its queue, and after
the consumers are SIGKILLed mid-burst; and that none is sent twice.

    wipe   N deliveries due, dispatched (ETA tasks in Redis). Right after a dispatcher run (the
           worst moment: the next one is a minute away) every key of our prefix is deleted,
           which is what FLUSHALL takes from us. Each consumer's marker watch (every
           CAPSULE_MARKER_CHECK_SECONDS) finds the marker gone and runs the dispatcher at once,
           which dispatches everything within the horizon again.
    kill   N deliveries due at one instant; when about a third are sent, every consumer is
           SIGKILLed and restarted at once. Tasks in flight are lost with their processes (rows
           stay `processing` until the lease runs out, then the backstop recovers them); tasks
           the scheduler had taken out of the schedule are lost (the backstop re-dispatches rows
           unclaimed past the grace period).

Consumers: 2 × `huey_consumer huey_app.huey -w 4 -k thread` (production flags).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from benchmarks.common import (
    Bench,
    base_parser,
    dispatch_all,
    duplicates,
    load,
    log,
    machine,
    provider_env,
    provider_server,
    seed_scheduled,
    table,
    wait_until,
    write_results,
)
from core.db import session_scope
from core.models import ReconcilerRun, Status
from core.policy import utcnow

TARGET_WIPE_SECONDS = 10  # issue 13: every due letter sent within 10 s of the wipe


def _runs(bench: Bench, kind: str, since: datetime) -> list[ReconcilerRun]:
    with session_scope(bench.app.session_factory) as session:
        return list(
            session.scalars(
                select(ReconcilerRun)
                .where(ReconcilerRun.kind == kind, ReconcilerRun.started_at >= since)
                .order_by(ReconcilerRun.started_at)
            )
        )


def _wait_run(bench: Bench, since: datetime, timeout: float = 90) -> None:
    """Until a dispatcher run started after `since` is recorded."""
    deadline = time.time() + timeout
    while not _runs(bench, "dispatcher", since):
        if time.time() > deadline:
            raise TimeoutError("no dispatcher run recorded")
        time.sleep(0.1)


def _wait_all_sent(bench: Bench, count: int, timeout: float) -> datetime | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        counts = bench.status_counts()
        if counts.get(Status.SENT, 0) >= count:
            return max(s for _, s in bench.sent_times())
        time.sleep(0.5)
    return None


def _outcome(bench: Bench, rows: list[Any], since: datetime) -> dict[str, Any]:
    assert bench.provider is not None
    extra, missing, dupes = duplicates(
        bench.provider.counts_by_delivery(), [str(r.delivery_id) for r in rows]
    )
    runs = {
        kind: [
            {
                "started_at": r.started_at.isoformat(),
                "seconds": (r.finished_at - r.started_at).total_seconds()
                if r.finished_at
                else None,
                "slot": r.slot.isoformat() if r.slot else None,
                "found": r.found,
                "requeued": r.requeued,
                "recovered": r.recovered,
            }
            for r in _runs(bench, kind, since)
            if r.found or r.recovered
        ]
        for kind in ("dispatcher", "backstop")
    }
    return {
        "status": bench.status_counts(),
        "duplicates": extra,
        "never_sent": missing,
        "duplicated_keys": dupes,
        "safety_net_runs": runs,
        "load": load(),
    }


def wipe_scenario(args: Any) -> dict[str, Any]:
    with provider_server() as server:
        env = provider_env(server.url, CAPSULE_PROVIDER_RATE_PER_SECOND="1000000")
        with Bench("recovery-wipe", settings=env, provider=server) as bench:
            bench.make_user()
            bench.enqueuer.set_marker()
            started = utcnow()
            for _ in range(args.consumers):
                bench.consumer()
            # The consumers' periodic tasks run every 60 s from their start; find the phase.
            _wait_run(bench, started - timedelta(seconds=5))
            first = _runs(bench, "dispatcher", started - timedelta(seconds=5))[0].started_at
            next_run = first + timedelta(seconds=60)
            while next_run < utcnow() + timedelta(seconds=args.count * 0.003 + 15):
                next_run += timedelta(seconds=60)
            wipe_at = next_run + timedelta(seconds=2)
            due = wipe_at + timedelta(seconds=1)
            now = utcnow()
            rows = seed_scheduled(bench.app, bench.user_id, [due] * args.count, now=now)
            dispatch_all(bench.app, rows, now=now)
            log(f"{args.count} due at {due:%H:%M:%S}; dispatched; wipe at {wipe_at:%H:%M:%S}")
            wait_until(next_run)
            _wait_run(bench, next_run - timedelta(seconds=1))  # the run we wipe just after
            wait_until(wipe_at)
            storage = bench.enqueuer.queue.storage
            scheduled_before = int(bench.redis.zcard(storage.schedule_key))
            wiped_at = utcnow()
            keys = bench.wipe_broker()
            log(f"wiped {keys} keys ({scheduled_before} scheduled tasks) (load {load()})")
            last = _wait_all_sent(bench, args.count, args.timeout)
            after = sorted((s - wiped_at).total_seconds() for _, s in bench.sent_times())
            result = {
                "count": args.count,
                "sent_after_wipe_p10_p50_p90": [
                    after[int(q * (len(after) - 1))] for q in (0.1, 0.5, 0.9)
                ]
                if after
                else None,
                "keys_deleted": keys,
                "tasks_lost": scheduled_before,
                "wiped_at": wiped_at.isoformat(),
                "due": due.isoformat(),
                "all_sent": last is not None,
                "seconds_wipe_to_all_sent": (last - wiped_at).total_seconds() if last else None,
                "max_lateness": (last - due).total_seconds() if last else None,
                **_outcome(bench, rows, wiped_at),
            }
            for consumer in bench.consumers:
                consumer.stop()
            return result


def kill_scenario(args: Any) -> dict[str, Any]:
    with provider_server(latency_ms=args.kill_latency_ms) as server:
        env = provider_env(
            server.url,
            CAPSULE_PROVIDER_RATE_PER_SECOND="1000000",
            CAPSULE_LEASE_SECONDS=str(args.lease_seconds),
            CAPSULE_GRACE_SECONDS=str(args.grace_seconds),
        )
        with Bench("recovery-kill", settings=env, provider=server) as bench:
            bench.make_user()
            bench.enqueuer.set_marker()
            consumers = [bench.consumer() for _ in range(args.consumers)]
            now = utcnow()
            due = now + timedelta(seconds=args.count * 0.003 + 12)
            rows = seed_scheduled(bench.app, bench.user_id, [due] * args.count, now=now)
            dispatch_all(bench.app, rows, now=now)
            wait_until(due)
            while bench.count(Status.SENT) < args.count * args.kill_fraction:
                time.sleep(0.02)
            killed = consumers[: args.kill]
            for consumer in killed:
                consumer.kill()
            killed_at = utcnow()
            counts = bench.status_counts()
            storage = bench.enqueuer.queue.storage
            queued = int(bench.redis.llen(storage.queue_key))
            scheduled = int(bench.redis.zcard(storage.schedule_key))
            log(
                f"killed {len(killed)} consumers at {counts} (queue {queued}, schedule {scheduled})"
            )
            for consumer in killed:
                consumer.start()
            last = _wait_all_sent(bench, args.count, args.timeout)
            return {
                "count": args.count,
                "provider_latency_ms": args.kill_latency_ms,
                "lease_seconds": args.lease_seconds,
                "grace_seconds": args.grace_seconds,
                "consumers_killed": len(killed),
                "at_kill": counts,
                "tasks_in_redis_after_kill": {"queue": queued, "schedule": scheduled},
                "killed_at": killed_at.isoformat(),
                "all_sent": last is not None,
                "seconds_kill_to_all_sent": (last - killed_at).total_seconds() if last else None,
                "max_lateness": (last - due).total_seconds() if last else None,
                **_outcome(bench, rows, killed_at),
            }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="deliveries due")
    parser.add_argument("--consumers", type=int, default=2, help="consumer processes")
    parser.add_argument("--scenarios", default="wipe,kill", help="wipe, kill or both")
    parser.add_argument("--kill", type=int, default=2, help="consumers to SIGKILL")
    parser.add_argument(
        "--kill-fraction", type=float, default=0.3, help="kill when this share is sent"
    )
    parser.add_argument(
        "--kill-latency-ms", type=float, default=50, help="provider latency in the kill run"
    )
    parser.add_argument(
        "--lease-seconds", type=int, default=300, help="CAPSULE_LEASE_SECONDS (kill run)"
    )
    parser.add_argument(
        "--grace-seconds", type=int, default=60, help="CAPSULE_GRACE_SECONDS (kill run)"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for all")
    args = parser.parse_args(argv)

    info = machine()
    log(f"machine: {info}")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    out: dict[str, Any] = {"machine": info, "args": vars(args)}
    rows = []
    if "wipe" in scenarios:
        wipe = out["wipe"] = wipe_scenario(args)
        seconds = wipe["seconds_wipe_to_all_sent"]
        rows.append(
            [
                "broker wipe (all prefix keys)",
                wipe["count"],
                wipe["status"].get("sent", 0),
                seconds if seconds is not None else "not all",
                wipe["max_lateness"],
                wipe["duplicates"],
                "met"
                if seconds is not None and seconds <= TARGET_WIPE_SECONDS and not wipe["duplicates"]
                else "missed",
                wipe["load"],
            ]
        )
    if "kill" in scenarios:
        kill = out["kill"] = kill_scenario(args)
        seconds = kill["seconds_kill_to_all_sent"]
        rows.append(
            [
                f"SIGKILL {kill['consumers_killed']} consumers mid-burst "
                f"(lease {kill['lease_seconds']} s, grace {kill['grace_seconds']} s)",
                kill["count"],
                kill["status"].get("sent", 0),
                seconds if seconds is not None else "not all",
                kill["max_lateness"],
                kill["duplicates"],
                "all sent, once" if seconds is not None and not kill["duplicates"] else "missed",
                kill["load"],
            ]
        )
    out["load_at_end"] = load()
    table(
        [
            "scenario",
            "due",
            "sent",
            "s until all sent",
            "max lateness s",
            "duplicates",
            "target",
            "load",
        ],
        rows,
        title=f"Recovery ({args.consumers} consumers × -w 4 -k thread)",
    )
    write_results("recovery", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
