"""`capsule`: the operator's command line.

Commands are grouped by what they act on: `capsule db|keys|user|operator|delivery|safety|
webhooks|suppression COMMAND`. Each group is one module here whose `COMMANDS` table names every
command's grouped spelling, handler, help, arguments and older spellings (`capsule cancel` is
`capsule delivery cancel`); to add a command, write its handler and add it to its module's table.

Every failure the domain can name ends as one readable line on stderr and exit status 2;
nothing is written when a command fails. That includes what argparse refuses, arguments that
are not UTF-8, numbers out of range and files that cannot be read or written.

Commands that change a delivery name who did it (`cli:<OS user>`, or `--actor NAME via
cli:<OS user>`) and why (`--reason`, required, one line) in the audit trail.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError

from core.errors import CapsuleError
from core.logs import configure_logging
from tasks.cli import (
    bulk,
    db,
    deliveries,
    failed,
    keys,
    operators,
    safety,
    suppression,
    users,
    webhooks,
)
from tasks.cli.common import EXIT_ERROR, Command, Group, Parser, fail, settings

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

# Listed in `capsule --help` in the order their first command comes in COMMANDS.
GROUPS = {
    group.path: group
    for group in (
        Group("db", "database schema and demo data"),
        Group("keys", "letter encryption keys"),
        Group("user", "accounts"),
        Group("operator", "console operators"),
        Group("delivery", "one letter's delivery, the failed set, bulk requeues"),
        Group("delivery bulk", "bulk operations on failed deliveries"),
        Group("safety", "the safety nets outside the consumers, and their health"),
        Group("webhooks", "provider webhooks"),
        Group("suppression", "addresses no letter is sent to blindly"),
        Group("failed", "failed deliveries (triage)", shown=False),
        Group("bulk", "bulk operations on failed deliveries", shown=False),
    )
}
COMMANDS: tuple[Command, ...] = (
    *db.COMMANDS,
    *keys.COMMANDS,
    *users.COMMANDS,
    *operators.COMMANDS,
    *deliveries.COMMANDS,
    *failed.COMMANDS,
    *bulk.COMMANDS,
    *safety.COMMANDS,
    *webhooks.COMMANDS,
    *suppression.COMMANDS,
)


class _Tree:
    """The subparsers of every group, made when a command first needs them."""

    def __init__(self, root: argparse.ArgumentParser) -> None:
        self.groups = {"": root.add_subparsers(dest="command", required=True, metavar="COMMAND")}

    def subparsers(self, path: str) -> Subparsers:
        if path not in self.groups:
            group = GROUPS[path]
            parent, _, name = path.rpartition(" ")
            parser = _add_parser(self.subparsers(parent), name, group.help, shown=group.shown)
            self.groups[path] = parser.add_subparsers(
                dest=path.replace(" ", "_") + "_command", required=True, metavar="COMMAND"
            )
        return self.groups[path]

    def add(self, path: str, command: Command, *, shown: bool) -> None:
        parent, _, name = path.rpartition(" ")
        parser = _add_parser(self.subparsers(parent), name, command.help, shown=shown)
        parser.set_defaults(fn=command.handler)
        command.arguments(parser)


def _add_parser(
    subparsers: Subparsers, name: str, text: str, *, shown: bool
) -> argparse.ArgumentParser:
    """A parser listed in its parent's --help with `text`, or (older spellings) left out."""
    if shown:
        return subparsers.add_parser(name, help=text, description=text)
    return subparsers.add_parser(name, description=text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="capsule",
        description="Capsule delivery: letters to one's future self.",
        epilog=_aliases_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tree = _Tree(parser)
    for command in COMMANDS:
        tree.add(command.path, command, shown=True)
    for command in COMMANDS:  # older spellings: they run, but are left out of the listings
        for alias in command.aliases:
            tree.add(alias, command, shown=False)
    return parser


def _aliases_help() -> str:
    """The older spellings, one line per group they moved into."""
    moved: dict[tuple[str, str], list[str]] = {}
    for command in COMMANDS:
        for alias in command.aliases:
            if alias.rpartition(" ")[2] == command.path.rpartition(" ")[2]:
                key = (alias.rpartition(" ")[0], command.path.rpartition(" ")[0])
                moved.setdefault(key, []).append(command.path.rpartition(" ")[2])
            else:
                moved[(alias, command.path)] = []
    lines = ["older spellings still work, the same commands under their groups:"]
    for (old, new), names in moved.items():
        if len(names) == 1:
            old, new = f"{old} {names[0]}".strip(), f"{new} {names[0]}"
        elif names:
            old, new = f"{old} {'|'.join(names)}".strip(), f"{new} …"
        left = f"  capsule {old}"
        if len(left) >= 30:
            lines.append(left)
            left = ""
        lines.append(f"{left:<30} = capsule {new}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    for position, argument in enumerate(arguments, start=1):
        # Bytes that are not UTF-8 arrive as lone surrogates: nothing downstream can store them.
        if any("\ud800" <= char <= "\udfff" for char in argument):
            fail(f"argument {position} is not UTF-8 text")
            return EXIT_ERROR
    args = build_parser().parse_args(arguments)
    try:
        _start_telemetry()
        return int(args.fn(args))
    except CapsuleError as exc:
        fail(str(exc))
    except DBAPIError as exc:
        fail(_database_problem(exc))
    except OSError as exc:
        fail(_file_problem(exc))
    except KeyboardInterrupt:
        fail("interrupted")
        return 130
    return EXIT_ERROR


def _file_problem(exc: OSError) -> str:
    where = f": {exc.filename!r}" if exc.filename else ""
    return f"{exc.strerror or type(exc).__name__}{where}"


def _start_telemetry() -> None:
    """Logging (CAPSULE_LOG_FORMAT, CAPSULE_LOG_LEVEL), and Sentry when CAPSULE_SENTRY_DSN is set, before any command."""
    config = settings()
    configure_logging(config, default_level="WARNING")
    if config.sentry_dsn:
        # Imported on use: the Sentry SDK is slow to import and most runs have no DSN.
        from core.telemetry import init_sentry

        init_sentry(config, component="cli")


def _database_problem(exc: DBAPIError) -> str:
    text = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    if "no such table" in text or "does not exist" in text and "relation" in text:
        return f"the database schema is missing or old ({text}): run `capsule db upgrade`"
    return f"database unavailable: {text}"
