"""A real local HTTP server speaking the parts of the Resend and Postmark APIs we use.

    Resend    POST /emails                 Bearer auth, Idempotency-Key semantics
              POST /emails/batch           ≤ 100 emails under one Idempotency-Key; strict
                                           (one invalid → 422, nothing sent) or
                                           `x-batch-validation: permissive` (data + errors)
    Postmark  POST /email                  X-Postmark-Server-Token
              POST /email/batch            ≤ 500 messages; 200 with one result per message
                                           (ErrorCode 0 = accepted), each with its Metadata
              GET  /messages/outbound      count, offset, recipient, tag, metadata_<name>
    Admin     GET  /_admin/messages        stored messages and counts per idempotency key
              GET  /_admin/keys            requests, replays and lookups per idempotency key
              GET  /_admin/stats           requests and responses per provider
              GET  /_admin/clock           the fake's clock; POST {"advance": s} | {"now": iso}
              POST /_admin/config          {"search_lag_seconds": s} and/or
                                           {"quota": {"resend": n, "postmark": n}}
              POST /_admin/faults          {"provider": "resend"|"postmark"|"all", "queue": [...],
                                            "p_5xx", "p_429", "p_stall", "seed", "latency_ms",
                                            "stall_seconds", "append": false}
              POST /_admin/reset           forget messages, keys, faults, stats, clock offset
              GET  /_admin/health

What it holds like the real services:
    Resend    an idempotency key is remembered for 24 h of the fake's clock (then a send with it
              is a new message); a key over 256 characters is refused (400
              invalid_idempotency_key); a second request with a key still in flight (stalled
              too) gets 409 concurrent_idempotent_requests.
    Postmark  `count` and `offset` are required on the search; a message is found by it only
              `search_lag_seconds` (fake clock) after it was stored (default 0); Metadata holds
              at most 10 fields, names up to 20 characters, values up to 80 (else 422).
Quota: with a quota of n for a provider, a send request (single or batch) beyond n in any
second is answered 429 with Retry-After and `ratelimit-limit/-remaining/-reset` headers, as
Resend answers past a team's rate limit; nothing is stored.
Batches: a batch call is one request; it is counted under its Idempotency-Key (Resend) or
under each message's Metadata key (Postmark). Faults apply to a batch call as a whole: a
status before anything is stored, a stall / drop / stored:5xx after every message is stored.
Counting: every send request is counted per idempotency key (Resend's header, Postmark's
Metadata "idempotency_key"), whatever its answer; replays (Resend answering a known key with
the first message) and lookups (Postmark searches by that metadata) are counted apart. Tests
of "sent once" count these requests, not stored messages.

Faults apply to the send endpoints only. A queued fault is used by the next send; when the
queue is empty, the random rates (p_5xx, p_429, p_stall, p_stored_5xx, p_drop; seeded)
decide. Fault specs:

    "503" / "500" / "422" / "401" ...   answer that status (nothing stored)
    "429" or "429:5"                    429 with Retry-After (default 1 s)
    "stall" or "stall:2.5"              accept and store, then answer only after the stall
                                        (longer than the client's read timeout → ambiguous);
                                        a Resend key stays in flight until the stall ends
    "stored:503" / "stored:500"         accept and store, then answer that status
    "drop"                              accept and store, then close without answering
    "drop_before"                       close without answering, nothing stored
    {"status": 503, "retry_after": 2, "name": "...", "error_code": 406, "message": "..."}
    {"action": "stall", "seconds": 3}

Standalone: `python -m benchmarks.fakes.provider_server --port 8025 --latency-ms 50 --p-5xx 0.1`
prints its URL on the first line of stdout and serves until SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

PROVIDERS = ("resend", "postmark")
DEFAULT_RESEND_KEY = "re_test_key"
DEFAULT_POSTMARK_TOKEN = "pm-test-token"
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")
_NAMED_ADDRESS = re.compile(r"^[^<>]*<([^<>]+)>$")
RESEND_KEY_TTL = timedelta(hours=24)
RESEND_KEY_MAX_CHARS = 256
POSTMARK_METADATA_MAX_FIELDS = 10
POSTMARK_METADATA_NAME_MAX = 20
POSTMARK_METADATA_VALUE_MAX = 80
POSTMARK_KEY_FIELD = "idempotency_key"


# ---------------------------------------------------------------- data


@dataclass
class StoredMessage:
    """One message a fake provider accepted."""

    provider: str
    id: str
    idempotency_key: str | None
    sender: str
    to: list[str]
    subject: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)
    tag: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    received_at: str = ""
    stored_at: datetime | None = None  # on the fake's clock: when the search may see it


@dataclass
class Fault:
    """What to do with the next send instead of answering normally."""

    action: str  # status | stall | drop | drop_before | stored_status
    status: int | None = None
    retry_after: float | None = None
    seconds: float | None = None
    name: str | None = None
    error_code: int | None = None
    message: str | None = None


def parse_fault(spec: str | int | dict[str, Any] | Fault) -> Fault:
    """A Fault from its short form ("503", "429:5", "stall:2", "drop") or a dict."""
    if isinstance(spec, Fault):
        return spec
    if isinstance(spec, dict):
        data = dict(spec)
        action = data.pop("action", "status")
        return Fault(action=action, **data)
    head, _, arg = str(spec).partition(":")
    if head.isdigit():
        status = int(head)
        retry = float(arg) if arg else (1.0 if status == 429 else None)
        return Fault("status", status=status, retry_after=retry)
    if head in {"stall", "drop", "drop_before"}:
        return Fault(head, seconds=float(arg) if arg else None)
    if head == "stored" and arg.isdigit():
        return Fault("stored_status", status=int(arg))
    raise ValueError(f"unknown fault {spec!r}")


@dataclass
class _Faults:
    queue: deque[Fault] = field(default_factory=deque)
    p_5xx: float = 0.0
    p_429: float = 0.0
    p_stall: float = 0.0
    p_stored_5xx: float = 0.0  # store, then answer 503
    p_drop: float = 0.0  # store, then close without answering
    rng: random.Random = field(default_factory=random.Random)
    latency_ms: float = 0.0
    stall_seconds: float = 5.0

    def next(self) -> Fault | None:
        if self.queue:
            return self.queue.popleft()
        rates = (
            (self.p_5xx, Fault("status", status=503)),
            (self.p_429, Fault("status", status=429, retry_after=1.0)),
            (self.p_stall, Fault("stall")),
            (self.p_stored_5xx, Fault("stored_status", status=503)),
            (self.p_drop, Fault("drop")),
        )
        if not any(rate for rate, _ in rates):
            return None
        draw, edge = self.rng.random(), 0.0
        for rate, fault in rates:
            edge += rate
            if draw < edge:
                return fault
        return None


@dataclass
class _KeyRecord:
    fingerprint: str
    created_at: datetime
    done: bool = False
    message_id: str | None = None


class _Reply(Exception):
    """Ends a request with this status and JSON body."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


