"""Participant replicas as real ``sagaline participant`` processes: a killed replica does not
stall its sibling, and two processes claiming one instance id do not both run."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from examples.order_saga.harness import (
    HistoryWatcher,
    SagalineProcess,
    audit_effects,
    expected_status,
    make_orders,
    orchestrator_process,
    participant_process,
    publish,
)
from orchestrator.client import WorkflowClient
from orchestrator.protocol.topics import Topics
from orchestrator.settings import KafkaSettings
from tests.integration.test_participants import _read_all

pytestmark = pytest.mark.integration

# The orchestrator's failover settings are not under test here (see test_order_saga.py).
FAST = {"session_timeout_ms": "6000", "transaction_timeout_ms": "10000", "commit_interval_ms": "50"}
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?participant=payment (.*)$")
_PARTITIONS = re.compile(
    r"partitions (assigned|revoked|lost) participant=payment partitions=([\d,]*)"
)


class Processes:
    """Every process a test starts, stopped at the end whatever happened."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.running: list[SagalineProcess] = []

    def start(self, process: SagalineProcess) -> SagalineProcess:
        self.running.append(process.start())
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(20)}" for p in self.running)

    def stop_all(self) -> None:
        for process in self.running:
            process.stop(15)


@pytest.fixture
def processes(process_env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    started = Processes(process_env, tmp_path / "logs")
    yield started
    started.stop_all()


def _wait(
    condition: Callable[[], bool], what: str, deadline_s: float, info: Callable[[], str]
) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}\n{info()}")
        time.sleep(0.05)  # polling files and topics; the condition is what we wait on


def _log(process: SagalineProcess) -> str:
    return process.log_path.read_text(errors="replace") if process.log_path.exists() else ""


def _owned(process: SagalineProcess) -> set[int]:
    """The payment partitions ``process`` owns, from its assignment log lines."""
    owned: set[int] = set()
    for kind, numbers in _PARTITIONS.findall(_log(process)):
        changed = {int(n) for n in numbers.split(",") if n}
        owned = owned | changed if kind == "assigned" else owned - changed
    return owned


def _handled(process: SagalineProcess) -> list[tuple[float, int]]:
    """(epoch seconds, partition) of every payment task ``process`` handled."""
    handled = []
    for line in _log(process).splitlines():
        match = _LINE.match(line)
        if match and match.group(2).startswith("activity=") and "activity handled" in line:
            partition = int(re.search(r" partition=(\d+)", line).group(1))  # type: ignore[union-attr]
            when = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            handled.append((when, partition))
    return handled


def _membership_lines(process: SagalineProcess) -> list[tuple[float, str]]:
    """(epoch seconds, line) of every assignment change ``process`` logged."""
    return [
        (dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp(), line)
        for line in _log(process).splitlines()
        if _PARTITIONS.search(line)
    ]


def _committed_past_last_task(bootstrap: str, group: str, topic: str) -> bool:
    """True when ``group`` committed past the last task of every partition of ``topic``.

    Tasks are written in orchestrator transactions, so a partition ends with a commit
    marker that no consumer is handed: compare with the last task, not the end offset.
    """
    last: dict[int, int] = {}
    for msg in _read_all(bootstrap, topic):
        last[msg.partition() or 0] = max(last.get(msg.partition() or 0, -1), msg.offset() or 0)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = [TopicPartition(topic, p) for p in last]
        committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
    finally:
        consumer.close()
    return all(committed[p] > offset for p, offset in last.items())


class Pipeline:
    """One orchestrator, inventory, shipping and two payment replicas, orders at a steady
    rate; statuses, effects and offsets checked at the end."""

    def __init__(
        self, processes: Processes, topics: Topics, bootstrap: str, dsn: str, **payment: str
    ) -> None:
        self.processes, self.topics, self.bootstrap, self.dsn = processes, topics, bootstrap, dsn
        self.env = {**processes.env, "ORDER_SAGA_PAYMENT_LATENCY_MS": "20"}
        processes.start(orchestrator_process(self.env, processes.log_dir, "solo", **FAST))
        for service in ("inventory", "shipping"):
            processes.start(participant_process(self.env, processes.log_dir, service))
        self.payment = payment
        self.replicas = [
            processes.start(
                participant_process(self.env, processes.log_dir, "payment", instance, **payment)
            )
            for instance in ("pay-a", "pay-b")
        ]
        _wait(
            lambda: (
                all(_owned(r) for r in self.replicas)
                and len(_owned(self.replicas[0]) | _owned(self.replicas[1])) == 4
            ),
            "both payment replicas to own partitions",
            45,
            processes.logs,
        )
        self.watcher = HistoryWatcher(bootstrap, topics.history)
        # 40 orders/s for 10 s: tasks keep arriving while a replica dies.
        self.orders = make_orders(400, declined_every=10)
        client = WorkflowClient(
            KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=topics.prefix)
        )
        self.load = threading.Thread(target=publish, args=(client, self.orders, 40.0), name="load")
        self.load.start()
        _wait(
            lambda: all(len(_handled(r)) >= 20 for r in self.replicas),
            "both replicas to handle payment tasks under load",
            30,
            processes.logs,
        )

    def finish(self) -> None:
        """Every saga ends as expected with its effects once; offsets committed to the end."""
        try:
            self.load.join(timeout=60)
            assert not self.load.is_alive(), "the load generator did not finish"
            ids = [o["order_id"] for o in self.orders]
            alive = [p for p in self.processes.running if p.alive()]
            done = self.watcher.wait_terminal(ids, 60.0, alive=alive)
        finally:
            self.load.join(timeout=60)
            self.watcher.close()
        missing = sorted(set(ids) - set(done))
        assert not missing, (
            f"{len(missing)} sagas never ended, e.g. {missing[:3]}\n{self.processes.logs()}"
        )
        wrong = [
            (o["order_id"], done[o["order_id"]].status)
            for o in self.orders
            if done[o["order_id"]].status is not expected_status(o)
        ]
        assert not wrong, f"sagas ended with an unexpected status: {wrong[:5]}"
        problems = audit_effects(self.dsn, self.orders)
        assert not problems, f"{len(problems)} effect problems, e.g. {problems[:5]}"
        # Offsets kept being committed through the rebalance, moved partitions included.
        group = f"{self.topics.prefix}.participant.payment"
        _wait(
            lambda: _committed_past_last_task(self.bootstrap, group, self.topics.tasks("payment")),
            "the payment replicas to commit every task",
            30,
            self.processes.logs,
        )


