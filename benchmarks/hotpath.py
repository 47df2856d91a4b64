"""Hot path: the CPU one delivery costs in the consumer, without Huey around it.

N letters due now on PostgreSQL; `core.worker.run_delivery` runs them one after another in
this process (one thread), against the fake provider server at 0 ms in its own process, with
the production chain (Resend first; the Redis rate limit; the circuit breaker). Reports wall
and CPU milliseconds per delivery for this process, and with `--profile` the functions that
cost the most (cProfile), grouped by library. Use it to compare a change before and after:

    .venv/bin/python -m benchmarks.hotpath --count 2000 --profile
"""

from __future__ import annotations

import cProfile
import pstats
import resource
import time
from collections import Counter
from datetime import timedelta
from typing import Any

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
    table,
    write_results,
)
from core.db import session_scope
from core.deliveries import create_user
from core.policy import utcnow
from core.worker import run_delivery

GROUPS = (
    ("sqlalchemy", "/sqlalchemy/"),
    ("psycopg", "/psycopg"),
    ("redis-py", "/redis/"),
    ("httpx/httpcore/h11", ("/httpx/", "/httpcore/", "/h11/")),
    ("cryptography", "/cryptography/"),
    ("capsule", ("/core/", "/tasks/")),
    ("stdlib", "/lib/python3"),
)


def _group(filename: str) -> str:
    for name, needles in GROUPS:
        for needle in (needles,) if isinstance(needles, str) else needles:
            if needle in filename:
                return name
    return "other"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(count: int, profile: bool, warmup: int, dump: str | None = None) -> dict[str, Any]:
    with provider_server(0.0) as server:
        env = provider_env(server.url, CAPSULE_PROVIDER_RATE_PER_SECOND="1000000")
        with Bench("hotpath", settings=env) as bench:
            app = bench.app
            now = utcnow()
            with session_scope(app.session_factory) as session:
                user = create_user(session, "hot@example.com", "Hot", now, 0)
                session.commit()
            dues = [now - timedelta(seconds=1)] * (count + warmup)
            rows = seed_scheduled(app, user.id, dues, now=now - timedelta(seconds=2))
            dispatch_all(app, rows, now=now - timedelta(seconds=2))
            for row in rows[:warmup]:
                run_delivery(app, row.delivery_id, f"warm-{row.delivery_id}")
            measured = rows[warmup:]
            profiler = cProfile.Profile() if profile else None
            load_before = load()
            wall0, cpu0 = time.perf_counter(), _cpu()
            if profiler:
                profiler.enable()
            statuses = Counter(
                run_delivery(app, row.delivery_id, f"hot-{row.delivery_id}") for row in measured
            )
            if profiler:
                profiler.disable()
            wall, cpu = time.perf_counter() - wall0, _cpu() - cpu0
            result: dict[str, Any] = {
                "count": count,
                "statuses": {str(k): v for k, v in statuses.items()},
                "wall_ms_per_delivery": wall * 1000 / count,
                "cpu_ms_per_delivery": cpu * 1000 / count,
                "profiled": profile,
                "load_before": load_before,
                "load_after": load(),
            }
            if profiler:
                result["by_library"], result["top"] = _summarise(profiler, count)
                if dump:
                    profiler.dump_stats(dump)
            return result


def _summarise(profiler: cProfile.Profile, count: int) -> tuple[dict[str, float], list[Any]]:
    stats = pstats.Stats(profiler)
    by_group: Counter[str] = Counter()
    rows = []
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        by_group[_group(filename)] += tottime
        rows.append((tottime, cumtime, calls, f"{filename.rsplit('/', 2)[-2:]}:{line} {name}"))
    total = sum(by_group.values()) or 1.0
    shares = {k: round(100 * v / total, 1) for k, v in by_group.most_common()}
    top = sorted(rows, reverse=True)[:25]
    return shares, [
        [where, round(tot * 1000 / count, 3), round(cum * 1000 / count, 3), calls // count]
        for tot, cum, calls, where in top
    ]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="deliveries measured")
    parser.add_argument("--warmup", type=int, default=200, help="deliveries run first, unmeasured")
    parser.add_argument("--profile", action="store_true", help="cProfile the measured runs")
    parser.add_argument("--dump", help="with --profile: write the raw profile here (pstats)")
    args = parser.parse_args(argv)
    info = machine()
    log(f"machine: {info}")
    result = run(args.count, args.profile, args.warmup, args.dump)
    table(
        [
            "deliveries",
            "statuses",
            "wall ms / delivery",
            "CPU ms / delivery (this process)",
            "load",
        ],
        [
            [
                result["count"],
                result["statuses"],
                result["wall_ms_per_delivery"],
                result["cpu_ms_per_delivery"],
                f"{result['load_before']} → {result['load_after']}",
            ]
        ],
        title="One thread, run_delivery in a loop" + (" (profiled)" if args.profile else ""),
    )
    if args.profile:
        table(["library", "% of profiled time"], list(result["by_library"].items()))
        table(["function", "own ms / delivery", "cumulative ms", "calls / delivery"], result["top"])
    write_results("hotpath", {"machine": info, "args": vars(args), "result": result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
