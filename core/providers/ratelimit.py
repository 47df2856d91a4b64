"""Send-rate limits per provider: `acquire(provider)` returns 0 when a send may go now, else
the seconds to wait before asking again. A refused acquire takes nothing.

`LocalRateLimiter` is an in-process token bucket (embedded default). `RedisRateLimiter` is the
same bucket kept in Redis (GCRA: one timestamp per provider, updated by a Lua script that reads
Redis's own clock), so every consumer on every machine shares one budget. Redis trouble never
stops a send: the Redis limiter then fails open, logs a warning once per outage, and limits
per process until Redis answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

log = logging.getLogger(__name__)


class RateLimiter(Protocol):
    def acquire(self, provider: str) -> float:
        """0 when allowed now (and counted), else seconds until a send may be allowed."""
        ...

    def pause(self, provider: str, seconds: float) -> None:
        """The provider said "too many" (429, Retry-After): allow nothing for `seconds`."""
        ...


class LocalRateLimiter:
    """A thread-safe token bucket per provider: `rate` per second, bursts up to `burst`."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # provider -> (tokens, at)
        self._lock = threading.Lock()

    def acquire(self, provider: str) -> float:
        """Take one token, or say how long until one is there."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(provider, (self.burst, now))
            tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
            if tokens >= 1:
                self._buckets[provider] = (tokens - 1, now)
                return 0.0
            self._buckets[provider] = (tokens, now)
            return (1 - tokens) / self.rate

    def pause(self, provider: str, seconds: float) -> None:
        """Empty the bucket so that the next token comes `seconds` from now."""
        with self._lock:
            self._buckets[provider] = (1 - max(0.0, seconds) * self.rate, self._clock())


# GCRA. KEYS[1] holds the theoretical arrival time (TAT) of the next send, in seconds.
# ARGV[1] = seconds per send (1/rate), ARGV[2] = burst tolerance in seconds.
# Returns "0" when allowed, else the wait in seconds, as a string to keep the fraction.
_GCRA = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat + interval - tolerance - now
if wait > 0 then return tostring(wait) end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return '0'
"""


# KEYS[1] as above; ARGV[1] = seconds to pause, ARGV[2] = the burst tolerance less one interval.
# Moves the TAT so that the next send is allowed `pause` from now, and no burst follows it.
_PAUSE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local until_ = now + tonumber(ARGV[1]) + tonumber(ARGV[2])
if tat < until_ then
  redis.call('SET', KEYS[1], string.format('%.6f', until_), 'PX', math.ceil((until_ - now) * 1000) + 1000)
end
return 1
"""


class RedisRateLimiter:
    """One budget per provider shared by all consumers through Redis; fails open.

    When Redis fails, the limiter stops asking it for `retry_seconds` (a client with retries can
    take seconds to give up, and that must not be paid on every send) and limits per process
    meanwhile.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        prefix: str,
        rate: float,
        *,
        burst: float | None = None,
        retry_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fallback = LocalRateLimiter(rate, burst=burst, clock=clock)
        self.rate, self.burst = self._fallback.rate, self._fallback.burst
        self.prefix = prefix
        self._script: Any = redis_client.register_script(_GCRA)
        self._pause: Any = redis_client.register_script(_PAUSE)
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._down_until: float | None = None

    def key(self, provider: str) -> str:
        """The Redis key holding this provider's bucket."""
        return f"{self.prefix}:ratelimit:{provider}"

    def acquire(self, provider: str) -> float:
        """Ask Redis for one send; if Redis cannot answer, allow it (and limit locally for a while)."""
        down_until = self._down_until
        if down_until is not None and self._clock() < down_until:
            return self._fallback.acquire(provider)
        interval = 1.0 / self.rate
        try:
            raw = self._script(keys=[self.key(provider)], args=[interval, self.burst * interval])
        except (redis.RedisError, OSError) as exc:
            if down_until is None:
                log.warning("rate limiter: Redis unavailable (%s); limiting per process", exc)
            self._down_until = self._clock() + self._retry_seconds
            return 0.0
        if down_until is not None:
            log.warning("rate limiter: Redis is back; limits are shared again")
            self._down_until = None
        return max(0.0, float(raw.decode() if isinstance(raw, bytes) else raw))

    def pause(self, provider: str, seconds: float) -> None:
        """Hold every consumer back for `seconds` (a 429 from the provider); best effort."""
        self._fallback.pause(provider, seconds)
        try:
            # TAT = now + pause + tolerance - interval: the next send is due exactly at the end
            # of the pause, and none of the burst allowance is left for right after it
            ahead = (self.burst - 1) / self.rate
            self._pause(keys=[self.key(provider)], args=[max(0.0, seconds), ahead])
        except (redis.RedisError, OSError) as exc:
            log.warning("rate limiter: could not share a pause through Redis (%s)", exc)
