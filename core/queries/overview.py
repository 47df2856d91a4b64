"""The overview page: headline tiles, deliveries per status, sent letters and their lateness
over time, what the backstop rescued, and the rows stuck longest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from core import lateness
from core.expressions import after_sent, bucket_expr, count_of, dialect, is_status
from core.lateness import bucket_range
from core.models import Delivery, ReconcilerRun, SentRollup, Status
from core.queries.common import MAX_ROWS, as_datetime, frame, reindex, utc

STATS_COLUMNS = ["bucket", "sent", "p50", "p95", "p99"]


@dataclass(frozen=True)
class Tiles:
    """The overview's headline numbers."""

    scheduled: int
    due_next_hour: int
    processing: int
    sent_24h: int
    failed_open: int
    stuck: int
    scheduled_estimated: bool = False  # `scheduled` is PostgreSQL's estimate (see below)

    @classmethod
    def from_row(cls, row: Sequence[Any], scheduled: tuple[int, bool]) -> Tiles:
        """From `tiles`' counts (due, processing, sent, failed, overdue, expired) and
        `scheduled_count`'s figure."""
        due, processing, sent, failed, overdue, expired = [int(v or 0) for v in row]
        waiting, estimated = scheduled
        return cls(waiting, due, processing, sent, failed, overdue + expired, estimated)


# Letters waiting for their time grow with the product (years of letters ahead): counting them
# exactly reads every entry of ix_deliveries_due. Above this many, PostgreSQL's own figure for
# that index (pg_class.reltuples, kept by autovacuum's ANALYZE; within a few per cent) is shown
# instead, marked as an estimate. Everything people act on (due, processing, failed, stuck)
# stays exact: those are small ranges.
EXACT_SCHEDULED_UP_TO = 50_000


def scheduled_count(
    session: Session, *, exact_up_to: int = EXACT_SCHEDULED_UP_TO
) -> tuple[int, bool]:
    """Scheduled rows and whether the figure is an estimate (PostgreSQL, above `exact_up_to`)."""
    if dialect(session) == "postgresql":
        estimate = session.execute(
            text("SELECT reltuples FROM pg_class WHERE oid = to_regclass('ix_deliveries_due')")
        ).scalar()
        # -1 (or nothing) until the table was first analysed
        if estimate is not None and estimate >= exact_up_to:
            return int(estimate), True
    return int(session.execute(select(count_of(is_status(Status.SCHEDULED)))).scalar() or 0), False


def tiles(
    session: Session,
    *,
    now: datetime,
    grace_seconds: float,
    exact_up_to: int = EXACT_SCHEDULED_UP_TO,
) -> Tiles:
    """The headline counts: one round trip of ranges over the partial indexes, and the
    scheduled total from `scheduled_count`."""
    scheduled = is_status(Status.SCHEDULED)
    processing = is_status(Status.PROCESSING)
    row = session.execute(
        select(
            count_of(
                scheduled,
                Delivery.next_attempt_at >= now,
                Delivery.next_attempt_at < now + timedelta(hours=1),
            ),
            count_of(processing),
            count_of(after_sent(), Delivery.sent_at >= now - timedelta(hours=24)),
            count_of(is_status(Status.FAILED)),
            count_of(scheduled, Delivery.next_attempt_at < now - timedelta(seconds=grace_seconds)),
            count_of(processing, Delivery.lease_until < now),
        )
    ).one()
    return Tiles.from_row(row, scheduled_count(session, exact_up_to=exact_up_to))


def status_counts(
    session: Session,
    *,
    now: datetime,
    window: timedelta,
    exact_up_to: int = EXACT_SCHEDULED_UP_TO,
) -> pd.DataFrame:
    """Deliveries per status: status, count, scope.

    The open states (scheduled, processing, failed, held) are counted whole; the terminal ones
    only within `window` (sent, delivered, bounced, complained by when they were sent; canceled
    by when it ended): an all-time count of sent rows grows with every letter ever sent and
    would be the one full scan of the overview. Scheduled is
    `scheduled_count` (scope "estimate" when it is one).
    """
    since = now - window
    row = session.execute(
        select(
            count_of(is_status(Status.PROCESSING)),
            count_of(is_status(Status.SENT), Delivery.sent_at >= since),
            count_of(is_status(Status.FAILED)),
            count_of(is_status(Status.CANCELED), Delivery.updated_at >= since),
            count_of(is_status(Status.DELIVERED), Delivery.sent_at >= since),
            count_of(is_status(Status.BOUNCED), Delivery.sent_at >= since),
            count_of(is_status(Status.COMPLAINED), Delivery.sent_at >= since),
            count_of(is_status(Status.HELD)),
        )
    ).one()
    waiting, estimated = scheduled_count(session, exact_up_to=exact_up_to)
    scopes = ["estimate" if estimated else "now", "now", "in window", "now", "in window"]
    scopes += ["in window", "in window", "in window", "now"]
    return pd.DataFrame(
        {
            "status": [s.value for s in Status],
            "count": [waiting, *[int(v or 0) for v in row]],
            "scope": scopes,
        }
    )


def _stats_rows(stats: list[lateness.BucketStats]) -> list[list[Any]]:
    return [[utc(s.bucket), s.sent, s.p50, s.p95, s.p99] for s in stats]


