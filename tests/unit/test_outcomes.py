"""The pure decision of a run's outcome (core.outcomes.decide): no database, no clock."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from core.config import Settings
from core.models import ErrorClass
from core.outcomes import DEFER, FAIL, RETRY, SENT, Decision, Outcome, decide

NOW = datetime(2030, 1, 1, tzinfo=UTC)
SETTINGS = Settings(max_attempts=3, backoff_base_seconds=10, backoff_max_seconds=100)


def run(round_attempts: int, outcome: Outcome, seed: int = 1) -> Decision:
    return decide(round_attempts, outcome, SETTINGS, now=NOW, rng=random.Random(seed))


def test_sent_is_sent() -> None:
    assert run(1, Outcome(None, provider="resend")).action == SENT


@pytest.mark.parametrize("error_class", [ErrorClass.TRANSIENT, ErrorClass.AMBIGUOUS])
def test_retryable_with_attempts_left_retries_after_a_backoff(error_class: str) -> None:
    decision = run(1, Outcome(error_class))

    assert decision.action == RETRY and decision.error_class == error_class
    assert decision.next_attempt_at is not None
    assert NOW + timedelta(seconds=5) <= decision.next_attempt_at <= NOW + timedelta(seconds=10)


def test_the_last_attempt_fails() -> None:
    assert run(3, Outcome(ErrorClass.TRANSIENT)).action == FAIL


def test_a_deferred_run_is_deferred_even_on_its_last_attempt_and_not_before_the_gate_opens() -> (
    None
):
    decision = run(3, Outcome(ErrorClass.TRANSIENT, deferred=True, retry_after=4.0))

    assert decision.action == DEFER
    assert decision.next_attempt_at is not None
    assert NOW + timedelta(seconds=4) <= decision.next_attempt_at <= NOW + timedelta(seconds=14)


def test_pinned_and_out_of_attempts_fails_as_ambiguous_for_people() -> None:
    decision = run(3, Outcome(ErrorClass.TRANSIENT, pinned_provider="resend"))

    assert (decision.action, decision.error_class) == (FAIL, ErrorClass.AMBIGUOUS)


@pytest.mark.parametrize("deferred", [False, True])
def test_a_final_outcome_fails_whatever_attempts_are_left(deferred: bool) -> None:
    outcome = Outcome(ErrorClass.AMBIGUOUS, pinned_provider="resend", final=True, deferred=deferred)

    decision = run(1, outcome)

    assert (decision.action, decision.error_class) == (FAIL, ErrorClass.AMBIGUOUS)


@pytest.mark.parametrize(
    "error_class", [ErrorClass.PERMANENT, ErrorClass.POSSIBLY_SENT, ErrorClass.DECRYPTION]
)
def test_non_retryable_classes_fail_at_once(error_class: str) -> None:
    assert run(1, Outcome(error_class)).action == FAIL


def test_a_narrow_deferral_spread_brings_a_batch_back_just_after_the_gate_opens() -> None:
    outcome = Outcome(ErrorClass.TRANSIENT, deferred=True, retry_after=2.0)

    decision = decide(1, outcome, SETTINGS, now=NOW, rng=random.Random(3), defer_spread=1.0)

    assert decision.next_attempt_at is not None
    assert NOW + timedelta(seconds=2) <= decision.next_attempt_at <= NOW + timedelta(seconds=3)
