"""Triage as support shares and works it: the filter in the URL, pages through the whole set,
the whole set as CSV, a search that says when it stopped, links to the detail page, the
reader's time zone, and half-open circuits on the health page, through AppTest on a seeded
SQLite database."""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import datetime

import pytest
from sqlalchemy import Engine, update
from streamlit.testing.v1 import AppTest

from core import failed_filter
from core.db import make_session_factory, session_scope
from core.failed_filter import FailedCursor, FailedFilter
from core.models import Delivery
from core.operators import Operator, Role
from core.queries import failed as failed_queries
from tests.console.conftest import ENTRY, Runner, Seams, accounts, markdown_values
from tests.console.markdown import plain

SUPPORT = Operator("sam", Role.SUPPORT, "Sam")


def failed(
    engine: Engine, flt: FailedFilter, *, limit: int = 500, after: FailedCursor | None = None
) -> list[str]:
    with session_scope(make_session_factory(engine)) as s:
        return failed_queries.failed_deliveries(s, flt, limit=limit, after=after)["id"].tolist()


def count(engine: Engine, flt: FailedFilter) -> int:
    with session_scope(make_session_factory(engine)) as s:
        return failed_filter.failed_count(s, flt)


def texts(at: AppTest) -> str:
    return "\n".join(plain(str(p)) for p in markdown_values(at))


def open_link(
    password_hash: str, query: dict[str, str | list[str]], page: str = "triage"
) -> AppTest:
    """A signed-in support operator opening a pasted link: the page's URL with its query."""
    at = AppTest.from_file(ENTRY, default_timeout=30)
    at.secrets["operators"] = accounts(password_hash)
    at.session_state["_operator"] = SUPPORT
    at.run()
    at.switch_page(f"views/{page}.py")
    for name, value in query.items():
        at.query_params[name] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_shared_link_opens_the_same_rows(
    console_env: Seams, engine: Engine, password_hash: str
) -> None:
    flt = FailedFilter(error_classes=("transient",), provider="resend")
    expected = failed(engine, flt, limit=50)
    assert expected, "the demo data has transient Resend failures"
    at = open_link(password_hash, {"error_class": "transient", "provider": "resend"})
    assert at.multiselect(key="triage_classes").value == ["transient"]
    assert at.selectbox(key="triage_provider").value == "resend"
    assert at.metric[0].value == f"{count(engine, flt):,}"
    assert at.dataframe[0].value["id"].tolist() == expected
    assert not at.warning


def test_changing_a_filter_updates_the_url(console: Runner) -> None:
    at = console(SUPPORT, page="triage")
    at.multiselect(key="triage_classes").set_value(["permanent", "transient"]).run()
    at.text_input(key="triage_search").input("gmail").run()
    at.selectbox(key="triage_search_in").set_value("recipient").run()
    assert at.query_params["error_class"] == ["permanent", "transient"]
    assert (at.query_params["search"], at.query_params["search_in"]) == ("gmail", "recipient")
    at.multiselect(key="triage_classes").set_value([]).run()
    assert "error_class" not in at.query_params


def test_a_bad_link_says_what_was_wrong_and_uses_defaults(
    console_env: Seams, engine: Engine, password_hash: str
) -> None:
    at = open_link(
        password_hash,
        {
            "error_class": ["transient", "<b>nope</b>"],
            "provider": "carrier-pigeon",
            "since": "yesterday",
            "search_in": "subject",
        },
    )
    warning = plain(at.warning[0].value)
    for bad in ("'<b>nope</b>'", "'carrier-pigeon'", "'yesterday'", "'subject'"):
        assert bad in warning
    assert "<b>" not in at.warning[0].value  # shown as text, not markup
    # the good value is kept, every bad one left at its default
    assert at.multiselect(key="triage_classes").value == ["transient"]
    assert at.selectbox(key="triage_provider").value == "any"
    assert at.metric[0].value == f"{count(engine, FailedFilter(error_classes=('transient',))):,}"
    assert at.query_params["error_class"] == "transient"  # the URL now holds what is shown
    assert "provider" not in at.query_params


def test_pages_through_the_whole_set(console: Runner, engine: Engine) -> None:
    total = count(engine, FailedFilter())
    assert total > 25
    at = console(SUPPORT, page="triage")
    at.selectbox(key="triage_page_size").set_value(25).run()
    first = failed(engine, FailedFilter(), limit=25)
    assert at.dataframe[0].value["id"].tolist() == first
    assert f"Rows 1–25 of {total:,}" in texts(at)
    assert at.button(key="triage_newer").disabled

    at.button(key="triage_older").click().run()
    second = failed(engine, FailedFilter(), limit=25, after=FailedCursor(*_last(engine, first[-1])))
    assert at.dataframe[0].value["id"].tolist() == second
    assert f"Rows 26–{25 + len(second)} of {total:,}" in texts(at)

    at.button(key="triage_newer").click().run()
    assert at.dataframe[0].value["id"].tolist() == first


def _last(engine: Engine, delivery_id: str) -> tuple[datetime, uuid.UUID]:
    with session_scope(make_session_factory(engine)) as s:
        row = s.get(Delivery, uuid.UUID(delivery_id))
        assert row is not None and row.failed_at is not None
        return row.failed_at, row.id


def test_ids_link_to_the_detail_page(console: Runner) -> None:
    at = console(SUPPORT, page="triage")
    table = at.dataframe[0].value
    assert (table["link"] == "delivery?id=" + table["id"]).all()


