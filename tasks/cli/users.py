"""`capsule user …`: accounts."""

from __future__ import annotations

import argparse
import json

from core import credits
from core.db import session_scope
from core.deliveries import create_user
from core.policy import utcnow
from tasks.cli.common import Command, get_app, whole_number


def cmd_add(args: argparse.Namespace) -> int:
    app = get_app()
    with session_scope(app.session_factory) as session:
        user = create_user(session, args.email, args.name or "", utcnow(), args.credits)
        session.commit()
        print(
            json.dumps(
                {"id": user.id, "email": user.email, "balance": credits.balance(session, user.id)}
            )
        )
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("email")
    p.add_argument("--name", default="")
    p.add_argument(
        "--credits",
        type=whole_number(0, credits.MAX_GRANT),
        default=0,
        help=f"credits to grant (0 to {credits.MAX_GRANT})",
    )


COMMANDS = (
    Command(
        "user add",
        cmd_add,
        "create an account (or grant credits to an existing one)",
        _add_arguments,
    ),
)
