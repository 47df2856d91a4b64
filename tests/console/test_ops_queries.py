"""The triage read models behind shareable links, pages, exports and bounded searches, on
SQLite and PostgreSQL (`db_kind`)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from core import failed_filter
from core.bootstrap import App
from core.db import session_scope
from core.failed_filter import FailedFilter
from core.models import ProviderState
from core.queries import failed
from core.queries import health as health_queries
from tests.conftest import T0
from tests.console.builders import add_failed, add_user

NOW = T0


@pytest.fixture
def many(app: App) -> list[str]:
    """23 failures, newest first as triage lists them: three share one failed_at (a tie the
    pages must split by id), and the owner or the recipient carry 'kim'."""
    with session_scope(app.session_factory) as s:
        kim = add_user(s, "kim@owner.example", NOW - timedelta(days=9))
        lee = add_user(s, "lee@owner.example", NOW - timedelta(days=9))
        ids: list[uuid.UUID] = []
        for n in range(20):
            ids.append(
                add_failed(
                    s,
                    kim if n % 2 else lee,
                    failed_at=NOW - timedelta(minutes=n + 1),
                    recipient="kim@to.example" if n % 5 == 0 else f"r{n}@to.example",
                )
            )
        for _ in range(3):  # the tie, the oldest of all
            ids.append(add_failed(s, lee, failed_at=NOW - timedelta(hours=1)))
        s.commit()
        frame = failed.failed_deliveries(s, FailedFilter())
    assert len(frame) == 23
    return [str(i) for i in frame["id"]]


def test_pages_follow_the_keyset_without_gaps_or_repeats(app: App, many: list[str]) -> None:
    seen: list[str] = []
    after = None
    with session_scope(app.session_factory) as s:
        while True:
            page = failed.failed_deliveries(s, FailedFilter(), limit=5, after=after)
            if page.empty:
                break
            seen += page["id"].tolist()
            after = failed.cursor_after(page)
    assert seen == many  # the three tied rows split across pages 4 and 5 by id


def test_a_new_failure_does_not_shift_the_next_page(app: App, many: list[str]) -> None:
    with session_scope(app.session_factory) as s:
        first = failed.failed_deliveries(s, FailedFilter(), limit=5)
        user = add_user(s, "new@owner.example", NOW)
        add_failed(s, user, failed_at=NOW)  # fails while the reader looks at page 1
        s.commit()
        second = failed.failed_deliveries(
            s, FailedFilter(), limit=5, after=failed.cursor_after(first)
        )
    assert second["id"].tolist() == many[5:10]


def test_export_chunks_cover_the_whole_pinned_set(app: App, many: list[str]) -> None:
    with session_scope(app.session_factory) as s:
        late = add_user(s, "late@owner.example", NOW)
        add_failed(s, late, failed_at=NOW + timedelta(seconds=5))  # after the export's `now`
        s.commit()
        chunks = list(failed.failed_chunks(s, FailedFilter(), now=NOW, chunk=4))
    assert [len(c) for c in chunks] == [4, 4, 4, 4, 4, 3]
    assert [i for c in chunks for i in c["id"]] == many


@pytest.mark.parametrize(
    ("search_in", "expected"),
    [("owner", 10), ("recipient", 4), ("any", 10 + 2)],  # recipients 0, 10 are lee's
)
def test_search_by_owner_or_recipient(
    app: App, many: list[str], search_in: str, expected: int
) -> None:
    with session_scope(app.session_factory) as s:
        count = failed_filter.failed_count(s, FailedFilter(search="KIM@", search_in=search_in))
    assert count == expected


def test_search_says_when_it_stopped_early(app: App, many: list[str]) -> None:
    flt = FailedFilter(search="kim", search_in="owner")
    with session_scope(app.session_factory) as s:
        whole = failed_filter.search_scope(s, flt, limit=23)
        bounded = failed_filter.search_scope(s, flt, limit=6)
        count = failed_filter.failed_count(s, bounded.filter)
        unsearched = failed_filter.search_scope(s, FailedFilter(), limit=6)
    assert not whole.stopped_early and whole.filter == flt
    # the newest six failures were read (minutes 1..6); kim owns the odd ones: 2, 4, 6
    assert bounded.stopped_early and count == 3
    assert bounded.stopped_at == NOW - timedelta(minutes=7) + timedelta(microseconds=1)
    assert not unsearched.stopped_early  # no search, nothing to bound


def test_filter_with_search_in_round_trips_and_refuses_nonsense() -> None:
    flt = FailedFilter(search="kim", search_in="recipient")
    assert FailedFilter.from_dict(flt.to_dict()) == flt
    assert FailedFilter.from_dict({"search": "kim"}).search_in == "any"
    assert "in the recipient" in flt.describe()
    with pytest.raises(ValueError):
        FailedFilter(search="kim", search_in="subject")


def test_half_open_circuits_read_as_half_open(app: App) -> None:
    with session_scope(app.session_factory) as s:
        for provider, until in (
            ("resend", NOW + timedelta(seconds=30)),  # still open
            ("postmark", NOW - timedelta(seconds=1)),  # open period over: one trial may run
            ("smtp", None),
        ):
            s.add(
                ProviderState(
                    provider=provider,
                    consecutive_failures=5 if until else 0,
                    opened_until=until,
                    updated_at=NOW,
                )
            )
        s.commit()
        circuits = health_queries.provider_states(s, now=NOW)
    assert dict(zip(circuits["provider"], circuits["circuit"], strict=True)) == {
        "postmark": "half_open",
        "resend": "open",
        "smtp": "closed",
    }