class _Drop(Exception):
    """Ends a request by closing the connection without an answer."""


# ---------------------------------------------------------------- state


class FakeProviderState:
    """Messages, idempotency keys, faults and counters, shared by all handler threads."""

    def __init__(
        self,
        *,
        resend_api_key: str,
        postmark_token: str,
        latency_ms: float,
        search_lag_seconds: float = 0.0,
    ) -> None:
        self.resend_api_key = resend_api_key
        self.postmark_token = postmark_token
        self.inactive_recipients: set[str] = set()
        # tests/fakes/provider_webhooks.WebhookSender: the webhooks a stored message causes
        self.webhooks: Any = None
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._default_latency = latency_ms
        self.search_lag_seconds = search_lag_seconds  # server configuration: reset keeps it
        self.quota: dict[str, float] = {}  # requests per second per provider; reset keeps it
        self._busy = 0  # send requests being handled (a stall keeps one busy)
        self._idle = threading.Condition(self._lock)
        self._reset()

    def _reset(self) -> None:
        self._messages: list[StoredMessage] = []
        self._keys: dict[str, _KeyRecord] = {}
        self._faults = {p: _Faults(latency_ms=self._default_latency) for p in PROVIDERS}
        self._requests: Counter[str] = Counter()
        self._responses: Counter[str] = Counter()
        self._replays: Counter[str] = Counter()
        self._key_requests: Counter[tuple[str, str]] = Counter()
        self._key_replays: Counter[tuple[str, str]] = Counter()
        self._key_lookups: Counter[tuple[str, str]] = Counter()
        self._clock_offset = timedelta(0)
        self._quota_hits: dict[str, deque[float]] = {p: deque() for p in PROVIDERS}

    def reset(self) -> None:
        with self._lock:
            self._reset()

    # requests in progress

    def enter(self) -> None:
        with self._lock:
            self._busy += 1

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1
            if not self._busy:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> None:
        """Until no send is being handled (a stall has ended); TimeoutError after `timeout`."""
        with self._lock:
            if not self._idle.wait_for(lambda: not self._busy, timeout):
                raise TimeoutError(f"the fake still handles {self._busy} send(s)")

    # the fake's clock: real time plus an offset tests move forward

    def now(self) -> datetime:
        with self._lock:
            return datetime.now(UTC) + self._clock_offset

    def advance(self, seconds: float) -> datetime:
        """Move the fake's clock forward (key expiry, search lag) without waiting."""
        with self._lock:
            self._clock_offset += timedelta(seconds=seconds)
            return datetime.now(UTC) + self._clock_offset

    def set_now(self, when: datetime) -> datetime:
        """Set the fake's clock to `when` (timezone-aware); it runs on from there."""
        if when.tzinfo is None:
            raise ValueError("the fake's clock takes a timezone-aware time")
        with self._lock:
            self._clock_offset = when - datetime.now(UTC)
            return when

    # faults

    def set_faults(
        self,
        provider: str,
        queue: list[Any] | tuple[Any, ...] = (),
        *,
        p_5xx: float = 0.0,
        p_429: float = 0.0,
        p_stall: float = 0.0,
        p_stored_5xx: float = 0.0,
        p_drop: float = 0.0,
        seed: int | None = None,
        latency_ms: float | None = None,
        stall_seconds: float | None = None,
        append: bool = False,
    ) -> None:
        faults = [parse_fault(spec) for spec in queue]
        with self._lock:
            for name in self._targets(provider):
                current = self._faults[name]
                if not append:
                    current.queue.clear()
                    current.p_5xx, current.p_429, current.p_stall = p_5xx, p_429, p_stall
                    current.p_stored_5xx, current.p_drop = p_stored_5xx, p_drop
                    current.rng = random.Random(None if seed is None else f"{seed}-{name}")
                current.queue.extend(faults)
                if latency_ms is not None:
                    current.latency_ms = latency_ms
                if stall_seconds is not None:
                    current.stall_seconds = stall_seconds

    def _targets(self, provider: str) -> tuple[str, ...]:
        if provider == "all":
            return PROVIDERS
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}")
        return (provider,)

    def next_fault(self, provider: str) -> tuple[Fault | None, float, float]:
        """The fault for this send (or None), the latency and the stall length, in seconds."""
        with self._lock:
            faults = self._faults[provider]
            return faults.next(), faults.latency_ms / 1000, faults.stall_seconds

    def latency(self, provider: str) -> float:
        with self._lock:
            return self._faults[provider].latency_ms / 1000

    # idempotency (Resend)

    def begin_key(self, key: str, fingerprint: str) -> str | None:
        """None to go ahead (the key is now in flight), else the id of the earlier message.

        Raises _Reply(409) for a key in flight or a key reused with another body. A key older
        than 24 h (fake clock) is forgotten, as Resend forgets it."""
        with self._lock:
            now = datetime.now(UTC) + self._clock_offset
            record = self._keys.get(key)
            if record is not None and now - record.created_at >= RESEND_KEY_TTL:
                record = None
            if record is None:
                self._keys[key] = _KeyRecord(fingerprint, created_at=now)
                return None
            if record.fingerprint != fingerprint:
                raise _Reply(
                    409,
                    _resend_error(
                        409,
                        "invalid_idempotent_request",
                        "Same idempotency key used with a different request payload.",
                    ),
                )
            if not record.done or record.message_id is None:
                raise _Reply(
                    409,
                    _resend_error(
                        409,
                        "concurrent_idempotent_requests",
                        "Same idempotency key used while original request is still in progress.",
                    ),
                )
            self._replays["resend"] += 1
            self._key_replays[("resend", key)] += 1
            return record.message_id

    def finish_key(self, key: str, message_id: str | None) -> None:
        """Mark the key done with its message; None forgets it (the request failed)."""
        with self._lock:
            if message_id is None:
                self._keys.pop(key, None)
            else:
                self._keys[key].done = True
                self._keys[key].message_id = message_id

    # messages

    def store(self, message: StoredMessage) -> None:
        with self._lock:
            self._messages.append(message)
        if self.webhooks is not None:
            self.webhooks.message_stored(message)

    def messages(self, provider: str | None = None) -> list[StoredMessage]:
        with self._lock:
            return [m for m in self._messages if provider in (None, m.provider)]

    def counts_by_delivery(self, kind: str = "letter") -> dict[str, int]:
        """Stored messages per delivery_id (Resend tag, Postmark metadata) of this kind."""
        counts: Counter[str] = Counter()
        for message in self.messages():
            labels = {**message.metadata, **message.tags}
            if labels.get("kind") == kind and labels.get("delivery_id"):
                counts[labels["delivery_id"]] += 1
        return dict(counts)

    def counts_by_key(self, provider: str | None = None) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for message in self.messages(provider):
            if message.idempotency_key:
                counts[message.idempotency_key] += 1
        return dict(counts)

    def count_request(self, provider: str, key: str | None = None) -> None:
        with self._lock:
            self._requests[provider] += 1
            if key:
                self._key_requests[(provider, key)] += 1

    def count_batch_request(self, provider: str, keys: list[str]) -> None:
        """One request on the wire, counted under every key it carries."""
        with self._lock:
            self._requests[provider] += 1
            for key in keys:
                self._key_requests[(provider, key)] += 1

    def take_quota(self, provider: str) -> float | None:
        """None when this request is within the provider's quota (and counted), else the
        seconds until the sliding one-second window has room."""
        limit = int(self.quota.get(provider) or 0)
        if limit <= 0:
            return None
        with self._lock:
            now = time.monotonic()
            hits = self._quota_hits[provider]
            while hits and hits[0] <= now - 1.0:
                hits.popleft()
            if len(hits) >= limit:
                return max(0.001, hits[0] + 1.0 - now)
            hits.append(now)
            return None

    def count_lookup(self, provider: str, key: str | None) -> None:
        if key:
            with self._lock:
                self._key_lookups[(provider, key)] += 1

    def key_counts(self, provider: str | None = None) -> dict[str, dict[str, int]]:
        """Per idempotency key: send requests (any answer), replays, lookups."""

        def by_key(counter: Counter[tuple[str, str]]) -> dict[str, int]:
            counts: Counter[str] = Counter()
            for (name, key), count in counter.items():
                if provider in (None, name):
                    counts[key] += count
            return dict(counts)

        with self._lock:
            return {
                "requests": by_key(self._key_requests),
                "replays": by_key(self._key_replays),
                "lookups": by_key(self._key_lookups),
            }

    def searchable(self, message: StoredMessage, now: datetime) -> bool:
        """The outbound search sees a message only `search_lag_seconds` after it was stored."""
        if message.stored_at is None or not self.search_lag_seconds:
            return True
        return now >= message.stored_at + timedelta(seconds=self.search_lag_seconds)

    def count_response(self, provider: str, status: int | str) -> None:
        with self._lock:
            self._responses[f"{provider}:{status}"] += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            responses: dict[str, dict[str, int]] = {}
            for name, count in self._responses.items():
                provider, _, status = name.partition(":")
                responses.setdefault(provider, {})[status] = count
            return {
                "requests": dict(self._requests),
                "responses": responses,
                "replays": dict(self._replays),
                "messages": Counter(m.provider for m in self._messages),
            }


