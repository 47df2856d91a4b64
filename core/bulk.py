"""Bulk requeues of failed deliveries, run in the background at a chosen rate by ops.

    preview / dry_run        count, sample and consequences of a filter; writes nothing
    launch                   ops only: confirm the count, record a bulk_operations row, enqueue
    run_operation            the background runner (tasks/bulk.py), one row at a time:
                               pending → running → done | aborted | error
    request_abort            ops only: pending → aborted, running → aborting (the runner stops
                             before its next row and sets aborted)

The filter is pinned at launch (`failed_until` = now), so rows that fail later never join a
confirmed set, and the runner never processes more rows than were confirmed. Guard rails:
"any class" means the classes safe to send again (`ambiguous`, `possibly_sent` and
`decryption` failures join only when chosen by name, with a warning); one operation touches at
most CAPSULE_BULK_MAX_ROWS rows; and while an operation is active, no other whose filter could
match the same rows may start. Each row is
checked against the filter again when the runner reaches it, and the requeue transition
itself compare-and-sets the row: a row that changed in between is counted as skipped.
Core never imports Huey: `launch` is handed the function that enqueues the runner.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, false, func, or_, select, update
from sqlalchemy.orm import Session

from core import audit, credits
from core.bootstrap import App
from core.db import SessionFactory, session_scope
from core.deliveries import requeue_delivery
from core.errors import (
    BulkConflict,
    DeliveryNotFound,
    InsufficientCredit,
    InvalidTransition,
    NotFound,
    ValidationError,
)
from core.failed_filter import (
    FailedFilter,
    count_by_provider,
    failed_conditions,
    failed_count,
    overlaps,
)
from core.locks import lock_key
from core.models import BulkOperation, CreditEntry, Delivery, ErrorClass
from core.operators import Operator, Role, require
from core.policy import Clock
from core.triage import required_reason

if TYPE_CHECKING:  # the console's read models bring pandas, which the runner never needs
    import pandas as pd

    from core.queries.bulk import BulkView

log = logging.getLogger(__name__)

REQUEUE = "requeue"
BULK_EVENT = "delivery.bulk_requeued"
MAX_RATE_PER_SECOND = 100.0
DEFAULT_RATE_PER_SECOND = 5.0
BATCH_SIZE = 100
STALE_AFTER = timedelta(minutes=5)  # a running operation silent this long is presumed dead

Sleep = Callable[[float], None]
Enqueue = Callable[[int], str]

ACTIVE_BULK_STATES = frozenset({"pending", "running", "aborting"})

# The provider may have accepted these (a requeue could deliver the letter twice), or the
# letter could not be opened (the key must be back first, or it was tampered with). "Any class"
# leaves them out; an operator who names them sees RISK_WARNINGS.
MAY_HAVE_ARRIVED = (ErrorClass.AMBIGUOUS.value, ErrorClass.POSSIBLY_SENT.value)
RISKY_CLASSES = (*MAY_HAVE_ARRIVED, ErrorClass.DECRYPTION.value)
# What "any class" means for a bulk requeue (a missing key never fails a delivery).
ANY_SAFE_CLASS = tuple(
    c.value for c in ErrorClass if c.value not in RISKY_CLASSES and c != ErrorClass.MISSING_KEY
)


def effective(flt: FailedFilter) -> FailedFilter:
    """The filter a bulk operation really uses: "any class" becomes every class safe to resend."""
    return flt if flt.error_classes else replace(flt, error_classes=ANY_SAFE_CLASS)


def risk_warnings(by_class: dict[str, int]) -> list[str]:
    """The warnings for the risky classes among matching rows (class → count), as in triage."""
    warnings = []
    arrived = {c: n for c, n in by_class.items() if c in MAY_HAVE_ARRIVED and n}
    if arrived:
        warnings.append(
            f"{sum(arrived.values()):,} of these may already have reached the recipient "
            f"({', '.join(sorted(arrived))}): check the provider's log before sending again, "
            "or the recipient may get the letter twice."
        )
    unreadable = by_class.get(ErrorClass.DECRYPTION.value, 0)
    if unreadable:
        warnings.append(
            f"{unreadable:,} of these could not be decrypted: requeue them only once the cause "
            "is fixed; a letter whose key is present and still fails may have been tampered "
            "with (a security incident)."
        )
    return warnings


# ---------------------------------------------------------------- before launching


@dataclass(frozen=True)
class Preview:
    """What a filter matches right now."""

    filter: FailedFilter
    count: int
    sample: pd.DataFrame = field(repr=False)
    # risky class → matching rows: included (named in the filter) or left out ("any class")
    risky: dict[str, int] = field(default_factory=dict)
    left_out: dict[str, int] = field(default_factory=dict)
    active: BulkView | None = None  # an active operation this one would overlap

    @property
    def warnings(self) -> list[str]:
        return risk_warnings(self.risky)


def _risky_counts(session: Session, flt: FailedFilter) -> dict[str, int]:
    where = failed_conditions(flt, with_error_class=False)
    classes = [c for c in RISKY_CLASSES if not flt.error_classes or c in flt.error_classes]
    if not classes:
        return {}
    return {
        str(c): int(n)
        for c, n in session.execute(
            select(Delivery.error_class, func.count())
            .where(*where, Delivery.error_class.in_(classes))
            .group_by(Delivery.error_class)
        )
    }


def preview(session: Session, flt: FailedFilter, *, now: datetime, sample: int = 20) -> Preview:
    """The pinned filter, its count and the newest `sample` matching rows, the risky classes it
    includes or leaves out, and an active operation it would collide with."""
    # The console's: its sample is a DataFrame, so pandas is imported here, never by the runner.
    from core.queries.bulk import bulk_operation
    from core.queries.failed import failed_deliveries

    pinned = effective(flt).pinned(now)
    risky = _risky_counts(session, flt.pinned(now))
    chosen = set(flt.error_classes)
    conflict = conflicting(session, pinned)
    return Preview(
        pinned,
        failed_count(session, pinned),
        failed_deliveries(session, pinned, limit=sample),
        risky={c: n for c, n in risky.items() if c in chosen},
        left_out={c: n for c, n in risky.items() if c not in chosen},
        active=bulk_operation(session, conflict.id) if conflict is not None else None,
    )


def conflicting(session: Session, flt: FailedFilter) -> BulkOperation | None:
    """The oldest active operation whose pinned filter overlaps `flt`, if any."""
    active = session.scalars(
        select(BulkOperation)
        .where(BulkOperation.state.in_(sorted(ACTIVE_BULK_STATES)))
        .order_by(BulkOperation.id)
    ).all()
    return next(
        (op for op in active if overlaps(FailedFilter.from_dict(dict(op.filter)), flt)), None
    )


def _serialize_launches(session: Session) -> None:
    """Make concurrent launches check for conflicts one after the other (until commit)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(lock_key("bulk-launch"))))
    else:
        # SQLite: a write, even of no row, takes the database's write lock for the transaction
        session.execute(update(BulkOperation).where(false()).values(state=BulkOperation.state))


