"""Bad inbox input goes to the DLQ with its reason, and the orchestrator keeps going."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from examples.order_saga.harness import HistoryWatcher, SagalineProcess, orchestrator_process
from orchestrator import transport as dlq
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.partitioning import partition_for
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    StartWorkflow,
    WorkflowStatus,
    activity_id,
)
from orchestrator.protocol.topics import Topics
from tests.integration.pipeline import header_values

pytestmark = pytest.mark.integration
LIMIT = 4096


@pytest.fixture
def orchestrator(process_env: dict[str, str], tmp_path: Path) -> Iterator[SagalineProcess]:
    process = orchestrator_process(
        process_env, tmp_path, "dlq", max_record_bytes=str(LIMIT), session_timeout_ms="6000"
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
        "oversized": (b"big-1", _start(codec, "big-1", size=10_000)),
        # Near Kafka's 1 MB: dead-lettered without its value, which would not fit.
        "oversized-huge": (b"huge-1", _start(codec, "huge-1", size=980_000)),
        # Fits as an input, but the workflow record it would create does not.
        "oversized-record": (b"grow-1", _start_just_below(codec, "grow-1", LIMIT)),
        "key-mismatch": (b"other-key", _start(codec, "mismatch-1")),
        "empty-workflow-id": (b"", _start(codec, "")),
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
    for sent_key, sent_value in bad.values():
        producer.produce(topics.inbox, key=sent_key, value=sent_value)
    # A client with another partitioner: the right key on the wrong partition.
    wrong = _start(codec, "wp-1")
    bad["wrong-partition"] = (b"wp-1", wrong)
    producer.produce(
        topics.inbox, key=b"wp-1", value=wrong, partition=(partition_for(b"wp-1", 4) + 1) % 4
    )
    # A type this deployment lacks is kept (STUCK), not dead-lettered: a later deploy runs it.
    producer.produce(topics.inbox, key=b"nope-1", value=_start(codec, "nope-1", "no.such.type"))
    producer.produce(topics.inbox, key=b"good-1", value=valid)
    producer.produce(topics.inbox, key=b"good-2", value=_start(codec, "good-2"))
    assert producer.flush(30) == 0

    letters = _read_dead_letters(kafka_bootstrap, topics.dlq, len(bad), orchestrator)
    reasons: dict[str, int] = {}
    for _key, _value, headers in letters:
        reasons[headers[dlq.REASON].decode()] = reasons.get(headers[dlq.REASON].decode(), 0) + 1
    expected = {
        "malformed": 3,
        "unknown-schema": 1,
        "wrong-record-type": 1,
        "oversized": 3,
        "key-mismatch": 1,
        "empty-workflow-id": 1,
        "unknown-workflow": 1,
        "wrong-partition": 1,
    }
    assert reasons == expected, f"dead letters by reason: {reasons}"
    originals = {(k, v) for k, v in bad.values()}
    for key, value, headers in letters:
        if key == b"huge-1":
            assert value is None and headers[dlq.VALUE_DROPPED] == b"true"
            continue
        assert (key, value) in originals, f"dead letter {key!r} does not carry the original bytes"
        assert headers[dlq.SOURCE] == b"orchestrator"
        assert headers[dlq.TOPIC].decode() == topics.inbox
        assert headers[dlq.ERROR], "a dead letter must say what was wrong"

    watcher = HistoryWatcher(kafka_bootstrap, topics.history)
    try:
        wanted = {"good-1", "good-2", "nope-1", "grow-1"}
        _wait(watcher, lambda: wanted <= set(watcher.latest), orchestrator)
        record = watcher.latest["good-1"]
        assert record.status is WorkflowStatus.RUNNING
        assert set(watcher.latest) == wanted, f"workflows {set(watcher.latest)}"
        kept = watcher.latest["nope-1"]
        assert kept.status is WorkflowStatus.STUCK
        assert kept.failure is not None and kept.failure.error_type == "UnknownWorkflowType"
        # The start whose record would not fit is closed FAILED, its input in the DLQ.
        grown = watcher.latest["grow-1"]
        assert grown.status is WorkflowStatus.FAILED, grown
        assert grown.failure is not None and "RecordTooLarge" in grown.failure.error_type
        # A result that would grow good-2's record past the limit reaches its code as a
        # failure (the step's effects committed), instead of failing the whole transaction.
        big = encode_json({"blob": "y" * (LIMIT - 200)})
        aid = activity_id("good-2", 0, 1, watcher.latest["good-2"].run_id)
        result = ActivityResult("good-2", aid, 0, 1, ActivityStatus.COMPLETED, 0, big)
        producer.produce(topics.inbox, key=b"good-2", value=codec.encode_inbox(result))
        assert producer.flush(30) == 0
        _wait(watcher, lambda: watcher.latest["good-2"].status.terminal, orchestrator)
        failed = watcher.latest["good-2"]
        assert failed.status is WorkflowStatus.FAILED
        assert failed.failure is not None and "RecordTooLarge" in failed.failure.error_type
    finally:
        watcher.close()
    assert orchestrator.alive(), orchestrator.tail()


def _start_just_below(codec: AvroCodec, wid: str, limit: int) -> bytes:
    """A start record under ``limit`` bytes whose workflow record will exceed it."""
    size = limit - 300
    while len(_start(codec, wid, size=size + 1)) <= limit:
        size += 1
    return _start(codec, wid, size=size)


def _wait(watcher: HistoryWatcher, condition: Callable[[], bool], process: SagalineProcess) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        watcher.poll()
        if condition():
            return
    raise AssertionError(f"condition not met; workflows {watcher.latest}\n{process.tail()}")


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
                    letters.append((msg.key(), msg.value(), header_values(msg)))
    finally:
        consumer.close()
    assert len(letters) == count, f"{len(letters)} dead letters, expected {count}\n{process.tail()}"
    return letters