def _resend_error(status: int, name: str, message: str) -> dict[str, Any]:
    return {"statusCode": status, "name": name, "message": message}


def _fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _address(value: str) -> str:
    match = _NAMED_ADDRESS.match(value.strip())
    return (match.group(1) if match else value).strip()


def _valid_address(value: object) -> bool:
    return isinstance(value, str) and bool(_ADDRESS.match(_address(value)))


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


# ---------------------------------------------------------------- handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections end eventually
    disable_nagle_algorithm = (
        True  # headers and body go out as two writes: no 40 ms delayed-ACK stall
    )
    server: _Server

    @property
    def state(self) -> FakeProviderState:
        return self.server.state

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        routes = {
            ("POST", "/emails"): self._resend_send,
            ("POST", "/emails/batch"): self._resend_batch,
            ("POST", "/email"): self._postmark_send,
            ("POST", "/email/batch"): self._postmark_batch,
            ("GET", "/messages/outbound"): self._postmark_search,
            ("GET", "/_admin/messages"): self._admin_messages,
            ("GET", "/_admin/keys"): self._admin_keys,
            ("GET", "/_admin/stats"): lambda: _ok(self.state.stats()),
            ("GET", "/_admin/clock"): lambda: _ok({"now": self.state.now().isoformat()}),
            ("POST", "/_admin/clock"): self._admin_clock,
            ("POST", "/_admin/config"): self._admin_config,
            ("GET", "/_admin/health"): lambda: _ok({"ok": True}),
            ("POST", "/_admin/faults"): self._admin_faults,
            ("POST", "/_admin/reset"): self._admin_reset,
        }
        route = routes.get((method, path))
        body = self._read_body()
        sending = method == "POST" and path in {
            "/emails",
            "/email",
            "/emails/batch",
            "/email/batch",
        }
        if sending:
            self.state.enter()
        try:
            if route is None:
                raise _Reply(404, {"message": f"no route {method} {path}"})
            self._body = body
            route()
        except _Reply as reply:
            self._answer(reply.status, reply.body, reply.headers)
        except _Drop:
            self.close_connection = True
        finally:
            if sending:
                self.state.leave()

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self) -> dict[str, Any]:
        try:
            body = json.loads(self._body or b"{}")
        except ValueError:
            raise _Reply(400, {"message": "body is not JSON"}) from None
        if not isinstance(body, dict):
            raise _Reply(400, {"message": "body is not a JSON object"})
        return body

    def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client gave up (e.g. its read timeout)

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self.state.stopping.wait(seconds)

    # faults common to both providers

    def _apply_fault(self, provider: str, fault: Fault | None, latency: float) -> None:
        """Answer a status fault or drop before anything is stored."""
        if fault is None or fault.action not in {"status", "drop_before"}:
            return
        self._pause(latency)
        if fault.action == "drop_before":
            self.state.count_response(provider, "drop_before")
            raise _Drop
        assert fault.status is not None
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        self.state.count_response(provider, fault.status)
        raise _Reply(fault.status, _fault_body(provider, fault), headers)

    def _stall(self, provider: str, fault: Fault | None, stall_seconds: float) -> None:
        """A stall once the message is stored: the answer comes late (the request, and a
        Resend key with it, is still in flight meanwhile)."""
        if fault is not None and fault.action == "stall":
            self.state.count_response(provider, "stall")
            self._pause(fault.seconds if fault.seconds is not None else stall_seconds)

    def _after_store(self, provider: str, fault: Fault | None) -> None:
        """A drop or an error status once the message is stored: no answer, or a wrong one."""
        if fault is None:
            return
        if fault.action == "drop":
            self.state.count_response(provider, "drop")
            raise _Drop
        if fault.action == "stored_status":
            assert fault.status is not None
            self.state.count_response(provider, f"stored_{fault.status}")
            raise _Reply(fault.status, _fault_body(provider, fault))

    def _quota(self, provider: str) -> None:
        """429 past the provider's request quota, with the headers Resend sends."""
        wait = self.state.take_quota(provider)
        if wait is None:
            return
        self.state.count_response(provider, "quota_429")
        limit = int(self.state.quota.get(provider) or 0)
        headers = {
            "Retry-After": str(max(1, math.ceil(wait))),
            "ratelimit-limit": str(limit),
            "ratelimit-remaining": "0",
            "ratelimit-reset": str(max(1, math.ceil(wait))),
        }
        body = (
            _resend_error(429, "rate_limit_exceeded", "Too many requests.")
            if provider == "resend"
            else {"ErrorCode": 429, "Message": "Rate limit exceeded."}
        )
        raise _Reply(429, body, headers)

    def _json_list(self, provider: str, limit: int) -> list[Any]:
        try:
            body = json.loads(self._body or b"[]")
        except ValueError:
            raise _Reply(400, {"message": "body is not JSON"}) from None
        if not isinstance(body, list) or not 0 < len(body) <= limit:
            message = f"a batch holds 1 to {limit} emails"
            raise _Reply(
                422,
                _resend_error(422, "validation_error", message)
                if provider == "resend"
                else {"ErrorCode": 300, "Message": message},
            )
        if not all(isinstance(item, dict) for item in body):
            raise _Reply(400, {"message": "every batch item is a JSON object"})
        return body

    # Resend

    def _resend_batch(self) -> None:
        """POST /emails/batch: one key for the call; a replay answers the first call's ids."""
        key = self.headers.get("Idempotency-Key")
        self.state.count_batch_request("resend", [key] if key else [])
        auth = self.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") != self.state.resend_api_key:
            raise _Reply(403, _resend_error(403, "invalid_api_key", "API key is invalid."))
        self._quota("resend")
        items = self._json_list("resend", 100)
        permissive = self.headers.get("x-batch-validation", "strict").lower() == "permissive"
        fault, latency, stall = self.state.next_fault("resend")
        self._apply_fault("resend", fault, latency)
        errors: list[dict[str, Any]] = []
        valid: list[tuple[dict[str, Any], list[str]]] = []
        for index, item in enumerate(items):
            try:
                valid.append((item, _resend_validate(item)))
            except _Reply as refused:
                if not permissive:
                    raise
                errors.append({"index": index, "message": str(refused.body.get("message"))})
        if key is not None and not 0 < len(key) <= RESEND_KEY_MAX_CHARS:
            raise _Reply(400, _resend_error(400, "invalid_idempotency_key", "The key is too long."))
        fingerprint = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()
        if key:
            earlier = self.state.begin_key(key, fingerprint)
            if earlier is not None:
                self._pause(latency)
                self.state.count_response("resend", 200)
                raise _Reply(200, json.loads(earlier))
        answer: dict[str, Any] = {"data": []}
        try:
            self._pause(latency)
            for item, to in valid:
                message_id = str(uuid.uuid4())
                self.state.store(
                    StoredMessage(
                        provider="resend",
                        id=message_id,
                        idempotency_key=key,
                        sender=str(item["from"]),
                        to=to,
                        subject=str(item.get("subject", "")),
                        text=str(item.get("text", "")),
                        tags={
                            str(t.get("name")): str(t.get("value")) for t in item.get("tags") or []
                        },
                        received_at=_now_iso(),
                        stored_at=self.state.now(),
                    )
                )
                answer["data"].append({"id": message_id})
            if permissive:
                answer["errors"] = errors
            self._stall("resend", fault, stall)
        except BaseException:
            if key:
                self.state.finish_key(key, None)
            raise
        if key:
            self.state.finish_key(key, json.dumps(answer))
        self._after_store("resend", fault)
        self.state.count_response("resend", 200)
        raise _Reply(200, answer)

    def _resend_send(self) -> None:
        key = self.headers.get("Idempotency-Key")
        self.state.count_request("resend", key)
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise _Reply(
                401,
                _resend_error(
                    401, "missing_api_key", "Missing API key in the authorization header."
                ),
            )
        if auth.removeprefix("Bearer ") != self.state.resend_api_key:
            raise _Reply(403, _resend_error(403, "invalid_api_key", "API key is invalid."))
        body = self._json()
        self._quota("resend")
        fault, latency, stall = self.state.next_fault("resend")
        self._apply_fault("resend", fault, latency)
        to = _resend_validate(body)
        if key is not None and not 0 < len(key) <= RESEND_KEY_MAX_CHARS:
            raise _Reply(
                400,
                _resend_error(
                    400,
                    "invalid_idempotency_key",
                    f"The key must be between 1-{RESEND_KEY_MAX_CHARS} chars.",
                ),
            )
        if key:
            earlier = self.state.begin_key(key, _fingerprint(body))
            if earlier is not None:
                self._pause(latency)
                self.state.count_response("resend", 200)
                raise _Reply(200, {"id": earlier})
        message_id = str(uuid.uuid4())
        try:
            self._pause(latency)  # the window in which the key is "in flight"
            self.state.store(
                StoredMessage(
                    provider="resend",
                    id=message_id,
                    idempotency_key=key,
                    sender=str(body["from"]),
                    to=to,
                    subject=str(body.get("subject", "")),
                    text=str(body.get("text", "")),
                    tags={str(t.get("name")): str(t.get("value")) for t in body.get("tags") or []},
                    received_at=_now_iso(),
                    stored_at=self.state.now(),
                )
            )
            self._stall("resend", fault, stall)  # the key stays in flight through a stall
        except BaseException:
            if key:
                self.state.finish_key(key, None)
            raise
        if key:
            self.state.finish_key(key, message_id)
        self._after_store("resend", fault)
        self.state.count_response("resend", 200)
        raise _Reply(200, {"id": message_id})

    # Postmark

    def _postmark_auth(self) -> None:
        if self.headers.get("X-Postmark-Server-Token") != self.state.postmark_token:
            raise _Reply(401, {"ErrorCode": 10, "Message": "Bad or missing Server API token."})

    def _postmark_batch(self) -> None:
        """POST /email/batch: 200 with one result per message; no idempotency."""
        try:
            raw = json.loads(self._body or b"[]")
            keys = (
                [
                    str(m["Metadata"][POSTMARK_KEY_FIELD])
                    for m in raw
                    if isinstance(m, dict)
                    and isinstance(m.get("Metadata"), dict)
                    and m["Metadata"].get(POSTMARK_KEY_FIELD)
                ]
                if isinstance(raw, list)
                else []
            )
        except ValueError:
            keys = []
        self.state.count_batch_request("postmark", keys)
        self._postmark_auth()
        self._quota("postmark")
        items = self._json_list("postmark", 500)
        fault, latency, stall = self.state.next_fault("postmark")
        self._apply_fault("postmark", fault, latency)
        self._pause(latency)
        results: list[dict[str, Any]] = []
        for item in items:
            try:
                to = _postmark_validate(item, self.state.inactive_recipients)
            except _Reply as refused:
                results.append(
                    {
                        "ErrorCode": refused.body.get("ErrorCode", 300),
                        "Message": refused.body.get("Message", "invalid"),
                        "To": item.get("To"),
                    }
                )
                continue
            message_id = str(uuid.uuid4())
            metadata = {str(k): str(v) for k, v in (item.get("Metadata") or {}).items()}
            self.state.store(
                StoredMessage(
                    provider="postmark",
                    id=message_id,
                    idempotency_key=metadata.get(POSTMARK_KEY_FIELD),
                    sender=str(item["From"]),
                    to=to,
                    subject=str(item.get("Subject", "")),
                    text=str(item.get("TextBody", "")),
                    metadata=metadata,
                    tag=item.get("Tag"),
                    received_at=_now_iso(),
                    stored_at=self.state.now(),
                )
            )
            results.append(
                {
                    "To": item.get("To"),
                    "SubmittedAt": _now_iso(),
                    "MessageID": message_id,
                    "ErrorCode": 0,
                    "Message": "OK",
                }
            )
        self._stall("postmark", fault, stall)
        self._after_store("postmark", fault)
        self.state.count_response("postmark", 200)
        raise _Reply(200, results)

    def _postmark_send(self) -> None:
        self.state.count_request("postmark", _postmark_key(self._body))
        self._postmark_auth()
        self._quota("postmark")
        body = self._json()
        fault, latency, stall = self.state.next_fault("postmark")
        self._apply_fault("postmark", fault, latency)
        to = _postmark_validate(body, self.state.inactive_recipients)
        message_id = str(uuid.uuid4())
        self._pause(latency)
        metadata = {str(k): str(v) for k, v in (body.get("Metadata") or {}).items()}
        self.state.store(
            StoredMessage(
                provider="postmark",
                id=message_id,
                idempotency_key=metadata.get("idempotency_key"),
                sender=str(body["From"]),
                to=to,
                subject=str(body.get("Subject", "")),
                text=str(body.get("TextBody", "")),
                metadata=metadata,
                tag=body.get("Tag"),
                received_at=_now_iso(),
                stored_at=self.state.now(),
            )
        )
        self._stall("postmark", fault, stall)
        self._after_store("postmark", fault)
        self.state.count_response("postmark", 200)
        raise _Reply(
            200,
            {
                "To": body["To"],
                "SubmittedAt": _now_iso(),
                "MessageID": message_id,
                "ErrorCode": 0,
                "Message": "OK",
            },
        )

    def _postmark_search(self) -> None:
        self._postmark_auth()
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        self.state.count_lookup("postmark", query.get(f"metadata_{POSTMARK_KEY_FIELD}"))
        try:
            count, offset = int(query["count"]), int(query["offset"])
        except (KeyError, ValueError):
            raise _Reply(
                422, {"ErrorCode": 1, "Message": "count and offset are required"}
            ) from None
        if not 0 < count <= 500:
            raise _Reply(422, {"ErrorCode": 1, "Message": "count must be 1..500"})
        if offset < 0:
            raise _Reply(422, {"ErrorCode": 1, "Message": "offset must not be negative"})
        self._pause(self.state.latency("postmark"))
        now = self.state.now()
        found = [
            m
            for m in reversed(self.state.messages("postmark"))
            if self.state.searchable(m, now) and _matches(m, query)
        ]
        raise _Reply(
            200,
            {
                "TotalCount": len(found),
                "Messages": [_summary(m) for m in found[offset : offset + count]],
            },
        )

    # admin

    def _admin_messages(self) -> None:
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        provider = query.get("provider")
        messages = self.state.messages(provider)
        _ok(
            {
                "total": len(messages),
                "messages": [_as_json(m) for m in messages],
                "counts_by_key": self.state.counts_by_key(provider),
                "counts_by_delivery": self.state.counts_by_delivery(),
                "requests_by_key": self.state.key_counts(provider)["requests"],
            }
        )

    def _admin_keys(self) -> None:
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        _ok(self.state.key_counts(query.get("provider")))

    def _admin_clock(self) -> None:
        body = self._json()
        try:
            if "now" in body:
                now = self.state.set_now(datetime.fromisoformat(str(body["now"])))
            else:
                now = self.state.advance(float(body.get("advance", 0)))
        except (TypeError, ValueError) as exc:
            raise _Reply(400, {"message": str(exc)}) from None
        _ok({"now": now.isoformat()})

    def _admin_config(self) -> None:
        body = self._json()
        if "quota" in body:
            try:
                quota = {str(p): float(n) for p, n in dict(body["quota"]).items()}
            except (TypeError, ValueError):
                raise _Reply(400, {"message": "quota is {provider: requests per second}"}) from None
            if any(p not in PROVIDERS or n < 0 for p, n in quota.items()):
                raise _Reply(400, {"message": "quota: known providers, non-negative rates"})
            self.state.quota.update(quota)
            if "search_lag_seconds" not in body:
                _ok({"quota": self.state.quota})
        try:
            lag = float(body["search_lag_seconds"])
        except (KeyError, TypeError, ValueError):
            raise _Reply(400, {"message": "search_lag_seconds (a number) is required"}) from None
        if lag < 0:
            raise _Reply(400, {"message": "search_lag_seconds must not be negative"})
        self.state.search_lag_seconds = lag
        _ok({"search_lag_seconds": lag, "quota": self.state.quota})

    def _admin_faults(self) -> None:
        body = self._json()
        provider = str(body.pop("provider", "all"))
        try:
            self.state.set_faults(provider, **body)
        except (TypeError, ValueError) as exc:
            raise _Reply(400, {"message": str(exc)}) from None
        _ok({"ok": True})

    def _admin_reset(self) -> None:
        self.state.reset()
        _ok({"ok": True})


