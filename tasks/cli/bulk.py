"""`capsule delivery bulk …`: the console's bulk requeue from a terminal (core.bulk: the same
checks, guard rails and audit).

    requeue   a dry run, then a background run on a consumer, watched here with a progress
              display; Ctrl-C aborts it
    resume    requeue what an aborted operation left
    status    one operation (--follow watches it); `list` the newest
    abort     stop an operation before its next row

Progress goes to stderr (a redrawn bar on a terminal, plain lines otherwise), so stdout stays
parseable.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

from core import bulk
from core.bootstrap import App
from core.db import session_scope
from core.errors import CapsuleError, NotFound, ValidationError
from core.failed_filter import FailedFilter
from core.operators import Operator, Role
from core.policy import short_repr, utcnow
from tasks.cli.common import (
    ACTOR_HELP,
    REASON_HELP,
    Command,
    actor,
    fail,
    get_app,
    reason,
    whole_number,
)
from tasks.cli.failed import add_filter_flags, plain, printable, read_filter
from tasks.cli.progress import Progress

if TYPE_CHECKING:  # the console's read models bring pandas; only two commands need them
    from core.queries.bulk import BulkView

POLL_SECONDS = 0.5
PENDING_HINT_AFTER = 10.0  # seconds a launched operation may wait for a consumer unremarked
OPERATION_ID = whole_number(1, 2**63 - 1)
_NO_MATCH = "no failed delivery matches this filter"


def _operator(args: argparse.Namespace) -> Operator:
    """Whoever can reach the database from a shell is ops; the actor names them."""
    return Operator(actor(args), Role.OPS, source="cli")


def _print_plan(plan: bulk.DryRun, flt: FailedFilter, rate: float, notes: list[str]) -> None:
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


def _dry_run(
    app: App, flt: FailedFilter, *, now: datetime, rate: float
) -> tuple[bulk.DryRun, list[str]]:
    """The dry run, and the console's preview notes: the risky classes the filter names (with
    the single-row dialog's warnings) or leaves out, and an active operation it overlaps."""
    with session_scope(app.session_factory) as session:
        plan = bulk.dry_run(session, flt, now=now, rate_per_second=rate)
        shown = bulk.preview(session, flt, now=now, sample=0)
    notes = [f"warning: {w}" for w in shown.warnings]
    left_out = shown.left_out
    if left_out:
        notes.append(
            "left out of any class (name them with --error-class to include them): "
            + ", ".join(f"{c} {n:,}" for c, n in sorted(left_out.items()))
        )
    if shown.active is not None:
        notes.append(f"warning: {bulk.conflict_message(shown.active)}")
    return plan, notes


def cmd_requeue(args: argparse.Namespace) -> int:
    who, why = actor(args), reason(args)  # refused before anything is opened
    rate = bulk.validate_rate(args.rate)
    now = utcnow()
    flt = read_filter(args, now).pinned(now)  # the set the dry run shows is the set confirmed
    app = get_app()
    plan, notes = _dry_run(app, flt, now=now, rate=rate)
    _print_plan(plan, flt, rate, notes)
    start = functools.partial(bulk.launch, app, Operator(who, Role.OPS, source="cli"), flt)
    return _launch(app, args, plan, start, why=why, rate=rate, nothing_matches=_NO_MATCH)


def cmd_resume(args: argparse.Namespace) -> int:
    who, why = actor(args), reason(args)
    rate = bulk.validate_rate(args.rate) if args.rate is not None else None
    app = get_app()
    with session_scope(app.session_factory) as session:
        view = _bulk_operation(session, args.id)
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
    start = functools.partial(bulk.resume, app, Operator(who, Role.OPS, source="cli"), view.id)
    left = f"nothing is left of bulk operation {view.id}"
    return _launch(app, args, plan, start, why=why, rate=rate, nothing_matches=left)


def _launch(
    app: App,
    args: argparse.Namespace,
    plan: bulk.DryRun,
    start: Callable[..., bulk.Launched],
    *,
    why: str,
    rate: float | None,
    nothing_matches: str,
) -> int:
    """After the dry run: stop there, or confirm the count, launch and watch."""
    if args.dry_run:
        print("dry run: nothing was changed")
        return 0
    if plan.count == 0:
        raise ValidationError("filter", nothing_matches)
    confirmed = _confirmed_count(args, plan.count)
    # Imported on use: tasks.bulk builds the Huey instance from the environment.
    from tasks.bulk import enqueue

    launched = start(
        reason=why,
        confirm_count=confirmed,
        rate_per_second=rate,
        now=utcnow(),
        enqueue=enqueue,
    )
    return _after_launch(app, args, launched)


def _after_launch(app: App, args: argparse.Namespace, launched: bulk.Launched) -> int:
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


