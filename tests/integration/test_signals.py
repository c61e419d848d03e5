"""Control from outside end to end on the real broker: signals and promises from the
Python client and from a raw confluent-kafka producer writing the Avro record by hand
(what any language does), signal-with-start, a retried send, a signal for a workflow that
does not exist, waiting for a result, and a cancel that compensates."""

from __future__ import annotations

import io
import json
import struct
import threading
import uuid
from typing import Any

import fastavro
import pytest
from confluent_kafka import Producer

# schema_id is the id rule docs/wire-contract describes (CRC-32 of the canonical form).
from orchestrator.client import ResultTimeoutError
from orchestrator.protocol.codec import NS, SCHEMA_ORDER, default_schema_dir, schema_id
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityScheduled,
    PromiseCreated,
    SignalReceived,
    WorkflowRecord,
    WorkflowStatus,
    promise_id,
)
from orchestrator.transport import REASON
from tests.integration.pipeline import Saga
from tests.integration.test_hardening import (
    client_for,
    dead_letters,
    ids_on,
    status_of,
    wait_until,
)

APP = "tests.integration.control:registry"


def _result(saga: Saga, wid: str) -> Any:
    record = saga.watcher.latest[wid]
    assert record.status is WorkflowStatus.COMPLETED, record
    assert record.result is not None
    return decode_json(record.result)


def _signals(record: WorkflowRecord) -> list[str]:
    return [e.signal_id for e in record.events if isinstance(e, SignalReceived)]


def test_a_signal_wakes_a_waiting_workflow_and_a_retried_send_counts_once(saga: Saga) -> None:
    saga.orchestrator("a", app=APP)
    client = client_for(saga)
    wids = [w for p in range(4) for w in ids_on(p, "approval", 2)]
    for wid in wids:
        client.start("control.approval", {"approvals": 2}, workflow_id=wid)
    client.flush()

    def all_waiting() -> bool:
        return all(status_of(saga, w) is WorkflowStatus.RUNNING for w in wids)

    wait_until(saga, all_waiting, "every workflow to start and wait", 60)
    for wid in wids:
        first = client.signal(wid, "approve", {"by": "ann"})
        client.signal(wid, "approve", {"by": "ann"}, signal_id=first)  # a retried send
        client.signal(wid, "approve", {"by": "bob"})
    client.flush()

    def all_done() -> bool:
        return all(status_of(saga, w) is WorkflowStatus.COMPLETED for w in wids)

    wait_until(saga, all_done, "every workflow to take its two signals", 60)
    for wid in wids:
        assert _result(saga, wid) == {
            "approved": [{"by": "ann"}, {"by": "bob"}],
            "timed_out": False,
        }
        assert len(_signals(saga.watcher.latest[wid])) == 2


def _parse_schemas() -> dict[str, Any]:
    """The .avsc files as any Avro library reads them (fastavro here, not sagaline)."""
    named: dict[str, Any] = {}
    parsed: dict[str, Any] = {}
    for short in SCHEMA_ORDER:
        raw = json.loads((default_schema_dir() / f"{NS}{short}.avsc").read_text())
        parsed[NS + short] = fastavro.parse_schema(raw, named_schemas=named)
    return parsed


def test_a_raw_producer_signals_with_start_from_the_avro_schema_alone(saga: Saga) -> None:
    """What a client in another language does: read the .avsc files, encode an
    InboxRecord with the SignalWorkflow branch, prefix the Confluent header (magic 0, the
    schema id the orchestrator derives from the schema), key it by the workflow id, and
    produce it with the murmur2 partitioner."""
    saga.orchestrator("a", app=APP)
    schemas = _parse_schemas()
    inbox = schemas[NS + "InboxRecord"]
    header = struct.pack(">bI", 0, schema_id(inbox))
    producer = Producer(
        {
            "bootstrap.servers": saga.bootstrap,
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
        }
    )
    wids = [w for p in range(4) for w in ids_on(p, "raw-signal", 1)]
    for wid in wids:
        body = {
            "workflow_id": wid,
            "name": "approve",
            "payload": {"encoding": "json/plain", "data": b'{"by":"raw"}'},
            "signal_id": str(uuid.uuid4()),
            "sent_at_ms": 1,
            "start": {
                "workflow_id": wid,
                "workflow_type": "control.approval",
                "input": {"encoding": "json/plain", "data": b'{"approvals":1}'},
                "requested_at_ms": 1,
            },
        }
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, inbox, {"body": (NS + "SignalWorkflow", body)})
        producer.produce(saga.topics.inbox, key=wid.encode(), value=header + buf.getvalue())
    assert producer.flush(30) == 0

    def all_done() -> bool:
        return all(status_of(saga, w) is WorkflowStatus.COMPLETED for w in wids)

    wait_until(saga, all_done, "every signal-with-start to start and finish its workflow", 60)
    for wid in wids:
        assert _result(saga, wid) == {"approved": [{"by": "raw"}], "timed_out": False}


def test_a_signal_for_no_workflow_is_dead_lettered(saga: Saga) -> None:
    saga.orchestrator("a", app=APP)
    client = client_for(saga)
    client.signal("nobody-" + uuid.uuid4().hex, "approve", 1)
    client.flush()

    def lettered() -> bool:
        return any(
            h.get(REASON) == b"unknown-workflow" for h in dead_letters(saga.bootstrap, saga.topics)
        )

    wait_until(saga, lettered, "the orphan signal's dead letter", 60)