def _ok(body: dict[str, Any]) -> None:
    raise _Reply(200, body)


def _fault_body(provider: str, fault: Fault) -> dict[str, Any]:
    status = fault.status or 500
    if provider == "resend":
        default = {
            429: "rate_limit_exceeded",
            422: "validation_error",
            401: "missing_api_key",
            403: "invalid_api_key",
            404: "not_found",
        }.get(status, "internal_server_error")
        return _resend_error(status, fault.name or default, fault.message or f"injected {status}")
    code = (
        fault.error_code
        if fault.error_code is not None
        else {422: 300, 401: 10, 429: 429}.get(status, 0)
    )
    return {"ErrorCode": code, "Message": fault.message or f"injected {status}"}


def _resend_validate(body: dict[str, Any]) -> list[str]:
    if not body.get("from"):
        raise _Reply(422, _resend_error(422, "missing_required_field", "Missing `from` field."))
    if not _valid_address(body["from"]):
        raise _Reply(422, _resend_error(422, "invalid_from_address", "Invalid `from` field."))
    raw = body.get("to")
    to = [raw] if isinstance(raw, str) else raw
    if not isinstance(to, list) or not to or not all(_valid_address(a) for a in to):
        raise _Reply(422, _resend_error(422, "validation_error", "Invalid `to` field."))
    if "subject" not in body:
        raise _Reply(422, _resend_error(422, "missing_required_field", "Missing `subject` field."))
    return [str(a) for a in to]


