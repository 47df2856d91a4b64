"""Scale: the safety nets' queries and the console overview's queries at 10,000 and at 1,000,000
deliveries on PostgreSQL: median times, the ratio 1M / 10k, and EXPLAIN (ANALYZE, BUFFERS).

The data (INSERT ... SELECT generate_series, then VACUUM ANALYZE) separates what grows with the
table from the work at hand. The same working set exists at every size:

    due within the hour     100 dispatched + 10 not yet dispatched (entering the horizon)
    stuck                   10 scheduled rows overdue past the grace period, 5 expired leases
    in flight               8 processing rows under a live lease
    sent in the last 24 h   1,000
    retryable failures      10 transient failures older than the cool-off

and the rest of the rows are history and future, in the proportions of a live system:
85 % sent over the past six months, 12 % scheduled from two hours to twenty years ahead,
1 % failed for good (permanent, exhausted, possibly sent, unreadable), 2 % canceled. Each
delivery has its letter, credit entries, one or two provider attempts and two audit events;
reconciler_runs holds a week of runs (the same at every size).

The console is measured as it runs live: the hourly rollup (core.rollup) has run, so long
windows read finished buckets from sent_rollups; the same 30 days computed from the sent rows
alone is measured too, and the rollup task's own first and routine runs.

Reconciler queries are captured from the real functions (core.reconcile: run_dispatcher's
select, _take_unclaimed, _recover_leases, run_failed_retrier's select) run inside a
transaction that is rolled back, then re-executed with the same parameters. Console queries
are the public overview functions of core.queries, timed as called.
"""

from __future__ import annotations

import inspect
import re
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from psycopg import sql as psycopg_sql
from sqlalchemy import Connection, event, text
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.common import Bench, base_parser, load, log, machine, table, write_results
from core.bootstrap import App
from core.db import session_scope
from core.policy import utcnow
from core.queries import overview
from core.reconcile import _recover_leases, _take_unclaimed, run_dispatcher, run_failed_retrier

TARGET_RECONCILER = 3.0
TARGET_CONSOLE = 5.0
WORKING_SET = 1143  # rows that are the same at every size (see the module doc)

