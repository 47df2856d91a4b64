"""The tables. A delivery row is the truth the worker, the safety nets and the console read.

Times are stored as UTC: `timestamptz` on PostgreSQL, naive UTC text on SQLite (so that text
comparison is time comparison), and always handed back timezone-aware.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """A datetime that must be timezone-aware going in and is UTC-aware coming out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite so autoincrement works there.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Status(enum.StrEnum):
    SCHEDULED = "scheduled"
    PROCESSING = "processing"
    SENT = "sent"
    FAILED = "failed"
    CANCELED = "canceled"
    # After sent, from the provider's webhooks (core.webhooks): what became of the message.
    DELIVERED = "delivered"
    BOUNCED = "bounced"  # bounce_kind: hard | soft
    COMPLAINED = "complained"
    # Due, but to an address on the suppression list: waits for a person (release or cancel).
    HELD = "held"


# Statuses a delivery reaches only after the provider accepted it.
AFTER_SENT = (Status.SENT, Status.DELIVERED, Status.BOUNCED, Status.COMPLAINED)
STATUS_VALUES = tuple(s.value for s in Status)


class BounceKind(enum.StrEnum):
    HARD = "hard"
    SOFT = "soft"


class SuppressionReason(enum.StrEnum):
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"


class ErrorClass(enum.StrEnum):
    TRANSIENT = "transient"
    AMBIGUOUS = "ambiguous"
    PERMANENT = "permanent"
    POSSIBLY_SENT = "possibly_sent"
    DECRYPTION = "decryption"
    LEASE_EXPIRED = "lease_expired"
    # The letter's key is not in the keyring: the row stays scheduled (never failed) and is
    # tried again later; a configuration problem, shown on the health page.
    MISSING_KEY = "missing_key"


TERMINAL = frozenset(
    {Status.SENT, Status.CANCELED, Status.DELIVERED, Status.BOUNCED, Status.COMPLAINED}
)

# Failures the failed retrier may resend on its own: definitely not accepted, or a run that
# died before it knew (its recovery looks first). Not ambiguous: such a letter may have
# arrived, and Resend forgets an idempotency key after 24 h, so a retry after the cool-off
# could send it twice; people decide (console warning). The partial index lists them too.
AUTO_RETRY_CLASSES = (ErrorClass.TRANSIENT, ErrorClass.LEASE_EXPIRED)
RETRYABLE_FAILED = "status = 'failed' AND error_class IN ({})".format(
    ", ".join(f"'{c.value}'" for c in AUTO_RETRY_CLASSES)
)
# Accepted by a provider, whatever its webhooks said since: throughput and lateness count these.
AFTER_SENT_WHERE = "status IN ({})".format(", ".join(f"'{s.value}'" for s in AFTER_SENT))


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime]


