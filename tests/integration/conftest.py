"""Fixtures for the integration tests.

open_world   open_world(marker=True, **env) -> a scenario World on the test's PostgreSQL
             database, Redis prefix and fake provider server; closed after the test
cli          a `capsule` driver on a copy of a var/ the real CLI made once per session (a key,
             the schema, ada@example.com with 2 credits)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.fakes.provider_server import FakeProviderServer
from core.crypto import Keyring
from tests.integration.scenario_world import World
from tests.integration.test_cli import Cli


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


@pytest.fixture(scope="session")
def cli_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A var/ made once by the real CLI: a key, the schema, Ada with 2 credits. Each test gets
    a copy (three CLI runs per test cost most of these files' time)."""
    cli = Cli(tmp_path_factory.mktemp("cli-template") / "var")
    cli.ok("keys", "generate", "--if-missing")
    cli.ok("db", "upgrade")
    cli.ok("user", "add", "ada@example.com", "--name", "Ada", "--credits", "2")
    return cli.var


@pytest.fixture
def cli(tmp_path: Path, cli_template: Path) -> Cli:
    shutil.copytree(cli_template, tmp_path / "var")  # modes kept: 0700 and 0600
    return Cli(tmp_path / "var")