@dataclass(frozen=True)
class DryRun:
    """What a requeue of the filter would do, computed without changing anything."""

    count: int
    by_error_class: dict[str, int]
    by_provider: dict[str, int]
    needs_credit: int  # rows whose credit was refunded (permanent failures): requeue reserves
    short_of_credit: int  # of those, rows whose owner has no credit left: they would be skipped
    first_ids: list[str]
    estimated_seconds: float

    @property
    def would_requeue(self) -> int:
        return self.count - self.short_of_credit


def dry_run(
    session: Session,
    flt: FailedFilter,
    *,
    now: datetime,
    rate_per_second: float = DEFAULT_RATE_PER_SECOND,
) -> DryRun:
    """Counts by error class and provider, credit shortfalls, and how long it would take."""
    pinned = effective(flt).pinned(now)
    where = failed_conditions(pinned)
    count = failed_count(session, pinned)
    by_class = {
        str(c or "unknown"): int(n)
        for c, n in session.execute(
            select(Delivery.error_class, func.count()).where(*where).group_by(Delivery.error_class)
        )
    }
    by_provider = {str(p or "none"): n for p, n in count_by_provider(session, pinned)}
    # Per owner: rows that would have to reserve a credit again, against the owner's balance.
    needing = session.execute(
        select(Delivery.user_id, func.count())
        .where(*where, credits.held_expr(Delivery.id) < 1)
        .group_by(Delivery.user_id)
    ).all()
    short = 0
    if needing:
        balances = {
            user_id: int(total or 0)
            for user_id, total in session.execute(
                select(CreditEntry.user_id, func.sum(CreditEntry.amount))
                .where(CreditEntry.user_id.in_([u for u, _ in needing]))
                .group_by(CreditEntry.user_id)
            )
        }
        short = sum(max(0, int(n) - max(0, int(balances.get(u) or 0))) for u, n in needing)
    first = session.scalars(
        select(Delivery.id).where(*where).order_by(Delivery.failed_at, Delivery.id).limit(5)
    ).all()
    return DryRun(
        count=count,
        by_error_class=by_class,
        by_provider=by_provider,
        needs_credit=sum(int(n) for _, n in needing),
        short_of_credit=short,
        first_ids=[str(i) for i in first],
        estimated_seconds=count / validate_rate(rate_per_second),
    )


