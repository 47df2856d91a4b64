"""Bulk operations (ops): requeue a filtered set of failed deliveries in the background.

Filter → count and sample → dry run → type the count to confirm → a Huey task works through
the rows at the chosen rate; progress and an abort button show while it runs.
"""

from __future__ import annotations

from datetime import date

import pandas as pd
import streamlit as st

from console import auth, data, filters, ui
from core import bulk
from core.errors import CapsuleError
from core.failed_filter import FailedFilter
from core.models import ErrorClass
from core.operators import Operator, Role
from core.policy import utcnow
from core.queries.bulk import BulkView

POLL_SECONDS = 2
DRY_RUN_KEY = "_bulk_dry_run"
ACTIVE_KEY = "_bulk_active"


def chosen_filter() -> FailedFilter:
    c1, c2, c3, c4 = st.columns([3, 2, 3, 2])
    with c1:
        classes = filters.error_classes(
            "bulk_classes",
            [e.value for e in ErrorClass if e != ErrorClass.MISSING_KEY],  # never a failure
        )
    with c2:
        provider = filters.provider("bulk_provider")
    with c3:
        between = st.date_input(
            "Failed between",
            value=(),  # type: ignore[arg-type]  # an empty range: Streamlit documents ()
            key="bulk_between",
            format="YYYY-MM-DD",
        )
    with c4:
        domain = st.text_input("Recipient domain", key="bulk_domain", placeholder="gmail.com")
    days = [
        d
        for d in (between if isinstance(between, tuple | list) else [between])
        if isinstance(d, date)
    ]
    return FailedFilter(
        error_classes=classes,
        provider=provider,
        failed_from=filters.start_of(days[0]) if days else None,
        failed_until=filters.end_of(days[-1]) if len(days) == 2 else None,
        recipient_domain=domain.strip().lstrip("@").lower() or None,
    )


def _progress(operator: Operator, op: BulkView) -> None:
    with st.container(border=True):
        top = st.columns([4, 1], vertical_alignment="center")
        with top[0]:
            st.markdown(
                f"{ui.STATE_ICONS.get(op.state, '')} **\\#{op.id} {ui.text(op.action)}** · "
                f"{ui.text(op.state)} · by {ui.text(op.actor)} · {op.rate_per_second:g}/s  \n"
                f"{ui.text(FailedFilter.from_dict(op.filter).describe())} — "
                f"_{ui.text(op.reason)}_"
            )
        with top[1]:
            if op.state in ("pending", "running") and st.button(
                "Abort", icon=":material/stop_circle:", key=f"abort_{op.id}", width="stretch"
            ):
                try:
                    state = bulk.request_abort(
                        data.get_app().session_factory, operator, op.id, now=utcnow()
                    )
                    ui.flash("warning", f"Bulk operation #{op.id}: {state}.")
                except CapsuleError as exc:
                    ui.flash("error", str(exc))  # shown as text by ui.show_flash
                data.refresh()
        st.progress(
            op.progress,
            text=f"{op.processed:,} of {op.expected_count:,} processed "
            f"({op.done_count:,} requeued, {op.skipped_count:,} skipped)",
        )
        if op.state == "pending":
            st.caption(f"Waiting for a worker since {ui.when(op.created_at)}.")


def _announce_finished(op_ids: set[int]) -> None:
    """Say how operations that ended since the last run finished; refresh the history."""
    for op_id in sorted(op_ids):
        view = data.bulk_operation(op_id)
        if view is None or view.active:
            continue
        text = (
            f"Bulk operation #{op_id} {view.state}: {view.done_count:,} requeued, "
            f"{view.skipped_count:,} skipped."
        )
        (st.success if view.state == "done" else st.warning)(ui.text(text))
        data.bulk_history.clear()


def _running(operator: Operator) -> None:
    active = data.active_bulk()
    ids = {op.id for op in active}
    _announce_finished(st.session_state.get(ACTIVE_KEY, set()) - ids)
    st.session_state[ACTIVE_KEY] = ids
    if not active:
        return

    @st.fragment(run_every=POLL_SECONDS)
    def poll() -> None:
        current = data.active_bulk()
        st.subheader("Running")
        for op in current:
            _progress(operator, op)
        if ids - {op.id for op in current}:  # one ended: rerun the page to report it
            st.rerun()

    poll()


def _dry_run(flt: FailedFilter, rate: float) -> None:
    result = data.bulk_dry_run(flt, rate)
    with st.container(border=True):
        cols = st.columns(4)
        cols[0].metric("Would requeue", f"{result.would_requeue:,}")
        cols[1].metric(
            "Skipped: owner out of credit",
            f"{result.short_of_credit:,}",
            help="Refunded (permanent) failures must reserve a credit again.",
        )
        cols[2].metric("Need a credit again", f"{result.needs_credit:,}")
        cols[3].metric("Takes about", ui.age(result.estimated_seconds))
        left, right = st.columns(2)
        left.dataframe(
            pd.DataFrame(result.by_error_class.items(), columns=["error class", "rows"]),
            hide_index=True,
            width="stretch",
        )
        right.dataframe(
            pd.DataFrame(result.by_provider.items(), columns=["last provider", "rows"]),
            hide_index=True,
            width="stretch",
        )
        st.caption(
            "Dry run: nothing was changed. First rows in processing order: "
            + ui.text(", ".join(result.first_ids))
        )