def _postmark_validate(body: dict[str, Any], inactive: set[str]) -> list[str]:
    if not _valid_address(body.get("From")):
        raise _Reply(422, {"ErrorCode": 300, "Message": "Invalid 'From' address."})
    to = [a.strip() for a in str(body.get("To") or "").split(",") if a.strip()]
    if not to or not all(_valid_address(a) for a in to):
        raise _Reply(422, {"ErrorCode": 300, "Message": "Invalid 'To' address."})
    metadata = body.get("Metadata") or {}
    if not isinstance(metadata, dict) or len(metadata) > POSTMARK_METADATA_MAX_FIELDS:
        raise _Reply(
            422,
            {
                "ErrorCode": 300,
                "Message": f"Metadata holds at most {POSTMARK_METADATA_MAX_FIELDS} fields.",
            },
        )
    for name, value in metadata.items():
        if not 0 < len(str(name)) <= POSTMARK_METADATA_NAME_MAX:
            raise _Reply(
                422,
                {
                    "ErrorCode": 300,
                    "Message": f"Metadata field names are 1-{POSTMARK_METADATA_NAME_MAX} chars.",
                },
            )
        if len(str(value)) > POSTMARK_METADATA_VALUE_MAX:
            raise _Reply(
                422,
                {
                    "ErrorCode": 300,
                    "Message": f"Metadata values are at most {POSTMARK_METADATA_VALUE_MAX} chars.",
                },
            )
    if any(_address(a).lower() in inactive for a in to):
        raise _Reply(
            422,
            {
                "ErrorCode": 406,
                "Message": "You tried to send to recipient(s) that have been marked as inactive.",
            },
        )
    return to


