"""Small display helpers shared by the pages.

Every string that holds data (names, addresses, provider errors, operator reasons, anything a
user, a provider or an operator typed) goes through `text()` before it reaches an element that
renders Markdown: st.markdown, st.error/warning/info/success, st.caption, st.toast, help
tooltips, labels. Tables (st.dataframe) show cells as plain text and need nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd
import streamlit as st

STATUS_COLORS = {
    "scheduled": "#4C78A8",
    "processing": "#F58518",
    "sent": "#54A24B",
    "failed": "#E45756",
    "canceled": "#9D9DA1",
    "delivered": "#2E7D32",
    "bounced": "#B22222",
    "complained": "#B279A2",
    "held": "#EECA3B",
}
STATE_ICONS = {
    "pending": ":material/hourglass_top:",
    "running": ":material/autorenew:",
    "aborting": ":material/pan_tool:",
    "done": ":material/check_circle:",
    "aborted": ":material/block:",
    "error": ":material/error:",
}
FLASH_KEY = "_flash"
# Every ASCII punctuation character can be backslash-escaped in CommonMark; escaped, none of
# them starts syntax: links, images, autolinks <…>, emphasis, code, HTML, entities, headings,
# tables, Streamlit's :color[…] and :material/…: directives, $math$.
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
# GFM also links bare URLs and email addresses found in the decoded text; a zero-width space
# after the scheme or "www", or before the "@", keeps them plain text.
_BARE_URL = re.compile(r"(?i)\b(https?|ftp|www)(\\[:.])")
_BARE_EMAIL = re.compile(r"(?<=[\w.+-])(\\@)")
_BACKTICKS = re.compile(r"`+")
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x85\u2028\u2029]+")
TIME_FORMAT = "YYYY-MM-DD HH:mm:ss"
LOCAL_TIME_KEY = "show_local_time"


def text(value: Any) -> str:
    """`value` as literal text for any element that renders Markdown: on one line, with every
    piece of Markdown syntax escaped. The one helper every page uses for data."""
    if value is None:
        return ""
    escaped = _PUNCTUATION.sub(r"\\\1", _LINE_BREAKS.sub(" ", str(value)))
    return _BARE_EMAIL.sub("\u200b\\1", _BARE_URL.sub("\\1\u200b\\2", escaped))


def code(value: Any) -> str:
    """`value` as an inline code span: literal, monospace, and copied exactly (addresses, ids).
    Nothing inside a code span is Markdown; the fence is longer than any run of backticks in
    the value, so the value cannot close it."""
    plain = _LINE_BREAKS.sub(" ", "" if value is None else str(value))
    fence = "`" * (max((len(run) for run in _BACKTICKS.findall(plain)), default=0) + 1)
    return f"{fence} {plain} {fence}"


def age(seconds: float | None) -> str:
    """A short human duration: 45 s, 12 min, 3.5 h, 2 d."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    value = abs(float(seconds))
    if value < 90:
        text = f"{value:.0f} s"
    elif value < 90 * 60:
        text = f"{value / 60:.0f} min"
    elif value < 36 * 3600:
        text = f"{value / 3600:.1f} h"
    else:
        text = f"{value / 86400:.1f} d"
    return f"-{text}" if seconds < 0 else text


def browser_zone() -> str | None:
    """The reader's IANA time zone as the browser reports it, or None (unknown or invalid)."""
    try:
        zone = st.context.timezone
    except Exception:  # no browser behind this run (tests, bare mode)
        return None
    if not zone:
        return None
    try:
        ZoneInfo(str(zone))
    except (ZoneInfoNotFoundError, ValueError):
        return None
    return str(zone)


def display_zone() -> str:
    """The zone times are shown in: UTC (stored and default), or the browser's when the
    reader turned the sidebar toggle on."""
    zone = browser_zone()
    return zone if zone and st.session_state.get(LOCAL_TIME_KEY) else "UTC"


