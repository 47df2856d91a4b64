"""The bulk page: bulk operations, one at a time, the active ones, and their history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.bulk import ACTIVE_BULK_STATES
from core.failed_filter import FailedFilter
from core.models import BulkOperation
from core.queries.common import MAX_ROWS, frame, same_fields


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

    @classmethod
    def from_row(cls, op: BulkOperation) -> BulkView:
        return cls(**same_fields(cls, op, filter=dict(op.filter or {})))

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


def bulk_operation(session: Session, operation_id: int) -> BulkView | None:
    op = session.get(BulkOperation, operation_id, populate_existing=True)
    return BulkView.from_row(op) if op is not None else None


def active_bulk_operations(session: Session, *, limit: int = 20) -> list[BulkView]:
    """Operations not finished yet, newest first."""
    ops = session.scalars(
        select(BulkOperation)
        .where(BulkOperation.state.in_(sorted(ACTIVE_BULK_STATES)))
        .order_by(BulkOperation.created_at.desc())
        .limit(limit)
    ).all()
    return [BulkView.from_row(op) for op in ops]


def bulk_history(session: Session, *, limit: int = 50) -> pd.DataFrame:
    """The newest bulk operations: id, created_at, actor, action, state, expected, done, skipped,
    rate, reason, filter, finished_at, error."""
    ops = session.scalars(
        select(BulkOperation).order_by(BulkOperation.created_at.desc()).limit(min(limit, MAX_ROWS))
    ).all()
    views = [BulkView.from_row(op) for op in ops]
    out = frame(
        [
            [
                v.id,
                v.created_at,
                v.actor,
                v.action,
                v.state,
                v.expected_count,
                v.done_count,
                v.skipped_count,
                v.rate_per_second,
                v.reason,
                FailedFilter.from_dict(v.filter).describe(),
                v.finished_at,
                v.error_message,
            ]
            for v in views
        ],
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
    out["created_at"] = pd.to_datetime(out["created_at"], utc=True)
    out["finished_at"] = pd.to_datetime(out["finished_at"], utc=True)
    return out
