"""`capsule`: the operator's command line.

Every failure the domain can name ends as one readable line on stderr and exit status 2;
nothing is written when a command fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from core import credits, demo
from core.bootstrap import App
from core.db import session_scope
from core.deliveries import (
    cancel_delivery,
    create_user,
    find_user,
    requeue_delivery,
    reschedule_delivery,
    schedule_delivery,
)
from core.errors import CapsuleError, DeliveryNotFound
from core.models import Delivery, DeliveryAttempt
from core.policy import parse_when, utcnow

EXIT_ERROR = 2


def _app() -> App:
    from tasks.runtime import get_app

    return get_app()


def _delivery_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise DeliveryNotFound(text) from None


def _actor(args: argparse.Namespace) -> str:
    return str(getattr(args, "actor", None) or "cli")


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from core.migrate import upgrade

    app = _app()
    upgrade(app.engine)
    print(f"database at head ({app.settings.database_kind})")
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from core.crypto import Keyring, generate_key_entry

    settings = _settings()
    entry = generate_key_entry(args.id or f"k{utcnow():%Y%m%d%H%M%S}")
    if args.print:
        print(entry)
        return 0
    if settings.encryption_keys:
        raise CapsuleError(
            "CAPSULE_ENCRYPTION_KEYS is set: append the key printed by `capsule keys generate --print` there"
        )
    path = settings.keys_path
    existing = path.read_text() if path.exists() else ""
    if args.if_missing and existing.strip():
        print(f"keyring {path} already exists")
        return 0
    Keyring.parse(existing + "\n" + entry, variable=str(path))  # rejects a duplicate id
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(entry + "\n")
    path.chmod(0o600)
    print(f"added key {entry.split(':')[0]} to {path}; it now encrypts new letters")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from core.crypto import rotate_letters

    app = _app()
    count = rotate_letters(app.session_factory, app.keyring, batch_size=args.batch_size)
    print(f"re-encrypted {count} letters under key {app.keyring.active_id}")
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    app = _app()
    with session_scope(app.session_factory) as session:
        user = create_user(session, args.email, args.name or "", utcnow(), args.credits)
        session.commit()
        print(
            json.dumps(
                {"id": user.id, "email": user.email, "balance": credits.balance(session, user.id)}
            )
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    app = _app()
    with session_scope(app.session_factory) as session:
        if demo.is_seeded(session) and not args.force:
            print("demo data already present (use --force to add more)")
            return 0
        counts = demo.seed(session, app.keyring, utcnow(), count=args.count)
        session.commit()
    print("seeded demo: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    app = _app()
    now = utcnow()
    body = args.body if args.body is not None else sys.stdin.read()
    with session_scope(app.session_factory) as session:
        user_id = find_user(session, args.user).id
    result = schedule_delivery(
        app.session_factory,
        app.enqueuer,
        app.keyring,
        app.settings,
        user_id=user_id,
        recipient=args.to,
        subject=args.subject,
        body=body,
        deliver_at=parse_when(args.at, now),
        now=now,
        actor=_actor(args),
    )
    print(result.delivery_id)
    return 0


def delivery_status(app: App, delivery_id: uuid.UUID) -> dict[str, Any]:
    """The delivery and its attempts as plain data, without the letter text."""
    with session_scope(app.session_factory) as session:
        row = session.get(Delivery, delivery_id)
        if row is None:
            raise DeliveryNotFound(delivery_id)
        attempts = session.scalars(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id == delivery_id)
            .order_by(DeliveryAttempt.id)
        ).all()
        fields = [
            "status",
            "recipient_email",
            "deliver_at",
            "next_attempt_at",
            "attempt_count",
            "task_id",
            "dispatched_at",
            "lease_until",
            "error_class",
            "last_error",
            "provider",
            "provider_message_id",
            "sent_at",
            "failed_at",
            "canceled_at",
            "created_at",
            "updated_at",
        ]
        data: dict[str, Any] = {"id": str(row.id), **{f: getattr(row, f) for f in fields}}
        data["attempts"] = [
            {
                "run": a.run_number,
                "provider": a.provider,
                "outcome": a.outcome,
                "status_code": a.status_code,
                "error_code": a.provider_error_code,
                "error": a.error_message,
                "duration_ms": a.duration_ms,
                "task_id": a.task_id,
                "started_at": a.started_at,
            }
            for a in attempts
        ]
    return data


def cmd_status(args: argparse.Namespace) -> int:
    data = delivery_status(_app(), _delivery_id(args.id))
    print(
        json.dumps(
            data, indent=2, default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v)
        )
    )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    app = _app()
    cancel_delivery(
        app.session_factory,
        app.enqueuer,
        _delivery_id(args.id),
        now=utcnow(),
        actor=_actor(args),
        reason=args.reason,
    )
    print(f"canceled {args.id}")
    return 0


def cmd_reschedule(args: argparse.Namespace) -> int:
    app = _app()
    now = utcnow()
    reschedule_delivery(
        app.session_factory,
        app.enqueuer,
        app.settings,
        _delivery_id(args.id),
        parse_when(args.at, now),
        now=now,
        actor=_actor(args),
        reason=args.reason,
    )
    print(f"rescheduled {args.id}")
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    app = _app()
    requeue_delivery(
        app.session_factory,
        app.enqueuer,
        _delivery_id(args.id),
        now=utcnow(),
        actor=_actor(args),
        reason=args.reason,
    )
    print(f"requeued {args.id}")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    import socket

    from core.reconcile import BACKSTOP, DISPATCHER, deliver_inline, run_safety_net

    app = _app()
    runner = f"cli:{socket.gethostname()}"
    now = utcnow()
    if args.inline and not app.enqueuer.ping():
        count = deliver_inline(app, now=now, clock=utcnow, runner=runner)
        print(json.dumps({"broker": "unreachable", "delivered_inline": count}))
        return 0
    reports = [
        run_safety_net(app, kind, now=now, runner=runner, slot=None, clock=utcnow)
        for kind in (DISPATCHER, BACKSTOP)
    ]
    print(json.dumps([r.__dict__ for r in reports]))
    return 1 if any(r.error_message for r in reports) else 0


def cmd_rollup(args: argparse.Namespace) -> int:
    from core import rollup

    written = rollup.run(_app().session_factory, now=utcnow())
    print(json.dumps({"rollups_written": written}))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from core import health

    app = _app()
    with session_scope(app.session_factory) as session:
        report = health.check(session, app.settings, utcnow())
    print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.ok else 1


def cmd_exporter(args: argparse.Namespace) -> int:
    import threading

    from prometheus_client import CollectorRegistry

    import huey_app
    from core.metrics import DatabaseCollector, serve_metrics

    app = _app()
    queue = huey_app.huey

    def queue_depth() -> tuple[int | None, int | None]:
        return int(queue.pending_count()), int(queue.scheduled_count())

    registry = CollectorRegistry()
    registry.register(
        DatabaseCollector(app.session_factory, app.settings, clock=utcnow, queue_depth=queue_depth)
    )
    addr = args.addr or app.settings.metrics_addr
    if not serve_metrics(args.port, addr, registry):
        raise CapsuleError(f"cannot listen on {addr}:{args.port}")
    print(f"serving the database gauges on http://{addr}:{args.port}/metrics", flush=True)
    threading.Event().wait()  # until a signal ends the process
    return 0


def cmd_consumer_health(args: argparse.Namespace) -> int:
    import httpx

    settings = _settings()
    port = args.port or settings.metrics_port
    problems = []
    if not _app().enqueuer.ping():
        problems.append("broker unreachable")
    if port:
        try:
            body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            if "capsule_claims_total" not in body:
                problems.append("the consumer's /metrics does not serve capsule metrics")
        except httpx.HTTPError as exc:
            problems.append(f"the consumer's /metrics on port {port}: {type(exc).__name__}")
    print(json.dumps({"ok": not problems, "problems": problems}))
    return 0 if not problems else 1


def _settings() -> Any:
    from core.config import Settings

    return Settings.from_env()


def _read_password() -> str:
    """The new password: the first line of stdin when piped, else typed twice at a prompt."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    import getpass

    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise CapsuleError("the two passwords differ")
    return first


