"""infra/grafana: the dashboard is valid JSON Grafana can lay out, every query reads a metric
sagaline exports, the saga-level panels are there, and the provisioning files point where
infra/docker-compose.yml mounts them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]

from tests.unit.metric_names import promql_metric_names, sample_names

GRAFANA = Path(__file__).resolve().parents[2] / "infra" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "sagaline.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def _exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_panels_have_unique_ids_and_titles(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert all(isinstance(i, int) and i > 0 for i in ids)
    titles = [panel["title"] for panel in _panels(dashboard)]
    assert len(titles) == len(set(titles))
    assert dashboard["uid"] == "sagaline"


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in _panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_every_query_reads_metrics_sagaline_exports(dashboard: dict[str, Any]) -> None:
    known = sample_names()
    unknown = {
        (title, name)
        for title, expr in _exprs(dashboard)
        for name in promql_metric_names(expr)
        if name not in known
    }
    assert unknown == set()
    for variable in dashboard["templating"]["list"]:
        definition = variable.get("definition", "")
        for metric in re.findall(r"label_values\((\w+)", definition):
            assert metric in known, variable["name"]


def test_every_query_names_its_datasource_and_a_template_that_exists(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used)


def test_the_saga_level_panels_are_there(dashboard: dict[str, Any]) -> None:
    read = {name for _, expr in _exprs(dashboard) for name in promql_metric_names(expr)}
    assert {
        "sagaline_workflows_started_total",
        "sagaline_workflows_closed_total",
        "sagaline_activity_duration_seconds_bucket",
        "sagaline_workflows_in_flight_stuck",
        "sagaline_workflows_stuck_oldest_age_seconds",
        "sagaline_inbox_lag_records",
        "sagaline_projector_lag_records",
        "sagaline_dead_letters_total",
        "sagaline_workflows_in_flight",
        "sagaline_workflows_waiting_on_time",
    } <= read
    exprs = " ".join(expr for _, expr in _exprs(dashboard))
    for status in ("completed", "compensated", "compensation_failed"):
        assert f'status="{status}"' in exprs
    assert "histogram_quantile(0.99, sum by (le, activity)" in exprs


def test_provisioning_points_at_the_mounted_dashboards_and_the_datasource(
    dashboard: dict[str, Any],
) -> None:
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/sagaline.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] == source["uid"]
