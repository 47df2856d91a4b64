"""`capsule`: the operator's command line.

Every failure the domain can name ends as one readable line on stderr and exit status 2;
nothing is written when a command fails. That includes what argparse refuses, arguments that
are not UTF-8, numbers out of range and files that cannot be read or written.

Commands that change a delivery name who did it (`cli:<OS user>`, or `--actor NAME via
cli:<OS user>`) and why (`--reason`, required, one line) in the audit trail.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

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
from core.errors import CapsuleError, DeliveryNotFound, ValidationError
from core.files import append_private
from core.models import Delivery, DeliveryAttempt, WebhookEvent
from core.policy import parse_when, short_repr, utcnow

EXIT_ERROR = 2
MAX_ACTOR_CHARS = 64
MAX_REASON_CHARS = 500
ACTOR_HELP = "who asked for this, recorded with the OS user (default: the OS user alone)"
REASON_HELP = "why (required, one line; kept in the audit trail)"


def _app() -> App:
    from tasks.delivery import get_app

    return get_app()


def _delivery_id(text: str) -> uuid.UUID:
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
    return name if name and _line_problem(name) is None else f"uid {os.getuid()}"


def _actor(args: argparse.Namespace) -> str:
    """`cli:<OS user>`; `--actor NAME` is recorded next to the OS user, never instead of it."""
    who = f"cli:{os_user()}"
    given = getattr(args, "actor", None)
    if given is None:
        return who
    return f"{_one_line(given, 'actor', MAX_ACTOR_CHARS)} via {who}"


def _reason(args: argparse.Namespace) -> str:
    """The operator's reason for a change: required, one line of text."""
    return _one_line(args.reason or "", "reason", MAX_REASON_CHARS)


def _one_line(value: str, field: str, limit: int) -> str:
    text = value.strip()
    if not text:
        raise ValidationError(field, f"--{field} must not be empty")
    if len(text) > limit:
        raise ValidationError(field, f"--{field} is longer than {limit} characters")
    problem = _line_problem(text)
    if problem:
        raise ValidationError(field, f"--{field} contains {problem}")
    return text


def _line_problem(text: str) -> str | None:
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            return f"a control or invisible character (U+{ord(char):04X})"
    return None


