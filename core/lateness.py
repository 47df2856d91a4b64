"""Sent letters per hour or day and their lateness (`sent_at - deliver_at`) p50 / p95 / p99,
computed in SQL and returned as plain rows: the hourly rollup (`core.rollup`) writes them, the
console's overview (`core.queries.overview`) charts them. No pandas here: every consumer runs
the rollup.

Percentiles are `percentile_cont` on PostgreSQL; on SQLite the same linear interpolation is
computed from window functions (row_number / count per bucket), so both give one answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Float, Integer, case, cast, func, select
from sqlalchemy.orm import Session

from core.expressions import after_sent, as_utc, bucket_expr, dialect, seconds_between
from core.models import Delivery

PERCENTILES = (0.5, 0.95, 0.99)
BUCKETS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}


def _floor(moment: datetime, bucket: str) -> datetime:
    moment = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0) if bucket == "day" else moment


def bucket_range(now: datetime, window: timedelta, bucket: str) -> tuple[datetime, list[datetime]]:
    """The start of the first bucket and every bucket start up to the one holding `now`."""
    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {sorted(BUCKETS)}, got {bucket!r}")
    step = BUCKETS[bucket]
    count = max(1, math.ceil(window / step))
    last = _floor(now, bucket)
    starts = [last - step * i for i in range(count - 1, -1, -1)]
    return starts[0], starts


@dataclass(frozen=True)
class BucketStats:
    """One bucket with sent letters: its start (aware UTC), how many, lateness percentiles in
    seconds (NaN where they cannot be computed)."""

    bucket: datetime
    sent: int
    p50: float
    p95: float
    p99: float

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> BucketStats:
        """From (bucket start as the driver returns it, count, p50, p95, p99)."""
        start, sent, p50, p95, p99 = row
        return cls(as_utc(start), int(sent), float(p50), float(p95), float(p99))


def _interpolate(n: int, p: float, lower: float | None, upper: float | None) -> float:
    """percentile_cont from the two neighbouring order statistics."""
    if n <= 0 or lower is None:
        return math.nan
    h = (n - 1) * p
    fraction = h - math.floor(h)
    return float(lower) + fraction * (float(upper if upper is not None else lower) - float(lower))


def _sent_in(since: datetime, until: datetime | None) -> list[ColumnElement[bool]]:
    bounds = [after_sent(), Delivery.sent_at >= since]
    return bounds if until is None else [*bounds, Delivery.sent_at < until]


def _sent_stats_sqlite(
    session: Session, since: datetime, until: datetime | None, bucket: str
) -> list[BucketStats]:
    lateness = seconds_between(session, Delivery.sent_at, Delivery.deliver_at)
    sent = (
        select(
            bucket_expr(session, Delivery.sent_at, bucket).label("bucket"),
            lateness.label("lateness"),
        )
        .where(*_sent_in(since, until))
        .subquery()
    )
    ranked = select(
        sent.c.bucket,
        sent.c.lateness,
        (func.row_number().over(partition_by=sent.c.bucket, order_by=sent.c.lateness) - 1).label(
            "rn"
        ),
        func.count().over(partition_by=sent.c.bucket).label("n"),
    ).subquery()
    columns: list[Any] = [ranked.c.bucket, func.max(ranked.c.n)]
    for p in PERCENTILES:
        low = cast((ranked.c.n - 1) * p, Integer)  # floor: the value is never negative
        columns.append(func.max(case((ranked.c.rn == low, ranked.c.lateness))))
        columns.append(func.max(case((ranked.c.rn == low + 1, ranked.c.lateness))))
    rows = session.execute(select(*columns).group_by(ranked.c.bucket)).all()
    out = []
    for bucket_start, n, *pairs in rows:
        values = [
            _interpolate(int(n), p, pairs[2 * i], pairs[2 * i + 1])
            for i, p in enumerate(PERCENTILES)
        ]
        out.append(BucketStats.from_row((bucket_start, n, *values)))
    return out


def _sent_stats_postgresql(
    session: Session, since: datetime, until: datetime | None, bucket: str
) -> list[BucketStats]:
    lateness = seconds_between(session, Delivery.sent_at, Delivery.deliver_at)
    bucket_col = bucket_expr(session, Delivery.sent_at, bucket).label("bucket")
    query = (
        select(
            bucket_col,
            func.count(),
            *[cast(func.percentile_cont(p).within_group(lateness), Float) for p in PERCENTILES],
        )
        .where(*_sent_in(since, until))
        .group_by(bucket_col)
    )
    return [BucketStats.from_row(row) for row in session.execute(query).all()]


def sent_stats(
    session: Session, *, since: datetime, until: datetime | None, bucket: str
) -> list[BucketStats]:
    """Sent rows in [since, until) per bucket that has any."""
    if dialect(session) == "postgresql":
        return _sent_stats_postgresql(session, since, until, bucket)
    return _sent_stats_sqlite(session, since, until, bucket)
