"""Prometheus metrics: per-process series from the consumers, database gauges from one exporter.

    consumer (each process, CAPSULE_METRICS_PORT)      capsule exporter (one per fleet)
      capsule_provider_requests_total                    capsule_deliveries{status}
      capsule_provider_request_seconds                   capsule_oldest_due_unclaimed_seconds
      capsule_claims_total                               capsule_stuck_deliveries
      capsule_delivery_lateness_seconds                  capsule_safety_net_last_run_age_seconds
      capsule_safety_net_runs_total                      capsule_provider_circuit_state
      capsule_webhook_events_total
                                                         capsule_queue_depth
                                                         capsule_database_up

Per-process series live in prometheus-client's default registry; each consumer process serves
its own on its own port (one port per process, not the multiprocess mode: consumers run thread
workers, so a consumer is one process, and in compose each container has its own address).
The database gauges are computed at scrape time by `DatabaseCollector`, registered only in the
exporter, so a fleet of N consumers does not run the queries N times per scrape round. Every
query is a probe or a short range over a partial index (see each method); totals of sent and
canceled letters, which only grow, are not gauges: their rate is the counters' business.

The worker reports a run through `observe_run` (one call per run), the safety nets through
`observe_safety_net`. Labels are closed sets (provider names, outcomes, kinds): never an id,
an address or letter text.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ScalarSelect, func, literal, select

from core.claims import Claim
from core.config import Settings
from core.db import SessionFactory, session_scope
from core.health import count_stuck
from core.models import Delivery, ErrorClass, ProviderState, ReconcilerRun, Status
from core.outcomes import Outcome, ProviderCall
from core.policy import Clock
from core.providers.chain import RATE_LIMITED
from core.providers.circuit import CLOSED, HALF_OPEN, OPEN, CircuitState

log = logging.getLogger(__name__)

REQUEST_OUTCOMES = ("accepted", "transient", "permanent", "ambiguous", "rate_limited")
SAFETY_NET_KINDS = ("dispatcher", "backstop", "failed_retrier")
CIRCUIT_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

PROVIDER_REQUESTS = Counter(
    "capsule_provider_requests_total",
    "Provider requests by outcome (a circuit-open skip is not a request).",
    ["provider", "outcome"],
)
PROVIDER_REQUEST_SECONDS = Histogram(
    "capsule_provider_request_seconds",
    "Duration of provider requests that reached the provider.",
    ["provider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
)
CLAIMS = Counter(
    "capsule_claims_total",
    "Delivery runs by claim result: claimed, or nothing to claim (stale or duplicate task).",
    ["result"],
)
LATENESS = Histogram(
    "capsule_delivery_lateness_seconds",
    "Sent time minus due time (deliver_at) of each letter sent.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
)
WEBHOOK_EVENTS = Counter(
    "capsule_webhook_events_total",
    "Provider webhook events processed, by provider, event type (delivered, bounced, "
    "complained, delayed, other) and outcome (applied, unchanged, unmatched, not_sent).",
    ["provider", "type", "outcome"],
)
SAFETY_NET_RUNS = Counter(
    "capsule_safety_net_runs_total",
    "Safety-net runs by kind and result: ok, error, or skipped (another runner had the slot).",
    ["kind", "result"],
)


# Known label sets start at 0, so rate() and increase() see the first event.
for _result in ("claimed", "nothing_to_claim"):
    CLAIMS.labels(_result)
for _kind in SAFETY_NET_KINDS:
    for _result in ("ok", "error", "skipped"):
        SAFETY_NET_RUNS.labels(_kind, _result)


def request_outcome(call: ProviderCall) -> str | None:
    """The request's outcome label, or None when no request was made (circuit open)."""
    if call.outcome == "skipped":
        return None
    if call.error_code == RATE_LIMITED or call.status_code == 429:
        return "rate_limited"
    if call.outcome == "accepted":
        return "accepted"
    if call.outcome in (ErrorClass.PERMANENT, ErrorClass.POSSIBLY_SENT):
        return "permanent"
    if call.outcome == ErrorClass.AMBIGUOUS:
        return "ambiguous"
    return "transient"


