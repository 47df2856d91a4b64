"""The ops commands of `capsule`: the failed set, bulk requeues, the schema's revision.

    capsule failed list      triage's filter as flags; the whole set, streamed as a table,
                             CSV (with a header row) or JSON, newest first
    capsule bulk requeue     the console's bulk requeue (core.bulk: the same checks, guard rails
                             and audit): a dry run, then a background run on a consumer,
                             watched here with a progress display; Ctrl-C aborts it
    capsule bulk resume      requeue what an aborted operation left
    capsule bulk status      one operation (--follow watches it); `bulk list` the newest
    capsule bulk abort       stop an operation before its next row
    capsule db current       the schema's revision against the newest; `db history` all of them

Refusals follow tasks/cli.py: one line on stderr, exit 2, nothing written. Progress goes to
stderr (a redrawn bar on a terminal, plain lines otherwise), so stdout stays parseable.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import re
import sys
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import IO, Any

from core.db import session_scope
from core.errors import CapsuleError, InvalidDeliveryTime, NotFound, ValidationError
from core.failed_filter import FailedFilter
from core.models import ErrorClass
from core.operators import Operator, Role
from core.policy import parse_when, short_repr, utcnow
from tasks import cli

FORMATS = ("table", "csv", "json")
ERROR_CLASSES = tuple(c.value for c in ErrorClass if c != ErrorClass.MISSING_KEY)
MAX_SEARCH_CHARS = 200
POLL_SECONDS = 0.5
PENDING_HINT_AFTER = 10.0  # seconds a launched operation may wait for a consumer unremarked
OPERATION_ID = cli._whole_number(1, 2**63 - 1)
_AGO = re.compile(r"^-?(\d+)([smhdw])$")


# ---------------------------------------------------------------- the filter


def _filter(args: argparse.Namespace, now: datetime) -> FailedFilter:
    """Triage's filter from the flags; a ValidationError names the flag that is wrong."""
    classes: list[str] = []
    for value in args.error_class or ():
        for name in value.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in ERROR_CLASSES:
                raise ValidationError(
                    "error_class",
                    f"--error-class: unknown class {short_repr(name)}: expected one of "
                    + ", ".join(ERROR_CLASSES),
                )
            if name not in classes:
                classes.append(name)
    since = _moment(args.since, "since", now) if args.since else None
    until = _moment(args.until, "until", now) if args.until else None
    if since is not None and until is not None and since > until:
        raise ValidationError("since", "--since is after --until: nothing could match")
    provider = cli._one_line(args.provider, "provider", 64).lower() if args.provider else None
    domain = cli._one_line(args.domain, "domain", 255).lower() if args.domain else None
    search = cli._one_line(args.search, "search", MAX_SEARCH_CHARS) if args.search else None
    return FailedFilter(tuple(classes), provider, since, until, domain, search)


def _moment(text: str, flag: str, now: datetime) -> datetime:
    """`2h` or `-2h` ago (s, m, h, d, w), or an ISO 8601 time (UTC if no offset)."""
    raw = text.strip()
    try:
        match = _AGO.match(raw)
        if match:
            return now - (parse_when(f"+{match[1]}{match[2]}", now) - now)
        return parse_when(raw, now)
    except InvalidDeliveryTime:
        raise ValidationError(
            flag,
            f"--{flag}: cannot read {short_repr(text)}: use ISO 8601 or a time ago as "
            "N[smhdw], e.g. 2h, 3d",
        ) from None


def add_filter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--error-class",
        action="append",
        metavar="CLASS",
        help="only these classes (repeat or comma-separate): " + ", ".join(ERROR_CLASSES),
    )
    p.add_argument("--provider", help="provider of the last attempt (resend, postmark, smtp…)")
    p.add_argument("--since", help="failed at or after: ISO 8601, or a time ago like 2h, 3d")
    p.add_argument("--until", help="failed at or before: ISO 8601, or a time ago like 30m")
    p.add_argument("--domain", help="recipient address domain, e.g. gmail.com")
    p.add_argument("--search", help="text in the recipient's or the owner's email address")


