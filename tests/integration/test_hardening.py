"""One workflow never stops an orchestrator; parked workflows keep their inputs and resume.

Each misbehaving workflow of ``tests/integration/misbehaving.py`` runs on the same inbox
partition as real order sagas, which must all complete with their effects exactly once.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from examples.order_saga.harness import (
    ROOT,
    SagalineProcess,
    audit_effects,
    expected_status,
    make_orders,
    participant_process,
)
from orchestrator.client import WorkflowClient
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.partitioning import partition_for
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityScheduled,
    WorkflowStatus,
)
from orchestrator.protocol.topics import Topics, parse_held_key
from orchestrator.settings import KafkaSettings
from tests.integration.pipeline import Saga, header_values

pytestmark = pytest.mark.integration

APP = "tests.integration.misbehaving:registry"
FIXED = "tests.integration.misbehaving:registry_fixed"
MISMATCH = "tests.integration.misbehaving:registry_mismatch"
LIMIT = 8192
PARTITIONS = 4


def ids_on(partition: int, prefix: str, count: int) -> list[str]:
    """``count`` workflow ids that Kafka's default partitioner puts on ``partition``."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        wid = f"{prefix}-{i}"
        if partition_for(wid.encode(), PARTITIONS) == partition:
            found.append(wid)
        i += 1
    return found


def orders_on(partition: int, count: int, tag: str) -> list[dict[str, Any]]:
    """Order saga inputs whose ids land on ``partition``; every fifth one is declined."""
    orders = make_orders(count, declined_every=5, run_id=tag)
    for order, wid in zip(orders, ids_on(partition, f"order-{tag}", count), strict=True):
        order["order_id"] = wid
    return orders


def client_for(saga: Saga) -> WorkflowClient:
    return WorkflowClient(
        KafkaSettings(kafka_bootstrap=saga.bootstrap, topic_prefix=saga.topics.prefix)
    )


def wait_until(
    saga: Saga,
    condition: Callable[[], bool],
    what: str,
    deadline_s: float = 120.0,
    detail: Callable[[], str] = lambda: "",
) -> None:
    """Poll history until ``condition`` holds; fail with the processes' logs otherwise."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        saga.watcher.poll()
        if condition():
            return
        dead = [p for p in saga.processes if not p.alive()]
        assert not dead, f"{dead[0].name} exited:\n{dead[0].tail()}"
    raise AssertionError(f"timed out waiting for {what} {detail()}\n{saga.logs()}")


def status_of(saga: Saga, wid: str) -> WorkflowStatus | None:
    record = saga.watcher.latest.get(wid)
    return None if record is None else record.status


def history_keys(bootstrap: str, topics: Topics) -> dict[bytes, bytes | None]:
    """The latest value of every key on the history topic (read_committed), tombstones as None."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"keys-{time.monotonic_ns()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topics.history, p, 0) for p in range(PARTITIONS)])
    latest: dict[bytes, bytes | None] = {}
    at_end: set[int] = set()
    end = time.monotonic() + 30
    try:
        while len(at_end) < PARTITIONS and time.monotonic() < end:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is not None:
                    at_end.add(msg.partition() or 0)
                    continue
                latest[msg.key() or b""] = msg.value()
    finally:
        consumer.close()
    return latest


def dead_letters(bootstrap: str, topics: Topics) -> list[dict[str, bytes]]:
    """Headers of every dead letter written so far."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"dlq-{time.monotonic_ns()}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topics.dlq, 0, 0)])
    found: list[dict[str, bytes]] = []
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            msgs = consumer.consume(100, 0.5)
            if any(m.error() is not None for m in msgs):
                found += [header_values(m) for m in msgs if m.error() is None]
                break
            found += [header_values(m) for m in msgs]
    finally:
        consumer.close()
    return found


def start_audit(saga: Saga) -> SagalineProcess:
    """A participant process serving the misbehaving module's ``audit`` participant."""
    process = SagalineProcess(
        "participant-audit",
        ["participant", "tests.integration.misbehaving:audit"],
        {**saga.env, "SAGALINE_INSTANCE_ID": "audit-1"},
        saga.log_dir / "participant-audit.log",
    ).start()
    saga.processes.append(process)
    return process


