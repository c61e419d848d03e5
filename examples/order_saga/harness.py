"""Running the order saga as real processes, watching it, and auditing its effects.

Shared by the demo and the integration tests, so both exercise the same entrypoints a
user deploys: ``sagaline orchestrator`` and ``sagaline participant``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer

from orchestrator.client import WorkflowClient
from orchestrator.errors import RecordDecodeError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.records import WorkflowRecord, WorkflowStatus
from orchestrator.protocol.topics import HELD_PREFIX

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_APP = "examples.order_saga.workflows:registry"
SERVICES = {
    name: f"examples.order_saga.services:{name}" for name in ("inventory", "payment", "shipping")
}
ORDER_TYPE = "order.process"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_orders(
    count: int, *, declined_every: int = 10, run_id: str | None = None
) -> list[dict[str, Any]]:
    """``count`` orders; every ``declined_every``-th has a card that payment declines."""
    run = run_id or uuid.uuid4().hex[:8]
    orders = []
    for i in range(count):
        declined = declined_every > 0 and i % declined_every == declined_every - 1
        orders.append(
            {
                "order_id": f"order-{run}-{i:05d}",
                "items": [{"sku": f"sku-{i % 7}", "qty": 1 + i % 3}],
                "total": 1_000 + i,
                "card": "declined" if declined else "visa-4242",
                "address": f"{i} Kafka Street",
            }
        )
    return orders


@dataclass
class SagalineProcess:
    """One ``sagaline`` process started with ``subprocess``; logs go to a file."""

    name: str
    args: list[str]
    env: Mapping[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SagalineProcess:
        """Start (or restart) the process."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *self.args],
            cwd=ROOT,
            env=dict(self.env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def kill9(self) -> None:
        """SIGKILL: no cleanup, open transactions left dangling."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        """The end of its log, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def orchestrator_process(
    env: Mapping[str, str],
    log_dir: Path,
    instance: str,
    *,
    app: str = WORKFLOWS_APP,
    **settings: str,
) -> SagalineProcess:
    """An orchestrator of ``app`` (default: the order saga), ``SAGALINE_INSTANCE_ID=instance``."""
    merged = {
        **env,
        "SAGALINE_INSTANCE_ID": instance,
        **{f"SAGALINE_{k.upper()}": v for k, v in settings.items()},
    }
    return SagalineProcess(
        f"orchestrator-{instance}",
        ["orchestrator", app],
        merged,
        log_dir / f"orchestrator-{instance}.log",
    )


def participant_process(
    env: Mapping[str, str],
    log_dir: Path,
    name: str,
    instance: str | None = None,
    **settings: str,
) -> SagalineProcess:
    """A participant process hosting one example service.

    ``instance`` sets ``SAGALINE_INSTANCE_ID`` (its static group member id; replicas of one
    service need distinct ids) and names the process and its log after it; without it the
    process inherits the id from ``env`` (default: the host name).
    """
    merged = {**env, **{f"SAGALINE_{k.upper()}": v for k, v in settings.items()}}
    label = f"participant-{name}"
    if instance is not None:
        merged["SAGALINE_INSTANCE_ID"] = instance
        label = f"participant-{name}-{instance}"
    return SagalineProcess(label, ["participant", SERVICES[name]], merged, log_dir / f"{label}.log")


@dataclass
class HistoryWatcher:
    """Follows the history topic (read_committed) and keeps each workflow's latest record.

    With ``terminal_only`` it decodes only records of finished workflows (a benchmark's
    load generator shares the machine with what it measures, and needs nothing else);
    ``revisions`` then lists only those. ``group_id`` names its consumer group (default: a
    fresh ``watcher-...``), so a benchmark can delete the group once done.
    """

    bootstrap: str
    topic: str
    codec: AvroCodec = field(default_factory=AvroCodec)
    terminal_only: bool = False
    latest: dict[str, WorkflowRecord] = field(default_factory=dict)
    revisions: dict[str, list[int]] = field(default_factory=dict)
    _consumer: Consumer | None = None
    group_id: str = ""
    # Kafka's timestamp of each workflow's latest record (epoch ms): when the orchestrator
    # produced it, at its commit.
    produced_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.group_id or f"watcher-{uuid.uuid4().hex[:8]}",
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self._consumer.subscribe([self.topic])

    def poll(self, timeout_s: float = 0.2) -> int:
        """Read what is available; returns the number of records read."""
        assert self._consumer is not None
        read = 0
        for msg in self._consumer.consume(num_messages=5_000, timeout=timeout_s):
            if msg.error() is not None or msg.value() is None:
                continue
            if (msg.key() or b"").startswith(HELD_PREFIX):
                continue  # an input held for a parked workflow, not a workflow record
            try:
                value = msg.value() or b""
                if self.terminal_only and not self.codec.peek_workflow(value)[0].terminal:
                    continue
                record = self.codec.decode_workflow(value)
            except RecordDecodeError:
                continue  # written by another version; orchestrators hold it untouched
            read += 1
            self.revisions.setdefault(record.workflow_id, []).append(record.revision)
            self.produced_ms[record.workflow_id] = float(msg.timestamp()[1])
            # One consumer reads each partition in order, so the last record read is the
            # latest (revisions count within a run; a new run of the id starts again).
            self.latest[record.workflow_id] = record
        return read

    def terminal(self, ids: Iterable[str]) -> dict[str, WorkflowRecord]:
        """The workflows among ``ids`` that reached a terminal status."""
        return {i: r for i in ids if (r := self.latest.get(i)) is not None and r.status.terminal}

    def wait_terminal(
        self, ids: Iterable[str], deadline_s: float, alive: Iterable[SagalineProcess] = ()
    ) -> dict[str, WorkflowRecord]:
        """Poll until every id is terminal or the deadline passes; returns the terminal ones."""
        wanted = list(ids)
        end = time.monotonic() + deadline_s
        watched = list(alive)
        while time.monotonic() < end:
            self.poll()
            done = self.terminal(wanted)
            if len(done) == len(wanted):
                return done
            dead = [p for p in watched if not p.alive()]
            if dead:
                code = dead[0].proc.returncode if dead[0].proc else None
                raise AssertionError(f"{dead[0].name} exited ({code}):\n{dead[0].tail()}")
        return self.terminal(wanted)

    def close(self) -> None:
        """Leave the group."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def expected_status(order: Mapping[str, Any]) -> WorkflowStatus:
    """What the order saga must end as for this order."""
    return WorkflowStatus.COMPENSATED if order["card"] == "declined" else WorkflowStatus.COMPLETED


def audit_effects(dsn: str, orders: Iterable[Mapping[str, Any]]) -> list[str]:
    """Check every participant effect exists exactly once; returns the problems found."""
    by_id = {o["order_id"]: o for o in orders}
    ids = list(by_id)
    problems: list[str] = []
    with psycopg.connect(dsn) as conn:
        reservations = _count(
            conn,
            "SELECT order_id, count(*), "
            "count(*) FILTER (WHERE status = 'released') "
            "FROM inventory_reservations WHERE order_id = ANY(%s) "
            "GROUP BY order_id",
            ids,
        )
        payments = _count(
            conn,
            "SELECT order_id, count(*), 0 FROM payments WHERE order_id = ANY(%s) GROUP BY order_id",
            ids,
        )
        shipments = _count(
            conn,
            "SELECT order_id, count(*), 0 FROM shipments "
            "WHERE order_id = ANY(%s) GROUP BY order_id",
            ids,
        )
    for oid, order in by_id.items():
        declined = order["card"] == "declined"
        made, released = reservations.get(oid, (0, 0))
        if made != 1:
            problems.append(f"{oid}: {made} reservations, expected 1")
        if released != (1 if declined else 0):
            problems.append(
                f"{oid}: {released} released reservations, expected {1 if declined else 0}"
            )
        paid = payments.get(oid, (0, 0))[0]
        if paid != (0 if declined else 1):
            problems.append(f"{oid}: {paid} payments, expected {0 if declined else 1}")
        shipped = shipments.get(oid, (0, 0))[0]
        if shipped != (0 if declined else 1):
            problems.append(f"{oid}: {shipped} shipments, expected {0 if declined else 1}")
    return problems


def _count(conn: psycopg.Connection[Any], sql: str, ids: list[str]) -> dict[str, tuple[int, int]]:
    rows = conn.execute(sql, (ids,)).fetchall()
    return {row[0]: (int(row[1]), int(row[2])) for row in rows}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def start_pipeline(
    env: Mapping[str, str],
    log_dir: Path,
    instance: str = "demo-1",
    *,
    services: Iterable[str] = tuple(SERVICES),
    application_names: str | None = None,
    orchestrators: int = 1,
) -> tuple[list[SagalineProcess], dict[str, int]]:
    """One orchestrator (or ``orchestrators``, sharing the workflow partitions) and the
    services (default: all three), each serving /metrics on a free port.

    ``services`` picks the participant processes (none: the orchestrators alone, for
    workflows whose steps are local activities). The first orchestrator's instance id is
    ``instance`` and its port ``ports["orchestrator"]``; the n-th's are ``<instance>-<n>``
    and ``ports["orchestrator-<n>"]``. With ``application_names``, each process's
    PostgreSQL connections carry ``application_name`` ``<application_names><process name>``
    (libpq's ``PGAPPNAME``), so its backends can be found in pg_stat_activity.
    """
    if orchestrators < 1:
        raise ValueError(f"orchestrators must be at least 1, not {orchestrators}")
    wanted = list(services)
    instances = {"orchestrator": instance}
    instances.update({f"orchestrator-{n}": f"{instance}-{n}" for n in range(2, orchestrators + 1)})
    ports = {key: free_port() for key in instances}
    ports.update({name: free_port() for name in wanted})

    def named(label: str) -> Mapping[str, str]:
        if application_names is None:
            return env
        return {**env, "PGAPPNAME": f"{application_names}{label}"}

    processes = [
        orchestrator_process(
            named(f"orchestrator-{name}"), log_dir, name, metrics_port=str(ports[key])
        )
        for key, name in instances.items()
    ]
    processes += [
        participant_process(
            named(f"participant-{name}"), log_dir, name, metrics_port=str(ports[name])
        )
        for name in wanted
    ]
    for process in processes:
        process.start()
    return processes, ports


def publish(
    client: WorkflowClient,
    orders: list[dict[str, Any]],
    rate: float = 0.0,
    watcher: HistoryWatcher | None = None,
    *,
    workflow_type: str = ORDER_TYPE,
) -> dict[str, float]:
    """Start one saga per order (``rate`` per second, or all at once); returns send times (ms).

    ``workflow_type`` is the type started (any that takes an order as its input).
    """
    sent_ms: dict[str, float] = {}
    began = time.monotonic()
    for index, order in enumerate(orders):
        if rate > 0:
            # Pacing the load generator, not waiting for the system under test.
            lag = began + index / rate - time.monotonic()
            if lag > 0:
                time.sleep(lag)
            if watcher is not None:
                watcher.poll(0)
        wid = client.start(workflow_type, order, workflow_id=order["order_id"])
        sent_ms[wid] = time.time() * 1000
    client.flush()
    return sent_ms


@dataclass(frozen=True)
class RunFigures:
    """Throughput and latency of one batch of sagas."""

    finished: int
    elapsed_s: float
    per_second: float
    p50_ms: float
    p99_ms: float
    p95_ms: float = 0.0  # last, with a default: figures built before it existed still build


def figures(
    done: Mapping[str, WorkflowRecord],
    sent_ms: Mapping[str, float],
    produced_ms: Mapping[str, float] | None = None,
) -> RunFigures:
    """Throughput from first start to last close; latency from start published to close.

    The close is the record's ``closed_at_ms`` (the time of the input that closed it), or
    with ``produced_ms`` (``HistoryWatcher.produced_ms``) when the closing record was
    produced, at the commit: the two differ by the batch's processing, which for a saga
    of local steps is all of its work.
    """
    closed = {
        i: produced_ms[i] if produced_ms is not None else r.closed_at_ms
        for i, r in done.items()
        if r.closed_at_ms
    }
    closes = [at for at in closed.values() if at is not None]
    latencies = [at - sent_ms[i] for i, at in closed.items() if at is not None]
    elapsed = (max(closes) - min(sent_ms.values())) / 1000 if closes else 0.0
    return RunFigures(
        finished=len(done),
        elapsed_s=elapsed,
        per_second=len(done) / elapsed if elapsed else 0.0,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        p95_ms=percentile(latencies, 95),
    )


def base_env(bootstrap: str, dsn: str, prefix: str) -> dict[str, str]:
    """Environment for sagaline processes of one run."""
    env = dict(os.environ)
    env.update(
        {
            "SAGALINE_KAFKA_BOOTSTRAP": bootstrap,
            "SAGALINE_POSTGRES_DSN": dsn,
            "SAGALINE_TOPIC_PREFIX": prefix,
            "PYTHONPATH": str(ROOT),
        }
    )
    return env
