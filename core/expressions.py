"""SQL expressions the read side shares, free of pandas (the write side and the periodic tasks
use them too): literal status predicates that match the partial indexes, per-dialect time
arithmetic, and aware UTC from whatever a driver returns."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, func, literal, select
from sqlalchemy.orm import Session

from core.models import AFTER_SENT, Delivery, Status


def dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def is_status(status: Status) -> ColumnElement[bool]:
    """`status = '<literal>'`: a literal, so the planner matches each partial index's predicate
    (a bound parameter could get a generic plan that cannot use them)."""
    return Delivery.status == literal(status.value, literal_execute=True)


def after_sent() -> ColumnElement[bool]:
    """Accepted by a provider (sent, delivered, bounced, complained), as literals so the
    planner matches ix_deliveries_sent's predicate."""
    return Delivery.status.in_([literal(s.value, literal_execute=True) for s in AFTER_SENT])


def count_of(*where: ColumnElement[bool]) -> Any:
    """`count(*)` of the deliveries matching `where`, as a scalar subquery."""
    return select(func.count()).select_from(Delivery).where(*where).scalar_subquery()


def seconds_between(session: Session, later: Any, earlier: Any) -> ColumnElement[Any]:
    if dialect(session) == "postgresql":
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def bucket_expr(session: Session, column: Any, bucket: str) -> ColumnElement[Any]:
    """The start of `column`'s hour or day, in UTC."""
    if dialect(session) == "postgresql":
        # date_trunc on timestamptz uses the session time zone; truncate in UTC instead.
        return func.date_trunc(bucket, func.timezone("UTC", column))
    fmt = "%Y-%m-%d %H:00:00" if bucket == "hour" else "%Y-%m-%d 00:00:00"
    return func.strftime(fmt, column)


def as_utc(value: datetime | str) -> datetime:
    """An aware UTC datetime from a driver's value: aware, naive UTC, or ISO text (SQLite)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
