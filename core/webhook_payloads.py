"""What a provider's webhook says, reduced to a `ParsedEvent`: allowlisted fields only, never
the subject or letter text.

    parse_resend     a Resend (Svix-signed) event; its id is the `svix-id` header
    parse_postmark   a Postmark Delivery, Bounce or SpamComplaint webhook

The caller (core.receiver) verifies the request first; a payload these cannot read raises
`WebhookPayloadError`. Storing and processing the event is core.webhooks' part.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core.errors import WebhookPayloadError
from core.models import BounceKind

RESEND = "resend"
POSTMARK = "postmark"

# Event types as stored (webhook_events.type)
DELIVERED = "delivered"
BOUNCED = "bounced"
COMPLAINED = "complained"
DELAYED = "delayed"
OTHER = "other"

LETTER_KIND = "letter"  # the tag a letter carries (core.worker); notices carry another


@dataclass(frozen=True)
class ParsedEvent:
    """A provider's event, reduced to what we act on and may keep."""

    provider: str
    event_id: str
    type: str
    provider_message_id: str | None
    recipient: str | None
    occurred_at: datetime | None = None
    bounce_kind: str | None = None
    delivery_hint: uuid.UUID | None = None  # the letter's own tag, when it carried one
    payload: dict[str, Any] = field(default_factory=dict)


def _text(value: Any, limit: int = 320) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text[:limit] or None


def _time(value: Any) -> datetime | None:
    text = _text(value, 64)
    if text is None:
        return None
    try:
        # Postmark writes seven fractional digits; fromisoformat takes at most six.
        head, dot, rest = text.replace("Z", "+00:00").partition(".")
        if dot:
            digits = len(rest) - len(rest.lstrip("0123456789"))
            text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else None


def _hint(tags: Mapping[str, Any]) -> uuid.UUID | None:
    """The delivery id a letter's tags carry; None for notices and anything else."""
    if str(tags.get("kind", "")) != LETTER_KIND:
        return None
    try:
        return uuid.UUID(str(tags.get("delivery_id", "")))
    except ValueError:
        return None


def _pick(source: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {n: source[n] for n in names if n in source and not isinstance(source[n], dict | list)}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _require_object(payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise WebhookPayloadError("the body is not a JSON object")
    return payload


_RESEND_TYPES = {
    "email.delivered": DELIVERED,
    "email.bounced": BOUNCED,
    "email.complained": COMPLAINED,
    "email.delivery_delayed": DELAYED,
}


def parse_resend(event_id: str, payload: Any) -> ParsedEvent:
    """A Resend (Svix-signed) event; `event_id` is the `svix-id` header."""
    body = _require_object(payload)
    data = body.get("data")
    kind = _text(body.get("type"), 64)
    if not kind or not isinstance(data, Mapping):
        raise WebhookPayloadError("a Resend event needs a type and a data object")
    event_type = _RESEND_TYPES.get(kind, OTHER)
    bounce = _mapping(data.get("bounce"))
    bounce_kind = None
    if event_type == BOUNCED:
        # Resend: Permanent (hard), Transient (soft), Undetermined (soft: not proof of death)
        permanent = str(bounce.get("type", "")).lower() == "permanent"
        bounce_kind = BounceKind.HARD if permanent else BounceKind.SOFT
    raw_tags = data.get("tags")
    tags: dict[str, Any] = {}
    if isinstance(raw_tags, Mapping):
        tags = {str(k): v for k, v in raw_tags.items()}
    elif isinstance(raw_tags, list):
        tags = {
            str(t.get("name")): t.get("value")
            for t in raw_tags
            if isinstance(t, Mapping) and "name" in t
        }
    to = data.get("to")
    recipient = _text(to[0] if isinstance(to, list) and to else to)
    return ParsedEvent(
        provider=RESEND,
        event_id=event_id[:200],
        type=event_type,
        provider_message_id=_text(data.get("email_id"), 200),
        recipient=recipient,
        occurred_at=_time(body.get("created_at")),
        bounce_kind=bounce_kind,
        delivery_hint=_hint(tags),
        payload={
            "type": kind,
            "created_at": _text(body.get("created_at"), 64),
            "email_id": _text(data.get("email_id"), 200),
            "to": recipient,
            "bounce": _pick(bounce, ("type", "subType", "message")),
            "tags": {k: _text(v, 100) for k, v in tags.items() if k in ("delivery_id", "kind")},
        },
    )


# Postmark bounce types that prove the address dead; every other type is soft.
POSTMARK_HARD = frozenset({"HardBounce", "BadEmailAddress", "ManuallyDeactivated"})
_POSTMARK_KEEP = (
    "RecordType",
    "ID",
    "Type",
    "TypeCode",
    "Name",
    "MessageID",
    "MessageStream",
    "ServerID",
    "Email",
    "Recipient",
    "BouncedAt",
    "DeliveredAt",
    "ReceivedAt",
    "Description",
    "Details",
    "Inactive",
    "CanActivate",
    "Tag",
)


def parse_postmark(payload: Any) -> ParsedEvent:
    """A Postmark Delivery, Bounce or SpamComplaint webhook (Basic auth checked by the caller)."""
    body = _require_object(payload)
    record = _text(body.get("RecordType"), 32)
    message_id = _text(body.get("MessageID"), 200)
    if not record or not message_id:
        raise WebhookPayloadError("a Postmark webhook needs a RecordType and a MessageID")
    bounce_kind = None
    if record == "Delivery":
        event_type = DELIVERED
        recipient = _text(body.get("Recipient"))
        # Postmark sends no id for a delivery: one per message and recipient.
        event_id = f"Delivery:{message_id}:{recipient}"
        occurred = _time(body.get("DeliveredAt"))
    elif record in ("Bounce", "SpamComplaint"):
        if body.get("ID") is None:
            raise WebhookPayloadError(f"a Postmark {record} webhook needs an ID")
        recipient = _text(body.get("Email"))
        event_id = f"{record}:{_text(body.get('ID'), 100)}"
        occurred = _time(body.get("BouncedAt"))
        if record == "SpamComplaint" or body.get("Type") == "SpamComplaint":
            event_type = COMPLAINED
        else:
            event_type = BOUNCED
            hard = str(body.get("Type")) in POSTMARK_HARD
            bounce_kind = BounceKind.HARD if hard else BounceKind.SOFT
    else:
        event_type, recipient, occurred = OTHER, _text(body.get("Recipient")), None
        event_id = f"{record}:{message_id}:{_text(body.get('ReceivedAt'), 64)}"
    metadata = _mapping(body.get("Metadata"))
    tags = {"delivery_id": metadata.get("delivery_id"), "kind": body.get("Tag")}
    kept = _pick(body, _POSTMARK_KEEP)
    kept["Metadata"] = {k: _text(v, 80) for k, v in metadata.items() if k == "delivery_id"}
    return ParsedEvent(
        provider=POSTMARK,
        event_id=event_id[:200],
        type=event_type,
        provider_message_id=message_id,
        recipient=recipient,
        occurred_at=occurred,
        bounce_kind=bounce_kind,
        delivery_hint=_hint(tags),
        payload=kept,
    )
