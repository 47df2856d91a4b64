"""Scenarios through the `capsule` command line and core on a real database: a time written with
an explicit UTC offset, and the health check's stuck-rows branch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, update

from core.bootstrap import App
from core.db import session_scope
from core.deliveries import create_user, schedule_delivery
from core.models import Delivery, Status
from core.worker import run_delivery
from tasks.cli.deliveries import delivery_status

BIN = Path(sys.executable).parent
PLUS_TWO = timezone(timedelta(hours=2))
# 09:00 at +02:00 is 07:00 UTC; 2031-06-01 is a Sunday in summer time in most of Europe.
LOCAL_NINE = datetime(2031, 6, 1, 9, 0, tzinfo=PLUS_TWO)
UTC_SEVEN = datetime(2031, 6, 1, 7, 0, tzinfo=UTC)


class Cli:
    """`capsule` as a real process on the embedded default under `var`."""

    def __init__(self, var: Path, **env: str) -> None:
        self.var = var
        self.env = (
            {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
            | {"CAPSULE_VAR_DIR": str(var)}
            | env
        )

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "capsule"), *args], env=self.env, capture_output=True, text=True, timeout=60
        )

    def ok(self, *args: str) -> str:
        done = self(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def schedule(self, at: str) -> str:
        return self.ok(
            "schedule",
            *("--user", "ada@example.com", "--to", "me@example.com", "--at", at),
            *("--subject", "Hi", "--body", "Dear future me"),
        ).strip()

    def rows(self) -> list[Delivery]:
        engine = create_engine(f"sqlite:///{self.var / 'capsule.db'}")
        try:
            with engine.connect() as conn:
                return list(conn.execute(select(Delivery.__table__)).all())  # type: ignore[arg-type]
        finally:
            engine.dispose()

    def execute(self, statement: object) -> None:
        engine = create_engine(f"sqlite:///{self.var / 'capsule.db'}")
        try:
            with engine.begin() as conn:
                conn.execute(statement)  # type: ignore[call-overload]
        finally:
            engine.dispose()


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    cli = Cli(tmp_path / "var", CAPSULE_HEALTH_MAX_STUCK="1")
    cli.ok("keys", "generate", "--if-missing")
    cli.ok("db", "upgrade")
    cli.ok("user", "add", "ada@example.com", "--name", "Ada", "--credits", "5")
    return cli


# ---------------------------------------------------------------- an explicit offset


def test_cli_at_with_an_offset_is_stored_and_shown_as_the_same_utc_instant(cli: Cli) -> None:
    # When a letter is scheduled for 09:00 at +02:00 through the command line
    delivery_id = cli.schedule("2031-06-01T09:00+02:00")

    # Then the row holds 07:00 UTC (SQLite keeps naive UTC text: "07:00", never "09:00")
    [row] = cli.rows()
    assert str(row.deliver_at).startswith("2031-06-01 07:00:00")
    assert row.next_attempt_at == row.deliver_at

    # And `capsule status` shows that instant back, in UTC
    status = json.loads(cli.ok("status", delivery_id))
    assert datetime.fromisoformat(status["deliver_at"]) == UTC_SEVEN
    assert status["deliver_at"] == "2031-06-01T07:00:00+00:00"

    # And a `Z` time and the same instant at -05:00 are the same moment
    cli.schedule("2031-06-01T07:00Z")
    cli.schedule("2031-06-01T02:00-05:00")
    assert {str(r.deliver_at) for r in cli.rows()} == {str(row.deliver_at)}


def test_core_schedule_with_an_offset_stores_utc_and_is_due_at_that_instant(app: App) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    with session_scope(app.session_factory) as session:
        user_id = create_user(session, "ada@example.com", "Ada", now, 2).id
        session.commit()

    # When core is given 09:00 at +02:00
    scheduled = schedule_delivery(
        app,
        user_id=user_id,
        recipient="me@example.com",
        subject="Hi",
        body="Dear future me",
        deliver_at=LOCAL_NINE,
        now=now,
        actor="ada@example.com",
    )

    # Then the row reads back as 07:00 UTC, timezone-aware, on either database
    with session_scope(app.session_factory) as session:
        row = session.get(Delivery, scheduled.delivery_id)
        assert row is not None
        assert row.deliver_at == UTC_SEVEN and row.deliver_at.utcoffset() == timedelta(0)
        assert row.next_attempt_at == UTC_SEVEN
    shown = delivery_status(app, scheduled.delivery_id)["deliver_at"]
    assert shown == UTC_SEVEN and shown.isoformat() == "2031-06-01T07:00:00+00:00"

    # And it is due at 07:00 UTC: not a second before, and not two hours late
    before = UTC_SEVEN - timedelta(seconds=1)
    assert run_delivery(app, scheduled.delivery_id, "early", clock=lambda: before) is None
    outbox = Path(app.settings.var_dir) / "outbox"
    assert not list(outbox.glob("*.eml"))
    assert run_delivery(app, scheduled.delivery_id, "on-time", clock=lambda: UTC_SEVEN) == "sent"
    assert len(list(outbox.glob("*.eml"))) == 1


# ---------------------------------------------------------------- health: stuck rows


def test_health_fails_and_names_the_count_when_too_many_rows_are_stuck(cli: Cli) -> None:
    # Given three letters and a fresh backstop run (healthy), with a limit of one stuck row
    ids = [cli.schedule("+3d") for _ in range(3)]
    cli.ok("reconcile")
    assert json.loads(cli.ok("health"))["ok"] is True
    table = Delivery.__table__
    long_ago = datetime.now(UTC) - timedelta(hours=1)

    # When one due row is left unclaimed long past the grace period: at the limit, still healthy
    cli.execute(
        update(table).where(table.c.id == uuid.UUID(ids[0])).values(next_attempt_at=long_ago)
    )
    at_limit = cli("health")
    report = json.loads(at_limit.stdout)
    assert at_limit.returncode == 0, at_limit.stdout
    assert (report["stuck_unclaimed"], report["stuck_processing"]) == (1, 0)

    # When a processing row's lease has also run out: over the limit
    cli.execute(
        update(table)
        .where(table.c.id == uuid.UUID(ids[1]))
        .values(status=Status.PROCESSING, lease_until=long_ago)
    )
    over = cli("health")

    # Then `capsule health` exits non-zero and names the count
    report = json.loads(over.stdout)
    assert over.returncode == 1, over.stdout
    assert report["ok"] is False
    assert (report["stuck_unclaimed"], report["stuck_processing"]) == (1, 1)
    assert report["problems"] == ["2 stuck deliveries (limit 1)"]


def test_offsets_either_side_of_a_dst_change_are_exact_and_a_zone_name_is_refused(cli: Cli) -> None:
    # Times are taken with an offset, not a zone: the same Berlin wall-clock hour before and
    # after the spring change (30 March 2031) is written with the offset in force that day
    before = cli.schedule("2031-03-29T09:00+01:00")
    after = cli.schedule("2031-03-30T09:00+02:00")
    shown = {i: json.loads(cli.ok("status", i))["deliver_at"] for i in (before, after)}
    assert shown == {before: "2031-03-29T08:00:00+00:00", after: "2031-03-30T07:00:00+00:00"}

    # A zone name cannot be read: one line, exit 2, nothing written
    refused = cli(
        "schedule",
        *("--user", "ada@example.com", "--to", "me@example.com"),
        *("--at", "2031-03-30T09:00[Europe/Berlin]", "--subject", "Hi", "--body", "b"),
    )
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "cannot read" in refused.stderr
    assert len(cli.rows()) == 2
