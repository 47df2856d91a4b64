"""After "sent": provider events move a delivery, feed the suppression list, tell the owner once;
a letter due to a suppressed address is held. On SQLite and PostgreSQL (`db_kind`)."""

from __future__ import annotations

import itertools
import uuid
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from core import webhook_payloads, webhooks
from core.bootstrap import App
from core.claims import claim
from core.db import session_scope
from core.deliveries import cancel_delivery, create_user, schedule_delivery
from core.errors import InvalidTransition, ValidationError, WebhookPayloadError
from core.models import AuditEvent, Delivery, Notification, Suppression, WebhookEvent
from core.notifications import DELIVERY_BOUNCED
from core.outcomes import Outcome, ProviderCall
from core.recording import record_outcome
from tests.conftest import T0, RecordingEnqueuer

DEAD = "gone@old-isp.example"


def sent_letter(app: App, to: str = DEAD, message_id: str = "re-msg-1") -> uuid.UUID:
    """A letter Resend accepted with `message_id`."""
    with session_scope(app.session_factory) as s:
        user = create_user(s, f"owner{uuid.uuid4().hex[:6]}@example.com", "Owner", T0, credit=5)
        s.commit()
        user_id = user.id
    scheduled = schedule_delivery(
        app,
        user_id=user_id,
        recipient=to,
        subject="Hello",
        body="Dear future me",
        deliver_at=T0 + timedelta(minutes=1),
        now=T0,
        actor="test",
    )
    if message_id:
        at = T0 + timedelta(minutes=2)
        with session_scope(app.session_factory) as s:
            claimed = claim(s, scheduled.delivery_id, "task-1", now=at, lease_seconds=60)
            assert claimed is not None
            call = ProviderCall("resend", "accepted", at, 10, 200, provider_message_id=message_id)
            outcome = Outcome(None, [call], provider="resend", provider_message_id=message_id)
            record_outcome(s, claimed, outcome, app.settings, now=at)
            s.commit()
    return scheduled.delivery_id


def resend(
    kind: str,
    message_id: str = "re-msg-1",
    to: str = DEAD,
    bounce_type: str = "Permanent",
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "email_id": message_id,
        "to": [to],
        "subject": "Dear future me: SECRET SUBJECT",
        "tags": tags or {},
    }
    if kind == "email.bounced":
        data["bounce"] = {"type": bounce_type, "subType": "General", "message": "550 no user"}
    return {"type": kind, "created_at": "2030-01-01T12:03:00.000Z", "data": data}


def receive(app: App, event: webhook_payloads.ParsedEvent, at_minutes: float = 3) -> int:
    with session_scope(app.session_factory) as s:
        event_id, _ = webhooks.store_event(s, event, now=T0 + timedelta(minutes=at_minutes))
        s.commit()
    return event_id


def process(app: App, event_id: int, at_minutes: float = 4) -> webhooks.Processed:
    return webhooks.process_and_notify(app, event_id, now=T0 + timedelta(minutes=at_minutes))


def state(app: App, delivery_id: uuid.UUID) -> tuple[str, str | None]:
    with session_scope(app.session_factory) as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        return row.status, row.bounce_kind


def count(app: App, model: Any, *where: Any) -> int:
    with session_scope(app.session_factory) as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_a_hard_bounce_marks_the_letter_suppresses_the_address_and_asks_one_notice(
    app: App,
) -> None:
    # Given a letter Resend accepted
    delivery_id = sent_letter(app)
    labels = {"provider": "resend", "type": "bounced"}
    before = {
        outcome: REGISTRY.get_sample_value(
            "capsule_webhook_events_total", {**labels, "outcome": outcome}
        )
        or 0
        for outcome in ("applied", "unchanged")
    }

    # When its hard bounce arrives, twice (the provider retries with the same svix-id)
    for _ in range(2):
        event_id = receive(app, webhook_payloads.parse_resend("msg_1", resend("email.bounced")))
        process(app, event_id)

    # Then the letter is bounced (hard), stored once, its address is on the list once,
    # and its owner has exactly one bounce notice
    assert state(app, delivery_id) == ("bounced", "hard")
    assert count(app, WebhookEvent) == 1
    assert (
        count(app, Suppression, Suppression.address == DEAD, Suppression.reason == "hard_bounce")
        == 1
    )
    assert count(app, Notification, Notification.kind == DELIVERY_BOUNCED) == 1
    assert count(app, AuditEvent, AuditEvent.type == "delivery.bounced") == 1
    # and the metrics count it once as applied (the duplicate was stored once, processed once)
    after = {
        outcome: REGISTRY.get_sample_value(
            "capsule_webhook_events_total", {**labels, "outcome": outcome}
        )
        or 0
        for outcome in ("applied", "unchanged")
    }
    assert after["applied"] - before["applied"] == 1
    # and the subject the provider echoed was never stored
    with session_scope(app.session_factory) as s:
        payload = s.scalar(select(WebhookEvent.payload))
    assert "SECRET" not in repr(payload)


