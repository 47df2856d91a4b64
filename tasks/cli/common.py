"""What every `capsule` command shares: the command table's shape, the parser that refuses in
one line, argument types, and who did it and why (`--actor`, `--reason`).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from core.bootstrap import App
from core.config import Settings
from core.errors import DeliveryNotFound, ValidationError
from core.policy import short_repr

EXIT_ERROR = 2
MAX_ACTOR_CHARS = 64
MAX_REASON_CHARS = 500
ACTOR_HELP = "who asked for this, recorded with the OS user (default: the OS user alone)"
REASON_HELP = "why (required, one line; kept in the audit trail)"

Handler = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]


def no_arguments(parser: argparse.ArgumentParser) -> None:
    """For a command that takes none."""


@dataclass(frozen=True)
class Command:
    """One command: its grouped spelling (`"delivery cancel"`), its handler, its one-line help,
    what adds its arguments, and the older spellings that still run it (`"cancel"`)."""

    path: str
    handler: Handler
    help: str
    arguments: Arguments = no_arguments
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Group:
    """A word that groups commands (`"delivery"`, `"delivery bulk"`); a hidden group only
    carries older spellings (`capsule bulk …`) and is left out of the help listings."""

    path: str
    help: str
    shown: bool = True


class Parser(argparse.ArgumentParser):
    """argparse, with its refusals as one line like every other error (exit 2)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        fail(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")
        raise SystemExit(EXIT_ERROR)


def fail(message: str) -> None:
    """The one line on stderr every refusal ends as."""
    print(f"capsule: error: {' '.join(message.split())}", file=sys.stderr)


def settings() -> Settings:
    """The settings alone, for commands that need no database or broker."""
    return Settings.from_env()


def get_app() -> App:
    """The process's App, built on first use: importing the queue reads the environment, so a
    bad setting ends as `main`'s one-line refusal and `--help` needs no settings at all."""
    from tasks.delivery import get_app as process_app

    return process_app()


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer within [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:  # also a number too long to read
            raise argparse.ArgumentTypeError(
                f"expected a whole number, got {short_repr(text)}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def add_audit_flags(parser: argparse.ArgumentParser) -> None:
    """`--reason` (required) and `--actor`: what a change records in the audit trail."""
    parser.add_argument("--reason", required=True, help=REASON_HELP)
    parser.add_argument("--actor", help=ACTOR_HELP)


def delivery_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise DeliveryNotFound(text) from None


def os_user() -> str:
    """Who runs this process, as the OS knows them; the uid when no name can be found."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError, ImportError):  # no passwd entry (containers), no env vars
        name = ""
    return name if name and line_problem(name) is None else f"uid {os.getuid()}"


def actor(args: argparse.Namespace) -> str:
    """`cli:<OS user>`; `--actor NAME` is recorded next to the OS user, never instead of it."""
    who = f"cli:{os_user()}"
    given = getattr(args, "actor", None)
    if given is None:
        return who
    return f"{one_line(given, 'actor', MAX_ACTOR_CHARS)} via {who}"


def reason(args: argparse.Namespace) -> str:
    """The operator's reason for a change: required, one line of text."""
    return one_line(args.reason or "", "reason", MAX_REASON_CHARS)


def one_line(value: str, field: str, limit: int) -> str:
    text = value.strip()
    if not text:
        raise ValidationError(field, f"--{field} must not be empty")
    if len(text) > limit:
        raise ValidationError(field, f"--{field} is longer than {limit} characters")
    problem = line_problem(text)
    if problem:
        raise ValidationError(field, f"--{field} contains {problem}")
    return text


def line_problem(text: str) -> str | None:
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            return f"a control or invisible character (U+{ord(char):04X})"
    return None


def read_stdin_text(what: str) -> str:
    """All of stdin as UTF-8 text; a ValidationError (not a traceback) when it is not."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # stdin replaced by a text stream (embedding, tests): already decoded
        return str(sys.stdin.read())
    data: bytes = raw.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(
            what, f"{what} on stdin is not UTF-8 text (byte {exc.start + 1})"
        ) from None