def _read_stdin_text(what: str) -> str:
    """All of stdin as UTF-8 text; a ValidationError (not a traceback) when it is not."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # stdin replaced by a text stream (embedding, tests): already decoded
        return str(sys.stdin.read())
    data = raw.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(
            what, f"{what} on stdin is not UTF-8 text (byte {exc.start + 1})"
        ) from None


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
    append_private(path, entry + "\n")  # 0600 from its first byte, in a 0700 directory
    print(f"added key {entry.split(':')[0]} to {path}; it now encrypts new letters")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from core.crypto import letters_to_rotate, rotate_letters
    from tasks.cli_ops import Progress

    app = _app()
    if args.batch_size < 1:
        raise CapsuleError("--batch-size must be at least 1")
    # Progress on stderr (a bar on a terminal, a line a second otherwise): stdout stays the report.
    total = letters_to_rotate(app.session_factory, app.keyring)
    progress = Progress("keys rotate", total, words=("rotated", "skipped"))
    result = rotate_letters(
        app.session_factory, app.keyring, batch_size=args.batch_size, progress=progress.update
    )
    progress.update(result.rotated, len(result.skipped), final=True)
    skipped = result.skipped
    if args.json:
        print(
            json.dumps(
                {
                    "active_key": app.keyring.active_id,
                    "rotated": result.rotated,
                    "skipped": [
                        {"letter_id": str(s.letter_id), "key_id": s.key_id, "reason": s.reason}
                        for s in skipped
                    ],
                }
            )
        )
    else:
        print(
            f"re-encrypted {result.rotated} letters under key {app.keyring.active_id}; "
            f"skipped {len(skipped)}"
        )
        for s in skipped:
            why = (
                f"key {s.key_id!r} is not in the keyring"
                if s.reason == "missing_key"
                else f"fails authentication under key {s.key_id!r} (tampered or wrong key)"
            )
            print(f"skipped letter {s.letter_id}: {why}")
    # Non-zero so a script notices; nothing failed to be written, so not the error status 2.
    return 1 if skipped else 0


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
    body = args.body if args.body is not None else _read_stdin_text("the letter")
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
            "bounce_kind",
            "reported_at",
            "held_at",
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
        events = session.scalars(
            select(WebhookEvent)
            .where(WebhookEvent.delivery_id == delivery_id)
            .order_by(WebhookEvent.id)
        ).all()
        data["provider_events"] = [
            {
                "provider": e.provider,
                "type": e.type,
                "bounce_kind": e.bounce_kind,
                "occurred_at": e.occurred_at,
                "received_at": e.received_at,
                "outcome": e.outcome,
            }
            for e in events
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
    actor, reason = _actor(args), _reason(args)  # refused before anything is opened
    app = _app()
    cancel_delivery(
        app.session_factory,
        app.enqueuer,
        _delivery_id(args.id),
        now=utcnow(),
        actor=actor,
        reason=reason,
    )
    print(f"canceled {args.id}")
    return 0


def cmd_reschedule(args: argparse.Namespace) -> int:
    actor, reason = _actor(args), _reason(args)  # refused before anything is opened
    app = _app()
    now = utcnow()
    reschedule_delivery(
        app.session_factory,
        app.enqueuer,
        app.settings,
        _delivery_id(args.id),
        parse_when(args.at, now),
        now=now,
        actor=actor,
        reason=reason,
    )
    print(f"rescheduled {args.id}")
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    actor, reason = _actor(args), _reason(args)  # refused before anything is opened
    app = _app()
    requeue_delivery(
        app.session_factory,
        app.enqueuer,
        _delivery_id(args.id),
        now=utcnow(),
        actor=actor,
        reason=reason,
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
        return _read_stdin_text("the password").split("\n", 1)[0].rstrip("\r")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise CapsuleError("the two passwords differ")
    return first


def cmd_operator_add(args: argparse.Namespace) -> int:
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
    append_private(path, ("\n" if existing and not existing.endswith("\n\n") else "") + entry)
    print(f"added operator {username} ({role.value}) to {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its refusals as one line like every other error (exit 2)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        _fail(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")
        raise SystemExit(EXIT_ERROR)


def _whole_number(low: int, high: int) -> Callable[[str], int]:
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


def cmd_webhooks_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from core.receiver import build_receiver
    from tasks.webhooks import process_webhook

    app = _app()

    def on_stored(event_id: int) -> None:
        process_webhook(event_id)  # enqueued; the backstop covers a lost one

    receiver = build_receiver(app, on_stored, clock=utcnow)
    uvicorn.run(
        receiver,
        host=args.host,
        port=args.port,
        proxy_headers=True,
        forwarded_allow_ips=app.settings.webhook_forwarded_allow_ips,
        log_level="info",
    )
    return 0


def cmd_webhooks_process(args: argparse.Namespace) -> int:
    from core.webhooks import process_pending

    now = utcnow()
    done = process_pending(_app(), now=now, older_than=now)
    print(f"{done} stored webhook events processed")
    return 0


def cmd_suppression_list(args: argparse.Namespace) -> int:
    from core.webhooks import list_suppressions

    with session_scope(_app().session_factory) as session:
        rows = list_suppressions(session, include_removed=args.all)
    print(json.dumps(rows, indent=2, default=lambda v: v.isoformat()))
    return 0


def cmd_suppression_add(args: argparse.Namespace) -> int:
    from core.webhooks import add_suppression

    actor, reason = _actor(args), _reason(args)
    added = add_suppression(
        _app().session_factory, args.address, now=utcnow(), actor=actor, reason=reason
    )
    print("added" if added else "already on the list")
    return 0


def cmd_suppression_remove(args: argparse.Namespace) -> int:
    from core.webhooks import remove_suppression

    actor, reason = _actor(args), _reason(args)
    remove_suppression(
        _app().session_factory, args.address, now=utcnow(), actor=actor, reason=reason
    )
    print("removed")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from core.webhooks import release_held

    actor, reason = _actor(args), _reason(args)
    app = _app()
    release_held(
        app.session_factory,
        app.enqueuer,
        _delivery_id(args.id),
        now=utcnow(),
        actor=actor,
        reason=reason,
    )
    print("released")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="capsule", description="Capsule delivery: letters to one's future self.")
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
    from tasks.cli_ops import add_db_commands, add_ops_commands

    add_db_commands(db, add)

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
        "rotate",
        cmd_keys_rotate,
        "re-encrypt every letter under the newest key (resumable); letters it cannot open are "
        "skipped and listed, and the exit status is 1 when any were",
        keys,
    )
    p.add_argument("--batch-size", type=_whole_number(1, 100_000), default=500)
    p.add_argument(
        "--json", action="store_true", help="print the counts and the skipped letters as JSON"
    )

    user = sub.add_parser("user", help="accounts").add_subparsers(
        dest="user_command", required=True, metavar="COMMAND"
    )
    p = add("add", cmd_user_add, "create an account (or grant credits to an existing one)", user)
    p.add_argument("email")
    p.add_argument("--name", default="")
    p.add_argument(
        "--credits",
        type=_whole_number(0, credits.MAX_GRANT),
        default=0,
        help=f"credits to grant (0 to {credits.MAX_GRANT})",
    )

    p = add("demo", cmd_demo, "seed two weeks of realistic demo deliveries (once)")
    p.add_argument("--count", type=_whole_number(1, 1_000_000), default=3000)
    p.add_argument("--force", action="store_true")

    p = add("schedule", cmd_schedule, "schedule a letter; prints the delivery id")
    p.add_argument("--user", required=True, help="account email of the letter's owner")
    p.add_argument("--to", required=True, help="recipient address")
    p.add_argument("--at", required=True, help="ISO 8601 time or +30s, +2h, +3d, +1w")
    p.add_argument("--subject", required=True)
    p.add_argument("--body", help="letter text (default: read stdin, UTF-8)")
    p.add_argument("--actor", help=ACTOR_HELP)

    p = add("status", cmd_status, "print a delivery and its attempts as JSON (never the letter)")
    p.add_argument("id")

    for name, fn, text in (
        ("cancel", cmd_cancel, "cancel a scheduled or failed delivery (refunds its credit)"),
        ("requeue", cmd_requeue, "send a failed delivery again now"),
    ):
        p = add(name, fn, text)
        p.add_argument("id")
        p.add_argument("--reason", required=True, help=REASON_HELP)
        p.add_argument("--actor", help=ACTOR_HELP)
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
    p.add_argument("--at", required=True, help="ISO 8601 time or +30s, +2h, +3d, +1w")
    p.add_argument("--reason", required=True, help=REASON_HELP)
    p.add_argument("--actor", help=ACTOR_HELP)

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

    hooks = sub.add_parser("webhooks", help="provider webhooks").add_subparsers(
        dest="webhooks_command", required=True, metavar="COMMAND"
    )
    p = add(
        "serve",
        cmd_webhooks_serve,
        "run the webhook receiver (/webhooks/resend, /webhooks/postmark)",
        hooks,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_whole_number(1, 65535), default=8300)
    add("process", cmd_webhooks_process, "process every stored, unprocessed event now", hooks)

    suppression = sub.add_parser(
        "suppression", help="addresses no letter is sent to blindly"
    ).add_subparsers(dest="suppression_command", required=True, metavar="COMMAND")
    p = add("list", cmd_suppression_list, "print the suppression list as JSON", suppression)
    p.add_argument("--all", action="store_true", help="include removed entries")
    for name, fn, text in (
        ("add", cmd_suppression_add, "put an address on the list by hand"),
        ("remove", cmd_suppression_remove, "take an address off the list (audited)"),
    ):
        p = add(name, fn, text, suppression)
        p.add_argument("address")
        p.add_argument("--reason", required=True, help=REASON_HELP)
        p.add_argument("--actor", help=ACTOR_HELP)
    p = add(
        "release",
        cmd_release,
        "send a letter held for a suppressed address after all (due now)",
    )
    p.add_argument("id")
    p.add_argument("--reason", required=True, help=REASON_HELP)
    p.add_argument("--actor", help=ACTOR_HELP)

    add_ops_commands(sub, add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    for position, argument in enumerate(arguments, start=1):
        # Bytes that are not UTF-8 arrive as lone surrogates: nothing downstream can store them.
        if any("\ud800" <= char <= "\udfff" for char in argument):
            _fail(f"argument {position} is not UTF-8 text")
            return EXIT_ERROR
    args = build_parser().parse_args(arguments)
    try:
        _start_telemetry()
        return int(args.fn(args))
    except CapsuleError as exc:
        _fail(str(exc))
    except DBAPIError as exc:
        _fail(_database_problem(exc))
    except OSError as exc:
        _fail(_file_problem(exc))
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    return EXIT_ERROR


def _fail(message: str) -> None:
    """The one line on stderr every refusal ends as."""
    print(f"capsule: error: {' '.join(message.split())}", file=sys.stderr)


def _file_problem(exc: OSError) -> str:
    where = f": {exc.filename!r}" if exc.filename else ""
    return f"{exc.strerror or type(exc).__name__}{where}"


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