def create_topic(admin: AdminClient, topic: str, **config: str) -> None:
    for future in admin.create_topics([NewTopic(topic, PARTITIONS, 1, config=config)]).values():
        future.result(30)


# What each misbehaving workflow must end as: (status, text its failure must mention).
EXPECTED: dict[str, tuple[WorkflowStatus, str]] = {
    "bad.cancelled": (WorkflowStatus.STUCK, "CancelledError"),
    "bad.system_exit": (WorkflowStatus.STUCK, "SystemExit"),
    "bad.finally_raises": (WorkflowStatus.FAILED, "boom in finally"),
    "bad.bare_except": (WorkflowStatus.COMPLETED, ""),
    "bad.unprintable": (WorkflowStatus.FAILED, "UnprintableError"),
    "bad.surrogate_error": (WorkflowStatus.FAILED, "\\ud800"),
    "bad.surrogate_activity": (WorkflowStatus.STUCK, "\\ud800"),
    "bad.invalid_topic": (WorkflowStatus.STUCK, "no such!"),
    "bad.missing_topic": (WorkflowStatus.STUCK, "MissingTasksTopic"),
    "bad.asyncio_sleep": (WorkflowStatus.STUCK, "asyncio.sleep"),
    "bad.asyncio_gather": (WorkflowStatus.STUCK, "asyncio.gather"),
    "bad.tiny_topic": (WorkflowStatus.STUCK, "UndeliverableRecord"),
    "bad.big_key": (WorkflowStatus.FAILED, "RecordTooLarge"),
    "bad.too_large_step": (WorkflowStatus.COMPENSATED, "RecordTooLarge"),
}


def _big_key_start(codec: AvroCodec) -> tuple[str, int]:
    """A workflow id and pad for bad.big_key: its task's value is under LIMIT, key + value not."""
    wid = ids_on(0, "big-key-" + "k" * 1_500, 1)[0]
    return wid, LIMIT - 2 * len(wid) - 400


