"""Memory: Redis bytes held for letters scheduled a year ahead, under horizon dispatch, against a
naive one-ETA-task-per-letter baseline measured in the same run.

    horizon    rows scheduled a year ahead (10k, then 100k, then 1M in total); after each step
               the real dispatcher and backstop run (core.reconcile, through the production
               HueyEnqueuer); Redis bytes of our prefix are measured: MEMORY USAGE of every key
               (SAMPLES 0: exact) and the INFO used_memory delta (shared server: indicative)
    baseline   the same letters as naive ETA tasks: the task HueyEnqueuer builds
               (`capsule.deliver`, the delivery id, eta = deliver_at, a task id) added to Huey's
               schedule sorted set of a separate prefix, as a consumer's worker does with an ETA
               task that is not due (`Huey.add_schedule`); measured at a smaller count and
               extrapolated linearly to 1M (bytes per task × 1M)
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text

from benchmarks.common import Bench, base_parser, load, log, machine, table, write_results
from core.policy import utcnow
from core.reconcile import run_backstop, run_dispatcher
from tasks.delivery import HueyEnqueuer, deliver
from tasks.queue import make_huey

INSERT_FUTURE = [
    """
    INSERT INTO letters (id, user_id, key_id, subject_ciphertext, body_ciphertext, created_at)
    SELECT md5('L' || g)::uuid, :user_id, 'k1', decode(md5('s' || g), 'hex'),
           decode(repeat(md5('b' || g), 12), 'hex'), :now
    FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS g
    """,
    """
    INSERT INTO deliveries (id, letter_id, user_id, recipient_email, status, deliver_at,
      next_attempt_at, attempt_count, round_attempts, idempotency_key, version, created_at,
      updated_at)
    SELECT md5('D' || g)::uuid, md5('L' || g)::uuid, :user_id, 'r' || g || '@example.com',
      'scheduled', :now + interval '365 days' + make_interval(secs => g % 86400),
      :now + interval '365 days' + make_interval(secs => g % 86400), 0, 0, md5('K' || g), 1,
      :now, :now
    FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS g
    """,
]


def _used_memory(bench: Bench) -> int:
    return int(bench.redis.info("memory")["used_memory"])


def horizon_steps(bench: Bench, steps: list[int]) -> list[dict[str, Any]]:
    bench.make_user()
    out = []
    done = 0
    for total in steps:
        now = utcnow()
        with bench.app.engine.connect() as conn:
            conn.execute(text("SET statement_timeout = 0"))  # the app's 30 s is for the app
            for statement in INSERT_FUTURE:
                conn.execute(
                    text(statement),
                    {"user_id": bench.user_id, "now": now, "first": done + 1, "last": total},
                )
            conn.commit()
        done = total
        with bench.app.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text("SET statement_timeout = 0"))
            conn.execute(text("VACUUM ANALYZE deliveries"))
        used_before = _used_memory(bench)
        t0 = time.perf_counter()
        dispatcher = run_dispatcher(bench.app, now=utcnow())
        backstop = run_backstop(bench.app, now=utcnow())
        seconds = time.perf_counter() - t0
        keys, size = bench.redis_bytes()
        queue = bench.enqueuer.queue
        out.append(
            {
                "rows_a_year_ahead": total,
                "dispatcher": {"found": dispatcher.found, "requeued": dispatcher.requeued},
                "backstop": {"found": backstop.found, "requeued": backstop.requeued},
                "safety_nets_seconds": round(seconds, 3),
                "redis_keys": keys,
                "redis_key_names": [k.decode() for k in bench.prefix_keys()],
                "redis_bytes": size,
                "queued_tasks": int(queue.pending_count()),
                "scheduled_tasks": int(queue.scheduled_count()),
                "used_memory_delta": _used_memory(bench) - used_before,
                "load": load(),
            }
        )
        log(f"{total:,} rows a year ahead: {keys} keys, {size:,} bytes in Redis")
    return out


def baseline(bench: Bench, counts: list[int]) -> list[dict[str, Any]]:
    """Naive ETA tasks, one per letter, in a separate prefix."""
    prefix = f"{bench.prefix}_naive"
    settings = bench.app.settings
    queue = make_huey(settings.replace(huey_name=prefix))
    HueyEnqueuer(queue)  # registers capsule.deliver with this queue
    now = utcnow()
    out = []
    added = 0
    used_start = _used_memory(bench)
    for count in counts:
        t0 = time.perf_counter()
        for i in range(added, count):
            eta: datetime = now + timedelta(days=365, seconds=i % 86400)
            task = deliver.s(str(uuid.uuid4()), eta=eta, id=uuid.uuid4().hex)
            queue.add_schedule(task)
        added = count
        seconds = time.perf_counter() - t0
        keys, size = bench.redis_bytes(prefix)
        out.append(
            {
                "tasks": count,
                "redis_keys": keys,
                "redis_bytes": size,
                "bytes_per_task": size / count,
                "used_memory_delta": _used_memory(bench) - used_start,
                "seconds_to_add": round(seconds, 2),
                "scheduled_tasks": int(queue.scheduled_count()),
            }
        )
        log(f"naive: {count:,} ETA tasks: {size:,} bytes ({size / count:.0f} B/task)")
    bench.wipe_broker(prefix)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", default="10000,100000,1000000", help="total rows a year ahead, per step"
    )
    parser.add_argument(
        "--baseline", default="10000,50000", help="naive ETA tasks to add (cumulative)"
    )
    parser.add_argument("--extrapolate-to", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    info = machine()
    log(f"machine: {info}")
    steps = [int(s) for s in args.steps.split(",")]
    counts = [int(s) for s in args.baseline.split(",")]
    with Bench("memory") as bench:
        bench.enqueuer.set_marker()
        horizon = horizon_steps(bench, steps)
        naive = baseline(bench, counts)
    per_task = naive[-1]["bytes_per_task"]
    extrapolated = per_task * args.extrapolate_to
    out = {
        "machine": info,
        "args": vars(args),
        "horizon": horizon,
        "naive": naive,
        "naive_bytes_per_task": per_task,
        "naive_extrapolated_bytes": extrapolated,
        "load_at_end": load(),
    }
    rows: list[list[Any]] = [
        [
            f"{h['rows_a_year_ahead']:,} letters a year ahead, horizon dispatch",
            h["redis_keys"],
            h["redis_bytes"],
            h["scheduled_tasks"] + h["queued_tasks"],
            "measured",
        ]
        for h in horizon
    ]
    rows += [
        [
            f"{n['tasks']:,} naive ETA tasks",
            n["redis_keys"],
            n["redis_bytes"],
            n["scheduled_tasks"],
            f"measured ({n['bytes_per_task']:.0f} B/task)",
        ]
        for n in naive
    ]
    rows.append(
        [
            f"{args.extrapolate_to:,} naive ETA tasks",
            "",
            int(extrapolated),
            args.extrapolate_to,
            f"extrapolated: {per_task:.0f} B × {args.extrapolate_to:,}",
        ]
    )
    flat = len({h["redis_bytes"] for h in horizon}) == 1
    table(
        ["Redis holds", "keys", "bytes", "tasks", "how"],
        rows,
        title="Redis memory "
        + ("(target met: the same bytes at every size)" if flat else "(target missed)"),
    )
    print(f"horizon keys: {horizon[-1]['redis_key_names']}")
    write_results("memory", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
