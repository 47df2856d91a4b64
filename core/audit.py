"""Audit events: who did what to which delivery, when and why."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from core.models import AuditEvent

SYSTEM = "system"


def record(
    session: Session,
    type: str,
    *,
    actor: str,
    now: datetime,
    delivery_id: uuid.UUID | None = None,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Add an audit event to the session's transaction (committed with the change it records).

    A plain INSERT rather than an ORM object: it is on every delivery's hot path.
    """
    session.execute(
        insert(AuditEvent).values(
            type=type,
            actor=actor,
            delivery_id=delivery_id,
            reason=reason,
            data=data or {},
            created_at=now,
        )
    )