class CreditEntry(Base):
    """Append-only: a balance is a sum, never an edited number."""

    __tablename__ = "credit_ledger"
    __table_args__ = (Index(None, "user_id", "id"), Index(None, "delivery_id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    delivery_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("deliveries.id"))
    amount: Mapped[int]
    reason: Mapped[str] = mapped_column(String(32))  # grant | reserve | refund
    created_at: Mapped[datetime]


class Letter(Base):
    __tablename__ = "letters"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    key_id: Mapped[str] = mapped_column(String(64), index=True)
    subject_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    body_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]


class BatchState(enum.StrEnum):
    LIVE = "live"  # its letters may still go out through it: in flight, or to be replayed
    DONE = "done"  # every letter has its answer, or left it to go alone


class DeliveryBatch(Base):
    """Letters claimed together and sent in one provider call (DESIGN.md invariant 9).

    Written in the claim's transaction, before the call: the provider, the call's
    idempotency key and the ordered delivery ids are what a replay after an unknown outcome
    repeats. The ids are a JSON list, not a member table: a batch never changes once written,
    its order is the request's order, and it is always read whole; "which batch holds this
    letter" is `deliveries.batch_id`, one column, so a letter is in at most one live batch.
    """

    __tablename__ = "delivery_batches"
    __table_args__ = (
        CheckConstraint("state in ('live','done')", name="state"),
        Index(None, "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    provider: Mapped[str] = mapped_column(String(32))
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    delivery_ids: Mapped[list[str]] = mapped_column(JSON)
    # sha256 of the request body first sent: a replay that would differ is never sent
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=BatchState.LIVE)
    task_id: Mapped[str | None] = mapped_column(String(64))  # the run that last sent it
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        CheckConstraint(
            "status in ({})".format(",".join(f"'{v}'" for v in STATUS_VALUES)), name="status"
        ),
        CheckConstraint("bounce_kind in ('hard','soft')", name="bounce_kind"),
        # due and unclaimed: the dispatcher and the backstop
        Index(
            "ix_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'scheduled'"),
            sqlite_where=text("status = 'scheduled'"),
        ),
        # processing rows whose lease ran out
        Index(
            "ix_deliveries_lease",
            "lease_until",
            postgresql_where=text("status = 'processing'"),
            sqlite_where=text("status = 'processing'"),
        ),
        # failed by error class: triage and the failed retrier
        Index(
            "ix_deliveries_failed",
            "error_class",
            "failed_at",
            postgresql_where=text("status = 'failed'"),
            sqlite_where=text("status = 'failed'"),
        ),
        # failed and still retryable by the failed retrier (AUTO_RETRY_CLASSES): the total
        # cap is an index condition, so rows that used up their attempts cost nothing
        Index(
            "ix_deliveries_retryable",
            "attempt_count",
            "failed_at",
            postgresql_where=text(RETRYABLE_FAILED),
            sqlite_where=text(RETRYABLE_FAILED),
        ),
        # sent in a window: throughput, and lateness read from the index alone (deliver_at);
        # a letter stays counted as sent when its provider later reports it delivered/bounced
        Index(
            "ix_deliveries_sent",
            "sent_at",
            "deliver_at",
            postgresql_where=text(AFTER_SENT_WHERE),
            sqlite_where=text(AFTER_SENT_WHERE),
        ),
        Index("ix_deliveries_status_updated", "status", "updated_at"),
        Index("ix_deliveries_user", "user_id", "created_at"),
        # provider webhooks find their letter by the message id recorded at send
        Index("ix_deliveries_provider_message_id", "provider_message_id"),
        Index("ix_deliveries_batch", "batch_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    letter_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("letters.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    recipient_email: Mapped[str] = mapped_column(String(320), index=True)
    status: Mapped[str] = mapped_column(String(16), default=Status.SCHEDULED)
    deliver_at: Mapped[datetime]  # the user's intent; retries never touch it
    next_attempt_at: Mapped[datetime]  # when the next try may run; starts at deliver_at
    attempt_count: Mapped[int] = mapped_column(default=0)  # runs ever claimed
    round_attempts: Mapped[int] = mapped_column(default=0)  # runs since scheduled or requeued
    task_id: Mapped[str | None] = mapped_column(String(64))  # Huey id of the current dispatch
    dispatched_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    error_class: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    pinned_provider: Mapped[str | None] = mapped_column(String(32))  # after an ambiguous outcome
    provider: Mapped[str | None] = mapped_column(String(32))
    provider_message_id: Mapped[str | None] = mapped_column(String(200))
    sent_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    canceled_at: Mapped[datetime | None]
    # After sent: the latest word from the provider's webhooks (core.webhooks).
    bounce_kind: Mapped[str | None] = mapped_column(String(8))
    reported_at: Mapped[datetime | None]
    held_at: Mapped[datetime | None]
    # the batch that holds it (live) or that sent it; None for a letter that went alone
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("delivery_batches.id"))
    version: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    @classmethod
    def scheduled(
        cls,
        *,
        id: uuid.UUID,
        letter_id: uuid.UUID,
        user_id: int,
        recipient_email: str,
        deliver_at: datetime,
        now: datetime,
    ) -> Delivery:
        """A new delivery of a letter, scheduled for `deliver_at`, with its own idempotency key."""
        return cls(
            id=id,
            letter_id=letter_id,
            user_id=user_id,
            recipient_email=recipient_email,
            status=Status.SCHEDULED,
            deliver_at=deliver_at,
            next_attempt_at=deliver_at,
            idempotency_key=uuid.uuid4().hex,
            created_at=now,
            updated_at=now,
        )


class DeliveryAttempt(Base):
    """One row per provider call."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (
        Index(None, "delivery_id", "id"),
        Index(None, "started_at"),
        # provider webhooks: a message id an accepted call got, when the row does not hold it
        Index(
            "ix_delivery_attempts_provider_message_id",
            "provider_message_id",
            postgresql_where=text("provider_message_id IS NOT NULL"),
            sqlite_where=text("provider_message_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("deliveries.id"))
    run_number: Mapped[int]  # the delivery's attempt_count when this call was made
    task_id: Mapped[str | None] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(
        String(32)
    )  # accepted | transient | ambiguous | permanent | ...
    status_code: Mapped[int | None]
    provider_error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    provider_message_id: Mapped[str | None] = mapped_column(String(200))
    duration_ms: Mapped[int]
    started_at: Mapped[datetime]
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("delivery_batches.id"))


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (
        Index(None, "delivery_id", "id"),
        Index(None, "created_at"),
        Index(None, "type", "created_at"),
        Index(None, "actor", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(200))
    delivery_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("deliveries.id"))
    reason: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]


class Notification(Base):
    """An email to a letter's owner about that letter. Once per (delivery, kind)."""

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("delivery_id", "kind"),
        Index(
            "ix_notifications_pending",
            "created_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("deliveries.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(32))  # delivery_failed
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | sent | failed
    idempotency_key: Mapped[str] = mapped_column(String(80), unique=True)
    requested_by: Mapped[str] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(default=0)
    provider: Mapped[str | None] = mapped_column(String(32))
    provider_message_id: Mapped[str | None] = mapped_column(String(200))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]


