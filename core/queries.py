"""Read models for the operations console: plain dataclasses and pandas DataFrames.

Every function takes its session and, where time matters, `now`; nothing returns an ORM object
and nothing loads a whole table. Aggregation happens in SQL and leans on the partial indexes of
`core.models.Delivery`:

    ix_deliveries_due     scheduled rows by next_attempt_at   tiles, stuck rows
    ix_deliveries_lease   processing rows by lease_until      tiles, stuck rows
    ix_deliveries_failed  failed rows by error class, time    triage, bulk filters
    ix_deliveries_sent    sent rows by sent_at, deliver_at    sent in 24 h, lateness (index-only), throughput

Percentiles are `percentile_cont` on PostgreSQL; on SQLite the same linear interpolation is
computed from window functions (row_number / count per bucket), so both give one answer.
Times in frames are timezone-aware UTC; ids are strings (the letter text is never read here).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import (
    ColumnElement,
    Float,
    Integer,
    Select,
    and_,
    case,
    cast,
    func,
    literal,
    or_,
    select,
    text,
)
from sqlalchemy.orm import Session

from core.models import (
    AFTER_SENT,
    Alert,
    AuditEvent,
    BulkOperation,
    CreditEntry,
    Delivery,
    DeliveryAttempt,
    DeliveryBatch,
    Notification,
    ProviderState,
    ReconcilerRun,
    SentRollup,
    Status,
    User,
    WebhookEvent,
)
from core.providers.circuit import CircuitState

PERCENTILES = (0.5, 0.95, 0.99)
BUCKETS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
MAX_ROWS = 500  # the most any list query returns
SEARCH_IN = ("any", "owner", "recipient")


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _utc(value: Any) -> pd.Timestamp | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    ts = pd.Timestamp(value)
    return ts.tz_localize(UTC) if ts.tzinfo is None else ts.tz_convert(UTC)


def _frame(rows: Iterable[Sequence[Any]], columns: Sequence[str]) -> pd.DataFrame:
    """A DataFrame with stringified UUIDs, so it pickles, caches and renders anywhere."""
    data = [[str(v) if isinstance(v, uuid.UUID) else v for v in row] for row in rows]
    return pd.DataFrame(data, columns=list(columns))


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


def _bucket_expr(session: Session, column: Any, bucket: str) -> ColumnElement[Any]:
    if _dialect(session) == "postgresql":
        # date_trunc on timestamptz uses the session time zone; truncate in UTC instead.
        return func.date_trunc(bucket, func.timezone("UTC", column))
    fmt = "%Y-%m-%d %H:00:00" if bucket == "hour" else "%Y-%m-%d 00:00:00"
    return func.strftime(fmt, column)


def _seconds_between(session: Session, later: Any, earlier: Any) -> ColumnElement[Any]:
    if _dialect(session) == "postgresql":
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


# ---------------------------------------------------------------- overview


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


def _is(status: Status) -> ColumnElement[bool]:
    """`status = '<literal>'`: a literal, so the planner matches each partial index's predicate
    (a bound parameter could get a generic plan that cannot use them)."""
    return Delivery.status == literal(status.value, literal_execute=True)


def _after_sent() -> ColumnElement[bool]:
    """Accepted by a provider (sent, delivered, bounced, complained), as literals so the
    planner matches ix_deliveries_sent's predicate."""
    return Delivery.status.in_([literal(s.value, literal_execute=True) for s in AFTER_SENT])


def _count(*where: ColumnElement[bool]) -> Any:
    return select(func.count()).select_from(Delivery).where(*where).scalar_subquery()


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
    if _dialect(session) == "postgresql":
        estimate = session.execute(
            text("SELECT reltuples FROM pg_class WHERE oid = to_regclass('ix_deliveries_due')")
        ).scalar()
        # -1 (or nothing) until the table was first analysed
        if estimate is not None and estimate >= exact_up_to:
            return int(estimate), True
    return int(session.execute(select(_count(_is(Status.SCHEDULED)))).scalar() or 0), False


def tiles(
    session: Session,
    *,
    now: datetime,
    grace_seconds: float,
    exact_up_to: int = EXACT_SCHEDULED_UP_TO,
) -> Tiles:
    """The headline counts: one round trip of ranges over the partial indexes, and the
    scheduled total from `scheduled_count`."""
    scheduled = _is(Status.SCHEDULED)
    processing = _is(Status.PROCESSING)
    row = session.execute(
        select(
            _count(
                scheduled,
                Delivery.next_attempt_at >= now,
                Delivery.next_attempt_at < now + timedelta(hours=1),
            ),
            _count(processing),
            _count(_after_sent(), Delivery.sent_at >= now - timedelta(hours=24)),
            _count(_is(Status.FAILED)),
            _count(scheduled, Delivery.next_attempt_at < now - timedelta(seconds=grace_seconds)),
            _count(processing, Delivery.lease_until < now),
        )
    ).one()
    values = [int(v or 0) for v in row]
    waiting, estimated = scheduled_count(session, exact_up_to=exact_up_to)
    return Tiles(
        scheduled=waiting,
        due_next_hour=values[0],
        processing=values[1],
        sent_24h=values[2],
        failed_open=values[3],
        stuck=values[4] + values[5],
        scheduled_estimated=estimated,
    )


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
            _count(_is(Status.PROCESSING)),
            _count(_is(Status.SENT), Delivery.sent_at >= since),
            _count(_is(Status.FAILED)),
            _count(_is(Status.CANCELED), Delivery.updated_at >= since),
            _count(_is(Status.DELIVERED), Delivery.sent_at >= since),
            _count(_is(Status.BOUNCED), Delivery.sent_at >= since),
            _count(_is(Status.COMPLAINED), Delivery.sent_at >= since),
            _count(_is(Status.HELD)),
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


