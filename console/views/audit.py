"""Audit log: who did what, when and why; filtered, newest first, one page at a time."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time

import streamlit as st

from console import auth, data, ui
from core.queries.audit import AuditFilter

PAGE_SIZE = 50
CURSORS_KEY = "_audit_cursors"  # the cursor of each page shown so far; [-1] is the current one
FILTER_KEY = "_audit_filter"


def filters() -> AuditFilter | None:
    c1, c2, c3, c4 = st.columns([3, 2, 3, 2])
    with c1:
        types = st.multiselect(
            "Event type",
            data.audit_types(),
            key="audit_types",
            placeholder="any type",
            accept_new_options=True,
        )
    with c2:
        actor = st.text_input("Actor", key="audit_actor", placeholder="e.g. sam or system")
    with c3:
        raw_id = st.text_input("Delivery id", key="audit_delivery").strip()
    with c4:
        since = st.date_input("Since", value=None, key="audit_since", format="YYYY-MM-DD")
    delivery_id = None
    if raw_id:
        try:
            delivery_id = uuid.UUID(raw_id)
        except ValueError:
            st.error("The delivery id is not a valid id.")
            return None
    return AuditFilter(
        types=tuple(types),
        actor=actor.strip() or None,
        delivery_id=delivery_id,
        since=datetime.combine(since, time.min, tzinfo=UTC) if isinstance(since, date) else None,
    )


def render() -> None:
    auth.require_operator()
    ui.header("Audit log", "Every change to a delivery and every operator action, with its reason.")
    flt = filters()
    if flt is None:
        return
    if st.session_state.get(FILTER_KEY) != flt:  # a new filter starts at the newest page
        st.session_state[FILTER_KEY] = flt
        st.session_state[CURSORS_KEY] = [None]
    cursors = st.session_state.setdefault(CURSORS_KEY, [None])
    page = data.audit_page(flt, cursors[-1], PAGE_SIZE)
    if page.rows.empty:
        st.info("No audit event matches.")
        return
    st.dataframe(
        page.rows,
        hide_index=True,
        width="stretch",
        height=min(38 + 35 * len(page.rows), 640),
        column_order=["created_at", "type", "actor", "reason", "delivery_id", "data", "id"],
        column_config={
            "created_at": ui.time_column("When"),
            "type": "Event",
            "actor": "Actor",
            "reason": st.column_config.TextColumn("Reason", width="medium"),
            "delivery_id": "Delivery id",
            "data": st.column_config.TextColumn("Details", width="medium"),
            "id": st.column_config.NumberColumn("#", format="%d"),
        },
    )
    left, middle, right = st.columns([1, 3, 1], vertical_alignment="center")
    with left:
        if st.button(
            "Newer", icon=":material/chevron_left:", disabled=len(cursors) == 1, key="audit_newer"
        ):
            cursors.pop()
            st.rerun()
    with middle:
        first = (len(cursors) - 1) * PAGE_SIZE + 1
        st.caption(f"Events {first:,}–{first + len(page.rows) - 1:,}, newest first")
    with right:
        if st.button(
            "Older",
            icon=":material/chevron_right:",
            disabled=page.next_cursor is None,
            key="audit_older",
        ):
            cursors.append(page.next_cursor)
            st.rerun()


if __name__ == "__main__":
    render()
