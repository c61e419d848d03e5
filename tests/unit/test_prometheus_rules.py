"""infra/prometheus: the scrape configs load, the alert rules are valid, and their unit tests
(alerts_test.yml) pass, all judged by promtool from Debian's prometheus package (bin/setup
installs it); every alert has a firing and a quiet case, and reads only metrics sagaline
exports."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]

from tests.unit.metric_names import promql_metric_names, sample_names

PROMETHEUS = Path(__file__).resolve().parents[2] / "infra" / "prometheus"
JOBS = {"sagaline-orchestrator", "sagaline-participant", "sagaline-projector"}


def _promtool(*args: str) -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not installed: bin/setup installs it with Debian's prometheus "
            "package (apt-get install prometheus)",
            pytrace=False,
        )
    done = subprocess.run(
        [promtool, *args],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def _load(name: str) -> Any:
    return yaml.safe_load((PROMETHEUS / name).read_text())


def _configs() -> list[str]:
    """The Prometheus configurations here: prometheus.yml, and compose.yml when the
    container setup is present."""
    return [p.name for p in sorted(PROMETHEUS.glob("*.yml")) if "scrape_configs" in p.read_text()]


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _load("alerts.yml")["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("config", _configs())
def test_the_scrape_config_loads_with_its_rules(config: str) -> None:
    assert "SUCCESS" in _promtool("check", "config", config)


@pytest.mark.parametrize("config", _configs())
def test_the_scrape_config_has_the_jobs_the_alerts_name(config: str) -> None:
    loaded = _load(config)
    assert {job["job_name"] for job in loaded["scrape_configs"]} >= JOBS
    assert loaded["rule_files"] == ["alerts.yml"]


def test_the_local_config_scrapes_the_default_ports() -> None:
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in _load("prometheus.yml")["scrape_configs"]
    }
    assert "127.0.0.1:9400" in targets["sagaline-orchestrator"]
    assert "127.0.0.1:9410" in targets["sagaline-participant"]
    assert "127.0.0.1:9420" in targets["sagaline-projector"]


def test_the_rules_are_valid() -> None:
    assert "SUCCESS" in _promtool("check", "rules", "alerts.yml")


def test_the_rules_pass_their_unit_tests() -> None:
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in _load("alerts_test.yml")["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules()}
    assert alerts - firing == set(), "alerts without a case where they fire"
    assert alerts - quiet == set(), "alerts without a case where they stay quiet"


def test_the_alerts_read_only_metrics_sagaline_exports() -> None:
    known = sample_names()
    unknown = {
        rule["alert"]: sorted(promql_metric_names(rule["expr"]) - known) for rule in _rules()
    }
    assert {alert: names for alert, names in unknown.items() if names} == {}
    for rule in _rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_alerts_cover_what_operations_needs() -> None:
    read = {name for rule in _rules() for name in promql_metric_names(rule["expr"])}
    assert {
        "up",
        "sagaline_workflows_in_flight_stuck",
        "sagaline_dead_letters_total",
        "sagaline_inbox_lag_records",
        "sagaline_projector_lag_records",
        "sagaline_partitions_owned",
        "sagaline_inbox_partitions",
        "sagaline_workflows_closed_total",
    } <= read
