"""Midnight burst: N letters due at one instant against a provider quota of 5 requests/s.

    database    PostgreSQL; broker Redis; consumers 2 × `huey_consumer huey_app.huey -w 4
                -k thread --graceful-signal TERM --shutdown-timeout 45` (production flags)
    provider    the fake Resend (its own process) answering 429 past QUOTA send requests/s;
                CAPSULE_PROVIDERS=resend, CAPSULE_PROVIDER_RATE_PER_SECOND=RATE (default 95 %
                of QUOTA: requests granted 200 ms apart arrive with jitter, and a 429 costs a
                second of everyone's budget)
    modes       batch: CAPSULE_BATCH_SIZE=100 (one /emails/batch call per 100 letters)
                single: CAPSULE_BATCH_SIZE=1 (one /emails call per letter), a smaller count:
                its time scales linearly with the count (QUOTA letters/s at best)

Reported per mode: seconds from the due instant to the last letter sent, letters/s, requests
and 429s at the fake, and letters stored more than once (must be 0) or never (must be 0).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

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
    table,
    wait_until,
    write_results,
)
from core.models import Status
from core.policy import utcnow

TARGET_SECONDS = 150.0


def run_mode(args: Any, batch_size: int, count: int) -> dict[str, Any]:
    with provider_server(latency_ms=args.latency_ms, quota=args.quota) as server:
        env = provider_env(
            server.url,
            CAPSULE_PROVIDERS="resend",
            CAPSULE_PROVIDER_RATE_PER_SECOND=str(args.rate or args.quota * 0.95),
            CAPSULE_BATCH_SIZE=str(batch_size),
        )
        with Bench(f"midnight-{batch_size}", settings=env, provider=server) as bench:
            bench.make_user()
            bench.enqueuer.set_marker()
            for _ in range(args.consumers):
                bench.consumer(workers=args.workers)
            now = utcnow()
            lead = args.lead or 20 + count * 0.002
            due = now + timedelta(seconds=lead)
            t0 = time.perf_counter()
            rows = seed_scheduled(bench.app, bench.user_id, [due] * count, now=now)
            seed_s = time.perf_counter() - t0
            dispatch_all(bench.app, rows, now=now)
            dispatch_s = time.perf_counter() - t0 - seed_s
            if utcnow() >= due:
                log(f"warning: seeding and dispatch overran the lead ({lead:.0f} s)")
            wait_until(due)
            load_before = load()
            log(f"batch size {batch_size}: {count} due now (load {load_before})")
            deadline = time.time() + args.timeout
            while time.time() < deadline:
                counts = bench.status_counts()
                if counts.get(Status.SENT, 0) + counts.get(Status.FAILED, 0) >= count:
                    break
                time.sleep(1)
            sent = [s for d, s in bench.sent_times() if d == due]
            last = max(sent) if sent else utcnow()
            lateness = sorted((s - due).total_seconds() for s in sent)
            stats = server.admin.stats()
            extra, missing, _ = duplicates(
                server.counts_by_delivery(), [str(r.delivery_id) for r in rows]
            )
            for consumer in bench.consumers:
                consumer.stop()
            return {
                "batch_size": batch_size,
                "count": count,
                "sent": len(sent),
                "failed": bench.status_counts().get(Status.FAILED, 0),
                "seed_seconds": round(seed_s, 1),
                "dispatch_seconds": round(dispatch_s, 1),
                "seconds_to_last": round((last - due).total_seconds(), 1),
                "letters_per_second": len(sent) / max(0.001, (last - due).total_seconds()),
                "lateness_p50": percentile(lateness, 0.5),
                "lateness_p99": percentile(lateness, 0.99),
                "requests": stats["requests"],
                "responses": stats["responses"],
                "duplicates": extra,
                "never_sent": missing,
                "load_before": load_before,
                "load": load(),
            }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000, help="letters, batch mode")
    parser.add_argument("--single-count", type=int, default=500, help="letters, single mode")
    parser.add_argument("--quota", type=float, default=5, help="provider requests/s")
    parser.add_argument(
        "--rate", type=float, default=0, help="CAPSULE_PROVIDER_RATE_PER_SECOND (0: 95 %% of quota)"
    )
    parser.add_argument("--latency-ms", type=float, default=50, help="fake provider latency")
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--lead", type=float, default=0, help="seconds to the due instant (0: auto)"
    )
    parser.add_argument("--modes", default="batch,single")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    info = machine()
    log(f"machine: {info}")
    runs = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        size, count = (100, args.count) if mode == "batch" else (1, args.single_count)
        runs.append(run_mode(args, size, count))
        log(f"{mode}: {runs[-1]['seconds_to_last']} s to the last of {count}")
    table(
        [
            "batch size",
            "letters",
            "s to last sent",
            "letters/s",
            "extrapolated to 50,000",
            "requests",
            "429s",
            "dupes",
            "never sent",
            "load before → after",
        ],
        [
            [
                r["batch_size"],
                r["count"],
                r["seconds_to_last"],
                r["letters_per_second"],
                f"{50_000 / r['letters_per_second']:.0f} s" if r["letters_per_second"] else "-",
                sum(r["requests"].values()),
                sum(
                    n
                    for p in r["responses"].values()
                    for status, n in p.items()
                    if "429" in str(status)
                ),
                r["duplicates"],
                r["never_sent"],
                f"{r['load_before']} → {r['load']}",
            ]
            for r in runs
        ],
        title=f"Midnight burst at {args.quota:g} provider requests/s (target ≤ {TARGET_SECONDS:g} s "
        "for 50,000)",
    )
    write_results("midnight", {"machine": info, "args": vars(args), "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
