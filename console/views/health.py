"""System health: the safety nets' last runs, the queue, provider circuits and alerts."""

from __future__ import annotations

import streamlit as st

from console import auth, data, ui
from core.queries.health import RunnerState

REFRESH_SECONDS = 15
CIRCUIT_LABELS = {
    "open": "🔴 open",
    "half_open": "🟡 half-open (one trial call may run)",
    "closed": "🟢 closed",
}
KIND_LABELS = {
    "backstop": "Backstop",
    "dispatcher": "Dispatcher",
    "failed_retrier": "Failed retrier",
}


def _verdict(state: RunnerState, max_age: float) -> tuple[str, str]:
    """(label, color) of one safety net."""
    if state.started_at is None:
        return "never ran", "gray"
    if state.age_seconds is not None and state.age_seconds > max_age:
        return "stale", "red"
    if not state.ok:
        return "last run failed", "orange"
    return "ok", "green"


def _runners(health: data.Health) -> None:
    settings = data.settings()
    # The failed retrier runs hourly; the others every minute.
    limits = {"failed_retrier": max(3 * 3600, settings.health_max_age_seconds)}
    cols = st.columns(len(health.runners) + 2)
    for col, state in zip(cols, health.runners, strict=False):
        label, color = _verdict(state, limits.get(state.kind, settings.health_max_age_seconds))
        with col, st.container(border=True):
            kind = KIND_LABELS.get(state.kind) or ui.text(state.kind)
            st.markdown(f"**{kind}**  \n:{color}-badge[{label}]")
            if state.started_at is None:
                st.caption("no run recorded")
            else:
                st.markdown(f"last run **{ui.age(state.age_seconds)} ago**")
                st.caption(
                    f"found {state.found}, requeued {state.requeued}, recovered {state.recovered}"
                    + (f", {state.errors} errors" if state.errors else "")
                )
    backstop = next((r for r in health.runners if r.kind == "backstop"), None)
    with cols[-2], st.container(border=True):
        beat_ok = (
            backstop is not None
            and backstop.ok
            and backstop.age_seconds is not None
            and backstop.age_seconds <= settings.health_max_age_seconds
        )
        st.markdown(
            "**Heartbeat**  \n" + (":green-badge[alive]" if beat_ok else ":red-badge[missing]")
        )
        st.caption(
            "pings "
            + ("configured" if settings.heartbeat_url else "not configured")
            + f"; stale after {ui.age(settings.health_max_age_seconds)}"
        )
    with cols[-1], st.container(border=True):
        queue = health.queue
        if queue.reachable:
            st.markdown("**Queue**  \n:green-badge[reachable]")
            st.caption(f"{queue.pending:,} pending · {queue.scheduled:,} scheduled (ETA)")
        else:
            st.markdown("**Queue**  \n:red-badge[unreachable]")
            st.caption(ui.text(queue.error))


def _waiting_for_keys(waiting: dict[str, int]) -> None:
    """Letters a worker could not open because their key is missing: they wait, unfailed."""
    if not waiting:
        return
    total = sum(waiting.values())
    st.error(
        f"{total:,} letter{'s' if total != 1 else ''} wait for encryption keys missing from "
        "the keyring. They stay scheduled and go out once the key is back in "
        "CAPSULE_ENCRYPTION_KEYS and the consumers are restarted.",
        icon=":material/key_off:",
    )
    st.dataframe(
        [{"key id": key_id, "letters waiting": n} for key_id, n in waiting.items()],
        hide_index=True,
    )


def render() -> None:
    auth.require_operator()
    ui.header(
        "System health",
        "Whether the safety nets run, what the broker holds, and which providers are failing.",
    )
    auto = st.toggle(f"Auto-refresh every {REFRESH_SECONDS} s", value=True, key="health_auto")

    @st.fragment(run_every=REFRESH_SECONDS if auto else None)
    def live() -> None:
        health = data.health()
        _runners(health)
        _waiting_for_keys(health.waiting_for_keys)
        providers, alerts = st.columns([2, 3])
        with providers:
            st.subheader("Provider circuits")
            if health.providers.empty:
                st.caption("No provider has reported yet.")
            else:
                view = health.providers.assign(
                    circuit=[CIRCUIT_LABELS.get(c, c) for c in health.providers["circuit"]]
                )
                st.dataframe(
                    view,
                    hide_index=True,
                    width="stretch",
                    column_config={
                        "opened_until": ui.time_column("Open until"),
                        "updated_at": ui.time_column("Updated"),
                        "consecutive_failures": st.column_config.NumberColumn("Failures in a row"),
                    },
                )
        with alerts:
            st.subheader("Recent alerts")
            if health.alerts.empty:
                st.caption("No alerts.")
            else:
                st.dataframe(
                    health.alerts,
                    hide_index=True,
                    width="stretch",
                    column_config={"created_at": ui.time_column("When")},
                )
        st.subheader("Recent safety-net runs")
        if health.runs.empty:
            st.warning(
                "No safety net has ever run. Is a consumer or the `capsule reconcile` cron running?"
            )
        else:
            st.dataframe(
                health.runs,
                hide_index=True,
                width="stretch",
                column_config={
                    "started_at": ui.time_column("Started"),
                    "duration_ms": st.column_config.NumberColumn("Duration", format="%.0f ms"),
                },
            )
        st.caption(f"Checked {ui.when(health.checked_at)}")

    live()


if __name__ == "__main__":
    render()