def validate_rate(rate_per_second: float) -> float:
    rate = float(rate_per_second)
    if not 0 < rate <= MAX_RATE_PER_SECOND:
        raise ValidationError(
            "rate_per_second",
            f"the rate must be above 0 and at most {MAX_RATE_PER_SECOND:g} per second",
        )
    return rate


# ---------------------------------------------------------------- launching and aborting


@dataclass(frozen=True)
class Launched:
    operation_id: int
    task_id: str | None
    state: str
    expected_count: int


def launch(
    app: App,
    operator: Operator,
    flt: FailedFilter,
    *,
    reason: str,
    confirm_count: int,
    rate_per_second: float,
    now: datetime,
    enqueue: Enqueue,
) -> Launched:
    """Record a bulk requeue of the rows `flt` matches now and hand it to the background runner.

    `confirm_count` is the count the operator typed: it must equal what matches at this moment.
    "Any class" leaves out the risky classes (`effective`). Refused above the row cap, and while
    an active operation's filter overlaps this one (BulkConflict names it).
    If the broker refuses the task, the operation ends in state error (nothing was touched).
    """
    require(operator, Role.OPS, "run bulk operations")
    why = required_reason(reason)
    rate = validate_rate(rate_per_second)
    pinned = effective(flt).pinned(now)
    cap = app.settings.bulk_max_rows
    with session_scope(app.session_factory) as session:
        _serialize_launches(session)
        count = _launchable_count(session, pinned, cap, confirm_count)
        op = BulkOperation(
            action=REQUEUE,
            filter=pinned.to_dict(),
            actor=operator.identity,
            reason=why,
            expected_count=count,
            rate_per_second=rate,
            state="pending",
            created_at=now,
            updated_at=now,
        )
        session.add(op)
        session.flush()
        operation_id = op.id
        audit.record(
            session,
            "bulk.created",
            actor=operator.identity,
            now=now,
            reason=why,
            data={
                "operation_id": operation_id,
                "action": REQUEUE,
                "filter": pinned.to_dict(),
                "expected_count": count,
                "rate_per_second": rate,
            },
        )
        session.commit()
    try:
        task_id = enqueue(operation_id)
    except Exception as exc:  # the broker is down: say so on the operation, touch nothing
        log.warning("could not enqueue bulk operation %s: %s", operation_id, exc)
        _finish(
            app.session_factory,
            operation_id,
            "error",
            now,
            error=f"could not queue the background task: {exc}",
            from_states=("pending",),
        )
        return Launched(operation_id, None, "error", count)
    with session_scope(app.session_factory) as session:
        session.execute(
            update(BulkOperation).where(BulkOperation.id == operation_id).values(task_id=task_id)
        )
        session.commit()
    return Launched(operation_id, task_id, "pending", count)


def _launchable_count(session: Session, pinned: FailedFilter, cap: int, confirm_count: int) -> int:
    """The count the pinned filter matches: above 0, at most `cap`, no overlap, as confirmed."""
    count = failed_count(session, pinned)
    if count == 0:
        raise ValidationError("filter", "no failed delivery matches this filter")
    if count > cap:
        raise ValidationError(
            "filter",
            f"{count:,} deliveries match; one bulk operation may touch at most {cap:,} "
            "(CAPSULE_BULK_MAX_ROWS): narrow the filter (error class, provider, dates, "
            "domain) and run it in parts",
        )
    running = conflicting(session, pinned)
    if running is not None:
        raise BulkConflict(running.id, conflict_message(running))
    if int(confirm_count) != count:
        raise ValidationError(
            "confirm_count",
            f"{count} deliveries match now, not {confirm_count}: check the preview and "
            "type the new count",
        )
    return count


def conflict_message(op: BulkOperation | BulkView) -> str:
    described = FailedFilter.from_dict(dict(op.filter)).describe()
    return (
        f"bulk operation #{op.id} ({op.state}, by {op.actor}: {described}) may touch the same "
        "deliveries: wait until it ends, or abort it, before starting another on an "
        "overlapping filter"
    )