def _as_json(message: StoredMessage) -> dict[str, Any]:
    stored_at = message.stored_at.isoformat() if message.stored_at else None
    return {**asdict(message), "stored_at": stored_at}


def _postmark_key(raw: bytes) -> str | None:
    """The idempotency key in a Postmark body's Metadata, if the body is readable."""
    try:
        body = json.loads(raw or b"{}")
        key = body["Metadata"][POSTMARK_KEY_FIELD]
    except (ValueError, TypeError, KeyError):
        return None
    return str(key) if key else None


def _matches(message: StoredMessage, query: dict[str, str]) -> bool:
    if "recipient" in query and query["recipient"] not in (_address(a) for a in message.to):
        return False
    if "tag" in query and message.tag != query["tag"]:
        return False
    wanted = {k.removeprefix("metadata_"): v for k, v in query.items() if k.startswith("metadata_")}
    return all(message.metadata.get(k) == v for k, v in wanted.items())


def _summary(message: StoredMessage) -> dict[str, Any]:
    return {
        "MessageID": message.id,
        "To": [{"Email": _address(a), "Name": None} for a in message.to],
        "Recipients": [_address(a) for a in message.to],
        "From": message.sender,
        "Subject": message.subject,
        "Tag": message.tag,
        "Status": "Sent",
        "Metadata": message.metadata,
        "ReceivedAt": message.received_at,
        "MessageStream": "outbound",
    }


