"""The ops CLI on PostgreSQL + Redis: `capsule failed list` in every format, and
`capsule bulk requeue` end to end on a real consumer: a dry run, progress, an abort with Ctrl-C,
a resume; every refusal one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, update

from benchmarks.fakes.provider_server import FakeProviderServer
from benchmarks.harness import BIN, ROOT, Consumer, System, wait_for
from core import bulk
from core.bootstrap import App, build_app
from core.config import Settings
from core.db import session_scope
from core.deliveries import create_user, schedule_delivery
from core.failed_filter import FAILED_COLUMNS
from core.models import AuditEvent, BulkOperation, Delivery, DeliveryAttempt, Status
from core.policy import utcnow
from tasks.delivery import HueyEnqueuer
from tasks.queue import make_huey
from tests.conftest import KEY_ENTRY, truncate_all
from tests.integration.test_consumers import provider_env


@dataclass
class Ops:
    system: System
    app: App
    server: FakeProviderServer
    user_id: int = 0
    consumers: list[Consumer] = field(default_factory=list)

    def capsule(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.system.capsule(*args, timeout=120)

    def failed(
        self, n: int, *, error_class: str, provider: str = "resend", start: datetime
    ) -> list[uuid.UUID]:
        """`n` real letters (the consumer can open them) that failed at start - i minutes."""
        ids = []
        for i in range(n):
            ids.append(
                schedule_delivery(
                    self.app,
                    user_id=self.user_id,
                    recipient=f"r{i}@{provider}.example.com",
                    subject="To me",
                    body=f"Dear future me {uuid.uuid4()}",
                    deliver_at=utcnow() + timedelta(days=365),  # beyond the horizon: no task
                    now=utcnow(),
                    actor="owner@example.com",
                ).delivery_id
            )
        with session_scope(self.app.session_factory) as s:
            for i, delivery_id in enumerate(ids):
                at = start - timedelta(minutes=i)
                s.execute(
                    update(Delivery)
                    .where(Delivery.id == delivery_id)
                    .values(
                        status=Status.FAILED,
                        error_class=error_class,
                        last_error=f"{provider} answered 503",
                        failed_at=at,
                        attempt_count=1,
                    )
                )
                s.add(
                    DeliveryAttempt(
                        delivery_id=delivery_id,
                        run_number=1,
                        task_id="t",
                        provider=provider,
                        outcome=error_class,
                        status_code=503,
                        duration_ms=5,
                        started_at=at,
                    )
                )
            s.commit()
        return ids

    def statuses(self) -> dict[str, int]:
        with session_scope(self.app.session_factory) as s:
            rows = s.execute(select(Delivery.status, func.count()).group_by(Delivery.status))
            return {str(k): int(n) for k, n in rows}

    def operations(self) -> list[BulkOperation]:
        with session_scope(self.app.session_factory) as s:
            return list(s.scalars(select(BulkOperation).order_by(BulkOperation.id)))

    def events(self) -> list[tuple[str, dict]]:
        with session_scope(self.app.session_factory) as s:
            return [(e.type, dict(e.data)) for e in s.scalars(select(AuditEvent))]

    def written(self) -> tuple[dict[str, int], int, int, int]:
        """What a refused command must leave as it was."""
        return (
            self.statuses(),
            len(self.operations()),
            len(self.events()),
            len(self.server.messages()),
        )


@pytest.fixture
def ops(
    pg_database: str,
    redis_prefix: str,
    redis_url: str,
    provider_server: FakeProviderServer,
    tmp_path: Path,
    keyring,
) -> Iterator[Ops]:
    engine = create_engine(pg_database)
    truncate_all(engine)
    engine.dispose()
    system = System(
        var_dir=tmp_path / "var",
        database_url=pg_database,
        key_entry=KEY_ENTRY,
        redis_url=redis_url,
        huey_name=redis_prefix,
        settings=provider_env(provider_server, CAPSULE_PROVIDERS="resend"),
    )
    settings = Settings.from_env(system.env)
    app = build_app(settings, HueyEnqueuer(make_huey(settings)), keyring=keyring)
    world = Ops(system, app, provider_server)
    with session_scope(app.session_factory) as session:
        world.user_id = create_user(session, "owner@example.com", "Owner", utcnow(), 1000).id
        session.commit()
    yield world
    for consumer in world.consumers:
        consumer.kill()
    app.engine.dispose()


def refused(done: subprocess.CompletedProcess[str]) -> str:
    """The refusal's one line (and nothing else on stderr), exit 2."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsule: error: "), done.stderr
    return lines[0]


