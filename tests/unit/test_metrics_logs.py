"""Per-process metrics from one run's Outcome, and log lines: fields, JSON, withheld text."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY

from core import logs, metrics
from core.claims import Claim
from core.config import Settings
from core.outcomes import Outcome, ProviderCall
from tests.conftest import T0

LETTER = "Dear future me, the secret"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def call(provider: str, outcome: str, **kw: object) -> ProviderCall:
    return ProviderCall(provider=provider, outcome=outcome, started_at=T0, duration_ms=120, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("c", "label"),
    [
        (call("resend", "accepted"), "accepted"),
        (call("resend", "transient", status_code=503), "transient"),
        (call("resend", "transient", status_code=429), "rate_limited"),
        (call("resend", "transient", error_code="rate_limited"), "rate_limited"),
        (call("postmark", "permanent", status_code=422), "permanent"),
        (call("postmark", "possibly_sent"), "permanent"),
        (call("resend", "ambiguous"), "ambiguous"),
        (call("resend", "skipped", error_code="circuit_open"), None),
    ],
)
def test_request_outcome_labels(c: ProviderCall, label: str | None) -> None:
    assert metrics.request_outcome(c) == label


def _claim() -> Claim:
    return Claim(
        delivery_id=uuid.uuid4(),
        task_id="t",
        run_number=1,
        round_attempts=1,
        idempotency_key="k",
        recipient_email="a@example.com",
        letter_id=uuid.uuid4(),
        user_id=1,
        pinned_provider=None,
        error_class=None,
        deliver_at=T0,
    )


def test_observe_run_counts_requests_claims_and_lateness_of_a_failover_then_send() -> None:
    before = {
        "transient": value(
            "capsule_provider_requests_total", provider="resend", outcome="transient"
        ),
        "accepted": value(
            "capsule_provider_requests_total", provider="postmark", outcome="accepted"
        ),
        "claimed": value("capsule_claims_total", result="claimed"),
        "nothing": value("capsule_claims_total", result="nothing_to_claim"),
        "late": value("capsule_delivery_lateness_seconds_count"),
        "late_30": value("capsule_delivery_lateness_seconds_bucket", le="30.0"),
    }
    outcome = Outcome(
        error_class=None,
        calls=[call("resend", "transient", status_code=503), call("postmark", "accepted")],
        provider="postmark",
    )

    metrics.observe_run("d", "t", _claim(), outcome, status="sent", now=T0 + timedelta(seconds=20))
    metrics.observe_run("d2", "t2", None)

    assert (
        value("capsule_provider_requests_total", provider="resend", outcome="transient")
        == before["transient"] + 1
    )
    assert (
        value("capsule_provider_requests_total", provider="postmark", outcome="accepted")
        == before["accepted"] + 1
    )
    assert value("capsule_claims_total", result="claimed") == before["claimed"] + 1
    assert value("capsule_claims_total", result="nothing_to_claim") == before["nothing"] + 1
    assert value("capsule_delivery_lateness_seconds_count") == before["late"] + 1
    assert value("capsule_delivery_lateness_seconds_bucket", le="30.0") == before["late_30"] + 1


def test_a_failed_run_observes_no_lateness() -> None:
    before = value("capsule_delivery_lateness_seconds_count")
    outcome = Outcome(error_class="transient", calls=[call("resend", "transient")])
    metrics.observe_run("d", "t", _claim(), outcome, status="scheduled", now=T0)
    assert value("capsule_delivery_lateness_seconds_count") == before


def test_safety_net_results() -> None:
    before = value("capsule_safety_net_runs_total", kind="backstop", result="error")
    metrics.observe_safety_net("backstop", ran=True, error=True)
    assert value("capsule_safety_net_runs_total", kind="backstop", result="error") == before + 1


# ---------------------------------------------------------------- logs


class Err:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.text = ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Err:
    return Err(capsys)


@pytest.fixture(autouse=False)
def restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield None
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_delivery_fields_and_withhold_foreign_exception_text(
    stderr: Err, restore_logging: object
) -> None:
    logs.configure_logging(Settings(log_format="json"), default_level="INFO")
    log = logging.getLogger("core.test")
    with logs.delivery_context("d-1", "t-1"):
        log.info("run", extra={"provider": "resend", "outcome": "sent"})
        try:
            raise ValueError(LETTER)
        except ValueError:
            log.exception("boom")
    logging.getLogger("huey.consumer").info("Huey consumer started")

    records = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [r["message"] for r in records] == ["run", "boom", "Huey consumer started"]
    assert {k: records[0][k] for k in logs.FIELDS} == {
        "delivery_id": "d-1",
        "task_id": "t-1",
        "provider": "resend",
        "outcome": "sent",
    }
    assert records[1]["delivery_id"] == "d-1"
    assert "ValueError: [withheld]" in records[1]["exc_info"]
    assert LETTER not in stderr.getvalue() and "secret" not in stderr.getvalue()


def test_text_lines_keep_hueys_shape_with_fields_appended(
    stderr: Err, restore_logging: object
) -> None:
    logs.configure_logging(Settings(), default_level="INFO")
    with logs.delivery_context("d-1", "t-1"):
        logging.getLogger("core.test").warning("late")
    line = stderr.getvalue().strip()
    assert line.endswith("WARNING:core.test:MainThread:late delivery_id=d-1 task_id=t-1")


def test_httpx_request_lines_with_token_urls_stay_below_the_level(
    stderr: Err, restore_logging: object
) -> None:
    logs.configure_logging(Settings(log_level="DEBUG"), default_level="INFO")
    logging.getLogger("httpx").info('HTTP Request: POST https://hooks.example.com/T/SECRET "200"')
    assert "SECRET" not in stderr.getvalue()
