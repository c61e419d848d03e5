"""A running order-saga pipeline for integration tests: its processes and observers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Message

from examples.order_saga.harness import (
    ROOT,
    HistoryWatcher,
    SagalineProcess,
    audit_effects,
    expected_status,
    orchestrator_process,
    participant_process,
)
from orchestrator.client import WorkflowClient
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    WorkflowRecord,
)
from orchestrator.protocol.topics import Topics
from orchestrator.settings import KafkaSettings, ProjectorSettings
from orchestrator.visibility.projector import run_projector

# Short timeouts so failover happens within a test's patience; the ratio the settings
# validator demands (commit interval <= a tenth of the transaction timeout) still holds.
FAST = {"session_timeout_ms": "6000", "transaction_timeout_ms": "10000", "commit_interval_ms": "50"}


class Saga:
    """Processes and observers of one test run."""

    def __init__(
        self, env: dict[str, str], topics: Topics, bootstrap: str, dsn: str, log_dir: Path
    ) -> None:
        self.env, self.topics, self.bootstrap, self.dsn = env, topics, bootstrap, dsn
        self.log_dir = log_dir
        self.processes: list[SagalineProcess] = []
        self.participants: dict[str, SagalineProcess] = {}
        self.watcher = HistoryWatcher(bootstrap, topics.history)

    def orchestrator(self, instance: str, **settings: str) -> SagalineProcess:
        merged = {**FAST, **settings}
        process = orchestrator_process(self.env, self.log_dir, instance, **merged).start()
        self.processes.append(process)
        return process

    def start_participants(
        self, payment_latency_ms: str = "0", metrics_ports: dict[str, int] | None = None
    ) -> None:
        env = {**self.env, "ORDER_SAGA_PAYMENT_LATENCY_MS": payment_latency_ms}
        for name in ("inventory", "payment", "shipping"):
            port = str((metrics_ports or {}).get(name, 0))
            process = participant_process(
                env, self.log_dir, name, session_timeout_ms="6000", metrics_port=port
            ).start()
            self.participants[name] = process
            self.processes.append(process)

    def start_orders(self, orders: list[dict[str, Any]]) -> None:
        client = WorkflowClient(
            KafkaSettings(kafka_bootstrap=self.bootstrap, topic_prefix=self.topics.prefix)
        )
        for order in orders:
            client.start("order.process", order, workflow_id=order["order_id"])
        client.flush()

    def wait_count(self, ids: list[str], count: int, deadline_s: float) -> None:
        """Wait until at least ``count`` of ``ids`` are terminal."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            self.watcher.poll()
            if len(self.watcher.terminal(ids)) >= count:
                return
        raise AssertionError(
            f"only {len(self.watcher.terminal(ids))} of {len(ids)} sagas "
            f"terminal after {deadline_s}s, wanted {count}\n{self.logs()}"
        )

    def finish(
        self, orders: list[dict[str, Any]], deadline_s: float = 240.0
    ) -> dict[str, WorkflowRecord]:
        """Wait for every order's saga to end, then check statuses, history and effects."""
        ids = [o["order_id"] for o in orders]
        alive = [p for p in self.processes if p.alive()]
        done = self.watcher.wait_terminal(ids, deadline_s, alive=alive)
        missing = sorted(set(ids) - set(done))
        assert not missing, (
            f"{len(missing)} sagas never ended, e.g. {missing[:3]}: "
            f"{[self.watcher.latest.get(m) for m in missing[:1]]}\n{self.logs()}"
        )
        for order in orders:
            record = done[order["order_id"]]
            assert record.status is expected_status(order), (
                f"workflow {record.workflow_id}: expected {expected_status(order)}, observed "
                f"{record.status} ({record.failure}); history {record.events}"
            )
            assert_history_sane(record)
        for wid, revisions in self.watcher.revisions.items():
            assert revisions == sorted(set(revisions)), (
                f"workflow {wid}: committed revisions {revisions} are not strictly increasing; "
                "a stale state was resumed"
            )
        problems = audit_effects(self.dsn, orders)
        assert not problems, f"{len(problems)} effect problems, e.g. {problems[:5]}"
        return done

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in self.processes)

    def close(self) -> None:
        for process in self.processes:
            process.stop(15)
        self.watcher.close()


def wait_for_log(process: SagalineProcess, text: str, deadline_s: float) -> None:
    """Wait until ``text`` appears in the process's log."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process.log_path.exists() and text in process.log_path.read_text(errors="replace"):
            return
        if not process.alive():
            break
        time.sleep(0.05)  # polling a file; the condition above is what we wait on
    raise AssertionError(f"{process.name} never logged {text!r}:\n{process.tail()}")


def header_values(msg: Message) -> dict[str, bytes]:
    """A consumed record's headers by name; sagaline writes a value for every header."""
    headers = msg.headers() or []
    pairs = headers.items() if isinstance(headers, dict) else headers
    found: dict[str, bytes] = {}
    for name, value in pairs:
        assert isinstance(value, bytes), f"header {name!r} has no bytes value: {value!r}"
        found[name] = value
    return found


def assert_history_sane(record: WorkflowRecord) -> None:
    """Every step scheduled once per attempt and settled at most once per attempt."""
    scheduled = [(e.seq, e.attempt) for e in record.events if isinstance(e, ActivityScheduled)]
    settled = [
        (e.seq, e.attempt)
        for e in record.events
        if isinstance(e, ActivityCompleted | ActivityFailed)
    ]
    assert len(scheduled) == len(set(scheduled)), (
        f"workflow {record.workflow_id}: a step was scheduled twice: {record.events}"
    )
    assert len(settled) == len(set(settled)), (
        f"workflow {record.workflow_id}: a step was settled twice: {record.events}"
    )


@contextmanager
def projecting(settings: ProjectorSettings) -> Iterator[list[BaseException]]:
    """Run a projector (``run_projector``) in a thread for the duration of the block; the
    block gets the list its failure lands in, to check while it waits on something."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            run_projector(settings, stop)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="projector", daemon=True)
    thread.start()
    try:
        yield failure
    finally:
        stop.set()
        thread.join(30)
    assert not failure, f"the projector failed: {failure[0]!r}"
    assert not thread.is_alive(), "the projector did not stop within 30 s"


def sagaline_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``sagaline ARGS`` as a process from the repository root; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def explained(done: subprocess.CompletedProcess[str]) -> str:
    """A finished process's exit code and output, for an assertion's message."""
    return f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
