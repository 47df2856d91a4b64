"""Delivery detail: one delivery's metadata, attempt timeline, audit trail and owner notices.

Never the letter: the console reads no ciphertext and holds no key.
"""

from __future__ import annotations

import uuid

import plotly.express as px
import streamlit as st

from console import actions, auth, data, ui
from core import triage
from core.errors import CapsuleError
from core.operators import Operator, Role
from core.policy import utcnow
from core.queries.delivery import DeliveryDetail
from core.redirect import redirectable

DETAIL_KEY = "_detail_id"
LINKED_KEY = "_detail_linked"
OUTCOME_COLORS = {
    "accepted": "#54A24B",
    "transient": "#F58518",
    "ambiguous": "#EECA3B",
    "permanent": "#E45756",
    "possibly_sent": "#B279A2",
    "skipped": "#9D9DA1",
}


def _lookup() -> str | None:
    """The id to show: from the search box, a link (?id=) or the triage page."""
    linked = st.query_params.get("id")
    if linked and linked != st.session_state.get(LINKED_KEY):  # a new link wins once
        st.session_state[LINKED_KEY] = linked
        if _uuid(linked) is None:
            st.warning(
                f"This link's id {ui.code(linked[:80])} is not a delivery id; "
                "search for the delivery below."
            )
        else:
            st.session_state["detail_query"] = linked
    if DETAIL_KEY in st.session_state:  # sent here from the triage page
        st.session_state["detail_query"] = str(st.session_state.pop(DETAIL_KEY))
    query = st.text_input(
        "Delivery id, or a recipient's or owner's email",
        key="detail_query",
        placeholder="3f0c6d1e-… or ada@example.com",
    ).strip()
    if not query:
        return None
    if "@" in query:
        matches = data.deliveries_for_address(query)
        if matches.empty:
            st.info(f"No delivery for {ui.code(query)}.")
            return None
        event = st.dataframe(
            matches,
            key=f"detail_matches_{query}",
            on_select="rerun",
            selection_mode="single-row",
            hide_index=True,
            width="stretch",
            column_config={"deliver_at": ui.time_column("Deliver at")},
        )
        if not event.selection.rows:
            st.caption("Select a delivery to see its details.")
            return None
        return str(matches.iloc[event.selection.rows[0]]["id"])
    try:
        return str(uuid.UUID(query))
    except ValueError:
        st.error("That is neither a delivery id nor an email address.")
        return None


def _summary(d: DeliveryDetail) -> None:
    st.subheader(f"Delivery {d.id}")
    st.markdown(
        f"{ui.status_chip(d.status)} &nbsp; to {ui.code(d.recipient_email)} &nbsp;·&nbsp; "
        f"owner **{ui.text(d.owner_name or d.owner_email)}** ({ui.code(d.owner_email)})"
    )
    if d.last_error:
        st.error(
            f"**{ui.text(d.error_class or 'error')}**: {ui.text(d.last_error)}",
            icon=":material/error:",
        )
    ui.facts(
        [
            ("Deliver at (the owner's intent)", ui.when(d.deliver_at)),
            ("Next attempt at", ui.when(d.next_attempt_at) if d.status == "scheduled" else "—"),
            ("Sent at", ui.when(d.sent_at)),
            ("Lateness", ui.age(d.lateness_seconds)),
            ("Failed at", ui.when(d.failed_at)),
            ("Canceled at", ui.when(d.canceled_at)),
            ("Runs (this round / all)", f"{d.round_attempts} / {d.attempt_count}"),
            ("Provider / message id", f"{d.provider or '—'} / {d.provider_message_id or '—'}"),
            ("Pinned provider", d.pinned_provider),
            ("Batch", d.batch),
            ("Current task id", d.task_id),
            ("Dispatched at", ui.when(d.dispatched_at)),
            ("Lease until", ui.when(d.lease_until)),
            ("Credit held", d.credit_held),
            ("Created / updated", f"{ui.when(d.created_at)} / {ui.when(d.updated_at)}"),
            ("Row version", d.version),
            ("Bounce", d.bounce_kind),
            ("Provider reported at", ui.when(d.reported_at)),
            ("Held at", ui.when(d.held_at)),
        ],
        columns=3,
    )
    if d.status == "held":
        st.warning(
            "Held: the recipient address is on the suppression list. Release it (it is sent "
            "now) or cancel it, with a reason.",
            icon=":material/pause_circle:",
        )