def sent_stats(
    session: Session, *, since: datetime, until: datetime | None, bucket: str
) -> pd.DataFrame:
    """Sent rows in [since, until) per bucket that has any: bucket, sent, p50, p95, p99."""
    stats = lateness.sent_stats(session, since=since, until=until, bucket=bucket)
    return pd.DataFrame(_stats_rows(stats), columns=STATS_COLUMNS)


def sent_series(
    session: Session, *, now: datetime, window: timedelta, bucket: str = "hour"
) -> pd.DataFrame:
    """Sent rows per bucket over `window`: bucket, sent, and lateness p50 / p95 / p99 in seconds.

    Lateness is `sent_at - deliver_at`. Finished buckets come from `sent_rollups` where
    `core.rollup` has written them; the rest (at least the current bucket) is computed from the
    sent rows, from the first bucket not rolled up on (a range over ix_deliveries_sent, read
    from the index alone). Every bucket appears, with NaN percentiles where nothing was sent.
    """
    since, starts = bucket_range(now, window, bucket)
    rolled = session.execute(
        select(SentRollup.start, SentRollup.sent, SentRollup.p50, SentRollup.p95, SentRollup.p99)
        .where(SentRollup.bucket == bucket, SentRollup.start >= since)
        .order_by(SentRollup.start)
    ).all()
    covered = {utc(r.start) for r in rolled}
    live_from = next((start for start in starts if pd.Timestamp(start) not in covered), None)
    rows = [[utc(r.start), r.sent, r.p50, r.p95, r.p99] for r in rolled]
    if live_from is not None:
        live = lateness.sent_stats(session, since=live_from, until=None, bucket=bucket)
        rows += [r for r in _stats_rows(live) if r[0] not in covered]
    out = reindex(pd.DataFrame(rows, columns=STATS_COLUMNS), starts, {"sent": 0})
    for column in ("p50", "p95", "p99"):
        out[column] = out[column].astype(float)
    return out


def reconciliation_series(
    session: Session, *, now: datetime, window: timedelta, bucket: str = "hour"
) -> pd.DataFrame:
    """What the backstop rescued per bucket: bucket, runs, rescued, sent, share (rescued / sent).

    `rescued` is requeued + recovered over the backstop's reconciler_runs; `share` is NaN where
    nothing was sent.
    """
    since, starts = bucket_range(now, window, bucket)
    run_bucket = bucket_expr(session, ReconcilerRun.started_at, bucket).label("bucket")
    runs = session.execute(
        select(
            run_bucket,
            func.count(),
            func.coalesce(func.sum(ReconcilerRun.requeued + ReconcilerRun.recovered), 0),
        )
        .where(ReconcilerRun.kind == "backstop", ReconcilerRun.started_at >= since)
        .group_by(run_bucket)
    ).all()
    sent_bucket = bucket_expr(session, Delivery.sent_at, bucket).label("bucket")
    sent = session.execute(
        select(sent_bucket, func.count())
        .where(after_sent(), Delivery.sent_at >= since)
        .group_by(sent_bucket)
    ).all()
    run_frame = reindex(
        pd.DataFrame(
            [[b, int(n), int(r)] for b, n, r in runs], columns=["bucket", "runs", "rescued"]
        ),
        starts,
        {"runs": 0, "rescued": 0},
    )
    sent_frame = reindex(
        pd.DataFrame([[b, int(n)] for b, n in sent], columns=["bucket", "sent"]),
        starts,
        {"sent": 0},
    )
    out = run_frame.merge(sent_frame, on="bucket")
    out["share"] = (out["rescued"] / out["sent"].where(out["sent"] > 0)).astype(float)
    return out


def _stuck_select(since: Any) -> Any:
    return select(
        Delivery.id,
        Delivery.status,
        Delivery.recipient_email,
        since.label("stuck_since"),
        Delivery.attempt_count.label("attempts"),
        Delivery.task_id,
    )


def stuck_items(
    session: Session, *, now: datetime, grace_seconds: float, limit: int = 50
) -> pd.DataFrame:
    """The oldest stuck rows: id, status, recipient, stuck_since, age_seconds, attempts, task_id.

    Scheduled rows count from their due time, processing rows from their lease's end.
    """
    limit = min(limit, MAX_ROWS)
    overdue = session.execute(
        _stuck_select(Delivery.next_attempt_at)
        .where(
            is_status(Status.SCHEDULED),
            Delivery.next_attempt_at < now - timedelta(seconds=grace_seconds),
        )
        .order_by(Delivery.next_attempt_at)
        .limit(limit)
    )
    expired = session.execute(
        _stuck_select(Delivery.lease_until)
        .where(is_status(Status.PROCESSING), Delivery.lease_until < now)
        .order_by(Delivery.lease_until)
        .limit(limit)
    ).all()
    columns = list(overdue.keys())
    out = frame([*overdue.all(), *expired], columns)
    out = out.sort_values("stuck_since").head(limit).reset_index(drop=True)
    out["stuck_since"] = pd.to_datetime(out["stuck_since"], utc=True)
    out["age_seconds"] = [(now - as_datetime(v)).total_seconds() for v in out["stuck_since"]]
    return out[[*columns[:4], "age_seconds", *columns[4:]]]
