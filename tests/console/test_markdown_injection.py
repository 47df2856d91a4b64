"""Data is shown as text, never as Markdown: a name, an address, a provider's error or an
operator's reason that holds a link or a remote image renders literally, on every page that
shows it (the browser must not fetch anything it names)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine
from streamlit.testing.v1 import AppTest

from console import ui
from core.db import make_session_factory, session_scope
from core.models import BulkOperation, Delivery, User
from core.operators import Operator, Role
from core.policy import utcnow
from tests.console.builders import add_failed
from tests.console.conftest import ENTRY, Seams, accounts, markdown_values
from tests.console.markdown import images, links, plain

PAYLOAD = "[x](http://127.0.0.1:9/x) ![i](http://127.0.0.1:9/i.png)"
NASTY = [
    PAYLOAD,
    "<http://127.0.0.1:9/a> www.example.com evil@example.com",
    "[ref][1] `code` **bold** :red[red] :material/home: $x^2$ <img src=x> &#91;x&#93;",
    "a\nb\r\n\n# heading\n- item\n> quote",
    "``a`` ```b``` \\[x](y)\\",
]


@pytest.mark.parametrize("value", NASTY)
def test_text_and_code_render_any_value_literally(value: str) -> None:
    one_line = " ".join(value.split("\n")).replace("\r", "")
    for helper in (ui.text, ui.code):
        rendered = helper(value)
        assert links(rendered) == [] and images(rendered) == [], (helper, rendered)
        assert " ".join(plain(rendered).split()) == " ".join(one_line.split())


def test_the_payload_is_what_the_checker_catches() -> None:
    # The checker itself: unescaped, the payload is a link and a remote image
    assert images(PAYLOAD) == ["![i]("] and "[x](" in links(PAYLOAD)


@pytest.fixture
def world(console_env: Seams, password_hash: str) -> Iterator[dict[str, Any]]:
    """An owner, a failed delivery and a running bulk operation, each carrying the payload."""
    engine: Engine = create_engine(os.environ["CAPSULE_DATABASE_URL"])
    now = utcnow()
    with session_scope(make_session_factory(engine)) as s:
        owner = User(email="owner@example.com", name=PAYLOAD, created_at=now)
        s.add(owner)
        s.flush()
        delivery_id = add_failed(s, owner.id, failed_at=now - timedelta(minutes=3))
        s.get_one(Delivery, delivery_id).last_error = f"resend answered 422: {PAYLOAD}"
        s.add(
            BulkOperation(
                action="requeue",
                filter={"recipient_domain": "127.0.0.1:9/x)![i](http://127.0.0.1:9/i.png"},
                actor="olga",
                reason=PAYLOAD,
                expected_count=10,
                rate_per_second=5,
                state="running",
                created_at=now,
                updated_at=now,
            )
        )
        s.commit()
    table = accounts(password_hash)
    table["olga"]["name"] = PAYLOAD  # the operator's own display name, from the secrets file
    yield {"delivery_id": str(delivery_id), "accounts": table}
    engine.dispose()


def page(world: dict[str, Any], name: str | None = None) -> AppTest:
    at = AppTest.from_file(ENTRY, default_timeout=30)
    at.secrets["operators"] = world["accounts"]
    at.session_state["_operator"] = Operator("olga", Role.OPS, PAYLOAD)
    at.run()
    if name is not None:
        at.switch_page(f"views/{name}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def assert_literal(at: AppTest, *expected: str) -> None:
    """No Markdown on the page makes a link or an image; each expected text shows literally."""
    values = markdown_values(at)
    rendered = [v for v in values if links(v) or images(v)]
    assert rendered == [], rendered
    shown = "\n".join(plain(v) for v in values)
    for text in expected:
        assert text in shown, (text, shown)


@pytest.mark.parametrize("name", ["overview", "triage", "audit", "health", "bulk", "delivery"])
def test_the_operator_name_in_the_sidebar_on_every_page(world: dict[str, Any], name: str) -> None:
    at = page(world, name)
    assert PAYLOAD in plain(at.sidebar.markdown[0].value)
    assert_literal(at, PAYLOAD)


def test_delivery_detail_shows_owner_name_and_provider_error_as_text(
    world: dict[str, Any],
) -> None:
    at = page(world, "delivery")
    at.text_input(key="detail_query").input(world["delivery_id"]).run()
    assert at.subheader[0].value == f"Delivery {world['delivery_id']}"
    assert_literal(
        at,
        f"owner **{PAYLOAD}** (owner@example.com)",
        f"resend answered 422: {PAYLOAD}",
        "to future@example.com",
    )


def test_delivery_search_echoes_the_query_as_text(world: dict[str, Any]) -> None:
    at = page(world, "delivery")
    query = f"{PAYLOAD} nobody@example.com"
    at.text_input(key="detail_query").input(query).run()
    assert_literal(at, f"No delivery for {query}.")


def test_delivery_link_with_an_injected_id(world: dict[str, Any]) -> None:
    at = AppTest.from_file(ENTRY, default_timeout=30)
    at.secrets["operators"] = world["accounts"]
    at.session_state["_operator"] = Operator("olga", Role.OPS, PAYLOAD)
    at.query_params["id"] = f"{PAYLOAD}@example.com"
    at.run()
    at.switch_page("views/delivery.py").run()
    assert not at.exception
    assert_literal(
        at, f"{PAYLOAD}@example.com is not a delivery id; search for the delivery below."
    )


def test_bulk_progress_shows_the_reason_and_filter_as_text(world: dict[str, Any]) -> None:
    at = page(world, "bulk")
    assert_literal(at, f"— _{PAYLOAD}_", "recipient @127.0.0.1:9/x)![i](http://127.0.0.1:9/i.png")


def test_health_shows_a_broker_error_as_text(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import console.data

    error = f"ConnectionError: {PAYLOAD}"
    monkeypatch.setattr(
        console.data, "read_queue_depth", lambda: console.data.QueueDepth(None, None, error)
    )
    at = page(world, "health")
    assert_literal(at, error)


def test_a_flash_message_is_text(world: dict[str, Any]) -> None:
    at = AppTest.from_file(ENTRY, default_timeout=30)
    at.secrets["operators"] = world["accounts"]
    at.session_state["_operator"] = Operator("olga", Role.OPS, PAYLOAD)
    at.session_state[ui.FLASH_KEY] = [("warning", f"{uuid.uuid4()}: {PAYLOAD}")]
    at.run()
    at.switch_page("views/triage.py").run()
    assert_literal(at, PAYLOAD)