EVENTS = {
    "delivered": lambda: webhook_payloads.parse_resend("e-d", resend("email.delivered")),
    "soft": lambda: webhook_payloads.parse_resend(
        "e-s", resend("email.bounced", bounce_type="Transient")
    ),
    "hard": lambda: webhook_payloads.parse_resend("e-h", resend("email.bounced")),
    "complained": lambda: webhook_payloads.parse_resend("e-c", resend("email.complained")),
}


@pytest.mark.parametrize(
    ("names", "final"),
    [
        (("delivered", "hard"), ("bounced", "hard")),
        (("soft", "delivered"), ("delivered", None)),
        (("delivered", "complained"), ("complained", None)),
        (("soft", "delivered", "hard", "complained"), ("bounced", "hard")),
    ],
)
def test_duplicates_and_any_order_leave_the_same_final_state(
    app: App, names: tuple[str, ...], final: tuple[str, str | None]
) -> None:
    # Given one sent letter per ordering of the same events (each sent twice)
    for n, order in enumerate(itertools.permutations(names)):
        message_id = f"re-msg-{n}"
        delivery_id = sent_letter(app, to=f"r{n}@example.com", message_id=message_id)
        # When the events arrive in that order, each one twice
        for name in [*order, *order]:
            parsed = EVENTS[name]()
            parsed = webhook_payloads.ParsedEvent(
                **{
                    **parsed.__dict__,
                    "event_id": f"{parsed.event_id}-{n}",
                    "provider_message_id": message_id,
                }
            )
            process(app, receive(app, parsed))
        # Then every order ends in the same state
        assert state(app, delivery_id) == final, order


def test_an_unknown_message_id_is_stored_and_counted_not_dropped(app: App) -> None:
    event_id = receive(
        app, webhook_payloads.parse_resend("m-x", resend("email.delivered", "nobody"))
    )

    result = process(app, event_id)

    assert result.outcome == webhooks.UNMATCHED
    assert count(app, WebhookEvent, WebhookEvent.outcome == "unmatched") == 1


def test_a_bounced_owner_notice_never_moves_the_letter_it_is_about(app: App) -> None:
    # Given a letter delivered, and a bounce for a *notice* tagged with the letter's id
    delivery_id = sent_letter(app)
    process(app, receive(app, webhook_payloads.parse_resend("d", resend("email.delivered"))))
    tags = {"delivery_id": str(delivery_id), "kind": "delivery_failed"}
    notice = webhook_payloads.parse_resend("n", resend("email.bounced", "notice-msg", tags=tags))

    result = process(app, receive(app, notice))

    assert result.outcome == webhooks.UNMATCHED
    assert state(app, delivery_id) == ("delivered", None)


def test_an_event_before_the_sent_is_recorded_waits_for_the_backstop(app: App) -> None:
    # Given a letter still processing (the provider was faster than the worker's record)
    delivery_id = sent_letter(app, message_id="")
    with session_scope(app.session_factory) as s:
        claimed = claim(s, delivery_id, "t", now=T0 + timedelta(minutes=2), lease_seconds=60)
        s.commit()
    assert claimed is not None
    tags = {"delivery_id": str(delivery_id), "kind": "letter"}
    event_id = receive(
        app, webhook_payloads.parse_resend("early", resend("email.delivered", "m9", tags=tags))
    )

    # When it is processed at once, it is left for later
    assert process(app, event_id).outcome is None
    # and once the sent is recorded, the backstop's pass applies it
    with session_scope(app.session_factory) as s:
        at = T0 + timedelta(minutes=3)
        call = ProviderCall("resend", "accepted", at, 10, 200, provider_message_id="m9")
        record_outcome(s, claimed, Outcome(None, [call], "resend", "m9"), app.settings, now=at)
        s.commit()
    done = webhooks.process_pending(
        app, now=T0 + timedelta(minutes=10), older_than=T0 + timedelta(minutes=9)
    )
    assert done == 1
    assert state(app, delivery_id) == ("delivered", None)


def test_postmark_events_parse_and_keep_no_letter_text() -> None:
    bounce = webhook_payloads.parse_postmark(
        {
            "RecordType": "Bounce",
            "ID": 42,
            "Type": "HardBounce",
            "MessageID": "pm-1",
            "Email": DEAD,
            "BouncedAt": "2030-01-01T12:03:00.1234567Z",
            "Subject": "SECRET SUBJECT",
            "Content": "SECRET BODY",
            "Metadata": {"delivery_id": "x", "idempotency_key": "k"},
            "Tag": "letter",
        }
    )
    assert (bounce.event_id, bounce.type, bounce.bounce_kind) == ("Bounce:42", "bounced", "hard")
    assert bounce.occurred_at is not None
    assert "SECRET" not in repr(bounce.payload)
    spam = webhook_payloads.parse_postmark(
        {"RecordType": "SpamComplaint", "ID": 7, "MessageID": "pm-1", "Email": DEAD}
    )
    assert spam.type == "complained"
    with pytest.raises(WebhookPayloadError):
        webhook_payloads.parse_postmark({"RecordType": "Bounce", "MessageID": "pm-1"})  # no ID
    with pytest.raises(WebhookPayloadError):
        webhook_payloads.parse_resend("x", ["not", "an", "object"])