# ---------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # many consumers connecting at once must not be refused

    def __init__(self, address: tuple[str, int], state: FakeProviderState) -> None:
        self.state = state
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up on every client, so a stopped server really is gone (keep-alive too)."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):  # already gone
                sock.shutdown(socket.SHUT_RDWR)


class FakeProviderServer:
    """The fake Resend + Postmark server, in a background thread. Use as a context manager or
    call start() / stop()."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        resend_api_key: str = DEFAULT_RESEND_KEY,
        postmark_token: str = DEFAULT_POSTMARK_TOKEN,
        latency_ms: float = 0.0,
        search_lag_seconds: float = 0.0,
        quota: dict[str, float] | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.state = FakeProviderState(
            resend_api_key=resend_api_key,
            postmark_token=postmark_token,
            latency_ms=latency_ms,
            search_lag_seconds=search_lag_seconds,
        )
        self.state.quota.update(quota or {})
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def resend_api_key(self) -> str:
        return self.state.resend_api_key

    @property
    def postmark_token(self) -> str:
        return self.state.postmark_token

    def start(self) -> FakeProviderServer:
        self.state.stopping.clear()
        self._server = _Server((self.host, self._requested_port or self.port), self.state)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"fake-provider-{self.port}",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port: later connections are refused."""
        if self._server is None:
            return
        self.state.stopping.set()  # ends stalls early
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FakeProviderServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # the Python side of the admin API

    def set_faults(
        self, provider: str, queue: list[Any] | tuple[Any, ...] = (), **options: Any
    ) -> None:
        """Replace `provider`'s faults ("resend", "postmark" or "all"); see the module doc."""
        self.state.set_faults(provider, queue, **options)

    def push_faults(self, provider: str, *specs: Any) -> None:
        """Queue more faults after the ones already queued."""
        self.state.set_faults(provider, specs, append=True)

    def messages(self, provider: str | None = None) -> list[StoredMessage]:
        return self.state.messages(provider)

    def count_for_key(self, key: str, provider: str | None = None) -> int:
        """Stored messages carrying `key` (a Resend replay stores nothing: see requests_for_key)."""
        return self.state.counts_by_key(provider).get(key, 0)

    def requests_for_key(self, key: str, provider: str | None = None) -> int:
        """Send requests that reached the fake with `key`, whatever it answered."""
        return self.state.key_counts(provider)["requests"].get(key, 0)

    def replays_for_key(self, key: str, provider: str | None = None) -> int:
        """Resend sends with `key` answered with the first message (nothing new stored)."""
        return self.state.key_counts(provider)["replays"].get(key, 0)

    def lookups_for_key(self, key: str, provider: str | None = None) -> int:
        """Postmark outbound searches by `key`."""
        return self.state.key_counts(provider)["lookups"].get(key, 0)

    def key_counts(self, provider: str | None = None) -> dict[str, dict[str, int]]:
        return self.state.key_counts(provider)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no send is being handled: a stalled request has finished on the server side
        (a Resend key it holds is no longer in flight). `timeout` is a ceiling."""
        self.state.wait_idle(timeout)

    def advance(self, seconds: float) -> datetime:
        """Move the fake's clock forward (Resend key expiry, Postmark search lag)."""
        return self.state.advance(seconds)

    def set_now(self, when: datetime) -> datetime:
        return self.state.set_now(when)

    @property
    def search_lag_seconds(self) -> float:
        return self.state.search_lag_seconds

    @search_lag_seconds.setter
    def search_lag_seconds(self, seconds: float) -> None:
        self.state.search_lag_seconds = seconds

    def set_quota(self, provider: str, requests_per_second: float) -> None:
        """At most this many send requests per second for `provider` (0 = unlimited)."""
        self.state.quota[provider] = requests_per_second

    def messages_for_delivery(self, delivery_id: str, kind: str = "letter") -> list[StoredMessage]:
        """Stored messages of one letter (`kind`; an owner's notice has its own), by its
        delivery_id (Resend tag, Postmark metadata): how "sent once" is counted when letters
        travel in batches under a batch key."""
        return [
            m
            for m in self.messages()
            if {**m.metadata, **m.tags}.get("delivery_id") == delivery_id
            and {**m.metadata, **m.tags}.get("kind") == kind
        ]

    def mark_inactive(self, address: str) -> None:
        """Postmark will answer 422 / ErrorCode 406 for this recipient."""
        self.state.inactive_recipients.add(address.lower())

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def reset(self) -> None:
        self.state.reset()


