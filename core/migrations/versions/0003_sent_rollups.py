"""sent_rollups: finished hours and days of sent letters, for the console's long windows

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sent_rollups",
        sa.Column("bucket", sa.String(length=8), nullable=False),
        sa.Column("start", core.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("sent", sa.Integer(), nullable=False),
        sa.Column("p50", sa.Double(), nullable=True),
        sa.Column("p95", sa.Double(), nullable=True),
        sa.Column("p99", sa.Double(), nullable=True),
        sa.Column("computed_at", core.models.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("bucket in ('hour','day')", name=op.f("ck_sent_rollups_bucket")),
        sa.PrimaryKeyConstraint("bucket", "start", name=op.f("pk_sent_rollups")),
    )


def downgrade() -> None:
    op.drop_table("sent_rollups")
