"""`capsule operator …`: local console accounts."""

from __future__ import annotations

import argparse
import getpass
import re
import sys
from pathlib import Path

from core.errors import CapsuleError
from core.files import append_private
from core.operators import hash_password, parse_role, secrets_entry, validate_username
from tasks.cli.common import Command, read_stdin_text


def _read_password() -> str:
    """The new password: the first line of stdin when piped, else typed twice at a prompt."""
    if not sys.stdin.isatty():
        return read_stdin_text("the password").split("\n", 1)[0].rstrip("\r")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise CapsuleError("the two passwords differ")
    return first


def cmd_add(args: argparse.Namespace) -> int:
    username = validate_username(args.username)
    role = parse_role(args.role)
    entry = secrets_entry(username, role, hash_password(_read_password()), name=args.name or "")
    if not args.secrets:
        print(entry, end="")
        return 0
    path = Path(args.secrets)
    existing = path.read_text() if path.exists() else ""
    header = entry.splitlines()[0]
    if re.search(rf"^\s*{re.escape(header)}\s*$", existing, flags=re.MULTILINE):
        raise CapsuleError(f"{path} already has {header}: remove it first to replace it")
    append_private(path, ("\n" if existing and not existing.endswith("\n\n") else "") + entry)
    print(f"added operator {username} ({role.value}) to {path}")
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("username")
    p.add_argument("--role", required=True, choices=["viewer", "support", "ops"])
    p.add_argument("--name", default="", help="display name")
    p.add_argument("--secrets", metavar="PATH", help="append the table to this secrets file")


COMMANDS = (
    Command(
        "operator add",
        cmd_add,
        "make a local console account: reads the password from stdin or a prompt and prints "
        "the [operators.NAME] table for .streamlit/secrets.toml",
        _add_arguments,
    ),
)