def _launch(operator: Operator, flt: FailedFilter, count: int, rate: float) -> None:
    with st.form("bulk_launch"):
        reason = st.text_area(
            "Reason (required; recorded on every requeued delivery)",
            key="bulk_reason",
            placeholder="e.g. Resend outage INC-1234 is over",
        )
        typed = st.text_input(f"Type {count} to confirm", key="bulk_confirm")
        submitted = st.form_submit_button(
            f"Requeue {count:,} deliveries at {rate:g}/s",
            type="primary",
            icon=":material/rocket_launch:",
        )
    if not submitted:
        return
    if typed.strip() != str(count):
        st.error(f"Type the number {count} exactly to confirm.")
        return
    try:
        launched = bulk.launch(
            data.get_app(),
            operator,
            flt,
            reason=reason,
            confirm_count=count,
            rate_per_second=rate,
            now=utcnow(),
            enqueue=data.enqueue_bulk,
        )
    except CapsuleError as exc:
        st.error(ui.text(exc))
        return
    if launched.state == "error":
        ui.flash(
            "error",
            f"Bulk operation #{launched.operation_id} could not be queued; nothing was changed.",
        )
    else:
        ui.flash(
            "success",
            f"Bulk operation #{launched.operation_id} started: {launched.expected_count:,} deliveries.",
        )
        # Watched from now on: a worker may finish it before the page runs again, and only
        # operations the page was watching are announced when they end.
        st.session_state.setdefault(ACTIVE_KEY, set()).add(launched.operation_id)
    st.session_state.pop(DRY_RUN_KEY, None)
    data.refresh()


def render() -> None:
    operator = auth.require_operator()
    ui.header(
        "Bulk operations",
        "Requeue many failed deliveries at a controlled rate. Rows are re-checked one by one; "
        "any that changed meanwhile are skipped.",
    )
    if not operator.can(Role.OPS):
        st.error("Bulk operations are for the ops role.", icon=":material/lock:")
        return
    ui.show_flash()
    _running(operator)

    st.subheader("1 · Choose failed deliveries")
    flt = chosen_filter()
    shown = data.bulk_preview(flt)
    cap = data.settings().bulk_max_rows
    st.metric("Matching now", f"{shown.count:,}", help=ui.text(shown.filter.describe()))
    if shown.left_out:
        left = sum(shown.left_out.values())
        st.caption(
            f"“Any class” leaves out {left:,} {', '.join(sorted(shown.left_out))} failures: "
            "a requeue may send them twice or cannot open them. Choose those classes by name "
            "to include them."
        )
    if not _refused(shown, cap):
        _sample(shown)
        _dry_run_then_launch(operator, flt, shown)
    _history()


def _refused(shown: bulk.Preview, cap: int) -> bool:
    """Say why the chosen rows cannot be requeued in bulk, if they cannot; True then."""
    if shown.count == 0:
        st.info("No failed delivery matches this filter.")
    elif shown.count > cap:
        st.error(
            f"{shown.count:,} deliveries match; one bulk operation may touch at most {cap:,} "
            "(CAPSULE_BULK_MAX_ROWS). Narrow the filter and run it in parts.",
            icon=":material/block:",
        )
    elif shown.active is not None:
        st.error(ui.text(bulk.conflict_message(shown.active)), icon=":material/block:")
    else:
        return False
    return True


def _sample(shown: bulk.Preview) -> None:
    with st.expander(f"Sample: the newest {len(shown.sample)} of {shown.count:,}", expanded=True):
        st.dataframe(
            ui.failed_table(shown.sample),
            hide_index=True,
            width="stretch",
            column_order=ui.FAILED_ORDER,
            column_config=ui.failed_columns(),
        )


def _dry_run_then_launch(operator: Operator, flt: FailedFilter, shown: bulk.Preview) -> None:
    """Steps 2 and 3: the rate and the dry run; once it ran for this filter and rate, the
    confirmation that launches."""
    st.subheader("2 · Dry run")
    rate_col, button_col, _ = st.columns([2, 1, 3], vertical_alignment="bottom")
    with rate_col:
        rate = float(
            st.number_input(
                "Rate (deliveries per second)",
                min_value=0.1,
                max_value=bulk.MAX_RATE_PER_SECOND,
                value=bulk.DEFAULT_RATE_PER_SECOND,
                step=1.0,
                key="bulk_rate",
            )
        )
    with button_col:
        dry_clicked = st.button("Dry run", icon=":material/science:", key="bulk_dry_run")
    signature = (flt, rate)
    if dry_clicked:
        st.session_state[DRY_RUN_KEY] = signature
    if st.session_state.get(DRY_RUN_KEY) == signature:
        _dry_run(flt, rate)
        st.subheader("3 · Confirm and start")
        for warning in shown.warnings:  # the single-row dialog's warnings, for named classes
            st.warning(warning, icon=":material/warning:")  # our own text: counts and class names
        _launch(operator, flt, shown.count, rate)
    else:
        st.caption("Run the dry run for this filter and rate before starting.")


def _history() -> None:
    st.subheader("History")
    history = data.bulk_history()
    if history.empty:
        st.caption("No bulk operation yet.")
    else:
        st.dataframe(
            history,
            hide_index=True,
            width="stretch",
            column_config={
                "created_at": ui.time_column("Started"),
                "finished_at": ui.time_column("Finished"),
                "rate_per_second": st.column_config.NumberColumn("Rate/s", format="%.1f"),
            },
        )


if __name__ == "__main__":
    render()