def test_a_killed_payment_replica_does_not_stall_its_sibling(
    processes: Processes, topics: Topics, kafka_bootstrap: str, postgres_dsn: str
) -> None:
    # Session timeout left at its default: the lowest the broker allows (1 s here).
    run = Pipeline(processes, topics, kafka_bootstrap, postgres_dsn)
    victim, survivor = run.replicas
    moved, kept = _owned(victim), _owned(survivor)
    victim.kill9()
    killed_at = time.time()
    run.finish()

    after = [(t, p) for t, p in _handled(survivor) if t > killed_at]
    taken_over = min((t for t, p in after if p in moved), default=None)
    assert taken_over is not None, (
        f"the survivor never served partitions {moved}\n{processes.logs()}"
    )
    stood_still_s = taken_over - killed_at
    meanwhile = [t for t, p in after if p in kept and t < taken_over]
    print(
        f"\nkilled replica's partitions {sorted(moved)} stood still {stood_still_s:.2f}s "
        f"(kill -9 to the survivor's first task on them); the survivor handled "
        f"{len(meanwhile)} tasks on its own partitions {sorted(kept)} meanwhile"
    )
    assert meanwhile, "the survivor stopped while the dead replica's session was expiring"
    # The session is the broker's minimum (1 s locally); moving must not wait much longer.
    assert stood_still_s < 10, f"partitions stood still {stood_still_s:.1f}s"
    assert _owned(survivor) == moved | kept


def _longest_pause(handled: list[tuple[float, int]], partitions: set[int], since: float) -> float:
    times = sorted(t for t, p in handled if p in partitions and t >= since)
    return max((b - a for a, b in zip([since, *times], times, strict=False)), default=0.0)


def test_a_replica_restarted_under_its_id_takes_its_partitions_back_without_a_rebalance(
    processes: Processes, topics: Topics, kafka_bootstrap: str, postgres_dsn: str
) -> None:
    # A long session, so that waiting it out could not be mistaken for a fast handover:
    # without static membership the restart would start a rebalance that waits for the
    # dead member's session, with every partition of the group standing still.
    run = Pipeline(processes, topics, kafka_bootstrap, postgres_dsn, session_timeout_ms="6000")
    victim, survivor = run.replicas
    moved, kept = _owned(victim), _owned(survivor)
    victim.kill9()
    killed_at = time.time()
    restarted = participant_process(
        run.env, processes.log_dir, "payment", "pay-a", session_timeout_ms="6000"
    )
    restarted.log_path = restarted.log_path.with_name("participant-payment-pay-a-2.log")
    processes.start(restarted)
    run.finish()

    back = min((t for t, p in _handled(restarted) if p in moved), default=None)
    assert back is not None, f"the restarted replica never served {moved}\n{processes.logs()}"
    pause = _longest_pause(_handled(survivor), kept, killed_at)
    print(
        f"\nrestarted replica served its partitions {sorted(moved)} again "
        f"{back - killed_at:.2f}s after the kill; the survivor's longest pause on "
        f"{sorted(kept)} was {pause:.2f}s"
    )
    assert back - killed_at < 6.0, "the restart waited out the session: no static membership"
    assert pause < 2.0, f"the survivor stood still {pause:.1f}s"
    changes = [line for when, line in _membership_lines(survivor) if when > killed_at]
    assert not changes, f"the survivor's assignment changed: {changes}"
    assert _owned(survivor) == kept


def test_two_processes_with_one_instance_id_do_not_both_run(processes: Processes) -> None:
    first = processes.start(
        participant_process(processes.env, processes.log_dir, "payment", "twin")
    )
    _wait(lambda: bool(_owned(first)), "the first process to own partitions", 45, processes.logs)
    second = participant_process(processes.env, processes.log_dir, "payment", "twin")
    # Same instance id, hence the same log file name: keep the second's apart.
    second.log_path = second.log_path.with_name("participant-payment-twin-2.log")
    processes.start(second)
    _wait(lambda: not first.alive(), "the fenced process to exit", 45, processes.logs)
    assert first.proc is not None and first.proc.returncode == 3, processes.logs()
    fenced = [line for line in _log(first).splitlines() if "SAGALINE_INSTANCE_ID=twin" in line]
    assert fenced, f"no line names the instance id:\n{first.tail()}"
    assert "ERROR participants.runtime" in fenced[0], fenced[0]
    assert second.alive(), second.tail()
