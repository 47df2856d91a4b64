"""Alembic environment: the URL comes from the caller's config (see core.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from core.models import Base

config = context.config
target_metadata = Base.metadata


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through core.migrate, which passes a connection")
run(connection)
