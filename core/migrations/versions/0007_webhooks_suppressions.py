"""webhook_events and suppressions; delivery states after sent (delivered, bounced,
complained) and held (due to a suppressed address)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.models

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "status in ('scheduled','processing','sent','failed','canceled')"
NEW_STATUSES = (
    "status in ('scheduled','processing','sent','failed','canceled',"
    "'delivered','bounced','complained','held')"
)
OLD_SENT = "status = 'sent'"
NEW_SENT = "status IN ('sent', 'delivered', 'bounced', 'complained')"
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    _delivery_states()
    _webhook_events()
    _suppressions()


def _delivery_states() -> None:
    """deliveries: the states after sent and held, bounce kind; message-id lookups."""
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("bounce_kind", sa.String(length=8), nullable=True))
        batch.add_column(
            sa.Column("reported_at", core.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column("held_at", core.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch.drop_constraint(op.f("ck_deliveries_status"), type_="check")
        batch.create_check_constraint("status", NEW_STATUSES)
        batch.create_check_constraint("bounce_kind", "bounce_kind in ('hard','soft')")
    _sent_index(NEW_SENT, OLD_SENT)
    op.create_index(
        "ix_deliveries_provider_message_id", "deliveries", ["provider_message_id"]
    )
    op.create_index(
        "ix_delivery_attempts_provider_message_id",
        "delivery_attempts",
        ["provider_message_id"],
        postgresql_where=sa.text("provider_message_id IS NOT NULL"),
        sqlite_where=sa.text("provider_message_id IS NOT NULL"),
    )


def _webhook_events() -> None:
    op.create_table(
        "webhook_events",
        sa.Column("id", BigId, nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("bounce_kind", sa.String(length=8), nullable=True),
        sa.Column("provider_message_id", sa.String(length=200), nullable=True),
        sa.Column("recipient", sa.String(length=320), nullable=True),
        sa.Column("occurred_at", core.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("received_at", core.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("processed_at", core.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("delivery_id", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["deliveries.id"],
            name=op.f("fk_webhook_events_delivery_id_deliveries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint(
            "provider", "event_id", name=op.f("uq_webhook_events_provider_event_id")
        ),
    )
    op.create_index(
        op.f("ix_webhook_events_delivery_id_id"), "webhook_events", ["delivery_id", "id"]
    )
    op.create_index(
        op.f("ix_webhook_events_provider_message_id"), "webhook_events", ["provider_message_id"]
    )
    op.create_index(op.f("ix_webhook_events_received_at"), "webhook_events", ["received_at"])
    op.create_index(
        "ix_webhook_events_unprocessed",
        "webhook_events",
        ["received_at"],
        postgresql_where=sa.text("processed_at IS NULL"),
        sqlite_where=sa.text("processed_at IS NULL"),
    )


def _suppressions() -> None:
    op.create_table(
        "suppressions",
        sa.Column("id", BigId, nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("source_event_id", BigId, nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", core.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("removed_at", core.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("removed_by", sa.String(length=200), nullable=True),
        sa.Column("removed_reason", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "reason in ('hard_bounce','complaint','manual')", name=op.f("ck_suppressions_reason")
        ),
        sa.ForeignKeyConstraint(
            ["source_event_id"],
            ["webhook_events.id"],
            name=op.f("fk_suppressions_source_event_id_webhook_events"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppressions")),
    )
    op.create_index(
        "ix_suppressions_live_address",
        "suppressions",
        ["address"],
        unique=True,
        postgresql_where=sa.text("removed_at IS NULL"),
        sqlite_where=sa.text("removed_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_suppressions_live_address", table_name="suppressions")
    op.drop_table("suppressions")
    op.drop_index("ix_webhook_events_unprocessed", table_name="webhook_events")
    op.drop_index(op.f("ix_webhook_events_received_at"), table_name="webhook_events")
    op.drop_index(op.f("ix_webhook_events_provider_message_id"), table_name="webhook_events")
    op.drop_index(op.f("ix_webhook_events_delivery_id_id"), table_name="webhook_events")
    op.drop_table("webhook_events")
    op.drop_index("ix_delivery_attempts_provider_message_id", table_name="delivery_attempts")
    op.drop_index("ix_deliveries_provider_message_id", table_name="deliveries")
    # Rows in the new states go back to the nearest old one before the constraint narrows.
    op.execute(
        "UPDATE deliveries SET status = 'sent' "
        "WHERE status IN ('delivered','bounced','complained')"
    )
    op.execute("UPDATE deliveries SET status = 'scheduled' WHERE status = 'held'")
    _sent_index(OLD_SENT, NEW_SENT)
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint(op.f("ck_deliveries_bounce_kind"), type_="check")
        batch.drop_constraint(op.f("ck_deliveries_status"), type_="check")
        batch.create_check_constraint("status", OLD_STATUSES)
        batch.drop_column("held_at")
        batch.drop_column("reported_at")
        batch.drop_column("bounce_kind")


def _sent_index(where: str, old: str) -> None:
    """ix_deliveries_sent covers every letter a provider accepted (throughput, lateness)."""
    op.drop_index(
        "ix_deliveries_sent",
        table_name="deliveries",
        postgresql_where=sa.text(old),
        sqlite_where=sa.text(old),
    )
    op.create_index(
        "ix_deliveries_sent",
        "deliveries",
        ["sent_at", "deliver_at"],
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )
