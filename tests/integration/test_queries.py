"""The console's read models give the same answers on SQLite and PostgreSQL (`db_kind`)."""

from __future__ import annotations

import math
import uuid
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select, text

from core import failed_filter
from core.bootstrap import App
from core.db import session_scope
from core.failed_filter import FailedFilter
from core.models import Alert, ProviderState, ReconcilerRun, Status
from core.queries import audit, delivery, failed, overview
from core.queries import health as health_queries
from core.queries.audit import AuditFilter
from tests.conftest import T0
from tests.console.builders import add_delivery, add_event, add_failed, add_user

NOW = T0


def test_tiles_count_each_state_from_its_index(app: App) -> None:
    # Given one or more rows of every kind the tiles count
    with session_scope(app.session_factory) as s:
        u = add_user(s, "ada@example.com", NOW - timedelta(days=3))
        for minutes in (10, 50):  # due within the hour
            add_delivery(
                s, u, status="scheduled", deliver_at=NOW + timedelta(minutes=minutes), now=NOW
            )
        add_delivery(s, u, status="scheduled", deliver_at=NOW + timedelta(days=30), now=NOW)
        add_delivery(  # overdue past the 60 s grace: stuck
            s, u, status="scheduled", deliver_at=NOW - timedelta(minutes=5), now=NOW
        )
        add_delivery(  # overdue but within the grace: not stuck yet
            s, u, status="scheduled", deliver_at=NOW - timedelta(seconds=30), now=NOW
        )
        add_delivery(  # lease expired: stuck
            s,
            u,
            status="processing",
            deliver_at=NOW - timedelta(minutes=20),
            now=NOW,
            lease_until=NOW - timedelta(minutes=1),
        )
        add_delivery(  # lease still running
            s,
            u,
            status="processing",
            deliver_at=NOW - timedelta(minutes=1),
            now=NOW,
            lease_until=NOW + timedelta(minutes=4),
        )
        for hours in (1, 23, 25):
            at = NOW - timedelta(hours=hours)
            add_delivery(s, u, status="sent", deliver_at=at, sent_at=at, now=at)
        add_failed(s, u, failed_at=NOW - timedelta(hours=2))
        add_delivery(s, u, status="canceled", deliver_at=NOW + timedelta(days=1), now=NOW)
        # after sent, from the provider's webhooks: still sent letters for the tiles
        for status, hours in (("delivered", 3), ("bounced", 4), ("bounced", 30)):
            at = NOW - timedelta(hours=hours)
            add_delivery(s, u, status=status, deliver_at=at, sent_at=at, now=at)
        add_delivery(s, u, status="held", deliver_at=NOW - timedelta(minutes=3), now=NOW)
        s.commit()

    # When the overview reads its tiles
    with session_scope(app.session_factory) as s:
        tiles = overview.tiles(s, now=NOW, grace_seconds=60)
        counts = overview.status_counts(s, now=NOW, window=timedelta(hours=24))

    # Then each tile counts exactly its rows
    assert tiles == overview.Tiles(
        scheduled=5, due_next_hour=2, processing=2, sent_24h=4, failed_open=1, stuck=2
    )
    assert dict(zip(counts["status"], counts["count"], strict=True)) == {
        "scheduled": 5,
        "processing": 2,
        "sent": 2,  # finished within the window: the one sent 25 h ago is left out
        "failed": 1,
        "canceled": 1,
        "delivered": 1,
        "bounced": 1,  # the one sent 30 h ago is left out
        "complained": 0,
        "held": 1,
    }


def test_a_large_scheduled_total_is_postgresqls_estimate_and_says_so(app: App) -> None:
    # Given 300 letters waiting, and statistics that know about them
    with session_scope(app.session_factory) as s:
        u = add_user(s, "lin@example.com", NOW - timedelta(days=3))
        for day in range(300):
            add_delivery(
                s, u, status="scheduled", deliver_at=NOW + timedelta(days=day + 1), now=NOW
            )
        s.commit()
        if app.engine.dialect.name == "postgresql":
            s.execute(text("ANALYZE deliveries"))
            s.commit()

    with session_scope(app.session_factory) as s:
        exact = overview.tiles(s, now=NOW, grace_seconds=60)
        # When the exact count is reserved for totals below 100
        large = overview.tiles(s, now=NOW, grace_seconds=60, exact_up_to=100)
        counts = overview.status_counts(s, now=NOW, window=timedelta(hours=24), exact_up_to=100)

    # Then below the bound the count is exact; above it PostgreSQL's estimate, marked as one
    assert (exact.scheduled, exact.scheduled_estimated) == (300, False)
    if app.engine.dialect.name == "postgresql":
        assert large.scheduled_estimated and large.scheduled == pytest.approx(300, rel=0.1)
        assert counts["scope"].iloc[0] == "estimate"
    else:  # SQLite has no such figure: always exact
        assert (large.scheduled, large.scheduled_estimated) == (300, False)
        assert counts["scope"].iloc[0] == "now"
    assert large.due_next_hour == 0 and counts["count"].iloc[0] == large.scheduled


