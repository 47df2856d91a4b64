"""Which failed deliveries an operator means, without pandas: the filter shared by triage (the
console), bulk requeues (`core.bulk`) and `capsule failed list` (the CLI).

    FailedFilter              the filter; `pinned(now)` closes it so later failures never join
    failed_conditions         its WHERE clauses; failed_count, count_by_provider
    search_scope              a text search bounded to the newest SEARCH_SCAN_LIMIT candidates
    failed_page / FailedCursor  one keyset page on (failed_at, id), newest first
    failed_chunks / failed_rows the whole pinned set, page by page (the exports)

Pages are keyset pages: each starts strictly after the last row of the one before, so a page
costs the same at row 1,000,000 as at row 1 (the partial index on failed rows by error class and
failed_at serves the order), and rows that fail or leave the set meanwhile never shift a page.
Rows are dicts keyed by FAILED_COLUMNS; `core.queries.failed` turns them into DataFrames.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from core.expressions import as_utc, is_status
from core.models import Delivery, DeliveryAttempt, Notification, Status, User

SEARCH_IN = ("any", "owner", "recipient")
SEARCH_SCAN_LIMIT = 50_000
PAGE_SIZE = 500


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


def last_attempt(column: Any) -> Any:
    """`column` of the delivery's last attempt, as a subquery correlated to deliveries."""
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
    where: list[Any] = [is_status(Status.FAILED)]
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
        where.append(last_attempt(DeliveryAttempt.provider) == flt.provider)
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


def count_by_provider(session: Session, flt: FailedFilter) -> list[tuple[str | None, int]]:
    """Matching failed deliveries per provider of their last attempt, most first."""
    provider = last_attempt(DeliveryAttempt.provider).label("provider")
    matched = select(provider).where(*failed_conditions(flt)).subquery()
    rows = session.execute(
        select(matched.c.provider, func.count())
        .group_by(matched.c.provider)
        .order_by(func.count().desc())
    ).all()
    return [(p, int(n)) for p, n in rows]


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
    # Strictly newer than the first row left unread; ties with it are left out too.
    start = as_utc(bound) + timedelta(microseconds=1)
    if flt.failed_from is not None and flt.failed_from >= start:
        return SearchScope(flt, limit)
    return SearchScope(replace(flt, failed_from=start), limit, stopped_at=start)


def _failed_select() -> Select[Any]:
    """A failed delivery as triage shows it: the last attempt's provider and status code, and
    whether the owner has been notified. Its column names are FAILED_COLUMNS."""
    return (
        select(
            Delivery.id,
            Delivery.failed_at,
            Delivery.error_class,
            Delivery.last_error,
            last_attempt(DeliveryAttempt.provider).label("provider"),
            last_attempt(DeliveryAttempt.status_code).label("status_code"),
            Delivery.attempt_count.label("attempts"),
            Delivery.recipient_email,
            User.email.label("owner_email"),
            Notification.status.label("notified"),
        )
        .join(User, User.id == Delivery.user_id)
        .outerjoin(
            Notification,
            and_(Notification.delivery_id == Delivery.id, Notification.kind == "delivery_failed"),
        )
    )


FAILED_COLUMNS = list(_failed_select().selected_columns.keys())


@dataclass(frozen=True)
class FailedCursor:
    """Where a page of failed deliveries ended: the last row's failed_at and id. The next page
    starts strictly after it in (failed_at, id) descending order, so rows that fail meanwhile
    never shift a page (keyset pagination)."""

    failed_at: datetime
    id: uuid.UUID

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> FailedCursor:
        """The cursor just after `row` (a row of `failed_page`)."""
        return cls(as_utc(row["failed_at"]), uuid.UUID(str(row["id"])))


def failed_page(
    session: Session, flt: FailedFilter, *, limit: int, after: FailedCursor | None = None
) -> list[dict[str, Any]]:
    """Newest matching failures first (ties by id, descending), keyed by FAILED_COLUMNS with
    failed_at as aware UTC; with `after`, the page that follows that cursor."""
    where = failed_conditions(flt)
    if after is not None:
        where.append(
            or_(
                Delivery.failed_at < after.failed_at,
                and_(Delivery.failed_at == after.failed_at, Delivery.id < after.id),
            )
        )
    query = (
        _failed_select()
        .where(*where)
        .order_by(Delivery.failed_at.desc(), Delivery.id.desc())
        .limit(limit)
    )
    rows = [dict(row._mapping) for row in session.execute(query)]
    for row in rows:
        row["failed_at"] = as_utc(row["failed_at"])
    return rows


def failed_chunks(
    session: Session, flt: FailedFilter, *, now: datetime, chunk: int = PAGE_SIZE
) -> Iterator[list[dict[str, Any]]]:
    """Every failure `flt` matches at `now`, newest first, `chunk` rows at a time. The filter is
    pinned at `now` first, so rows that fail during a long export never join it."""
    pinned, after = flt.pinned(now), None
    while True:
        page = failed_page(session, pinned, limit=chunk, after=after)
        if not page:
            return
        yield page
        if len(page) < chunk:
            return
        after = FailedCursor.from_row(page[-1])


def failed_rows(
    session: Session, flt: FailedFilter, *, now: datetime, page_size: int = PAGE_SIZE
) -> Iterator[dict[str, Any]]:
    """`failed_chunks` row by row: what `capsule failed list` prints."""
    for page in failed_chunks(session, flt, now=now, chunk=page_size):
        yield from page


def overlaps(a: FailedFilter, b: FailedFilter) -> bool:
    """Could one failed delivery match both filters? False only when a field keeps them apart.

    Error classes, provider, recipient domain and the failed-at range can prove two filters
    disjoint; a text search never can, so it counts as overlapping.
    """
    if a.error_classes and b.error_classes and not set(a.error_classes) & set(b.error_classes):
        return False
    if a.provider and b.provider and a.provider != b.provider:
        return False

    def domain(f: FailedFilter) -> str | None:
        return f.recipient_domain.strip().lstrip("@").lower() if f.recipient_domain else None

    if domain(a) and domain(b) and domain(a) != domain(b):
        return False
    starts = [t for t in (a.failed_from, b.failed_from) if t is not None]
    ends = [t for t in (a.failed_until, b.failed_until) if t is not None]
    return not (starts and ends and max(starts) > min(ends))