def _promise_ids(saga: Saga, wids: list[str]) -> dict[str, str]:
    ids = {}
    for wid in wids:
        record = saga.watcher.latest[wid]
        created = [e for e in record.events if isinstance(e, PromiseCreated)]
        assert created, record
        ids[wid] = promise_id(wid, record.run_id, created[0].seq)
    return ids


def test_promises_completed_by_a_raw_producer_and_failed_by_the_client(saga: Saga) -> None:
    saga.orchestrator("a", app=APP)
    client = client_for(saga)
    wids = [w for p in range(4) for w in ids_on(p, "callback", 2)]
    for wid in wids:
        client.start("control.callback", {}, workflow_id=wid)
    client.flush()

    def all_waiting() -> bool:
        return all(
            (r := saga.watcher.latest.get(w)) is not None
            and any(isinstance(e, PromiseCreated) for e in r.events)
            for w in wids
        )

    wait_until(saga, all_waiting, "every workflow to make its promise", 60)
    ids = _promise_ids(saga, wids)
    inbox = _parse_schemas()[NS + "InboxRecord"]
    header = struct.pack(">bI", 0, schema_id(inbox))
    producer = Producer({"bootstrap.servers": saga.bootstrap, "partitioner": "murmur2_random"})
    completed, failed = wids[::2], wids[1::2]
    for wid in completed:
        body = {
            "workflow_id": wid,
            "promise_id": ids[wid],
            "payload": {"encoding": "json/plain", "data": b'{"paid":true}'},
            "failure": None,
            "completed_at_ms": 1,
        }
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, inbox, {"body": (NS + "CompletePromise", body)})
        producer.produce(saga.topics.inbox, key=wid.encode(), value=header + buf.getvalue())
    assert producer.flush(30) == 0
    for wid in failed:
        client.fail_promise(ids[wid], "CardDeclined", "no funds")
    client.flush()

    def all_closed() -> bool:
        return all((s := status_of(saga, w)) is not None and s.terminal for w in wids)

    wait_until(saga, all_closed, "every promise to be completed or failed", 60)
    for wid in completed:
        assert _result(saga, wid) == {"paid": True}
    for wid in failed:
        record = saga.watcher.latest[wid]
        assert record.status is WorkflowStatus.FAILED, record
        assert record.failure is not None and "CardDeclined" in record.failure.message


def test_result_waits_for_a_run_and_finds_a_closed_one_from_the_end(saga: Saga) -> None:
    saga.orchestrator("a", app=APP)
    client = client_for(saga)
    done, waiting = ids_on(0, "result-done", 1)[0], ids_on(0, "result-wait", 1)[0]
    client.start("control.approval", {"approvals": 0}, workflow_id=done)
    client.start("control.approval", {"approvals": 1}, workflow_id=waiting)
    # Bury the closed one under other workflows' records on the same partition.
    for wid in ids_on(0, "filler", 30):
        client.start("control.approval", {"approvals": 0}, workflow_id=wid)
    client.flush()
    closed = client.result(done, timeout_s=60)
    assert closed.status is WorkflowStatus.COMPLETED
    assert closed.value == {"approved": [], "timed_out": False}
    with pytest.raises(ResultTimeoutError):
        client.result(waiting, timeout_s=2)
    answers: list[Any] = []
    thread = threading.Thread(target=lambda: answers.append(client.result(waiting, 60)))
    thread.start()
    client.signal(waiting, "approve", "yes")
    client.flush()
    thread.join(90)
    assert answers and answers[0].value == {"approved": ["yes"], "timed_out": False}


def test_a_cancel_releases_the_reservations_newest_first_and_ends_cancelled(
    saga: Saga,
) -> None:
    saga.start_participants()
    saga.orchestrator("a", app=APP)
    client = client_for(saga)
    wids = [w for p in range(4) for w in ids_on(p, "trip", 1)]
    for wid in wids:
        order = {"order_id": wid, "items": [{"sku": "sku-cancel", "qty": 1}]}
        client.start("control.reserve_then_wait", order, workflow_id=wid)
    client.flush()

    def all_reserved() -> bool:
        return all(
            (r := saga.watcher.latest.get(w)) is not None
            and sum(isinstance(e, ActivityCompleted) for e in r.events) == 2
            for w in wids
        )

    wait_until(saga, all_reserved, "every workflow to reserve twice and wait", 90)
    for wid in wids:
        client.cancel(wid, "customer cancelled")
    client.flush()

    def all_cancelled() -> bool:
        return all(status_of(saga, w) is WorkflowStatus.CANCELLED for w in wids)

    wait_until(saga, all_cancelled, "every workflow to compensate and end CANCELLED", 90)
    for wid in wids:
        record = saga.watcher.latest[wid]
        reserved = [
            decode_json(e.result) for e in record.events if isinstance(e, ActivityCompleted)
        ][:2]
        released = [
            decode_json(e.payload)
            for e in record.events
            if isinstance(e, ActivityScheduled) and e.compensation
        ]
        assert released == list(reversed(reserved)), record
        assert record.failure is not None and "customer cancelled" in record.failure.message
    # A cancel for a closed workflow changes nothing.
    client.cancel(wids[0], "again")
    client.flush()
    assert client.result(wids[0], timeout_s=30).status is WorkflowStatus.CANCELLED