# ---------------------------------------------------------------- failed list


def test_failed_list_streams_the_whole_filtered_set_as_csv_json_and_table(ops: Ops) -> None:
    # Given 7 transient failures from resend, 3 from postmark, 2 permanent ones
    now = utcnow()
    resend = ops.failed(7, error_class="transient", start=now - timedelta(hours=1))
    postmark = ops.failed(
        3, error_class="transient", provider="postmark", start=now - timedelta(minutes=30)
    )
    ops.failed(2, error_class="permanent", start=now - timedelta(hours=2))

    # When the transient ones are listed as CSV, three rows a page
    done = ops.capsule(
        "failed", "list", "--error-class", "transient", "--format", "csv", "--page-size", "3"
    )

    # Then every one of them is there, newest first, under a header row of triage's columns
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert list(rows[0].keys()) == FAILED_COLUMNS
    assert [r["id"] for r in rows] == [str(i) for i in postmark + resend]
    assert {r["provider"] for r in rows[:3]} == {"postmark"} and rows[0]["status_code"] == "503"
    failed_at = [datetime.fromisoformat(r["failed_at"]) for r in rows]
    assert failed_at == sorted(failed_at, reverse=True)

    # And as JSON, filtered by provider and by a search in the recipient, parsed whole
    listed = json.loads(
        ops.capsule(
            "failed", "list", "--provider", "resend", "--since", "3h", "--format", "json"
        ).stdout
    )
    assert len(listed) == 9 and {r["provider"] for r in listed} == {"resend"}
    searched = json.loads(
        ops.capsule("failed", "list", "--search", "R1@POSTMARK", "--format", "json").stdout
    )
    assert [r["id"] for r in searched] == [str(postmark[1])]
    assert (
        json.loads(ops.capsule("failed", "list", "--search", "nobody", "--format", "json").stdout)
        == []
    )

    # And as a table for people, with the count on stderr
    table = ops.capsule("failed", "list", "--error-class", "permanent,transient")
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 1 + 12
    assert table.stdout.startswith("id ") and "12 failed deliveries" in table.stderr


# ---------------------------------------------------------------- bulk requeue end to end


def test_bulk_requeue_dry_run_progress_ctrl_c_abort_and_resume_on_a_real_consumer(
    ops: Ops,
) -> None:
    # Given 12 transient failures, 3 permanent ones, and a consumer
    now = utcnow()
    transient = ops.failed(12, error_class="transient", start=now - timedelta(hours=1))
    ops.failed(3, error_class="permanent", start=now - timedelta(hours=1))
    ops.consumers.append(Consumer(ops.system, workers=2).start())
    filter_args = ["--error-class", "transient"]

    # When ops ask for a dry run
    dry = ops.capsule("bulk", "requeue", *filter_args, "--reason", "outage over", "--dry-run")

    # Then it shows the count and changes nothing
    assert dry.returncode == 0, dry.stderr
    assert "matching now: 12 failed deliveries" in dry.stdout and "dry run" in dry.stdout
    assert ops.statuses() == {"failed": 15} and ops.operations() == []

    # When the requeue runs at 2 rows a second, watched from a pipe (plain progress lines) ...
    watcher = subprocess.Popen(
        [
            str(BIN / "capsule"),
            "bulk",
            "requeue",
            *filter_args,
            "--reason",
            "outage over",
            "--rate",
            "2",
            "--confirm-count",
            "12",
        ],
        env=ops.system.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # ... and Ctrl-C is pressed once the consumer has requeued three
        wait_for(
            lambda: ops.operations() and ops.operations()[0].done_count >= 3,
            timeout=60,
            what="three rows requeued",
        )
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()

    # Then the operation is aborted part way, the CLI says so in one last line, exit 130
    assert watcher.returncode == 130, err
    [op] = ops.operations()
    assert op.state == "aborted" and 3 <= op.done_count < 12
    lines = err.splitlines()
    assert any(line.startswith(f"bulk #{op.id}: ") and "/12 (" in line for line in lines), err
    assert lines[-1].startswith(f"capsule: error: interrupted: bulk #{op.id} aborted after ")
    assert f"capsule bulk resume {op.id}" in lines[-1]
    assert f"bulk #{op.id}: 12 deliveries queued for a consumer" in out

    # And exactly the requeued ones reach the provider; the others are still failed
    done = op.done_count
    wait_for(lambda: ops.statuses().get("sent", 0) == done, timeout=60, what="requeued sent")
    assert ops.statuses() == {"sent": done, "failed": 15 - done}
    assert len(ops.server.messages()) == done

    # When it is resumed
    rest = 12 - done
    again = ops.capsule(
        "bulk",
        "resume",
        str(op.id),
        "--reason",
        "go on",
        "--rate",
        "20",
        "--confirm-count",
        str(rest),
    )

    # Then the rest is requeued and sent, each letter once, and the audit links the two
    assert again.returncode == 0, again.stderr
    assert f"matching now: {rest} failed deliveries" in again.stdout
    assert f"done: requeued {rest}, skipped 0 of {rest}" in again.stdout
    wait_for(lambda: ops.statuses().get("sent", 0) == 12, timeout=60, what="all sent")
    assert ops.statuses() == {"sent": 12, "failed": 3}
    with session_scope(ops.app.session_factory) as s:
        keys = s.scalars(select(Delivery.idempotency_key).where(Delivery.id.in_(transient))).all()
    assert {k: ops.server.count_for_key(k) for k in keys} == {k: 1 for k in keys}
    second = ops.operations()[1]
    assert (second.state, second.done_count, second.reason) == ("done", rest, "go on")
    assert (bulk.RESUMED_EVENT, {"operation_id": second.id, "resumes": op.id}) in ops.events()
    actors = {e.actor for e in _audit(ops, "bulk.created")}
    assert len(actors) == 1 and actors.pop().startswith("cli:")

    # And a finished operation cannot be resumed again
    assert "only an aborted or failed operation" in refused(
        ops.capsule("bulk", "resume", str(second.id), "--reason", "x", "--confirm-count", "0")
    )


def _audit(ops: Ops, type_: str) -> list[AuditEvent]:
    with session_scope(ops.app.session_factory) as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.type == type_)))


