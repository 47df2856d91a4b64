"""`capsule db …`: the schema (upgrade, current, history) and the demo data."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from core import demo
from core.bootstrap import App
from core.db import session_scope
from core.policy import utcnow
from tasks.cli.common import Command, get_app, whole_number

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory


def cmd_upgrade(args: argparse.Namespace) -> int:
    # Imported on use (here and below): Alembic is slow to import and serves these commands
    # only, and every `capsule` start would pay for it.
    from core.migrate import upgrade

    app = get_app()
    upgrade(app.engine)
    print(f"database at head ({app.settings.database_kind})")
    return 0


def _script(app: App) -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    from core.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config(app.engine))


def cmd_current(args: argparse.Namespace) -> int:
    from core.migrate import current

    app = get_app()
    at = current(app.engine)
    heads = list(_script(app).get_heads())
    at_head = at in heads
    if args.json:
        print(json.dumps({"current": at, "heads": heads, "at_head": at_head}))
    elif at_head:
        print(f"{at} (head) on {app.settings.database_kind}")
    else:
        print(
            f"{at or 'none (empty database)'} on {app.settings.database_kind}; the newest is "
            f"{', '.join(heads)}: run `capsule db upgrade`"
        )
    return 1 if args.check and not at_head else 0


def _current_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 when not at the newest revision")


def cmd_history(args: argparse.Namespace) -> int:
    from core.migrate import current

    app = get_app()
    at = current(app.engine)
    script = _script(app)
    heads = set(script.get_heads())
    for rev in script.walk_revisions():  # newest first
        marks = [
            m for m, on in (("head", rev.revision in heads), ("current", rev.revision == at)) if on
        ]
        doc = (rev.doc or "").strip().splitlines()[0] if rev.doc else ""
        down = rev.down_revision or "base"
        print(f"{down} -> {rev.revision}{' (' + ', '.join(marks) + ')' if marks else ''}: {doc}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    app = get_app()
    with session_scope(app.session_factory) as session:
        if demo.is_seeded(session) and not args.force:
            print("demo data already present (use --force to add more)")
            return 0
        counts = demo.seed(session, app.keyring, utcnow(), count=args.count)
        session.commit()
    print("seeded demo: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=whole_number(1, 1_000_000), default=3000)
    p.add_argument("--force", action="store_true")


COMMANDS = (
    Command("db upgrade", cmd_upgrade, "apply the migrations up to the newest"),
    Command(
        "db current",
        cmd_current,
        "print the schema's revision and whether it is the newest",
        _current_arguments,
    ),
    Command(
        "db history", cmd_history, "list the migrations, newest first, marking head and current"
    ),
    Command(
        "db demo",
        cmd_demo,
        "seed two weeks of realistic demo deliveries (once)",
        _demo_arguments,
        aliases=("demo",),
    ),
)
