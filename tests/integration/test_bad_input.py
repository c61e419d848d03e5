"""Bad inbox input goes to the DLQ with its reason, and the orchestrator keeps going."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from examples.order_saga.harness import HistoryWatcher, SagalineProcess, orchestrator_process
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    StartWorkflow,
    WorkflowStatus,
)
from orchestrator.protocol.topics import Topics
from orchestrator.runtime import dlq

pytestmark = pytest.mark.integration


@pytest.fixture
def orchestrator(process_env: dict[str, str], tmp_path: Path) -> Iterator[SagalineProcess]:
    process = orchestrator_process(
        process_env, tmp_path, "dlq", max_record_bytes="4096", session_timeout_ms="6000"
    ).start()
    yield process
    process.stop(15)


def _start(codec: AvroCodec, wid: str, wtype: str = "order.process", size: int = 0) -> bytes:
    order = {
        "order_id": wid,
        "items": [{"sku": "a", "qty": 1}],
        "total": 5,
        "card": "visa",
        "address": "x" * size,
    }
    return codec.encode_inbox(StartWorkflow(wid, wtype, encode_json(order), 0))


def test_each_kind_of_bad_input_is_dead_lettered_and_the_loop_continues(
    orchestrator: SagalineProcess, topics: Topics, kafka_bootstrap: str
) -> None:
    codec = AvroCodec()
    valid = _start(codec, "good-1")
    task = ActivityTask("w", "order.process", "w/0/1", 0, 1, "payment", "charge", encode_json(1), 0)
    bad: dict[str, tuple[bytes, bytes | None]] = {
        "malformed": (b"garbage-1", b"\xff\x00not avro at all"),
        "malformed-truncated": (b"good-1", valid[: len(valid) // 2]),
        "malformed-null": (b"tombstone-1", None),
        "unknown-schema": (b"unknown-1", struct.pack(">bI", 0, 123_456_789) + valid[5:]),
        "wrong-record-type": (b"w", codec.encode_task(task)),
        "unknown-workflow-type": (b"nope-1", _start(codec, "nope-1", wtype="no.such.type")),
        "oversized": (b"big-1", _start(codec, "big-1", size=10_000)),
        "key-mismatch": (b"other-key", _start(codec, "mismatch-1")),
        "unknown-workflow": (
            b"ghost-1",
            codec.encode_inbox(
                ActivityResult(
                    "ghost-1",
                    "ghost-1/0/1",
                    0,
                    1,
                    ActivityStatus.COMPLETED,
                    0,
                    result=encode_json({}),
                )
            ),
        ),
    }
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    for key, value in bad.values():
        producer.produce(topics.inbox, key=key, value=value)
    producer.produce(topics.inbox, key=b"good-1", value=valid)
    assert producer.flush(30) == 0

    letters = _read_dead_letters(kafka_bootstrap, topics.dlq, len(bad), orchestrator)
    reasons: dict[str, int] = {}
    for _key, _value, headers in letters:
        reasons[headers[dlq.REASON].decode()] = reasons.get(headers[dlq.REASON].decode(), 0) + 1
    expected = {
        "malformed": 3,
        "unknown-schema": 1,
        "wrong-record-type": 1,
        "unknown-workflow-type": 1,
        "oversized": 1,
        "key-mismatch": 1,
        "unknown-workflow": 1,
    }
    assert reasons == expected, f"dead letters by reason: {reasons}"
    originals = {(k, v) for k, v in bad.values()}
    for key, value, headers in letters:
        assert (key, value) in originals, f"dead letter {key!r} does not carry the original bytes"
        assert headers[dlq.SOURCE] == b"orchestrator"
        assert headers[dlq.TOPIC].decode() == topics.inbox
        assert headers[dlq.ERROR], "a dead letter must say what was wrong"

    watcher = HistoryWatcher(kafka_bootstrap, topics.history)
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end and "good-1" not in watcher.latest:
            watcher.poll()
        record = watcher.latest.get("good-1")
        assert record is not None, (
            f"valid start after bad input was not processed\n{orchestrator.tail()}"
        )
        assert record.status is WorkflowStatus.RUNNING
        assert set(watcher.latest) == {"good-1"}, f"unexpected workflows {set(watcher.latest)}"
    finally:
        watcher.close()
    assert orchestrator.alive(), orchestrator.tail()


def _read_dead_letters(
    bootstrap: str, topic: str, count: int, process: SagalineProcess
) -> list[tuple[bytes | None, bytes | None, dict[str, bytes]]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"dlq-{topic}",
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    letters: list[tuple[bytes | None, bytes | None, dict[str, bytes]]] = []
    end = time.monotonic() + 60
    try:
        while time.monotonic() < end and len(letters) < count:
            for msg in consumer.consume(100, 0.2):
                if msg.error() is None:
                    letters.append((msg.key(), msg.value(), dict(msg.headers() or [])))
    finally:
        consumer.close()
    assert len(letters) == count, f"{len(letters)} dead letters, expected {count}\n{process.tail()}"
    return letters