def test_bulk_status_abort_and_list(ops: Ops) -> None:
    # Given an operation launched with --detach and no consumer to run it
    ops.failed(2, error_class="transient", start=utcnow() - timedelta(hours=1))
    launched = ops.capsule("bulk", "requeue", "--reason", "r", "--confirm-count", "2", "--detach")
    assert launched.returncode == 0, launched.stderr
    [op] = ops.operations()
    status = json.loads(ops.capsule("bulk", "status", str(op.id), "--json").stdout)
    assert status["state"] == "pending" and status["expected_count"] == 2

    # When it is aborted with a reason
    done = ops.capsule("bulk", "abort", str(op.id), "--reason", "wrong filter")

    # Then it is aborted, audited with the CLI's actor, and listed
    assert done.returncode == 0 and f"bulk #{op.id}: aborted" in done.stdout
    assert ops.operations()[0].state == "aborted"
    [event] = _audit(ops, "bulk.abort_requested")
    assert event.reason == "wrong filter" and event.actor.startswith("cli:")
    listed = json.loads(ops.capsule("bulk", "list", "--json").stdout)
    assert [(o["id"], o["state"]) for o in listed] == [(op.id, "aborted")]
    assert "aborted" in ops.capsule("bulk", "status", str(op.id)).stdout
    assert ops.statuses() == {"failed": 2}


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["bulk", "requeue", "--confirm-count", "2"], "required: --reason"),
        (
            ["bulk", "requeue", "--reason", " ", "--confirm-count", "2"],
            "--reason must not be empty",
        ),
        (["bulk", "requeue", "--reason", "a\x1b[2Jb", "--confirm-count", "2"], "control"),
        (["bulk", "requeue", "--reason", "r", "--rate", "0"], "--rate: must be above 0"),
        (["bulk", "requeue", "--reason", "r", "--rate", "fast"], "--rate: expected a number"),
        (["bulk", "requeue", "--reason", "r", "--error-class", "bogus"], "unknown class 'bogus'"),
        (["bulk", "requeue", "--reason", "r", "--since", "last week"], "--since: cannot read"),
        (["bulk", "requeue", "--reason", "r", "--since", "1h", "--until", "2h"], "after --until"),
        (["bulk", "requeue", "--reason", "r"], "confirm with --confirm-count 2"),
        (["bulk", "requeue", "--reason", "r", "--confirm-count", "3"], "2 deliveries match now"),
        (
            ["bulk", "requeue", "--reason", "r", "--provider", "smtp", "--confirm-count", "0"],
            "no failed delivery matches",
        ),
        (["bulk", "resume", "99", "--reason", "r"], "bulk operation '99' not found"),
        (["bulk", "abort", "99", "--reason", "r"], "not found"),
        (["bulk", "abort", "1"], "required: --reason"),
        (["bulk", "status", "0"], "must be between 1"),
        (["failed", "list", "--format", "xml"], "invalid choice: 'xml'"),
        (["failed", "list", "--search", "a\nb"], "control"),
    ],
)
def test_every_refusal_is_one_line_exit_2_and_writes_nothing(
    ops: Ops, args: list[str], says: str
) -> None:
    ops.failed(2, error_class="transient", start=utcnow() - timedelta(hours=1))
    before = ops.written()
    assert says in refused(ops.capsule(*args))
    assert ops.written() == before


