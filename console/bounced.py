"""Triage's "bounced after send" view: letters a provider accepted that then bounced or drew a
complaint, and letters held for a suppressed address."""

from __future__ import annotations

import streamlit as st

from console import actions, data, ui
from core.operators import Operator

HELP = (
    "Letters the provider accepted whose recipient server refused them (hard or soft bounce) "
    "or whose recipient marked them as spam, and letters held because their address is on "
    "the suppression list."
)
DETAIL_KEY = "_detail_id"


def render(operator: Operator) -> None:
    frame = data.bounced_after_send()
    if frame.empty:
        st.success("No letter bounced after it was sent.", icon=":material/task_alt:")
        actions.render_pending(operator)
        return
    counts = frame["status"].value_counts()
    cols = st.columns(3)
    for col, status in zip(cols, ("bounced", "complained", "held"), strict=True):
        col.metric(status.capitalize(), f"{int(counts.get(status, 0)):,}", border=True)
    event = st.dataframe(
        frame,
        key="bounced_after_send",
        on_select="rerun",
        selection_mode="single-row",
        hide_index=True,
        width="stretch",
        column_config={
            "updated_at": ui.time_column("Changed"),
            "sent_at": ui.time_column("Sent"),
            "reported_at": ui.time_column("Reported"),
            "held_at": ui.time_column("Held"),
        },
    )
    st.caption(
        "A hard bounce or complaint puts the address on the suppression list and tells the "
        "owner once; `capsule suppression remove ADDRESS --reason …` takes it off, "
        "`capsule release ID --reason …` sends a held letter after all. When the owner gives "
        "a working address, open the delivery and send it to the corrected address."
    )
    rows = event.selection.rows
    if st.button("Open detail", icon=":material/open_in_new:", disabled=not rows):
        st.session_state[DETAIL_KEY] = str(frame.iloc[rows[0]]["id"])
        st.switch_page("views/delivery.py")
    actions.render_pending(operator)
