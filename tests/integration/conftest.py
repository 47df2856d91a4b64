"""Fixtures for the integration tests.

open_world   open_world(marker=True, **env) -> a scenario World on the test's PostgreSQL
             database, Redis prefix and fake provider server; closed after the test
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.fakes.provider_server import FakeProviderServer
from core.crypto import Keyring
from tests.integration.scenario_world import World


@pytest.fixture
def open_world(
    pg_database: str,
    redis_url: str,
    redis_prefix: str,
    provider_server: FakeProviderServer,
    tmp_path: Path,
    keyring: Keyring,
) -> Iterator[Callable[..., World]]:
    """Opens a World with `env` on top of the provider settings. `marker`: the broker holds the
    dispatcher's marker, so no broker-loss re-dispatch comes in the middle of a test."""
    worlds: list[World] = []

    def open_(*, marker: bool = True, **env: str) -> World:
        world = World.open(
            pg_database, redis_url, redis_prefix, provider_server, tmp_path / "var", keyring, **env
        )
        worlds.append(world)
        if marker:
            world.app.enqueuer.set_marker()
        return world

    yield open_
    for world in worlds:
        world.close()
