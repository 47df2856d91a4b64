"""What a delivery run's provider calls came to (the chain's answer, the worker's input), and
what the row should become: `decide` is the pure half of recording an outcome.

    decide(round_attempts, outcome, settings, now, rng) → Decision
        sent                                   → sent
        deferred (no provider was called, or a missing key)
                                               → defer: back to scheduled, attempt given back
        retryable and attempts left, not final → retry: back to scheduled after a backoff
        otherwise                              → fail (ambiguous if it was pinned)

The writes (compare-and-set on the row, attempt rows, audit, refund, owner notice) are
`core.recording.record_outcomes`, one transaction for a whole batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from core.models import ErrorClass
from core.policy import backoff_seconds, deferral_seconds

if TYPE_CHECKING:
    from core.config import Settings

RETRYABLE = frozenset({ErrorClass.TRANSIENT, ErrorClass.AMBIGUOUS, ErrorClass.LEASE_EXPIRED})
# Classes a run may defer without spending an attempt. A missing key is never a failure: the
# letter waits for its key however long that takes.
DEFERRABLE = RETRYABLE | {ErrorClass.MISSING_KEY}


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
    # People must decide (e.g. a batch's idempotency key has expired): never retried.
    final: bool = False
    # The letter stays in its live batch: its retry repeats the batch's call, same key.
    keep_batch: bool = False
    # The letter's encryption key is not in the keyring: it waits, spending no attempt.
    waits_for_key: bool = False

    @property
    def sent(self) -> bool:
        return self.error_class is None


SENT = "sent"
RETRY = "retry"
DEFER = "defer"
FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    """What one letter's run comes to; `error_class` is the class written on a failure."""

    action: str  # sent | retry | defer | fail
    next_attempt_at: datetime | None = None
    error_class: str | None = None
    # No provider was asked at all: the run is not counted in the delivery's total either, or
    # a letter that waited days for its key would reach the failed retrier's cap unsent.
    uncounted: bool = False


def decide(
    round_attempts: int,
    outcome: Outcome,
    settings: Settings,
    *,
    now: datetime,
    rng: random.Random | None = None,
    defer_spread: float | None = None,
) -> Decision:
    """Sent, retry at, defer to, or fail: from the run's attempt number in this round, its
    outcome, the retry settings and `now`. Pure: no database, no clock.

    `defer_spread`: how widely deferred runs are spread after the gate may open (default the
    backoff base). A batch comes back as one request, not as a herd, so it spreads little.
    """
    if outcome.sent:
        return Decision(SENT)
    # A run that reached no provider (circuits open, rate limit closed, a 429 on a batch)
    # tried nothing: it gives its attempt back and comes again once the gate may open.
    if outcome.deferred and outcome.error_class in DEFERRABLE and not outcome.final:
        spread = settings.backoff_base_seconds if defer_spread is None else defer_spread
        delay = deferral_seconds(outcome.retry_after, spread=spread, rng=rng)
        uncounted = outcome.waits_for_key and not outcome.calls
        return Decision(DEFER, now + timedelta(seconds=delay), outcome.error_class, uncounted)
    if (
        outcome.error_class in RETRYABLE
        and round_attempts < settings.max_attempts
        and not outcome.final
    ):
        delay = backoff_seconds(
            round_attempts,
            base=settings.backoff_base_seconds,
            cap=settings.backoff_max_seconds,
            retry_after=outcome.retry_after,
            rng=rng,
        )
        return Decision(RETRY, now + timedelta(seconds=delay), outcome.error_class)
    # A delivery pinned after an ambiguous outcome may have arrived, whatever the last try
    # said: it fails as ambiguous, for a person to check, never for a blind automatic retry.
    failed_class = (
        ErrorClass.AMBIGUOUS
        if outcome.pinned_provider and outcome.error_class == ErrorClass.TRANSIENT
        else outcome.error_class
    )
    return Decision(FAIL, error_class=failed_class)