def request_abort(
    session_factory: SessionFactory,
    operator: Operator,
    operation_id: int,
    *,
    now: datetime,
    reason: str | None = None,
) -> str:
    """Stop an operation; returns its new state (aborted, or aborting while the runner stops).

    A running operation whose runner has been silent for STALE_AFTER is presumed dead and is
    aborted at once.
    """
    require(operator, Role.OPS, "abort bulk operations")
    with session_scope(session_factory) as session:
        op = session.get(BulkOperation, operation_id, populate_existing=True)
        if op is None:
            raise NotFound("bulk operation", operation_id)
        if op.state == "pending" or (
            op.state in ("running", "aborting") and op.updated_at < now - STALE_AFTER
        ):
            new_state = "aborted"
        elif op.state == "running":
            new_state = "aborting"
        else:
            raise ValidationError("state", f"bulk operation {operation_id} is already {op.state}")
        values: dict[str, Any] = {"state": new_state, "updated_at": now}
        if new_state == "aborted":
            values["finished_at"] = now
        session.execute(
            update(BulkOperation)
            .where(BulkOperation.id == operation_id, BulkOperation.state == op.state)
            .values(**values)
        )
        audit.record(
            session,
            "bulk.abort_requested",
            actor=operator.identity,
            now=now,
            reason=reason,
            data={"operation_id": operation_id, "from": op.state, "to": new_state},
        )
        session.commit()
    return new_state


# ---------------------------------------------------------------- the runner


@dataclass(frozen=True)
class RunResult:
    operation_id: int
    state: str
    done: int
    skipped: int


def _finish(
    session_factory: SessionFactory,
    operation_id: int,
    state: str,
    now: datetime,
    *,
    error: str | None = None,
    from_states: tuple[str, ...] = ("running", "aborting"),
    data: dict[str, Any] | None = None,
) -> bool:
    with session_scope(session_factory) as session:
        result = session.execute(
            update(BulkOperation)
            .where(BulkOperation.id == operation_id, BulkOperation.state.in_(from_states))
            .values(state=state, finished_at=now, updated_at=now, error_message=error)
        )
        changed = bool(getattr(result, "rowcount", 0) == 1)
        if changed:
            op = session.get(BulkOperation, operation_id)
            audit.record(
                session,
                f"bulk.{state}",
                actor=op.actor if op is not None else audit.SYSTEM,
                now=now,
                reason=error,
                data={"operation_id": operation_id, **(data or {})},
            )
        session.commit()
    return changed


def _next_batch(
    session: Session, where: list[Any], after: tuple[datetime, uuid.UUID] | None, size: int
) -> list[tuple[uuid.UUID, datetime]]:
    query = select(Delivery.id, Delivery.failed_at).where(*where)
    if after is not None:
        at, last_id = after
        query = query.where(
            or_(Delivery.failed_at > at, and_(Delivery.failed_at == at, Delivery.id > last_id))
        )
    rows = session.execute(query.order_by(Delivery.failed_at, Delivery.id).limit(size)).all()
    return [(row[0], row[1]) for row in rows if row[1] is not None]


def _matching_version(
    session_factory: SessionFactory, delivery_id: uuid.UUID, where: list[Any]
) -> int | None:
    """The row's version if it still matches the filter, else None."""
    with session_scope(session_factory) as session:
        return session.scalar(select(Delivery.version).where(Delivery.id == delivery_id, *where))


def _progress(
    session_factory: SessionFactory, operation_id: int, done: int, skipped: int, now: datetime
) -> str:
    """Write the counters; return the operation's state (an abort shows up here)."""
    with session_scope(session_factory) as session:
        session.execute(
            update(BulkOperation)
            .where(BulkOperation.id == operation_id)
            .values(done_count=done, skipped_count=skipped, updated_at=now)
        )
        state = session.scalar(select(BulkOperation.state).where(BulkOperation.id == operation_id))
        session.commit()
    return str(state)