def time_toggle() -> None:
    """The sidebar switch between UTC and the browser's zone."""
    zone = browser_zone()
    st.toggle(
        f"Times in my zone ({zone})" if zone else "Times in my zone (unknown)",
        key=LOCAL_TIME_KEY,
        disabled=zone is None,
        help="Stored times are UTC, and UTC is shown unless this is on; every time shown "
        "names its zone.",
    )


def zoned(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """`frame` with its UTC time `columns` converted to the display zone (for charts, whose
    axes show wall-clock time)."""
    zone = display_zone()
    if zone == "UTC" or frame.empty:
        return frame
    return frame.assign(
        **{c: pd.to_datetime(frame[c], utc=True).dt.tz_convert(zone) for c in columns}
    )


def when(moment: datetime | pd.Timestamp | None) -> str:
    """A moment as text in the display zone, with the zone's abbreviation (UTC by default)."""
    if moment is None or pd.isna(moment):
        return "—"
    stamp = pd.Timestamp(moment)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp
    local = stamp.tz_convert(display_zone())
    return f"{local:%Y-%m-%d %H:%M:%S %Z}"


def flash(kind: str, message: str) -> None:
    """Keep a message for the next run (after st.rerun()); shown as literal text."""
    st.session_state.setdefault(FLASH_KEY, []).append((kind, message))


def show_flash() -> None:
    for kind, message in st.session_state.pop(FLASH_KEY, []):
        {"success": st.success, "warning": st.warning, "error": st.error}.get(kind, st.info)(
            text(message)
        )


def header(title: str, caption: str) -> None:
    st.title(title)
    st.caption(caption)


def time_column(label: str, help: str | None = None) -> Any:
    """A datetime column shown in the display zone, the zone named in its header."""
    zone = display_zone()
    return st.column_config.DatetimeColumn(
        f"{label} ({zone})", format=TIME_FORMAT, timezone=zone, help=help
    )


def detail_links(ids: pd.Series) -> pd.Series:
    """Links to the delivery detail page for each id (relative, so a base path still works)."""
    return "delivery?id=" + ids.astype(str)


# Triage and the bulk page's sample show failed deliveries with the same columns and names.
FAILED_ORDER = [
    "link",
    "failed_at",
    "error_class",
    "provider",
    "status_code",
    "last_error",
    "recipient_email",
    "owner_email",
    "attempts",
    "notified",
]


def failed_table(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` (rows of `core.queries.failed.failed_deliveries`) with a `link` column to each detail."""
    return frame.assign(link=detail_links(frame["id"]))


def failed_columns() -> dict[str, Any]:
    return {
        "failed_at": time_column("Failed at"),
        "error_class": st.column_config.TextColumn("Class"),
        "provider": st.column_config.TextColumn("Provider", help="of the last attempt"),
        "status_code": st.column_config.NumberColumn("Code", format="%d"),
        "last_error": st.column_config.TextColumn("Last error", width="medium"),
        "recipient_email": st.column_config.TextColumn("Recipient"),
        "owner_email": st.column_config.TextColumn("Owner"),
        "attempts": st.column_config.NumberColumn("Runs"),
        "notified": st.column_config.TextColumn("Owner notice"),
        "link": st.column_config.LinkColumn(
            "Delivery id", display_text=r"id=(.+)$", help="opens the delivery's detail page"
        ),
    }


def status_chip(status: str) -> str:
    color = {
        "scheduled": "blue",
        "processing": "orange",
        "sent": "green",
        "failed": "red",
        "canceled": "gray",
        "delivered": "green",
        "bounced": "red",
        "complained": "violet",
        "held": "orange",
    }.get(status, "gray")
    return f":{color}-badge[{status}]"


def facts(pairs: Iterable[tuple[str, Any]], columns: int = 3) -> None:
    """Label / value pairs in a compact grid; the values are shown as literal text."""
    items = list(pairs)
    cols = st.columns(columns)
    for i, (label, value) in enumerate(items):
        with cols[i % columns]:
            st.markdown(f"**{label}**  \n{text(value) if value not in (None, '') else '—'}")
