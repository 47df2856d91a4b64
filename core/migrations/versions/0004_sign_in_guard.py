"""sign_in_attempts and operator_credentials: the console's server-side lockout and password
hashes upgraded at sign-in

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 15:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sign_in_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("username", sa.String(length=200), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("created_at", core.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sign_in_attempts")),
    )
    op.create_index(
        op.f("ix_sign_in_attempts_username_created_at"),
        "sign_in_attempts",
        ["username", "created_at"],
    )
    op.create_index(
        op.f("ix_sign_in_attempts_client_created_at"),
        "sign_in_attempts",
        ["client", "created_at"],
    )
    op.create_table(
        "operator_credentials",
        sa.Column("username", sa.String(length=200), nullable=False),
        sa.Column("replaces", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("updated_at", core.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("username", name=op.f("pk_operator_credentials")),
    )


def downgrade() -> None:
    op.drop_table("operator_credentials")
    op.drop_index(op.f("ix_sign_in_attempts_client_created_at"), table_name="sign_in_attempts")
    op.drop_index(op.f("ix_sign_in_attempts_username_created_at"), table_name="sign_in_attempts")
    op.drop_table("sign_in_attempts")