def test_one_misbehaving_workflow_never_stops_the_others(saga: Saga, admin: AdminClient) -> None:
    create_topic(admin, saga.topics.tasks("tiny"), **{"max.message.bytes": "1024"})
    orchestrator = saga.orchestrator("solo", app=APP, max_record_bytes=str(LIMIT))
    saga.start_participants()
    client = client_for(saga)
    good = orders_on(0, 30, "same") + make_orders(10, declined_every=5)
    bad_ids: dict[str, str] = {}
    for index, wtype in enumerate(EXPECTED):
        wid = ids_on(0, f"bad-{index}", 1)[0]
        value: dict[str, Any] = {"order_id": wid, "text": "\ud800", "pad": 3_000}
        if wtype == "bad.big_key":
            wid, pad = _big_key_start(saga.watcher.codec)
            value = {"order_id": wid, "text": "", "pad": pad}
        elif wtype == "bad.too_large_step":
            value["pad"] = LIMIT
        bad_ids[wtype] = client.start(wtype, value, workflow_id=wid)
        # Interleave: good sagas share batches with the bad inputs.
        for order in good[index * 2 : index * 2 + 2]:
            client.start("order.process", order, workflow_id=order["order_id"])
    for order in good[len(EXPECTED) * 2 :]:
        client.start("order.process", order, workflow_id=order["order_id"])
    client.flush()

    def settled() -> bool:
        return all(
            status_of(saga, wid) is EXPECTED[wtype][0] for wtype, wid in bad_ids.items()
        ) and len(saga.watcher.terminal([o["order_id"] for o in good])) == len(good)

    def unsettled() -> str:
        bad = {w: (status_of(saga, w), EXPECTED[t][0]) for t, w in bad_ids.items()}
        good_left = [o["order_id"] for o in good if o["order_id"] not in saga.watcher.latest]
        return f"bad (observed, expected): {bad}; good never seen: {good_left}"

    wait_until(saga, settled, "every workflow to settle", deadline_s=180, detail=unsettled)
    for order in good:
        record = saga.watcher.latest[order["order_id"]]
        assert record.status is expected_status(order), (order["order_id"], record.failure)
    problems = audit_effects(saga.dsn, good)
    assert not problems, problems[:5]
    for wtype, wid in bad_ids.items():
        record = saga.watcher.latest[wid]
        text = EXPECTED[wtype][1]
        if text:
            assert record.failure is not None, (wtype, record)
            described = f"{record.failure.error_type}: {record.failure.message}"
            assert text in described, (wtype, described)
        assert saga.watcher.codec.encode_workflow(record)  # every record stays encodable
    assert orchestrator.alive(), orchestrator.tail()
    log = orchestrator.log_path.read_text(errors="replace")
    # The undeliverable task aborted its transaction once; nothing else may.
    assert log.count("aborting transaction") <= 2, log[-3000:]

    # A restart re-drives every parked workflow, and an operator resumes them all again:
    # the undeliverable one fails once more, is left parked, and nothing else stalls.
    orchestrator.stop()
    saga.processes.remove(orchestrator)
    again = saga.orchestrator("solo", app=APP, max_record_bytes=str(LIMIT))
    resumed = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "resume", "--all-stuck"],
        env=saga.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    later = orders_on(0, 10, "after")
    for order in later:
        client.start("order.process", order, workflow_id=order["order_id"])
    client.flush()
    saga.finish(good + later)
    for wtype, wid in bad_ids.items():
        assert status_of(saga, wid) is EXPECTED[wtype][0], (wtype, status_of(saga, wid))
    assert again.alive(), again.tail()
    log = again.log_path.read_text(errors="replace")
    assert log.count("aborting transaction") <= 3, log[-3000:]


def test_a_result_for_a_parked_workflow_is_held_then_applied_on_resume(
    saga: Saga, admin: AdminClient
) -> None:
    saga.orchestrator("solo", app=APP)
    saga.start_participants()
    wid = ids_on(1, "held", 1)[0]
    other = orders_on(1, 5, "beside")
    client = client_for(saga)
    client.start("held.audit", {"order_id": wid}, workflow_id=wid)
    for order in other:
        client.start("order.process", order, workflow_id=order["order_id"])
    client.flush()
    wait_until(saga, lambda: status_of(saga, wid) is WorkflowStatus.STUCK, "the park")
    parked = saga.watcher.latest[wid]
    assert parked.failure is not None and parked.failure.error_type == "MissingTasksTopic"
    # The reservation's result is kept beside the record, not dead-lettered.
    assert any(isinstance(e, ActivityScheduled) for e in parked.events)
    assert not any(isinstance(e, ActivityCompleted) for e in parked.events)
    keys = history_keys(saga.bootstrap, saga.topics)
    held = [k for k, v in keys.items() if v is not None and (parse_held_key(k) or ("",))[0] == wid]
    assert len(held) == 1, keys.keys()
    assert not [h for h in dead_letters(saga.bootstrap, saga.topics) if h], "nothing dead-lettered"
    saga.finish(other)

    create_topic(admin, saga.topics.tasks("audit"))
    start_audit(saga)
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "resume", wid],
        env=saga.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    wait_until(saga, lambda: status_of(saga, wid) is WorkflowStatus.COMPLETED, "the resume")
    keys = history_keys(saga.bootstrap, saga.topics)
    assert keys[held[0]] is None, "an applied held input is tombstoned"


