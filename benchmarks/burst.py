"""Burst: N deliveries due at the same instant, against raw Huey no-op throughput; then lateness
under a steady load below capacity.

    consumers   2 × `huey_consumer benchmarks.noop_app.huey -w 4 -k thread` (one per core);
                benchmarks.noop_app is huey_app's instance plus a `bench.noop` task, so the same
                processes run the no-ops and the deliveries
    provider    the fake Resend + Postmark server (its own process), 0 ms and 50 ms latency
    rows        bulk-inserted exactly as schedule_delivery leaves them (sealed letter, credit
                reserve, audit event, next_attempt_at = deliver_at), then dispatched through the
                production HueyEnqueuer (ETA task in Redis, task_id + dispatched_at on the row)

Per latency: (1) N no-op ETA tasks due at one instant: tasks/s from the scheduler's first move
to an empty queue; (2) N deliveries due at one instant: deliveries/s from the first to the last
sent_at, and over the wall time from the due instant; (3) RATE deliveries/s spread over SECONDS:
lateness (sent_at - deliver_at) p50/p95/p99.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from benchmarks import noop_app
from benchmarks.common import (
    Bench,
    base_parser,
    dispatch_all,
    duplicates,
    load,
    log,
    machine,
    percentile,
    provider_env,
    provider_server,
    seed_scheduled,
    spread,
    table,
    wait_until,
    write_results,
)
from core.models import ReconcilerRun, Status
from core.policy import utcnow

TARGET_RATIO = 0.5
LOCAL = timezone(timedelta(seconds=time.localtime().tm_gmtoff))
TARGET_P99 = 1.5


def _queue_sizes(bench: Bench) -> tuple[int, int]:
    storage = bench.enqueuer.queue.storage
    return int(bench.redis.llen(storage.queue_key)), int(bench.redis.zcard(storage.schedule_key))


def _settle(bench: Bench, expected_scheduled: int, until: float) -> int:
    """Wait until the workers moved the ETA tasks from the queue into the schedule."""
    while time.time() < until:
        pending, scheduled = _queue_sizes(bench)
        if pending == 0 and scheduled >= expected_scheduled:
            return 0
        time.sleep(0.2)
    return _queue_sizes(bench)[0]


_EXECUTED = re.compile(
    r"^\[([\d-]+ [\d:,]+)\] INFO:huey:[^:]+:benchmarks\.noop_app\.bench\.noop: .* executed in"
)


def _noop_times(bench: Bench, offsets: list[int]) -> list[datetime]:
    """When each no-op finished, from the consumers' own log lines (millisecond stamps)."""
    times = []
    for consumer, offset in zip(bench.consumers, offsets, strict=True):
        with consumer.log_path.open("rb") as handle:
            handle.seek(offset)
            for raw in handle:
                match = _EXECUTED.match(raw.decode(errors="replace"))
                if match:
                    stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(
                        tzinfo=LOCAL  # the consumers log local time
                    )
                    times.append(stamp.astimezone(UTC))
    return times


def noop_phase(bench: Bench, count: int, lead: float) -> dict[str, Any]:
    """No-op ETA tasks due at one instant; throughput from the first to the last completion
    as the consumers log them (no instrumentation inside the task)."""
    queue = bench.enqueuer.queue
    registry = queue._registry
    if registry.task_to_string(noop_app.noop.task_class) not in registry._registry:
        registry.register(noop_app.noop.task_class)
    offsets = [c.log_path.stat().st_size for c in bench.consumers]
    load_before = load()
    due = utcnow() + timedelta(seconds=lead)
    t0 = time.perf_counter()
    for _ in range(count):
        queue.enqueue(noop_app.noop.s(eta=due))
    enqueue_s = time.perf_counter() - t0
    unsettled = _settle(bench, count, due.timestamp() - 0.5)
    wait_until(due)
    deadline = time.time() + 600
    times: list[datetime] = []
    while time.time() < deadline:
        times = _noop_times(bench, offsets)
        if len(times) >= count:
            break
        time.sleep(0.5)
    assert len(times) >= count, f"only {len(times)} of {count} no-op tasks ran"
    first, last = min(times), max(times)
    seconds = (last - first).total_seconds()
    return {
        "count": count,
        "enqueue_seconds": round(enqueue_s, 2),
        "unsettled_at_due": unsettled,
        "first_to_last_seconds": round(seconds, 3),
        "per_second": (len(times) - 1) / seconds,
        "first_after_due_seconds": round((first - due).total_seconds(), 3),
        "load_before": load_before,
        "load": load(),
    }