def test_a_letter_due_to_a_suppressed_address_is_held_until_support_releases_it(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    # Given an address on the list and a letter due to it
    with session_scope(app.session_factory) as s:
        webhooks.suppress(s, DEAD.upper(), "hard_bounce", now=T0, actor="test")
        s.commit()
    delivery_id = sent_letter(app, message_id="")
    due = T0 + timedelta(minutes=2)

    # When its run comes, it is held, never claimed
    with session_scope(app.session_factory) as s:
        assert webhooks.hold_if_suppressed(s, delivery_id, now=due)
        assert claim(s, delivery_id, "t", now=due, lease_seconds=60) is None
        s.commit()
    assert state(app, delivery_id) == ("held", None)

    # Then a release needs a reason, and after it the letter is due and not held again
    with pytest.raises(ValidationError):
        webhooks.release_held(app, delivery_id, now=due, actor="support", reason=" ")
    later = due + timedelta(minutes=1)
    webhooks.release_held(app, delivery_id, now=later, actor="support", reason="owner asked")
    with session_scope(app.session_factory) as s:
        assert not webhooks.hold_if_suppressed(s, delivery_id, now=later)
        assert claim(s, delivery_id, "t2", now=later, lease_seconds=60) is not None
        s.commit()
    assert count(app, AuditEvent, AuditEvent.type == "delivery.released") == 1


def test_support_removes_an_address_audited_and_a_held_letter_can_be_canceled(
    app: App, enqueuer: RecordingEnqueuer
) -> None:
    with session_scope(app.session_factory) as s:
        webhooks.suppress(s, DEAD, "complaint", now=T0, actor="test")
        s.commit()
    delivery_id = sent_letter(app, message_id="")
    due = T0 + timedelta(minutes=2)
    with session_scope(app.session_factory) as s:
        webhooks.hold_if_suppressed(s, delivery_id, now=due)
        s.commit()

    webhooks.remove_suppression(
        app.session_factory, DEAD, now=due, actor="support", reason="new mailbox confirmed"
    )

    # Then the row is kept as removed, the removal audited; removing again is refused
    assert count(app, Suppression, Suppression.removed_at.is_not(None)) == 1
    assert count(app, AuditEvent, AuditEvent.type == "suppression.removed") == 1
    with pytest.raises(ValidationError):
        webhooks.remove_suppression(app.session_factory, DEAD, now=due, actor="s", reason="r")
    # and the address can be suppressed again (a new live row)
    with session_scope(app.session_factory) as s:
        assert webhooks.suppress(s, DEAD, "manual", now=due, actor="test")
        s.commit()
    # A held letter stays held (people decide) and can be canceled
    assert state(app, delivery_id) == ("held", None)
    cancel_delivery(app, delivery_id, now=due, actor="s", reason="r")
    assert state(app, delivery_id) == ("canceled", None)
    with pytest.raises(InvalidTransition):
        webhooks.release_held(app, delivery_id, now=due, actor="s", reason="r")


def test_the_backstop_processes_an_event_whose_task_was_lost(app: App) -> None:
    # Given a stored bounce nobody processed (its Huey task was lost)
    from core.reconcile import run_backstop

    delivery_id = sent_letter(app)
    receive(app, webhook_payloads.parse_resend("lost", resend("email.bounced")), at_minutes=3)
    grace = app.settings.webhook_grace_seconds

    # When the backstop runs within the grace, it leaves it; after the grace, it processes it
    run_backstop(app, now=T0 + timedelta(minutes=3, seconds=grace - 1))
    assert state(app, delivery_id) == ("sent", None)
    run_backstop(app, now=T0 + timedelta(minutes=3, seconds=grace + 1))

    assert state(app, delivery_id) == ("bounced", "hard")
    assert count(app, Notification, Notification.kind == DELIVERY_BOUNCED) == 1


def test_a_batch_claim_never_takes_a_letter_to_a_suppressed_address(app: App) -> None:
    # Given three due letters, one of them to an address on the list
    from core import batches

    dead = sent_letter(app, to=DEAD, message_id="")
    alive = [sent_letter(app, to=f"r{n}@example.com", message_id="") for n in range(2)]
    due = T0 + timedelta(minutes=2)
    with session_scope(app.session_factory) as s:
        webhooks.suppress(s, DEAD, "hard_bounce", now=T0, actor="test")
        s.commit()

    # When a batch gathers every due letter it may
    with session_scope(app.session_factory) as s:
        taken = batches.claim_more(s, "t-batch", limit=10, now=due, lease_seconds=60)
        s.commit()

    # Then it leaves the suppressed one to its own run, which holds it
    assert sorted(c.delivery_id for c in taken) == sorted(alive)
    with session_scope(app.session_factory) as s:
        assert webhooks.hold_if_suppressed(s, dead, now=due)
        s.commit()
    assert state(app, dead) == ("held", None)
