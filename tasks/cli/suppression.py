"""`capsule suppression …`: addresses no letter is sent to blindly."""

from __future__ import annotations

import argparse
import json

from core.db import session_scope
from core.policy import utcnow
from core.webhooks import add_suppression, list_suppressions, remove_suppression
from tasks.cli.common import Command, actor, add_audit_flags, get_app, reason


def cmd_list(args: argparse.Namespace) -> int:
    with session_scope(get_app().session_factory) as session:
        rows = list_suppressions(session, include_removed=args.all)
    print(json.dumps(rows, indent=2, default=lambda v: v.isoformat()))
    return 0


def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="include removed entries")


def cmd_add(args: argparse.Namespace) -> int:
    who, why = actor(args), reason(args)
    added = add_suppression(
        get_app().session_factory, args.address, now=utcnow(), actor=who, reason=why
    )
    print("added" if added else "already on the list")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    who, why = actor(args), reason(args)
    remove_suppression(get_app().session_factory, args.address, now=utcnow(), actor=who, reason=why)
    print("removed")
    return 0


def _address_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("address")
    add_audit_flags(p)


COMMANDS = (
    Command("suppression list", cmd_list, "print the suppression list as JSON", _list_arguments),
    Command("suppression add", cmd_add, "put an address on the list by hand", _address_arguments),
    Command(
        "suppression remove",
        cmd_remove,
        "take an address off the list (audited)",
        _address_arguments,
    ),
)
