"""The filter widgets the triage and bulk pages both draw; each returns what was chosen.

Every widget takes its session-state key, so each page keeps its own choices (and triage can
fill its widgets from a link before they are drawn).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time

import streamlit as st

from core.config import KNOWN_PROVIDERS

ANY_PROVIDER = "any"
PROVIDERS = [ANY_PROVIDER, *KNOWN_PROVIDERS]


def error_classes(key: str, options: Sequence[str]) -> tuple[str, ...]:
    """The error classes chosen from `options`; none chosen means any class."""
    return tuple(st.multiselect("Error class", list(options), key=key, placeholder="any class"))


def provider(key: str) -> str | None:
    """The last provider chosen; None for any."""
    chosen = st.selectbox("Last provider", PROVIDERS, key=key)
    return None if chosen == ANY_PROVIDER else chosen


def start_of(day: object) -> datetime | None:
    """The first moment of a UTC day; None when no day was chosen."""
    return datetime.combine(day, time.min, tzinfo=UTC) if isinstance(day, date) else None


def end_of(day: object) -> datetime | None:
    """The last moment of a UTC day; None when no day was chosen."""
    return datetime.combine(day, time.max, tzinfo=UTC) if isinstance(day, date) else None
