"""After sent, in the console: triage's "bounced after send" view and the detail page's
provider events, for a letter a (Resend) webhook reported bounced."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, select, update

from core import webhook_payloads, webhooks
from core.db import make_session_factory, session_scope
from core.models import AuditEvent, Delivery
from core.operators import Operator, Role
from core.policy import utcnow
from tests.console.conftest import Runner, Seams

SUPPORT = Operator("sam", Role.SUPPORT, "Sam")


@pytest.fixture
def bounced_id(console_env: Seams) -> Iterator[str]:
    """A demo letter that was sent, then hard-bounced according to its provider's webhook."""
    engine: Engine = create_engine(os.environ["CAPSULE_DATABASE_URL"])
    sessions = make_session_factory(engine)
    with session_scope(sessions) as s:
        delivery_id = s.scalar(select(Delivery.id).where(Delivery.status == "sent").limit(1))
        assert delivery_id is not None
        s.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id)
            .values(provider="resend", provider_message_id="re-console-1")
        )
        s.commit()
    event = webhook_payloads.parse_resend(
        "msg_console",
        {
            "type": "email.bounced",
            "created_at": "2030-01-01T12:00:00Z",
            "data": {
                "email_id": "re-console-1",
                "to": ["x@example.com"],
                "bounce": {"type": "Permanent"},
            },
        },
    )
    now = utcnow()
    with session_scope(sessions) as s:
        row_id, _ = webhooks.store_event(s, event, now=now)
        webhooks.process_event(s, row_id, now=now)
        s.commit()
    yield str(delivery_id)
    engine.dispose()


def test_triage_lists_a_letter_bounced_after_send_and_opens_its_events(
    console: Runner, bounced_id: str
) -> None:
    at = console(SUPPORT, page="triage")
    at.toggle(key="triage_bounced").set_value(True).run()

    shown = at.dataframe[0].value
    assert bounced_id in shown["id"].tolist()
    row = shown["id"].tolist().index(bounced_id)
    assert shown["status"].iloc[row] == "bounced" and shown["bounce_kind"].iloc[row] == "hard"
    assert {m.label: m.value for m in at.metric}["Bounced"] == "1"

    at.session_state[at.dataframe[0].key] = {
        "selection": {"rows": [row], "columns": [], "cells": []}
    }
    at.run()
    next(b for b in at.button if b.label == "Open detail").click().run()
    assert at.subheader[0].value == f"Delivery {bounced_id}"
    assert "Provider events" in {s.value for s in at.subheader}
    events = next(d.value for d in at.dataframe if "bounce_kind" in d.value.columns)
    assert events["type"].tolist() == ["bounced"]


def test_support_releases_a_held_letter_from_its_page_with_a_reason(
    console: Runner, console_env: Seams
) -> None:
    # Given a due letter held for a suppressed address
    engine = create_engine(os.environ["CAPSULE_DATABASE_URL"])
    sessions = make_session_factory(engine)
    now = utcnow()
    with session_scope(sessions) as s:
        row = s.scalars(select(Delivery).where(Delivery.status == "scheduled").limit(1)).one()
        delivery_id = row.id
        s.execute(update(Delivery).where(Delivery.id == row.id).values(next_attempt_at=now))
        webhooks.suppress(s, row.recipient_email, "hard_bounce", now=now, actor="test")
        assert webhooks.hold_if_suppressed(s, row.id, now=now)
        s.commit()

    # When support opens it, presses Release and gives a reason
    at = console(SUPPORT, page="delivery")
    at.text_input(key="detail_query").input(str(delivery_id)).run()
    assert {"Release", "Cancel"} <= {b.label for b in at.button}
    assert "Requeue" not in {b.label for b in at.button}
    at.button(key="detail_release").click().run()
    at.text_area(key="action_reason").input("owner confirmed the address works again")
    at = next(b for b in at.button if b.label.startswith("Release 1")).click().run()
    assert not at.exception, at.exception

    # Then it is scheduled again, due now, and the release is audited with the operator
    with session_scope(sessions) as s:
        assert s.scalar(select(Delivery.status).where(Delivery.id == delivery_id)) == "scheduled"
        released = s.scalars(
            select(AuditEvent).where(
                AuditEvent.delivery_id == delivery_id, AuditEvent.type == "delivery.released"
            )
        ).one()
    assert "sam" in released.actor and released.reason == "owner confirmed the address works again"
    engine.dispose()
