"""The provider chain: try providers in order, failing over only when a send was definitely
not accepted (DESIGN.md invariant 7).

    for each provider, in order:
        circuit open            → "skipped", next provider
        rate limit (after ≤ ~1 s of waiting in total) → "transient", next provider
        circuit half-open       → this run makes the one trial call, or "skipped" if another has it
        Accepted                → sent
        TransientProviderError  → count a circuit failure, next provider
        AmbiguousProviderError  → count a circuit failure, stop; pin this provider
        PermanentProviderError  → stop (PossiblySentError → "possibly_sent")
    all transient → "transient", retry after the largest Retry-After seen (the earliest
                    reopening when no provider was called)

A run that called no provider at all (every one skipped or held back by the rate limit) is
`deferred`: the worker retries it without counting it as one of the delivery's attempts.

A delivery pinned to a provider (after an ambiguous outcome) uses only that provider and asks
it first whether the message already went out (`find_sent`). Every failure outcome of a pinned
run stays pinned, so a later run can never send the letter somewhere else.

The settle window: a provider whose search lags (Postmark) may not yet show a message it
accepted moments ago, so its "not found" is trusted only from `settle_until` on (the last
ambiguous call plus CAPSULE_LOOKUP_SETTLE_SECONDS). Before that the run sends nothing and
ends `deferred` (no attempt used up), due again when the window closes, still pinned.

`send_batch` hands many letters to one provider in one call (DESIGN.md invariant 9) and
answers one Outcome per letter:

    circuit open / rate limit closed (≤ ~10 s) / a 429   → every letter deferred (no attempt)
    call refused as a whole (nothing stored)              → every letter transient
    unknown outcome (timeout, drop, 5xx, bug)             → every letter ambiguous, pinned to
        the provider; kept in the batch when the provider replays batches (Resend: the
        identical call with the same key), else looked up one by one later (Postmark)
    answered                                              → each letter its own answer

A replayed batch keeps every failure pinned and in the batch: its first call may have
stored it, so no letter of it may go anywhere else or under another key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from core.errors import (
    AmbiguousProviderError,
    MessageBuildError,
    ProviderError,
    TransientProviderError,
)
from core.models import ErrorClass
from core.outcomes import Outcome, ProviderCall
from core.policy import Clock, utcnow
from core.providers.base import (
    Accepted,
    BatchProvider,
    BatchResult,
    Email,
    Provider,
    batch_limit,
)
from core.providers.circuit import OPEN, CircuitBreaker
from core.providers.http import short
from core.providers.ratelimit import RateLimiter

log = logging.getLogger(__name__)

RATE_LIMITED = "rate_limited"
CIRCUIT_OPEN = "circuit_open"
ERROR_LIMIT = 500


@dataclass
class _Run:
    """What one `send` has seen so far."""

    email: Email
    now: datetime
    clock: Clock
    wait_budget: float
    settle_until: datetime | None = None  # a lagging search's "not found" counts from then
    calls: list[ProviderCall] = field(default_factory=list)
    errors: list[ProviderError] = field(default_factory=list)
    called: bool = False  # some provider was actually asked or sent to

    def record(
        self,
        provider: str,
        outcome: str,
        started: tuple[datetime, float],
        *,
        error: ProviderError | None = None,
        message: str | None = None,
        message_id: str | None = None,
        status_code: int | None = None,
    ) -> None:
        started_at, t0 = started
        if error is not None:
            self.errors.append(error)
            status_code = error.status_code
            message = message or short(str(error).removeprefix(f"{provider}: "))
        self.calls.append(
            ProviderCall(
                provider=provider,
                outcome=outcome,
                started_at=started_at,
                duration_ms=int(round((time.perf_counter() - t0) * 1000)),
                status_code=status_code,
                error_code=error.error_code if error else None,
                message=message,
                provider_message_id=message_id,
            )
        )

    def start(self) -> tuple[datetime, float]:
        return self.clock(), time.perf_counter()

    def sent(self, accepted: Accepted) -> Outcome:
        return Outcome(
            error_class=None,
            calls=self.calls,
            provider=accepted.provider,
            provider_message_id=accepted.message_id,
        )

    def settling(self, provider: Provider) -> bool:
        """True while `provider`'s search may still miss a message sent by an earlier run."""
        lags = bool(getattr(provider, "lookup_lags", False))
        return lags and self.settle_until is not None and self.now < self.settle_until

    def wait_to_settle(self, error_class: str, *, pinned: str | None) -> Outcome:
        """Nothing found, too early to trust it: send nothing, come back when it settles."""
        assert self.settle_until is not None
        return Outcome(
            error_class=error_class,
            calls=self.calls,
            error=f"lookup found nothing yet; trusted from {self.settle_until.isoformat()}",
            retry_after=max(0.0, (self.settle_until - self.now).total_seconds()),
            pinned_provider=pinned,
            deferred=True,
        )

    def failed(
        self, error_class: str, *, pinned: str | None = None, error: str | None = None
    ) -> Outcome:
        retry_afters = [e.retry_after for e in self.errors if e.retry_after is not None]
        summary = error or "; ".join(str(e) for e in self.errors) or "no provider available"
        deferred = not self.called and error_class == ErrorClass.TRANSIENT
        # Providers that answered asked us to wait: respect the longest. Gates that kept us
        # from calling any provider: come back when the first of them may open.
        pick = min if deferred else max
        return Outcome(
            error_class=error_class,
            calls=self.calls,
            error=short(summary, ERROR_LIMIT),
            retry_after=pick(retry_afters) if retry_afters else None,
            pinned_provider=pinned,
            deferred=deferred,
        )


