"""A bulk operation that ends before the page looks again is still reported as done.

The browser test once waited 90 s for "Bulk operation #1 done" and never saw it: the consumer
had finished the ten rows in 0.3 s, before the page's run after the launch, and the page only
announced operations it had seen running. Here the runner finishes inside the launch itself.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import create_engine

import console.data as console_data
from core.bootstrap import build_app
from core.bulk import run_operation
from core.config import Settings
from core.policy import utcnow
from tests.conftest import RecordingEnqueuer
from tests.console.conftest import Runner, Seams
from tests.console.test_pages import OPS, texts


def test_an_operation_finished_before_the_next_run_is_announced_done(
    console: Runner, console_env: Seams, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker so quick that the operation is done before the page runs again
    def run_at_once(operation_id: int) -> str:
        settings = Settings.from_env()
        engine = create_engine(settings.resolved_database_url)
        app = build_app(settings, RecordingEnqueuer(), engine=engine)
        clock = [utcnow()]

        def sleep(seconds: float) -> None:
            clock[0] += timedelta(seconds=seconds)

        try:
            assert run_operation(app, operation_id, clock=lambda: clock[0], sleep=sleep).state == (
                "done"
            )
        finally:
            engine.dispose()
        console_env.bulk_runs.append(operation_id)
        return f"bulk-task-{operation_id}"

    monkeypatch.setattr(console_data, "enqueue_bulk", run_at_once)
    at = console(OPS, page="bulk")
    at.multiselect(key="bulk_classes").set_value(["transient"]).run()
    at.button(key="bulk_dry_run").click().run()
    count = int(next(b for b in at.button if b.label.startswith("Requeue ")).label.split()[1])
    at.text_area(key="bulk_reason").input("quick")
    at.text_input(key="bulk_confirm").input(str(count))

    # When ops launches it
    next(b for b in at.button if b.label.startswith("Requeue ")).click().run()

    # Then the page says it started and that it is done
    assert not at.exception
    [op_id] = console_env.bulk_runs
    shown = texts(at)
    assert f"Bulk operation #{op_id} started" in shown
    assert f"Bulk operation #{op_id} done: {count:,} requeued" in shown
