"""The whole failed set, streamed: what `capsule failed list` prints.

Triage's filter (`queries.FailedFilter`), pinned at `now` so rows that fail during a long
listing never join it, read newest first in keyset pages on (failed_at, id): each page starts
strictly after the last row of the one before, so a page costs the same at row 1,000,000 as at
row 1 (the partial index on failed rows by error class and failed_at serves the order), and
rows that leave the set meanwhile (requeued, canceled) never shift a page.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from core import queries
from core.models import Delivery, DeliveryAttempt, Notification, User
from core.queries import FAILED_COLUMNS, FailedFilter

PAGE_SIZE = 500

COLUMNS = FAILED_COLUMNS  # the same names as the triage table and its export


def failed_rows(
    session: Session, flt: FailedFilter, *, now: datetime, page_size: int = PAGE_SIZE
) -> Iterator[dict[str, Any]]:
    """Every failed delivery `flt` matches at `now`, newest first (ties by id, descending), as
    dicts keyed by COLUMNS; read `page_size` rows at a time."""
    pinned = flt.pinned(now)
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        page = _page(session, pinned, after, page_size)
        for _, row in page:
            yield row
        if len(page) < page_size:
            return
        after = (page[-1][0], page[-1][1]["id"])


def _page(
    session: Session, flt: FailedFilter, after: tuple[datetime, uuid.UUID] | None, size: int
) -> list[tuple[datetime, dict[str, Any]]]:
    """One page: (the stored failed_at, for the next cursor; the row)."""
    where = queries.failed_conditions(flt)
    if after is not None:
        at, last_id = after
        where.append(
            or_(Delivery.failed_at < at, and_(Delivery.failed_at == at, Delivery.id < last_id))
        )
    query = (
        select(
            Delivery.id,
            Delivery.failed_at,
            Delivery.error_class,
            Delivery.last_error,
            queries._last_attempt(DeliveryAttempt.provider),
            queries._last_attempt(DeliveryAttempt.status_code),
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
        .limit(size)
    )
    rows = []
    for values in session.execute(query):
        row = dict(zip(COLUMNS, values, strict=True))
        stored = row["failed_at"]
        row["failed_at"] = queries._as_dt(stored)
        rows.append((stored, row))
    return rows
