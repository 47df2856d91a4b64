"""The safety nets: what keeps the promise when the broker loses work.

    dispatcher      every minute  scheduled rows due within the horizon with no dispatch get a task;
                                  a broker that lost its marker gets everything within the horizon again
    marker check    every few s   each consumer looks for the marker; a lost one runs the
                                  dispatcher at once (seconds after a broker wipe, not a minute)
    backstop        every minute  due rows unclaimed past the grace period are dispatched again;
                                  processing rows whose lease ran out go back to scheduled;
                                  provider webhook events left unprocessed are processed;
                                  owner notifications left pending are sent
    failed retrier  hourly        transient failures older than the cool-off are requeued, up to a cap

Each run holds a single-runner lock, runs at most once per schedule slot, and writes a
`reconciler_runs` row (the console's reconciliation chart; `capsule health`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError

from core import alerts, health, notifications, webhooks
from core.bootstrap import App
from core.claims import recover_expired_lease
from core.db import session_scope
from core.deliveries import requeue_delivery
from core.dispatch import Enqueuer, dispatch, dispatch_many
from core.errors import CapsuleError, EnqueueError
from core.locks import single_runner
from core.models import AUTO_RETRY_CLASSES, Delivery, ReconcilerRun, Status
from core.policy import horizon_end

log = logging.getLogger(__name__)

DISPATCHER = "dispatcher"
BACKSTOP = "backstop"
FAILED_RETRIER = "failed_retrier"
KINDS = (DISPATCHER, BACKSTOP, FAILED_RETRIER)


@dataclass
class RunReport:
    kind: str
    found: int = 0
    requeued: int = 0
    recovered: int = 0
    errors: int = 0
    ran: bool = True
    error_message: str | None = None


Budget = Callable[[], bool]  # True while there is time left


def _budget(seconds: float, monotonic: Callable[[], float] = time.monotonic) -> Budget:
    deadline = monotonic() + seconds
    return lambda: monotonic() < deadline


# ---------------------------------------------------------------- dispatcher


def run_dispatcher(app: App, *, now: datetime, enqueuer: Enqueuer | None = None) -> RunReport:
    """Give every scheduled row due within the horizon and lacking a dispatch its task."""
    enqueuer = enqueuer or app.enqueuer
    report = RunReport(DISPATCHER)
    end = horizon_end(now, app.settings.dispatch_horizon_seconds)
    if enqueuer.ping() and not enqueuer.has_marker():
        report.recovered = _forget_dispatches(app, end, now)
        enqueuer.set_marker()
    last: tuple[datetime, uuid.UUID] | None = None
    while True:
        with session_scope(app.session_factory) as session:
            query = (
                select(Delivery.id, Delivery.next_attempt_at)
                .where(
                    Delivery.status == Status.SCHEDULED,
                    Delivery.next_attempt_at <= end,
                    Delivery.task_id.is_(None),
                )
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(app.settings.backstop_batch_size)
            )
            if last is not None:
                query = query.where(
                    or_(
                        Delivery.next_attempt_at > last[0],
                        (Delivery.next_attempt_at == last[0]) & (Delivery.id > last[1]),
                    )
                )
            rows = session.execute(query).all()
        if not rows:
            return report
        report.found += len(rows)
        enqueued, refused = dispatch_many(
            app.session_factory, enqueuer, [(i, due) for i, due in rows], now
        )
        report.requeued += enqueued
        report.errors += refused
        last = (rows[-1][1], rows[-1][0])


def redispatch_if_marker_lost(
    app: App,
    *,
    now: datetime,
    runner: str,
    clock: Callable[[], datetime],
    enqueuer: Enqueuer | None = None,
) -> RunReport | None:
    """The light check each consumer makes every few seconds: one read of the broker's marker.

    A broker that lost its data (and its marker with it) gets a dispatcher run at once, under
    the same single-runner lock, so what was due or queued is dispatched again within seconds.
    None when the marker is there or the broker cannot be asked; else the run's report (not
    `ran` when another runner held the lock: the next check tries again if still needed).
    """
    enqueuer = enqueuer or app.enqueuer
    try:
        if enqueuer.has_marker():
            return None
    except Exception as exc:  # the broker is away: the minute's runs and the backstop cope
        log.debug("marker check failed: %s", exc)
        return None
    log.warning("broker marker missing: running the dispatcher now")
    return run_safety_net(
        app, DISPATCHER, now=now, runner=runner, slot=None, clock=clock, enqueuer=enqueuer
    )


def _forget_dispatches(app: App, end: datetime, now: datetime) -> int:
    """The broker lost its data: every dispatch within the horizon is gone with it."""
    with session_scope(app.session_factory) as session:
        result = session.execute(
            update(Delivery)
            .where(
                Delivery.status == Status.SCHEDULED,
                Delivery.next_attempt_at <= end,
                Delivery.task_id.is_not(None),
            )
            .values(task_id=None, dispatched_at=None)
        )
        session.commit()
    count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        log.warning("broker marker missing: %d dispatches within the horizon are re-made", count)
    return count


# ---------------------------------------------------------------- backstop


def run_backstop(
    app: App,
    *,
    now: datetime,
    enqueuer: Enqueuer | None = None,
    grace_seconds: float | None = None,
    budget: Budget | None = None,
) -> RunReport:
    """Re-dispatch due rows nobody claimed; recover expired leases; send pending notices."""
    enqueuer = enqueuer or app.enqueuer
    settings = app.settings
    grace = timedelta(seconds=settings.grace_seconds if grace_seconds is None else grace_seconds)
    has_time = budget or _budget(settings.backstop_budget_seconds)
    report = RunReport(BACKSTOP)

    while has_time():
        batch = _take_unclaimed(app, now, now - grace)
        if not batch:
            break
        report.found += len(batch)
        for delivery_id in batch:
            if dispatch(app.session_factory, enqueuer, delivery_id, now, now):
                report.requeued += 1
            else:
                report.errors += 1

    while has_time():
        recovered = _recover_leases(app, now)
        if not recovered:
            break
        report.found += len(recovered)
        report.recovered += len(recovered)
        for delivery_id in recovered:
            if not dispatch(app.session_factory, enqueuer, delivery_id, now, now):
                report.errors += 1

    try:
        # provider events whose processing task was lost, or that came before their "sent"
        older = now - timedelta(seconds=settings.webhook_grace_seconds)
        processed = webhooks.process_pending(app, now=now, older_than=older)
        if processed:  # not a rescue of a letter: the reconciliation chart does not count it
            log.info("backstop processed %d stored webhook events", processed)
    except Exception as exc:
        log.error("processing stored webhook events failed: %s", exc)
        report.errors += 1
    try:
        notifications.send_pending(app, now=now, older_than=now - grace)
    except Exception as exc:  # a provider outage must not stop the backstop
        log.error("sending pending notifications failed: %s", exc)
        report.errors += 1
    return report


def _take_unclaimed(app: App, now: datetime, cutoff: datetime) -> list[uuid.UUID]:
    """Lock a batch of due, unclaimed rows and stamp them as dispatched now (this run owns them)."""
    with session_scope(app.session_factory) as session:
        ids = list(
            session.scalars(
                select(Delivery.id)
                .where(
                    Delivery.status == Status.SCHEDULED,
                    Delivery.next_attempt_at <= cutoff,
                    # strict: the stamp below (now) must take a row out of this run even
                    # when the grace period is zero
                    or_(Delivery.dispatched_at.is_(None), Delivery.dispatched_at < cutoff),
                )
                .order_by(Delivery.next_attempt_at)
                .limit(app.settings.backstop_batch_size)
                .with_for_update(skip_locked=True)
            )
        )
        if ids:
            session.execute(
                update(Delivery).where(Delivery.id.in_(ids)).values(task_id=None, dispatched_at=now)
            )
            session.commit()
    return ids


def _recover_leases(app: App, now: datetime) -> list[uuid.UUID]:
    with session_scope(app.session_factory) as session:
        ids = list(
            session.scalars(
                select(Delivery.id)
                .where(Delivery.status == Status.PROCESSING, Delivery.lease_until < now)
                .order_by(Delivery.lease_until)
                .limit(app.settings.backstop_batch_size)
                .with_for_update(skip_locked=True)
            )
        )
        recovered = [i for i in ids if recover_expired_lease(session, i, now=now)]
        session.commit()
    return recovered


# ---------------------------------------------------------------- failed retrier


def run_failed_retrier(app: App, *, now: datetime, enqueuer: Enqueuer | None = None) -> RunReport:
    """Requeue transient failures past the cool-off, under the total-attempt cap.

    Permanent, ambiguous and "possibly sent" failures, and unreadable letters, are never
    retried here.
    """
    # The inline reconcile passes its own enqueuer: the same app, another broker seam.
    deps = replace(app, enqueuer=enqueuer) if enqueuer else app
    settings = app.settings
    report = RunReport(FAILED_RETRIER)
    with session_scope(app.session_factory) as session:
        ids = list(
            session.scalars(
                select(Delivery.id)
                .where(
                    Delivery.status == Status.FAILED,
                    Delivery.error_class.in_(AUTO_RETRY_CLASSES),
                    Delivery.failed_at <= now - timedelta(seconds=settings.retry_cooloff_seconds),
                    Delivery.attempt_count < settings.retry_max_total_attempts,
                )
                .order_by(Delivery.failed_at)
                .limit(settings.backstop_batch_size)
            )
        )
    for delivery_id in ids:
        report.found += 1
        try:
            requeue_delivery(
                deps,
                delivery_id,
                now=now,
                actor=FAILED_RETRIER,
                reason=f"automatic retry after a transient failure older than {settings.retry_cooloff_seconds} s",
                event="delivery.auto_retry",
            )
            report.requeued += 1
        except CapsuleError as exc:
            log.warning("auto retry of %s skipped: %s", delivery_id, exc)
            report.errors += 1
    return report


# ---------------------------------------------------------------- running them


RUNNERS: dict[str, Callable[..., RunReport]] = {
    DISPATCHER: run_dispatcher,
    BACKSTOP: run_backstop,
    FAILED_RETRIER: run_failed_retrier,
}


def slot_for(kind: str, now: datetime) -> datetime:
    """The schedule slot a periodic run belongs to: its minute (the retrier: its hour)."""
    if kind == FAILED_RETRIER:
        return now.replace(minute=0, second=0, microsecond=0)
    return now.replace(second=0, microsecond=0)


@contextmanager
def _run_row(
    app: App, kind: str, runner: str, slot: datetime | None, now: datetime
) -> Iterator[ReconcilerRun | None]:
    """Insert the run's row; None when another consumer already ran this slot.

    Called under the single-runner lock, which a runner holds until its row is finished: a
    slot whose row is unfinished belongs to a runner that died mid-run (SIGKILL, OOM), and
    this run takes it over rather than leave the slot's work undone until the next slot.
    """
    with session_scope(app.session_factory) as session:
        existing = (
            session.scalar(
                select(ReconcilerRun).where(ReconcilerRun.kind == kind, ReconcilerRun.slot == slot)
            )
            if slot is not None
            else None
        )
        if existing is not None:
            if existing.finished_at is not None:
                yield None
                return
            log.warning("%s: the run for slot %s never finished; running it again", kind, slot)
            existing.runner, existing.started_at = runner, now
            session.commit()  # the row stays loaded: no transaction is open during the run
            yield existing
            return
        row = ReconcilerRun(kind=kind, runner=runner, slot=slot, started_at=now)
        session.add(row)
        try:
            session.commit()
        except IntegrityError:
            yield None
            return
        yield row


def run_safety_net(
    app: App,
    kind: str,
    *,
    now: datetime,
    runner: str,
    slot: datetime | None,
    clock: Callable[[], datetime],
    enqueuer: Enqueuer | None = None,
    alerter: alerts.Alerter | None = None,
    **options: object,
) -> RunReport:
    """Run one safety net under the single-runner lock, once per slot, and record it.

    `slot=None` (the CLI) skips the once-per-slot check but still takes the lock.
    """
    alerter = alerter or alerts.Alerter(app.settings, app.session_factory)
    with single_runner(app.engine, f"safety-net-{kind}", app.settings.var_path / "locks") as held:
        if not held:
            return RunReport(kind, ran=False)
        with _run_row(app, kind, runner, slot, now) as row:
            if row is None:
                return RunReport(kind, ran=False)
            try:
                report = RUNNERS[kind](app, now=now, enqueuer=enqueuer, **options)
            except Exception as exc:
                log.exception("%s run failed", kind)
                report = RunReport(kind, errors=1, error_message=f"{type(exc).__name__}: {exc}")
            _finish(app, row, report, clock())
    _after(app, report, alerter, now)
    return report


def _finish(app: App, row: ReconcilerRun, report: RunReport, finished: datetime) -> None:
    with session_scope(app.session_factory) as session:
        session.execute(
            update(ReconcilerRun)
            .where(ReconcilerRun.id == row.id)
            .values(
                finished_at=finished,
                found=report.found,
                requeued=report.requeued,
                recovered=report.recovered,
                errors=report.errors,
                error_message=report.error_message,
                ok=report.error_message is None,
            )
        )
        session.commit()


def _after(app: App, report: RunReport, alerter: alerts.Alerter, now: datetime) -> None:
    if report.error_message:
        alerter.alert(
            alerts.RUN_ERROR, f"{report.kind} run failed: {report.error_message}", now=now
        )
        return
    if report.kind == BACKSTOP:
        stuck = report.found
        if stuck > app.settings.alert_stuck_threshold:
            alerter.alert(
                alerts.STUCK,
                f"backstop found {stuck} stuck deliveries ({report.recovered} with expired leases)",
                now=now,
            )
        _alert_missing_keys(app, alerter, now)
        alerter.heartbeat()


def _alert_missing_keys(app: App, alerter: alerts.Alerter, now: datetime) -> None:
    """Letters waiting for a key out of the keyring: one alert per window (rate limited)."""
    try:
        with session_scope(app.session_factory) as session:
            waiting = health.waiting_for_keys(session, app.settings, now)
    except Exception as exc:  # a failed count must not stop the heartbeat
        log.error("counting letters that wait for a key failed: %s", exc)
        return
    if waiting:
        alerter.alert(alerts.MISSING_KEY, health.describe_waiting(waiting), now=now)


def deliver_inline(app: App, *, now: datetime, clock: Callable[[], datetime], runner: str) -> int:
    """Broker unreachable: deliver every due, unclaimed row in this process. Returns how many
    of them were sent."""
    from core.worker import run_delivery

    inline = InlineEnqueuer(now)
    run_safety_net(app, DISPATCHER, now=now, runner=runner, slot=None, clock=clock, enqueuer=inline)
    run_safety_net(
        app,
        BACKSTOP,
        now=now,
        runner=runner,
        slot=None,
        clock=clock,
        enqueuer=inline,
        grace_seconds=0,
    )
    for delivery_id, task_id in inline.taken:
        run_delivery(app, delivery_id, task_id, clock=clock)
    # Counted from the rows: a run that leads a batch sends its companions too, and their own
    # runs then find nothing to claim.
    taken = [delivery_id for delivery_id, _ in inline.taken]
    with session_scope(app.session_factory) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.id.in_(taken), Delivery.status == Status.SENT)
            )
            or 0
        )


class InlineEnqueuer:
    """Collects due deliveries to run in-process; leaves not-yet-due ones for the dispatcher."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.taken: list[tuple[uuid.UUID, str]] = []
        self._seen: set[uuid.UUID] = set()

    def enqueue(self, delivery_id: uuid.UUID, eta: datetime) -> str:
        if eta > self.now:
            raise EnqueueError(delivery_id, "not due yet; left for the dispatcher")
        task_id = f"inline-{uuid.uuid4().hex[:25]}"
        if delivery_id not in self._seen:
            self._seen.add(delivery_id)
            self.taken.append((delivery_id, task_id))
        return task_id

    def revoke(self, task_id: str) -> None:
        return None

    def ping(self) -> bool:
        return True

    def has_marker(self) -> bool:
        return True  # the real broker's marker is not ours to judge from here

    def set_marker(self) -> None:
        return None
