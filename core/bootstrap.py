"""Wiring: the one place that turns settings into an engine, a keyring and a provider chain.

The broker side (the Enqueuer) is passed in by the entry point, so core never imports Huey.
`bootstrap` is the App factory of every entry point (consumer, CLI, console); `build_app`
takes the parts ready-made (tests, benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from redis import Redis
from sqlalchemy import Engine

from core.config import Settings
from core.crypto import Keyring, load_keyring
from core.db import SessionFactory, make_engine, make_session_factory
from core.dispatch import Enqueuer

if TYPE_CHECKING:
    from core.providers.chain import ProviderChain


@dataclass
class App:
    """Everything a use case needs, built once per process."""

    settings: Settings
    engine: Engine
    session_factory: SessionFactory
    enqueuer: Enqueuer
    redis_client: Any = None
    _keyring: Keyring | None = field(default=None, repr=False)

    @property
    def keyring(self) -> Keyring:
        if self._keyring is None:
            self._keyring = load_keyring(
                self.settings.encryption_keys.get_secret_value(), self.settings.keys_path
            )
        return self._keyring

    @cached_property
    def chain(self) -> ProviderChain:
        from core.alerts import CIRCUIT_OPEN, Alerter
        from core.policy import utcnow
        from core.providers import build_chain

        alerter = Alerter(self.settings, self.session_factory)

        def on_open(provider: str, message: str) -> None:
            alerter.alert(CIRCUIT_OPEN, f"{provider} circuit opened: {message}", now=utcnow())

        return build_chain(
            self.settings, self.session_factory, redis_client=self.redis_client, on_open=on_open
        )


def build_app(
    settings: Settings,
    enqueuer: Enqueuer,
    *,
    engine: Engine | None = None,
    keyring: Keyring | None = None,
    redis_client: Any = None,
) -> App:
    engine = engine or make_engine(settings)
    return App(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        enqueuer=enqueuer,
        redis_client=redis_client,
        _keyring=keyring,
    )


def bootstrap(settings: Settings, enqueuer: Enqueuer) -> App:
    """The App of an entry point: the one Redis client the settings ask for (it shares the
    providers' rate limit across processes), an engine, and `enqueuer`, the queue."""
    redis_client = (
        Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        if settings.redis_url
        else None
    )
    return build_app(settings, enqueuer, redis_client=redis_client)