def _watch(app: App, operation_id: int, *, operator: Operator, abort_on_interrupt: bool) -> int:
    """Follow the operation until it ends; Ctrl-C aborts it (or only stops watching)."""
    view = _view(app, operation_id)
    progress = Progress(f"bulk #{operation_id}", view.expected_count, words=("requeued", "skipped"))
    try:
        view = _follow(app, view, progress)
    except KeyboardInterrupt:
        if not abort_on_interrupt:
            progress.note("")
            fail(f"interrupted: bulk #{operation_id} goes on; it was not aborted")
            return 130
        return _abort_at_terminal(app, operation_id, operator, progress)
    progress.update(view.done_count, view.skipped_count, final=True)
    print(
        f"bulk #{operation_id} {view.state}: requeued {view.done_count:,}, skipped "
        f"{view.skipped_count:,} of {view.expected_count:,}"
        + (f" ({view.error_message})" if view.error_message else "")
    )
    return 0 if view.state == "done" else 1


def _abort_at_terminal(app: App, operation_id: int, operator: Operator, progress: Progress) -> int:
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
    fail(
        f"interrupted: bulk #{operation_id} {view.state} after {view.processed:,} of "
        f"{view.expected_count:,} (requeued {view.done_count:,}, skipped "
        f"{view.skipped_count:,}){left}"
    )
    return 130


def _view(app: App, operation_id: int) -> BulkView:
    with session_scope(app.session_factory) as session:
        view = _bulk_operation(session, operation_id)
    if view is None:
        raise NotFound("bulk operation", operation_id)
    return view


def _follow(
    app: App, view: BulkView, progress: Progress, *, ceiling: float | None = None
) -> BulkView:
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


def _view_dict(view: BulkView) -> dict[str, Any]:
    return {k: plain(v) for k, v in asdict(view).items()}


def cmd_status(args: argparse.Namespace) -> int:
    app = get_app()
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
    print(f"by: {view.actor}; reason: {printable(view.reason)}")
    print(f"created {view.created_at:%Y-%m-%d %H:%M:%S} UTC, updated {view.updated_at:%H:%M:%S}")
    if view.finished_at:
        print(f"finished {view.finished_at:%Y-%m-%d %H:%M:%S} UTC")
    if view.error_message:
        print(f"error: {printable(view.error_message)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    app = get_app()
    with session_scope(app.session_factory) as session:
        from core.queries.bulk import bulk_history  # pandas, for this command only

        frame = bulk_history(session, limit=args.limit)
    if args.json:
        print(frame.to_json(orient="records", date_format="iso"))
        return 0
    if frame.empty:
        print("no bulk operations yet")
        return 0
    print(frame.to_string(index=False))
    return 0


def cmd_abort(args: argparse.Namespace) -> int:
    operator, why = _operator(args), reason(args)
    app = get_app()
    state = bulk.request_abort(app.session_factory, operator, args.id, now=utcnow(), reason=why)
    then = "" if state == "aborted" else " (the runner stops before its next row)"
    print(f"bulk #{args.id}: {state}{then}")
    return 0


def _launch_flags(p: argparse.ArgumentParser, *, default_rate: float | None) -> None:
    p.add_argument("--reason", required=True, help=REASON_HELP)
    p.add_argument("--actor", help=ACTOR_HELP)
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
        type=whole_number(0, 10**9),
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


def _requeue_arguments(p: argparse.ArgumentParser) -> None:
    add_filter_flags(p)
    _launch_flags(p, default_rate=5.0)


def _resume_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=OPERATION_ID)
    _launch_flags(p, default_rate=None)


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=OPERATION_ID)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--follow", action="store_true", help="watch it until it ends (Ctrl-C stops watching)"
    )


def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=whole_number(1, 500), default=20)
    p.add_argument("--json", action="store_true")


def _abort_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=OPERATION_ID)
    p.add_argument("--reason", required=True, help=REASON_HELP)
    p.add_argument("--actor", help=ACTOR_HELP)


COMMANDS = (
    Command(
        "delivery bulk requeue",
        cmd_requeue,
        "requeue every failed delivery the filter matches, on a consumer at --rate per second: "
        "a dry run first, then progress; Ctrl-C aborts (resumable)",
        _requeue_arguments,
        aliases=("bulk requeue",),
    ),
    Command(
        "delivery bulk resume",
        cmd_resume,
        "requeue what an aborted operation left",
        _resume_arguments,
        aliases=("bulk resume",),
    ),
    Command(
        "delivery bulk status",
        cmd_status,
        "show one bulk operation",
        _status_arguments,
        aliases=("bulk status",),
    ),
    Command(
        "delivery bulk list",
        cmd_list,
        "the newest bulk operations",
        _list_arguments,
        aliases=("bulk list",),
    ),
    Command(
        "delivery bulk abort",
        cmd_abort,
        "stop a bulk operation before its next row",
        _abort_arguments,
        aliases=("bulk abort",),
    ),
)


def _bulk_operation(session: Any, operation_id: int) -> BulkView | None:
    from core.queries.bulk import bulk_operation  # pandas, loaded by the commands that show one

    return bulk_operation(session, operation_id)
