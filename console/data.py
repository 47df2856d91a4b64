"""The console's data access: one App per process, cached loaders, and the broker seams.

Loaders are `st.cache_data` with a short TTL and read the clock themselves (so the cache key is
the filter, not the second). After any action a page calls `refresh()`: clear, then rerun.
Everything returned is a dataclass or a DataFrame from `core.queries`, never an ORM object.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, Any, BinaryIO, cast

import pandas as pd
import streamlit as st

from core import bulk, failed_filter
from core.bootstrap import App, bootstrap
from core.config import Settings
from core.db import SessionFactory, session_scope
from core.dispatch import Enqueuer
from core.failed_filter import FailedFilter
from core.policy import utcnow
from core.queries import audit, delivery, failed, overview
from core.queries import bulk as bulk_queries
from core.queries import health as health_queries
from core.queries.audit import AuditCursor, AuditFilter

log = logging.getLogger(__name__)

FAST = 5  # seconds: what an operator just acted on
NORMAL = 30  # seconds: lists and tiles
SLOW = 300  # seconds: menus
SEARCH_LIMIT = failed_filter.SEARCH_SCAN_LIMIT  # failed rows a triage search reads at most
EXPORT_CHUNK = 1000  # rows read per query while exporting
EXPORT_SPOOL_BYTES = 8 * 1024 * 1024  # an export larger than this is written to disk

WINDOWS = {
    "24 h": (timedelta(hours=24), "hour"),
    "7 days": (timedelta(days=7), "hour"),
    "30 days": (timedelta(days=30), "day"),
}


# ---------------------------------------------------------------- wiring (tests replace these)


def make_enqueuer(settings: Settings) -> Enqueuer:
    """The delivery enqueuer over the process's Huey instance."""
    # Imported on first use: the queue is built from the environment when it is imported.
    from tasks.delivery import queue_enqueuer
    from tasks.queue import huey

    return queue_enqueuer(huey, settings)


def enqueue_bulk(operation_id: int) -> str:
    """Queue the background runner of a bulk operation; returns its task id."""
    import tasks.bulk

    return tasks.bulk.enqueue(operation_id)


@dataclass(frozen=True)
class QueueDepth:
    pending: int | None
    scheduled: int | None
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None


def read_queue_depth() -> QueueDepth:
    """Huey's pending and scheduled counts; 'unreachable' instead of an exception."""
    try:
        from tasks.queue import huey

        return QueueDepth(int(huey.pending_count()), int(huey.scheduled_count()))
    except Exception as exc:  # a dead broker must not take the page down
        log.warning("queue depth unavailable: %s", exc)
        return QueueDepth(None, None, f"{type(exc).__name__}: {exc}")


@st.cache_resource(show_spinner=False)
def get_app() -> App:
    """The App for this console process, built once from CAPSULE_* settings."""
    settings = Settings.from_env()
    return bootstrap(settings, make_enqueuer(settings))


def settings() -> Settings:
    return get_app().settings


def refresh() -> None:
    """After an action: forget every cached read and run the page again."""
    st.cache_data.clear()
    st.rerun()


# ---------------------------------------------------------------- overview


@st.cache_data(ttl=NORMAL, show_spinner=False)
def tiles() -> overview.Tiles:
    app = get_app()
    with session_scope(app.session_factory) as s:
        return overview.tiles(s, now=utcnow(), grace_seconds=app.settings.grace_seconds)


@st.cache_data(ttl=NORMAL, show_spinner=False)
def status_counts(window: str) -> pd.DataFrame:
    span, _ = WINDOWS[window]
    with session_scope(get_app().session_factory) as s:
        return overview.status_counts(s, now=utcnow(), window=span)


@st.cache_data(ttl=NORMAL, show_spinner=False)
def sent_series(window: str) -> pd.DataFrame:
    span, bucket = WINDOWS[window]
    with session_scope(get_app().session_factory) as s:
        return overview.sent_series(s, now=utcnow(), window=span, bucket=bucket)


@st.cache_data(ttl=NORMAL, show_spinner=False)
def reconciliation_series(window: str) -> pd.DataFrame:
    span, bucket = WINDOWS[window]
    with session_scope(get_app().session_factory) as s:
        return overview.reconciliation_series(s, now=utcnow(), window=span, bucket=bucket)


@st.cache_data(ttl=NORMAL, show_spinner=False)
def stuck_items(limit: int = 50) -> pd.DataFrame:
    app = get_app()
    with session_scope(app.session_factory) as s:
        return overview.stuck_items(
            s, now=utcnow(), grace_seconds=app.settings.grace_seconds, limit=limit
        )


# ---------------------------------------------------------------- triage and detail


@st.cache_data(ttl=NORMAL, show_spinner=False)
def search_scope(flt: FailedFilter) -> failed_filter.SearchScope:
    with session_scope(get_app().session_factory) as s:
        return failed_filter.search_scope(s, flt, limit=SEARCH_LIMIT)


@st.cache_data(ttl=NORMAL, show_spinner=False)
def failed_page(
    flt: FailedFilter, limit: int = 50, after: failed_filter.FailedCursor | None = None
) -> pd.DataFrame:
    with session_scope(get_app().session_factory) as s:
        return failed.failed_deliveries(s, flt, limit=limit, after=after)


