"""Small display helpers shared by the pages."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pandas as pd
import streamlit as st

STATUS_COLORS = {
    "scheduled": "#4C78A8",
    "processing": "#F58518",
    "sent": "#54A24B",
    "failed": "#E45756",
    "canceled": "#9D9DA1",
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
TIME_FORMAT = "YYYY-MM-DD HH:mm:ss"


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


def when(moment: datetime | pd.Timestamp | None) -> str:
    if moment is None or pd.isna(moment):
        return "—"
    return f"{pd.Timestamp(moment):%Y-%m-%d %H:%M:%S} UTC"


def flash(kind: str, message: str) -> None:
    """Keep a message for the next run (after st.rerun())."""
    st.session_state.setdefault(FLASH_KEY, []).append((kind, message))


def show_flash() -> None:
    for kind, message in st.session_state.pop(FLASH_KEY, []):
        {"success": st.success, "warning": st.warning, "error": st.error}.get(kind, st.info)(
            message
        )


def header(title: str, caption: str) -> None:
    st.title(title)
    st.caption(caption)


def time_column(label: str, help: str | None = None) -> Any:
    return st.column_config.DatetimeColumn(label, format=TIME_FORMAT, timezone="UTC", help=help)


def status_chip(status: str) -> str:
    color = {
        "scheduled": "blue",
        "processing": "orange",
        "sent": "green",
        "failed": "red",
        "canceled": "gray",
    }.get(status, "gray")
    return f":{color}-badge[{status}]"


def facts(pairs: Iterable[tuple[str, Any]], columns: int = 3) -> None:
    """Label / value pairs in a compact grid."""
    items = list(pairs)
    cols = st.columns(columns)
    for i, (label, value) in enumerate(items):
        with cols[i % columns]:
            st.markdown(f"**{label}**  \n{value if value not in (None, '') else '—'}")
