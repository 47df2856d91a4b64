"""The triage page: failed deliveries per error class and provider, pages of them, their export,
and the current state of a selection. The filter itself is `core.failed_filter` (no pandas)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import failed_filter
from core.failed_filter import FAILED_COLUMNS, FailedCursor, FailedFilter, failed_conditions
from core.models import Delivery
from core.queries.common import MAX_ROWS, as_datetime, frame, result_frame


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
    rows = failed_filter.count_by_provider(session, flt)
    return pd.DataFrame([[p or "none", n] for p, n in rows], columns=["provider", "count"])


def _failed_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    out = frame([[row[c] for c in FAILED_COLUMNS] for row in rows], FAILED_COLUMNS)
    out["failed_at"] = pd.to_datetime(out["failed_at"], utc=True)
    out["status_code"] = out["status_code"].astype("Int64")
    return out


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
    rows = failed_filter.failed_page(session, flt, limit=min(limit, MAX_ROWS), after=after)
    return _failed_frame(rows)


def cursor_after(page: pd.DataFrame) -> FailedCursor | None:
    """The cursor after a page's last row, or None for an empty page."""
    if page.empty:
        return None
    last = page.iloc[-1]
    return FailedCursor(as_datetime(last["failed_at"]), uuid.UUID(str(last["id"])))


def failed_chunks(
    session: Session, flt: FailedFilter, *, now: datetime, chunk: int = 1000
) -> Iterator[pd.DataFrame]:
    """`core.failed_filter.failed_chunks` as DataFrames (the console's export)."""
    for rows in failed_filter.failed_chunks(session, flt, now=now, chunk=chunk):
        yield _failed_frame(rows)


def delivery_states(session: Session, ids: Sequence[uuid.UUID]) -> pd.DataFrame:
    """The current status of each id (for re-checking a selection): id, status, error_class,
    recipient_email, version. Ids that do not exist are left out."""
    query = select(
        Delivery.id,
        Delivery.status,
        Delivery.error_class,
        Delivery.recipient_email,
        Delivery.version,
    )
    if not ids:
        return frame([], list(query.selected_columns.keys()))
    out = result_frame(session.execute(query.where(Delivery.id.in_(list(ids)[:MAX_ROWS]))))
    order = {str(i): n for n, i in enumerate(ids)}
    return out.sort_values("id", key=lambda s: s.map(order)).reset_index(drop=True)
