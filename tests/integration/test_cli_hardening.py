"""`capsule` refuses every bad input with one line on stderr and exit status 2, writing
nothing; names the OS user in the audit trail; and creates its files private."""

from __future__ import annotations

import getpass
import os
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from core.models import AuditEvent, CreditEntry
from tests.integration.test_cli import BIN, Cli


def refused(done: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2, exactly one line on stderr, starting as every CLI error does, naming `message`."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsule: error: "), done.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in done.stderr


def run_bytes(
    cli: Cli, *args: bytes, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(BIN / "capsule").encode(), *args],
        env=cli.env,
        capture_output=True,
        input=input,
        timeout=60,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode("utf-8", "replace")
    )


def audit_actors(cli: Cli) -> list[tuple[str, str, str | None]]:
    engine = create_engine(f"sqlite:///{cli.var / 'capsule.db'}")
    with engine.connect() as conn:
        rows = conn.execute(
            select(AuditEvent.type, AuditEvent.actor, AuditEvent.reason).order_by(AuditEvent.id)
        ).all()
    engine.dispose()
    return [tuple(r) for r in rows]  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"at": "+99999999999d"}, "'+99999999999d' is too far ahead"),
        ({"at": "+9999999w"}, "'+9999999w' is too far ahead"),
        ({"at": "9999-12-31T23:59:59-01:00"}, "outside the years 1 to 9999"),
        ({"subject": "Hi\nBcc: all@example.com"}, "U+000A LINE FEED"),
        ({"subject": "Hi\rthere"}, "U+000D CARRIAGE RETURN"),
        ({"subject": "Hi\x0bthere"}, "U+000B VERTICAL TAB"),
        ({"subject": "Hi\x0cthere"}, "U+000C FORM FEED"),
        ({"subject": "Hi\x85there"}, "U+0085 NEXT LINE"),
        ({"subject": "Hi\u2028there"}, "U+2028 LINE SEPARATOR"),
        ({"subject": "Hi\u2029there"}, "U+2029 PARAGRAPH SEPARATOR"),
        ({"subject": "Hi\tthere"}, "U+0009 TAB"),
        ({"subject": "Hi\u202ethere"}, "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ({"actor": ""}, "--actor must not be empty"),
        ({"actor": "me\nadmin"}, "--actor contains a control"),
        ({"at": None}, "the following arguments are required: --at"),
        ({"at": "+1d", "nonsense": "1"}, "unrecognized arguments: --nonsense 1"),
    ],
)
def test_bad_schedule_input_is_one_line_and_writes_nothing(
    cli: Cli, overrides: dict[str, str | None], message: str
) -> None:
    before = cli.counts()

    done = cli.schedule(**overrides)  # type: ignore[arg-type]

    refused(done, message)
    assert "Bcc" not in done.stderr and "there" not in done.stderr  # the subject is not echoed
    assert cli.counts() == before


@pytest.mark.parametrize(
    ("credits", "message"),
    [
        ("-5", "must be between 0 and 10000000, got -5"),
        ("99999999999999999999", "must be between 0 and 10000000"),
        ("9223372036854775807", "must be between 0 and 10000000"),
        ("1e3", "expected a whole number, got '1e3'"),
        ("9" * 5000, "expected a whole number"),  # longer than int() reads
    ],
)
def test_bad_credit_grants_are_refused_and_the_next_grant_still_works(
    cli: Cli, credits: str, message: str
) -> None:
    before = cli.counts()

    refused(cli("user", "add", "ada@example.com", "--credits", credits), message)

    assert cli.counts() == before
    assert '"balance": 3' in cli.ok("user", "add", "ada@example.com", "--credits", "1")


def test_a_balance_that_would_overflow_is_refused(cli: Cli) -> None:
    cli.ok("user", "add", "bob@example.com", "--credits", "10000000")
    engine = create_engine(f"sqlite:///{cli.var / 'capsule.db'}")
    with engine.begin() as conn:  # as if granted a hundred times
        conn.execute(
            CreditEntry.__table__.update()
            .where(CreditEntry.amount == 10_000_000)
            .values(amount=995_000_000)
        )
    engine.dispose()
    before = cli.counts()

    refused(cli("user", "add", "bob@example.com", "--credits", "5000001"), "would exceed")
    assert cli.counts() == before
    assert '"balance": 1000000000' in cli.ok(
        "user", "add", "bob@example.com", "--credits", "5000000"
    )


