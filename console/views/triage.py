"""Triage: failed deliveries, filtered and grouped; support acts on selected rows.

The filter lives in the URL (`/triage?error_class=transient&provider=resend&since=2026-11-30`),
so a link pasted into a ticket opens the same rows; the list pages through the whole set, and
the whole filtered set exports as CSV.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import date

import pandas as pd
import plotly.express as px
import streamlit as st

from console import actions, auth, bounced, data, filters, ui
from core.config import KNOWN_PROVIDERS
from core.failed_filter import SEARCH_IN, FailedCursor, FailedFilter
from core.models import ErrorClass
from core.operators import Operator, Role
from core.policy import utcnow
from core.queries.failed import cursor_after

SELECTED_KEY = "_triage_selected"
URL_KEY = "_triage_url"  # the filter query this page last read from or wrote to the URL
PAGES_KEY = "_triage_pages"  # (filter, page size, cursors of the pages before this one)
PARAMS = ("error_class", "provider", "since", "until", "search", "search_in")
CLASSES = [e.value for e in ErrorClass]
PAGE_SIZES = [25, 50, 100, 200]
SEARCH_LABELS = {"any": "owner or recipient", "owner": "owner", "recipient": "recipient"}
MAX_SEARCH_CHARS = 200


def _linked() -> dict[str, list[str]]:
    """The filter parameters in the URL now (repeated keys kept, empty ones dropped)."""
    found = {name: [v for v in st.query_params.get_all(name) if v] for name in PARAMS}
    return {name: values for name, values in found.items() if values}


def _day(raw: str, name: str, problems: list[str]) -> date | None:
    try:
        return date.fromisoformat(raw)
    except ValueError:
        problems.append(f"{name}={raw!r} is not a date (YYYY-MM-DD)")
        return None


def link_to_widgets(linked: Mapping[str, list[str]]) -> list[str]:
    """Fill the filter widgets from a link's query; returns what was wrong with it (each
    wrong value is left at its default)."""
    problems: list[str] = []
    classes: list[str] = []
    for raw in (c.strip() for v in linked.get("error_class", []) for c in v.split(",")):
        if raw in CLASSES and raw not in classes:
            classes.append(raw)
        elif raw:
            problems.append(f"error_class={raw!r} is not one of {', '.join(CLASSES)}")
    provider = linked.get("provider", [filters.ANY_PROVIDER])[-1]
    if provider not in filters.PROVIDERS:
        problems.append(f"provider={provider!r} is not one of {', '.join(KNOWN_PROVIDERS)}")
        provider = filters.ANY_PROVIDER
    days = {
        name: _day(linked[name][-1], name, problems) if name in linked else None
        for name in ("since", "until")
    }
    if days["since"] and days["until"] and days["until"] < days["since"]:
        problems.append("until is before since")
        days["until"] = None
    search = linked.get("search", [""])[-1]
    if len(search) > MAX_SEARCH_CHARS:
        problems.append(f"search is longer than {MAX_SEARCH_CHARS} characters")
        search = ""
    search_in = linked.get("search_in", ["any"])[-1]
    if search_in not in SEARCH_IN:
        problems.append(f"search_in={search_in!r} is not one of {', '.join(SEARCH_IN)}")
        search_in = "any"
    st.session_state["triage_classes"] = classes
    st.session_state["triage_provider"] = provider
    st.session_state["triage_since"] = days["since"]
    st.session_state["triage_until"] = days["until"]
    st.session_state["triage_search"] = search
    st.session_state["triage_search_in"] = search_in
    return problems


def filter_to_query(flt: FailedFilter) -> dict[str, list[str]]:
    """The URL query that opens `flt` (the inverse of `link_to_widgets`)."""
    query: dict[str, list[str]] = {}
    if flt.error_classes:
        query["error_class"] = list(flt.error_classes)
    if flt.provider:
        query["provider"] = [flt.provider]
    if flt.failed_from:
        query["since"] = [flt.failed_from.date().isoformat()]
    if flt.failed_until:
        query["until"] = [flt.failed_until.date().isoformat()]
    if flt.search:
        query["search"] = [flt.search]
        if flt.search_in != "any":
            query["search_in"] = [flt.search_in]
    return query


def _write_url(query: dict[str, list[str]]) -> None:
    """Put the filter into the URL, leaving any other parameter alone."""
    st.session_state[URL_KEY] = query
    if _linked() == query:
        return
    for name in PARAMS:
        if name in st.query_params:
            del st.query_params[name]
    for name, values in query.items():
        st.query_params[name] = values if len(values) > 1 else values[0]


def chosen_filter() -> FailedFilter:
    """The filter widgets, filled from the URL when it carries a new link; returns what they
    select and keeps the URL in step with it."""
    linked = _linked()
    if linked and linked != st.session_state.get(URL_KEY):
        problems = link_to_widgets(linked)
        if problems:
            st.warning(
                "This link's filter had values the console does not know; they were left at "
                "their defaults: " + ui.text("; ".join(problems)) + ".",
                icon=":material/link_off:",
            )
    for key, default in (("triage_since", None), ("triage_until", None)):
        st.session_state.setdefault(key, default)
    c1, c2, c3, c4, c5, c6 = st.columns([3, 2, 2, 2, 3, 2])
    with c1:
        classes = filters.error_classes("triage_classes", CLASSES)
    with c2:
        provider = filters.provider("triage_provider")
    with c3:
        since = st.date_input("Failed since (UTC day)", key="triage_since", format="YYYY-MM-DD")
    with c4:
        until = st.date_input("Failed until (UTC day)", key="triage_until", format="YYYY-MM-DD")
    with c5:
        search = st.text_input(
            "Search",
            key="triage_search",
            max_chars=MAX_SEARCH_CHARS,
            placeholder="part of an address, e.g. ada@ or gmail",
        )
    with c6:
        search_in = st.selectbox(
            "Search in",
            list(SEARCH_LABELS),
            format_func=SEARCH_LABELS.__getitem__,
            key="triage_search_in",
        )
    flt = FailedFilter(
        error_classes=classes,
        provider=provider,
        failed_from=filters.start_of(since),
        failed_until=filters.end_of(until),
        search=search.strip() or None,
        search_in=search_in,
    )
    _write_url(filter_to_query(flt))
    return flt


def _page_cursor(flt: FailedFilter, size: int) -> tuple[int, FailedCursor | None]:
    """(page number from 0, the cursor it starts after); a new filter starts at page 0."""
    state = st.session_state.get(PAGES_KEY)
    if not state or state[0] != flt or state[1] != size:
        state = (flt, size, [])
        st.session_state[PAGES_KEY] = state
    cursors: list[FailedCursor] = state[2]
    return len(cursors), (cursors[-1] if cursors else None)


def _pager(next_cursor: FailedCursor | None, page: int, size: int, shown: int, total: int) -> None:
    """Newer / older buttons and where this page sits in the whole set."""
    first = page * size + 1
    left, middle, right = st.columns([1, 3, 1], vertical_alignment="center")
    with middle:
        st.caption(f"Rows {first:,}–{first + shown - 1:,} of {total:,}, newest first")
    with left:
        if st.button(
            "Newer", icon=":material/chevron_left:", disabled=page == 0, key="triage_newer"
        ):
            st.session_state[PAGES_KEY][2].pop()
            st.rerun()
    with right:
        older = next_cursor is not None and first + shown - 1 < total
        if st.button(
            "Older", icon=":material/chevron_right:", disabled=not older, key="triage_older"
        ):
            st.session_state[PAGES_KEY][2].append(next_cursor)
            st.rerun()


def _export(flt: FailedFilter, total: int) -> None:
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    st.download_button(
        f"Export all {total:,} as CSV",
        data=data.failed_csv(flt),
        file_name=f"failed-deliveries-{stamp}.csv",
        mime="text/csv",
        icon=":material/download:",
        on_click="ignore",
        key="triage_export",
        help="Every delivery this filter matches, not only this page; built when you click.",
    )


def render() -> None:
    operator = auth.require_operator()
    ui.header(
        "Triage",
        "Failed deliveries, newest first. Select rows, then requeue, cancel or notify the owner; "
        "every action asks for a reason and lands in the audit log. The address bar holds the "
        "filter: share it to show someone the same rows.",
    )
    ui.show_flash()
    if st.toggle("Bounced after send", key="triage_bounced", help=bounced.HELP):
        bounced.render(operator)
        return
    asked = chosen_filter()
    scope = data.search_scope(asked)
    flt = scope.filter
    if scope.stopped_early:
        st.info(
            f"The search stopped early: it read the newest {scope.limit:,} failed deliveries "
            f"the other filters match, back to {ui.when(scope.stopped_at)}. Set "
            "“Failed until” to search older ones.",
            icon=":material/manage_search:",
        )
    total = _summary(operator, flt)

    size = st.session_state.get("triage_page_size", PAGE_SIZES[1])
    page, after = _page_cursor(flt, size)
    frame = data.failed_page(flt, size, after)
    if frame.empty:
        st.success("Nothing to triage for this filter.", icon=":material/task_alt:")
        actions.render_pending(operator)
        return
    ids = _selectable_table(frame)
    _pager(cursor_after(frame), page, size, len(frame), total)
    _action_bar(operator, ids)
    actions.render_pending(operator)


def _summary(operator: Operator, flt: FailedFilter) -> int:
    """How many match, the export, and the chart by error class; returns the count."""
    by_class = data.failed_by_class(flt)
    total = data.failed_count(flt)
    left, right = st.columns([1, 2], vertical_alignment="center")
    with left:
        st.metric("Failed and open (matching)", f"{total:,}", border=True)
        if not operator.can(Role.SUPPORT):
            st.info("You have read-only access.", icon=":material/visibility:")
        if total:
            _export(flt, total)
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
    return total


def _selectable_table(frame: pd.DataFrame) -> list[str]:
    """The page's rows as a table to select from; returns the selected delivery ids."""
    # The table's key follows the rows it shows: when they change, a stale selection resets
    # instead of pointing at other rows.
    digest = hashlib.sha1("".join(frame["id"]).encode()).hexdigest()[:12]
    event = st.dataframe(
        ui.failed_table(frame),
        key=f"failed_{digest}",
        on_select="rerun",
        selection_mode="multi-row",
        hide_index=True,
        width="stretch",
        height=min(38 + 35 * len(frame), 460),
        column_order=ui.FAILED_ORDER,
        column_config=ui.failed_columns(),
    )
    # Positions become ids at once: later reruns may load different rows.
    ids = [str(frame.iloc[i]["id"]) for i in event.selection.rows]
    st.session_state[SELECTED_KEY] = ids
    return ids


def _action_bar(operator: Operator, ids: list[str]) -> None:
    """The support actions on the selected rows, the page size, and the detail link."""
    bar_left, bar_mid, bar_right = st.columns([3, 1, 1], vertical_alignment="bottom")
    with bar_left:
        st.caption(f"{len(ids)} selected" if ids else "Select rows to act on them.")
        actions.buttons(operator, ids, key="triage")
    with bar_mid:
        st.selectbox("Rows per page", PAGE_SIZES, index=1, key="triage_page_size")
    with bar_right:
        if st.button(
            "Open detail",
            icon=":material/open_in_new:",
            disabled=len(ids) != 1,
            key="triage_open",
            width="stretch",
        ):
            st.switch_page("views/delivery.py", query_params={"id": ids[0]})


if __name__ == "__main__":
    render()