def test_a_mismatching_deploy_parks_and_the_fixed_deploy_resumes_without_input(
    saga: Saga, admin: AdminClient
) -> None:
    """The README's promise for a sequential workflow: deploying code that matches resumes it."""
    create_topic(admin, saga.topics.tasks("audit"))
    first = saga.orchestrator("a", app=FIXED)
    saga.participants["inventory"] = participant_process(
        saga.env, saga.log_dir, "inventory", session_timeout_ms="6000"
    ).start()
    saga.processes.append(saga.participants["inventory"])
    wid = ids_on(2, "seq", 1)[0]
    client = client_for(saga)
    client.start("seq.flow", {"order_id": wid}, workflow_id=wid)
    client.flush()

    def second_step_sent() -> bool:
        record = saga.watcher.latest.get(wid)
        return record is not None and any(
            isinstance(e, ActivityScheduled) and e.name == "audit.record" for e in record.events
        )

    wait_until(saga, second_step_sent, "the second step")
    first.stop()
    saga.processes.remove(first)
    # A deploy whose second step differs; the audit result then arrives and cannot match.
    second = saga.orchestrator("a", app=MISMATCH)
    late = ids_on(2, "late", 1)[0]
    client.start("late.type", {"order_id": late}, workflow_id=late)  # unknown to this deploy
    client.flush()
    start_audit(saga)
    wait_until(
        saga,
        lambda: (
            status_of(saga, wid) is WorkflowStatus.STUCK
            and status_of(saga, late) is WorkflowStatus.STUCK
        ),
        "both workflows to park",
    )
    stuck = saga.watcher.latest[wid]
    assert stuck.failure is not None and "audit.record" in stuck.failure.message, stuck.failure
    unknown = saga.watcher.latest[late]
    assert unknown.failure is not None and unknown.failure.error_type == "UnknownWorkflowType"
    second.stop()
    saga.processes.remove(second)
    # The fixed deploy: no new input reaches either workflow, the restore re-drives them.
    saga.orchestrator("a", app=FIXED)
    wait_until(
        saga,
        lambda: (
            status_of(saga, wid) is WorkflowStatus.COMPLETED
            and status_of(saga, late) is WorkflowStatus.COMPLETED
        ),
        "the fixed deploy to finish both",
    )


def test_inputs_for_an_unreadable_record_are_held_and_the_record_is_never_overwritten(
    saga: Saga,
) -> None:
    first = saga.orchestrator("solo")
    order = orders_on(3, 1, "unreadable")[0]
    order["card"] = "visa-4242"
    wid = order["order_id"]
    saga.start_orders([order])
    wait_until(saga, lambda: wid in saga.watcher.latest, "the start")
    started = saga.watcher.latest[wid]
    # What the newer code's record says, in a shape this version reads (two revisions on).
    readable = saga.watcher.codec.encode_workflow(
        dataclasses.replace(started, revision=started.revision + 2)
    )
    first.stop()
    saga.processes.remove(first)
    # Newer code wrote this workflow with a schema this version does not have.
    newer = b"\x00" + (123_456_789).to_bytes(4, "big") + b"\x02future-bytes"
    producer = Producer({"bootstrap.servers": saga.bootstrap})
    producer.produce(saga.topics.history, key=wid.encode(), value=newer, partition=3)
    assert producer.flush(30) == 0
    saga.orchestrator("solo")
    saga.start_participants()  # the reservation runs and its result arrives

    def result_held() -> bool:
        keys = history_keys(saga.bootstrap, saga.topics)
        return any(
            v is not None and (parse_held_key(k) or ("",))[0] == wid for k, v in keys.items()
        )

    wait_until(saga, result_held, "the result to be held", deadline_s=60)
    keys = history_keys(saga.bootstrap, saga.topics)
    assert keys[wid.encode()] == newer, "older code must never overwrite a newer record"
    assert not dead_letters(saga.bootstrap, saga.topics)
    # Code that can read the record takes over (here: the record becomes readable again).
    for process in [p for p in saga.processes if p.name.startswith("orchestrator")]:
        process.stop()
        saga.processes.remove(process)
    producer.produce(saga.topics.history, key=wid.encode(), value=readable, partition=3)
    assert producer.flush(30) == 0
    saga.orchestrator("solo")
    saga.finish([order])