GENERATE = [
    # one row per delivery: its kind and its due time
    "CREATE TEMP TABLE gen (g integer, kind text, r double precision, due timestamptz)",
    """
    INSERT INTO gen (g, kind, r, due)
    SELECT g, kind, r,
      CASE kind
        WHEN 'due' THEN :now + make_interval(secs => 60 + r2 * 3480)
        WHEN 'due_new' THEN :now + make_interval(secs => 3000 + r2 * 540)
        WHEN 'stuck' THEN :now - make_interval(secs => 300 + r2 * 1500)
        WHEN 'proc' THEN :now - make_interval(secs => r2 * 60)
        WHEN 'expired' THEN :now - make_interval(secs => 360 + r2 * 600)
        WHEN 'sent24' THEN :now - make_interval(secs => 5 + r2 * 86000)
        WHEN 'failed_retry' THEN :now - make_interval(days => 2) - make_interval(secs => r2 * 432000)
        WHEN 'sent' THEN :now - make_interval(days => 1) - make_interval(secs => r2 * 179 * 86400)
        WHEN 'future' THEN :now + make_interval(hours => 2) + make_interval(secs => r2 * r2 * 7300 * 86400)
        WHEN 'failed' THEN :now - make_interval(secs => 86400 + r2 * 179 * 86400)
        ELSE :now + make_interval(secs => r2 * 365 * 86400)
      END AS due
    FROM (
      SELECT g, r, r2,
        CASE
          WHEN g <= 100 THEN 'due' WHEN g <= 110 THEN 'due_new' WHEN g <= 120 THEN 'stuck'
          WHEN g <= 128 THEN 'proc' WHEN g <= 133 THEN 'expired' WHEN g <= 1133 THEN 'sent24'
          WHEN g <= 1143 THEN 'failed_retry'
          WHEN r < 0.85 THEN 'sent' WHEN r < 0.97 THEN 'future' WHEN r < 0.98 THEN 'failed'
          ELSE 'canceled'
        END AS kind
      FROM (SELECT g, random() AS r, random() AS r2 FROM generate_series(1, :n) AS g) AS s
    ) AS k
    """,
    """
    INSERT INTO users (id, email, name, created_at)
    SELECT u, 'owner' || u || '@example.com', 'Owner ' || u, :now - interval '400 days'
    FROM generate_series(1, :users) AS u
    """,
    "SELECT setval(pg_get_serial_sequence('users', 'id'), :users)",
    """
    INSERT INTO letters (id, user_id, key_id, subject_ciphertext, body_ciphertext, created_at)
    SELECT md5('L' || g)::uuid, 1 + g % :users, 'k1', decode(md5('s' || g), 'hex'),
           decode(repeat(md5('b' || g), 12), 'hex'), least(due, :now) - interval '30 days'
    FROM gen
    """,
    """
    INSERT INTO deliveries (
      id, letter_id, user_id, recipient_email, status, deliver_at, next_attempt_at,
      attempt_count, round_attempts, task_id, dispatched_at, lease_until, idempotency_key,
      error_class, last_error, pinned_provider, provider, provider_message_id, sent_at,
      failed_at, canceled_at, version, created_at, updated_at)
    SELECT md5('D' || g)::uuid, md5('L' || g)::uuid, 1 + g % :users,
      'r' || (g % 300000) || '@example' || (g % 50) || '.com',
      CASE WHEN kind IN ('due', 'due_new', 'stuck', 'future') THEN 'scheduled'
           WHEN kind IN ('proc', 'expired') THEN 'processing'
           WHEN kind IN ('sent', 'sent24') THEN 'sent'
           WHEN kind IN ('failed', 'failed_retry') THEN 'failed' ELSE 'canceled' END,
      due, due,
      CASE WHEN kind = 'failed_retry' THEN 5 WHEN kind = 'failed' AND r < 0.9775 THEN 15
           WHEN kind IN ('sent', 'sent24', 'proc', 'expired', 'failed') THEN 1 ELSE 0 END,
      CASE WHEN kind = 'failed_retry' THEN 5 WHEN kind = 'failed' AND r < 0.9775 THEN 5
           WHEN kind IN ('sent', 'sent24', 'proc', 'expired', 'failed') THEN 1 ELSE 0 END,
      CASE WHEN kind IN ('due', 'stuck', 'proc', 'expired') THEN md5('T' || g) END,
      CASE WHEN kind = 'due' THEN :now - interval '10 minutes'
           WHEN kind = 'stuck' THEN due - interval '1 hour' END,
      CASE WHEN kind = 'proc' THEN :now + interval '4 minutes'
           WHEN kind = 'expired' THEN due + interval '5 minutes' END,
      md5('K' || g),
      CASE WHEN kind = 'failed_retry' THEN 'transient'
           WHEN kind = 'failed' AND r < 0.9745 THEN 'permanent'
           WHEN kind = 'failed' AND r < 0.9775 THEN 'transient'
           WHEN kind = 'failed' AND r < 0.979 THEN 'possibly_sent'
           WHEN kind = 'failed' THEN 'decryption' END,
      CASE WHEN kind IN ('failed', 'failed_retry') THEN 'resend: injected 503; postmark: 422' END,
      NULL,
      CASE WHEN kind IN ('sent', 'sent24') THEN (CASE WHEN r < 0.8 THEN 'resend' ELSE 'postmark' END) END,
      CASE WHEN kind IN ('sent', 'sent24') THEN md5('M' || g) END,
      CASE WHEN kind IN ('sent', 'sent24') THEN due + make_interval(secs => 0.2 + r * 1.5) END,
      CASE WHEN kind IN ('failed', 'failed_retry') THEN due + interval '2 hours' END,
      CASE WHEN kind = 'canceled' THEN :now - make_interval(secs => r * 30 * 86400) END,
      CASE WHEN kind IN ('due', 'due_new', 'future') THEN 2 ELSE 4 END,
      least(due, :now) - interval '30 days',
      CASE WHEN kind IN ('sent', 'sent24') THEN due + make_interval(secs => 0.2 + r * 1.5)
           WHEN kind IN ('failed', 'failed_retry') THEN due + interval '2 hours'
           WHEN kind IN ('proc', 'expired') THEN due
           ELSE least(due, :now) - interval '30 days' END
    FROM gen
    """,
    """
    INSERT INTO delivery_attempts (delivery_id, run_number, task_id, provider, outcome,
      status_code, provider_error_code, error_message, provider_message_id, duration_ms,
      started_at)
    SELECT id, 1, md5('T' || id::text), coalesce(provider, 'resend'),
      CASE WHEN status = 'sent' THEN 'accepted' ELSE 'transient' END,
      CASE WHEN status = 'sent' THEN 200 ELSE 503 END, NULL, NULL, provider_message_id, 40,
      coalesce(sent_at, failed_at) - interval '100 milliseconds'
    FROM deliveries WHERE status IN ('sent', 'failed')
    """,
    """
    INSERT INTO delivery_attempts (delivery_id, run_number, task_id, provider, outcome,
      status_code, provider_error_code, error_message, provider_message_id, duration_ms,
      started_at)
    SELECT id, attempt_count, md5('U' || id::text), 'postmark',
      CASE WHEN error_class = 'permanent' THEN 'permanent' ELSE 'transient' END,
      CASE WHEN error_class = 'permanent' THEN 422 ELSE 503 END, '300', 'injected', NULL, 45,
      failed_at
    FROM deliveries WHERE status = 'failed'
    """,
    """
    INSERT INTO audit_events (type, actor, delivery_id, reason, data, created_at)
    SELECT 'delivery.scheduled', 'owner@example.com', id, NULL,
      json_build_object('deliver_at', deliver_at), created_at
    FROM deliveries
    """,
    """
    INSERT INTO audit_events (type, actor, delivery_id, reason, data, created_at)
    SELECT 'delivery.' || status, 'system', id, last_error, '{}'::json,
      coalesce(sent_at, failed_at, canceled_at)
    FROM deliveries WHERE status IN ('sent', 'failed', 'canceled')
    """,
    """
    INSERT INTO credit_ledger (user_id, delivery_id, amount, reason, created_at)
    SELECT u, NULL, 1000, 'grant', :now - interval '400 days' FROM generate_series(1, :users) u
    """,
    """
    INSERT INTO credit_ledger (user_id, delivery_id, amount, reason, created_at)
    SELECT user_id, id, -1, 'reserve', created_at FROM deliveries
    """,
    """
    INSERT INTO credit_ledger (user_id, delivery_id, amount, reason, created_at)
    SELECT user_id, id, 1, 'refund', coalesce(canceled_at, failed_at) FROM deliveries
    WHERE status = 'canceled' OR (status = 'failed' AND error_class = 'permanent')
    """,
    """
    INSERT INTO notifications (delivery_id, user_id, kind, status, idempotency_key,
      requested_by, attempts, provider, provider_message_id, last_error, created_at, sent_at)
    SELECT id, user_id, 'delivery_failed', 'sent', idempotency_key || '-delivery_failed',
      'system', 1, 'resend', md5('N' || id::text), NULL, failed_at, failed_at
    FROM deliveries WHERE status = 'failed'
    """,
    """
    INSERT INTO reconciler_runs (kind, runner, slot, started_at, finished_at, found,
      requeued, recovered, errors, error_message, ok)
    SELECT kind, 'host:1', slot, slot + interval '500 milliseconds',
      slot + interval '700 milliseconds', 0, 0, 0, 0, NULL, true
    FROM (SELECT date_trunc('minute', :now) - make_interval(mins => m) AS slot
          FROM generate_series(1, 10080) AS m) AS minutes,
         (VALUES ('dispatcher'), ('backstop')) AS kinds(kind)
    """,
    """
    INSERT INTO reconciler_runs (kind, runner, slot, started_at, finished_at, found,
      requeued, recovered, errors, error_message, ok)
    SELECT 'failed_retrier', 'host:1', slot, slot + interval '1 second',
      slot + interval '2 seconds', 0, 0, 0, 0, NULL, true
    FROM (SELECT date_trunc('hour', :now) - make_interval(hours => h) AS slot
          FROM generate_series(1, 168) AS h) AS hours
    """,
    """
    INSERT INTO provider_states (provider, consecutive_failures, opened_until, last_error,
      updated_at)
    VALUES ('resend', 0, NULL, NULL, :now), ('postmark', 0, NULL, NULL, :now)
    """,
    "DROP TABLE gen",
]


