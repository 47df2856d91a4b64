"""Each console page through AppTest: filters, actions behind their dialogs, bulk preview, dry run
and launch, against a seeded SQLite database."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import Engine, create_engine, select
from streamlit.testing.v1 import AppTest

from core.bootstrap import build_app
from core.bulk import ANY_SAFE_CLASS, run_operation
from core.config import Settings
from core.db import make_session_factory, session_scope
from core.failed_filter import FailedFilter
from core.models import AuditEvent, BulkOperation, Delivery
from core.operators import Operator, Role
from core.policy import utcnow
from core.queries import failed, overview
from tests.conftest import RecordingEnqueuer
from tests.console.conftest import Runner, Seams, markdown_values
from tests.console.markdown import plain

VIEWER = Operator("vera", Role.VIEWER, "Vera")
SUPPORT = Operator("sam", Role.SUPPORT, "Sam")
OPS = Operator("olga", Role.OPS, "Olga")


def failed_frame(engine: Engine, flt: FailedFilter | None = None) -> list[str]:
    with session_scope(make_session_factory(engine)) as s:
        return failed.failed_deliveries(s, flt or FailedFilter())["id"].tolist()


def status_of(engine: Engine, delivery_id: str) -> str:
    with session_scope(make_session_factory(engine)) as s:
        return str(s.scalar(select(Delivery.status).where(Delivery.id == uuid.UUID(delivery_id))))


def audit_for(engine: Engine, delivery_id: str) -> list[tuple[str, str, str | None]]:
    with session_scope(make_session_factory(engine)) as s:
        rows = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.delivery_id == uuid.UUID(delivery_id))
            .order_by(AuditEvent.id)
        )
        return [(e.type, e.actor, e.reason) for e in rows]


def texts(at: AppTest) -> str:
    """The Markdown-rendered text on the page, as the operator reads it."""
    return "\n".join(plain(str(p)) for p in markdown_values(at))


def select_rows(at: AppTest, *rows: int, table: int = 0) -> AppTest:
    key = at.dataframe[table].key
    assert key, "the table must have a key to be selectable"
    at.session_state[key] = {"selection": {"rows": list(rows), "columns": [], "cells": []}}
    return at.run()


def confirm(at: AppTest, reason: str, label_prefix: str) -> AppTest:
    at.text_area(key="action_reason").input(reason)
    submit = next(b for b in at.button if b.label.startswith(label_prefix))
    return submit.click().run()


# ---------------------------------------------------------------- overview


def test_overview_tiles_charts_and_stuck_rows(console: Runner, engine: Engine) -> None:
    at = console(VIEWER)
    assert at.title[0].value == "Overview"
    metrics = {m.label: m.value for m in at.metric}
    with session_scope(make_session_factory(engine)) as s:
        tiles = overview.tiles(s, now=utcnow(), grace_seconds=60)
    assert metrics["Scheduled"] == f"{tiles.scheduled:,}"
    assert metrics["Failed and open"] == f"{tiles.failed_open:,}"
    assert metrics["Stuck"] == f"{tiles.stuck:,}" and tiles.stuck > 0
    assert len(at.get("plotly_chart")) == 4
    stuck = at.dataframe[0].value
    assert len(stuck) == min(tiles.stuck, 50) and {"age", "status"} <= set(stuck.columns)

    # The window and the auto-refresh toggle change what is drawn, not whether it works
    at.segmented_control(key="overview_window").set_value("30 days").run()
    at.toggle(key="overview_auto").set_value(False).run()
    assert not at.exception
    assert "refreshing" not in at.caption[-1].value


# ---------------------------------------------------------------- triage


def test_triage_filters(console: Runner, engine: Engine) -> None:
    at = console(SUPPORT, page="triage")
    every = failed_frame(engine)
    assert at.metric[0].value == f"{len(every):,}"

    at.multiselect(key="triage_classes").set_value(["permanent"]).run()
    shown = at.dataframe[0].value
    assert set(shown["error_class"]) == {"permanent"}
    assert shown["id"].tolist() == failed_frame(engine, FailedFilter(error_classes=("permanent",)))

    owner = shown["owner_email"].iloc[0]
    at.text_input(key="triage_search").input(owner.split("@")[0] + "@").run()
    assert set(at.dataframe[0].value["owner_email"]) == {owner}

    at.text_input(key="triage_search").input("nobody-matches-this").run()
    assert "Nothing to triage" in texts(at)


def test_triage_requeue_with_reason(console: Runner, engine: Engine, console_env: Seams) -> None:
    # Given support selects the newest failed delivery
    at = console(SUPPORT, page="triage")
    target = at.dataframe[0].value["id"].iloc[0]
    select_rows(at, 0)
    assert "1 selected" in texts(at)

    # When they requeue it without a reason, then with one
    at.button(key="triage_requeue").click().run()
    assert "This will **send again now" in texts(at)
    at = confirm(at, "   ", "Requeue 1")
    assert "A reason is required." in texts(at)
    assert status_of(engine, target) == "failed"
    at = confirm(at, "resend incident is over", "Requeue 1")

    # Then it left the failed list, was dispatched, and the audit names the operator and reason
    assert not at.exception
    assert "Requeue: 1 delivery" in texts(at)
    assert status_of(engine, target) == "scheduled"
    assert target not in at.dataframe[0].value["id"].tolist()
    assert ("delivery.requeued", "sam", "resend incident is over") in audit_for(engine, target)
    assert [str(d) for d, _, _ in console_env.enqueuer.enqueued] == [target]


def test_triage_cancel_and_notify(console: Runner, engine: Engine) -> None:
    at = console(SUPPORT, page="triage")
    frame = at.dataframe[0].value
    first, second = frame["id"].iloc[0], frame["id"].iloc[1]

    select_rows(at, 1)
    at.button(key="triage_notify").click().run()
    at = confirm(at, "owner phoned support", "Notify owner 1")
    assert "already notified" in texts(at)  # the demo failures were notified when they failed
    assert ("notification.already_requested", "sam", "owner phoned support") in audit_for(
        engine, second
    )

    select_rows(at, 0)
    at.button(key="triage_cancel").click().run()
    at = confirm(at, "owner asked to stop it", "Cancel 1")
    assert status_of(engine, first) == "canceled"
    assert ("delivery.canceled", "sam", "owner asked to stop it") in audit_for(engine, first)


def test_requeue_dialog_warns_when_the_letter_may_already_have_arrived(console: Runner) -> None:
    at = console(SUPPORT, page="triage")
    at.multiselect(key="triage_classes").set_value(["possibly_sent"]).run()
    select_rows(at, 0)
    at.button(key="triage_requeue").click().run()
    assert "may already have reached the recipient (possibly_sent)" in texts(at)

    at = console(SUPPORT, page="triage")
    at.multiselect(key="triage_classes").set_value(["permanent"]).run()
    select_rows(at, 0)
    at.button(key="triage_requeue").click().run()
    assert "This will **send again now" in texts(at)
    assert "may already have reached" not in texts(at)


def test_triage_dialog_back_changes_nothing(console: Runner, engine: Engine) -> None:
    at = console(SUPPORT, page="triage")
    target = at.dataframe[0].value["id"].iloc[0]
    select_rows(at, 0)
    at.button(key="triage_requeue").click().run()
    at.button(key="action_back").click().run()
    assert "This will" not in texts(at)
    assert status_of(engine, target) == "failed"


def test_triage_open_detail(console: Runner) -> None:
    at = console(SUPPORT, page="triage")
    target = at.dataframe[0].value["id"].iloc[0]
    select_rows(at, 0)
    at.button(key="triage_open").click().run()
    assert at.title[0].value == "Delivery detail"
    assert at.subheader[0].value == f"Delivery {target}"


# ---------------------------------------------------------------- delivery detail


def test_delivery_detail_by_id_and_by_email(console: Runner, engine: Engine) -> None:
    target = failed_frame(engine)[0]
    at = console(SUPPORT, page="delivery")
    at.text_input(key="detail_query").input(target).run()
    assert at.subheader[0].value == f"Delivery {target}"
    assert {"Attempts", "Audit trail", "Owner notices"} <= {s.value for s in at.subheader}
    attempts = at.dataframe[0].value
    assert {"provider", "outcome", "status_code", "duration_ms", "task_id"} <= set(attempts.columns)
    assert "delivery.failed" in at.dataframe[1].value["type"].tolist()
    assert {"Requeue", "Cancel", "Notify owner"} <= {b.label for b in at.button}
    # The letter is never shown: the demo letters all start "Dear future me"
    assert "Dear future me" not in texts(at)

    with session_scope(make_session_factory(engine)) as s:
        owner = s.scalar(select(Delivery.recipient_email).where(Delivery.id == uuid.UUID(target)))
    at.text_input(key="detail_query").input(str(owner)).run()
    select_rows(at, 0)
    assert at.subheader[0].value.startswith("Delivery ")

    at.text_input(key="detail_query").input("not-an-id").run()
    assert "neither a delivery id nor an email" in at.error[0].value


def test_delivery_detail_from_a_link(console: Runner, engine: Engine) -> None:
    target = failed_frame(engine)[0]
    at = console(VIEWER, page="delivery")
    at.query_params["id"] = target
    at.run()
    assert at.subheader[0].value == f"Delivery {target}"
    # what the operator types next is not overwritten by the link
    at.text_input(key="detail_query").input("nobody@nowhere.test").run()
    assert "No delivery for nobody@nowhere.test." in texts(at)


def test_viewer_detail_has_no_actions(console: Runner, engine: Engine) -> None:
    at = console(VIEWER, page="delivery")
    at.text_input(key="detail_query").input(failed_frame(engine)[0]).run()
    assert not {"Requeue", "Cancel", "Notify owner"} & {b.label for b in at.button}


def test_support_redirects_a_failed_letter_to_a_corrected_address(
    console: Runner, engine: Engine
) -> None:
    target = failed_frame(engine)[0]
    at = console(SUPPORT, page="delivery")
    at.text_input(key="detail_query").input(target).run()
    with session_scope(make_session_factory(engine)) as s:
        old_address = s.scalar(
            select(Delivery.recipient_email).where(Delivery.id == uuid.UUID(target))
        )

    # The address it could not reach is refused on the page; nothing changes
    at.text_input(key="redirect_address").input(str(old_address))
    at.text_input(key="redirect_reason").input("owner wrote to support")
    at = next(b for b in at.button if b.label == "Send to this address").click().run()
    assert any("the address it could not reach" in e.value for e in at.error)
    assert status_of(engine, target) == "failed"

    at.text_input(key="redirect_address").input("fixed@example.com")
    at = next(b for b in at.button if b.label == "Send to this address").click().run()
    with session_scope(make_session_factory(engine)) as s:
        new = s.scalars(
            select(Delivery).where(Delivery.recipient_email == "fixed@example.com")
        ).one()
    assert status_of(engine, target) == "canceled" and new.status == "scheduled"
    # The page opens the new delivery and says what happened
    assert at.subheader[0].value == f"Delivery {new.id}"
    assert f"Redirected: delivery {new.id}" in plain(at.success[0].value)
    assert audit_for(engine, target)[-1] == (
        "delivery.redirected",
        SUPPORT.identity,
        "owner wrote to support",
    )
    # A scheduled delivery offers no redirect
    assert "Send to this address" not in {b.label for b in at.button}


def test_a_viewer_is_not_offered_the_redirect(console: Runner, engine: Engine) -> None:
    at = console(VIEWER, page="delivery")
    at.text_input(key="detail_query").input(failed_frame(engine)[0]).run()
    assert "Send to this address" not in {b.label for b in at.button}
    assert not [t for t in at.text_input if t.key == "redirect_address"]


# ---------------------------------------------------------------- audit log


def test_audit_log_filters_and_pages(console: Runner) -> None:
    at = console(VIEWER, page="audit")
    first_page = at.dataframe[0].value
    assert len(first_page) == 50
    assert "Events 1–50" in texts(at)
    at.button(key="audit_older").click().run()
    second_page = at.dataframe[0].value
    assert "Events 51–100" in texts(at)
    assert not set(first_page["id"]) & set(second_page["id"])
    at.button(key="audit_newer").click().run()
    assert at.dataframe[0].value["id"].tolist() == first_page["id"].tolist()

    at.multiselect(key="audit_types").set_value(["delivery.failed"]).run()
    assert set(at.dataframe[0].value["type"]) == {"delivery.failed"}
    assert "Events 1–" in texts(at)
    at.text_input(key="audit_actor").input("nobody").run()
    assert "No audit event matches." in texts(at)
    at.text_input(key="audit_delivery").input("zzz").run()
    assert "not a valid id" in at.error[0].value


# ---------------------------------------------------------------- health


def test_health_page(console: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    at = console(VIEWER, page="health")
    page = texts(at)
    assert "3 pending · 7 scheduled" in page
    assert "Backstop" in page and "never ran" in page  # the dispatcher never ran in the demo
    assert len(at.dataframe) >= 1  # the demo's backstop runs

    import console.data

    def dead() -> console.data.QueueDepth:
        return console.data.QueueDepth(None, None, "ConnectionError: refused")

    monkeypatch.setattr(console.data, "read_queue_depth", dead)
    at.toggle(key="health_auto").set_value(False)
    console.data.health.clear()
    at.run()
    assert ":red-badge[unreachable]" in texts(at)


# ---------------------------------------------------------------- bulk


def test_bulk_is_for_ops_only(console: Runner) -> None:
    at = console(SUPPORT)
    with pytest.raises(ValueError):
        at.switch_page("views/bulk.py")


def test_bulk_preview_dry_run_launch_and_progress(
    console: Runner, engine: Engine, console_env: Seams
) -> None:
    # Given ops filters the failed deliveries to one error class
    at = console(OPS, page="bulk")
    at.multiselect(key="bulk_classes").set_value(["transient"]).run()
    expected = len(failed_frame(engine, FailedFilter(error_classes=("transient",))))
    assert expected > 0
    assert at.metric[0].value == f"{expected:,}"
    sample = at.dataframe[0].value
    assert set(sample["error_class"]) == {"transient"} and len(sample) == min(20, expected)
    assert "Run the dry run" in texts(at)

    # When they dry-run it, nothing changes and the consequences show
    at.number_input(key="bulk_rate").set_value(50.0).run()
    at.button(key="bulk_dry_run").click().run()
    dry = {m.label: m.value for m in at.metric}
    assert dry["Would requeue"] == f"{expected:,}"
    assert "Dry run: nothing was changed" in texts(at)
    assert len(failed_frame(engine, FailedFilter(error_classes=("transient",)))) == expected

    # ... a wrong count is refused
    at.text_area(key="bulk_reason").input("postmark 429 storm is over")
    at.text_input(key="bulk_confirm").input(str(expected + 1))
    next(b for b in at.button if b.label.startswith("Requeue ")).click().run()
    assert f"Type the number {expected} exactly" in texts(at)

    # ... and the right count launches it in the background
    at.text_input(key="bulk_confirm").input(str(expected))
    next(b for b in at.button if b.label.startswith("Requeue ")).click().run()
    assert not at.exception
    assert f"started: {expected:,} deliveries" in texts(at)
    assert len(console_env.bulk_runs) == 1
    op_id = console_env.bulk_runs[0]
    assert f"#{op_id} requeue" in texts(at)  # the progress panel
    assert at.get("progress")

    # Then once the runner has worked through it, the history shows it done
    settings = Settings.from_env()
    runner_engine = create_engine(settings.resolved_database_url)
    app = build_app(settings, RecordingEnqueuer(), engine=runner_engine)
    clock = [utcnow()]

    def sleep(seconds: float) -> None:
        clock[0] += timedelta(seconds=seconds)

    result = run_operation(app, op_id, clock=lambda: clock[0], sleep=sleep)
    runner_engine.dispose()
    assert (result.state, result.done) == ("done", expected)
    at.run()
    history = at.dataframe[-1].value
    assert history[["id", "state", "done"]].iloc[0].tolist() == [op_id, "done", expected]
    with session_scope(make_session_factory(engine)) as s:
        op = s.get(BulkOperation, op_id)
        assert op is not None and (op.actor, op.reason) == ("olga", "postmark 429 storm is over")


def test_bulk_abort_from_the_page(console: Runner, engine: Engine, console_env: Seams) -> None:
    at = console(OPS, page="bulk")
    # "any class": every class safe to send again (ambiguous, possibly_sent, decryption left out)
    count = len(failed_frame(engine, FailedFilter(error_classes=ANY_SAFE_CLASS)))
    at.button(key="bulk_dry_run").click().run()
    at.text_area(key="bulk_reason").input("try everything")
    at.text_input(key="bulk_confirm").input(str(count))
    next(b for b in at.button if b.label.startswith("Requeue ")).click().run()
    op_id = console_env.bulk_runs[0]
    at.button(key=f"abort_{op_id}").click().run()
    assert f"Bulk operation #{op_id}: aborted." in texts(at)
    with session_scope(make_session_factory(engine)) as s:
        assert s.scalar(select(BulkOperation.state).where(BulkOperation.id == op_id)) == "aborted"