def _sent_with_lateness(app: App, lateness_by_hour: dict[int, list[float]]) -> None:
    with session_scope(app.session_factory) as s:
        u = add_user(s, "grace@example.com", NOW - timedelta(days=30))
        for hours_ago, values in lateness_by_hour.items():
            base = NOW.replace(minute=0, second=0) - timedelta(hours=hours_ago)
            for i, late in enumerate(values):
                due = base + timedelta(minutes=1 + i % 50)
                add_delivery(
                    s,
                    u,
                    status="sent",
                    deliver_at=due,
                    sent_at=due + timedelta(seconds=late),
                    now=due - timedelta(days=1),
                )
        s.commit()


def test_lateness_percentiles_match_linear_interpolation(app: App) -> None:
    # Given sent rows with known lateness in three hours, one of them outside a 24 h window
    rng = np.random.default_rng(3)
    inside = {
        2: [float(v) for v in rng.lognormal(0, 1, 37).round(3)],
        5: [0.25, 0.5, 1.0, 120.0],
        0: [7.5],
    }
    _sent_with_lateness(app, {**inside, 30: [999.0, 999.0]})

    # When the series is read hourly over 24 h
    with session_scope(app.session_factory) as s:
        series = overview.sent_series(
            s, now=NOW + timedelta(minutes=59), window=timedelta(hours=24)
        )

    # Then there is one row per hour, zero-filled, and each percentile is percentile_cont
    assert len(series) == 24
    assert series["bucket"].iloc[-1] == pd.Timestamp(NOW.replace(minute=0))
    assert series["sent"].sum() == sum(len(v) for v in inside.values())
    for hours_ago, values in inside.items():
        row = series[series["bucket"] == pd.Timestamp(NOW - timedelta(hours=hours_ago))].iloc[0]
        assert row["sent"] == len(values)
        for column, q in (("p50", 50), ("p95", 95), ("p99", 99)):
            assert row[column] == pytest.approx(np.percentile(values, q), rel=1e-6, abs=1e-3)
    empty = series[series["sent"] == 0]
    assert len(empty) == 21 and empty["p50"].isna().all()


def test_daily_buckets_and_window_bound(app: App) -> None:
    _sent_with_lateness(app, {1: [1.0, 3.0], 30: [10.0], 24 * 9: [50.0]})
    with session_scope(app.session_factory) as s:
        series = overview.sent_series(s, now=NOW, window=timedelta(days=7), bucket="day")
    assert len(series) == 7
    assert series["sent"].tolist()[-2:] == [1, 2]  # yesterday (30 h ago) and today
    assert series["sent"].sum() == 3  # nine days ago is outside the window
    assert series["p50"].iloc[-1] == pytest.approx(2.0, abs=1e-3)


def test_reconciliation_rate_is_rescued_over_sent(app: App) -> None:
    _sent_with_lateness(app, {1: [1.0] * 10, 2: [1.0] * 4})
    with session_scope(app.session_factory) as s:
        hour = NOW.replace(minute=0) - timedelta(hours=1)
        for minute, requeued, recovered in ((0, 1, 0), (10, 0, 1), (20, 3, 0)):
            s.add(
                ReconcilerRun(
                    kind="backstop",
                    runner="test",
                    slot=hour + timedelta(minutes=minute),
                    started_at=hour + timedelta(minutes=minute),
                    requeued=requeued,
                    recovered=recovered,
                    ok=True,
                )
            )
        s.add(  # another kind does not count
            ReconcilerRun(
                kind="dispatcher", runner="test", slot=hour, started_at=hour, requeued=50, ok=True
            )
        )
        s.commit()
        series = overview.reconciliation_series(s, now=NOW, window=timedelta(hours=6))
    by_bucket = series.set_index("bucket")
    row = by_bucket.loc[pd.Timestamp(hour)]
    assert (row["runs"], row["rescued"], row["sent"]) == (3, 5, 10)
    assert row["share"] == pytest.approx(0.5)
    assert math.isnan(by_bucket.loc[pd.Timestamp(hour - timedelta(hours=2)), "share"])


def test_stuck_items_oldest_first_with_ages(app: App) -> None:
    with session_scope(app.session_factory) as s:
        u = add_user(s, "ken@example.com", NOW)
        old = add_delivery(
            s, u, status="scheduled", deliver_at=NOW - timedelta(minutes=40), now=NOW
        )
        lease = add_delivery(
            s,
            u,
            status="processing",
            deliver_at=NOW - timedelta(minutes=30),
            now=NOW,
            lease_until=NOW - timedelta(minutes=10),
        )
        add_delivery(s, u, status="scheduled", deliver_at=NOW - timedelta(seconds=10), now=NOW)
        s.commit()
        stuck = overview.stuck_items(s, now=NOW, grace_seconds=60)
    assert stuck["id"].tolist() == [str(old), str(lease)]
    assert stuck["age_seconds"].tolist() == [2400.0, 600.0]
    assert stuck["status"].tolist() == ["scheduled", "processing"]


@pytest.fixture
def failures(app: App) -> dict[str, uuid.UUID]:
    """Four failures with different classes, providers, times and recipients."""
    with session_scope(app.session_factory) as s:
        ada = add_user(s, "ada@example.com", NOW - timedelta(days=30))
        bob = add_user(s, "bob@corp.example", NOW - timedelta(days=30))
        ids = {
            "perm_resend": add_failed(
                s,
                ada,
                failed_at=NOW - timedelta(days=3),
                recipient="x@gmail.test",
                notified="sent",
            ),
            "trans_postmark": add_failed(
                s,
                ada,
                failed_at=NOW - timedelta(days=2),
                error_class="transient",
                provider="postmark",
                code=503,
                recipient="y@gmail.test",
            ),
            "trans_resend": add_failed(
                s,
                bob,
                failed_at=NOW - timedelta(hours=5),
                error_class="transient",
                code=503,
                recipient="z@corp.example",
            ),
            "ambiguous": add_failed(
                s,
                bob,
                failed_at=NOW - timedelta(hours=1),
                error_class="ambiguous",
                code=None,
                recipient="w@other.test",
            ),
        }
        add_delivery(s, ada, status="sent", deliver_at=NOW, sent_at=NOW, now=NOW)
        s.commit()
    return ids


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (FailedFilter(), ["ambiguous", "trans_resend", "trans_postmark", "perm_resend"]),
        (FailedFilter(error_classes=("transient",)), ["trans_resend", "trans_postmark"]),
        (FailedFilter(provider="postmark"), ["trans_postmark"]),
        (FailedFilter(failed_from=NOW - timedelta(days=1)), ["ambiguous", "trans_resend"]),
        (FailedFilter(failed_until=NOW - timedelta(days=1)), ["trans_postmark", "perm_resend"]),
        (FailedFilter(recipient_domain="@Gmail.test"), ["trans_postmark", "perm_resend"]),
        (FailedFilter(search="bob@corp"), ["ambiguous", "trans_resend"]),  # owner
        (FailedFilter(search="Y@GMAIL"), ["trans_postmark"]),  # recipient
        (FailedFilter(search="100%_"), []),  # wildcards are literal
    ],
)
def test_failed_filters(
    app: App, failures: dict[str, uuid.UUID], flt: FailedFilter, expected: list[str]
) -> None:
    with session_scope(app.session_factory) as s:
        frame = failed.failed_deliveries(s, flt)
        count = failed_filter.failed_count(s, flt)
    assert frame["id"].tolist() == [str(failures[name]) for name in expected]
    assert count == len(expected)


def test_failed_rows_carry_last_attempt_and_notice(
    app: App, failures: dict[str, uuid.UUID]
) -> None:
    with session_scope(app.session_factory) as s:
        frame = failed.failed_deliveries(s, FailedFilter()).set_index("id")
        by_class = failed.failed_by_error_class(s, FailedFilter(error_classes=("ambiguous",)))
        by_provider = failed.failed_by_provider(s, FailedFilter())
    perm = frame.loc[str(failures["perm_resend"])]
    assert (perm["provider"], perm["status_code"], perm["notified"]) == ("resend", 422, "sent")
    assert perm["owner_email"] == "ada@example.com"
    assert pd.isna(frame.loc[str(failures["ambiguous"]), "notified"])
    # counts per class ignore the class filter itself, so every class stays visible
    assert dict(zip(by_class["error_class"], by_class["count"], strict=True)) == {
        "transient": 2,
        "permanent": 1,
        "ambiguous": 1,
    }
    assert dict(zip(by_provider["provider"], by_provider["count"], strict=True)) == {
        "resend": 3,
        "postmark": 1,
    }


def test_failed_filter_round_trips_and_pins(failures: dict[str, uuid.UUID]) -> None:
    flt = FailedFilter(("transient",), "resend", NOW - timedelta(days=1), None, "corp.example")
    pinned = flt.pinned(NOW)
    assert pinned.failed_until == NOW
    assert FailedFilter.from_dict(pinned.to_dict()) == pinned
    assert "transient" in pinned.describe() and "@corp.example" in pinned.describe()
    assert flt.pinned(NOW).pinned(NOW + timedelta(days=1)).failed_until == NOW


def test_delivery_detail_shows_metadata_never_the_letter(
    app: App, failures: dict[str, uuid.UUID]
) -> None:
    delivery_id = failures["perm_resend"]
    with session_scope(app.session_factory) as s:
        add_event(s, "delivery.failed", "system", NOW - timedelta(days=3), delivery_id, "422")
        s.commit()
        detail = delivery.delivery_detail(s, delivery_id)
        missing = delivery.delivery_detail(s, uuid.uuid4())
    assert missing is None
    assert detail is not None
    assert (detail.status, detail.error_class, detail.owner_email) == (
        "failed",
        "permanent",
        "ada@example.com",
    )
    assert detail.credit_held == 0  # refunded on the permanent failure
    assert detail.attempts[["provider", "outcome", "status_code", "duration_ms", "task_id"]].iloc[
        0
    ].tolist() == ["resend", "permanent", 422, 101, "task-1"]
    assert detail.audit["type"].tolist() == ["delivery.failed"]
    assert detail.notifications["status"].tolist() == ["sent"]
    fields = set(vars(detail))
    assert not fields & {"subject", "body", "subject_ciphertext", "body_ciphertext", "letter_id"}


def test_audit_log_pages_newest_first_without_gaps(app: App) -> None:
    with session_scope(app.session_factory) as s:
        u = add_user(s, "lin@example.com", NOW)
        target = add_delivery(s, u, status="scheduled", deliver_at=NOW + timedelta(days=1), now=NOW)
        for i in range(23):  # several events share a timestamp: the id breaks the tie
            at = NOW - timedelta(minutes=i // 3)
            add_event(s, "delivery.requeued" if i % 2 else "delivery.canceled", f"op{i % 3}", at)
        add_event(s, "delivery.sent", "system", NOW - timedelta(days=2), target, "ok")
        s.commit()
        seen: list[int] = []
        stamps: list[pd.Timestamp] = []
        cursor = None
        pages = 0
        while True:
            page = audit.audit_log(s, AuditFilter(), before=cursor, limit=5)
            seen += page.rows["id"].tolist()
            stamps += page.rows["created_at"].tolist()
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        only = audit.audit_log(s, AuditFilter(types=("delivery.requeued",), actor="op1"))
        by_delivery = audit.audit_log(s, AuditFilter(delivery_id=target))
        recent = audit.audit_log(s, AuditFilter(since=NOW - timedelta(minutes=1)))
        types = audit.audit_types(s)
    assert pages == 5 and len(seen) == 24 and len(set(seen)) == 24
    assert stamps == sorted(stamps, reverse=True)
    assert set(only.rows["actor"]) == {"op1"} and set(only.rows["type"]) == {"delivery.requeued"}
    assert by_delivery.rows["reason"].tolist() == ["ok"]
    assert len(recent.rows) == 6
    assert types == ["delivery.canceled", "delivery.requeued", "delivery.sent"]


def test_health_reads_runs_circuits_and_alerts(app: App) -> None:
    with session_scope(app.session_factory) as s:
        for minutes, ok in ((1, True), (2, False), (3, True)):
            at = NOW - timedelta(minutes=minutes)
            s.add(
                ReconcilerRun(
                    kind="backstop",
                    runner="w1",
                    slot=at,
                    started_at=at,
                    finished_at=at + timedelta(milliseconds=40),
                    found=minutes,
                    ok=ok,
                )
            )
        s.add(
            ProviderState(
                provider="resend",
                consecutive_failures=5,
                opened_until=NOW + timedelta(seconds=30),
                last_error="503",
                updated_at=NOW,
            )
        )
        s.add(ProviderState(provider="postmark", consecutive_failures=0, updated_at=NOW))
        s.add(Alert(kind="stuck", message="12 stuck rows", created_at=NOW, delivered=True))
        s.commit()
        states = {r.kind: r for r in health_queries.runner_states(s, now=NOW)}
        runs = health_queries.recent_runs(s, limit=2)
        circuits = health_queries.provider_states(s, now=NOW)
        alerts = health_queries.recent_alerts(s)
    assert states["backstop"].age_seconds == 60 and states["backstop"].ok is True
    assert states["dispatcher"].started_at is None
    assert runs["found"].tolist() == [1, 2] and runs["duration_ms"].tolist() == [40.0, 40.0]
    assert dict(zip(circuits["provider"], circuits["circuit"], strict=True)) == {
        "postmark": "closed",
        "resend": "open",
    }
    assert alerts["message"].tolist() == ["12 stuck rows"]


def test_deliveries_for_address(app: App, failures: dict[str, uuid.UUID]) -> None:
    with session_scope(app.session_factory) as s:
        by_owner = delivery.deliveries_for_address(s, "BOB@corp.example")
        by_recipient = delivery.deliveries_for_address(s, "x@gmail.test")
        states = failed.delivery_states(s, [failures["ambiguous"], uuid.uuid4()])
    assert set(by_owner["id"]) == {str(failures["ambiguous"]), str(failures["trans_resend"])}
    assert by_recipient["id"].tolist() == [str(failures["perm_resend"])]
    assert states["status"].tolist() == [Status.FAILED]


# ---------------------------------------------------------------- rollups


def test_rollups_cover_finished_settled_buckets_once_and_the_series_reads_them(app: App) -> None:
    from core.models import SentRollup
    from core.rollup import SETTLE, roll_up

    # Given letters sent in several hours and days, the latest in the current hour
    rng = np.random.default_rng(5)
    lateness = {
        0: [0.5, 1.5],
        1: [2.0],
        3: [float(v) for v in rng.lognormal(0, 1, 23).round(3)],
        26: [4.0, 8.0, 16.0],
        24 * 20: [30.0],
    }
    _sent_with_lateness(app, lateness)
    now = NOW + timedelta(minutes=10)
    windows = [
        (timedelta(hours=24), "hour"),
        (timedelta(days=7), "hour"),
        (timedelta(days=30), "day"),
    ]
    with session_scope(app.session_factory) as s:
        live = [overview.sent_series(s, now=now, window=w, bucket=b) for w, b in windows]

    # When the rollup runs, and runs again
    with session_scope(app.session_factory) as s:
        written = roll_up(s, now=now)
        s.commit()
    with session_scope(app.session_factory) as s:
        again = roll_up(s, now=now)
        s.commit()
        hours = s.scalars(select(SentRollup.start).where(SentRollup.bucket == "hour")).all()

    # Then every finished, settled hour of 8 days and day of 35 has one row, written once,
    # and not the hour that ended less than SETTLE ago nor the current one
    assert written == (8 * 24 - 1) + (35 - 1) and again == 0
    last_hour = max(pd.Timestamp(h) for h in hours)
    assert last_hour + timedelta(hours=1) <= now - SETTLE
    assert last_hour == pd.Timestamp(NOW - timedelta(hours=2))  # 11:00-12:00 ended 10 min ago

    # And the series read from the rollups are exactly the live ones
    with session_scope(app.session_factory) as s:
        rolled = [overview.sent_series(s, now=now, window=w, bucket=b) for w, b in windows]
    for before, after in zip(live, rolled, strict=True):
        pd.testing.assert_frame_equal(before, after, check_dtype=False, atol=1e-6)
    assert rolled[2]["sent"].sum() == sum(len(v) for v in lateness.values())


def test_a_rolled_up_bucket_is_read_from_the_rollup_and_gaps_from_the_rows(app: App) -> None:
    from core.models import SentRollup

    # Given the day before yesterday rolled up (with a figure no row supports), nothing else
    _sent_with_lateness(app, {1: [1.0, 3.0], 30: [10.0]})
    day = pd.Timestamp(NOW.replace(hour=0, minute=0)) - timedelta(days=2)
    with session_scope(app.session_factory) as s:
        s.add(SentRollup(bucket="day", start=day, sent=7, p50=5, p95=6, p99=7, computed_at=NOW))
        s.commit()

    # When the 7-day series is read
    with session_scope(app.session_factory) as s:
        series = overview.sent_series(s, now=NOW, window=timedelta(days=7), bucket="day")

    # Then that day comes from the rollup, and the days after it from the sent rows
    assert series["sent"].tolist()[-3:] == [7, 1, 2]
    assert series["p99"].iloc[-3] == 7