def generate(bench: Bench, n: int, now: datetime) -> float:
    params = {"n": n, "now": now, "users": max(100, n // 10)}
    t0 = time.perf_counter()
    with bench.app.engine.connect() as conn:
        conn.execute(text("SET statement_timeout = 0"))  # the app's 30 s is for the app
        for statement in GENERATE:
            conn.execute(text(statement), params)
        conn.commit()
    with bench.app.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text("SET statement_timeout = 0"))
        conn.execute(text("VACUUM ANALYZE"))
    return time.perf_counter() - t0


class StubEnqueuer:
    """Accepts every enqueue without a broker (the timings are the database's)."""

    def enqueue(self, delivery_id: uuid.UUID, eta: datetime) -> str:
        return uuid.uuid4().hex

    def revoke(self, task_id: str) -> None:
        return None

    def ping(self) -> bool:
        return True

    def has_marker(self) -> bool:
        return True

    def set_marker(self) -> None:
        return None


@contextmanager
def rolled_back(app: App) -> Iterator[tuple[App, list[tuple[str, Any]]]]:
    """An App whose every session joins one outer transaction that is rolled back at the end
    (commits become savepoints), and the statements it executed."""
    conn = app.engine.connect()
    outer = conn.begin()
    captured: list[tuple[str, Any]] = []

    def capture(_c: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((statement, parameters))

    event.listen(conn, "before_cursor_execute", capture)
    factory = sessionmaker(
        bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    try:
        yield (
            App(
                settings=app.settings,
                engine=app.engine,
                session_factory=factory,
                enqueuer=StubEnqueuer(),
            ),
            captured,
        )
    finally:
        event.remove(conn, "before_cursor_execute", capture)
        outer.rollback()
        conn.close()


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@dataclass
class Measured:
    name: str
    group: str  # reconciler | console
    ms: float
    rows: int | None = None
    plans: list[str] = field(default_factory=list)


def _explain(conn: Connection, statement: str, parameters: Any, *, generic: bool = False) -> str:
    """EXPLAIN (ANALYZE, BUFFERS): the custom plan (parameters known when planning), or with
    `generic` the plan a prepared statement gets once PostgreSQL switches to a generic plan
    (psycopg prepares a statement after 5 runs on a connection; PostgreSQL may then plan it
    once for any parameter value)."""
    raw = conn.connection.driver_connection
    assert raw is not None
    cursor = raw.cursor()
    if not generic:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
    else:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            names.append(match.group(1))
            return f"${len(names)}"

        body = re.sub(r"%\((\w+)\)s", number, statement)
        name = f"bench_{uuid.uuid4().hex[:8]}"
        cursor.execute(f"PREPARE {name} AS {body}")
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        literals = psycopg_sql.SQL(", ").join(psycopg_sql.Literal(parameters[n]) for n in names)
        cursor.execute(
            psycopg_sql.SQL("EXPLAIN (ANALYZE, BUFFERS) EXECUTE {} ({})").format(
                psycopg_sql.Identifier(name), literals
            )
        )
    plan = "\n".join(row[0] for row in cursor.fetchall())
    if generic:
        cursor.execute(f"DEALLOCATE {name}")
    cursor.close()
    return f"{statement.strip()}\n{plan}"


def _first_select(captured: list[tuple[str, Any]]) -> tuple[str, Any]:
    for statement, parameters in captured:
        if statement.lstrip().upper().startswith("SELECT") and "deliveries" in statement:
            return statement, parameters
    raise LookupError("no SELECT on deliveries captured")


def reconciler(bench: Bench, now: datetime, repeat: int) -> list[Measured]:
    app = bench.app
    grace = timedelta(seconds=app.settings.grace_seconds)
    calls: dict[str, tuple[str, Callable[[App], object]]] = {
        "dispatcher select": ("run_dispatcher", lambda a: run_dispatcher(a, now=now)),
        "backstop _take_unclaimed": (
            "_take_unclaimed",
            lambda a: _take_unclaimed(a, now, now - grace),
        ),
        "backstop _recover_leases": ("_recover_leases", lambda a: _recover_leases(a, now)),
        "failed retrier select": ("run_failed_retrier", lambda a: run_failed_retrier(a, now=now)),
    }
    out = []
    for name, (function, call) in calls.items():
        with rolled_back(app) as (scratch, captured):
            call(scratch)
        statement, parameters = _first_select(captured)

        def run_query(
            statement: str = statement, parameters: Any = parameters, repeat: int = 1
        ) -> tuple[int, list[float]]:
            """Runs on one connection, as a consumer's pooled connection does: psycopg
            prepares the statement from its 5th run on, and PostgreSQL then chooses between
            custom and generic plans itself."""
            times = []
            with app.engine.connect() as conn:
                raw = conn.connection.driver_connection
                assert raw is not None
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    cursor = raw.cursor()
                    cursor.execute(statement, parameters)
                    n = len(cursor.fetchall())
                    cursor.close()
                    times.append((time.perf_counter() - t0) * 1000)
                    conn.rollback()
            return n, times

        _, times = run_query(repeat=repeat + 10)
        ms = statistics.median(times[10:])
        rows = run_query()

        def whole(call: Callable[[App], object] = call) -> None:
            with rolled_back(app) as (scratch, _):
                call(scratch)

        whole_ms = _median_ms(whole, max(3, repeat // 3))
        with app.engine.connect() as conn:
            plans = [_explain(conn, statement, parameters)]
            conn.rollback()
            plans.append(
                "-- the same forced to a generic plan (PostgreSQL uses one for a prepared "
                "statement only when its estimated cost is no higher than the custom plans')\n"
                + _explain(conn, statement, parameters, generic=True)
            )
            conn.rollback()
        out.append(Measured(name, "reconciler", ms, rows, plans))
        out.append(Measured(f"  whole {function}() call", "reconciler (info)", whole_ms))
    return out


def _call(fn: Callable[..., object], session: Session, **available: Any) -> object:
    """Call a query with the keyword arguments its signature takes (core.queries evolves)."""
    accepted = inspect.signature(fn).parameters
    return fn(session, **{k: v for k, v in available.items() if k in accepted})


def console(bench: Bench, now: datetime, repeat: int) -> list[Measured]:
    app = bench.app
    grace = app.settings.grace_seconds
    calls: dict[str, Callable[[Session], object]] = {
        "tiles": lambda s: overview.tiles(s, now=now, grace_seconds=grace),
        "status_counts 24 h": lambda s: _call(
            overview.status_counts, s, now=now, window=timedelta(hours=24)
        ),
        "sent_series 24 h / hour": lambda s: overview.sent_series(
            s, now=now, window=timedelta(hours=24), bucket="hour"
        ),
        "sent_series 7 days / hour": lambda s: overview.sent_series(
            s, now=now, window=timedelta(days=7), bucket="hour"
        ),
        "sent_series 30 days / day": lambda s: overview.sent_series(
            s, now=now, window=timedelta(days=30), bucket="day"
        ),
        "sent_series 30 days / day, nothing rolled up": lambda s: overview.sent_stats(
            s, since=now - timedelta(days=30), until=None, bucket="day"
        ),
        "reconciliation_series 24 h": lambda s: overview.reconciliation_series(
            s, now=now, window=timedelta(hours=24), bucket="hour"
        ),
        "stuck_items": lambda s: overview.stuck_items(s, now=now, grace_seconds=grace),
    }
    out = []
    for name, call in calls.items():

        def run(call: Callable[[Session], object] = call) -> None:
            with session_scope(app.session_factory) as session:
                call(session)

        ms = _median_ms(run, repeat)
        captured: list[tuple[str, Any]] = []

        def capture(
            _c: Any,
            _cursor: Any,
            statement: str,
            parameters: Any,
            *_: Any,
            captured: list[tuple[str, Any]] = captured,
        ) -> None:
            captured.append((statement, parameters))

        event.listen(app.engine, "before_cursor_execute", capture)
        try:
            run()
        finally:
            event.remove(app.engine, "before_cursor_execute", capture)
        plans = []
        with app.engine.connect() as conn:
            for statement, parameters in captured:
                if statement.lstrip().upper().startswith("SELECT") and statement != "select 1":
                    plans.append(_explain(conn, statement, parameters))
            conn.rollback()
        group = "console (info)" if "nothing rolled up" in name else "console"
        out.append(Measured(name, group, ms, None, plans))
    return out


def rollups(bench: Bench, now: datetime) -> list[Measured]:
    """The hourly rollup task: its first run (every bucket of 35 days and 8 days of hours is
    missing) and a routine run (one new hour). Leaves the rollups in place, as a live system
    has them, for the console measurements that follow."""
    from sqlalchemy import delete, func, select

    from core.models import SentRollup
    from core.rollup import roll_up

    def timed() -> float:
        with session_scope(bench.app.session_factory) as session:
            t0 = time.perf_counter()
            roll_up(session, now=now)
            session.commit()
            return (time.perf_counter() - t0) * 1000

    first = timed()
    with session_scope(bench.app.session_factory) as session:
        newest = select(func.max(SentRollup.start)).where(SentRollup.bucket == "hour")
        session.execute(
            delete(SentRollup).where(
                SentRollup.bucket == "hour", SentRollup.start == newest.scalar_subquery()
            )
        )
        session.commit()
    hourly = timed()
    return [
        Measured("rollup, first run (35 days + 191 hours)", "rollup", first),
        Measured("rollup, routine run (one new hour)", "rollup", hourly),
    ]


def measure(n: int, args: Any) -> dict[str, Any]:
    with Bench(f"scale-{n}", keep_database=args.keep) as bench:
        now = utcnow()
        log(f"generating {n:,} deliveries in {bench.database} (load {load()})")
        seconds = generate(bench, n, now)
        log(f"generated in {seconds:.0f} s; measuring (load {load()})")
        sizes = _sizes(bench)
        rolled = rollups(bench, now)
        before = reconciler(bench, now, args.repeat) + console(bench, now, args.repeat) + rolled
        result: dict[str, Any] = {
            "deliveries": n,
            "generate_seconds": round(seconds, 1),
            "sizes": sizes,
            "load": load(),
            "measured": [m.__dict__ for m in before],
        }
        if args.after_sql:
            with bench.app.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.execute(text("SET statement_timeout = 0"))
                for statement in args.after_sql:
                    log(f"applying: {statement}")
                    conn.execute(text(statement))
                conn.execute(text("VACUUM ANALYZE deliveries"))
            after = reconciler(bench, now, args.repeat) + console(bench, now, args.repeat)
            result["after_sql"] = args.after_sql
            result["measured_after"] = [m.__dict__ for m in after]
            result["load_after"] = load()
        if args.keep:
            log(f"kept database {bench.database}")
        return result


def _sizes(bench: Bench) -> dict[str, str]:
    with bench.app.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class "
                "WHERE relname IN ('deliveries', 'delivery_attempts', 'audit_events', "
                "'letters', 'credit_ledger') ORDER BY relname"
            )
        ).all()
    return {str(name): str(size) for name, size in rows}


def _ratio_table(small: dict[str, Any], large: dict[str, Any], key: str, title: str) -> list[Any]:
    rows = []
    lows = {m["name"]: m for m in small[key]}
    for m in large[key]:
        low = lows[m["name"]]
        ratio = m["ms"] / low["ms"] if low["ms"] else float("nan")
        if m["group"] == "reconciler":
            target = "met" if ratio <= TARGET_RECONCILER else "missed"
        elif m["group"] == "console":
            target = "met" if ratio <= TARGET_CONSOLE else "missed"
        else:
            target = ""
        rows.append([m["name"], m["group"], low["ms"], m["ms"], ratio, target])
    table(
        [
            "query",
            "group",
            f"{small['deliveries']:,} ms",
            f"{large['deliveries']:,} ms",
            "ratio",
            "target (≤3× / ≤5×)",
        ],
        rows,
        title=title,
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000", help="delivery counts, small,large")
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per query (median)")
    parser.add_argument(
        "--after-sql",
        action="append",
        default=[],
        help="SQL to apply after the first measurement (e.g. a candidate index); "
        "everything is measured again after it. Repeatable.",
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases (inspect them)")
    parser.add_argument("--plans", action="store_true", help="print every EXPLAIN plan")
    args = parser.parse_args(argv)

    info = machine()
    log(f"machine: {info}")
    sizes = [int(s) for s in args.sizes.split(",")]
    results = [measure(n, args) for n in sizes]
    out = {"machine": info, "args": vars(args), "results": results, "load_at_end": load()}
    small, large = results[0], results[-1]
    out["ratios"] = _ratio_table(
        small, large, "measured", f"Query times, median of {args.repeat} (load {load()})"
    )
    if args.after_sql:
        out["ratios_after"] = _ratio_table(
            small, large, "measured_after", f"After: {'; '.join(args.after_sql)}"
        )
    plans = [
        f"-- {m['name']} ({large['deliveries']:,} deliveries)\n{p}"
        for key in ("measured", "measured_after")
        for m in large.get(key, [])
        for p in m["plans"]
    ]
    path = write_results("scale", out)
    plan_path = path.with_suffix(".plans.txt")
    plan_path.write_text("\n\n".join(plans))
    print(f"plans: {plan_path.relative_to(path.parent.parent.parent)}")
    if args.plans:
        print("\n\n".join(plans))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