def test_slow_workflow_code_never_holds_a_transaction_past_its_timeout(
    saga: Saga, admin: AdminClient
) -> None:
    """One input slower than the whole transaction timeout, and many slow ones together."""
    create_topic(admin, saga.topics.tasks("audit"))
    client = client_for(saga)
    ids = ids_on(0, "slow", 21)
    for index, wid in enumerate(ids):
        client.start("slow.replay", {"ms": 4_000 if index == 10 else 150}, workflow_id=wid)
    client.flush()
    # The inputs wait in one partition, so one poll takes them all: 7 s of work, one input
    # of them 4 s alone, while the broker aborts any transaction open for 3 s. Tasks are
    # produced at commit, so no transaction is open while code runs, and the budget
    # commits the batch in parts.
    orchestrator = saga.orchestrator(
        "solo", app=APP, transaction_timeout_ms="3000", commit_interval_ms="200"
    )

    def scheduled() -> bool:
        return all(
            (r := saga.watcher.latest.get(wid)) is not None and len(r.events) == 1 for wid in ids
        )

    wait_until(saga, scheduled, "every slow workflow's step", deadline_s=120)
    assert orchestrator.alive(), orchestrator.tail()
    log = orchestrator.log_path.read_text()
    assert "aborting transaction" not in log and "FENCED" not in log, log[-3000:]
    assert "budget commit" in log, "the batch never had to commit early"


def test_records_refused_only_as_a_batch_are_sent_one_by_one_not_parked(
    saga: Saga, admin: AdminClient
) -> None:
    """A topic's limit applies to a whole batch: records that fit alone must not pay."""
    create_topic(admin, saga.topics.tasks("tiny"), **{"max.message.bytes": "4096"})
    orchestrator = saga.orchestrator("solo", app=APP)
    client = client_for(saga)
    ids = ids_on(0, "fits", 6)
    for wid in ids:
        client.start("bad.tiny_topic", {"order_id": wid, "pad": 1_300}, workflow_id=wid)
    client.flush()

    def sent() -> bool:
        return all(
            (r := saga.watcher.latest.get(wid)) is not None and len(r.events) == 1 for wid in ids
        )

    wait_until(saga, sent, "every workflow's task", deadline_s=120)
    assert all(status_of(saga, wid) is WorkflowStatus.RUNNING for wid in ids)
    log = orchestrator.log_path.read_text()
    assert "sending its records one per request" in log, log[-3000:]


def test_closed_workflows_leave_after_retention_and_a_reused_id_is_a_new_run(
    saga: Saga,
) -> None:
    saga.orchestrator("solo", closed_retention_ms="2000")
    saga.start_participants()
    orders = make_orders(4, declined_every=0)
    saga.start_orders(orders)
    first = saga.finish(orders)
    reused = orders[0]["order_id"]
    saga.start_orders([orders[0]])  # a duplicate within retention: ignored

    def tombstoned() -> bool:
        keys = history_keys(saga.bootstrap, saga.topics)
        return all(keys.get(o["order_id"].encode(), b"") is None for o in orders)

    end = time.monotonic() + 60
    while not tombstoned():
        assert time.monotonic() < end, f"closed workflows were never tombstoned\n{saga.logs()}"
    saga.watcher.latest.clear()
    # After retention the id is free: a new run, whose activity ids differ from the first
    # run's, so the participants run it instead of answering from their inbox.
    saga.start_orders([orders[0]])
    wait_until(saga, lambda: status_of(saga, reused) is WorkflowStatus.COMPLETED, "the new run")
    second = saga.watcher.latest[reused]
    assert second.run_id and second.run_id != first[reused].run_id
    problems = audit_effects(saga.dsn, orders[1:])
    assert not problems, problems
    twice = audit_effects(saga.dsn, [orders[0]])
    assert any("2 reservations" in p for p in twice), twice
