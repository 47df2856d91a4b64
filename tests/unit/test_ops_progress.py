"""The ops CLI's progress display: a bar redrawn in place on a terminal, plain lines (at most one
a second, and always the last) when stderr is a pipe or a file; and the streamed writers."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime

from tasks.cli.failed import write_csv, write_json, write_table
from tasks.cli.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_most_one_a_second_and_always_the_last() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(
        "bulk #7", 10, words=("requeued", "skipped"), stream=out, tty=False, clock=clock
    )
    for done in range(1, 10):
        progress.update(done)
        clock.now += 0.4  # 2.5 updates a second
    progress.update(9, 1, final=True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "bulk #7: 1/10 (10%): requeued 1, skipped 0"
    assert lines[-1] == "bulk #7: 10/10 (100%): requeued 9, skipped 1"
    assert len(lines) == 4  # at 0.0, 1.2 and 2.4 s, and the final one
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_a_terminal_gets_one_bar_redrawn_in_place() -> None:
    out = io.StringIO()
    progress = Progress("keys rotate", 4, words=("rotated", "skipped"), stream=out, tty=True)
    progress.update(1)
    progress.update(1)  # unchanged: not drawn again
    progress.update(2, 2, final=True)
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "[" + "#" * 30 + "] 4/4 (100%): rotated 2, skipped 2" in text


def test_nothing_to_do_still_ends_with_one_line() -> None:
    out = io.StringIO()
    Progress("keys rotate", 0, stream=out, tty=False).update(0, 0, final=True)
    assert out.getvalue() == "keys rotate: 0/0 (100%): done 0, skipped 0\n"


ROW = {
    "id": uuid.UUID(int=1),
    "failed_at": datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
    "error_class": "transient",
    "last_error": 'Resend answered 503, "try later"\n\x1b[31mred',
    "provider": "resend",
    "status_code": None,
    "attempts": 3,
    "recipient_email": "a@example.com",
    "owner_email": "o@example.com",
    "notified": None,
}


def test_csv_and_json_parse_back_and_the_table_carries_no_terminal_escapes() -> None:
    out = io.StringIO()
    assert write_csv([ROW, ROW], out) == 2
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows[0]["last_error"] == ROW["last_error"] and rows[0]["status_code"] == ""
    assert rows[1]["failed_at"] == "2026-12-01T09:30:00+00:00"

    out = io.StringIO()
    assert write_json(iter([ROW]), out) == 1
    assert json.loads(out.getvalue())[0]["id"] == str(uuid.UUID(int=1))
    out = io.StringIO()
    assert write_json([], out) == 0 and json.loads(out.getvalue()) == []

    out = io.StringIO()
    write_table([ROW], out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in out.getvalue()
    assert "2026-12-01 09:30:00" in lines[1]
