"""The audit page: audit events by type, actor, delivery and time, keyset-paginated."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from core.models import AuditEvent
from core.queries.common import MAX_ROWS, frame, json_text


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


def _conditions(flt: AuditFilter, before: AuditCursor | None) -> list[Any]:
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
    return where


def audit_log(
    session: Session,
    flt: AuditFilter,
    *,
    before: AuditCursor | None = None,
    limit: int = 50,
) -> AuditPage:
    """Audit events matching `flt`, newest first, keyset-paginated on (created_at, id)."""
    limit = max(1, min(limit, MAX_ROWS))
    result = session.execute(
        select(
            AuditEvent.id,
            AuditEvent.created_at,
            AuditEvent.type,
            AuditEvent.actor,
            AuditEvent.delivery_id,
            AuditEvent.reason,
            AuditEvent.data,
        )
        .where(*_conditions(flt, before))
        .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
        .limit(limit + 1)
    )
    columns = list(result.keys())
    rows = result.all()
    more = len(rows) > limit
    rows = rows[:limit]
    out = frame(rows, columns)
    out["created_at"] = pd.to_datetime(out["created_at"], utc=True)
    out["data"] = [json_text(v) for v in out["data"]]
    cursor = (rows[-1].created_at, int(rows[-1].id)) if more and rows else None
    return AuditPage(out, cursor)


def audit_types(session: Session, *, recent: int = 5000) -> list[str]:
    """Event types seen among the most recent `recent` events (bounded, for a filter menu)."""
    latest = select(AuditEvent.type).order_by(AuditEvent.created_at.desc()).limit(recent).subquery()
    return sorted(str(t) for t in session.scalars(select(latest.c.type).distinct()))
