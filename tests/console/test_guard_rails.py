"""Console: letters waiting for a missing key on the health page; the bulk page's guard rails
(risky classes left out of "any class" unless chosen, with the single-row dialog's warning;
the row cap; one active operation per overlapping filter)."""

from __future__ import annotations

import pytest
import streamlit as st
from sqlalchemy import Engine, select, update

from core import bulk, failed_filter
from core.bootstrap import build_app
from core.bulk import ANY_SAFE_CLASS
from core.config import Settings
from core.db import make_session_factory, session_scope
from core.failed_filter import FailedFilter
from core.models import Delivery, ErrorClass, Letter, Status
from core.policy import utcnow
from tests.conftest import RecordingEnqueuer
from tests.console.conftest import Runner
from tests.console.test_pages import OPS, VIEWER, texts


def test_health_page_names_the_missing_keys_and_how_many_letters_wait(
    console: Runner, engine: Engine
) -> None:
    # Given two scheduled letters a worker could not open: their key id is not in the keyring
    with session_scope(make_session_factory(engine)) as s:
        ids = s.scalars(
            select(Delivery.letter_id).where(Delivery.status == Status.SCHEDULED).limit(2)
        ).all()
        assert len(ids) == 2
        s.execute(update(Letter).where(Letter.id.in_(ids)).values(key_id="k-lost"))
        s.execute(
            update(Delivery)
            .where(Delivery.letter_id.in_(ids))
            .values(error_class=ErrorClass.MISSING_KEY, next_attempt_at=utcnow())
        )
        s.commit()

    at = console(VIEWER, page="health")

    assert "2 letters wait for encryption keys missing from the keyring" in texts(at)
    table = next(d.value for d in at.dataframe if "key id" in d.value.columns)
    assert table.values.tolist() == [["k-lost", 2]]


# ---------------------------------------------------------------- bulk guard rails


def _count(engine: Engine, classes: tuple[str, ...]) -> int:
    with session_scope(make_session_factory(engine)) as s:
        return failed_filter.failed_count(s, FailedFilter(error_classes=classes))


def test_bulk_any_class_leaves_out_the_risky_classes_and_naming_one_shows_the_warning(
    console: Runner, engine: Engine
) -> None:
    risky = _count(engine, ("ambiguous", "possibly_sent"))
    assert risky > 0, "the demo data should hold such failures"

    # "Any class": the risky ones are left out, and the page says so
    at = console(OPS, page="bulk")
    assert at.metric[0].value == f"{_count(engine, ANY_SAFE_CLASS):,}"
    assert "“Any class” leaves out" in texts(at)
    at.button(key="bulk_dry_run").click().run()
    assert "may already have reached the recipient" not in texts(at)

    # Naming them includes them, with the single-row dialog's warning at the confirm step
    at.multiselect(key="bulk_classes").set_value(["ambiguous", "possibly_sent"]).run()
    assert at.metric[0].value == f"{risky:,}"
    at.button(key="bulk_dry_run").click().run()
    [warning] = [w.value for w in at.warning]
    assert warning.startswith(f"{risky} of these may already have reached the recipient")
    assert "check the provider's log before sending again" in warning


def test_bulk_page_refuses_a_filter_over_the_cap_and_one_overlapping_an_active_operation(
    console: Runner, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over the cap: an error, and no dry run or launch offered
    monkeypatch.setenv("CAPSULE_BULK_MAX_ROWS", "1")
    at = console(OPS, page="bulk")
    assert "one bulk operation may touch at most 1 (CAPSULE_BULK_MAX_ROWS)" in texts(at)
    assert not [b for b in at.button if b.key == "bulk_dry_run"]

    # An active operation on the transient failures blocks an overlapping filter, by name
    monkeypatch.delenv("CAPSULE_BULK_MAX_ROWS")
    st.cache_resource.clear()  # the console's settings are read once per process
    st.cache_data.clear()
    settings = Settings.from_env()
    app = build_app(settings, RecordingEnqueuer(), engine=engine)
    transient = _count(engine, ("transient",))
    launched = bulk.launch(
        app,
        OPS,
        FailedFilter(error_classes=("transient",)),
        reason="resend outage over",
        confirm_count=transient,
        rate_per_second=5,
        now=utcnow(),
        enqueue=lambda op: f"task-{op}",
    )
    at = console(OPS, page="bulk")
    assert f"bulk operation #{launched.operation_id} (pending, by olga" in texts(at)
    assert not [b for b in at.button if b.key == "bulk_dry_run"]
    # ... a disjoint filter is offered as usual
    at.multiselect(key="bulk_classes").set_value(["permanent"]).run()
    assert [b for b in at.button if b.key == "bulk_dry_run"]