def _redirect(operator: Operator, d: DeliveryDetail) -> None:
    """Support: send the letter of a failed or hard-bounced delivery to the address its owner
    gave (core.redirect). The new delivery opens here afterwards."""
    if not operator.can(Role.SUPPORT):
        return
    if not redirectable(d.status, d.bounce_kind):
        return
    with st.expander("Send to a corrected address", icon=":material/alternate_email:"):
        st.caption(
            "When the owner tells support an address that works: the same letter goes there "
            "now as a new delivery, which takes one credit (a failed delivery's own credit is "
            "refunded first). This delivery stays as the record."
        )
        with st.form("redirect_form", border=False):
            address = st.text_input("Corrected address", key="redirect_address")
            why = st.text_input(
                "Reason (required; recorded in the audit log with your name)",
                key="redirect_reason",
                placeholder="e.g. owner's new address, confirmed by email (TICKET-123)",
            )
            submitted = st.form_submit_button(
                "Send to this address", type="primary", icon=":material/send:"
            )
        if not submitted:
            return
        try:
            done = triage.redirect(
                data.get_app(),
                operator,
                uuid.UUID(d.id),
                recipient=address,
                reason=why,
                now=utcnow(),
            )
        except CapsuleError as exc:
            st.error(ui.text(exc))
            return
    ui.flash(
        "success",
        f"Redirected: delivery {done.new_id} sends the letter to {address.strip()} now; "
        f"{d.id} stays as the record.",
    )
    st.session_state[DETAIL_KEY] = str(done.new_id)
    data.refresh()


def _timeline(d: DeliveryDetail) -> None:
    st.subheader("Attempts")
    if d.attempts.empty:
        st.caption("No provider was called yet.")
        return
    chart = px.scatter(
        d.attempts,
        x="started_at",
        y="provider",
        color="outcome",
        symbol="outcome",
        size=[12] * len(d.attempts),
        hover_data=["run", "status_code", "error_code", "duration_ms", "task_id"],
        color_discrete_map=OUTCOME_COLORS,
        labels={"started_at": "", "provider": ""},
    )
    chart.update_layout(height=160 + 30 * d.attempts["provider"].nunique(), margin=dict(t=10, b=0))
    st.plotly_chart(chart, width="stretch", config={"displayModeBar": False})
    st.dataframe(
        d.attempts,
        hide_index=True,
        width="stretch",
        column_config={
            "started_at": ui.time_column("Started at"),
            "status_code": st.column_config.NumberColumn("Status", format="%d"),
            "duration_ms": st.column_config.NumberColumn("Duration", format="%d ms"),
        },
    )


def _provider_events(d: DeliveryDetail) -> None:
    """After sent: what the provider's webhooks reported (delivered, bounced, complained)."""
    if d.provider_events.empty:
        return
    st.subheader("Provider events")
    st.dataframe(
        d.provider_events,
        hide_index=True,
        width="stretch",
        column_config={
            "occurred_at": ui.time_column("At the provider"),
            "received_at": ui.time_column("Received"),
        },
    )


def _uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _keep_in_url(delivery_id: str | None) -> None:
    """The open delivery lives in the URL (?id=…), so the address bar is a link to it."""
    if delivery_id is None:
        return
    st.session_state[LINKED_KEY] = delivery_id
    if st.query_params.get("id") != delivery_id:
        st.query_params["id"] = delivery_id


def render() -> None:
    operator = auth.require_operator()
    ui.header(
        "Delivery detail", "Metadata, attempts, audit trail and owner notices. Never the letter."
    )
    ui.show_flash()
    delivery_id = _lookup()
    _keep_in_url(delivery_id)
    if delivery_id is None:
        actions.render_pending(operator)
        return
    detail = data.delivery_detail(delivery_id)
    if detail is None:
        st.warning(f"No delivery has id {ui.code(delivery_id)}.")
        return
    _summary(detail)
    if detail.status == "failed":
        actions.buttons(operator, [detail.id], key="detail")
    elif detail.status == "held":
        actions.buttons(operator, [detail.id], key="detail", actions=actions.HELD_ACTIONS)
    _redirect(operator, detail)
    _timeline(detail)
    _provider_events(detail)
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Audit trail")
        st.dataframe(
            detail.audit,
            hide_index=True,
            width="stretch",
            column_config={"created_at": ui.time_column("When")},
        )
    with right:
        st.subheader("Owner notices")
        if detail.notifications.empty:
            st.caption("The owner has not been notified about this delivery.")
        else:
            st.dataframe(
                detail.notifications,
                hide_index=True,
                width="stretch",
                column_config={
                    "created_at": ui.time_column("Requested"),
                    "sent_at": ui.time_column("Sent"),
                },
            )
    actions.render_pending(operator)


if __name__ == "__main__":
    render()
