"""The health page: the newest run of each safety net, recent runs, the providers' circuit
breakers and recent alerts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Alert, ProviderState, ReconcilerRun
from core.providers.circuit import CircuitState
from core.queries.common import MAX_ROWS, as_datetime, frame, result_frame, same_fields

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

    @classmethod
    def from_row(cls, kind: str, run: ReconcilerRun | None, *, now: datetime) -> RunnerState:
        """From the newest run of `kind` (None: it never ran); age is measured from its start."""
        if run is None:
            return cls(kind, None, None, None, None)
        age = (now - run.started_at).total_seconds()
        return cls(**same_fields(cls, run, kind=kind, age_seconds=age))


def runner_states(
    session: Session, *, now: datetime, kinds: Sequence[str] = RUN_KINDS
) -> list[RunnerState]:
    """The last run of each kind (one index probe each); age is measured from its start."""
    return [
        RunnerState.from_row(
            kind,
            session.execute(
                select(ReconcilerRun)
                .where(ReconcilerRun.kind == kind)
                .order_by(ReconcilerRun.started_at.desc())
                .limit(1)
            ).scalar_one_or_none(),
            now=now,
        )
        for kind in kinds
    ]


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
    out = result_frame(
        session.execute(
            query.order_by(ReconcilerRun.started_at.desc()).limit(min(limit, MAX_ROWS))
        ),
        "started_at",
        "finished_at",
    )
    out["duration_ms"] = ((out["finished_at"] - out["started_at"]).dt.total_seconds() * 1000).round(
        1
    )
    return out.drop(columns=["finished_at"])


def _circuit(provider: str, failures: int, opened_until: Any, now: datetime) -> str:
    until = as_datetime(opened_until) if opened_until is not None else None
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
    out = frame(
        data,
        ["provider", "circuit", "consecutive_failures", "opened_until", "last_error", "updated_at"],
    )
    out["opened_until"] = pd.to_datetime(out["opened_until"], utc=True)
    out["updated_at"] = pd.to_datetime(out["updated_at"], utc=True)
    return out


def recent_alerts(session: Session, *, limit: int = 50) -> pd.DataFrame:
    """The newest alerts: created_at, kind, message, delivered, suppressed."""
    return result_frame(
        session.execute(
            select(Alert.created_at, Alert.kind, Alert.message, Alert.delivered, Alert.suppressed)
            .order_by(Alert.created_at.desc())
            .limit(min(limit, MAX_ROWS))
        ),
        "created_at",
    )
