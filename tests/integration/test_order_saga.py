"""The order saga end to end on the real broker and database, including kill -9 faults."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families

from examples.order_saga.harness import (
    free_port,
    make_orders,
    participant_process,
)
from orchestrator.protocol.partitioning import partition_for
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    WorkflowStatus,
)
from tests.integration.pipeline import Saga, wait_for_log

pytestmark = pytest.mark.integration


def test_200_sagas_complete_with_effects_exactly_once(saga: Saga) -> None:
    saga.orchestrator("solo")
    saga.start_participants()
    orders = make_orders(200, declined_every=10)
    saga.start_orders(orders)
    done = saga.finish(orders)
    statuses = [r.status for r in done.values()]
    assert statuses.count(WorkflowStatus.COMPLETED) == 180
    assert statuses.count(WorkflowStatus.COMPENSATED) == 20


def test_declined_payment_releases_inventory_in_order(saga: Saga) -> None:
    saga.orchestrator("solo")
    saga.start_participants()
    orders = make_orders(3, declined_every=1)
    saga.start_orders(orders)
    done = saga.finish(orders, deadline_s=120)
    for order in orders:
        record = done[order["order_id"]]
        steps = [
            (type(e).__name__, getattr(e, "seq", None), getattr(e, "name", None))
            for e in record.events
        ]
        assert steps == [
            ("ActivityScheduled", 0, "inventory.reserve"),
            ("ActivityCompleted", 0, None),
            ("ActivityScheduled", 1, "payment.charge"),
            ("ActivityFailed", 1, None),
            ("ActivityScheduled", 2, "inventory.release"),
            ("ActivityCompleted", 2, None),
        ], f"workflow {record.workflow_id}: observed steps {steps}"
        failed = record.events[3]
        assert isinstance(failed, ActivityFailed)
        assert failed.failure.error_type == "PaymentDeclined"
        release = record.events[4]
        assert isinstance(release, ActivityScheduled) and release.compensation
        reserved = record.events[1]
        assert isinstance(reserved, ActivityCompleted)
        # The compensation received exactly what the reservation returned.
        assert decode_json(release.payload) == decode_json(reserved.result)
        assert record.failure is not None and "PaymentDeclined" in record.failure.message


def test_kill9_one_of_two_orchestrators_with_500_in_flight(saga: Saga) -> None:
    victim = saga.orchestrator("a")
    wait_for_log(victim, "restore done partitions=[0", deadline_s=60)
    other = saga.orchestrator("b")
    # Cooperative rebalancing hands partitions over in two rounds: wait until b has its
    # share and a has given it up, so the kill hits an owner with transactions of its own.
    wait_for_log(other, "restore done partitions=[", deadline_s=60)
    wait_for_log(victim, "revoked partitions=", deadline_s=60)
    saga.start_participants(payment_latency_ms="20")
    orders = make_orders(500, declined_every=10)
    saga.start_orders(orders)
    ids = [o["order_id"] for o in orders]
    saga.wait_count(ids, 50, deadline_s=120)
    assert len(saga.watcher.terminal(ids)) < len(ids), "all sagas ended before the kill"
    victim.kill9()
    saga.processes.remove(victim)
    saga.finish(orders, deadline_s=300)
    # The survivor ended the victim's open transaction instead of waiting out its timeout.
    survivor = saga.processes[0]
    assert f"fenced previous owner transactional_id={saga.topics.prefix}.orchestrator.a" in (
        survivor.log_path.read_text()
    ), survivor.tail(60)


def test_kill9_participant_mid_batch(saga: Saga, admin: AdminClient) -> None:
    saga.orchestrator("solo")
    saga.start_participants(payment_latency_ms="20")
    orders = make_orders(300, declined_every=10)
    saga.start_orders(orders)
    group = f"{saga.topics.prefix}.participant.payment"
    topic = saga.topics.tasks("payment")
    slow = {**saga.env, "ORDER_SAGA_PAYMENT_LATENCY_MS": "20"}
    payment = saga.participants["payment"]
    # Mid-batch: attempts whose outcome is committed in PostgreSQL while their task offsets
    # are not yet committed in Kafka. The check is repeated after the kill, when nothing can
    # commit any more; if the participant finished its batch in between, try again.
    caught = False
    for _ in range(5):
        end = time.monotonic() + 120
        while not _caught_mid_batch(saga.dsn, admin, group, topic, at_least=20):
            assert time.monotonic() < end, f"payment never caught mid-batch\n{saga.logs()}"
        payment.kill9()
        saga.processes.remove(payment)
        caught = _caught_mid_batch(saga.dsn, admin, group, topic, at_least=20)
        payment = participant_process(
            slow, saga.log_dir, "payment", session_timeout_ms="6000"
        ).start()
        saga.processes.append(payment)
        if caught:
            break
    assert caught, "never killed the payment participant with a batch half committed"
    saga.finish(orders, deadline_s=300)
    duplicates = payment.log_path.read_text().count("duplicate=true")
    assert duplicates > 0, "no redelivered task was answered from the idempotency inbox"


def _caught_mid_batch(
    dsn: str, admin: AdminClient, group: str, topic: str, *, at_least: int
) -> bool:
    handled = _handled_tasks(dsn, "payment")
    return handled >= at_least and handled > _committed_offsets(admin, group, topic)


def _handled_tasks(dsn: str, participant: str) -> int:
    with psycopg.connect(dsn) as conn:
        try:
            row = conn.execute(
                "SELECT count(*) FROM sagaline_activity_results WHERE participant = %s",
                (participant,),
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0  # the participant has not created its tables yet
    return int(row[0]) if row else 0


def _committed_offsets(admin: AdminClient, group: str, topic: str) -> int:
    result = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    offsets = result[group].result(timeout=10)
    return sum(tp.offset for tp in offsets.topic_partitions if tp.topic == topic and tp.offset > 0)


def test_restart_of_the_only_orchestrator_restores_from_history(saga: Saga) -> None:
    first = saga.orchestrator("solo")
    saga.start_participants(payment_latency_ms="20")
    orders = make_orders(400, declined_every=10)
    saga.start_orders(orders)
    ids = [o["order_id"] for o in orders]
    saga.wait_count(ids, 20, deadline_s=120)
    first.kill9()
    saga.processes.remove(first)
    in_flight = len(ids) - len(saga.watcher.terminal(ids))
    assert in_flight > 0, "nothing was in flight at the restart"
    second = saga.orchestrator("solo")
    saga.finish(orders, deadline_s=240)
    # The restarted process's own restore brought back the sagas that were in flight.
    log = second.log_path.read_text()
    restart = log[log.rindex("orchestrator instance=solo") :]
    running = [int(m) for m in re.findall(r"restore done partitions=.* open=(\d+)", restart)]
    assert sum(running) > 0, restart[-2000:]


def test_two_quick_handovers_resume_no_stale_state(saga: Saga) -> None:
    first = saga.orchestrator("a")
    saga.start_participants(payment_latency_ms="20")
    orders = make_orders(500, declined_every=10)
    saga.start_orders(orders)
    ids = [o["order_id"] for o in orders]
    saga.wait_count(ids, 30, deadline_s=120)
    # Handover 1: a dies with an open transaction; b takes over.
    first.kill9()
    saga.processes.remove(first)
    second = saga.orchestrator("b")
    wait_for_log(second, "restore done partitions=", deadline_s=120)
    # Handover 2, as soon as b owns restored state and may have a transaction open:
    # b dies too, and c must wait out both dangling transactions before resuming.
    second.kill9()
    saga.processes.remove(second)
    saga.orchestrator("c")
    saga.finish(orders, deadline_s=300)


def test_metrics_are_served_by_orchestrator_and_participants(saga: Saga) -> None:
    ports = {name: free_port() for name in ("orchestrator", "inventory", "payment", "shipping")}
    saga.orchestrator("solo", metrics_port=str(ports["orchestrator"]))
    saga.start_participants(metrics_ports=ports)
    orders = make_orders(20, declined_every=10)
    saga.start_orders(orders)
    saga.finish(orders, deadline_s=120)
    orch = _scrape(ports["orchestrator"])
    started = 'sagaline_workflows_started_total{workflow_type="order.process"}'
    assert orch[started] == 20
    closed = 'sagaline_workflows_closed_total{status="%s",workflow_type="order.process"}'
    assert orch[closed % "completed"] == 18
    assert orch[closed % "compensated"] == 2
    assert orch["sagaline_transaction_commit_seconds_count"] > 0
    assert orch["sagaline_batch_inputs_sum"] >= 20 + 3 * 18 + 3 * 2
    assert orch["sagaline_restore_duration_seconds_count"] >= 1
    restored = [k for k in orch if k.startswith("sagaline_restore_records_total")]
    assert len(restored) == 4, restored
    assert 'sagaline_workflows_in_flight{partition="0"}' in orch
    payment = _scrape(ports["payment"])
    charge = 'sagaline_activity_attempts_total{activity="payment.charge",outcome="%s"}'
    assert payment[charge % "completed"] == 18
    assert payment[charge % "failed"] == 2
    latency = 'sagaline_activity_duration_seconds_count{activity="payment.charge",outcome="%s"}'
    assert payment[latency % "completed"] == 18


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


ZOMBIE = """
import os, sys
from confluent_kafka import Producer
bootstrap, topic, partition, key, path = sys.argv[1:6]
producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": "zombie-" + topic,
                     "transaction.timeout.ms": 8000})
