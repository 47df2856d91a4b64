"""Email providers and the chain that fails over between them.

`build_chain` is the one place where settings become providers, a circuit breaker and a rate
limiter. Nothing here does I/O at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from core.config import Settings
from core.db import SessionFactory
from core.providers import http
from core.providers.base import Provider
from core.providers.chain import ProviderChain
from core.providers.circuit import CircuitBreaker, OnOpen
from core.providers.outbox import OutboxProvider
from core.providers.postmark import PostmarkProvider
from core.providers.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from core.providers.resend import ResendProvider
from core.providers.smtp import SmtpProvider

if TYPE_CHECKING:
    import redis

__all__ = ["ProviderChain", "build_chain", "build_provider", "http_timeout"]

HTTP_PROVIDERS = frozenset({"resend", "postmark"})


def http_timeout(settings: Settings) -> httpx.Timeout:
    """The provider connect and read timeouts from settings."""
    return http.timeout(settings.provider_connect_timeout, settings.provider_read_timeout)


def build_provider(name: str, settings: Settings, http_client: httpx.Client | None) -> Provider:
    """One provider by its CAPSULE_PROVIDERS name."""
    timeout = http_timeout(settings)
    if name in HTTP_PROVIDERS and http_client is None:
        raise ValueError(f"provider {name} needs an HTTP client")
    if name == "resend":
        assert http_client is not None and settings.resend_api_key
        return ResendProvider(
            http_client,
            api_key=settings.resend_api_key.get_secret_value(),
            base_url=settings.resend_base_url,
            timeout=timeout,
        )
    if name == "postmark":
        assert http_client is not None and settings.postmark_server_token
        return PostmarkProvider(
            http_client,
            server_token=settings.postmark_server_token.get_secret_value(),
            base_url=settings.postmark_base_url,
            message_stream=settings.postmark_message_stream,
            timeout=timeout,
        )
    if name == "smtp":
        return SmtpProvider(
            settings.smtp_host,
            settings.smtp_port,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            starttls=settings.smtp_starttls,
            connect_timeout=settings.provider_connect_timeout,
            read_timeout=settings.provider_read_timeout,
        )
    if name == "outbox":
        return OutboxProvider(settings.outbox_path)
    raise ValueError(f"unknown provider {name!r}")


def build_chain(
    settings: Settings,
    session_factory: SessionFactory,
    redis_client: redis.Redis | None = None,
    http_client: httpx.Client | None = None,
    *,
    on_open: OnOpen | None = None,
) -> ProviderChain:
    """The provider chain the settings describe, in CAPSULE_PROVIDERS order.

    The rate limit is shared through Redis when a client is given, else per process. An HTTP
    client is created (and closed by `chain.close()`) when none is given.
    """
    owned: httpx.Client | None = None
    if http_client is None and HTTP_PROVIDERS.intersection(settings.providers):
        http_client = owned = httpx.Client(timeout=http_timeout(settings))
    providers = [build_provider(name, settings, http_client) for name in settings.providers]
    breaker = CircuitBreaker(
        session_factory,
        threshold=settings.circuit_failure_threshold,
        reset_seconds=settings.circuit_reset_seconds,
        on_open=on_open,
    )
    # Requests are paced evenly, with no burst allowance: a provider's quota is "n per second"
    # and a burst of n at once followed by n a second would exceed it (429s).
    limiter: RateLimiter
    if redis_client is not None:
        limiter = RedisRateLimiter(
            redis_client, settings.huey_name, settings.provider_rate_per_second, burst=1
        )
    else:
        limiter = LocalRateLimiter(settings.provider_rate_per_second, burst=1)
    return ProviderChain(
        providers,
        breaker=breaker,
        limiter=limiter,
        on_close=owned.close if owned is not None else None,
    )
