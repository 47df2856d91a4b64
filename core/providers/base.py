"""What every email provider offers, and the message it sends.

A provider sends one `Email` and either returns `Accepted` or raises one of
`TransientProviderError` (definitely not accepted), `AmbiguousProviderError` (may have been
accepted) or `PermanentProviderError` (never will be), translated from its transport's errors
in one place. Every call carries the delivery's idempotency key (DESIGN.md invariant 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Email:
    to: str
    sender: str
    subject: str
    text: str
    idempotency_key: str  # one per delivery (or per notification), fixed at creation
    tags: dict[str, str] = field(default_factory=dict)  # e.g. delivery_id, kind


@dataclass(frozen=True)
class Accepted:
    provider: str
    message_id: str
    status_code: int | None = None


class Provider(Protocol):
    name: str
    # True when find_sent can really tell whether a key was sent (Postmark search, the outbox
    # file); False when it cannot (Resend deduplicates re-sends instead; SMTP neither).
    can_look_up: bool
    # True when find_sent may miss a message accepted moments ago (Postmark's search indexes
    # with a delay): its "not found" is trusted only after the settle window. Read with
    # getattr(..., False), so a provider without it is one whose lookups are immediate.
    lookup_lags: bool

    def send(self, email: Email) -> Accepted:
        """Hand the message over; raise a ProviderError subclass if it was not accepted."""
        ...

    def find_sent(self, email: Email) -> Accepted | None:
        """After an ambiguous outcome: the message this key already produced, if the provider
        can tell (Postmark: search by metadata). None when unknown or unsupported."""
        ...