def _interpolate(n: int, p: float, lower: float | None, upper: float | None) -> float:
    """percentile_cont from the two neighbouring order statistics."""
    if n <= 0 or lower is None:
        return math.nan
    h = (n - 1) * p
    fraction = h - math.floor(h)
    return float(lower) + fraction * (float(upper if upper is not None else lower) - float(lower))


def _sent_in(since: datetime, until: datetime | None) -> list[ColumnElement[bool]]:
    bounds = [_after_sent(), Delivery.sent_at >= since]
    return bounds if until is None else [*bounds, Delivery.sent_at < until]


def _sent_stats_sqlite(
    session: Session, since: datetime, until: datetime | None, bucket: str
) -> pd.DataFrame:
    lateness = _seconds_between(session, Delivery.sent_at, Delivery.deliver_at)
    sent = (
        select(
            _bucket_expr(session, Delivery.sent_at, bucket).label("bucket"),
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
        out.append([bucket_start, int(n), *values])
    return pd.DataFrame(out, columns=["bucket", "sent", "p50", "p95", "p99"])


def _sent_stats_postgresql(
    session: Session, since: datetime, until: datetime | None, bucket: str
) -> pd.DataFrame:
    lateness = _seconds_between(session, Delivery.sent_at, Delivery.deliver_at)
    bucket_col = _bucket_expr(session, Delivery.sent_at, bucket).label("bucket")
    query = (
        select(
            bucket_col,
            func.count(),
            *[cast(func.percentile_cont(p).within_group(lateness), Float) for p in PERCENTILES],
        )
        .where(*_sent_in(since, until))
        .group_by(bucket_col)
    )
    rows = [[b, int(n), *[float(v) for v in vs]] for b, n, *vs in session.execute(query).all()]
    return pd.DataFrame(rows, columns=["bucket", "sent", "p50", "p95", "p99"])


def _reindex(frame: pd.DataFrame, starts: list[datetime], fill: dict[str, Any]) -> pd.DataFrame:
    """One row per bucket start (UTC), missing buckets filled."""
    index = pd.DatetimeIndex([pd.Timestamp(s) for s in starts], name="bucket")
    if frame.empty:
        out = pd.DataFrame(index=index, columns=list(frame.columns.drop("bucket")))
    else:
        frame = frame.assign(bucket=[_utc(b) for b in frame["bucket"]]).set_index("bucket")
        out = frame.reindex(index)
    for column, value in fill.items():
        out[column] = out[column].fillna(value).astype(type(value))
    return out.reset_index()


def sent_stats(
    session: Session, *, since: datetime, until: datetime | None, bucket: str
) -> pd.DataFrame:
    """Sent rows in [since, until) per bucket that has any: bucket, sent, p50, p95, p99."""
    if _dialect(session) == "postgresql":
        frame = _sent_stats_postgresql(session, since, until, bucket)
    else:
        frame = _sent_stats_sqlite(session, since, until, bucket)
    return frame.assign(bucket=[_utc(b) for b in frame["bucket"]])


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
    covered = {_utc(r.start) for r in rolled}
    live_from = next((start for start in starts if pd.Timestamp(start) not in covered), None)
    rows = [[_utc(r.start), r.sent, r.p50, r.p95, r.p99] for r in rolled]
    if live_from is not None:
        live = sent_stats(session, since=live_from, until=None, bucket=bucket)
        rows += [list(r) for r in live.itertuples(index=False) if r.bucket not in covered]
    frame = pd.DataFrame(rows, columns=["bucket", "sent", "p50", "p95", "p99"])
    out = _reindex(frame, starts, {"sent": 0})
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
    run_bucket = _bucket_expr(session, ReconcilerRun.started_at, bucket).label("bucket")
    runs = session.execute(
        select(
            run_bucket,
            func.count(),
            func.coalesce(func.sum(ReconcilerRun.requeued + ReconcilerRun.recovered), 0),
        )
        .where(ReconcilerRun.kind == "backstop", ReconcilerRun.started_at >= since)
        .group_by(run_bucket)
    ).all()
    sent_bucket = _bucket_expr(session, Delivery.sent_at, bucket).label("bucket")
    sent = session.execute(
        select(sent_bucket, func.count())
        .where(_after_sent(), Delivery.sent_at >= since)
        .group_by(sent_bucket)
    ).all()
    run_frame = _reindex(
        pd.DataFrame(
            [[b, int(n), int(r)] for b, n, r in runs], columns=["bucket", "runs", "rescued"]
        ),
        starts,
        {"runs": 0, "rescued": 0},
    )
    sent_frame = _reindex(
        pd.DataFrame([[b, int(n)] for b, n in sent], columns=["bucket", "sent"]),
        starts,
        {"sent": 0},
    )
    out = run_frame.merge(sent_frame, on="bucket")
    out["share"] = (out["rescued"] / out["sent"].where(out["sent"] > 0)).astype(float)
    return out


def stuck_items(
    session: Session, *, now: datetime, grace_seconds: float, limit: int = 50
) -> pd.DataFrame:
    """The oldest stuck rows: id, status, recipient, stuck_since, age_seconds, attempts, task_id.

    Scheduled rows count from their due time, processing rows from their lease's end.
    """
    limit = min(limit, MAX_ROWS)
    overdue = session.execute(
        select(
            Delivery.id,
            Delivery.status,
            Delivery.recipient_email,
            Delivery.next_attempt_at,
            Delivery.attempt_count,
            Delivery.task_id,
        )
        .where(
            _is(Status.SCHEDULED),
            Delivery.next_attempt_at < now - timedelta(seconds=grace_seconds),
        )
        .order_by(Delivery.next_attempt_at)
        .limit(limit)
    ).all()
    expired = session.execute(
        select(
            Delivery.id,
            Delivery.status,
            Delivery.recipient_email,
            Delivery.lease_until,
            Delivery.attempt_count,
            Delivery.task_id,
        )
        .where(_is(Status.PROCESSING), Delivery.lease_until < now)
        .order_by(Delivery.lease_until)
        .limit(limit)
    ).all()
    columns = ["id", "status", "recipient_email", "stuck_since", "attempts", "task_id"]
    frame = _frame([*overdue, *expired], columns)
    frame = frame.sort_values("stuck_since").head(limit).reset_index(drop=True)
    frame["stuck_since"] = pd.to_datetime(frame["stuck_since"], utc=True)
    frame["age_seconds"] = [(now - _as_dt(v)).total_seconds() for v in frame["stuck_since"]]
    return frame[
        ["id", "status", "recipient_email", "stuck_since", "age_seconds", "attempts", "task_id"]
    ]


def _as_dt(value: Any) -> datetime:
    ts = _utc(value)
    assert ts is not None
    result: datetime = ts.to_pydatetime()
    return result


# ---------------------------------------------------------------- failed deliveries


@dataclass(frozen=True)
class FailedFilter:
    """Which failed deliveries triage lists and a bulk operation touches.

    Times are inclusive bounds on `failed_at`; `recipient_domain` matches the address's domain;
    `search` is a substring of the owner's email, the recipient, or either (`search_in`:
    owner | recipient | any); `provider` is the provider of the delivery's last attempt.
    """

    error_classes: tuple[str, ...] = ()
    provider: str | None = None
    failed_from: datetime | None = None
    failed_until: datetime | None = None
    recipient_domain: str | None = None
    search: str | None = None
    search_in: str = "any"

    def __post_init__(self) -> None:
        if self.search_in not in SEARCH_IN:
            raise ValueError(f"search_in must be one of {', '.join(SEARCH_IN)}")

    def pinned(self, now: datetime) -> FailedFilter:
        """The same filter closed at `now`: rows that fail later never join a confirmed set."""
        until = now if self.failed_until is None else min(self.failed_until, now)
        return replace(self, failed_until=until)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_classes"] = list(self.error_classes)
        for key in ("failed_from", "failed_until"):
            value = data[key]
            data[key] = value.astimezone(UTC).isoformat() if value is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FailedFilter:
        def when(key: str) -> datetime | None:
            raw = data.get(key)
            return datetime.fromisoformat(raw).astimezone(UTC) if raw else None

        return cls(
            error_classes=tuple(data.get("error_classes") or ()),
            provider=data.get("provider") or None,
            failed_from=when("failed_from"),
            failed_until=when("failed_until"),
            recipient_domain=data.get("recipient_domain") or None,
            search=data.get("search") or None,
            search_in=data.get("search_in") or "any",
        )

    def describe(self) -> str:
        parts = []
        if self.error_classes:
            parts.append("error class " + " or ".join(self.error_classes))
        if self.provider:
            parts.append(f"last provider {self.provider}")
        if self.failed_from:
            parts.append(f"failed from {self.failed_from:%Y-%m-%d %H:%M}")
        if self.failed_until:
            parts.append(f"until {self.failed_until:%Y-%m-%d %H:%M} UTC")
        if self.recipient_domain:
            parts.append(f"recipient @{self.recipient_domain}")
        if self.search:
            where = {"owner": " in the owner", "recipient": " in the recipient"}
            parts.append(f"matching {self.search!r}{where.get(self.search_in, '')}")
        return ", ".join(parts) or "every failed delivery"


def _last_attempt(column: Any) -> Any:
    return (
        select(column)
        .where(DeliveryAttempt.delivery_id == Delivery.id)
        .order_by(DeliveryAttempt.id.desc())
        .limit(1)
        .correlate(Delivery)
        .scalar_subquery()
    )


def failed_conditions(flt: FailedFilter, *, with_error_class: bool = True) -> list[Any]:
    """WHERE clauses for `flt` over deliveries (joined to users when `search` is set)."""
    where: list[Any] = [_is(Status.FAILED)]
    if with_error_class and flt.error_classes:
        where.append(Delivery.error_class.in_(flt.error_classes))
    if flt.failed_from is not None:
        where.append(Delivery.failed_at >= flt.failed_from)
    if flt.failed_until is not None:
        where.append(Delivery.failed_at <= flt.failed_until)
    if flt.recipient_domain:
        domain = flt.recipient_domain.strip().lstrip("@").lower()
        where.append(Delivery.recipient_email.endswith("@" + domain, autoescape=True))
    if flt.provider:
        where.append(_last_attempt(DeliveryAttempt.provider) == flt.provider)
    if flt.search and flt.search.strip():
        text = flt.search.strip().lower()
        owner = select(User.email).where(User.id == Delivery.user_id).correlate(Delivery)
        matches = {
            "recipient": func.lower(Delivery.recipient_email).contains(text, autoescape=True),
            "owner": func.lower(owner.scalar_subquery()).contains(text, autoescape=True),
        }
        either = or_(*matches.values())
        where.append(matches.get(flt.search_in, either))
    return where


def failed_count(session: Session, flt: FailedFilter) -> int:
    """How many failed deliveries match."""
    return int(
        session.scalar(select(func.count()).select_from(Delivery).where(*failed_conditions(flt)))
        or 0
    )


@dataclass(frozen=True)
class SearchScope:
    """A triage filter as its search actually ran: a search reads at most a fixed number of
    the newest failures that match the rest of the filter, then stops. `stopped_at` is the
    oldest failure time it read when it stopped early (None: it read every candidate), and
    `filter` is bounded there, so counts, pages and exports all cover the same rows."""

    filter: FailedFilter
    limit: int
    stopped_at: datetime | None = None

    @property
    def stopped_early(self) -> bool:
        return self.stopped_at is not None


SEARCH_SCAN_LIMIT = 50_000


def search_scope(
    session: Session, flt: FailedFilter, *, limit: int = SEARCH_SCAN_LIMIT
) -> SearchScope:
    """Bound `flt`'s search to the newest `limit` failures matching the rest of it."""
    if not (flt.search and flt.search.strip()):
        return SearchScope(flt, limit)
    rest = replace(flt, search=None)
    bound = session.scalar(
        select(Delivery.failed_at)
        .where(*failed_conditions(rest))
        .order_by(Delivery.failed_at.desc(), Delivery.id.desc())
        .offset(limit)
        .limit(1)
    )
    if bound is None:  # fewer candidates than the limit: the search read them all
        return SearchScope(flt, limit)
    bound = _as_dt(bound)
    # Strictly newer than the first row left unread; ties with it are left out too.
    start = bound + timedelta(microseconds=1)
    if flt.failed_from is not None and flt.failed_from >= start:
        return SearchScope(flt, limit)
    return SearchScope(replace(flt, failed_from=start), limit, stopped_at=start)


def failed_by_error_class(session: Session, flt: FailedFilter) -> pd.DataFrame:
    """Matching failed deliveries per error class (ignoring the filter's own classes)."""
    rows = session.execute(
        select(Delivery.error_class, func.count())
        .where(*failed_conditions(flt, with_error_class=False))
        .group_by(Delivery.error_class)
        .order_by(func.count().desc())
    ).all()
    return pd.DataFrame(
        [[c or "unknown", int(n)] for c, n in rows], columns=["error_class", "count"]
    )


def failed_by_provider(session: Session, flt: FailedFilter) -> pd.DataFrame:
    """Matching failed deliveries per provider of their last attempt: provider, count."""
    provider = _last_attempt(DeliveryAttempt.provider).label("provider")
    matched = select(provider).where(*failed_conditions(flt)).subquery()
    rows = session.execute(
        select(matched.c.provider, func.count())
        .group_by(matched.c.provider)
        .order_by(func.count().desc())
    ).all()
    return pd.DataFrame([[p or "none", int(n)] for p, n in rows], columns=["provider", "count"])


FAILED_COLUMNS = [
    "id",
    "failed_at",
    "error_class",
    "last_error",
    "provider",
    "status_code",
    "attempts",
    "recipient_email",
    "owner_email",
    "notified",
]


@dataclass(frozen=True)
class FailedCursor:
    """Where a page of failed deliveries ended: the last row's failed_at and id. The next page
    starts strictly after it in (failed_at, id) descending order, so rows that fail meanwhile
    never shift a page (keyset pagination)."""

    failed_at: datetime
    id: uuid.UUID

    @classmethod
    def after_last(cls, frame: pd.DataFrame) -> FailedCursor | None:
        """The cursor after the frame's last row, or None for an empty frame."""
        if frame.empty:
            return None
        last = frame.iloc[-1]
        return cls(_as_dt(last["failed_at"]), uuid.UUID(str(last["id"])))


def failed_deliveries(
    session: Session,
    flt: FailedFilter,
    *,
    limit: int = 200,
    after: FailedCursor | None = None,
) -> pd.DataFrame:
    """Newest matching failures first (ties by id, descending), with the last attempt's
    provider and status code and whether the owner has been notified; with `after`, the page
    that follows that cursor."""
    return _failed_rows(session, flt, limit=min(limit, MAX_ROWS), after=after)


def failed_chunks(
    session: Session, flt: FailedFilter, *, now: datetime, chunk: int = 1000
) -> Iterator[pd.DataFrame]:
    """Every matching failure, newest first, `chunk` rows at a time (for an export). The filter
    is pinned at `now` first, so rows that fail during the export never join it."""
    pinned, after = flt.pinned(now), None
    while True:
        frame = _failed_rows(session, pinned, limit=chunk, after=after)
        if frame.empty:
            return
        yield frame
        if len(frame) < chunk:
            return
        after = FailedCursor.after_last(frame)


def _failed_rows(
    session: Session, flt: FailedFilter, *, limit: int, after: FailedCursor | None
) -> pd.DataFrame:
    where = failed_conditions(flt)
    if after is not None:
        where.append(
            or_(
                Delivery.failed_at < after.failed_at,
                and_(Delivery.failed_at == after.failed_at, Delivery.id < after.id),
            )
        )
    query: Select[Any] = (
        select(
            Delivery.id,
            Delivery.failed_at,
            Delivery.error_class,
            Delivery.last_error,
            _last_attempt(DeliveryAttempt.provider),
            _last_attempt(DeliveryAttempt.status_code),
            Delivery.attempt_count,
            Delivery.recipient_email,
            User.email,
            Notification.status,
        )
        .join(User, User.id == Delivery.user_id)
        .outerjoin(
            Notification,
            and_(Notification.delivery_id == Delivery.id, Notification.kind == "delivery_failed"),
        )
        .where(*where)
        .order_by(Delivery.failed_at.desc(), Delivery.id.desc())
        .limit(limit)
    )
    frame = _frame(session.execute(query).all(), FAILED_COLUMNS)
    frame["failed_at"] = pd.to_datetime(frame["failed_at"], utc=True)
    frame["status_code"] = frame["status_code"].astype("Int64")
    return frame


def delivery_states(session: Session, ids: Sequence[uuid.UUID]) -> pd.DataFrame:
    """The current status of each id (for re-checking a selection): id, status, error_class,
    recipient_email, version. Ids that do not exist are left out."""
    if not ids:
        return _frame([], ["id", "status", "error_class", "recipient_email", "version"])
    rows = session.execute(
        select(
            Delivery.id,
            Delivery.status,
            Delivery.error_class,
            Delivery.recipient_email,
            Delivery.version,
        ).where(Delivery.id.in_(list(ids)[:MAX_ROWS]))
    ).all()
    order = {str(i): n for n, i in enumerate(ids)}
    frame = _frame(rows, ["id", "status", "error_class", "recipient_email", "version"])
    return frame.sort_values("id", key=lambda s: s.map(order)).reset_index(drop=True)


# ---------------------------------------------------------------- one delivery


@dataclass(frozen=True)
class DeliveryDetail:
    """Everything support may see about one delivery: metadata, never the letter."""

    id: str
    status: str
    recipient_email: str
    owner_email: str
    owner_name: str
    deliver_at: datetime
    next_attempt_at: datetime
    attempt_count: int
    round_attempts: int
    task_id: str | None
    dispatched_at: datetime | None
    lease_until: datetime | None
    error_class: str | None
    last_error: str | None
    pinned_provider: str | None
    provider: str | None
    provider_message_id: str | None
    sent_at: datetime | None
    failed_at: datetime | None
    canceled_at: datetime | None
    created_at: datetime
    updated_at: datetime
    version: int
    credit_held: int
    attempts: pd.DataFrame = field(repr=False)
    audit: pd.DataFrame = field(repr=False)
    notifications: pd.DataFrame = field(repr=False)
    # after sent: what the provider's webhooks said (core.webhooks), and a hold
    bounce_kind: str | None = None
    reported_at: datetime | None = None
    held_at: datetime | None = None
    provider_events: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    # the batch that holds the letter (live) or sent it: "id · provider · n letters · state"
    batch: str | None = None

    @property
    def lateness_seconds(self) -> float | None:
        if self.sent_at is None:
            return None
        return (self.sent_at - self.deliver_at).total_seconds()


def delivery_detail(
    session: Session, delivery_id: uuid.UUID, *, history_limit: int = 200
) -> DeliveryDetail | None:
    """One delivery with its attempts, audit trail and owner notifications; None if unknown."""
    row = session.execute(
        select(Delivery, User.email, User.name)
        .join(User, User.id == Delivery.user_id)
        .where(Delivery.id == delivery_id)
    ).one_or_none()
    if row is None:
        return None
    d, owner_email, owner_name = row
    limit = min(history_limit, MAX_ROWS)
    attempts = _frame(
        session.execute(
            select(
                DeliveryAttempt.started_at,
                DeliveryAttempt.run_number,
                DeliveryAttempt.provider,
                DeliveryAttempt.outcome,
                DeliveryAttempt.status_code,
                DeliveryAttempt.provider_error_code,
                DeliveryAttempt.error_message,
                DeliveryAttempt.duration_ms,
                DeliveryAttempt.task_id,
                DeliveryAttempt.provider_message_id,
                DeliveryAttempt.batch_id,
            )
            .where(DeliveryAttempt.delivery_id == delivery_id)
            .order_by(DeliveryAttempt.id)
            .limit(limit)
        ).all(),
        [
            "started_at",
            "run",
            "provider",
            "outcome",
            "status_code",
            "error_code",
            "error",
            "duration_ms",
            "task_id",
            "provider_message_id",
            "batch_id",
        ],
    )
    attempts["batch_id"] = [str(v) if v is not None else None for v in attempts["batch_id"]]
    attempts["started_at"] = pd.to_datetime(attempts["started_at"], utc=True)
    attempts["status_code"] = attempts["status_code"].astype("Int64")
    audit = _frame(
        session.execute(
            select(
                AuditEvent.created_at,
                AuditEvent.type,
                AuditEvent.actor,
                AuditEvent.reason,
                AuditEvent.data,
            )
            .where(AuditEvent.delivery_id == delivery_id)
            .order_by(AuditEvent.created_at, AuditEvent.id)
            .limit(limit)
        ).all(),
        ["created_at", "type", "actor", "reason", "data"],
    )
    audit["created_at"] = pd.to_datetime(audit["created_at"], utc=True)
    audit["data"] = [_json_text(v) for v in audit["data"]]
    notes = _frame(
        session.execute(
            select(
                Notification.kind,
                Notification.status,
                Notification.requested_by,
                Notification.attempts,
                Notification.provider,
                Notification.created_at,
                Notification.sent_at,
                Notification.last_error,
            )
            .where(Notification.delivery_id == delivery_id)
            .order_by(Notification.id)
        ).all(),
        [
            "kind",
            "status",
            "requested_by",
            "attempts",
            "provider",
            "created_at",
            "sent_at",
            "last_error",
        ],
    )
    held = session.scalar(
        select(func.coalesce(func.sum(CreditEntry.amount), 0)).where(
            CreditEntry.delivery_id == delivery_id
        )
    )
    events = _frame(
        session.execute(
            select(
                WebhookEvent.occurred_at,
                WebhookEvent.received_at,
                WebhookEvent.provider,
                WebhookEvent.type,
                WebhookEvent.bounce_kind,
                WebhookEvent.outcome,
                WebhookEvent.event_id,
            )
            .where(WebhookEvent.delivery_id == delivery_id)
            .order_by(WebhookEvent.id)
            .limit(limit)
        ).all(),
        ["occurred_at", "received_at", "provider", "type", "bounce_kind", "outcome", "event_id"],
    )
    for column in ("occurred_at", "received_at"):
        events[column] = pd.to_datetime(events[column], utc=True)
    return DeliveryDetail(
        id=str(d.id),
        status=d.status,
        recipient_email=d.recipient_email,
        owner_email=owner_email,
        owner_name=owner_name,
        deliver_at=d.deliver_at,
        next_attempt_at=d.next_attempt_at,
        attempt_count=d.attempt_count,
        round_attempts=d.round_attempts,
        task_id=d.task_id,
        dispatched_at=d.dispatched_at,
        lease_until=d.lease_until,
        error_class=d.error_class,
        last_error=d.last_error,
        pinned_provider=d.pinned_provider,
        provider=d.provider,
        provider_message_id=d.provider_message_id,
        sent_at=d.sent_at,
        failed_at=d.failed_at,
        canceled_at=d.canceled_at,
        created_at=d.created_at,
        updated_at=d.updated_at,
        version=d.version,
        credit_held=-int(held or 0),
        attempts=attempts,
        audit=audit,
        notifications=notes,
        bounce_kind=d.bounce_kind,
        reported_at=d.reported_at,
        held_at=d.held_at,
        provider_events=events,
        batch=_batch_line(session, d.batch_id),
    )


AFTER_SEND_PROBLEMS = (Status.BOUNCED, Status.COMPLAINED, Status.HELD)


def bounced_after_send(session: Session, *, limit: int = 200) -> pd.DataFrame:
    """Letters the provider accepted that bounced or drew a complaint, and letters held for a
    suppressed address, newest change first (ix_deliveries_status_updated)."""
    rows = session.execute(
        select(
            Delivery.updated_at,
            Delivery.status,
            Delivery.bounce_kind,
            Delivery.recipient_email,
            User.email,
            Delivery.provider,
            Delivery.sent_at,
            Delivery.reported_at,
            Delivery.held_at,
            Delivery.id,
        )
        .join(User, User.id == Delivery.user_id)
        .where(Delivery.status.in_([s.value for s in AFTER_SEND_PROBLEMS]))
        .order_by(Delivery.updated_at.desc())
        .limit(min(limit, MAX_ROWS))
    ).all()
    columns = [
        "updated_at",
        "status",
        "bounce_kind",
        "recipient_email",
        "owner_email",
        "provider",
        "sent_at",
        "reported_at",
        "held_at",
        "id",
    ]
    frame = _frame(rows, columns)
    for column in ("updated_at", "sent_at", "reported_at", "held_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    frame["id"] = frame["id"].astype(str)
    return frame


def _batch_line(session: Session, batch_id: uuid.UUID | None) -> str | None:
    if batch_id is None:
        return None
    batch = session.get(DeliveryBatch, batch_id)
    if batch is None:
        return str(batch_id)
    return f"{batch.id} · {batch.provider} · {len(batch.delivery_ids)} letters · {batch.state}"


def deliveries_for_address(session: Session, email: str, *, limit: int = 50) -> pd.DataFrame:
    """Deliveries whose recipient or owner is exactly `email`, newest first."""
    address = email.strip().lower()
    owner_ids = select(User.id).where(User.email == address).scalar_subquery()
    rows = session.execute(
        select(
            Delivery.id,
            Delivery.status,
            Delivery.deliver_at,
            Delivery.recipient_email,
            Delivery.error_class,
        )
        .where(or_(Delivery.recipient_email == address, Delivery.user_id.in_(owner_ids)))
        .order_by(Delivery.deliver_at.desc())
        .limit(min(limit, MAX_ROWS))
    ).all()
    frame = _frame(rows, ["id", "status", "deliver_at", "recipient_email", "error_class"])
    frame["deliver_at"] = pd.to_datetime(frame["deliver_at"], utc=True)
    return frame


def _json_text(value: Any) -> str:
    if not value:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


# ---------------------------------------------------------------- audit log


@dataclass(frozen=True)
class AuditFilter:
    types: tuple[str, ...] = ()
    actor: str | None = None
    delivery_id: uuid.UUID | None = None
    since: datetime | None = None
    until: datetime | None = None


AuditCursor = tuple[datetime, int]


@dataclass(frozen=True)
class AuditPage:
    """One page of audit events, newest first; `next_cursor` fetches the page after it."""

    rows: pd.DataFrame
    next_cursor: AuditCursor | None


def audit_log(
    session: Session,
    flt: AuditFilter,
    *,
    before: AuditCursor | None = None,
    limit: int = 50,
) -> AuditPage:
    """Audit events matching `flt`, newest first, keyset-paginated on (created_at, id)."""
    limit = max(1, min(limit, MAX_ROWS))
    where: list[Any] = []
    if flt.types:
        where.append(AuditEvent.type.in_(flt.types))
    if flt.actor and flt.actor.strip():
        where.append(AuditEvent.actor == flt.actor.strip())
    if flt.delivery_id is not None:
        where.append(AuditEvent.delivery_id == flt.delivery_id)
    if flt.since is not None:
        where.append(AuditEvent.created_at >= flt.since)
    if flt.until is not None:
        where.append(AuditEvent.created_at <= flt.until)
    if before is not None:
        at, event_id = before
        where.append(
            or_(
                AuditEvent.created_at < at,
                and_(AuditEvent.created_at == at, AuditEvent.id < event_id),
            )
        )
    rows = session.execute(
        select(
            AuditEvent.id,
            AuditEvent.created_at,
            AuditEvent.type,
            AuditEvent.actor,
            AuditEvent.delivery_id,
            AuditEvent.reason,
            AuditEvent.data,
        )
        .where(*where)
        .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
        .limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    frame = _frame(rows, ["id", "created_at", "type", "actor", "delivery_id", "reason", "data"])
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    frame["data"] = [_json_text(v) for v in frame["data"]]
    cursor = (rows[-1].created_at, int(rows[-1].id)) if more and rows else None
    return AuditPage(frame, cursor)


def audit_types(session: Session, *, recent: int = 5000) -> list[str]:
    """Event types seen among the most recent `recent` events (bounded, for a filter menu)."""
    latest = select(AuditEvent.type).order_by(AuditEvent.created_at.desc()).limit(recent).subquery()
    return sorted(str(t) for t in session.scalars(select(latest.c.type).distinct()))


# ---------------------------------------------------------------- system health


RUN_KINDS = ("dispatcher", "backstop", "failed_retrier")


@dataclass(frozen=True)
class RunnerState:
    """The newest run of one safety net."""

    kind: str
    started_at: datetime | None
    finished_at: datetime | None
    ok: bool | None
    age_seconds: float | None
    found: int = 0
    requeued: int = 0
    recovered: int = 0
    errors: int = 0
    error_message: str | None = None
    runner: str | None = None


def runner_states(
    session: Session, *, now: datetime, kinds: Sequence[str] = RUN_KINDS
) -> list[RunnerState]:
    """The last run of each kind (one index probe each); age is measured from its start."""
    states = []
    for kind in kinds:
        run = session.execute(
            select(ReconcilerRun)
            .where(ReconcilerRun.kind == kind)
            .order_by(ReconcilerRun.started_at.desc())
            .limit(1)
        ).scalar_one_or_none()
        if run is None:
            states.append(RunnerState(kind, None, None, None, None))
            continue
        states.append(
            RunnerState(
                kind=kind,
                started_at=run.started_at,
                finished_at=run.finished_at,
                ok=run.ok,
                age_seconds=(now - run.started_at).total_seconds(),
                found=run.found,
                requeued=run.requeued,
                recovered=run.recovered,
                errors=run.errors,
                error_message=run.error_message,
                runner=run.runner,
            )
        )
    return states


def recent_runs(session: Session, *, limit: int = 50, kind: str | None = None) -> pd.DataFrame:
    """The newest reconciler runs: started_at, kind, runner, ok, found, requeued, recovered,
    errors, duration_ms, error_message."""
    query = select(
        ReconcilerRun.started_at,
        ReconcilerRun.kind,
        ReconcilerRun.runner,
        ReconcilerRun.ok,
        ReconcilerRun.found,
        ReconcilerRun.requeued,
        ReconcilerRun.recovered,
        ReconcilerRun.errors,
        ReconcilerRun.finished_at,
        ReconcilerRun.error_message,
    )
    if kind:
        query = query.where(ReconcilerRun.kind == kind)
    rows = session.execute(
        query.order_by(ReconcilerRun.started_at.desc()).limit(min(limit, MAX_ROWS))
    ).all()
    frame = _frame(
        rows,
        [
            "started_at",
            "kind",
            "runner",
            "ok",
            "found",
            "requeued",
            "recovered",
            "errors",
            "finished_at",
            "error_message",
        ],
    )
    frame["started_at"] = pd.to_datetime(frame["started_at"], utc=True)
    frame["finished_at"] = pd.to_datetime(frame["finished_at"], utc=True)
    frame["duration_ms"] = (
        (frame["finished_at"] - frame["started_at"]).dt.total_seconds() * 1000
    ).round(1)
    return frame.drop(columns=["finished_at"])


def _circuit(provider: str, failures: int, opened_until: Any, now: datetime) -> str:
    until = _as_dt(opened_until) if opened_until is not None else None
    return CircuitState(provider, failures, until).status(now)


def provider_states(session: Session, *, now: datetime) -> pd.DataFrame:
    """Circuit breaker per provider: provider, circuit (closed | open | half_open, as the
    breaker itself reads it: open until `opened_until`, then half-open until a trial call
    closes or reopens it), consecutive_failures, opened_until, last_error, updated_at."""
    rows = session.execute(
        select(
            ProviderState.provider,
            ProviderState.opened_until,
            ProviderState.consecutive_failures,
            ProviderState.last_error,
            ProviderState.updated_at,
        )
        .order_by(ProviderState.provider)
        .limit(MAX_ROWS)
    ).all()
    data = [
        [
            provider,
            _circuit(provider, failures, opened_until, now),
            failures,
            opened_until,
            last_error,
            updated_at,
        ]
        for provider, opened_until, failures, last_error, updated_at in rows
    ]
    frame = _frame(
        data,
        ["provider", "circuit", "consecutive_failures", "opened_until", "last_error", "updated_at"],
    )
    frame["opened_until"] = pd.to_datetime(frame["opened_until"], utc=True)
    frame["updated_at"] = pd.to_datetime(frame["updated_at"], utc=True)
    return frame


def recent_alerts(session: Session, *, limit: int = 50) -> pd.DataFrame:
    """The newest alerts: created_at, kind, message, delivered, suppressed."""
    rows = session.execute(
        select(Alert.created_at, Alert.kind, Alert.message, Alert.delivered, Alert.suppressed)
        .order_by(Alert.created_at.desc())
        .limit(min(limit, MAX_ROWS))
    ).all()
    frame = _frame(rows, ["created_at", "kind", "message", "delivered", "suppressed"])
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    return frame


# ---------------------------------------------------------------- bulk operations


@dataclass(frozen=True)
class BulkView:
    """One bulk operation as the console shows it."""

    id: int
    action: str
    filter: dict[str, Any]
    actor: str
    reason: str
    expected_count: int
    done_count: int
    skipped_count: int
    rate_per_second: float
    state: str
    task_id: str | None
    error_message: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @property
    def processed(self) -> int:
        return self.done_count + self.skipped_count

    @property
    def progress(self) -> float:
        """0..1 of the expected rows processed."""
        if self.expected_count <= 0:
            return 1.0
        return min(1.0, self.processed / self.expected_count)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_BULK_STATES


ACTIVE_BULK_STATES = frozenset({"pending", "running", "aborting"})


def _bulk_view(op: BulkOperation) -> BulkView:
    return BulkView(
        id=op.id,
        action=op.action,
        filter=dict(op.filter or {}),
        actor=op.actor,
        reason=op.reason,
        expected_count=op.expected_count,
        done_count=op.done_count,
        skipped_count=op.skipped_count,
        rate_per_second=op.rate_per_second,
        state=op.state,
        task_id=op.task_id,
        error_message=op.error_message,
        created_at=op.created_at,
        updated_at=op.updated_at,
        finished_at=op.finished_at,
    )


def bulk_operation(session: Session, operation_id: int) -> BulkView | None:
    op = session.get(BulkOperation, operation_id, populate_existing=True)
    return _bulk_view(op) if op is not None else None


def active_bulk_operations(session: Session, *, limit: int = 20) -> list[BulkView]:
    """Operations not finished yet, newest first."""
    ops = session.scalars(
        select(BulkOperation)
        .where(BulkOperation.state.in_(sorted(ACTIVE_BULK_STATES)))
        .order_by(BulkOperation.created_at.desc())
        .limit(limit)
    ).all()
    return [_bulk_view(op) for op in ops]


def bulk_history(session: Session, *, limit: int = 50) -> pd.DataFrame:
    """The newest bulk operations: id, created_at, actor, action, state, expected, done, skipped,
    rate, reason, filter, finished_at, error."""
    ops = session.scalars(
        select(BulkOperation).order_by(BulkOperation.created_at.desc()).limit(min(limit, MAX_ROWS))
    ).all()
    rows = [
        [
            op.id,
            op.created_at,
            op.actor,
            op.action,
            op.state,
            op.expected_count,
            op.done_count,
            op.skipped_count,
            op.rate_per_second,
            op.reason,
            FailedFilter.from_dict(dict(op.filter or {})).describe(),
            op.finished_at,
            op.error_message,
        ]
        for op in ops
    ]
    frame = _frame(
        rows,
        [
            "id",
            "created_at",
            "actor",
            "action",
            "state",
            "expected",
            "done",
            "skipped",
            "rate_per_second",
            "reason",
            "filter",
            "finished_at",
            "error",
        ],
    )
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    frame["finished_at"] = pd.to_datetime(frame["finished_at"], utc=True)
    return frame
