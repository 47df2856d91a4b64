"""Failure scenarios end to end on PostgreSQL and a real SMTP server (aiosmtpd): the backstop
resends an owner notice whose first send failed, once; a letter whose ciphertext was tampered
with fails as `decryption`, is never sent, and its owner hears about it once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, update

from core.bootstrap import App, build_app
from core.config import Settings
from core.crypto import Keyring
from core.db import session_scope
from core.deliveries import create_user
from core.models import (
    AuditEvent,
    Delivery,
    DeliveryAttempt,
    ErrorClass,
    Letter,
    Notification,
    Status,
)
from core.reconcile import run_backstop, run_failed_retrier
from core.worker import run_delivery
from tests.conftest import RecordingEnqueuer, truncate_all
from tests.fakes.smtp_server import FakeSmtpServer
from tests.integration.scenario_world import schedule_letter

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 3, 1, 8, 0, tzinfo=UTC)
DUE = T0 + timedelta(minutes=5)
OWNER = "owner@example.com"
RECIPIENT = "future@example.com"
BODY = "Dear future me, the secret is 4217."


@pytest.fixture
def world(
    pg_database: str, smtp_server: FakeSmtpServer, tmp_path: Path, keyring: Keyring
) -> Iterator[tuple[App, int]]:
    """An App on PostgreSQL whose only provider is the real SMTP server, and one owner."""
    engine = create_engine(pg_database)
    truncate_all(engine)
    engine.dispose()
    settings = Settings(
        var_dir=str(tmp_path),
        database_url=pg_database,
        providers=("smtp",),
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
        circuit_failure_threshold=1000,
        grace_seconds=60,
    )
    app = build_app(settings, RecordingEnqueuer(), keyring=keyring)
    with session_scope(app.session_factory) as session:
        user_id = create_user(session, OWNER, "Owner", T0, 10).id
        session.commit()
    yield app, user_id
    app.engine.dispose()


def schedule(app: App, user_id: int) -> uuid.UUID:
    return schedule_letter(app, user_id, DUE, now=T0, recipient=RECIPIENT, body=BODY)


def notices(app: App) -> list[Notification]:
    with session_scope(app.session_factory) as session:
        return list(session.scalars(select(Notification)))


def row(app: App, delivery_id: uuid.UUID) -> Delivery:
    with session_scope(app.session_factory) as session:
        found = session.get(Delivery, delivery_id)
        assert found is not None
        return found


def to_owner(smtp: FakeSmtpServer) -> list[str]:
    return [m.subject or "" for m in smtp.messages if OWNER in m.rcpt_tos]


def to_recipient(smtp: FakeSmtpServer) -> int:
    return sum(1 for m in smtp.messages if RECIPIENT in m.rcpt_tos)


# ---------------------------------------------------------------- pending owner notices


def test_backstop_sends_a_notice_whose_first_send_failed_exactly_once(
    world: tuple[App, int], smtp_server: FakeSmtpServer
) -> None:
    app, user_id = world
    delivery_id = schedule(app, user_id)

    # Given the recipient's server refuses the letter for good, and the owner's notice that
    # follows at once is turned away for now (a 4xx: try again later)
    smtp_server.fail_next("rcpt", "550 5.1.1 No such user")
    smtp_server.fail_next("rcpt", "451 4.3.0 Try again later")
    assert run_delivery(app, delivery_id, "t1", clock=lambda: DUE) == Status.FAILED

    # Then nothing reached the SMTP server, and the notice waits, pending, with its failure
    assert smtp_server.messages == []
    [note] = notices(app)
    assert (note.status, note.attempts) == ("pending", 1) and note.last_error

    # When the backstop runs within the grace period, it leaves the fresh notice alone
    run_backstop(app, now=DUE + timedelta(seconds=30))
    assert smtp_server.messages == []

    # When the backstop runs after the grace period
    report = run_backstop(app, now=DUE + timedelta(minutes=2))

    # Then the notice goes out, once, to the owner, without the letter's text
    assert report.errors == 0
    assert to_owner(smtp_server) == ["We could not deliver your letter"]
    assert to_recipient(smtp_server) == 0
    assert BODY not in smtp_server.messages[0].text
    [note] = notices(app)
    assert (note.status, note.attempts) == ("sent", 2)

    # And later backstop runs send nothing more
    run_backstop(app, now=DUE + timedelta(minutes=3))
    run_backstop(app, now=DUE + timedelta(hours=1))
    assert len(smtp_server.messages) == 1


# ---------------------------------------------------------------- unreadable letter


def test_tampered_ciphertext_fails_as_decryption_sends_nothing_and_tells_the_owner_once(
    world: tuple[App, int], smtp_server: FakeSmtpServer
) -> None:
    app, user_id = world
    delivery_id = schedule(app, user_id)

    # Given the stored body was altered (one bit flipped): AES-GCM must refuse it
    with session_scope(app.session_factory) as session:
        letter = session.scalars(select(Letter)).one()
        tampered = bytearray(letter.body_ciphertext)
        tampered[-1] ^= 0x01
        session.execute(
            update(Letter).where(Letter.id == letter.id).values(body_ciphertext=bytes(tampered))
        )
        session.commit()

    # When the delivery runs
    assert run_delivery(app, delivery_id, "t1", clock=lambda: DUE) == Status.FAILED

    # Then the row is failed / decryption, and no provider was called for the letter
    failed = row(app, delivery_id)
    assert failed.status == Status.FAILED and failed.error_class == ErrorClass.DECRYPTION
    assert failed.sent_at is None and failed.provider is None
    assert BODY not in (failed.last_error or "")
    assert to_recipient(smtp_server) == 0
    with session_scope(app.session_factory) as session:
        attempts = session.scalar(select(func.count()).select_from(DeliveryAttempt))
        events = list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.delivery_id == delivery_id)
                .order_by(AuditEvent.id)
            )
        )
    assert attempts == 0

    # And the owner was told once, and the audit trail says why
    assert to_owner(smtp_server) == ["We could not deliver your letter"]
    failed_events = [e for e in events if e.type == "delivery.failed"]
    assert [e.data["error_class"] for e in failed_events] == [ErrorClass.DECRYPTION]
    assert "notification.sent" in [e.type for e in events]
    assert all(BODY not in f"{e.reason} {e.data}" for e in events)

    # And nothing retries it on its own: a stale task, the backstop, the failed retrier
    later = DUE + timedelta(hours=3)
    assert run_delivery(app, delivery_id, "t1-twin", clock=lambda: later) is None
    run_backstop(app, now=later)
    run_failed_retrier(app, now=later)
    assert run_delivery(app, delivery_id, "t2", clock=lambda: later) is None
    assert row(app, delivery_id).status == Status.FAILED
    assert to_recipient(smtp_server) == 0
    assert len(smtp_server.messages) == 1
    [note] = notices(app)
    assert note.status == "sent"
