"""Redirecting a failed or hard-bounced letter to a corrected address (core.redirect), on
SQLite and PostgreSQL: the new delivery reaches the fake provider once, at the new address;
every refusal changes nothing."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, or_, select

from benchmarks.fakes.provider_server import FakeProviderServer
from core import credits, triage
from core.bootstrap import App
from core.db import session_scope
from core.deliveries import schedule_delivery
from core.errors import (
    InsufficientCredit,
    InvalidAddress,
    InvalidTransition,
    PermissionDenied,
    ValidationError,
)
from core.models import AuditEvent, Delivery, Status
from core.operators import Operator, Role
from core.policy import utcnow
from core.redirect import redirect_delivery
from core.webhooks import add_suppression
from core.worker import run_delivery
from tests.conftest import RecordingEnqueuer, set_row
from tests.integration import test_worker
from tests.integration.test_transitions import events, row
from tests.integration.test_worker import due_now

NEW = "new-address@example.com"
world = test_worker.world  # the fixture: an App on the fake Resend and Postmark


def balance(app: App, delivery_id: uuid.UUID) -> int:
    with session_scope(app.session_factory) as session:
        return credits.balance(session, row(app, delivery_id).user_id)


def deliveries(app: App) -> int:
    with session_scope(app.session_factory) as session:
        return int(session.scalar(select(func.count()).select_from(Delivery)) or 0)


def audit_count(app: App) -> int:
    with session_scope(app.session_factory) as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def redirect(app: App, delivery_id: uuid.UUID, to: str = NEW, reason: str = "owner's new address"):
    return redirect_delivery(app, delivery_id, to, now=utcnow(), actor="support:sam", reason=reason)


def failed_letter(world: App, server: FakeProviderServer) -> uuid.UUID:
    """A letter Resend refused for good (422): failed, permanent, its credit refunded."""
    server.set_faults("resend", ["422"])
    delivery_id = due_now(world)
    assert run_delivery(world, delivery_id, "t1") == Status.FAILED
    return delivery_id


def sent_to_new_address_once(world: App, server: FakeProviderServer, new_id: uuid.UUID) -> None:
    assert run_delivery(world, new_id, "t-new") == Status.SENT
    to_new = [m for m in server.messages() if m.to == [NEW]]
    assert len(to_new) == 1 and to_new[0].text.startswith("Dear future me")
    assert server.requests_for_key(row(world, new_id).idempotency_key) == 1


def test_a_failed_letter_goes_to_the_corrected_address_once_and_the_old_delivery_is_canceled(
    world: App, provider_server: FakeProviderServer, enqueuer: RecordingEnqueuer
) -> None:
    old_id = failed_letter(world, provider_server)
    before = balance(world, old_id)

    done = redirect(world, old_id)

    old, new = row(world, old_id), row(world, done.new_id)
    assert old.status == Status.CANCELED and old.canceled_at is not None
    assert (new.status, new.recipient_email, new.letter_id) == (
        Status.SCHEDULED,
        NEW,
        old.letter_id,
    )
    assert new.idempotency_key != old.idempotency_key
    assert done.task_id is not None and enqueuer.enqueued[-1][::2] == (done.new_id, done.task_id)
    assert balance(world, old_id) == before - 1  # the 422 refunded the old credit already
    assert events(world, old_id)[-1] == "delivery.redirected"
    assert events(world, done.new_id) == ["delivery.scheduled"]

    sent_to_new_address_once(world, provider_server, done.new_id)
    assert row(world, done.new_id).status == Status.SENT


def test_a_transient_failure_refunds_its_own_credit_so_the_redirect_costs_nothing_more(
    world: App, provider_server: FakeProviderServer
) -> None:
    provider_server.set_faults("all", p_429=1.0)
    old_id = due_now(world)
    set_row(world, old_id, status=Status.FAILED, error_class="transient", failed_at=utcnow())
    provider_server.set_faults("all")
    before = balance(world, old_id)  # the failed row still holds its credit

    done = redirect(world, old_id)

    assert balance(world, old_id) == before  # refunded, then reserved for the new delivery
    sent_to_new_address_once(world, provider_server, done.new_id)


def test_a_hard_bounced_letter_goes_to_the_corrected_address_and_stays_bounced(
    world: App, provider_server: FakeProviderServer
) -> None:
    old_id = due_now(world)
    assert run_delivery(world, old_id, "t1") == Status.SENT
    # what a hard-bounce webhook writes (core.webhooks; its own tests cover that path)
    set_row(world, old_id, status=Status.BOUNCED, bounce_kind="hard", reported_at=utcnow())
    version, before = row(world, old_id).version, balance(world, old_id)

    done = redirect(world, old_id)

    old = row(world, old_id)
    assert (old.status, old.bounce_kind, old.version) == (Status.BOUNCED, "hard", version + 1)
    assert balance(world, old_id) == before - 1  # the first credit paid for the accepted send
    sent_to_new_address_once(world, provider_server, done.new_id)
    first_address = [m for m in provider_server.messages() if m.to == ["future@example.com"]]
    assert len(first_address) == 1  # nothing more went to the address that bounced


@pytest.mark.parametrize(
    ("state", "to", "reason", "error", "says"),
    [
        ({"status": Status.SCHEDULED}, NEW, "r", InvalidTransition, "it is scheduled"),
        ({"status": Status.SENT}, NEW, "r", InvalidTransition, "it is sent"),
        (
            {"status": Status.BOUNCED, "bounce_kind": "soft"},
            NEW,
            "r",
            InvalidTransition,
            r"bounced \(soft\)",
        ),
        ({"status": Status.COMPLAINED}, NEW, "r", InvalidTransition, "it is complained"),
        ({}, "future@example.com", "r", ValidationError, "the address it could not reach"),
        ({}, "not an address", "r", InvalidAddress, "not a valid email address"),
        ({}, NEW, "  ", ValidationError, "needs a reason"),
        ({}, "held@example.com", "r", ValidationError, "suppression list"),
    ],
)
def test_a_refused_redirect_changes_nothing(
    world: App,
    provider_server: FakeProviderServer,
    state: dict[str, Any],
    to: str,
    reason: str,
    error: type[Exception],
    says: str,
) -> None:
    old_id = failed_letter(world, provider_server)
    if state:
        set_row(world, old_id, **state)
    add_suppression(
        world.session_factory, "held@example.com", now=utcnow(), actor="support", reason="bounced"
    )
    version, counts = row(world, old_id).version, (deliveries(world), audit_count(world))

    with pytest.raises(error, match=says):
        redirect(world, old_id, to=to, reason=reason)

    assert row(world, old_id).version == version
    assert (deliveries(world), audit_count(world)) == counts


def test_no_credit_refuses_the_redirect_and_the_failed_delivery_stays_failed(
    world: App, provider_server: FakeProviderServer
) -> None:
    old_id = failed_letter(world, provider_server)
    owner = row(world, old_id).user_id
    for _ in range(balance(world, old_id)):  # the owner schedules letters until none is left
        schedule_delivery(
            world,
            user_id=owner,
            recipient="someone@example.com",
            subject="s",
            body="b",
            deliver_at=utcnow() + timedelta(days=30),
            now=utcnow(),
            actor="owner@example.com",
        )
    assert balance(world, old_id) == 0
    counts = (deliveries(world), audit_count(world))

    with pytest.raises(InsufficientCredit):
        redirect(world, old_id)

    assert row(world, old_id).status == Status.FAILED
    assert (deliveries(world), audit_count(world)) == counts


def test_one_live_delivery_per_letter_and_the_latest_failure_is_the_one_redirected(
    world: App, provider_server: FakeProviderServer
) -> None:
    old_id = failed_letter(world, provider_server)
    first = redirect(world, old_id)

    # The first redirect's delivery is scheduled: a second redirect would send the letter twice
    set_row(world, old_id, status=Status.FAILED)  # even were the old row failed again
    with pytest.raises(ValidationError, match=f"already has delivery {first.new_id} .scheduled"):
        redirect(world, old_id, to="third@example.com")

    # It fails too: that one, the latest, is redirected; the old one still refuses
    set_row(world, old_id, status=Status.CANCELED)
    provider_server.set_faults("resend", ["422"])
    assert run_delivery(world, first.new_id, "t2") == Status.FAILED
    second = redirect(world, first.new_id, to="third@example.com")
    assert row(world, second.new_id).recipient_email == "third@example.com"
    assert row(world, first.new_id).status == Status.CANCELED


def test_two_operators_redirecting_at_once_make_one_new_delivery(
    world: App, provider_server: FakeProviderServer
) -> None:
    old_id = failed_letter(world, provider_server)
    before = deliveries(world)
    start = threading.Barrier(2)
    outcomes: list[object] = []

    def attempt(to: str) -> None:
        start.wait()
        try:
            outcomes.append(redirect(world, old_id, to=to))
        except (InvalidTransition, ValidationError) as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=attempt, args=(to,)) for to in (NEW, "other@example.com")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(outcomes) == 2
    assert sum(isinstance(o, Exception) for o in outcomes) == 1, outcomes
    assert deliveries(world) == before + 1


def test_support_may_redirect_a_viewer_may_not(
    world: App, provider_server: FakeProviderServer
) -> None:
    old_id = failed_letter(world, provider_server)
    viewer = Operator("local:vera", Role.VIEWER)
    with pytest.raises(PermissionDenied):
        triage.redirect(world, viewer, old_id, recipient=NEW, reason="r", now=utcnow())
    assert row(world, old_id).status == Status.FAILED

    done = triage.redirect(
        world, Operator("local:sam", Role.SUPPORT), old_id, recipient=NEW, reason="r", now=utcnow()
    )
    with session_scope(world.session_factory) as session:
        actors = set(
            session.scalars(
                select(AuditEvent.actor).where(
                    or_(
                        (AuditEvent.delivery_id == old_id)
                        & (AuditEvent.type == "delivery.redirected"),
                        AuditEvent.delivery_id == done.new_id,
                    )
                )
            )
        )
    assert actors == {Operator("local:sam", Role.SUPPORT).identity}
    assert row(world, done.new_id).deliver_at > utcnow() - timedelta(minutes=1)