# ---------------------------------------------------------------- progress


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, plain lines otherwise (at
    most one every `every` seconds, and the last one always)."""

    WIDTH = 30

    def __init__(
        self,
        label: str,
        total: int,
        *,
        words: tuple[str, str] = ("done", "skipped"),
        stream: IO[str] | None = None,
        tty: bool | None = None,
        every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.words = label, total, words
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every, self.clock = every, clock
        self.last_line: float | None = None
        self.last_shown: tuple[int, int] | None = None
        self.drawn = False

    def update(self, done: int, skipped: int = 0, *, final: bool = False) -> None:
        shown = (done, skipped)
        if self.tty:
            if shown == self.last_shown and not final:
                return
            self.stream.write("\r" + self._text(done, skipped, bar=True) + "\x1b[K")
            self.drawn = True
            if final:
                self.stream.write("\n")
                self.drawn = False
        else:
            at = self.clock()
            if shown == self.last_shown and not (final and self.last_line is None):
                return
            if not final and self.last_line is not None and at - self.last_line < self.every:
                return
            self.stream.write(self._text(done, skipped, bar=False) + "\n")
            self.last_line = at
        self.last_shown = shown
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own, below the bar."""
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False
        self.stream.write(message + "\n")
        self.stream.flush()

    def _text(self, done: int, skipped: int, *, bar: bool) -> str:
        processed = done + skipped
        share = 1.0 if self.total <= 0 else min(1.0, processed / self.total)
        counts = f"{processed:,}/{self.total:,} ({share:.0%}): {self.words[0]} {done:,}, "
        counts += f"{self.words[1]} {skipped:,}"
        if not bar:
            return f"{self.label}: {counts}"
        filled = round(share * self.WIDTH)
        return f"{self.label} [{'#' * filled}{'-' * (self.WIDTH - filled)}] {counts}"


# ---------------------------------------------------------------- capsule failed list

TABLE = [  # column, header, width (the last one takes what is left, cut)
    ("id", "id", 36),
    ("failed_at", "failed at (UTC)", 19),
    ("error_class", "error class", 13),
    ("provider", "provider", 8),
    ("status_code", "code", 4),
    ("attempts", "tries", 5),
    ("recipient_email", "recipient", 28),
    ("owner_email", "owner", 28),
    ("notified", "notified", 8),
    ("last_error", "last error", 60),
]


def cmd_failed_list(args: argparse.Namespace) -> int:
    from core import failed_filter

    now = utcnow()
    flt = _filter(args, now)
    app = cli._app()
    out = sys.stdout
    try:
        with session_scope(app.session_factory) as session:
            rows: Iterable[dict[str, Any]] = failed_filter.failed_rows(
                session, flt, now=now, page_size=args.page_size
            )
            if args.limit:
                rows = _first(rows, args.limit)
            count = WRITERS[args.format](rows, out)
        out.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        _silence_stdout()
        return 0
    if args.format == "table":
        first = "the first " if args.limit and count >= args.limit else ""
        print(f"{first}{count:,} failed deliveries ({flt.pinned(now).describe()})", file=sys.stderr)
    return 0


def _first(rows: Iterable[dict[str, Any]], limit: int) -> Iterable[dict[str, Any]]:
    for n, row in enumerate(rows):
        if n >= limit:
            return
        yield row


def _silence_stdout() -> None:
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def write_csv(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    from core.failed_filter import FAILED_COLUMNS

    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FAILED_COLUMNS)
    count = 0
    for row in rows:
        writer.writerow(["" if row[c] is None else _plain(row[c]) for c in FAILED_COLUMNS])
        count += 1
    return count


