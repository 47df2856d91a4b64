"""Support actions behind a confirmation dialog with a required reason.

A button only records which action on which delivery ids is pending; the dialog re-reads those
rows (uncached), asks for the reason and calls `core.triage.apply`, which checks the role and
runs each transition. Results come back as a message on the next run.
"""

from __future__ import annotations

import uuid

import streamlit as st

from console import data, ui
from core import triage
from core.errors import CapsuleError
from core.operators import Operator, Role
from core.policy import utcnow

PENDING_KEY = "_pending_action"
LABELS = {
    triage.REQUEUE: (
        "Requeue",
        ":material/replay:",
        "send again now, with a fresh round of attempts",
    ),
    triage.CANCEL: ("Cancel", ":material/cancel:", "cancel for good and refund the credit"),
    triage.NOTIFY: (
        "Notify owner",
        ":material/forward_to_inbox:",
        "email the owner that the letter could not be delivered (once per delivery)",
    ),
    triage.RELEASE: (
        "Release",
        ":material/play_circle:",
        "send it now although its address is on the suppression list",
    ),
}
EXPECTED = {
    triage.REQUEUE: {"failed"},
    triage.CANCEL: {"failed", "scheduled", "held"},
    triage.NOTIFY: {"failed"},
    triage.RELEASE: {"held"},
}
FAILED_ACTIONS = (triage.REQUEUE, triage.CANCEL, triage.NOTIFY)
HELD_ACTIONS = (triage.RELEASE, triage.CANCEL)


# The provider may have accepted these: a requeue could deliver the letter a second time.
MAY_HAVE_ARRIVED = ("possibly_sent", "ambiguous")


def buttons(
    operator: Operator,
    ids: list[str],
    *,
    key: str,
    actions: tuple[str, ...] = FAILED_ACTIONS,
) -> None:
    """The action buttons for the selected ids; nothing at all for a viewer."""
    if not operator.can(Role.SUPPORT):
        return
    cols = st.columns(len(actions) + 1, gap="small")
    for col, action in zip(cols, actions, strict=False):
        label, icon, help_text = LABELS[action]
        with col:
            if st.button(
                label,
                icon=icon,
                key=f"{key}_{action}",
                disabled=not ids,
                help=help_text,
                width="stretch",
                type="primary" if action == triage.REQUEUE else "secondary",
            ):
                st.session_state[PENDING_KEY] = {"action": action, "ids": list(ids)}


def _dismiss() -> None:
    st.session_state.pop(PENDING_KEY, None)


def render_pending(operator: Operator) -> None:
    """Open the confirmation dialog if an action is pending (call once per page run)."""
    pending = st.session_state.get(PENDING_KEY)
    if not pending:
        return
    action, ids = pending["action"], pending["ids"]
    label = LABELS[action][0]
    noun = "delivery" if len(ids) == 1 else "deliveries"
    st.dialog(f"{label} {len(ids)} {noun}", width="large", on_dismiss=_dismiss)(_confirm)(
        operator, action, ids
    )


def _confirm(operator: Operator, action: str, ids: list[str]) -> None:
    label, icon, help_text = LABELS[action]
    st.markdown(f"This will **{help_text}**.")
    current = data.delivery_states(ids)  # re-read now, not from the cache
    unexpected = current[~current["status"].isin(EXPECTED[action])]
    st.dataframe(
        current[["id", "status", "error_class", "recipient_email"]],
        hide_index=True,
        width="stretch",
        height=min(38 + 35 * len(current), 220),
    )
    if len(unexpected):
        st.warning(
            f"{len(unexpected)} of these changed since you selected them and will be skipped: "
            + ui.text(", ".join(sorted(set(unexpected["status"]))))
        )
    uncertain = current[current["error_class"].isin(MAY_HAVE_ARRIVED)]
    if action == "requeue" and len(uncertain):
        st.warning(
            f"{len(uncertain)} of these may already have reached the recipient "
            f"({ui.text(', '.join(sorted(set(uncertain['error_class']))))}): check the provider's log "
            "before sending again, or the recipient may get the letter twice."
        )
    with st.form("action_confirm", border=False):
        reason = st.text_area(
            "Reason (required; recorded in the audit log with your name)",
            key="action_reason",
            placeholder="e.g. Resend outage is over (INC-1234)",
        )
        submitted = st.form_submit_button(f"{label} {len(ids)}", type="primary", icon=icon)
    if st.button("Back", key="action_back"):
        _dismiss()
        st.rerun()
    if not submitted:
        return
    if not reason.strip():
        st.error("A reason is required.")
        return
    try:
        results = triage.apply(
            data.get_app(),
            operator,
            action,
            [uuid.UUID(i) for i in ids],
            reason=reason,
            now=utcnow(),
        )
    except CapsuleError as exc:
        st.error(ui.text(exc))
        return
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    if done:
        details = "; ".join(sorted({r.message for r in done}))
        ui.flash(
            "success",
            f"{label}: {len(done)} {'delivery' if len(done) == 1 else 'deliveries'} — {details}.",
        )
    for r in failed:
        ui.flash("warning", f"{r.delivery_id}: {r.message}")
    _dismiss()
    data.refresh()
