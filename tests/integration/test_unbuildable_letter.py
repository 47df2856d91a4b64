"""A stored letter that can never become an email (a subject with a line break, accepted before
scheduling refused such subjects) fails for good on its first run, with its credit refunded and
its owner told it could not be delivered — never `ambiguous`, never "may have reached".
Against the file outbox (every database) and a real SMTP server."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from core import credits
from core.bootstrap import App, build_app
from core.config import Settings
from core.db import make_engine, session_scope
from core.deliveries import create_user, schedule_delivery
from core.models import Delivery, DeliveryAttempt, Letter, Notification, Status
from core.policy import utcnow
from core.worker import run_delivery
from tests.fakes.smtp_server import FakeSmtpServer

BROKEN_SUBJECT = "Hello\r\nBcc: everyone@example.com"


def schedule_broken_letter(app: App) -> tuple[uuid.UUID, int]:
    """A due delivery whose sealed subject carries CR LF, as an older version stored it."""
    now = utcnow()
    with session_scope(app.session_factory) as session:
        user = create_user(session, "owner@example.com", "Owner", now, 3)
        session.commit()
        user_id = user.id
    scheduled = schedule_delivery(
        app,
        user_id=user_id,
        recipient="future@example.com",
        subject="Hello",
        body="Dear future me",
        deliver_at=now - timedelta(milliseconds=500),
        now=now - timedelta(seconds=1),
        actor="owner@example.com",
    )
    sealed = app.keyring.seal(scheduled.letter_id, BROKEN_SUBJECT, "Dear future me")
    with session_scope(app.session_factory) as session:
        session.execute(
            update(Letter)
            .where(Letter.id == scheduled.letter_id)
            .values(subject_ciphertext=sealed.subject)
        )
        session.commit()
    return scheduled.delivery_id, user_id


def assert_failed_for_good(app: App, delivery_id: uuid.UUID, user_id: int) -> None:
    with session_scope(app.session_factory) as session:
        row = session.get(Delivery, delivery_id)
        assert row is not None
        attempts = session.scalars(
            select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery_id)
        ).all()
        assert row.status == Status.FAILED and row.error_class == "permanent"
        assert row.pinned_provider is None
        assert [a.outcome for a in attempts] == ["permanent"]
        assert [a.provider_error_code for a in attempts] == ["message_build"]
        assert "Bcc" not in (row.last_error or "") and "Hello" not in (row.last_error or "")
        assert credits.held_by(session, delivery_id) == 0  # refunded
        assert credits.balance(session, user_id) == 3
        assert session.scalars(select(Notification.delivery_id)).all() == [delivery_id]


def test_outbox_fails_the_letter_for_good_refunds_and_writes_no_letter(app: App) -> None:
    delivery_id, user_id = schedule_broken_letter(app)

    assert run_delivery(app, delivery_id, "t1") == Status.FAILED

    assert_failed_for_good(app, delivery_id, user_id)
    outbox = app.settings.outbox_path
    written = sorted(outbox.glob("*.eml")) if outbox.exists() else []
    # Only the owner's notice: the letter itself wrote nothing.
    assert len(written) == 1
    notice = written[0].read_text()
    assert "To: owner@example.com" in notice and "Bcc" not in notice
    assert "may have reached" not in notice


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_smtp_fails_the_letter_for_good_and_the_server_receives_no_letter(
    tmp_path, database_url: str, keyring, enqueuer, smtp_server: FakeSmtpServer
) -> None:
    settings = Settings(
        var_dir=str(tmp_path),
        database_url=database_url,
        providers=("smtp",),
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
    )
    engine = make_engine(settings)
    app = build_app(settings, enqueuer, engine=engine, keyring=keyring)
    try:
        delivery_id, user_id = schedule_broken_letter(app)

        assert run_delivery(app, delivery_id, "t1") == Status.FAILED

        assert_failed_for_good(app, delivery_id, user_id)
        received = smtp_server.messages
        assert [m.rcpt_tos for m in received] == [("owner@example.com",)]  # the notice only
    finally:
        app.chain.close()
        engine.dispose()
