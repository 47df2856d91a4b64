"""What a delivery run's provider calls came to: the chain's answer, the worker's input."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class ProviderCall:
    """What one call to one provider did."""

    provider: str
    outcome: str  # accepted | transient | ambiguous | permanent | possibly_sent | skipped
    started_at: datetime
    duration_ms: int
    status_code: int | None = None
    error_code: str | None = None
    message: str | None = None
    provider_message_id: str | None = None


@dataclass(frozen=True)
class Outcome:
    """How a delivery run ended, as the provider chain saw it."""

    error_class: str | None  # None = sent
    calls: list[ProviderCall] = field(default_factory=list)
    provider: str | None = None
    provider_message_id: str | None = None
    error: str | None = None
    retry_after: float | None = None
    pinned_provider: str | None = None
    # No provider was called (circuits open, rate limit closed): not one of the attempts.
    deferred: bool = False

    @property
    def sent(self) -> bool:
        return self.error_class is None
