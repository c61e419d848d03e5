"""A real Prometheus (Debian's prometheus package, installed by bin/setup) scrapes an
orchestrator and the order saga's participants, run as real processes against the local
Kafka and PostgreSQL, with infra/prometheus/alerts.yml loaded: the targets are up, the
per-partition gauges (inbox lag, in-flight, stuck) have samples, the rules evaluate, and
stopping the orchestrator makes its alerts pend."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from examples.order_saga.harness import free_port, make_orders
from tests.integration.pipeline import Saga

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "infra" / "prometheus" / "alerts.yml"
PARTICIPANTS = ("inventory", "payment", "shipping")
PARTITIONS = 4  # the topics fixture's
DEADLINE_S = 90.0
T = TypeVar("T")


class Prometheus:
    """A prometheus server on a free loopback port, with its own data directory."""

    def __init__(self, workdir: Path, targets: dict[str, list[int]]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(
                "prometheus is not installed: bin/setup installs Debian's prometheus package "
                "(apt-get install prometheus)",
                pytrace=False,
            )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(_config(targets))
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful API answer, or None while it is not ready."""
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.tail()}")
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as resp:
                body = json.load(resp)
        except (urllib.error.URLError, ConnectionError):
            return None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's samples (an empty list while there are none)."""
        data = self.get("/api/v1/query", query=promql)
        return [] if data is None else list(data["result"])

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _config(targets: dict[str, list[int]]) -> str:
    """The jobs of infra/prometheus/prometheus.yml, pointed at this test's ports, scraped
    every second so the test need not wait long."""
    jobs = "".join(
        f"  - job_name: {job}\n"
        f"    static_configs:\n"
        f"      - targets: {json.dumps([f'127.0.0.1:{p}' for p in ports])}\n"
        for job, ports in targets.items()
    )
    return (
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        f"rule_files:\n  - {json.dumps(str(ALERTS))}\n"
        f"scrape_configs:\n{jobs}"
    )


def _wait_for(
    what: str,
    probe: Callable[[], T | None],
    saga: Saga,
    prom: Prometheus,
    seen: Callable[[], object] = lambda: "",
) -> T:
    """Poll ``probe`` until it returns something, or fail after DEADLINE_S saying what
    ``seen`` last saw."""
    end = time.monotonic() + DEADLINE_S
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > end:
            raise AssertionError(
                f"no {what} within {DEADLINE_S}s (last seen: {seen()})\n--- prometheus\n"
                f"{prom.tail()}\n{saga.logs()}"
            )
        time.sleep(0.2)  # between probes of a condition with a deadline


@pytest.fixture
def ports() -> dict[str, int]:
    names = ("orchestrator-1", "orchestrator-2", *PARTICIPANTS)
    return {name: free_port() for name in names}


@pytest.fixture
def prom(tmp_path: Path, ports: dict[str, int]) -> Iterator[Prometheus]:
    server = Prometheus(
        tmp_path,
        {
            "sagaline-orchestrator": [ports["orchestrator-1"], ports["orchestrator-2"]],
            "sagaline-participant": [ports[name] for name in PARTICIPANTS],
        },
    )
    yield server
    server.stop()


