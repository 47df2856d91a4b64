"""Telling humans: a Slack-compatible webhook, a heartbeat URL, and Sentry when configured.

Nothing here may break a safety-net run: every failure is logged and swallowed. The webhook and
heartbeat URLs carry tokens, so a failure is logged by host and status only, never by URL.
Sentry is started by the entry point (`core.telemetry.init_sentry`); alerts only use it. Alerts are
rate limited per kind through the `alerts` table, so several consumers share one limit.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select

from core import telemetry
from core.config import Settings
from core.db import SessionFactory, session_scope
from core.models import Alert

log = logging.getLogger(__name__)

STUCK = "stuck_rows"
RUN_ERROR = "run_error"
CIRCUIT_OPEN = "circuit_open"
MISSING_KEY = "missing_key"


class Alerter:
    def __init__(
        self,
        settings: Settings,
        session_factory: SessionFactory,
        http: httpx.Client | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.http = http or httpx.Client(timeout=httpx.Timeout(5.0))

    def alert(self, kind: str, message: str, *, now: datetime) -> bool:
        """Record the alert and post it unless one of this kind went out within the window.

        Returns True when the webhook accepted it.
        """
        window = timedelta(seconds=self.settings.alert_min_interval_seconds)
        try:
            with session_scope(self.session_factory) as session:
                recent = session.scalar(
                    select(Alert.id)
                    .where(
                        Alert.kind == kind,
                        Alert.suppressed.is_(False),
                        Alert.created_at > now - window,
                    )
                    .limit(1)
                )
                row = Alert(
                    kind=kind, message=message, suppressed=recent is not None, created_at=now
                )
                session.add(row)
                session.commit()
                if row.suppressed:
                    return False
                delivered = self._post(kind, message)
                if delivered:
                    row.delivered = True
                    session.add(row)
                    session.commit()
                return delivered
        except Exception as exc:
            log.error("could not record alert %s: %s", kind, telemetry.exception_text(exc))
            return False

    def _post(self, kind: str, message: str) -> bool:
        telemetry.capture_message(f"[{kind}] {message}")
        if not self.settings.alert_webhook_url:
            log.warning("alert %s (no webhook configured): %s", kind, message)
            return False
        payload: dict[str, Any] = {"text": f":rotating_light: Capsule [{kind}] {message}"}
        try:
            response = self.http.post(
                self.settings.alert_webhook_url.get_secret_value(), json=payload
            )
            response.raise_for_status()
            return True
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            log.error("alert webhook failed for %s: %s", kind, describe_failure(exc))
            return False

    def heartbeat(self) -> bool:
        """Ping the dead man's switch; a monitor alerts when the pings stop."""
        if not self.settings.heartbeat_url:
            return False
        try:
            self.http.get(self.settings.heartbeat_url.get_secret_value()).raise_for_status()
            return True
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            log.error("heartbeat ping failed: %s", describe_failure(exc))
            return False


def describe_failure(exc: httpx.HTTPError | httpx.InvalidURL) -> str:
    """`host <name>: HTTP <status>` or `host <name>: <error type>`: no path, no query, no token."""
    host = "?"
    if isinstance(exc, httpx.HTTPError):
        with contextlib.suppress(RuntimeError):  # raised before a request existed
            host = exc.request.url.host or "?"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"host {host}: HTTP {exc.response.status_code}"
    return f"host {host}: {type(exc).__name__}"
