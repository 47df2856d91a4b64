"""deploy/: the Prometheus alert rules and scrape config, the Grafana dashboard, and their
wiring in docker-compose.yml's `observability` profile.

Every expression may name only metrics the code really serves: the names are read from the
per-process registry and from the exporter's collector run against a migrated database, not
from a list kept by hand. `promtool` (Debian package prometheus) checks and unit-tests the rules
when it is installed; CI installs it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from benchmarks.harness import ROOT
from core import metrics
from core.bootstrap import App
from core.policy import utcnow
from tests.conftest import service_missing

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "capsule.json"
COMPOSE = ROOT / "docker-compose.yml"
RUNBOOK = ROOT / "docs" / "operations.md"
PROMETHEUS_OWN = {"up"}  # written by Prometheus itself for every target
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, ranges, grouping
    clauses and function names removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\b[a-zA-Z_][a-zA-Z0-9_]*\s*\(", "(", expr)
    tokens = re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr)
    return {t for t in tokens if t.lower() not in KEYWORDS}


def served(app: App) -> set[str]:
    """Every sample name a consumer or the exporter serves."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    names = {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in suffixes.get(family.type, [""])
    }
    collector = metrics.DatabaseCollector(
        app.session_factory, app.settings, clock=utcnow, queue_depth=lambda: (0, 0)
    )
    names |= {family.name for family in collector.collect()}
    names |= {s.name for family in collector.collect() for s in family.samples}
    return names


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in data["panels"] for t in panel["targets"]]


def test_metric_name_extraction() -> None:
    assert metric_names(
        'sum by (outcome) (rate(capsule_provider_requests_total{outcome!="accepted"}[10m]))'
        " / ignoring (outcome) group_left sum(rate(capsule_x_total[10m])) > 0.2"
    ) == {"capsule_provider_requests_total", "capsule_x_total"}
    assert metric_names('absent(up{job="capsule-consumer"} == 1)') == {"up"}


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_rules_and_dashboard_name_only_metrics_the_code_serves(app: App) -> None:
    known = served(app) | PROMETHEUS_OWN
    assert "capsule_deliveries" in known and "capsule_delivery_lateness_seconds_bucket" in known

    exprs = [rule["expr"] for rule in rules()] + dashboard_exprs()
    unknown = {name for expr in exprs for name in metric_names(expr)} - known
    assert not unknown, f"expressions name metrics nobody serves: {unknown}"


def test_rules_cover_the_issue_and_each_alert_has_a_runbook_section() -> None:
    names = [rule["alert"] for rule in rules()]
    for expected in (
        "CapsuleBackstopStale",
        "CapsuleStuckDeliveries",
        "CapsuleOldestDueUnclaimed",
        "CapsuleProviderFailureRate",
        "CapsuleCircuitOpen",
        "CapsuleQueueDepthGrowing",
        "CapsuleNoConsumerScraped",
    ):
        assert expected in names
    runbook = RUNBOOK.read_text()
    for rule in rules():
        assert f"### {rule['alert']}" in runbook, f"docs/operations.md: section for {rule['alert']}"
        assert rule["annotations"]["runbook"].endswith(f"#{rule['alert'].lower()}")


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        service_missing("promtool (Debian package prometheus)", FileNotFoundError("not on PATH"))
    assert tool is not None
    return tool