class AdminClient:
    """Drives a fake provider server from another process, over HTTP."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self._client = httpx.Client(base_url=url, timeout=timeout)

    def set_faults(
        self, provider: str = "all", queue: list[Any] | tuple[Any, ...] = (), **options: Any
    ) -> None:
        self._post("/_admin/faults", {"provider": provider, "queue": list(queue), **options})

    def push_faults(self, provider: str, *specs: Any) -> None:
        self._post("/_admin/faults", {"provider": provider, "queue": list(specs), "append": True})

    def messages(self, provider: str | None = None) -> dict[str, Any]:
        params = {"provider": provider} if provider else {}
        response = self._client.get("/_admin/messages", params=params)
        response.raise_for_status()
        return dict(response.json())

    def stats(self) -> dict[str, Any]:
        response = self._client.get("/_admin/stats")
        response.raise_for_status()
        return dict(response.json())

    def key_counts(self, provider: str | None = None) -> dict[str, dict[str, int]]:
        """{"requests": {key: n}, "replays": {...}, "lookups": {...}}."""
        params = {"provider": provider} if provider else {}
        response = self._client.get("/_admin/keys", params=params)
        response.raise_for_status()
        return dict(response.json())

    def advance(self, seconds: float) -> None:
        self._post("/_admin/clock", {"advance": seconds})

    def set_search_lag(self, seconds: float) -> None:
        self._post("/_admin/config", {"search_lag_seconds": seconds})

    def set_quota(self, provider: str, requests_per_second: float) -> None:
        self._post("/_admin/config", {"quota": {provider: requests_per_second}})

    def reset(self) -> None:
        self._post("/_admin/reset", {})

    def close(self) -> None:
        self._client.close()

    def _post(self, path: str, body: dict[str, Any]) -> None:
        self._client.post(path, json=body).raise_for_status()


# ---------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Resend + Postmark API server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--search-lag-seconds", type=float, default=0.0)
    parser.add_argument(
        "--quota", type=float, default=0.0, help="send requests per second per provider (0 = none)"
    )
    parser.add_argument("--p-5xx", type=float, default=0.0)
    parser.add_argument("--p-429", type=float, default=0.0)
    parser.add_argument("--p-stall", type=float, default=0.0)
    parser.add_argument("--stall-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--resend-key", default=DEFAULT_RESEND_KEY)
    parser.add_argument("--postmark-token", default=DEFAULT_POSTMARK_TOKEN)
    args = parser.parse_args(argv)

    server = FakeProviderServer(
        args.host,
        args.port,
        resend_api_key=args.resend_key,
        postmark_token=args.postmark_token,
        latency_ms=args.latency_ms,
        search_lag_seconds=args.search_lag_seconds,
        quota={p: args.quota for p in PROVIDERS} if args.quota else None,
    ).start()
    server.set_faults(
        "all",
        p_5xx=args.p_5xx,
        p_429=args.p_429,
        p_stall=args.p_stall,
        seed=args.seed,
        stall_seconds=args.stall_seconds,
    )
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    print(server.url, flush=True)
    done.wait()
    server.stop()


if __name__ == "__main__":
    main()