def run_operation(
    app: App,
    operation_id: int,
    *,
    clock: Clock,
    sleep: Sleep = time.sleep,
    batch_size: int = BATCH_SIZE,
) -> RunResult:
    """Requeue the operation's rows one by one at its rate, until done, aborted or failed.

    Claims the operation (pending → running) first, so a duplicate task does nothing. Between
    rows it paces itself with `sleep` against `clock` and reads the state to see an abort.
    """
    factory = app.session_factory
    started = clock()
    with session_scope(factory) as session:
        claimed = session.execute(
            update(BulkOperation)
            .where(BulkOperation.id == operation_id, BulkOperation.state == "pending")
            .values(state="running", updated_at=started)
        )
        op = session.get(BulkOperation, operation_id, populate_existing=True)
        session.commit()
    if op is None:
        raise NotFound("bulk operation", operation_id)
    if getattr(claimed, "rowcount", 0) != 1:
        log.info("bulk operation %s is %s; nothing to run", operation_id, op.state)
        return RunResult(operation_id, op.state, op.done_count, op.skipped_count)

    flt = FailedFilter.from_dict(dict(op.filter))
    where = failed_conditions(flt)
    interval = 1.0 / op.rate_per_second
    reason = f"bulk #{operation_id}: {op.reason}"
    done = skipped = 0
    skips: dict[str, int] = {}
    after: tuple[datetime, uuid.UUID] | None = None
    try:
        while done + skipped < op.expected_count:
            with session_scope(factory) as session:
                batch = _next_batch(
                    session, where, after, min(batch_size, op.expected_count - done - skipped)
                )
            if not batch:
                break
            for delivery_id, failed_at in batch:
                after = (failed_at, delivery_id)
                wait = started + timedelta(seconds=(done + skipped) * interval) - clock()
                if wait.total_seconds() > 0:
                    sleep(wait.total_seconds())
                outcome = _requeue_one(app, delivery_id, where, op.actor, reason, clock())
                if outcome == "done":
                    done += 1
                else:
                    skipped += 1
                    skips[outcome] = skips.get(outcome, 0) + 1
                state = _progress(factory, operation_id, done, skipped, clock())
                if state == "aborting":
                    _finish(
                        factory,
                        operation_id,
                        "aborted",
                        clock(),
                        data={"done": done, "skipped": skipped},
                    )
                    return RunResult(operation_id, "aborted", done, skipped)
                if state != "running":  # aborted outright (presumed dead), or edited by hand
                    return RunResult(operation_id, state, done, skipped)
    except Exception as exc:
        log.exception("bulk operation %s failed", operation_id)
        _progress(factory, operation_id, done, skipped, clock())
        _finish(factory, operation_id, "error", clock(), error=f"{type(exc).__name__}: {exc}")
        return RunResult(operation_id, "error", done, skipped)
    _finish(
        factory,
        operation_id,
        "done",
        clock(),
        data={"done": done, "skipped": skipped, "skip_reasons": skips},
    )
    return RunResult(operation_id, "done", done, skipped)


def _requeue_one(
    app: App, delivery_id: uuid.UUID, where: list[Any], actor: str, reason: str, now: datetime
) -> str:
    """'done', or why the row was skipped: changed | no_credit."""
    version = _matching_version(app.session_factory, delivery_id, where)
    if version is None:
        return "changed"
    try:
        # expected_version: the requeue's compare-and-set succeeds only on the very row
        # version that matched the filter, so a row that changed in between is skipped.
        requeue_delivery(
            app,
            delivery_id,
            now=now,
            actor=actor,
            reason=reason,
            event=BULK_EVENT,
            expected_version=version,
        )
    except (InvalidTransition, DeliveryNotFound):
        return "changed"
    except InsufficientCredit:
        return "no_credit"
    return "done"


# ---------------------------------------------------------------- resuming

RESUMABLE_STATES = ("aborted", "error")
RESUMED_EVENT = "bulk.resumed"


def resume(
    app: App,
    operator: Operator,
    operation_id: int,
    *,
    reason: str,
    confirm_count: int,
    rate_per_second: float | None,
    now: datetime,
    enqueue: Enqueue,
) -> Launched:
    """Requeue what an aborted (or failed) operation left: a new operation on its pinned filter.

    The rows it requeued are not failed any more and rows that failed after its launch were
    never in its filter, so the same filter now matches exactly the rows left. The new
    operation goes through `launch` (the same count confirmation, guard rails and audit);
    a `bulk.resumed` event links it to the one it continues. `rate_per_second` None keeps the
    old rate.
    """
    require(operator, Role.OPS, "run bulk operations")
    with session_scope(app.session_factory) as session:
        op = session.get(BulkOperation, operation_id, populate_existing=True)
        if op is None:
            raise NotFound("bulk operation", operation_id)
        if op.state not in RESUMABLE_STATES:
            raise ValidationError(
                "state",
                f"bulk operation {operation_id} is {op.state}: only an aborted or failed "
                "operation can be resumed",
            )
        flt = FailedFilter.from_dict(dict(op.filter))
        rate = op.rate_per_second if rate_per_second is None else rate_per_second
    launched = launch(
        app,
        operator,
        flt,
        reason=reason,
        confirm_count=confirm_count,
        rate_per_second=rate,
        now=now,
        enqueue=enqueue,
    )
    with session_scope(app.session_factory) as session:
        audit.record(
            session,
            RESUMED_EVENT,
            actor=operator.identity,
            now=now,
            reason=required_reason(reason),
            data={"operation_id": launched.operation_id, "resumes": operation_id},
        )
        session.commit()
    return launched