def observe_run(
    delivery_id: object,
    task_id: str,
    claimed: Claim | None,
    outcome: Outcome | None = None,
    *,
    status: str | None = None,
    now: datetime | None = None,
) -> None:
    """Count one delivery run (its claim, each provider request, the lateness if sent) and
    log its one line with delivery_id, task_id, provider and outcome as fields.

    `claimed` None: nothing to claim. `status` is the row's new status as recorded; `now` the
    time it was recorded. Never raises: metrics must not break a delivery.
    """
    try:
        CLAIMS.labels("claimed" if claimed is not None else "nothing_to_claim").inc()
        if claimed is None or outcome is None:
            return  # the worker logs it (debug)
        for call in outcome.calls:
            label = request_outcome(call)
            if label is None:
                continue
            PROVIDER_REQUESTS.labels(call.provider, label).inc()
            if call.error_code != RATE_LIMITED or call.status_code is not None:
                PROVIDER_REQUEST_SECONDS.labels(call.provider).observe(call.duration_ms / 1000)
        lateness = None
        if status == Status.SENT and now is not None and claimed.deliver_at is not None:
            lateness = max(0.0, (now - claimed.deliver_at).total_seconds())
            LATENESS.observe(lateness)
        provider = outcome.provider or (outcome.calls[-1].provider if outcome.calls else None)
        result = "sent" if outcome.sent else str(outcome.error_class)
        log.log(
            logging.INFO if outcome.sent else logging.WARNING,
            "delivery %s run %s: %s via %s -> %s",
            delivery_id,
            claimed.run_number,
            result,
            provider or "no provider",
            status or "not recorded",
            extra={
                "delivery_id": str(delivery_id),
                "task_id": task_id,
                "provider": provider,
                "outcome": result,
                "status": status,
                "attempt": claimed.run_number,
                "lateness_seconds": lateness,
            },
        )
    except Exception:
        log.exception("could not record delivery metrics")


def observe_safety_net(kind: str, *, ran: bool, error: bool) -> None:
    """Count one safety-net run (called once, where the run returns)."""
    result = "skipped" if not ran else "error" if error else "ok"
    SAFETY_NET_RUNS.labels(kind, result).inc()


_served: set[int] = set()
_serve_lock = threading.Lock()


def serve_metrics(port: int, addr: str, registry: CollectorRegistry = REGISTRY) -> bool:
    """Serve `registry` at http://addr:port/metrics from a daemon thread, once per port.

    A port already taken is logged, not raised: metrics must not keep a consumer from working.
    """
    with _serve_lock:
        if port in _served:
            return True
        try:
            start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%s: %s", addr, port, exc)
            return False
        _served.add(port)
    log.info("metrics: serving /metrics on %s:%s", addr, port)
    return True


# ---------------------------------------------------------------- database gauges (exporter)

QueueDepth = Callable[[], tuple[int | None, int | None]]


