"""Observability end to end: a real consumer on PostgreSQL + Redis with metrics and JSON logs
on delivers through the fake provider; its /metrics is scraped over HTTP and parsed with
prometheus-client's parser; every log line is JSON and the lines about a delivery carry its
id. `capsule exporter` serves the database gauges; `capsule consumer-health` checks a consumer.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from benchmarks.harness import BIN, ROOT, wait_for
from core.db import session_scope
from core.models import ReconcilerRun, Status
from core.policy import utcnow
from tests.fakes.smtp_server import free_port
from tests.integration.scenario_world import World
from tests.integration.test_consumers import live  # noqa: F401  (fixture)

LETTERS = 4


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of http://127.0.0.1:port/metrics: (name, sorted labels) -> value."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


@pytest.fixture
def exporter(live: World) -> Iterator[int]:  # noqa: F811
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "capsule"), "exporter", "--port", str(port)],
        env=live.system.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _answers(port), timeout=30, what="the exporter")
        yield port
    finally:
        process.terminate()
        process.wait(10)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_consumer_metrics_and_json_logs_match_what_was_delivered(
    live: World,  # noqa: F811
    exporter: int,
) -> None:
    # Given a consumer with metrics on its own port and JSON logs
    port = free_port()
    live.system.settings.update({"CAPSULE_METRICS_PORT": str(port), "CAPSULE_LOG_FORMAT": "json"})
    consumer = live.consumer()
    wait_for(lambda: _answers(port), timeout=30, what="the consumer's /metrics")

    # When letters fall due and are delivered through the fake provider
    due = utcnow() + timedelta(seconds=2)
    ids = [live.schedule(due) for _ in range(LETTERS)]
    wait_for(lambda: live.count(Status.SENT) == LETTERS, timeout=60, what="all letters sent")

    # Then the scraped values match what was delivered
    samples = scrape(port)
    assert total(samples, "capsule_provider_requests_total", outcome="accepted") == LETTERS
    assert total(samples, "capsule_delivery_lateness_seconds_count") == LETTERS
    assert total(samples, "capsule_claims_total", result="claimed") == LETTERS
    assert total(samples, "capsule_provider_request_seconds_count") == LETTERS
    assert len(live.server.messages()) == LETTERS
    # lateness is sent - due: under a minute here, and the +Inf bucket holds every letter
    assert total(samples, "capsule_delivery_lateness_seconds_bucket", le="60.0") == LETTERS

    # and every log line is one JSON object; each delivery has its line with its fields
    consumer.stop()
    lines = [line for line in consumer.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # raises on a line that is not JSON
    assert any("consumer started" in r["message"].lower() for r in records)
    for delivery_id in ids:
        mine = [r for r in records if r.get("delivery_id") == str(delivery_id)]
        assert mine, f"no log line carries {delivery_id}"
        [run] = [r for r in mine if r.get("outcome") == "sent"]
        assert run["provider"] == "resend" and run["task_id"]
    assert not any("Dear future me" in line for line in lines)

    # and the exporter serves the database gauges, computed from the rows
    gauges = scrape(exporter)
    assert total(gauges, "capsule_database_up") == 1
    assert total(gauges, "capsule_deliveries", status="scheduled") == 0
    assert total(gauges, "capsule_deliveries", status="processing") == 0
    assert total(gauges, "capsule_oldest_due_unclaimed_seconds") == 0
    assert total(gauges, "capsule_stuck_deliveries") == 0
    assert total(gauges, "capsule_provider_circuit_state", provider="resend") == 0
    assert ("capsule_queue_depth", (("state", "pending"),)) in gauges


def test_exporter_reports_due_unclaimed_and_consumer_health_fails_without_a_consumer(
    live: World,  # noqa: F811
    exporter: int,
) -> None:
    # Given two letters overdue by ten minutes and no consumer running
    ten_minutes_ago = utcnow() - timedelta(minutes=10)
    for _ in range(2):
        live.schedule(ten_minutes_ago + timedelta(seconds=1), now=ten_minutes_ago)

    # Then the exporter shows them scheduled, stuck and ten minutes due
    gauges = scrape(exporter)
    assert total(gauges, "capsule_deliveries", status="scheduled") == 2
    assert total(gauges, "capsule_stuck_deliveries") == 2
    assert 590 <= total(gauges, "capsule_oldest_due_unclaimed_seconds") <= 700

    # and a consumer healthcheck pointed at a port where no consumer serves fails
    check = live.system.capsule("consumer-health", "--port", str(free_port()))
    assert check.returncode == 1, check.stdout + check.stderr
    assert "/metrics" in json.loads(check.stdout)["problems"][0]


@pytest.mark.slow
def test_the_consumer_counts_the_safety_net_runs_it_makes(live: World) -> None:  # noqa: F811
    # Given a consumer with metrics on
    port = free_port()
    live.system.settings.update({"CAPSULE_METRICS_PORT": str(port)})
    live.consumer()
    wait_for(lambda: _answers(port), timeout=30, what="the consumer's /metrics")

    # When the next minute's periodic tasks run (the one consumer is the runner)
    def ran(kind: str) -> float:
        return total(scrape(port), "capsule_safety_net_runs_total", kind=kind, result="ok")

    wait_for(lambda: ran("backstop") >= 1 and ran("dispatcher") >= 1, timeout=100, what="runs")

    # Then each run recorded in the database was counted once, and none as an error
    def recorded() -> int:
        with session_scope(live.app.session_factory) as session:
            return len(
                session.scalars(
                    select(ReconcilerRun).where(
                        ReconcilerRun.kind == "backstop", ReconcilerRun.ok.is_(True)
                    )
                ).all()
            )

    wait_for(lambda: ran("backstop") == recorded(), timeout=30, what="counter = recorded runs")
    assert total(scrape(port), "capsule_safety_net_runs_total", result="error") == 0