def test_prometheus_scrapes_the_processes_and_evaluates_the_alerts(
    saga: Saga, prom: Prometheus, ports: dict[str, int]
) -> None:
    first = saga.orchestrator("prom-1", metrics_port=str(ports["orchestrator-1"]))
    saga.start_participants(metrics_ports={name: ports[name] for name in PARTICIPANTS})
    orders = make_orders(20, declined_every=5)
    saga.start_orders(orders)
    _wait_for("ready prometheus", prom.ready, saga, prom)
    saga.finish(orders, deadline_s=120)

    # A second orchestrator takes half of the partitions: the first one must stop
    # exporting the partitions it gave away, or every sum over instances counts them twice.
    second = saga.orchestrator("prom-2", metrics_port=str(ports["orchestrator-2"]))

    def targets_up() -> dict[str, str] | None:
        data = prom.get("/api/v1/targets")
        if data is None:
            return None
        health = {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}
        return health if len(health) == 5 and set(health.values()) == {"up"} else None

    _wait_for("orchestrator and participant targets up", targets_up, saga, prom)

    def per_partition(metric: str) -> dict[str, float] | None:
        """The metric's value for each partition, once every partition has exactly one
        series (each owned by one instance) and both instances own some."""
        samples = prom.query(f'{metric}{{job="sagaline-orchestrator"}}')
        found = {s["metric"]["partition"]: float(s["value"][1]) for s in samples}
        owners = {s["metric"]["instance"] for s in samples}
        shared = len(samples) == len(found) == PARTITIONS and len(owners) == 2
        return found if shared else None

    def caught_up() -> dict[str, float] | None:
        found = per_partition("sagaline_inbox_lag_records")
        return found if found and set(found.values()) == {0.0} else None

    # Every saga closed and its inputs are committed: no partition is behind.
    lag = _wait_for("inbox lag of 0 on every partition, split", caught_up, saga, prom)
    assert set(lag) == {str(p) for p in range(PARTITIONS)}
    for metric in (
        "sagaline_workflows_in_flight",
        "sagaline_workflows_in_flight_stuck",
        "sagaline_workflows_stuck_oldest_age_seconds",
        "sagaline_workflows_waiting_on_time",
    ):
        values = _wait_for(
            f"{metric} per partition, split", functools.partial(per_partition, metric), saga, prom
        )
        assert sum(values.values()) == 0, (metric, values)
    owned = prom.query('sagaline_partitions_owned{job="sagaline-orchestrator"}')
    assert sorted(float(s["value"][1]) for s in owned) == [2.0, 2.0]
    (count,) = prom.query("max(sagaline_inbox_partitions)")
    assert float(count["value"][1]) == PARTITIONS

    (started,) = prom.query("sum(sagaline_workflows_started_total)")
    assert float(started["value"][1]) == 20
    compensated = prom.query('sum(sagaline_workflows_closed_total{status="compensated"})')
    assert [float(s["value"][1]) for s in compensated] == [4.0]
    charges = prom.query(
        'sum by (job) (sagaline_activity_attempts_total{activity="payment.charge"})'
    )
    assert [(s["metric"]["job"], float(s["value"][1])) for s in charges] == [
        ("sagaline-participant", 20.0)
    ]
    latency = prom.query('sagaline_activity_duration_seconds_count{job="sagaline-participant"}')
    assert latency, "the step latency histogram is scraped"

    states: dict[str, str] = {}

    def rules_quiet() -> list[dict[str, Any]] | None:
        """Every rule evaluated without error, and none pending or firing (a rebalance can
        leave SagalinePartitionWithoutOrchestrator pending for an evaluation or two)."""
        data = prom.get("/api/v1/rules")
        if data is None:
            return None
        rules = [rule for group in data["groups"] for rule in group["rules"]]
        states.update({rule["name"]: f"{rule['health']}/{rule['state']}" for rule in rules})
        quiet = all(rule["health"] == "ok" and rule["state"] == "inactive" for rule in rules)
        return rules if rules and quiet else None

    rules = _wait_for("quiet alert rules", rules_quiet, saga, prom, lambda: states)
    assert {rule["name"] for rule in rules} == {
        "SagalineOrchestratorDown",
        "SagalineTargetDown",
        "SagalinePartitionWithoutOrchestrator",
        "SagalineWorkflowsStuck",
        "SagalineCompensationFailed",
        "SagalineDeadLetters",
        "SagalineInboxLagHigh",
        "SagalineProjectorLagHigh",
        "SagalineProjectorCannotWrite",
    }, states
    assert all(rule["type"] == "alerting" for rule in rules)

    # The orchestrators stop: their targets go down and no partition has an owner.
    assert second.stop(30) == 0
    assert first.stop(30) == 0

    def pending() -> set[str] | None:
        data = prom.get("/api/v1/alerts")
        found = {a["labels"]["alertname"] for a in (data or {}).get("alerts", [])}
        wanted = {"SagalineOrchestratorDown", "SagalinePartitionWithoutOrchestrator"}
        return found if wanted <= found else None

    _wait_for("alerts for the stopped orchestrators", pending, saga, prom)
