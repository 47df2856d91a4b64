"""Summaries of finished hours and days of sent letters (`sent_rollups`).

    every hour, for each finished and settled bucket of the last 8 days (hours) / 35 days (days)
    that has no row yet: count the letters sent in it and their lateness p50 / p95 / p99,
    exactly as the live query does, and write one row (never rewritten)

A bucket is settled `SETTLE` after it ends: a sent row carries the time its run recorded it,
and it commits within seconds of that. The console reads finished buckets from here and only
the rest from the sent rows, so a 30-day chart costs the same at any volume. Missing rows only
make the chart slower, never wrong: `queries.overview.sent_series` computes what is not rolled up.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.db import SessionFactory, session_scope
from core.lateness import BUCKETS, bucket_range, sent_stats
from core.models import SentRollup

SETTLE = timedelta(minutes=15)
KEEP = {"hour": timedelta(days=8), "day": timedelta(days=35)}


def roll_up(session: Session, *, now: datetime, settle: timedelta = SETTLE) -> int:
    """Write the missing rows for finished, settled buckets; returns how many. The caller
    commits. Safe to run from several consumers at once (a row that exists is kept)."""
    written = 0
    settled = now - settle
    for bucket, span in KEEP.items():
        step = BUCKETS[bucket]
        _, starts = bucket_range(settled, span, bucket)
        finished = [start for start in starts if start + step <= settled]
        if not finished:
            continue
        have = set(
            session.scalars(
                select(SentRollup.start).where(
                    SentRollup.bucket == bucket, SentRollup.start >= finished[0]
                )
            )
        )
        missing = [start for start in finished if start not in have]
        if not missing:
            continue
        stats = sent_stats(session, since=missing[0], until=missing[-1] + step, bucket=bucket)
        by_start = {row.bucket: row for row in stats}
        rows = []
        for start in missing:
            found = by_start.get(start)
            sent, p50, p95, p99 = (
                (found.sent, found.p50, found.p95, found.p99)
                if found is not None
                else (0, None, None, None)
            )
            rows.append(
                {
                    "bucket": bucket,
                    "start": start,
                    "sent": sent,
                    "p50": _value(p50),
                    "p95": _value(p95),
                    "p99": _value(p99),
                    "computed_at": now,
                }
            )
        written += _insert_new(session, rows)
    return written


def run(session_factory: SessionFactory, *, now: datetime) -> int:
    """One rollup pass in its own transaction (the hourly task and `capsule rollup`)."""
    with session_scope(session_factory) as session:
        written = roll_up(session, now=now)
        session.commit()
    return written


def _value(number: float | None) -> float | None:
    return None if number is None or math.isnan(number) else float(number)


def _insert_new(session: Session, rows: list[dict[str, object]]) -> int:
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(SentRollup)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["bucket", "start"])
        .returning(SentRollup.start)
    )
    return len(session.execute(statement).all())
