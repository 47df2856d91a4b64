"""delivery_batches: letters claimed together and sent in one provider call

A batch row (provider, idempotency key, ordered delivery ids) is written in the claim's
transaction; deliveries and attempts name their batch. Adding nullable columns is a catalog
change on PostgreSQL (no table rewrite); the new index on `deliveries.batch_id` is a plain
CREATE INDEX (a write lock while it builds, about a second per million rows).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 15:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.models

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delivery_batches",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("idempotency_key", sa.String(length=64), nullable=False),
        sa.Column("delivery_ids", sa.JSON(), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", core.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", core.models.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("state in ('live','done')", name=op.f("ck_delivery_batches_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_batches")),
        sa.UniqueConstraint(
            "idempotency_key", name=op.f("uq_delivery_batches_idempotency_key")
        ),
    )
    op.create_index(
        op.f("ix_delivery_batches_created_at"), "delivery_batches", ["created_at"], unique=False
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("batch_id", sa.Uuid(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_deliveries_batch_id_delivery_batches"),
            "delivery_batches",
            ["batch_id"],
            ["id"],
        )
        batch.create_index("ix_deliveries_batch", ["batch_id"], unique=False)
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.add_column(sa.Column("batch_id", sa.Uuid(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_delivery_attempts_batch_id_delivery_batches"),
            "delivery_batches",
            ["batch_id"],
            ["id"],
        )


def downgrade() -> None:
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.drop_constraint(
            op.f("fk_delivery_attempts_batch_id_delivery_batches"), type_="foreignkey"
        )
        batch.drop_column("batch_id")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_batch")
        batch.drop_constraint(op.f("fk_deliveries_batch_id_delivery_batches"), type_="foreignkey")
        batch.drop_column("batch_id")
    op.drop_index(op.f("ix_delivery_batches_created_at"), table_name="delivery_batches")
    op.drop_table("delivery_batches")
