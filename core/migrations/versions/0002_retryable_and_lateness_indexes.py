"""indexes for the failed retrier and for lateness over long windows

The failed retrier's cap (`attempt_count < CAPSULE_RETRY_MAX_TOTAL_ATTEMPTS`) becomes an index
condition, so failures that used up their attempts no longer pile up in its scan; the sent
index carries `deliver_at`, so lateness series are read from the index alone
(docs/benchmarks.md, Scale). Both are plain CREATE INDEX: on PostgreSQL they hold a write lock
on `deliveries` while they build (about a second per million rows on the benchmark machine).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 05:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out, not imported: a migration keeps meaning what it meant when it was written.
RETRYABLE_FAILED = "status = 'failed' AND error_class IN ('transient', 'lease_expired')"
SENT = "status = 'sent'"


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_retryable",
        "deliveries",
        ["attempt_count", "failed_at"],
        postgresql_where=sa.text(RETRYABLE_FAILED),
        sqlite_where=sa.text(RETRYABLE_FAILED),
    )
    op.drop_index("ix_deliveries_sent", table_name="deliveries")
    op.create_index(
        "ix_deliveries_sent",
        "deliveries",
        ["sent_at", "deliver_at"],
        postgresql_where=sa.text(SENT),
        sqlite_where=sa.text(SENT),
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_sent", table_name="deliveries")
    op.create_index(
        "ix_deliveries_sent",
        "deliveries",
        ["sent_at"],
        postgresql_where=sa.text(SENT),
        sqlite_where=sa.text(SENT),
    )
    op.drop_index("ix_deliveries_retryable", table_name="deliveries")