class ProviderChain:
    """Sends one email through the configured providers, in failover order."""

    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        breaker: CircuitBreaker | None = None,
        limiter: RateLimiter | None = None,
        max_wait_seconds: float = 1.0,
        batch_wait_seconds: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.providers = list(providers)
        self._by_name = {p.name: p for p in self.providers}
        self.breaker = breaker
        self.limiter = limiter
        self._max_wait = max_wait_seconds
        # A batch holds many letters and costs one request: worth waiting longer for a token
        # than one letter is (a burst's batches queue on the shared quota, not on retries).
        self._batch_wait = batch_wait_seconds
        self._sleep = sleep
        self._on_close = on_close

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.providers]

    def send(
        self,
        email: Email,
        *,
        pinned: str | None = None,
        look_first: bool = False,
        now: datetime,
        clock: Clock = utcnow,
        settle_until: datetime | None = None,
    ) -> Outcome:
        """Send `email`; the Outcome says sent, or why not and whether the next run is pinned.

        `look_first`: an earlier run died mid-send (its lease expired), so any provider may
        already hold the message. Every provider that can be asked is asked before anything
        is sent anywhere; one that cannot answer pins the delivery to itself.
        `settle_until`: before then, a lagging search's "not found" does not allow a send.
        """
        run = _Run(email, now, clock, self._max_wait, settle_until)
        if pinned is not None:
            return self._send_pinned(pinned, run)
        if look_first:
            settling = False
            for provider in self.providers:
                found = self._lookup(provider, run)
                if isinstance(found, Accepted):
                    return run.sent(found)
                if found is not None:
                    return run.failed(found.error_class, pinned=provider.name)
                settling = settling or (provider.can_look_up and run.settling(provider))
            if settling:
                return run.wait_to_settle(ErrorClass.LEASE_EXPIRED, pinned=None)
            # A provider that cannot be asked may hold the message: stay with it (Resend
            # turns a re-send with the same key into the first message), never fail over.
            blind = next((p for p in self.providers if not p.can_look_up), None)
            if blind is not None:
                return self._send_pinned(blind.name, run, look=False)
        for provider in self.providers:
            result: Accepted | ProviderError | None = self._gate(provider, run)
            if result is None:
                result = self._send_one(provider, run)
            if isinstance(result, Accepted):
                return run.sent(result)
            if not isinstance(result, TransientProviderError):
                ambiguous = isinstance(result, AmbiguousProviderError)
                return run.failed(result.error_class, pinned=provider.name if ambiguous else None)
        return run.failed(ErrorClass.TRANSIENT)

    def batch_provider(self, now: datetime) -> BatchProvider | None:
        """The provider a new batch goes to: the first whose circuit is not open, if it sends
        batches; None when letters should go one by one (through failover as usual)."""
        for provider in self.providers:
            if self.breaker is not None:
                state = self.breaker.state(provider.name, now=now)
                if state.status(now) == OPEN:
                    continue
            return provider if batch_limit(provider) > 1 else None  # type: ignore[return-value]
        return None

    def provider(self, name: str) -> Provider | None:
        """The configured provider of this name."""
        return self._by_name.get(name)

    def send_batch(
        self,
        name: str,
        emails: Sequence[Email],
        key: str,
        *,
        replay: bool = False,
        now: datetime,
        clock: Clock = utcnow,
    ) -> list[Outcome]:
        """Send `emails` to provider `name` in one call under `key`; one Outcome per email.

        `replay`: this call repeats a batch whose first call had an unknown outcome.
        """
        provider = self._by_name.get(name)
        run = _Run(emails[0], now, clock, self._batch_wait)
        if provider is None or batch_limit(provider) < len(emails):
            return _not_configured(name, len(emails), replay=replay)
        gate = self._gate(provider, run)
        if gate is not None:
            return self._batch_failed(run, gate, len(emails), deferred=True, replay=replay)
        started = run.start()
        run.called = True
        try:
            results = provider.send_batch(emails, key)  # type: ignore[attr-defined]
        except ProviderError as exc:
            return self._batch_refused(provider, run, exc, started, len(emails), replay=replay)
        except Exception as exc:
            log.exception("batch via %s raised unexpectedly", name)
            # The type only: the text of an error we did not write may quote the letter.
            error = AmbiguousProviderError(name, f"unexpected {type(exc).__name__}")
            run.record(provider.name, ErrorClass.AMBIGUOUS, started, error=error)
            self._count(provider.name, error, run)
            return self._batch_failed(run, error, len(emails), replay=replay, provider=provider)
        self._succeeded(provider.name, run)
        return _batch_answers(name, results, started, replay=replay)

    def _batch_refused(
        self,
        provider: Provider,
        run: _Run,
        exc: ProviderError,
        started: tuple[datetime, float],
        count: int,
        *,
        replay: bool,
    ) -> list[Outcome]:
        """The call failed as a whole with an error of the provider's: a 429 defers every
        letter (no attempt spent) and pauses the shared rate limit for its Retry-After."""
        name = provider.name
        run.record(name, exc.error_class, started, error=exc)
        self._count(name, exc, run)
        log.warning("batch of %d via %s failed (%s): %s", count, name, exc.error_class, exc)
        deferred = exc.status_code == 429
        if deferred and exc.retry_after and self.limiter is not None:
            pause = getattr(self.limiter, "pause", None)
            if pause is not None:
                pause(name, exc.retry_after)
        return self._batch_failed(
            run, exc, count, deferred=deferred, replay=replay, provider=provider
        )

    def _batch_failed(
        self,
        run: _Run,
        error: ProviderError,
        count: int,
        *,
        deferred: bool = False,
        replay: bool,
        provider: Provider | None = None,
    ) -> list[Outcome]:
        """The same Outcome for every letter of a batch whose call failed as a whole."""
        ambiguous = isinstance(error, AmbiguousProviderError)
        replays = bool(getattr(provider, "replays_batches", False))
        pinned = error.provider if ambiguous or replay else None
        error_class = ErrorClass.TRANSIENT if deferred else error.error_class
        return [
            Outcome(
                error_class=error_class,
                calls=list(run.calls),
                error=short(str(error), ERROR_LIMIT),
                retry_after=error.retry_after,
                pinned_provider=pinned,
                deferred=deferred,
                keep_batch=replay or (ambiguous and replays),
            )
            for _ in range(count)
        ]

    def close(self) -> None:
        """Release what the chain owns (the HTTP client built by `build_chain`)."""
        if self._on_close is not None:
            self._on_close()

    def _send_pinned(self, name: str, run: _Run, *, look: bool = True) -> Outcome:
        provider = self._by_name.get(name)
        if provider is None:
            # Sending elsewhere could duplicate the letter: wait until the provider is back.
            return run.failed(
                ErrorClass.AMBIGUOUS, pinned=name, error=f"pinned provider {name} is not configured"
            )
        result: Accepted | ProviderError | None = self._gate(provider, run)
        if result is None and look:
            result = self._lookup(provider, run)
            if result is None and provider.can_look_up and run.settling(provider):
                return run.wait_to_settle(ErrorClass.AMBIGUOUS, pinned=name)
        if result is None:
            result = self._send_one(provider, run)
        if isinstance(result, Accepted):
            return run.sent(result)
        return run.failed(result.error_class, pinned=name)

    def _gate(self, provider: Provider, run: _Run) -> ProviderError | None:
        """An error if the circuit is open or the rate limit stays closed; None to go ahead.

        Order matters: an open circuit is read from the cache and costs nothing; the rate
        limit comes next; only a run that is free to call claims a half-open circuit's one
        trial (claiming it moves the reopening a full period ahead, so a trial claimed and
        then held back by the rate limit would keep the circuit open for nothing).
        """
        started = run.start()
        if self.breaker is not None and self._is_open(provider, run):
            return self._skip(provider, run, started)
        wait = self._wait_for_rate(provider.name, run)
        if wait > 0:
            error = TransientProviderError(
                provider.name, "rate limited locally", error_code=RATE_LIMITED, retry_after=wait
            )
            run.record(provider.name, ErrorClass.TRANSIENT, started, error=error)
            return error
        if self.breaker is not None and not self.breaker.allow(provider.name, now=run.now):
            return self._skip(provider, run, started)  # another run holds the trial
        return None

    def _is_open(self, provider: Provider, run: _Run) -> bool:
        assert self.breaker is not None
        state = self.breaker.state(provider.name, now=run.now)
        return state.status(run.now) == OPEN

    def _skip(
        self, provider: Provider, run: _Run, started: tuple[datetime, float]
    ) -> ProviderError:
        error = TransientProviderError(
            provider.name,
            "circuit open",
            error_code=CIRCUIT_OPEN,
            retry_after=self._open_for(provider, run),
        )
        run.record(provider.name, "skipped", started, error=error, message="circuit open")
        return error

    def _wait_for_rate(self, name: str, run: _Run) -> float:
        if self.limiter is None:
            return 0.0
        wait = self.limiter.acquire(name)
        while 0 < wait <= run.wait_budget:
            self._sleep(wait)
            run.wait_budget -= wait
            wait = self.limiter.acquire(name)
        return wait

    def _open_for(self, provider: Provider, run: _Run) -> float | None:
        assert self.breaker is not None
        until = self.breaker.state(provider.name, now=run.now).opened_until
        return max(0.0, (until - run.now).total_seconds()) if until else None

    def _lookup(self, provider: Provider, run: _Run) -> Accepted | ProviderError | None:
        """Ask the pinned provider whether this key already produced a message."""
        started = run.start()
        run.called = True
        try:
            found = provider.find_sent(run.email)
        except ProviderError as exc:
            # Unable to tell whether it went out: sending now could duplicate it.
            error = AmbiguousProviderError(
                provider.name,
                f"lookup failed: {exc}",
                status_code=exc.status_code,
                error_code=exc.error_code,
                retry_after=exc.retry_after,
            )
            run.record(provider.name, ErrorClass.AMBIGUOUS, started, error=error)
            self._count(provider.name, error, run)
            return error
        if found is not None:
            run.record(
                provider.name,
                "accepted",
                started,
                message="found by lookup",
                message_id=found.message_id,
                status_code=found.status_code,
            )
            self._succeeded(provider.name, run)
        return found

    def _send_one(self, provider: Provider, run: _Run) -> Accepted | ProviderError:
        started = run.start()
        run.called = True
        try:
            accepted = provider.send(run.email)
        except ProviderError as exc:
            run.record(provider.name, exc.error_class, started, error=exc)
            self._count(provider.name, exc, run)
            log.warning("send via %s failed (%s): %s", provider.name, exc.error_class, exc)
            return exc
        except Exception as exc:
            # A bug or an unexpected library error: we cannot know whether it went out.
            log.exception("send via %s raised unexpectedly", provider.name)
            # The type only: the text of an error we did not write may quote the letter.
            error = AmbiguousProviderError(provider.name, f"unexpected {type(exc).__name__}")
            run.record(provider.name, ErrorClass.AMBIGUOUS, started, error=error)
            self._count(provider.name, error, run)
            return error
        run.record(
            provider.name,
            "accepted",
            started,
            message_id=accepted.message_id,
            status_code=accepted.status_code,
        )
        self._succeeded(provider.name, run)
        return accepted

    def _count(self, name: str, error: ProviderError, run: _Run) -> None:
        """Transient and ambiguous failures count toward opening the circuit; a permanent
        answer proves the provider is up and counts as a success."""
        if self.breaker is None or isinstance(error, MessageBuildError):
            return  # never reached the provider: says nothing about its health
        if isinstance(error, TransientProviderError | AmbiguousProviderError):
            self.breaker.record_failure(name, now=run.now, message=str(error))
        else:
            self.breaker.record_success(name, now=run.now)

    def _succeeded(self, name: str, run: _Run) -> None:
        if self.breaker is not None:
            self.breaker.record_success(name, now=run.now)