class ReconcilerRun(Base):
    """One row per run of a safety net: the console's reconciliation chart and `capsule health`."""

    __tablename__ = "reconciler_runs"
    __table_args__ = (UniqueConstraint("kind", "slot"), Index(None, "kind", "started_at"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # dispatcher | backstop | failed_retrier
    runner: Mapped[str] = mapped_column(String(200))
    slot: Mapped[datetime | None]  # the schedule slot it ran for; None for CLI runs
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    found: Mapped[int] = mapped_column(default=0)
    requeued: Mapped[int] = mapped_column(default=0)
    recovered: Mapped[int] = mapped_column(default=0)
    errors: Mapped[int] = mapped_column(default=0)
    error_message: Mapped[str | None] = mapped_column(Text)
    ok: Mapped[bool] = mapped_column(default=False)


class ProviderState(Base):
    """Circuit breaker state per provider, shared by every consumer through the database."""

    __tablename__ = "provider_states"

    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    consecutive_failures: Mapped[int] = mapped_column(default=0)
    opened_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime]


class SentRollup(Base):
    """Letters sent in one finished hour or day (UTC) and their lateness percentiles.

    Written once per bucket by `core.rollup` after the bucket has settled; the console's long
    windows read these instead of every sent row (docs/benchmarks.md, Scale).
    """

    __tablename__ = "sent_rollups"
    __table_args__ = (CheckConstraint("bucket in ('hour','day')", name="bucket"),)

    bucket: Mapped[str] = mapped_column(String(8), primary_key=True)
    start: Mapped[datetime] = mapped_column(primary_key=True)
    sent: Mapped[int]
    p50: Mapped[float | None]
    p95: Mapped[float | None]
    p99: Mapped[float | None]
    computed_at: Mapped[datetime]


class Alert(Base):
    """Alerts raised; also the rate limit (one per kind per window)."""

    __tablename__ = "alerts"
    __table_args__ = (Index(None, "kind", "created_at"), Index(None, "created_at"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    delivered: Mapped[bool] = mapped_column(default=False)
    suppressed: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime]


class BulkOperation(Base):
    """An ops bulk action, run in the background at a chosen rate."""

    __tablename__ = "bulk_operations"
    __table_args__ = (Index(None, "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    action: Mapped[str] = mapped_column(String(32))  # requeue
    filter: Mapped[dict[str, Any]] = mapped_column(default=dict)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    expected_count: Mapped[int]
    done_count: Mapped[int] = mapped_column(default=0)
    skipped_count: Mapped[int] = mapped_column(default=0)
    rate_per_second: Mapped[float]
    state: Mapped[str] = mapped_column(
        String(16), default="pending"
    )  # pending|running|done|aborted|error
    task_id: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class SignInAttempt(Base):
    """One console sign-in with a local account: the lockout counts these, per account and
    per client address, across every browser session and console process."""

    __tablename__ = "sign_in_attempts"
    __table_args__ = (Index(None, "username", "created_at"), Index(None, "client", "created_at"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    username: Mapped[str] = mapped_column(String(200))
    client: Mapped[str | None] = mapped_column(String(64))
    ok: Mapped[bool]
    created_at: Mapped[datetime]


class OperatorCredential(Base):
    """A local operator's password hash upgraded at sign-in (the secrets file is read-only to
    the console). Used only while the secrets file still holds the hash it `replaces`
    (a SHA-256 of that hash), so a new `capsule operator add` entry always wins."""

    __tablename__ = "operator_credentials"

    username: Mapped[str] = mapped_column(String(200), primary_key=True)
    replaces: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime]


class WebhookEvent(Base):
    """One event a provider posted to the webhook receiver, stored before it is answered.

    Unique per (provider, event_id): a provider's retry is the same row. `payload` keeps only
    an allowlist of fields (never the subject or any letter text). `delivery_id` is None when
    no delivery matches the provider message id: such events are kept and counted.
    """

    __tablename__ = "webhook_events"
    __table_args__ = (
        UniqueConstraint("provider", "event_id"),
        Index(None, "delivery_id", "id"),
        Index(None, "provider_message_id"),
        Index(None, "received_at"),
        Index(
            "ix_webhook_events_unprocessed",
            "received_at",
            postgresql_where=text("processed_at IS NULL"),
            sqlite_where=text("processed_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    provider: Mapped[str] = mapped_column(String(32))
    event_id: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(
        String(32)
    )  # delivered | bounced | complained | delayed | other
    bounce_kind: Mapped[str | None] = mapped_column(String(8))
    provider_message_id: Mapped[str | None] = mapped_column(String(200))
    recipient: Mapped[str | None] = mapped_column(String(320))
    occurred_at: Mapped[datetime | None]
    received_at: Mapped[datetime]
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    processed_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(32))  # applied | unchanged | unmatched | ...
    delivery_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("deliveries.id"))


class Suppression(Base):
    """An address no letter is sent to blindly. Removal is kept (audited), never deleted:
    at most one live row (removed_at IS NULL) per address."""

    __tablename__ = "suppressions"
    __table_args__ = (
        CheckConstraint("reason in ('hard_bounce','complaint','manual')", name="reason"),
        Index(
            "ix_suppressions_live_address",
            "address",
            unique=True,
            postgresql_where=text("removed_at IS NULL"),
            sqlite_where=text("removed_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    address: Mapped[str] = mapped_column(String(320))  # lower-cased
    reason: Mapped[str] = mapped_column(String(16))
    source_event_id: Mapped[int | None] = mapped_column(ForeignKey("webhook_events.id"))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
    removed_at: Mapped[datetime | None]
    removed_by: Mapped[str | None] = mapped_column(String(200))
    removed_reason: Mapped[str | None] = mapped_column(Text)


class ConsoleSession(Base):
    """A local operator's console sign-in, kept server-side: a new tab resumes it from the
    browser's signed cookie, and signing out revokes it everywhere. The cookie carries the
    session id and a secret; the row keeps only the secret's SHA-256."""

    __tablename__ = "console_sessions"
    __table_args__ = (Index(None, "username", "created_at"), Index(None, "expires_at"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    username: Mapped[str] = mapped_column(String(200))
    fingerprint: Mapped[str] = mapped_column(String(64))  # of the password hash signed in with
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
