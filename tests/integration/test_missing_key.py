"""A letter whose key is not in the keyring waits for it (never failed, never an owner email);
a tampered one fails as `decryption`. Real worker runs on SQLite and PostgreSQL against the
fake provider server, and the backstop's alert against a local webhook."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from benchmarks.fakes.provider_server import FakeProviderServer
from core import health
from core.bootstrap import App, build_app
from core.crypto import Keyring, generate_key_entry
from core.db import make_engine, session_scope
from core.models import Alert, DeliveryAttempt, ErrorClass, Letter, Notification, Status
from core.policy import utcnow
from core.reconcile import BACKSTOP, run_safety_net
from core.worker import run_delivery
from tests.conftest import KEY_ENTRY, RecordingEnqueuer, set_row
from tests.fakes.alert_webhook import Webhook
from tests.integration.test_transitions import events, row
from tests.integration.test_worker import due_now, provider_settings

OTHER_KEY = generate_key_entry("other")


def due_now_with(app: App, **values: object) -> uuid.UUID:
    """A due letter whose row then holds `values` (what an earlier run left behind)."""
    delivery_id = due_now(app)
    set_row(app, delivery_id, **values)
    return delivery_id


@pytest.fixture
def apps(
    provider_server: FakeProviderServer,
    tmp_path: Path,
    database_url: str,
    enqueuer: RecordingEnqueuer,
    webhook: Webhook,
) -> Iterator[tuple[App, App]]:
    """(an app whose keyring holds the letters' key, one whose keyring lost it)."""
    settings = provider_settings(
        provider_server,
        tmp_path,
        database_url,
        alert_webhook_url=webhook.url,
        missing_key_retry_seconds=300,
    )
    engine = make_engine(settings)
    full = build_app(settings, enqueuer, engine=engine, keyring=Keyring.parse(KEY_ENTRY))
    # A deploy that forgot the old key: only a newer one is configured.
    lost = build_app(settings, enqueuer, engine=engine, keyring=Keyring.parse(OTHER_KEY))
    yield full, lost
    full.chain.close()
    lost.chain.close()
    engine.dispose()


def count(app: App, model: type) -> int:
    with session_scope(app.session_factory) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_a_missing_key_keeps_the_letter_scheduled_alerts_once_and_it_goes_out_when_the_key_is_back(
    apps: tuple[App, App], provider_server: FakeProviderServer, webhook: Webhook
) -> None:
    full, lost = apps
    delivery_id = due_now(full)
    now = utcnow()

    # When a worker whose keyring lacks the letter's key runs it, twice
    assert run_delivery(lost, delivery_id, "t1", clock=lambda: now) == Status.SCHEDULED
    first = row(full, delivery_id)
    later = first.next_attempt_at + timedelta(seconds=1)
    assert run_delivery(lost, delivery_id, "t2", clock=lambda: later) == Status.SCHEDULED

    # Then nothing left the building, nothing failed and no attempt was spent
    stored = row(full, delivery_id)
    assert provider_server.messages() == []
    assert stored.status == Status.SCHEDULED and stored.error_class == ErrorClass.MISSING_KEY
    assert "'test1'" in (stored.last_error or "")
    assert stored.attempt_count == 0 and stored.round_attempts == 0
    assert first.next_attempt_at >= now + timedelta(seconds=300)
    assert stored.next_attempt_at >= later + timedelta(seconds=300)
    assert count(full, DeliveryAttempt) == 0 and count(full, Notification) == 0
    assert provider_server.messages() == []  # no owner notice either
    assert events(full, delivery_id)[-2:] == ["delivery.deferred", "delivery.deferred"]

    # And health names the missing key and is not ok
    with session_scope(full.session_factory) as session:
        report = health.check(session, full.settings, later)
    assert report.waiting_for_keys == {"test1": 1} and not report.ok
    assert any("'test1' (1)" in p for p in report.problems)

    # And the backstop alerts once per window, with the key id and never the letter
    for minute in (1, 2):
        at = later + timedelta(minutes=minute)
        run_safety_net(full, BACKSTOP, now=at, runner="a", slot=None, clock=lambda at=at: at)
    texts = [p["text"] for p in webhook.posts]
    assert len(texts) == 1 and "[missing_key]" in texts[0] and "'test1' (1)" in texts[0]
    assert "Dear future me" not in texts[0] and "To me" not in texts[0]
    with session_scope(full.session_factory) as session:
        kinds = session.scalars(select(Alert.kind).where(Alert.suppressed.is_(False))).all()
    assert list(kinds) == ["missing_key"]

    # When the key is back, the next run sends it once and health clears
    back = stored.next_attempt_at
    assert run_delivery(full, delivery_id, "t3", clock=lambda: back) == Status.SENT
    assert provider_server.count_for_key(stored.idempotency_key) == 1
    assert row(full, delivery_id).attempt_count == 1
    with session_scope(full.session_factory) as session:
        assert health.waiting_for_keys(session, full.settings, back) == {}


def test_a_missing_key_keeps_the_pin_of_a_letter_that_may_have_reached_its_provider(
    apps: tuple[App, App],
) -> None:
    full, lost = apps
    delivery_id = due_now_with(full, pinned_provider="resend")

    assert run_delivery(lost, delivery_id, "t1") == Status.SCHEDULED
    assert row(full, delivery_id).pinned_provider == "resend"


def test_a_tampered_letter_with_its_key_present_fails_as_decryption(
    apps: tuple[App, App], provider_server: FakeProviderServer
) -> None:
    full, _ = apps
    delivery_id = due_now(full)
    letter_id = row(full, delivery_id).letter_id
    with session_scope(full.session_factory) as session:
        letter = session.get(Letter, letter_id)
        assert letter is not None
        blob = bytearray(letter.body_ciphertext)
        blob[-1] ^= 1
        letter.body_ciphertext = bytes(blob)
        session.commit()

    assert run_delivery(full, delivery_id, "t1") == Status.FAILED
    stored = row(full, delivery_id)
    assert stored.error_class == ErrorClass.DECRYPTION
    # the letter never went out; its owner is told, as for any failed letter today
    assert [m.tags.get("kind") for m in provider_server.messages()] == ["delivery_failed"]
    with session_scope(full.session_factory) as session:
        assert health.waiting_for_keys(session, full.settings, utcnow()) == {}


def test_the_missing_key_wait_is_a_setting(apps: tuple[App, App]) -> None:
    full, lost = apps
    lost.settings = lost.settings.replace(missing_key_retry_seconds=7200)
    delivery_id = due_now(full)
    now = utcnow()
    run_delivery(lost, delivery_id, f"t-{uuid.uuid4().hex}", clock=lambda: now)
    assert row(full, delivery_id).next_attempt_at >= now + timedelta(seconds=7200)


def test_a_letter_whose_earlier_run_died_mid_send_still_looks_first_after_waiting_for_its_key(
    apps: tuple[App, App],
) -> None:
    # Given a letter whose earlier run died mid-send (its lease was recovered: the provider may
    # hold it), and a worker whose keyring lost the letter's key
    full, lost = apps
    delivery_id = due_now_with(full, error_class=ErrorClass.LEASE_EXPIRED)
    now = utcnow()

    # When that worker runs it
    assert run_delivery(lost, delivery_id, "t1", clock=lambda: now) == Status.SCHEDULED

    # Then it waits for the key and keeps the unknown outcome, so its next run asks the
    # providers before sending anywhere (never a failover that could send it twice)
    stored = row(full, delivery_id)
    assert stored.error_class == ErrorClass.LEASE_EXPIRED
    assert stored.attempt_count == 0
    with session_scope(full.session_factory) as session:
        assert health.waiting_for_keys(session, full.settings, now) == {"test1": 1}