def test_the_cli_keeps_the_consoles_guard_rails(ops: Ops) -> None:
    # Given transient and possibly-sent failures, the cap at 3 rows, and no consumer
    ops.failed(4, error_class="transient", start=utcnow() - timedelta(hours=1))
    ops.failed(2, error_class="possibly_sent", start=utcnow() - timedelta(hours=1))
    ops.system.settings["CAPSULE_BULK_MAX_ROWS"] = "3"
    before = ops.written()

    # Then more rows than the cap are refused
    assert "CAPSULE_BULK_MAX_ROWS" in refused(
        ops.capsule("bulk", "requeue", "--reason", "r", "--confirm-count", "4")
    )
    assert ops.written() == before

    # And "any class" leaves out the risky class; naming it warns in the dry run
    assert (
        "matching now: 4 failed"
        in ops.capsule("bulk", "requeue", "--reason", "r", "--dry-run").stdout
    )
    named = ops.capsule(
        "bulk", "requeue", "--error-class", "possibly_sent", "--reason", "r", "--dry-run"
    )
    assert "warning: 2 of these may already have reached the recipient" in named.stdout

    # And a second operation on an overlapping filter is refused while the first is active
    assert (
        ops.capsule(
            "bulk",
            "requeue",
            "--error-class",
            "possibly_sent",
            "--reason",
            "r",
            "--confirm-count",
            "2",
            "--detach",
        ).returncode
        == 0
    )
    before = ops.written()
    assert "may touch the same deliveries" in refused(
        ops.capsule(
            "bulk",
            "requeue",
            "--error-class",
            "possibly_sent",
            "--provider",
            "resend",
            "--reason",
            "r",
            "--confirm-count",
            "2",
        )
    )
    assert ops.written() == before


# ---------------------------------------------------------------- db, keys rotate (SQLite)


def test_db_current_and_history_name_the_revision_and_the_newest(tmp_path: Path) -> None:
    from core.migrate import upgrade
    from tests.integration.test_cli import Cli

    # Given a database two migrations behind
    cli = Cli(tmp_path / "var")
    cli.ok("keys", "generate", "--id", "k1")
    (tmp_path / "var").mkdir(exist_ok=True)
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'capsule.db'}")
    upgrade(engine, "0002")
    engine.dispose()

    # Then `db current` names it and the newest, and --check exits 1
    behind = cli("db", "current", "--check")
    assert behind.returncode == 1 and behind.stdout.startswith("0002 on sqlite; the newest is ")
    assert "run `capsule db upgrade`" in behind.stdout
    history = cli.ok("db", "history").splitlines()
    assert history[-1].startswith("base -> 0001") and "(current)" in history[-2]
    assert "(head" in history[0]

    # And after the upgrade it is at head
    cli.ok("db", "upgrade")
    report = json.loads(cli.ok("db", "current", "--json"))
    assert report["at_head"] is True and report["current"] == report["heads"][0]
    assert cli("db", "current", "--check").returncode == 0


def test_keys_rotate_reports_progress_on_stderr(tmp_path: Path) -> None:
    from tests.integration.test_cli import Cli

    cli = Cli(tmp_path / "var")
    cli.ok("keys", "generate", "--id", "k1")
    cli.ok("db", "upgrade")
    cli.ok("user", "add", "ada@example.com", "--credits", "5")
    for _ in range(3):
        assert cli.schedule().returncode == 0
    cli.ok("keys", "generate", "--id", "k2")

    done = cli("keys", "rotate", "--batch-size", "1")

    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "keys rotate: 3/3 (100%): rotated 3, skipped 0"
    assert done.stdout.startswith("re-encrypted 3 letters under key k2")