def burst_phase(bench: Bench, count: int, lead: float, timeout: float) -> dict[str, Any]:
    now = utcnow()
    due = now + timedelta(seconds=lead)
    t0 = time.perf_counter()
    rows = seed_scheduled(bench.app, bench.user_id, [due] * count, now=now)
    seed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dispatched = dispatch_all(bench.app, rows, now=now)
    dispatch_s = time.perf_counter() - t0
    if utcnow() >= due:
        log(f"warning: seeding and dispatch took longer than the lead ({lead} s)")
    unsettled = _settle(bench, count, due.timestamp() - 0.5)
    wait_until(due)
    load_before = load()
    log(f"burst of {count} due now (load {load_before})")
    deadline = time.time() + timeout
    counts: dict[str, int] = {}
    while time.time() < deadline:
        counts = bench.status_counts()
        if counts.get(Status.SENT, 0) + counts.get(Status.FAILED, 0) >= count:
            break
        time.sleep(0.5)
    finished_load = load()
    times = [(d, s) for d, s in bench.sent_times() if d == due]
    sent = [s for _, s in times]
    first, last = min(sent), max(sent)
    span = (last - first).total_seconds()
    wall = (last - due).total_seconds()
    lateness = [(s - d).total_seconds() for d, s in times]
    extra, missing, _ = duplicates(_provider_counts(bench), [str(r.delivery_id) for r in rows])
    return {
        "count": count,
        "seed_seconds": round(seed_s, 2),
        "dispatch_seconds": round(dispatch_s, 2),
        "dispatched": dispatched,
        "unsettled_at_due": unsettled,
        "sent": len(sent),
        "failed": counts.get(Status.FAILED, 0),
        "first_to_last_seconds": round(span, 3),
        "per_second_first_to_last": (len(sent) - 1) / span if span > 0 else float("nan"),
        "wall_seconds_from_due": round(wall, 3),
        "per_second_wall": len(sent) / wall if wall > 0 else float("nan"),
        "lateness_p50": percentile(lateness, 0.5),
        "lateness_p99": percentile(lateness, 0.99),
        "lateness_max": max(lateness),
        "duplicates": extra,
        "never_sent": missing,
        "backstop": _backstop_runs(bench, due),
        "load_before": load_before,
        "load": finished_load,
    }


def _provider_counts(bench: Bench) -> dict[str, int]:
    """Letters stored at the fake per delivery id (batches store under the batch's key)."""
    assert bench.provider is not None
    return bench.provider.counts_by_delivery()


def _backstop_runs(bench: Bench, since: Any) -> dict[str, int]:
    from sqlalchemy import func, select

    from core.db import session_scope

    with session_scope(bench.app.session_factory) as session:
        row = session.execute(
            select(func.count(), func.coalesce(func.sum(ReconcilerRun.requeued), 0)).where(
                ReconcilerRun.kind == "backstop", ReconcilerRun.started_at >= since
            )
        ).one()
    return {"runs": int(row[0]), "requeued": int(row[1])}


def steady_phase(
    bench: Bench, rate: float, seconds: float, lead: float, timeout: float
) -> dict[str, Any]:
    count = int(rate * seconds)
    now = utcnow()
    start = now + timedelta(seconds=lead)
    rows = seed_scheduled(bench.app, bench.user_id, spread(start, seconds, count), now=now)
    dispatch_all(bench.app, rows, now=now)
    _settle(bench, count, start.timestamp() - 0.5)
    wait_until(start)
    load_before = load()
    log(f"steady load: {rate}/s for {seconds} s (load {load_before})")
    deadline = time.time() + seconds + timeout
    wanted = {r.deliver_at for r in rows}
    while time.time() < deadline:
        done = [d for d, _ in bench.sent_times() if d in wanted]
        if len(done) >= count:
            break
        time.sleep(1)
    lateness = sorted((s - d).total_seconds() for d, s in bench.sent_times() if d in wanted)
    extra, missing, _ = duplicates(_provider_counts(bench), [str(r.delivery_id) for r in rows])
    return {
        "rate": rate,
        "seconds": seconds,
        "count": count,
        "sent": len(lateness),
        "lateness_p50": percentile(lateness, 0.5),
        "lateness_p95": percentile(lateness, 0.95),
        "lateness_p99": percentile(lateness, 0.99),
        "lateness_max": lateness[-1] if lateness else float("nan"),
        "lateness_min": lateness[0] if lateness else float("nan"),
        "duplicates": extra,
        "never_sent": missing,
        "load_before": load_before,
        "load": load(),
    }


