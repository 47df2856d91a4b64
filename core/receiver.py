"""The webhook receiver: a small ASGI app (Starlette, which comes with Streamlit).

    POST /webhooks/resend     Svix signature (svix-id, svix-timestamp, svix-signature) checked
                              against each configured whsec_ secret by `standardwebhooks`;
                              a timestamp more than 5 minutes off is refused (replay)
    POST /webhooks/postmark   Basic auth from the URL (Postmark signs nothing), then the
                              optional source-address allowlist
    GET  /webhooks/health     liveness, and what was refused since start, per reason

A request is answered 2xx only after its event is committed (a duplicate of a stored event is
answered 2xx too: providers retry); processing goes to `on_stored` (a Huey task in
production), and the backstop processes what a lost task left. A refused request (4xx) writes
nothing: it only counts, in `Counters`, and logs one line without the body.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.db import session_scope
from core.errors import WebhookPayloadError
from core.policy import Clock
from core.webhook_payloads import POSTMARK, RESEND, ParsedEvent, parse_postmark, parse_resend
from core.webhooks import store_event

if TYPE_CHECKING:
    from core.bootstrap import App
    from core.config import Settings

log = logging.getLogger(__name__)


class Counters:
    """Refusals and receipts since the process started (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class Refused(Exception):
    """A request the receiver answers with 4xx and does not store."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


def verify_svix(secrets: tuple[str, ...], body: bytes, headers: dict[str, str]) -> None:
    """Raise Refused unless one of `secrets` signed `body` with these headers, recently."""
    msg_id = headers.get("svix-id", "")
    stamp = headers.get("svix-timestamp", "")
    signature = headers.get("svix-signature", "")
    if not (msg_id and stamp and signature):
        raise Refused(401, "unsigned")
    if not secrets:
        raise Refused(401, "not_configured")
    standard = {"webhook-id": msg_id, "webhook-timestamp": stamp, "webhook-signature": signature}
    reason = "bad_signature"
    for secret in secrets:
        try:
            Webhook(secret).verify(body, standard, json_parse=False)
            return
        except WebhookVerificationError as exc:
            if "timestamp" in str(exc).lower() or "headers" in str(exc).lower():
                raise Refused(401, "stale_timestamp") from None
        except (ValueError, binascii.Error, UnicodeDecodeError):
            reason = "malformed_signature"
    raise Refused(401, reason)


def check_basic_auth(credentials: tuple[str, ...], header: str | None) -> None:
    """Raise Refused unless the Authorization header carries one of user:password pairs."""
    if not credentials:
        raise Refused(401, "not_configured")
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic" or not value:
        raise Refused(401, "unauthenticated")
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Refused(401, "unauthenticated") from None
    # compare every pair, in constant time each, so the answer does not tell which was close
    matched = False
    for pair in credentials:
        matched |= hmac.compare_digest(given, pair.encode())
    if not matched:
        raise Refused(401, "bad_credentials")


def check_source(allowed: tuple[str, ...], host: str | None) -> None:
    if not allowed:
        return
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        raise Refused(403, "source_not_allowed") from None
    if not any(address in ipaddress.ip_network(n, strict=False) for n in allowed):
        raise Refused(403, "source_not_allowed")


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refused(413, "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, "malformed") from None


async def _resend_event(request: Request, settings: Settings) -> ParsedEvent:
    """The event a signed Resend request carries; Refused when it is not one."""
    body = await _body(request, settings.webhook_max_body_bytes)
    headers = {k.lower(): v for k, v in request.headers.items()}
    verify_svix(settings.resend_webhook_secrets, body, headers)
    try:
        return parse_resend(headers["svix-id"], _json(body))
    except WebhookPayloadError:
        raise Refused(400, "malformed") from None


async def _postmark_event(request: Request, settings: Settings) -> ParsedEvent:
    """The event an allowed, authenticated Postmark request carries; Refused otherwise."""
    check_source(
        settings.postmark_webhook_allowed_ips,
        request.client.host if request.client else None,
    )
    check_basic_auth(settings.postmark_webhook_credentials, request.headers.get("authorization"))
    body = await _body(request, settings.webhook_max_body_bytes)
    try:
        return parse_postmark(_json(body))
    except WebhookPayloadError:
        raise Refused(400, "malformed") from None


def _refusal(provider: str, refused: Refused, counts: Counters) -> Response:
    counts.add(f"{provider}:{refused.reason}")
    log.warning("webhook refused: provider=%s reason=%s", provider, refused.reason)
    headers = {}
    if provider == POSTMARK and refused.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="capsule-webhooks"'
    return JSONResponse(
        {"ok": False, "error": refused.reason}, status_code=refused.status, headers=headers
    )


@dataclass(frozen=True)
class _Intake:
    """Stores a verified event, then hands its row on to `on_stored`."""

    app: App
    on_stored: Callable[[int], None]
    clock: Clock
    counts: Counters

    def _store(self, event: ParsedEvent) -> tuple[int, bool]:
        with session_scope(self.app.session_factory) as session:
            row_id, new = store_event(session, event, now=self.clock())
            session.commit()
        return row_id, new

    async def accept(self, provider: str, event: ParsedEvent) -> Response:
        try:
            row_id, new = await run_in_threadpool(self._store, event)
        except Exception as exc:  # the database: let the provider retry later
            log.error("webhook from %s not stored: %s", provider, type(exc).__name__)
            self.counts.add(f"{provider}:store_failed")
            return JSONResponse({"ok": False, "error": "try again later"}, status_code=503)
        self.counts.add(f"{provider}:stored" if new else f"{provider}:duplicate")
        if new:
            try:
                await run_in_threadpool(self.on_stored, row_id)
            except Exception as exc:  # the broker: the backstop processes it after a grace
                log.warning("webhook event %s not queued: %s", row_id, type(exc).__name__)
        return JSONResponse({"ok": True, "duplicate": not new})


def build_receiver(
    app: App,
    on_stored: Callable[[int], None],
    *,
    clock: Clock,
    counters: Counters | None = None,
) -> Starlette:
    """The ASGI app. `on_stored(event_row_id)` runs after commit for each new event; it may
    fail (the backstop processes the event later)."""
    settings = app.settings
    counts = counters or Counters()
    intake = _Intake(app, on_stored, clock, counts)

    async def resend(request: Request) -> Response:
        try:
            event = await _resend_event(request, settings)
        except Refused as refused:
            return _refusal(RESEND, refused, counts)
        return await intake.accept(RESEND, event)

    async def postmark(request: Request) -> Response:
        try:
            event = await _postmark_event(request, settings)
        except Refused as refused:
            return _refusal(POSTMARK, refused, counts)
        return await intake.accept(POSTMARK, event)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "counts": counts.snapshot()})

    receiver = Starlette(
        routes=[
            Route("/webhooks/resend", resend, methods=["POST"]),
            Route("/webhooks/postmark", postmark, methods=["POST"]),
            Route("/webhooks/health", health, methods=["GET"]),
        ]
    )
    receiver.state.counters = counts
    return receiver
