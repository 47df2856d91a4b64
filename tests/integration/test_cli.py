"""The `capsule` command line, run as a real process on the embedded default."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from core.models import AuditEvent, CreditEntry, Delivery, Letter, ReconcilerRun
from core.policy import utcnow

BIN = Path(sys.executable).parent


class Cli:
    def __init__(self, var: Path, extra_env: dict[str, str] | None = None) -> None:
        self.var = var
        self.env = (
            {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
            | {"CAPSULE_VAR_DIR": str(var)}
            | (extra_env or {})
        )

    def __call__(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "capsule"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            input=input,
            timeout=60,
        )

    def schedule(
        self, *, input: str | None = None, **overrides: str
    ) -> subprocess.CompletedProcess[str]:
        """`capsule schedule` with valid defaults; `overrides` replace options by name."""
        options = {
            "user": "ada@example.com",
            "to": "me@example.com",
            "at": "+1d",
            "subject": "Hi",
            "body": "b",
        }
        options.update(overrides)
        argv = [
            x for key, value in options.items() if value is not None for x in (f"--{key}", value)
        ]
        return self("schedule", *argv, input=input)

    def ok(self, *args: str) -> str:
        done = self(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def counts(self) -> tuple[int, ...]:
        engine = create_engine(f"sqlite:///{self.var / 'capsule.db'}")
        with engine.connect() as conn:
            result = tuple(
                conn.scalar(select(func.count()).select_from(m)) or 0
                for m in (Delivery, Letter, CreditEntry, AuditEvent)
            )
        engine.dispose()
        return result


def test_schedule_then_status_prints_json_without_the_letter(cli: Cli) -> None:
    done = cli.schedule(at="+3d", subject="Secret subject", body="Secret body")
    delivery_id = uuid.UUID(done.stdout.strip())

    status = json.loads(cli.ok("status", str(delivery_id)))

    assert status["id"] == str(delivery_id) and status["status"] == "scheduled"
    assert status["attempts"] == [] and status["task_id"] is None  # beyond the horizon
    assert "Secret" not in json.dumps(status)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"to": "nope"}, "is not a valid email address"),
        ({"at": "2001-01-01T00:00:00Z"}, "is not in the future"),
        ({"at": "+30000d"}, "years ahead"),
        ({"at": "someday"}, "cannot read 'someday'"),
        ({"user": "nobody@example.com"}, "user 'nobody@example.com' not found"),
    ],
)
def test_bad_input_exits_2_with_one_readable_line_and_writes_nothing(
    cli: Cli, overrides: dict[str, str], message: str
) -> None:
    before = cli.counts()

    done = cli.schedule(**overrides)

    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsule: error:") and message in lines[0]
    assert cli.counts() == before


def test_oversized_letter_and_no_credit(cli: Cli) -> None:
    before = cli.counts()
    big = cli.schedule(body=None, input="x" * 300_000)
    assert big.returncode == 2 and "the limit is 262144" in big.stderr
    assert cli.counts() == before

    for _ in range(2):
        assert cli.schedule().returncode == 0
    before = cli.counts()
    broke = cli.schedule()
    assert broke.returncode == 2 and "no delivery credit left" in broke.stderr
    assert cli.counts() == before


def test_unknown_delivery_and_invalid_transition(cli: Cli) -> None:
    missing = cli("status", str(uuid.uuid4()))
    assert missing.returncode == 2 and "not found" in missing.stderr
    garbage = cli("cancel", "not-a-uuid", "--reason", "x")
    assert garbage.returncode == 2 and "delivery 'not-a-uuid' not found" in garbage.stderr

    delivery_id = cli.schedule().stdout.strip()
    cli.ok("cancel", delivery_id, "--reason", "changed my mind")
    before = cli.counts()
    again = cli("requeue", delivery_id, "--reason", "x")
    assert (
        again.returncode == 2
        and f"cannot requeue delivery '{delivery_id}': it is canceled" in again.stderr
    )
    assert cli.counts() == before


def test_invalid_setting_fails_at_start_naming_the_variable(cli: Cli) -> None:
    cli.env["CAPSULE_LEASE_SECONDS"] = "soon"
    done = cli("status", str(uuid.uuid4()))
    assert done.returncode != 0 and "CAPSULE_LEASE_SECONDS" in done.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["db", "upgrade"],
        ["keys", "generate"],
        ["keys", "rotate"],
        ["demo"],
        ["schedule"],
        ["status"],
        ["cancel"],
        ["requeue"],
        ["reschedule"],
        ["reconcile"],
        ["health"],
        ["rollup"],
        ["user", "add"],
    ],
)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from tasks.cli import main

    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0 and "usage: capsule" in capsys.readouterr().out


def test_health_exit_codes(cli: Cli) -> None:
    # No backstop run yet: unhealthy
    first = cli("health")
    assert first.returncode == 1 and "no successful backstop run" in first.stdout

    # A reconcile run makes it healthy
    cli.ok("reconcile")
    healthy = cli("health")
    assert healthy.returncode == 0, healthy.stdout
    assert json.loads(healthy.stdout)["ok"] is True

    # An old last run makes it unhealthy again
    engine = create_engine(f"sqlite:///{cli.var / 'capsule.db'}")
    with engine.begin() as conn:
        conn.execute(
            ReconcilerRun.__table__.update().values(finished_at=utcnow() - timedelta(hours=1))
        )
    engine.dispose()
    stale = cli("health")
    assert stale.returncode == 1 and "old" in json.loads(stale.stdout)["problems"][0]


def test_key_rotation_reencrypts_every_letter(cli: Cli) -> None:
    assert cli.schedule().returncode == 0
    cli.ok("keys", "generate", "--id", "k2")
    assert "re-encrypted 1 letters under key k2" in cli.ok("keys", "rotate")
    assert "re-encrypted 0 letters" in cli.ok("keys", "rotate")
    duplicate = cli("keys", "generate", "--id", "k2")
    assert duplicate.returncode == 2 and "appears twice" in duplicate.stderr


def test_demo_seeds_once(cli: Cli) -> None:
    assert "seeded demo" in cli.ok("demo", "--count", "200")
    assert "already present" in cli.ok("demo")


def test_rollup_summarises_the_demo_history_once(cli: Cli) -> None:
    cli.ok("demo", "--count", "200")
    first = json.loads(cli.ok("rollup"))["rollups_written"]
    second = json.loads(cli.ok("rollup"))["rollups_written"]
    assert first >= 8 * 24 - 1 and second == 0


def test_missing_schema_and_unreachable_database_are_one_line_errors(tmp_path: Path) -> None:
    fresh = Cli(tmp_path / "fresh")
    fresh.ok("keys", "generate")
    missing = fresh("health")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "run `capsule db upgrade`" in missing.stderr

    fresh.env["CAPSULE_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:1/nothing"
    down = fresh("health")
    assert down.returncode == 2 and down.stderr.startswith("capsule: error: database unavailable:")
    assert down.stderr.count("\n") == 1


def test_suppression_list_and_release_commands(cli: Cli) -> None:
    # Adding, listing, removing an address: each change audited, a bad one refused on one line
    assert (
        cli.ok("suppression", "add", "Gone@Old-ISP.example", "--reason", "owner asked") == "added\n"
    )
    listed = json.loads(cli.ok("suppression", "list"))
    assert [(s["address"], s["reason"]) for s in listed] == [("gone@old-isp.example", "manual")]
    before = cli.counts()
    for args in (
        ("suppression", "remove", "nobody@example.com", "--reason", "x"),
        ("suppression", "remove", "not an address", "--reason", "x"),
        ("suppression", "remove", "gone@old-isp.example", "--reason", " "),
        ("release", str(uuid.uuid4()), "--reason", "x"),
    ):
        refused = cli(*args)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, args
    assert cli.counts() == before

    # A scheduled letter is not held: release refuses it
    delivery_id = cli.schedule(to="gone@old-isp.example").stdout.strip()
    refused = cli("release", delivery_id, "--reason", "x")
    assert refused.returncode == 2 and "it is scheduled" in refused.stderr

    cli.ok("suppression", "remove", "gone@old-isp.example", "--reason", "mailbox back")
    assert json.loads(cli.ok("suppression", "list")) == []
    history = json.loads(cli.ok("suppression", "list", "--all"))
    assert history[0]["removed_reason"] == "mailbox back"


def test_redirect_sends_a_failed_letter_to_a_corrected_address(cli: Cli) -> None:
    delivery_id = cli.schedule(to="old@example.com").stdout.strip()
    # A scheduled letter is not failed: refused on one line, nothing written
    before = cli.counts()
    for args in (
        ("delivery", "redirect", delivery_id, "--to", "new@example.com", "--reason", "x"),
        ("delivery", "redirect", delivery_id, "--to", "new@example.com"),
        ("delivery", "redirect", delivery_id, "--reason", "x"),
    ):
        refused = cli(*args)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, (args, refused.stderr)
    assert (
        "it is scheduled"
        in cli(
            "delivery", "redirect", delivery_id, "--to", "new@example.com", "--reason", "x"
        ).stderr
    )
    assert cli.counts() == before

    engine = create_engine(f"sqlite:///{cli.var / 'capsule.db'}")
    with engine.begin() as conn:
        conn.execute(
            Delivery.__table__.update()
            .where(Delivery.id == uuid.UUID(delivery_id))
            .values(status="failed", error_class="permanent", failed_at=utcnow())
        )
    engine.dispose()
    same = cli("delivery", "redirect", delivery_id, "--to", "OLD@example.com", "--reason", "x")
    assert same.returncode == 2 and "the address it could not reach" in same.stderr

    new_id = cli.ok(
        "delivery", "redirect", delivery_id, "--to", "new@example.com", "--reason", "owner wrote"
    ).strip()
    old, new = json.loads(cli.ok("status", delivery_id)), json.loads(cli.ok("status", new_id))
    assert old["status"] == "canceled"
    assert (new["status"], new["recipient_email"]) == ("scheduled", "new@example.com")


# ---------------------------------------------------------------- grouped spellings and aliases


def _leaf(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The parser `capsule WORDS…` reaches."""
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _listed(parser: argparse.ArgumentParser) -> list[str]:
    """The commands a parser's --help lists, in order."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [action.dest for action in sub._choices_actions]


def test_every_older_spelling_runs_the_same_command_as_its_grouped_one() -> None:
    from tasks.cli import COMMANDS, build_parser

    parser = build_parser()
    aliases = {alias for command in COMMANDS for alias in command.aliases}
    assert {"schedule", "status", "cancel", "reschedule", "requeue", "release", "demo"} <= aliases
    assert {"reconcile", "health", "rollup", "exporter", "consumer-health"} <= aliases
    assert {"failed list", "bulk requeue", "bulk resume", "bulk status", "bulk abort"} <= aliases
    for command in COMMANDS:
        grouped = _leaf(parser, command.path.split())
        assert grouped.get_default("fn") is command.handler, command.path
        options = [(a.option_strings, a.dest, a.required) for a in grouped._actions]
        for alias in command.aliases:
            old = _leaf(parser, alias.split())
            assert old.get_default("fn") is command.handler, alias
            assert [(a.option_strings, a.dest, a.required) for a in old._actions] == options


def test_help_lists_the_groups_and_each_groups_commands_in_order() -> None:
    from tasks.cli import build_parser

    parser = build_parser()
    assert _listed(parser) == [
        "db",
        "keys",
        "user",
        "operator",
        "delivery",
        "safety",
        "webhooks",
        "suppression",
    ]
    assert _listed(_leaf(parser, ["delivery"])) == [
        "schedule",
        "status",
        "reschedule",
        "cancel",
        "requeue",
        "release",
        "redirect",
        "failed",
        "bulk",
    ]
    assert _listed(_leaf(parser, ["delivery", "bulk"])) == [
        "requeue",
        "resume",
        "status",
        "list",
        "abort",
    ]
    assert _listed(_leaf(parser, ["safety"])) == [
        "reconcile",
        "health",
        "rollup",
        "exporter",
        "consumer-health",
    ]
    assert _listed(_leaf(parser, ["db"])) == ["upgrade", "current", "history", "demo"]
    text = parser.format_help()
    assert "capsule schedule|status|reschedule|cancel|requeue|release" in text
    assert "= capsule delivery …" in text and "= capsule safety …" in text
    assert "capsule failed list" in text and "= capsule delivery failed" in text


@pytest.mark.parametrize(
    "command",
    [["delivery"], ["delivery", "bulk"], ["safety"], ["bulk"], ["failed"], ["delivery", "failed"]],
)
def test_every_group_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from tasks.cli import main

    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0 and "usage: capsule" in capsys.readouterr().out


def test_the_grouped_spellings_work_and_refuse_like_the_old_ones(cli: Cli) -> None:
    # Given a letter scheduled with the grouped spelling
    delivery_id = cli.ok(
        "delivery", "schedule", "--user", "ada@example.com", "--to", "me@example.com",
        "--at", "+1d", "--subject", "Hi", "--body", "b",
    ).strip()  # fmt: skip
    assert json.loads(cli.ok("delivery", "status", delivery_id))["status"] == "scheduled"
    before = cli.counts()

    # When a change misses its reason, under either spelling
    grouped = cli("delivery", "cancel", delivery_id)
    old = cli("cancel", delivery_id)

    # Then both refuse on one line, exit 2, and write nothing
    for done in (grouped, old):
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("capsule: error: ") and "--reason" in done.stderr
    assert "`capsule delivery cancel --help`" in grouped.stderr
    assert "`capsule cancel --help`" in old.stderr
    assert cli.counts() == before

    # And the grouped spellings change the row as the old ones do
    cli.ok("delivery", "reschedule", delivery_id, "--at", "+2d", "--reason", "asked")
    assert (
        cli.ok("delivery", "cancel", delivery_id, "--reason", "asked")
        == f"canceled {delivery_id}\n"
    )
    assert json.loads(cli.ok("status", delivery_id))["status"] == "canceled"
    cli.ok("safety", "reconcile")
    assert cli("safety", "health").returncode == 0


def test_python_dash_m_runs_the_same_command_line(cli: Cli) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "db", "current", "--json"],
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["at_head"] is True