def write_json(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """One JSON array, written row by row (never held whole in memory)."""
    count = 0
    out.write("[")
    for row in rows:
        out.write(",\n" if count else "\n")
        out.write(json.dumps({k: _plain(v) for k, v in row.items()}))
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count


def write_table(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    def cell(value: Any, width: int) -> str:
        if isinstance(value, datetime):
            value = f"{value:%Y-%m-%d %H:%M:%S}"
        text = _printable("" if value is None else str(value))
        return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)

    out.write("  ".join(cell(h, w) for _, h, w in TABLE).rstrip() + "\n")
    count = 0
    for row in rows:
        out.write("  ".join(cell(row[c], w) for c, _, w in TABLE).rstrip() + "\n")
        count += 1
    return count


def _printable(text: str) -> str:
    """Text from providers and users, safe for a terminal: no escapes, no line breaks."""
    return "".join(
        " " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs") else ch for ch in text
    )


WRITERS: dict[str, Callable[[Iterable[dict[str, Any]], IO[str]], int]] = {
    "table": write_table,
    "csv": write_csv,
    "json": write_json,
}


# ---------------------------------------------------------------- capsule bulk


def _operator(args: argparse.Namespace) -> Operator:
    """Whoever can reach the database from a shell is ops; the actor names them."""
    return Operator(cli._actor(args), Role.OPS, source="cli")


def _print_plan(plan: Any, flt: FailedFilter, rate: float, notes: list[str]) -> None:
    print(f"filter: {flt.describe()}")
    print(f"matching now: {plan.count:,} failed deliveries")
    for title, counts in (
        ("by error class", plan.by_error_class),
        ("by provider", plan.by_provider),
    ):
        if counts:
            print(f"{title}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    if plan.needs_credit:
        print(
            f"credit: {plan.needs_credit:,} had their credit refunded and reserve one again; "
            f"{plan.short_of_credit:,} of them would be skipped (owner out of credit)"
        )
    print(
        f"would requeue: {plan.would_requeue:,} at {rate:g}/s (about {_duration(plan.estimated_seconds)})"
    )
    if plan.first_ids:
        print("first: " + ", ".join(plan.first_ids))
    for note in notes:
        print(note)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def _confirmed_count(args: argparse.Namespace, count: int) -> int:
    """The count the operator confirms: --confirm-count, or typed at a terminal."""
    if args.confirm_count is not None:
        return int(args.confirm_count)
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise ValidationError(
            "confirm_count",
            f"without a terminal, confirm with --confirm-count {count} (the count matching now)",
        )
    typed = input(f"type {count} to requeue {count:,} deliveries (anything else cancels): ")
    try:
        return int(typed.strip().replace(",", ""))
    except ValueError:
        raise ValidationError("confirm_count", "canceled: nothing was changed") from None


def _dry_run(app: Any, flt: FailedFilter, *, now: datetime, rate: float) -> Any:
    """The dry run, and the console's preview notes: the risky classes the filter names (with
    the single-row dialog's warnings) or leaves out, and an active operation it overlaps."""
    from core import bulk

    with session_scope(app.session_factory) as session:
        plan = bulk.dry_run(session, flt, now=now, rate_per_second=rate)
        shown = bulk.preview(session, flt, now=now, sample=0)
    notes = [f"warning: {w}" for w in getattr(shown, "warnings", None) or ()]
    left_out = getattr(shown, "left_out", None) or {}
    if left_out:
        notes.append(
            "left out of any class (name them with --error-class to include them): "
            + ", ".join(f"{c} {n:,}" for c, n in sorted(left_out.items()))
        )
    active = getattr(shown, "active", None)
    if active is not None:
        notes.append(f"warning: {bulk.conflict_message(active)}")
    return plan, notes


def cmd_bulk_requeue(args: argparse.Namespace) -> int:
    from core import bulk

    actor, reason = cli._actor(args), cli._reason(args)  # refused before anything is opened
    rate = bulk.validate_rate(args.rate)
    now = utcnow()
    flt = _filter(args, now).pinned(now)  # the set the dry run shows is the set confirmed
    app = cli._app()
    plan, notes = _dry_run(app, flt, now=now, rate=rate)
    _print_plan(plan, flt, rate, notes)
    if args.dry_run:
        print("dry run: nothing was changed")
        return 0
    if plan.count == 0:
        raise ValidationError("filter", "no failed delivery matches this filter")
    confirmed = _confirmed_count(args, plan.count)
    from tasks.bulk import enqueue

    launched = bulk.launch(
        app,
        Operator(actor, Role.OPS, source="cli"),
        flt,
        reason=reason,
        confirm_count=confirmed,
        rate_per_second=rate,
        now=utcnow(),
        enqueue=enqueue,
    )
    return _after_launch(app, args, launched)


def cmd_bulk_resume(args: argparse.Namespace) -> int:
    from core import bulk
    from core.queries.bulk import bulk_operation

    actor, reason = cli._actor(args), cli._reason(args)
    rate = bulk.validate_rate(args.rate) if args.rate is not None else None
    app = cli._app()
    with session_scope(app.session_factory) as session:
        view = bulk_operation(session, args.id)
    if view is None:
        raise NotFound("bulk operation", args.id)
    if view.state not in bulk.RESUMABLE_STATES:
        raise ValidationError(
            "state",
            f"bulk operation {view.id} is {view.state}: only an aborted or failed operation "
            "can be resumed",
        )
    flt = FailedFilter.from_dict(view.filter)
    shown_rate = view.rate_per_second if rate is None else rate
    plan, notes = _dry_run(app, flt, now=utcnow(), rate=shown_rate)
    print(f"resuming bulk #{view.id} ({view.done_count:,} requeued before it stopped)")
    _print_plan(plan, flt, shown_rate, notes)
    if args.dry_run:
        print("dry run: nothing was changed")
        return 0
    if plan.count == 0:
        raise ValidationError("filter", f"nothing is left of bulk operation {view.id}")
    confirmed = _confirmed_count(args, plan.count)
    from tasks.bulk import enqueue

    launched = bulk.resume(
        app,
        Operator(actor, Role.OPS, source="cli"),
        view.id,
        reason=reason,
        confirm_count=confirmed,
        rate_per_second=rate,
        now=utcnow(),
        enqueue=enqueue,
    )
    return _after_launch(app, args, launched)


def _after_launch(app: Any, args: argparse.Namespace, launched: Any) -> int:
    op = launched.operation_id
    if launched.state == "error":
        raise CapsuleError(
            f"bulk operation {op} ended in error: the broker refused its background task "
            f"(nothing was requeued; see `capsule bulk status {op}`)"
        )
    print(f"bulk #{op}: {launched.expected_count:,} deliveries queued for a consumer")
    if args.detach:
        print(f"follow it with `capsule bulk status {op} --follow`")
        return 0
    return _watch(app, op, operator=_operator(args), abort_on_interrupt=True)


def _watch(app: Any, operation_id: int, *, operator: Operator, abort_on_interrupt: bool) -> int:
    """Follow the operation until it ends; Ctrl-C aborts it (or only stops watching)."""
    view = _view(app, operation_id)
    progress = Progress(f"bulk #{operation_id}", view.expected_count, words=("requeued", "skipped"))
    try:
        view = _follow(app, view, progress)
    except KeyboardInterrupt:
        if not abort_on_interrupt:
            progress.note("")
            cli._fail(f"interrupted: bulk #{operation_id} goes on; it was not aborted")
            return 130
        return _abort_at_terminal(app, operation_id, operator, progress)
    progress.update(view.done_count, view.skipped_count, final=True)
    print(
        f"bulk #{operation_id} {view.state}: requeued {view.done_count:,}, skipped "
        f"{view.skipped_count:,} of {view.expected_count:,}"
        + (f" ({view.error_message})" if view.error_message else "")
    )
    return 0 if view.state == "done" else 1


def _abort_at_terminal(app: Any, operation_id: int, operator: Operator, progress: Progress) -> int:
    from core import bulk

    progress.note(f"aborting bulk #{operation_id} (it stops before its next row)…")
    with contextlib.suppress(ValidationError):  # it ended meanwhile: the state read says how
        bulk.request_abort(
            app.session_factory,
            operator,
            operation_id,
            now=utcnow(),
            reason="interrupted at the terminal (Ctrl-C)",
        )
    view = _view(app, operation_id)
    try:
        # The runner looks at the state after each row: one row's time at its rate, plus slack.
        view = _follow(app, view, progress, ceiling=10 + 2 / max(view.rate_per_second, 0.01))
    except KeyboardInterrupt:
        view = _view(app, operation_id)
    progress.update(view.done_count, view.skipped_count, final=True)
    left = (
        f"; `capsule bulk resume {operation_id} --reason …` requeues the rest"
        if view.state in bulk.RESUMABLE_STATES or view.active
        else ""
    )
    cli._fail(
        f"interrupted: bulk #{operation_id} {view.state} after {view.processed:,} of "
        f"{view.expected_count:,} (requeued {view.done_count:,}, skipped "
        f"{view.skipped_count:,}){left}"
    )
    return 130


def _view(app: Any, operation_id: int) -> Any:
    from core.queries.bulk import bulk_operation

    with session_scope(app.session_factory) as session:
        view = bulk_operation(session, operation_id)
    if view is None:
        raise NotFound("bulk operation", operation_id)
    return view


def _follow(app: Any, view: Any, progress: Progress, *, ceiling: float | None = None) -> Any:
    """Poll the operation's row until it is no longer active (or `ceiling` seconds passed)."""
    started = time.monotonic()
    hinted = False
    while view.active:
        progress.update(view.done_count, view.skipped_count)
        waited = time.monotonic() - started
        if ceiling is not None and waited > ceiling:
            break
        if view.state == "pending" and waited > PENDING_HINT_AFTER and not hinted:
            progress.note(f"bulk #{view.id} waits for a consumer to start it: is one running?")
            hinted = True
        time.sleep(POLL_SECONDS)
        view = _view(app, view.id)
    return view


def _view_dict(view: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: _plain(v) for k, v in asdict(view).items()}


def cmd_bulk_status(args: argparse.Namespace) -> int:
    app = cli._app()
    view = _view(app, args.id)
    if args.follow and view.active:
        return _watch(app, view.id, operator=_operator(args), abort_on_interrupt=False)
    if args.json:
        print(json.dumps(_view_dict(view), indent=2))
        return 0
    described = FailedFilter.from_dict(view.filter).describe()
    print(f"bulk #{view.id} {view.action}: {view.state}")
    print(f"filter: {described}")
    print(
        f"progress: {view.processed:,}/{view.expected_count:,} (requeued {view.done_count:,}, "
        f"skipped {view.skipped_count:,}) at {view.rate_per_second:g}/s"
    )
    print(f"by: {view.actor}; reason: {_printable(view.reason)}")
    print(f"created {view.created_at:%Y-%m-%d %H:%M:%S} UTC, updated {view.updated_at:%H:%M:%S}")
    if view.finished_at:
        print(f"finished {view.finished_at:%Y-%m-%d %H:%M:%S} UTC")
    if view.error_message:
        print(f"error: {_printable(view.error_message)}")
    return 0


def cmd_bulk_list(args: argparse.Namespace) -> int:
    from core.queries.bulk import bulk_history

    app = cli._app()
    with session_scope(app.session_factory) as session:
        frame = bulk_history(session, limit=args.limit)
    if args.json:
        print(frame.to_json(orient="records", date_format="iso"))
        return 0
    if frame.empty:
        print("no bulk operations yet")
        return 0
    print(frame.to_string(index=False))
    return 0


def cmd_bulk_abort(args: argparse.Namespace) -> int:
    from core import bulk

    operator, reason = _operator(args), cli._reason(args)
    app = cli._app()
    state = bulk.request_abort(app.session_factory, operator, args.id, now=utcnow(), reason=reason)
    then = "" if state == "aborted" else " (the runner stops before its next row)"
    print(f"bulk #{args.id}: {state}{then}")
    return 0


# ---------------------------------------------------------------- capsule db current|history


def _script(app: Any) -> Any:
    from alembic.script import ScriptDirectory

    from core.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config(app.engine))


def cmd_db_current(args: argparse.Namespace) -> int:
    from core.migrate import current

    app = cli._app()
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


def cmd_db_history(args: argparse.Namespace) -> int:
    from core.migrate import current

    app = cli._app()
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


# ---------------------------------------------------------------- registration


def add_db_commands(db: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add(
        "current", cmd_db_current, "print the schema's revision and whether it is the newest", db
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 when not at the newest revision")
    add(
        "history", cmd_db_history, "list the migrations, newest first, marking head and current", db
    )


def add_ops_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    failed = sub.add_parser("failed", help="failed deliveries (triage)").add_subparsers(
        dest="failed_command", required=True, metavar="COMMAND"
    )
    p = add(
        "list",
        cmd_failed_list,
        "list every failed delivery the filter matches, newest first (streamed; no letter text)",
        failed,
    )
    add_filter_flags(p)
    p.add_argument("--format", choices=FORMATS, default="table", help="table (default), csv, json")
    p.add_argument("--limit", type=cli._whole_number(1, 10**9), help="stop after this many rows")
    p.add_argument(
        "--page-size", type=cli._whole_number(1, 10_000), default=500, help=argparse.SUPPRESS
    )

    bulk = sub.add_parser("bulk", help="bulk operations on failed deliveries").add_subparsers(
        dest="bulk_command", required=True, metavar="COMMAND"
    )
    p = add(
        "requeue",
        cmd_bulk_requeue,
        "requeue every failed delivery the filter matches, on a consumer at --rate per second: "
        "a dry run first, then progress; Ctrl-C aborts (resumable)",
        bulk,
    )
    add_filter_flags(p)
    _launch_flags(p, default_rate=5.0)

    p = add("resume", cmd_bulk_resume, "requeue what an aborted operation left", bulk)
    p.add_argument("id", type=OPERATION_ID)
    _launch_flags(p, default_rate=None)

    p = add("status", cmd_bulk_status, "show one bulk operation", bulk)
    p.add_argument("id", type=OPERATION_ID)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--follow", action="store_true", help="watch it until it ends (Ctrl-C stops watching)"
    )

    p = add("list", cmd_bulk_list, "the newest bulk operations", bulk)
    p.add_argument("--limit", type=cli._whole_number(1, 500), default=20)
    p.add_argument("--json", action="store_true")

    p = add("abort", cmd_bulk_abort, "stop a bulk operation before its next row", bulk)
    p.add_argument("id", type=OPERATION_ID)
    p.add_argument("--reason", required=True, help=cli.REASON_HELP)
    p.add_argument("--actor", help=cli.ACTOR_HELP)


def _launch_flags(p: argparse.ArgumentParser, *, default_rate: float | None) -> None:
    p.add_argument("--reason", required=True, help=cli.REASON_HELP)
    p.add_argument("--actor", help=cli.ACTOR_HELP)
    p.add_argument(
        "--rate",
        type=_rate,
        default=default_rate,
        help="rows per second (above 0, at most 100; default "
        + ("5" if default_rate is not None else "the operation's")
        + ")",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would happen; change nothing")
    p.add_argument(
        "--confirm-count",
        type=cli._whole_number(0, 10**9),
        help="the count the dry run showed (required without a terminal; typed at one otherwise)",
    )
    p.add_argument("--detach", action="store_true", help="launch and return; do not watch")


def _rate(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {short_repr(text)}") from None
    if not 0 < value <= 100 or value != value:  # core.bulk.MAX_RATE_PER_SECOND
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 100, got {text.strip()}")
    return value
