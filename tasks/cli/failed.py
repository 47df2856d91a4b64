"""`capsule delivery failed`: the failed set, with triage's filter as flags, streamed as a
table, CSV (with a header row) or JSON, newest first. The filter is shared with `delivery bulk`."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import unicodedata
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import IO, Any

from core import failed_filter
from core.db import session_scope
from core.errors import InvalidDeliveryTime, ValidationError
from core.failed_filter import FailedFilter
from core.models import ErrorClass
from core.policy import parse_when, short_repr, utcnow
from tasks.cli.common import Command, get_app, one_line, whole_number

FORMATS = ("table", "csv", "json")
ERROR_CLASSES = tuple(c.value for c in ErrorClass if c != ErrorClass.MISSING_KEY)
MAX_SEARCH_CHARS = 200
_AGO = re.compile(r"^-?(\d+)([smhdw])$")


def read_filter(args: argparse.Namespace, now: datetime) -> FailedFilter:
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
    provider = one_line(args.provider, "provider", 64).lower() if args.provider else None
    domain = one_line(args.domain, "domain", 255).lower() if args.domain else None
    search = one_line(args.search, "search", MAX_SEARCH_CHARS) if args.search else None
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


def cmd_list(args: argparse.Namespace) -> int:
    now = utcnow()
    flt = read_filter(args, now)
    app = get_app()
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
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def write_csv(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(failed_filter.FAILED_COLUMNS)
    count = 0
    for row in rows:
        writer.writerow(
            ["" if row[c] is None else plain(row[c]) for c in failed_filter.FAILED_COLUMNS]
        )
        count += 1
    return count


def write_json(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """One JSON array, written row by row (never held whole in memory)."""
    count = 0
    out.write("[")
    for row in rows:
        out.write(",\n" if count else "\n")
        out.write(json.dumps({k: plain(v) for k, v in row.items()}))
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count


def write_table(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    def cell(value: Any, width: int) -> str:
        if isinstance(value, datetime):
            value = f"{value:%Y-%m-%d %H:%M:%S}"
        text = printable("" if value is None else str(value))
        return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)

    out.write("  ".join(cell(h, w) for _, h, w in TABLE).rstrip() + "\n")
    count = 0
    for row in rows:
        out.write("  ".join(cell(row[c], w) for c, _, w in TABLE).rstrip() + "\n")
        count += 1
    return count


def printable(text: str) -> str:
    """Text from providers and users, safe for a terminal: no escapes, no line breaks."""
    return "".join(
        " " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs") else ch for ch in text
    )


WRITERS: dict[str, Callable[[Iterable[dict[str, Any]], IO[str]], int]] = {
    "table": write_table,
    "csv": write_csv,
    "json": write_json,
}


def _list_arguments(p: argparse.ArgumentParser) -> None:
    add_filter_flags(p)
    p.add_argument("--format", choices=FORMATS, default="table", help="table (default), csv, json")
    p.add_argument("--limit", type=whole_number(1, 10**9), help="stop after this many rows")
    p.add_argument("--page-size", type=whole_number(1, 10_000), default=500, help=argparse.SUPPRESS)


COMMANDS = (
    Command(
        "delivery failed",
        cmd_list,
        "list every failed delivery the filter matches, newest first (streamed; no letter text)",
        _list_arguments,
        aliases=("failed list",),
    ),
)
