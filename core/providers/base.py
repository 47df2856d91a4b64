"""What every email provider offers, and the message it sends.

A provider sends one `Email` and either returns `Accepted` or raises one of
`TransientProviderError` (definitely not accepted), `AmbiguousProviderError` (may have been
accepted) or `PermanentProviderError` (never will be), translated from its transport's errors
in one place. Every call carries the delivery's idempotency key (DESIGN.md invariant 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from core.errors import ProviderError


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


# One answer per message of a batch, in the batch's order.
BatchResult = list["Accepted | ProviderError"]


class BatchProvider(Provider, Protocol):
    """A provider that can hand over many messages in one call (DESIGN.md invariant 9).

    `send_batch` returns one result per message, in order: `Accepted`, or the error that
    concerns that message alone (a bad recipient). It raises a ProviderError when the call as
    a whole failed: `TransientProviderError` when nothing was accepted, `AmbiguousProviderError`
    when any of it may have been. `replays_batches`: the provider deduplicates a repeated call
    by its key (Resend), so an unknown outcome is settled by repeating the identical call;
    otherwise each message is looked up or retried alone.
    """

    batch_limit: int
    replays_batches: bool

    def batch_body(self, emails: Sequence[Email]) -> bytes:
        """The exact request body a batch call sends (its sha256 is kept on the batch row)."""
        ...

    def send_batch(self, emails: Sequence[Email], key: str) -> BatchResult:
        """Hand all the messages over in one call under the batch's key."""
        ...


def batch_limit(provider: Provider) -> int:
    """How many messages one call to this provider may carry (1 = no batch sends)."""
    return int(getattr(provider, "batch_limit", 1))