def cmd_operator_add(args: argparse.Namespace) -> int:
    import os
    import re
    from pathlib import Path

    from core.operators import hash_password, parse_role, secrets_entry, validate_username

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
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(("\n" if existing and not existing.endswith("\n\n") else "") + entry)
    os.chmod(path, 0o600)
    print(f"added operator {username} ({role.value}) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsule", description="Capsule delivery: letters to one's future self."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help: str, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, metavar="COMMAND"
    )
    add("upgrade", cmd_db_upgrade, "apply the migrations up to the newest", db)

    keys = sub.add_parser("keys", help="letter encryption keys").add_subparsers(
        dest="keys_command", required=True, metavar="COMMAND"
    )
    p = add(
        "generate",
        cmd_keys_generate,
        "add a new key (it encrypts from now on) to the embedded keyring",
        keys,
    )
    p.add_argument("--id", help="key id (default: k<timestamp>)")
    p.add_argument("--print", action="store_true", help="only print the new id:key entry")
    p.add_argument("--if-missing", action="store_true", help="do nothing when a keyring exists")
    p = add(
        "rotate", cmd_keys_rotate, "re-encrypt every letter under the newest key (resumable)", keys
    )
    p.add_argument("--batch-size", type=int, default=500)

    user = sub.add_parser("user", help="accounts").add_subparsers(
        dest="user_command", required=True, metavar="COMMAND"
    )
    p = add("add", cmd_user_add, "create an account (or grant credits to an existing one)", user)
    p.add_argument("email")
    p.add_argument("--name", default="")
    p.add_argument("--credits", type=int, default=0)

    p = add("demo", cmd_demo, "seed two weeks of realistic demo deliveries (once)")
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--force", action="store_true")

    p = add("schedule", cmd_schedule, "schedule a letter; prints the delivery id")
    p.add_argument("--user", required=True, help="account email of the letter's owner")
    p.add_argument("--to", required=True, help="recipient address")
    p.add_argument("--at", required=True, help="ISO 8601 time or +30s, +2h, +3d, +1w")
    p.add_argument("--subject", required=True)
    p.add_argument("--body", help="letter text (default: read stdin)")
    p.add_argument("--actor")

    p = add("status", cmd_status, "print a delivery and its attempts as JSON (never the letter)")
    p.add_argument("id")

    for name, fn, text in (
        ("cancel", cmd_cancel, "cancel a scheduled or failed delivery (refunds its credit)"),
        ("requeue", cmd_requeue, "send a failed delivery again now"),
    ):
        p = add(name, fn, text)
        p.add_argument("id")
        p.add_argument("--reason", required=True)
        p.add_argument("--actor")
    p = add(
        "reconcile", cmd_reconcile, "run the dispatcher and the backstop once (for a system cron)"
    )
    p.add_argument(
        "--inline",
        action="store_true",
        help="if the broker is unreachable, deliver due letters in this process",
    )
    add("health", cmd_health, "print the safety nets' health as JSON; exit 1 when unhealthy")
    p = add(
        "exporter",
        cmd_exporter,
        "serve the database-backed Prometheus gauges (run one per fleet)",
    )
    p.add_argument("--port", type=int, default=9464)
    p.add_argument("--addr", default=None, help="default: CAPSULE_METRICS_ADDR")
    p = add(
        "consumer-health",
        cmd_consumer_health,
        "a consumer container's healthcheck: broker reachable and its /metrics answering",
    )
    p.add_argument("--port", type=int, default=None, help="default: CAPSULE_METRICS_PORT")
    add(
        "rollup",
        cmd_rollup,
        "summarise finished hours and days of sent letters for the console (hourly task)",
    )

    p = add("reschedule", cmd_reschedule, "move a scheduled delivery to a new time")
    p.add_argument("id")
    p.add_argument("--at", required=True)
    p.add_argument("--reason", default=None)
    p.add_argument("--actor")

    operator = sub.add_parser("operator", help="console operators").add_subparsers(
        dest="operator_command", required=True, metavar="COMMAND"
    )
    p = add(
        "add",
        cmd_operator_add,
        "make a local console account: reads the password from stdin or a prompt and prints "
        "the [operators.NAME] table for .streamlit/secrets.toml",
        operator,
    )
    p.add_argument("username")
    p.add_argument("--role", required=True, choices=["viewer", "support", "ops"])
    p.add_argument("--name", default="", help="display name")
    p.add_argument("--secrets", metavar="PATH", help="append the table to this secrets file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _start_telemetry()
        return int(args.fn(args))
    except CapsuleError as exc:
        print(f"capsule: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except DBAPIError as exc:
        print(f"capsule: error: {_database_problem(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _start_telemetry() -> None:
    """Logging (CAPSULE_LOG_FORMAT, CAPSULE_LOG_LEVEL), and Sentry when CAPSULE_SENTRY_DSN is set, before any command."""
    from core.logs import configure_logging

    settings = _settings()
    configure_logging(settings, default_level="WARNING")
    if settings.sentry_dsn:
        from core.telemetry import init_sentry

        init_sentry(settings, component="cli")


def _database_problem(exc: DBAPIError) -> str:
    text = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    if "no such table" in text or "does not exist" in text and "relation" in text:
        return f"the database schema is missing or old ({text}): run `capsule db upgrade`"
    return f"database unavailable: {text}"


if __name__ == "__main__":
    sys.exit(main())