def test_arguments_and_stdin_that_are_not_utf8_are_refused(cli: Cli) -> None:
    before = cli.counts()
    base = [b"schedule", b"--user", b"ada@example.com", b"--to", b"me@example.com"]

    refused(
        run_bytes(cli, *base, b"--at", b"+1d", b"--subject", b"Hi \xff", b"--body", b"b"),
        "argument 9 is not UTF-8 text",
    )
    refused(
        run_bytes(cli, *base, b"--at", b"+1d", b"--subject", b"Hi", input=b"Dear \xc3\x28 me"),
        "the letter on stdin is not UTF-8 text (byte 6)",
    )
    refused(run_bytes(cli, b"status", b"\xfe\xff"), "argument 2 is not UTF-8 text")
    assert cli.counts() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--count", "0"], "argument --count: must be between 1 and 1000000"),
        (["keys", "rotate", "--batch-size", "-1"], "argument --batch-size: must be between 1"),
        (["keys", "generate", "--id", "bad id"], "invalid key id 'bad id'"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["status"], "the following arguments are required: id"),
        (["status", "x\ny"], "delivery 'x\\ny' not found"),
    ],
)
def test_other_bad_input_is_one_line(cli: Cli, args: list[str], message: str) -> None:
    before = cli.counts()
    refused(cli(*args), message)
    assert cli.counts() == before


def test_changes_need_a_one_line_reason_and_record_the_os_user(cli: Cli) -> None:
    delivery_id = cli.schedule().stdout.strip()
    before = cli.counts()

    for command in (
        ["cancel", delivery_id, "--reason", ""],
        ["cancel", delivery_id, "--reason", "   "],
        ["requeue", delivery_id, "--reason", ""],
        ["reschedule", delivery_id, "--at", "+2d", "--reason", " "],
    ):
        refused(cli(*command), "--reason must not be empty")
    refused(cli("reschedule", delivery_id, "--at", "+2d"), "required: --reason")
    refused(cli("cancel", delivery_id, "--reason", "a\nb"), "--reason contains a control")
    refused(cli("cancel", delivery_id, "--reason", "x" * 501), "longer than 500")
    assert cli.counts() == before

    cli.ok("reschedule", delivery_id, "--at", "+2d", "--reason", "the owner asked")
    cli.ok("cancel", delivery_id, "--reason", "ticket 7", "--actor", "Grace (support)")

    user = getpass.getuser()
    assert audit_actors(cli)[-3:] == [
        ("delivery.scheduled", f"cli:{user}", None),
        ("delivery.rescheduled", f"cli:{user}", "the owner asked"),
        ("delivery.canceled", f"Grace (support) via cli:{user}", "ticket 7"),
    ]


@pytest.mark.parametrize("failure", [KeyError("uid"), OSError("no user"), None])
def test_the_actor_falls_back_to_the_uid_without_a_user_name(
    monkeypatch: pytest.MonkeyPatch, failure: Exception | None
) -> None:
    from tasks.cli import common

    def getuser() -> str:
        if failure is not None:
            raise failure
        return "ro\u202eot"  # a name no audit line should carry as is

    monkeypatch.setattr(getpass, "getuser", getuser)
    assert common.os_user() == f"uid {os.getuid()}"


def test_unknown_ids_are_quoted(cli: Cli) -> None:
    missing = str(uuid.uuid4())
    refused(cli("requeue", missing, "--reason", "x"), f"delivery '{missing}' not found")
    refused(cli("cancel", " x", "--reason", "x"), "delivery ' x' not found")


def test_a_file_that_cannot_be_written_is_one_line(cli: Cli, tmp_path: Path) -> None:
    directory = tmp_path / "secrets.toml"
    directory.mkdir()
    done = cli(
        "operator",
        "add",
        "grace",
        "--role",
        "ops",
        "--secrets",
        str(directory),
        input="pw-long-enough-123\n",
    )
    refused(done, "Is a directory")


def test_var_keys_database_and_queue_are_created_private(tmp_path: Path) -> None:
    fresh = Cli(tmp_path / "var", {"PYTHONUNBUFFERED": "1"})
    old = os.umask(0o022)  # the usual default: files 0644, directories 0755
    try:
        fresh.ok("keys", "generate")
        fresh.ok("db", "upgrade")
        fresh.ok("user", "add", "ada@example.com", "--credits", "1")
    finally:
        os.umask(old)

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in fresh.var.iterdir()}
    assert stat.S_IMODE(fresh.var.stat().st_mode) == 0o700
    assert {"keys", "capsule.db", "huey.db"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes
