"""Backoff, lease, horizon and WHEN parsing: pure functions."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from core.errors import InvalidDeliveryTime
from core.policy import (
    backoff_seconds,
    deferral_seconds,
    lease_until,
    parse_when,
    within_horizon,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 15, 30), (2, 30, 60), (3, 60, 120), (8, 1800, 3600), (30, 1800, 3600)],
)
def test_backoff_doubles_with_jitter_and_is_capped(attempt: int, low: float, high: float) -> None:
    rng = random.Random(1)
    draws = [backoff_seconds(attempt, base=30, cap=3600, rng=rng) for _ in range(200)]
    assert all(low <= d <= high for d in draws)
    assert max(draws) - min(draws) > (high - low) / 2  # really jittered


def test_backoff_honours_retry_after_and_rejects_attempt_zero() -> None:
    assert backoff_seconds(1, base=30, cap=3600, retry_after=600, rng=random.Random(0)) == 600
    with pytest.raises(ValueError):
        backoff_seconds(0, base=30, cap=3600)


@pytest.mark.parametrize(
    ("retry_after", "spread", "low", "high"),
    [(40.0, 30.0, 40, 80), (5.0, 30.0, 5, 35), (None, 30.0, 0, 30), (0.02, 0.0, 0.02, 0.04)],
)
def test_deferral_waits_for_the_gate_then_spreads_the_herd(
    retry_after: float | None, spread: float, low: float, high: float
) -> None:
    rng = random.Random(2)
    draws = [deferral_seconds(retry_after, spread=spread, rng=rng) for _ in range(300)]
    assert all(low <= d <= high for d in draws)
    assert max(draws) - min(draws) > (high - low) / 2  # spread, not one instant


def test_lease_and_horizon() -> None:
    assert lease_until(NOW, 300) == NOW + timedelta(minutes=5)
    assert within_horizon(NOW + timedelta(minutes=59), NOW, 3600)
    assert within_horizon(NOW + timedelta(hours=1), NOW, 3600)
    assert not within_horizon(NOW + timedelta(hours=1, seconds=1), NOW, 3600)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+30s", NOW + timedelta(seconds=30)),
        ("+2h", NOW + timedelta(hours=2)),
        ("+3d", NOW + timedelta(days=3)),
        ("+1w", NOW + timedelta(weeks=1)),
        ("+5m", NOW + timedelta(minutes=5)),
        ("2031-06-01T09:00:00Z", datetime(2031, 6, 1, 9, tzinfo=UTC)),
        ("2031-06-01T09:00:00+02:00", datetime(2031, 6, 1, 7, tzinfo=UTC)),
        ("2031-06-01 09:00", datetime(2031, 6, 1, 9, tzinfo=UTC)),
    ],
)
def test_parse_when(text: str, expected: datetime) -> None:
    parsed = parse_when(text, NOW)
    assert parsed == expected and parsed.tzinfo is not None


@pytest.mark.parametrize("text", ["tomorrow", "+3x", "+-3d", "", "2031-13-01"])
def test_parse_when_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidDeliveryTime, match="cannot read"):
        parse_when(text, NOW)
