"""The shared produce policy, size rule and dead letters (orchestrator/transport.py)."""

from __future__ import annotations

from typing import Any
from unittest.mock import create_autospec

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from orchestrator.errors import FatalKafkaError, RecordRejectedError, TransactionAbortableError
from orchestrator.transport import (
    KEY_DROPPED,
    VALUE_DROPPED,
    TopicDirectory,
    classify_delivery_error,
    dead_letter_for,
    produce,
    record_size,
)


def test_the_size_rule_counts_key_value_and_headers() -> None:
    assert record_size(b"k" * 10, b"v" * 100, [("h", b"x" * 5), ("n", None)]) == 10 + 100 + 6 + 1
    assert record_size(None, None) == 0


def _producer(*effects: Any) -> Any:
    producer = create_autospec(Producer, instance=True)
    producer.produce.side_effect = list(effects)
    return producer


def test_a_full_queue_waits_for_room_then_produces() -> None:
    producer = _producer(BufferError(), BufferError(), None)
    produce(producer, "t", key=b"k", value=b"v")
    assert producer.produce.call_count == 3
    assert producer.poll.call_count == 2


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), RecordRejectedError),
        (KafkaError(KafkaError._UNKNOWN_TOPIC), RecordRejectedError),
        (KafkaError(KafkaError._UNKNOWN_PARTITION), RecordRejectedError),
        (KafkaError(KafkaError._INVALID_ARG), RecordRejectedError),
        (KafkaError(KafkaError._STATE), TransactionAbortableError),
        (KafkaError(KafkaError._PURGE_QUEUE, txn_requires_abort=True), TransactionAbortableError),
        (KafkaError(KafkaError._FENCED), FatalKafkaError),
        (KafkaError(KafkaError._FATAL, fatal=True), FatalKafkaError),
        (KafkaError(KafkaError._TIMED_OUT), RecordRejectedError),
    ],
)
def test_every_synchronous_produce_error_has_one_meaning(
    error: KafkaError, raised: type[Exception]
) -> None:
    with pytest.raises(raised):
        produce(_producer(KafkaException(error)), "t", key=b"k", value=b"v")


def test_a_bad_argument_is_a_refused_record_not_a_crash() -> None:
    with pytest.raises(RecordRejectedError) as caught:
        produce(_producer(TypeError("headers must be a list")), "t", key=b"k", value=b"v")
    assert caught.value.reason == "invalid-argument"


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (KafkaError.MSG_SIZE_TOO_LARGE, "record"),
        (KafkaError.UNKNOWN_TOPIC_OR_PART, "record"),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, "record"),
        (KafkaError._MSG_TIMED_OUT, "transient"),
        (KafkaError._PURGE_QUEUE, "transient"),
        (KafkaError.NOT_ENOUGH_REPLICAS, "transient"),
    ],
)
def test_delivery_failures_are_blamed_on_the_record_only_when_it_is_the_problem(
    code: int, verdict: str
) -> None:
    assert classify_delivery_error(KafkaError(code)) == verdict


def test_a_dead_letter_always_fits_dropping_value_then_key() -> None:
    common: dict[str, Any] = {
        "topic": "p.inbox",
        "partition": 3,
        "offset": 42,
        "reason": "oversized",
        "error": "too big \ud800",
        "source": "orchestrator",
    }
    whole = dead_letter_for(key=b"k", value=b"v" * 100, max_record_bytes=10_000, **common)
    assert whole.value == b"v" * 100 and whole.key == b"k"
    assert dict(whole.headers)["sagaline.dlq.error"] == b"too big \\ud800"
    small = dead_letter_for(key=b"k", value=b"v" * 5_000, max_record_bytes=1_000, **common)
    assert small.value is None and dict(small.headers)[VALUE_DROPPED] == b"true"
    assert record_size(small.key, small.value, small.headers) <= 1_000
    tiny = dead_letter_for(key=b"k" * 5_000, value=b"v", max_record_bytes=1_000, **common)
    assert tiny.key is None and dict(tiny.headers)[KEY_DROPPED] == b"true"


class _Cluster:
    def __init__(self, topics: set[str]) -> None:
        self.topics = topics
        self.calls = 0

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        self.calls += 1
        info = type("Info", (), {"error": None, "partitions": {0: None}})
        return type("Meta", (), {"topics": {name: info for name in self.topics}})


def test_the_topic_directory_caches_known_topics_and_rechecks_missing_ones() -> None:
    cluster = _Cluster({"a"})
    directory = TopicDirectory(cluster, recheck_s=3600)
    assert directory.exists("a") and directory.exists("a")
    assert cluster.calls == 1
    assert not directory.exists("b") and not directory.exists("b")
    assert cluster.calls == 2, "a missing topic is not looked up on every call"
    cluster.topics.add("b")
    directory.recheck_missing()
    assert directory.exists("b")
