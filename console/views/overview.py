"""Overview: the headline numbers, four charts and the stuck rows, refreshing on its own."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from console import auth, data, ui
from core.policy import utcnow

REFRESH_SECONDS = 30
CHART_HEIGHT = 300
MARGIN = dict(l=0, r=0, t=30, b=0)


def _tiles() -> None:
    t = data.tiles()
    grace = data.settings().grace_seconds
    cols = st.columns(6)
    cols[0].metric(
        "Scheduled",
        f"≈ {t.scheduled:,}" if t.scheduled_estimated else f"{t.scheduled:,}",
        border=True,
        help="Waiting for their time."
        + (" PostgreSQL's estimate (within a few per cent)." if t.scheduled_estimated else ""),
    )
    cols[1].metric("Due in the next hour", f"{t.due_next_hour:,}", border=True)
    cols[2].metric("Processing", f"{t.processing:,}", border=True, help="Claimed by a worker.")
    cols[3].metric("Sent in 24 h", f"{t.sent_24h:,}", border=True)
    cols[4].metric(
        "Failed and open",
        f"{t.failed_open:,}",
        border=True,
        help="Failed and not requeued or canceled: the triage list.",
    )
    cols[5].metric(
        "Stuck",
        f"{t.stuck:,}",
        border=True,
        icon=":material/warning:" if t.stuck else ":material/check_circle:",
        help=f"Scheduled and overdue by more than {grace} s, or processing past the lease.",
    )


def _status_chart(window: str) -> go.Figure:
    counts = data.status_counts(window)
    counts = counts.assign(
        label=[
            f"{status} ({window})"
            if scope == "in window"
            else f"{status} (≈)"
            if scope == "estimate"
            else status
            for status, scope in zip(counts["status"], counts["scope"], strict=True)
        ]
    )
    chart = px.bar(
        counts,
        x="count",
        y="label",
        orientation="h",
        color="status",
        text="count",
        color_discrete_map=ui.STATUS_COLORS,
        title="Status distribution: open now, finished in the window",
        labels={"count": "deliveries", "label": ""},
    )
    chart.update_layout(showlegend=False, height=CHART_HEIGHT, margin=MARGIN)
    chart.update_traces(texttemplate="%{text:,}", textposition="auto")
    chart.update_yaxes(autorange="reversed")  # scheduled first, as in the lifecycle
    return chart


def _lateness_chart(series: pd.DataFrame, window: str) -> go.Figure:
    long = series.melt(
        id_vars="bucket", value_vars=["p50", "p95", "p99"], var_name="percentile", value_name="s"
    )
    chart = px.line(
        long,
        x="bucket",
        y="s",
        color="percentile",
        markers=True,
        log_y=True,
        title=f"Lateness (sent − deliver at), {window}",
        labels={"bucket": "", "s": "seconds (log)", "percentile": ""},
        color_discrete_sequence=["#54A24B", "#F58518", "#E45756"],
    )
    chart.update_layout(
        height=CHART_HEIGHT,
        margin=MARGIN,
        legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"),
    )
    chart.update_yaxes(dtick=1)  # one label per power of ten
    return chart


def _reconciliation_chart(series: pd.DataFrame, window: str) -> go.Figure:
    chart = make_subplots(specs=[[{"secondary_y": True}]])
    chart.add_trace(
        go.Bar(
            x=series["bucket"], y=series["rescued"], name="rescued rows", marker_color="#72B7B2"
        ),
        secondary_y=False,
    )
    chart.add_trace(
        go.Scatter(
            x=series["bucket"],
            y=series["share"] * 100,
            name="% of sent",
            mode="lines+markers",
            line=dict(color="#B279A2"),
            connectgaps=False,
        ),
        secondary_y=True,
    )
    chart.update_layout(
        title=f"Backstop rescues, {window}",
        height=CHART_HEIGHT,
        margin=MARGIN,
        legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"),
    )
    chart.update_yaxes(title_text="rows requeued + recovered", secondary_y=False)
    chart.update_yaxes(
        title_text="% of sent",
        secondary_y=True,
        rangemode="tozero",
        ticksuffix="%",
        tickformat=".0f",
        showgrid=False,
        nticks=5,
    )
    return chart


def _throughput_chart(series: pd.DataFrame, window: str, bucket: str) -> go.Figure:
    chart = px.bar(
        series,
        x="bucket",
        y="sent",
        title=f"Throughput: sent per {bucket}, {window}",
        labels={"bucket": "", "sent": f"sent per {bucket}"},
        color_discrete_sequence=[ui.STATUS_COLORS["sent"]],
    )
    chart.update_layout(height=CHART_HEIGHT, margin=MARGIN)
    return chart


def _stuck_table() -> None:
    stuck = data.stuck_items()
    st.subheader("Stuck deliveries")
    if stuck.empty:
        st.success("Nothing is stuck.", icon=":material/task_alt:")
        return
    st.caption(
        "Scheduled rows overdue beyond the grace period and processing rows whose lease ran "
        "out. The backstop picks these up every minute; rows that stay here mean it is not "
        "running (see System health)."
    )
    view = stuck.assign(age=[ui.age(s) for s in stuck["age_seconds"]])
    st.dataframe(
        view,
        hide_index=True,
        width="stretch",
        column_order=[
            "age",
            "status",
            "stuck_since",
            "recipient_email",
            "attempts",
            "task_id",
            "id",
        ],
        column_config={
            "age": st.column_config.TextColumn("Stuck for"),
            "stuck_since": ui.time_column("Since", help="due time, or end of the lease"),
            "recipient_email": "Recipient",
            "task_id": "Task id",
            "id": "Delivery id",
        },
    )


def render() -> None:
    auth.require_operator()
    ui.header(
        "Overview",
        "Deliveries right now and over time. Times in UTC unless the sidebar switch shows your zone.",
    )
    controls = st.columns([3, 2, 5], vertical_alignment="bottom")
    with controls[0]:
        window = st.segmented_control(
            "Window", list(data.WINDOWS), default="24 h", required=True, key="overview_window"
        )
    with controls[1]:
        auto = st.toggle(f"Auto-refresh every {REFRESH_SECONDS} s", value=True, key="overview_auto")

    @st.fragment(run_every=REFRESH_SECONDS if auto else None)
    def live() -> None:
        _tiles()
        sent = ui.zoned(data.sent_series(window), "bucket")
        rescued = ui.zoned(data.reconciliation_series(window), "bucket")
        bucket = data.WINDOWS[window][1]
        top = st.columns(2)
        top[0].plotly_chart(
            _status_chart(window), width="stretch", config={"displayModeBar": False}
        )
        top[1].plotly_chart(
            _lateness_chart(sent, window), width="stretch", config={"displayModeBar": False}
        )
        bottom = st.columns(2)
        bottom[0].plotly_chart(
            _reconciliation_chart(rescued, window),
            width="stretch",
            config={"displayModeBar": False},
        )
        bottom[1].plotly_chart(
            _throughput_chart(sent, window, bucket),
            width="stretch",
            config={"displayModeBar": False},
        )
        _stuck_table()
        st.caption(
            f"Updated {ui.when(utcnow())} · chart times in {ui.display_zone()}"
            + (" · refreshing" if auto else "")
        )

    live()


if __name__ == "__main__":
    render()
