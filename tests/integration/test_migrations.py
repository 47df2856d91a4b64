"""The migrations in core/migrations build exactly the schema the models describe, on both
databases, and step down and up again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine

from core.migrate import alembic_config, current, upgrade
from core.models import Base
from tests.conftest import fresh_pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a database with nothing in it."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
        yield engine
        engine.dispose()
        return
    with fresh_pg_database(f"capsule_migrations_{uuid.uuid4().hex[:8]}") as url:
        engine = create_engine(url)
        yield engine
        engine.dispose()


def differences(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def test_the_migrated_schema_is_exactly_what_the_models_describe(empty_engine: Engine) -> None:
    upgrade(empty_engine)

    assert differences(empty_engine) == []


def test_every_migration_steps_down_and_up_again(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    head = current(empty_engine)

    downgrade(empty_engine, "0001")
    assert current(empty_engine) == "0001" and differences(empty_engine) != []
    upgrade(empty_engine)

    assert current(empty_engine) == head and differences(empty_engine) == []
