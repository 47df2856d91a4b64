"""A circuit breaker per provider, shared by every consumer through `provider_states`.

    closed ──(threshold consecutive failures)──▶ open ──(reset_seconds)──▶ half-open
      ▲                                                                       │
      └──────────────── the one trial call succeeds ◀─────────────────────────┘
                        (a failed trial leaves it open for another reset period)

Half-open admits exactly one trial across all consumers: whoever moves `opened_until` forward
with a compare-and-set gets it. Reads come from an in-process cache refreshed at most every
`refresh_seconds`, and a success writes only when failures were recorded, so the hot path of
a healthy provider does no database I/O. The breaker fails open: if the database cannot be
reached it lets calls through rather than stop every delivery.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import CursorResult, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.db import SessionFactory, session_scope
from core.models import ProviderState

log = logging.getLogger(__name__)

OnOpen = Callable[[str, str], None]
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class CircuitState:
    """One provider's breaker as last read."""

    provider: str
    consecutive_failures: int = 0
    opened_until: datetime | None = None
    last_error: str | None = None

    @property
    def is_clean(self) -> bool:
        """No failure counted and never opened since the last success."""
        return self.consecutive_failures == 0 and self.opened_until is None

    def status(self, now: datetime) -> str:
        """closed, open, or half_open (the open period is over; a trial may run)."""
        if self.opened_until is None:
            return CLOSED
        return OPEN if now < self.opened_until else HALF_OPEN


@dataclass(frozen=True)
class _Cached:
    state: CircuitState
    read_at: datetime


class CircuitBreaker:
    """Opens a provider's circuit after `threshold` consecutive failures, for `reset_seconds`."""

    def __init__(
        self,
        session_factory: SessionFactory,
        *,
        threshold: int,
        reset_seconds: float,
        refresh_seconds: float = 2.0,
        on_open: OnOpen | None = None,
    ) -> None:
        self._sessions = session_factory
        self.threshold = max(1, threshold)
        self.reset = timedelta(seconds=reset_seconds)
        self._refresh = timedelta(seconds=refresh_seconds)
        self._on_open = on_open
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def state(self, provider: str, *, now: datetime) -> CircuitState:
        """The provider's state, from the cache unless it is older than `refresh_seconds`."""
        with self._lock:
            cached = self._cache.get(provider)
        if cached is not None and cached.read_at <= now < cached.read_at + self._refresh:
            return cached.state
        try:
            with session_scope(self._sessions) as session:
                state = _read(session, provider)
        except SQLAlchemyError as exc:
            log.warning("circuit %s: cannot read state (%s); assuming closed", provider, exc)
            return cached.state if cached is not None else CircuitState(provider)
        self._remember(state, now)
        return state

    def allow(self, provider: str, *, now: datetime) -> bool:
        """May a call go to this provider now? In half-open, True for exactly one caller."""
        state = self.state(provider, now=now)
        status = state.status(now)
        if status == CLOSED:
            return True
        if status == OPEN:
            return False
        return self._claim_trial(provider, now)

    def record_success(self, provider: str, *, now: datetime) -> None:
        """Close the circuit; writes only if failures or an opening were recorded."""
        with self._lock:
            cached = self._cache.get(provider)
        if cached is not None and cached.state.is_clean:
            return
        try:
            with session_scope(self._sessions) as session:
                session.execute(
                    update(ProviderState)
                    .where(
                        ProviderState.provider == provider,
                        or_(
                            ProviderState.consecutive_failures > 0,
                            ProviderState.opened_until.is_not(None),
                        ),
                    )
                    .values(consecutive_failures=0, opened_until=None, updated_at=now)
                )
                session.commit()
        except SQLAlchemyError as exc:
            log.warning("circuit %s: cannot record success (%s)", provider, exc)
        self._remember(CircuitState(provider), now)

    def record_failure(self, provider: str, *, now: datetime, message: str) -> None:
        """Count one more consecutive failure; open the circuit on reaching the threshold."""
        try:
            with session_scope(self._sessions) as session:
                state, opened = self._count_failure(session, provider, now, message)
                session.commit()
        except SQLAlchemyError as exc:
            log.warning("circuit %s: cannot record failure (%s)", provider, exc)
            return
        self._remember(state, now)
        if opened:
            self._opened(provider, state)

    def _count_failure(
        self, session: Session, provider: str, now: datetime, message: str
    ) -> tuple[CircuitState, bool]:
        failures, opened_until = _increment(session, provider, now, message[:500])
        opened = False
        if failures >= self.threshold and (opened_until is None or opened_until <= now):
            # Compare-and-set: among consumers failing at once, exactly one opens the circuit.
            until = now + self.reset
            result = session.execute(
                update(ProviderState)
                .where(
                    ProviderState.provider == provider,
                    or_(ProviderState.opened_until.is_(None), ProviderState.opened_until <= now),
                )
                .values(opened_until=until)
            )
            opened = _rowcount(result) == 1
            opened_until = until if opened else _read(session, provider).opened_until
        return CircuitState(provider, failures, opened_until, message[:500]), opened

    def _claim_trial(self, provider: str, now: datetime) -> bool:
        try:
            with session_scope(self._sessions) as session:
                result = session.execute(
                    update(ProviderState)
                    .where(
                        ProviderState.provider == provider,
                        ProviderState.opened_until.is_not(None),
                        ProviderState.opened_until <= now,
                    )
                    .values(opened_until=now + self.reset, updated_at=now)
                )
                won = _rowcount(result) == 1
                state = _read(session, provider)
                session.commit()
        except SQLAlchemyError as exc:
            log.warning("circuit %s: cannot claim the trial call (%s); allowing it", provider, exc)
            return True
        self._remember(state, now)
        # Losing the race is fine when the winner already closed the circuit.
        return won or state.opened_until is None

    def _remember(self, state: CircuitState, now: datetime) -> None:
        with self._lock:
            self._cache[state.provider] = _Cached(state, now)

    def _opened(self, provider: str, state: CircuitState) -> None:
        message = (
            f"circuit for {provider} opened after {state.consecutive_failures} consecutive "
            f"failures, until {state.opened_until:%Y-%m-%d %H:%M:%S} UTC; last error: {state.last_error}"
        )
        log.warning(message)
        if self._on_open is None:
            return
        try:
            self._on_open(provider, message)
        except Exception:
            log.exception("circuit %s: on_open hook failed", provider)


def _read(session: Session, provider: str) -> CircuitState:
    row = session.execute(
        select(
            ProviderState.consecutive_failures,
            ProviderState.opened_until,
            ProviderState.last_error,
        ).where(ProviderState.provider == provider)
    ).first()
    if row is None:
        return CircuitState(provider)
    return CircuitState(provider, row.consecutive_failures, row.opened_until, row.last_error)


def _increment(
    session: Session, provider: str, now: datetime, message: str
) -> tuple[int, datetime | None]:
    """Upsert +1 failure; returns the new count and the current opened_until."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = (
        insert(ProviderState)
        .values(provider=provider, consecutive_failures=1, last_error=message, updated_at=now)
        .on_conflict_do_update(
            index_elements=["provider"],
            set_={
                "consecutive_failures": ProviderState.consecutive_failures + 1,
                "last_error": message,
                "updated_at": now,
            },
        )
        .returning(ProviderState.consecutive_failures, ProviderState.opened_until)
    )
    row = session.execute(statement).one()
    return int(row.consecutive_failures), row.opened_until


def _rowcount(result: object) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)
