"""The webhooks the fake provider server sends after it stored a message, as the real ones do.

    Resend    email.delivered | email.bounced (Permanent) | email.complained, Svix-signed with
              the endpoint's whsec_ secret (svix-id, svix-timestamp, svix-signature)
    Postmark  Delivery | Bounce (HardBounce) | SpamComplaint, Basic auth in the URL

Per message and recipient: an address marked dead gets a soft "delayed"/soft bounce and then a
hard bounce; an address marked complaining gets delivered, then a complaint; any other address
gets delivered. Like the providers: each event may be sent several times (`duplicates`; same
event id, a fresh signature), in another order (`reorder`: last first), and is retried while
the receiver does not answer 2xx (`retries`, with a short backoff).

`auto=False` keeps events until `flush()`, so a test decides when they arrive.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

_IDS = itertools.count(1000)


@dataclass
class Outgoing:
    provider: str
    event_id: str
    body: dict[str, Any]


@dataclass
class WebhookSender:
    receiver_url: str
    resend_secret: str | None = None
    postmark_auth: tuple[str, str] | None = None
    dead: set[str] = field(default_factory=set)
    complaining: set[str] = field(default_factory=set)
    duplicates: int = 1
    reorder: bool = False
    retries: int = 5
    auto: bool = True
    pending: list[Outgoing] = field(default_factory=list)
    answers: Counter[int] = field(default_factory=Counter)  # receiver status codes seen
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # the fake server calls this for every message it stores
    def message_stored(self, message: Any) -> None:
        events = list(self._events(message))
        if self.reorder:
            events.reverse()
        events = [e for e in events for _ in range(self.duplicates)]
        if self.auto:
            threading.Thread(target=self._send_all, args=(events,), daemon=True).start()
        else:
            with self._lock:
                self.pending.extend(events)

    def flush(self) -> int:
        """Send what is pending now, in this thread; returns how many requests went out."""
        with self._lock:
            events, self.pending = self.pending, []
        self._send_all(events)
        return len(events)

    def _send_all(self, events: Iterable[Outgoing]) -> None:
        with httpx.Client(timeout=10) as client:
            for event in events:
                self._send(client, event)

    def _send(self, client: httpx.Client, event: Outgoing) -> None:
        for attempt in range(self.retries + 1):
            raw = json.dumps(event.body).encode()
            headers = {"content-type": "application/json"}
            auth = None
            if event.provider == "resend":
                url = f"{self.receiver_url}/webhooks/resend"
                now = datetime.now(UTC)
                signature = Webhook(self.resend_secret or "").sign(
                    event.event_id, now, raw.decode()
                )
                headers |= {
                    "svix-id": event.event_id,
                    "svix-timestamp": str(int(now.timestamp())),
                    "svix-signature": signature,
                }
            else:
                url = f"{self.receiver_url}/webhooks/postmark"
                auth = self.postmark_auth
            try:
                response = client.post(url, content=raw, headers=headers, auth=auth)
                with self._lock:
                    self.answers[response.status_code] += 1
                if response.is_success or 400 <= response.status_code < 500:
                    return  # delivered, or refused for good (a provider retries only 5xx)
            except httpx.HTTPError:
                with self._lock:
                    self.answers[0] += 1
            time.sleep(min(0.05 * 2**attempt, 1.0))

    def _events(self, message: Any) -> Iterable[Outgoing]:
        for recipient in message.to:
            address = recipient.lower()
            if address in self.dead:
                kinds = ["soft", "hard"]
            elif address in self.complaining:
                kinds = ["delivered", "complained"]
            else:
                kinds = ["delivered"]
            for kind in kinds:
                if message.provider == "resend":
                    yield _resend_event(message, recipient, kind)
                else:
                    yield _postmark_event(message, recipient, kind)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _resend_event(message: Any, recipient: str, kind: str) -> Outgoing:
    data: dict[str, Any] = {
        "email_id": message.id,
        "from": message.sender,
        "to": [recipient],
        "subject": message.subject,  # Resend echoes it: the receiver must not keep it
        "created_at": _now(),
        "tags": dict(message.tags),
    }
    types = {
        "delivered": "email.delivered",
        "complained": "email.complained",
        "soft": "email.bounced",
        "hard": "email.bounced",
    }
    if kind in ("soft", "hard"):
        data["bounce"] = {
            "type": "Permanent" if kind == "hard" else "Transient",
            "subType": "General" if kind == "hard" else "MailboxFull",
            "message": "550 5.1.1 user unknown" if kind == "hard" else "452 mailbox full",
        }
    body = {"type": types[kind], "created_at": _now(), "data": data}
    return Outgoing("resend", f"msg_{uuid.uuid4().hex}", body)


def _postmark_event(message: Any, recipient: str, kind: str) -> Outgoing:
    common = {
        "MessageID": message.id,
        "ServerID": 1,
        "MessageStream": "outbound",
        "Tag": message.tag,
        "Metadata": dict(message.metadata),
    }
    if kind == "delivered":
        body = {
            **common,
            "RecordType": "Delivery",
            "Recipient": recipient,
            "DeliveredAt": _now(),
            "Details": "smtp;250 2.0.0 OK",
        }
        return Outgoing("postmark", f"Delivery:{message.id}:{recipient}", body)
    record = "SpamComplaint" if kind == "complained" else "Bounce"
    body = {
        **common,
        "RecordType": record,
        "ID": next(_IDS),
        "Type": {"complained": "SpamComplaint", "hard": "HardBounce", "soft": "SoftBounce"}[kind],
        "Email": recipient,
        "From": message.sender,
        "BouncedAt": _now(),
        "Subject": message.subject,  # Postmark includes it: the receiver must not keep it
        "Description": "The server was unable to deliver your message.",
        "Details": "smtp;550 5.1.1 user unknown",
        "Inactive": kind != "soft",
        "CanActivate": True,
    }
    return Outgoing("postmark", f"{record}:{body['ID']}", body)