def _not_configured(name: str, count: int, *, replay: bool) -> list[Outcome]:
    """A batch for a provider that is not configured for it (any more): sent nowhere. A replay
    stays pinned and in its batch, as its first call may have stored it."""
    why = f"batch provider {name} is not configured for batches of {count}"
    return [
        Outcome(
            ErrorClass.AMBIGUOUS if replay else ErrorClass.TRANSIENT,
            error=why,
            pinned_provider=name if replay else None,
            keep_batch=replay,
        )
        for _ in range(count)
    ]


def _batch_answers(
    name: str, results: BatchResult, started: tuple[datetime, float], *, replay: bool
) -> list[Outcome]:
    """Each letter's own answer in a batch call the provider answered, in order."""
    started_at, t0 = started
    duration = int(round((time.perf_counter() - t0) * 1000))
    return [_batch_answer(name, result, started_at, duration, replay=replay) for result in results]


def _batch_answer(
    name: str,
    result: Accepted | ProviderError,
    started_at: datetime,
    duration: int,
    *,
    replay: bool,
) -> Outcome:
    if isinstance(result, Accepted):
        call = ProviderCall(
            name,
            "accepted",
            started_at,
            duration,
            status_code=result.status_code,
            provider_message_id=result.message_id,
        )
        return Outcome(None, calls=[call], provider=name, provider_message_id=result.message_id)
    call = ProviderCall(
        name,
        result.error_class,
        started_at,
        duration,
        status_code=result.status_code,
        error_code=result.error_code,
        message=short(str(result).removeprefix(f"{name}: ")),
    )
    ambiguous = isinstance(result, AmbiguousProviderError)
    return Outcome(
        result.error_class,
        calls=[call],
        error=short(str(result), ERROR_LIMIT),
        retry_after=result.retry_after,
        pinned_provider=name if ambiguous or replay else None,
        keep_batch=replay,
    )