def test_export_writes_the_whole_filtered_set(console_env: Seams, engine: Engine) -> None:
    import console.data

    flt = FailedFilter(error_classes=("transient", "permanent"))
    expected = failed(engine, flt)
    # an address that would start a formula in a spreadsheet
    with session_scope(make_session_factory(engine)) as s:
        s.execute(
            update(Delivery)
            .where(Delivery.id == uuid.UUID(expected[0]))
            .values(recipient_email="=HYPERLINK(1)@x.test")
        )
        s.commit()
    console.data.EXPORT_CHUNK = 7  # several chunks, the last one partial
    try:
        build = console.data.failed_csv(flt)
        rows = list(csv.reader(io.StringIO(build().decode("utf-8"), newline="")))
    finally:
        console.data.EXPORT_CHUNK = 1000
    assert rows[0] == console.data.CSV_COLUMNS
    assert [r[0] for r in rows[1:]] == expected  # every row, not just one page
    assert len(expected) > 7 and len(expected) % 7
    assert rows[1][rows[0].index("recipient_email")] == "'=HYPERLINK(1)@x.test"


def test_export_button_offers_the_whole_count(console: Runner, engine: Engine) -> None:
    at = console(SUPPORT, page="triage")
    total = count(engine, FailedFilter())
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == [f"Export all {total:,} as CSV"]


def test_search_says_when_it_stopped_early(
    console: Runner, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import console.data as console_data

    monkeypatch.setattr(console_data, "SEARCH_LIMIT", 10)
    at = console(SUPPORT, page="triage")
    at.text_input(key="triage_search").input("@").run()
    assert "The search stopped early: it read the newest 10 failed deliveries" in texts(at)
    assert at.metric[0].value == "10"
    at.text_input(key="triage_search").input("").run()
    assert "stopped early" not in texts(at)


def test_open_detail_puts_the_id_in_the_url(console: Runner) -> None:
    at = console(SUPPORT, page="triage")
    target = at.dataframe[0].value["id"].iloc[0]
    key = at.dataframe[0].key
    at.session_state[key] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    at.button(key="triage_open").click().run()
    assert at.subheader[0].value == f"Delivery {target}"
    assert at.query_params["id"] == target


def test_detail_url_follows_the_open_delivery_and_refuses_a_bad_id(
    console_env: Seams, engine: Engine, password_hash: str
) -> None:
    target = failed(engine, FailedFilter(), limit=2)
    at = open_link(password_hash, {"id": "../../etc/passwd"}, page="delivery")
    assert "is not a delivery id" in plain(at.warning[0].value)
    assert at.text_input(key="detail_query").value == ""
    at.text_input(key="detail_query").input(target[1]).run()
    assert at.query_params["id"] == target[1]


def test_times_in_the_readers_zone_when_asked(console: Runner) -> None:
    at = console(SUPPORT, page="health")
    assert at.toggle(key="show_local_time").disabled  # AppTest sends no zone
    at.context["timezone"] = "Asia/Kolkata"
    at.run()
    toggle = at.toggle(key="show_local_time")
    assert toggle.label == "Times in my zone (Asia/Kolkata)" and not toggle.disabled
    checked = [c.value for c in at.caption if c.value.startswith("Checked ")]
    assert checked and checked[0].endswith(" UTC")  # UTC until the reader turns it on
    columns = at.dataframe[-1].proto.columns
    assert "Started (UTC)" in columns
    toggle.set_value(True).run()
    checked = [c.value for c in at.caption if c.value.startswith("Checked ")]
    assert checked and checked[0].endswith(" IST")
    columns = at.dataframe[-1].proto.columns
    assert "Started (Asia/Kolkata)" in columns and '"timezone": "Asia/Kolkata"' in columns


def test_overview_charts_follow_the_readers_zone(console: Runner) -> None:
    at = console(SUPPORT)
    at.context["timezone"] = "Asia/Kolkata"
    at.run()
    assert any("chart times in UTC" in c.value for c in at.caption)
    at.toggle(key="show_local_time").set_value(True).run()
    assert any("chart times in Asia/Kolkata" in c.value for c in at.caption)
    specs = " ".join(str(c.proto.spec) for c in at.get("plotly_chart"))
    # hourly UTC buckets, drawn at Kolkata's wall-clock time (UTC+05:30)
    assert re.search(r'"x":\["\d{4}-\d\d-\d\dT\d\d:30:00', specs)


def test_health_shows_half_open_circuits(console: Runner, engine: Engine) -> None:
    from datetime import timedelta

    from core.models import ProviderState
    from core.policy import utcnow

    now = utcnow()
    with session_scope(make_session_factory(engine)) as s:
        s.add_all(
            [
                ProviderState(
                    provider="resend",
                    consecutive_failures=5,
                    opened_until=now - timedelta(seconds=5),
                    updated_at=now,
                ),
                ProviderState(
                    provider="postmark",
                    consecutive_failures=5,
                    opened_until=now + timedelta(minutes=5),
                    updated_at=now,
                ),
            ]
        )
        s.commit()
    at = console(SUPPORT, page="health")
    circuits = next(d.value for d in at.dataframe if "circuit" in d.value.columns)
    shown = dict(zip(circuits["provider"], circuits["circuit"], strict=True))
    assert shown == {"postmark": "🔴 open", "resend": "🟡 half-open (one trial call may run)"}