class DatabaseCollector(Collector):
    """The database-backed gauges, computed at scrape time; register it in one process only."""

    def __init__(
        self,
        session_factory: SessionFactory,
        settings: Settings,
        *,
        clock: Clock,
        queue_depth: QueueDepth | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.clock = clock
        self.queue_depth = queue_depth

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        up = GaugeMetricFamily(
            "capsule_database_up", "1 when the exporter's last scrape could read the database."
        )
        try:
            families = self._from_database(now)
        except Exception as exc:
            log.error("metrics: database unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
            families = []
        else:
            up.add_metric([], 1)
        yield up
        yield from families
        yield from self._queue()

    def _from_database(self, now: datetime) -> list[Metric]:
        # pandas: the exporter's import, not the worker's
        from core.queries.overview import scheduled_count

        with session_scope(self.session_factory) as session:
            scheduled, _ = scheduled_count(session)  # PostgreSQL's estimate above 50,000
            processing, failed, held = session.execute(
                select(_count(Status.PROCESSING), _count(Status.FAILED), _count(Status.HELD))
            ).one()
            oldest_due = session.scalar(
                select(func.min(Delivery.next_attempt_at)).where(
                    Delivery.status == literal(Status.SCHEDULED.value, literal_execute=True)
                )
            )
            unclaimed, expired = count_stuck(session, now, self.settings.grace_seconds + 60)
            last_ok = {
                kind: session.scalar(
                    select(ReconcilerRun.finished_at)
                    .where(ReconcilerRun.kind == kind, ReconcilerRun.ok.is_(True))
                    .order_by(ReconcilerRun.started_at.desc())
                    .limit(1)
                )
                for kind in SAFETY_NET_KINDS
            }
            circuits = {
                row.provider: CircuitState(
                    row.provider, row.consecutive_failures, _aware(row.opened_until)
                )
                for row in session.scalars(select(ProviderState))
            }

        deliveries = GaugeMetricFamily(
            "capsule_deliveries",
            "Deliveries in an open state (scheduled is PostgreSQL's estimate above 50,000).",
            labels=["status"],
        )
        for status, count in (
            (Status.SCHEDULED, scheduled),
            (Status.PROCESSING, processing),
            (Status.FAILED, failed),
            (Status.HELD, held),
        ):
            deliveries.add_metric([status.value], int(count or 0))
        oldest = GaugeMetricFamily(
            "capsule_oldest_due_unclaimed_seconds",
            "How long the oldest due, unclaimed delivery has been due (0 when none is).",
        )
        due = _aware(oldest_due)
        oldest.add_metric([], max(0.0, (now - due).total_seconds()) if due else 0.0)
        stuck = GaugeMetricFamily(
            "capsule_stuck_deliveries",
            "Due rows unclaimed past grace + 60 s, and processing rows past their lease.",
        )
        stuck.add_metric([], unclaimed + expired)
        age = GaugeMetricFamily(
            "capsule_safety_net_last_run_age_seconds",
            "Seconds since the last successful run of each safety net finished (absent: never).",
            labels=["kind"],
        )
        for kind, finished in last_ok.items():
            finished = _aware(finished)
            if finished is not None:
                age.add_metric([kind], max(0.0, (now - finished).total_seconds()))
        circuit = GaugeMetricFamily(
            "capsule_provider_circuit_state",
            "Circuit breaker per configured provider: 0 closed, 1 half-open, 2 open.",
            labels=["provider"],
        )
        for provider in dict.fromkeys([*self.settings.providers, *circuits]):
            state = circuits.get(provider, CircuitState(provider))
            circuit.add_metric([provider], CIRCUIT_VALUES[state.status(now)])
        return [deliveries, oldest, stuck, age, circuit]

    def _queue(self) -> Iterator[Metric]:
        if self.queue_depth is None:
            return
        try:
            pending, scheduled = self.queue_depth()
        except Exception as exc:
            log.error("metrics: queue depth unavailable: %s", type(exc).__name__)
            return
        depth = GaugeMetricFamily(
            "capsule_queue_depth",
            "Huey tasks waiting: pending (runnable now) and scheduled (ETA in the future).",
            labels=["state"],
        )
        for state, value in (("pending", pending), ("scheduled", scheduled)):
            if value is not None:
                depth.add_metric([state], value)
        yield depth


def _count(status: Status) -> ScalarSelect[int]:
    # a literal status, so the planner matches the partial index (see core.expressions.is_status)
    return (
        select(func.count())
        .select_from(Delivery)
        .where(Delivery.status == literal(status.value, literal_execute=True))
        .scalar_subquery()
    )


def _aware(value: datetime | None) -> datetime | None:
    """Every stored time is UTC; a driver that drops the zone gets it back."""
    if value is None or value.tzinfo is not None:
        return value
    from datetime import UTC

    return value.replace(tzinfo=UTC)
