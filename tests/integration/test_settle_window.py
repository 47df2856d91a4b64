"""The settle window on the real fake server (DESIGN.md invariant 7, last sentence).

Postmark first, its outbound search 90 s behind its sends: a send accepted but answered too
late, then a lookup too early to see it, once led to a resend (49 duplicates in 600). The
fake's clock is set to the worker's clock at each run, so the lag passes without waiting.
Counted at the fake: send requests per idempotency key, not stored messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from benchmarks.fakes.provider_server import FakeProviderServer
from core.bootstrap import App, build_app
from core.claims import claim, recover_expired_lease
from core.db import make_engine, session_scope
from core.models import ErrorClass, Status
from core.providers.base import Email
from core.providers.postmark import PostmarkProvider
from core.worker import run_delivery
from tests.conftest import RecordingEnqueuer
from tests.integration.test_transitions import row
from tests.integration.test_worker import attempts, due_now, provider_settings

LAG = 90.0
SETTLE = 120.0


@pytest.fixture
def lagging(
    provider_server: FakeProviderServer,
    tmp_path: Path,
    database_url: str,
    keyring,
    enqueuer: RecordingEnqueuer,
) -> Iterator[App]:
    """Postmark first (its search LAG s behind), Resend second; settle window SETTLE s."""
    provider_server.search_lag_seconds = LAG
    settings = provider_settings(
        provider_server,
        tmp_path,
        database_url,
        providers=("postmark", "resend"),
        lookup_settle_seconds=SETTLE,
    )
    engine = make_engine(settings)
    app = build_app(settings, enqueuer, engine=engine, keyring=keyring)
    yield app
    app.chain.close()
    engine.dispose()


def run_at(app: App, server: FakeProviderServer, delivery_id: uuid.UUID, when: datetime) -> str:
    """One run of the delivery with the worker's and the fake's clocks both at `when`."""
    server.set_now(when)
    status = run_delivery(app, delivery_id, f"run-{uuid.uuid4().hex[:6]}", clock=lambda: when)
    assert status is not None
    return status


def test_a_lookup_inside_the_lag_does_not_resend_and_the_letter_is_found_after_it(
    lagging: App, provider_server: FakeProviderServer
) -> None:
    # Given Postmark accepts the letter but answers after the client's read timeout
    provider_server.set_faults("postmark", ["stall:1.0"])
    delivery_id = due_now(lagging)
    key = row(lagging, delivery_id).idempotency_key
    assert run_delivery(lagging, delivery_id, "t1") == Status.SCHEDULED
    first = row(lagging, delivery_id)
    assert (first.error_class, first.pinned_provider) == (ErrorClass.AMBIGUOUS, "postmark")
    [ambiguous] = attempts(lagging, delivery_id)
    ambiguous_end = ambiguous.started_at + timedelta(milliseconds=ambiguous.duration_ms)
    provider_server.wait_idle()

    # When it runs again at its retry time, while the search cannot see the message yet
    early = first.next_attempt_at + timedelta(seconds=1)
    assert early < ambiguous_end + timedelta(seconds=LAG)
    assert run_at(lagging, provider_server, delivery_id, early) == Status.SCHEDULED

    # Then nothing more was sent, the search was asked once, and the letter waits pinned,
    # without using up an attempt, until the settle window closes
    assert provider_server.requests_for_key(key) == 1
    assert provider_server.lookups_for_key(key) == 1
    waiting = row(lagging, delivery_id)
    assert waiting.pinned_provider == "postmark" and waiting.error_class == ErrorClass.AMBIGUOUS
    assert waiting.round_attempts == first.round_attempts
    assert waiting.next_attempt_at >= ambiguous_end + timedelta(seconds=SETTLE)

    # When it runs once the window has closed
    assert run_at(lagging, provider_server, delivery_id, waiting.next_attempt_at) == Status.SENT

    # Then the search found the first message: one send request in all, Resend never asked
    assert provider_server.requests_for_key(key) == 1
    assert provider_server.requests_for_key(key, "resend") == 0
    assert provider_server.lookups_for_key(key) == 2
    [message] = provider_server.messages()
    sent = row(lagging, delivery_id)
    assert sent.provider == "postmark" and sent.provider_message_id == message.id
    assert attempts(lagging, delivery_id)[-1].error_message == "found by lookup"


def test_a_message_that_never_arrived_is_sent_once_the_window_has_closed(
    lagging: App, provider_server: FakeProviderServer
) -> None:
    # Given a gateway timeout from Postmark (unknown outcome; here nothing was stored)
    provider_server.set_faults("postmark", ["504"])
    delivery_id = due_now(lagging)
    key = row(lagging, delivery_id).idempotency_key
    assert run_delivery(lagging, delivery_id, "t1") == Status.SCHEDULED
    first = row(lagging, delivery_id)

    # When the retry comes inside the window, it waits; after it, it sends with Postmark
    early = first.next_attempt_at + timedelta(seconds=1)
    assert run_at(lagging, provider_server, delivery_id, early) == Status.SCHEDULED
    assert provider_server.requests_for_key(key) == 1
    later = row(lagging, delivery_id).next_attempt_at
    assert run_at(lagging, provider_server, delivery_id, later) == Status.SENT

    # Then the letter went out once, through the provider it was pinned to
    assert provider_server.requests_for_key(key, "postmark") == 2  # the 504, then the send
    assert provider_server.count_for_key(key) == 1
    assert provider_server.requests_for_key(key, "resend") == 0


def test_a_recovered_lease_waits_for_the_search_before_sending_anywhere(
    lagging: App, provider_server: FakeProviderServer
) -> None:
    # Given a run that claimed the letter, handed it to Postmark and died before recording
    delivery_id = due_now(lagging)
    claimed_at = row(lagging, delivery_id).next_attempt_at + timedelta(seconds=1)
    with session_scope(lagging.session_factory) as session:
        held = claim(session, delivery_id, "dead-run", now=claimed_at, lease_seconds=5)
        session.commit()
    assert held is not None
    postmark = lagging.chain.providers[0]
    assert isinstance(postmark, PostmarkProvider)
    email = Email(
        to=held.recipient_email,
        sender=lagging.settings.mail_from,
        subject="To me",
        text="Dear future me",
        idempotency_key=held.idempotency_key,
        tags={"delivery_id": str(delivery_id), "kind": "letter"},
    )
    provider_server.set_now(claimed_at)
    postmark.send(email)

    # When the backstop recovers the lease and the letter runs again inside the lag
    recovered_at = claimed_at + timedelta(seconds=6)
    with session_scope(lagging.session_factory) as session:
        assert recover_expired_lease(session, delivery_id, now=recovered_at)
        session.commit()
    rerun_at = recovered_at + timedelta(seconds=1)
    assert run_at(lagging, provider_server, delivery_id, rerun_at) == Status.SCHEDULED

    # Then nothing was sent anywhere, and the letter still looks first when it comes back
    key = held.idempotency_key
    assert provider_server.requests_for_key(key) == 1
    waiting = row(lagging, delivery_id)
    assert waiting.error_class == ErrorClass.LEASE_EXPIRED and waiting.pinned_provider is None
    assert waiting.next_attempt_at >= recovered_at + timedelta(seconds=SETTLE)

    # When it runs after the window, the lookup finds the dead run's message
    assert run_at(lagging, provider_server, delivery_id, waiting.next_attempt_at) == Status.SENT
    assert provider_server.requests_for_key(key) == 1
    assert provider_server.count_for_key(key) == 1