def test_promtool_checks_the_rules_and_the_scrape_config(tmp_path: Path) -> None:
    tool = _promtool()
    checked = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # the config names the rules by their path in the container: point it at the copy here
    config = tmp_path / "prometheus.yml"
    shutil.copy(RULES, tmp_path / "alerts.yml")
    config.write_text(
        PROMETHEUS.read_text().replace("/etc/prometheus/alerts.yml", str(tmp_path / "alerts.yml"))
    )
    checked = subprocess.run([tool, "check", "config", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    tool = _promtool()
    broken = tmp_path / "alerts.yml"
    broken.write_text(RULES.read_text().replace("capsule_stuck_deliveries > 10", "capsule_stuck >"))
    checked = subprocess.run([tool, "check", "rules", str(broken)], capture_output=True, text=True)
    assert checked.returncode != 0


UNIT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 30s
tests:
  - interval: 30s
    input_series:
      - series: 'capsule_provider_circuit_state{{provider="resend"}}'
        values: '0 0 2 2 2 2 2'
      - series: 'capsule_provider_circuit_state{{provider="postmark"}}'
        values: '0 0 0 0 0 0 0'
      - series: 'capsule_safety_net_last_run_age_seconds{{kind="backstop"}}'
        values: '30 60 90 400 430 460 490 520 550'
      - series: 'up{{job="capsule-consumer", instance="c1"}}'
        values: '1 1 0 0 0 0 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 30s
        alertname: CapsuleCircuitOpen
        exp_alerts: []
      - eval_time: 150s
        alertname: CapsuleCircuitOpen
        exp_alerts:
          - exp_labels: {{severity: warning, provider: resend}}
            exp_annotations:
              summary: "The resend circuit is open: sends skip it"
              runbook: docs/operations.md#capsulecircuitopen
      - eval_time: 90s
        alertname: CapsuleBackstopStale
        exp_alerts: []
      - eval_time: 240s
        alertname: CapsuleBackstopStale
        exp_alerts:
          - exp_labels: {{severity: critical, kind: backstop}}
            exp_annotations:
              summary: The backstop has not completed a run for over 5 minutes
              runbook: docs/operations.md#capsulebackstopstale
      - eval_time: 390s
        alertname: CapsuleNoConsumerScraped
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: No consumer answered a scrape for 5 minutes
              runbook: docs/operations.md#capsulenoconsumerscraped
"""


def test_promtool_unit_tests_fire_the_alerts_when_they_should(tmp_path: Path) -> None:
    tool = _promtool()
    shutil.copy(RULES, tmp_path / "alerts.yml")
    tests = tmp_path / "tests.yml"
    tests.write_text(UNIT_TESTS.format(rules="alerts.yml"))
    result = subprocess.run(
        [tool, "test", "rules", str(tests)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- compose wiring


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_observability_profile_is_wired_to_the_exporter_and_the_consumers() -> None:
    services = compose()["services"]
    for name in ("exporter", "prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"], name
    for name in ("consumer", "console", "migrate", "postgres", "redis"):
        assert "profiles" not in services[name], f"{name} must run without a profile"

    consumer_env = services["consumer"]["environment"]
    assert consumer_env["CAPSULE_LOG_FORMAT"] == "json"
    port = int(consumer_env["CAPSULE_METRICS_PORT"])
    assert consumer_env["CAPSULE_METRICS_ADDR"] == "0.0.0.0"
    exporter = services["exporter"]["command"]
    assert exporter[:2] == ["capsule", "exporter"]
    exporter_port = int(exporter[exporter.index("--port") + 1])

    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape}
    [consumer_sd] = jobs["capsule-consumer"]["dns_sd_configs"]
    assert consumer_sd["names"] == ["consumer"] and consumer_sd["port"] == port
    assert jobs["capsule-exporter"]["static_configs"][0]["targets"] == [f"exporter:{exporter_port}"]

    mounts = services["prometheus"]["volumes"] + services["grafana"]["volumes"]
    for mount in mounts:
        source = mount.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"{source} is mounted but missing"


def test_consumer_has_a_real_healthcheck_and_every_service_rotates_its_log() -> None:
    import argparse

    from tasks.cli import build_parser

    services = compose()["services"]
    check = services["consumer"]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "capsule", "consumer-health"]
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    assert "consumer-health" in subparsers.choices and "exporter" in subparsers.choices
    for name, service in services.items():
        logging = service.get("logging")
        assert logging, f"{name}: no log rotation"
        assert logging["driver"] == "json-file", name
        assert logging["options"]["max-size"] and logging["options"]["max-file"], name