producer.init_transactions(30)
producer.begin_transaction()
producer.produce(topic, key=key.encode(), value=open(path, "rb").read(), partition=int(partition))
producer.flush(30)
os._exit(0)  # dies with the transaction open, like a kill -9 mid-batch
"""


def test_restore_waits_out_a_dead_writers_open_transaction(
    saga: Saga, tmp_path: Path, admin: AdminClient
) -> None:
    first = saga.orchestrator("a")
    orders = make_orders(1, declined_every=0)
    wid = orders[0]["order_id"]
    saga.start_orders(orders)
    end = time.monotonic() + 60
    while wid not in saga.watcher.latest:
        saga.watcher.poll()
        assert time.monotonic() < end, saga.logs()
    first.stop()
    saga.processes.remove(first)
    running = saga.watcher.latest[wid]
    # A writer that dies inside its transaction, holding a newer (bogus) state of the workflow.
    bogus = dataclasses.replace(
        running, status=WorkflowStatus.COMPLETED, revision=99, closed_at_ms=running.updated_at_ms
    )
    bogus_path = tmp_path / "bogus.avro"
    bogus_path.write_bytes(saga.watcher.codec.encode_workflow(bogus))
    partition = partition_for(wid.encode(), 4)
    subprocess.run(
        [
            sys.executable,
            "-c",
            ZOMBIE,
            saga.bootstrap,
            saga.topics.history,
            str(partition),
            wid,
            str(bogus_path),
        ],
        check=True,
        timeout=60,
    )
    # The same instance comes back (static membership: its partitions at once) and must
    # not resume before the dead writer's transaction is resolved.
    second = saga.orchestrator("a")
    saga.start_participants()
    done = saga.finish(orders, deadline_s=120)
    assert done[wid].status is WorkflowStatus.COMPLETED
    assert 99 not in saga.watcher.revisions[wid], "an aborted record was read as state"
    assert done[wid].revision > running.revision
    log = second.log_path.read_text()
    log = log[log.rindex("orchestrator instance=a") :]
    waited = [float(s) for s in re.findall(r"restore done partitions=.* seconds=([\d.]+)", log)]
    # The open transaction held the restore until the broker aborted it (8 s timeout).
    assert waited and max(waited) >= 4.0, log[-2000:]