def run_latency(args: Any, latency_ms: float) -> dict[str, Any]:
    with provider_server(latency_ms=latency_ms) as server:
        env = provider_env(server.url, CAPSULE_PROVIDER_RATE_PER_SECOND=str(args.provider_rate))
        with Bench(f"burst-{int(latency_ms)}ms", settings=env, provider=server) as bench:
            bench.make_user()
            bench.enqueuer.set_marker()  # a running system has its broker marker
            for _ in range(args.consumers):
                bench.consumer(workers=args.workers, target="benchmarks.noop_app.huey")
            log(
                f"{args.consumers} consumers × -w {args.workers} -k thread, provider {latency_ms} ms"
            )
            lead = args.lead or 15 + args.count * 0.0015
            result: dict[str, Any] = {"latency_ms": latency_ms}
            result["noop"] = noop_phase(bench, args.noop_count or args.count, lead)
            log(f"no-op: {result['noop']['per_second']:.0f} tasks/s")
            result["burst"] = burst_phase(bench, args.count, lead, args.timeout)
            log(f"burst: {result['burst']['per_second_first_to_last']:.0f} deliveries/s")
            result["ratio"] = (
                result["burst"]["per_second_first_to_last"] / result["noop"]["per_second"]
            )
            if args.steady_seconds > 0:
                result["steady"] = steady_phase(
                    bench, args.steady_rate, args.steady_seconds, 20, args.timeout
                )
                log(f"steady: p99 {result['steady']['lateness_p99']:.2f} s")
            for consumer in bench.consumers:
                consumer.stop()
            return result


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="deliveries in the burst")
    parser.add_argument("--noop-count", type=int, default=0, help="no-op tasks (0: --count)")
    parser.add_argument(
        "--latencies", default="0,50", help="provider latencies to run, in ms, comma-separated"
    )
    parser.add_argument("--consumers", type=int, default=2, help="consumer processes")
    parser.add_argument("--workers", type=int, default=4, help="threads per consumer (-w)")
    parser.add_argument(
        "--lead", type=float, default=0, help="seconds from seeding to the due instant (0: auto)"
    )
    parser.add_argument("--steady-rate", type=float, default=75, help="deliveries/s, steady")
    parser.add_argument(
        "--steady-seconds", type=float, default=60, help="length of the steady load (0: skip)"
    )
    parser.add_argument(
        "--provider-rate",
        type=float,
        default=1_000_000,
        help="CAPSULE_PROVIDER_RATE_PER_SECOND (the default 50/s would cap the burst)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait per phase")
    args = parser.parse_args(argv)

    info = machine()
    log(f"machine: {info}")
    runs = [run_latency(args, float(ms)) for ms in args.latencies.split(",") if ms.strip()]
    out = {
        "machine": info,
        "args": vars(args),
        "consumer": f"{args.consumers} × huey_consumer benchmarks.noop_app.huey "
        f"-w {args.workers} -k thread --graceful-signal TERM --shutdown-timeout 45",
        "runs": runs,
        "load_at_end": load(),
    }
    table(
        [
            "provider latency",
            "no-op tasks/s",
            "deliveries/s (first→last sent)",
            "deliveries/s (wall from due)",
            "ratio",
            "target ≥ 0.5",
            "dupes",
            "load before → after",
        ],
        [
            [
                f"{r['latency_ms']:g} ms",
                r["noop"]["per_second"],
                r["burst"]["per_second_first_to_last"],
                r["burst"]["per_second_wall"],
                r["ratio"],
                "met" if r["ratio"] >= TARGET_RATIO else "missed",
                r["burst"]["duplicates"],
                f"{r['burst']['load_before']} → {r['burst']['load']}",
            ]
            for r in runs
        ],
        title=f"Burst: {args.count:,} deliveries due at one instant",
    )
    steady = [r for r in runs if "steady" in r]
    if steady:
        table(
            [
                "provider latency",
                "rate",
                "sent",
                "p50 s",
                "p95 s",
                "p99 s",
                "max s",
                "target p99 ≤ 1.5 s",
                "load before → after",
            ],
            [
                [
                    f"{r['latency_ms']:g} ms",
                    f"{r['steady']['rate']:g}/s × {r['steady']['seconds']:g} s",
                    r["steady"]["sent"],
                    r["steady"]["lateness_p50"],
                    r["steady"]["lateness_p95"],
                    r["steady"]["lateness_p99"],
                    r["steady"]["lateness_max"],
                    "met" if r["steady"]["lateness_p99"] <= TARGET_P99 else "missed",
                    f"{r['steady']['load_before']} → {r['steady']['load']}",
                ]
                for r in steady
            ],
            title="Lateness (sent_at - deliver_at) under a steady load",
        )
    write_results("burst", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