CSV_COLUMNS = [
    "id",
    "failed_at",
    "error_class",
    "provider",
    "status_code",
    "last_error",
    "attempts",
    "recipient_email",
    "owner_email",
    "notified",
]
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text: a leading = + - @ would start a formula."""
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return ""
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_failed_csv(
    session_factory: SessionFactory, flt: FailedFilter, out: IO[str], *, now: datetime
) -> int:
    """Every failed delivery `flt` matches (pinned at `now`) as CSV with a header row, read
    and written in chunks; returns the number of data rows."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    rows = 0
    with session_scope(session_factory) as s:
        for chunk in failed.failed_chunks(s, flt, now=now, chunk=EXPORT_CHUNK):
            for record in chunk[CSV_COLUMNS].itertuples(index=False):
                writer.writerow([_csv_cell(v) for v in record])
            rows += len(chunk)
    return rows


def failed_csv(flt: FailedFilter) -> Callable[[], bytes]:
    """For st.download_button: builds the export when clicked, on Streamlit's download thread
    (without the page's context). Rows are read and written a chunk at a time into a
    temporary file that spills to disk; Streamlit then serves the file's bytes."""
    session_factory = get_app().session_factory

    def build() -> bytes:
        with tempfile.SpooledTemporaryFile(max_size=EXPORT_SPOOL_BYTES) as spool:
            text = io.TextIOWrapper(cast(BinaryIO, spool), encoding="utf-8", newline="")
            rows = write_failed_csv(session_factory, flt, text, now=utcnow())
            text.flush()
            text.detach()
            spool.seek(0)
            log.info("triage export: %d rows", rows)
            return spool.read()

    return build


@st.cache_data(ttl=NORMAL, show_spinner=False)
def failed_count(flt: FailedFilter) -> int:
    with session_scope(get_app().session_factory) as s:
        return failed_filter.failed_count(s, flt)


@st.cache_data(ttl=NORMAL, show_spinner=False)
def failed_by_class(flt: FailedFilter) -> pd.DataFrame:
    with session_scope(get_app().session_factory) as s:
        return failed.failed_by_error_class(s, flt)


def delivery_states(ids: list[str]) -> pd.DataFrame:
    """Never cached: the re-check before an action must see the rows as they are now."""
    with session_scope(get_app().session_factory) as s:
        return failed.delivery_states(s, [uuid.UUID(i) for i in ids])


@st.cache_data(ttl=FAST, show_spinner=False)
def delivery_detail(delivery_id: str) -> delivery.DeliveryDetail | None:
    with session_scope(get_app().session_factory) as s:
        return delivery.delivery_detail(s, uuid.UUID(delivery_id))


@st.cache_data(ttl=NORMAL, show_spinner=False)
def bounced_after_send(limit: int = 200) -> pd.DataFrame:
    with session_scope(get_app().session_factory) as s:
        return delivery.bounced_after_send(s, limit=limit)


@st.cache_data(ttl=FAST, show_spinner=False)
def deliveries_for_address(email: str) -> pd.DataFrame:
    with session_scope(get_app().session_factory) as s:
        return delivery.deliveries_for_address(s, email)


# ---------------------------------------------------------------- audit


@st.cache_data(ttl=FAST, show_spinner=False)
def audit_page(flt: AuditFilter, before: AuditCursor | None, limit: int = 50) -> audit.AuditPage:
    with session_scope(get_app().session_factory) as s:
        return audit.audit_log(s, flt, before=before, limit=limit)


@st.cache_data(ttl=SLOW, show_spinner=False)
def audit_types() -> list[str]:
    with session_scope(get_app().session_factory) as s:
        return audit.audit_types(s)


# ---------------------------------------------------------------- health


@dataclass(frozen=True)
class Health:
    runners: list[health_queries.RunnerState]
    runs: pd.DataFrame
    providers: pd.DataFrame
    alerts: pd.DataFrame
    queue: QueueDepth
    checked_at: Any
    waiting_for_keys: dict[str, int] = field(default_factory=dict)


@st.cache_data(ttl=FAST * 2, show_spinner=False)
def health() -> Health:
    from core.health import waiting_for_keys

    now = utcnow()
    with session_scope(get_app().session_factory) as s:
        runners = health_queries.runner_states(s, now=now)
        runs = health_queries.recent_runs(s, limit=50)
        providers = health_queries.provider_states(s, now=now)
        alerts = health_queries.recent_alerts(s, limit=50)
        waiting = waiting_for_keys(s, get_app().settings, now)
    return Health(runners, runs, providers, alerts, read_queue_depth(), now, waiting)


# ---------------------------------------------------------------- bulk


@st.cache_data(ttl=FAST * 2, show_spinner=False)
def bulk_preview(flt: FailedFilter) -> bulk.Preview:
    with session_scope(get_app().session_factory) as s:
        return bulk.preview(s, flt, now=utcnow(), sample=20)


@st.cache_data(ttl=FAST * 2, show_spinner=False)
def bulk_dry_run(flt: FailedFilter, rate_per_second: float) -> bulk.DryRun:
    with session_scope(get_app().session_factory) as s:
        return bulk.dry_run(s, flt, now=utcnow(), rate_per_second=rate_per_second)


def active_bulk() -> list[bulk_queries.BulkView]:
    """Not cached: the progress bars poll it."""
    with session_scope(get_app().session_factory) as s:
        return bulk_queries.active_bulk_operations(s)


def bulk_operation(operation_id: int) -> bulk_queries.BulkView | None:
    with session_scope(get_app().session_factory) as s:
        return bulk_queries.bulk_operation(s, operation_id)


@st.cache_data(ttl=FAST, show_spinner=False)
def bulk_history() -> pd.DataFrame:
    with session_scope(get_app().session_factory) as s:
        return bulk_queries.bulk_history(s, limit=50)
