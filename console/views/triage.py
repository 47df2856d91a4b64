"""Triage: failed deliveries, filtered and grouped; support acts on selected rows."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, time

import plotly.express as px
import streamlit as st

from console import actions, auth, bounced, data, ui
from core.config import KNOWN_PROVIDERS
from core.models import ErrorClass
from core.operators import Role
from core.queries import FailedFilter

SELECTED_KEY = "_triage_selected"
DETAIL_KEY = "_detail_id"


def filters() -> FailedFilter:
    """The filter widgets; returns what they select."""
    c1, c2, c3, c4 = st.columns([3, 2, 2, 3])
    with c1:
        classes = st.multiselect(
            "Error class",
            [e.value for e in ErrorClass],
            key="triage_classes",
            placeholder="any class",
        )
    with c2:
        provider = st.selectbox("Last provider", ["any", *KNOWN_PROVIDERS], key="triage_provider")
    with c3:
        since = st.date_input("Failed since", value=None, key="triage_since", format="YYYY-MM-DD")
    with c4:
        search = st.text_input(
            "Owner or recipient contains", key="triage_search", placeholder="e.g. ada@ or gmail"
        )
    return FailedFilter(
        error_classes=tuple(classes),
        provider=None if provider == "any" else provider,
        failed_from=_start_of(since),
        search=search.strip() or None,
    )


def _start_of(day: date | None) -> datetime | None:
    return datetime.combine(day, time.min, tzinfo=UTC) if isinstance(day, date) else None


def render() -> None:
    operator = auth.require_operator()
    ui.header(
        "Triage",
        "Failed deliveries, newest first. Select rows, then requeue, cancel or notify the owner; "
        "every action asks for a reason and lands in the audit log.",
    )
    ui.show_flash()
    if st.toggle("Bounced after send", key="triage_bounced", help=bounced.HELP):
        bounced.render(operator)
        return
    flt = filters()

    by_class = data.failed_by_class(flt)
    total = data.failed_count(flt)
    left, right = st.columns([1, 2], vertical_alignment="center")
    with left:
        st.metric("Failed and open (matching)", f"{total:,}", border=True)
        if not operator.can(Role.SUPPORT):
            st.info("You have read-only access.", icon=":material/visibility:")
    with right:
        if by_class.empty:
            st.caption("No failed deliveries match.")
        else:
            chart = px.bar(
                by_class,
                x="count",
                y="error_class",
                orientation="h",
                text="count",
                labels={"count": "deliveries", "error_class": ""},
                color_discrete_sequence=["#E45756"],
            )
            chart.update_traces(textposition="outside", textangle=0, cliponaxis=False)
            chart.update_layout(height=60 + 28 * len(by_class), margin=dict(l=0, r=30, t=10, b=0))
            chart.update_yaxes(categoryorder="total ascending")
            st.plotly_chart(chart, width="stretch", config={"displayModeBar": False})

    frame = data.failed_list(flt)
    if frame.empty:
        st.success("Nothing to triage for this filter.", icon=":material/task_alt:")
        actions.render_pending(operator)
        return
    if len(frame) < total:
        st.caption(
            f"Showing the newest {len(frame):,} of {total:,}; narrow the filter to see older ones."
        )

    # The table's key follows the rows it shows: when they change, a stale selection resets
    # instead of pointing at other rows.
    digest = hashlib.sha1("".join(frame["id"]).encode()).hexdigest()[:12]
    event = st.dataframe(
        frame,
        key=f"failed_{digest}",
        on_select="rerun",
        selection_mode="multi-row",
        hide_index=True,
        width="stretch",
        height=min(38 + 35 * len(frame), 460),
        column_order=[
            "failed_at",
            "error_class",
            "provider",
            "status_code",
            "last_error",
            "recipient_email",
            "owner_email",
            "attempts",
            "notified",
            "id",
        ],
        column_config={
            "failed_at": ui.time_column("Failed at"),
            "error_class": st.column_config.TextColumn("Class"),
            "provider": st.column_config.TextColumn("Provider", help="of the last attempt"),
            "status_code": st.column_config.NumberColumn("Code", format="%d"),
            "last_error": st.column_config.TextColumn("Last error", width="medium"),
            "recipient_email": st.column_config.TextColumn("Recipient"),
            "owner_email": st.column_config.TextColumn("Owner"),
            "attempts": st.column_config.NumberColumn("Runs"),
            "notified": st.column_config.TextColumn("Owner notice"),
            "id": st.column_config.TextColumn("Delivery id"),
        },
    )
    # Positions become ids at once: later reruns may load different rows.
    ids = [str(frame.iloc[i]["id"]) for i in event.selection.rows]
    st.session_state[SELECTED_KEY] = ids

    bar_left, bar_right = st.columns([3, 1], vertical_alignment="bottom")
    with bar_left:
        st.caption(f"{len(ids)} selected" if ids else "Select rows to act on them.")
        actions.buttons(operator, ids, key="triage")
    with bar_right:
        if st.button(
            "Open detail",
            icon=":material/open_in_new:",
            disabled=len(ids) != 1,
            key="triage_open",
            width="stretch",
        ):
            st.session_state[DETAIL_KEY] = ids[0]
            st.switch_page("views/delivery.py")
    actions.render_pending(operator)


if __name__ == "__main__":
    render()
