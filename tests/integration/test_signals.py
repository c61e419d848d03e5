"""Signals and promises end to end on the real broker: the Python client, a raw
confluent-kafka producer writing the Avro record by hand (what any language does),
signal-with-start, a retried send, a signal for a workflow that does not exist."""

from __future__ import annotations

import io
import json
import struct
import uuid
from typing import Any

import fastavro
from confluent_kafka import Producer

# schema_id is the id rule docs/wire-contract describes (CRC-32 of the canonical form).
from orchestrator.protocol.codec import NS, SCHEMA_ORDER, default_schema_dir, schema_id
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import (
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
