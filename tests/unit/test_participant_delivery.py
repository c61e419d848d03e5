"""Participant delivery rules, group settings and database error classes, without a broker.

The publisher's error paths run against a small in-memory producer (the style guide's
autospec'd-producer allowance for error paths); the same paths run against the real broker
in tests/integration/test_participants.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

import psycopg
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from psycopg_pool import PoolTimeout

from orchestrator.protocol import (
    ActivityResult,
    ActivityStatus,
    AvroCodec,
    Failure,
    Topics,
    encode_json,
)
from orchestrator.settings import ParticipantSettings
from orchestrator.transport import record_size
from participants.delivery import (
    RESULT_REJECTED,
    RESULT_TOO_LARGE,
    Outgoing,
    Publisher,
    ResultDeliveryError,
    result_record,
)
from participants.idempotency import is_connection_level
from participants.runtime import consumer_config, producer_config

TOPICS = Topics("unit")
CODEC = AvroCodec()


def _result(workflow_id: str = "order-1", blob: str = "x") -> ActivityResult:
    return ActivityResult(
        workflow_id=workflow_id,
        activity_id=f"{workflow_id}/2/1",
        seq=2,
        attempt=1,
        status=ActivityStatus.COMPLETED,
        finished_at_ms=1_700_000_000_000,
        result=encode_json({"blob": blob}),
    )


def _failure_of(value: bytes | None) -> Failure:
    body = CODEC.decode_inbox(value)
    assert isinstance(body, ActivityResult) and body.failure is not None, body
    assert body.status is ActivityStatus.FAILED and body.result is None
    return body.failure


# --- the size rule ---------------------------------------------------------------------


def test_a_result_that_fits_is_published_as_it_is() -> None:
    result = _result()
    record = result_record(result, TOPICS, CODEC, 10_000)
    assert (record.topic, record.key, record.value) == (
        TOPICS.inbox,
        b"order-1",
        CODEC.encode_inbox(result),
    )
    assert not record.substitute


def test_the_key_counts_a_value_under_the_limit_can_still_be_too_large() -> None:
    result = _result(workflow_id="w" * 300, blob="b" * 1_000)
    value = CODEC.encode_inbox(result)
    limit = len(value) + 10  # the value alone fits; with its 300-byte key it does not
    assert len(value) < limit < record_size(result.workflow_id.encode(), value)
    record = result_record(result, TOPICS, CODEC, limit)
    assert record.substitute and record.size <= limit
    assert _failure_of(record.value).error_type == RESULT_TOO_LARGE
    assert not result_record(result, TOPICS, CODEC, len(value) + 300).substitute


def test_too_large_is_final_says_effects_committed_and_is_the_same_bytes_every_time() -> None:
    result = _result(blob="z" * 5_000)
    first = result_record(result, TOPICS, CODEC, 2_048)
    again = result_record(result, TOPICS, CODEC, 2_048)
    assert first.value == again.value and first.key == b"order-1"
    failure = _failure_of(first.value)
    assert (failure.error_type, failure.retryable, failure.effects_committed) == (
        RESULT_TOO_LARGE,
        False,
        True,
    )
    assert "compensate" in failure.message


def test_a_result_whose_key_alone_is_too_large_cannot_be_answered() -> None:
    with pytest.raises(ResultDeliveryError, match="even as a failure"):
        result_record(_result(workflow_id="w" * 3_000), TOPICS, CODEC, 2_048)


# --- the publisher's error policy --------------------------------------------------------


class _Producer:
    """In memory: records produce calls, then answers each delivery as it was told to."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []
        self.refuse_next: list[KafkaException] = []
        self.fail_next: list[KafkaError | None] = []
        self._queued: list[tuple[Callable[..., None], KafkaError | None]] = []
        self.stuck = False

    def produce(self, topic: str, **kwargs: Any) -> None:
        if self.refuse_next:
            raise self.refuse_next.pop(0)
        self.sent.append((topic, kwargs["key"], kwargs["value"]))
        error = self.fail_next.pop(0) if self.fail_next else None
        self._queued.append((kwargs["on_delivery"], error))

    def poll(self, timeout: float = 0) -> int:
        return self.flush(timeout)

    def flush(self, timeout: float = 0) -> int:
        if self.stuck:
            return len(self._queued)
        queued, self._queued = self._queued, []
        for callback, error in queued:
            callback(error, None)
        return 0


def _publisher(producer: _Producer) -> Publisher:
    return Publisher(
        cast(Producer, producer),
        participant="payment",
        topics=TOPICS,
        codec=CODEC,
        max_record_bytes=100_000,
    )


def test_a_result_the_client_refuses_is_answered_once_by_a_final_failure() -> None:
    producer = _Producer()
    producer.refuse_next.append(KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)))
    publisher = _publisher(producer)
    publisher.send_result(_result())
    assert publisher.confirm(threading.Event())
    ((topic, key, value),) = producer.sent
    assert (topic, key) == (TOPICS.inbox, b"order-1")
    failure = _failure_of(value)
    assert (failure.error_type, failure.retryable, failure.effects_committed) == (
        RESULT_REJECTED,
        False,
        True,
    )
    assert "MSG_SIZE_TOO_LARGE" in failure.message


def test_a_result_the_broker_refuses_is_substituted_and_a_refused_substitute_stops() -> None:
    producer = _Producer()
    producer.fail_next.append(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    publisher = _publisher(producer)
    publisher.send_result(_result())
    assert publisher.confirm(threading.Event())
    original, substitute = producer.sent
    assert original[2] == CODEC.encode_inbox(_result())
    assert _failure_of(substitute[2]).error_type == RESULT_REJECTED

    producer.fail_next += [
        KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED),
        KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED),
    ]
    publisher.send_result(_result("order-2"))
    with pytest.raises(ResultDeliveryError, match=r"order-2/2/1.*TOPIC_AUTHORIZATION_FAILED"):
        publisher.confirm(threading.Event())


def test_transient_delivery_failures_send_the_same_record_again() -> None:
    producer = _Producer()
    producer.fail_next += [KafkaError(KafkaError._MSG_TIMED_OUT)] * 2
    publisher = _publisher(producer)
    publisher.send_result(_result())
    assert publisher.confirm(threading.Event())
    assert len(producer.sent) == 3 and len({value for _, _, value in producer.sent}) == 1


@pytest.mark.parametrize(
    "fail",
    [
        lambda p: p.fail_next.append(KafkaError(KafkaError._FATAL, "fenced", fatal=True)),
        lambda p: p.refuse_next.append(KafkaException(KafkaError(KafkaError._FENCED))),
    ],
    ids=["delivery", "produce"],
)
def test_a_fatal_producer_error_stops_the_participant(fail: Callable[[_Producer], None]) -> None:
    producer = _Producer()
    fail(producer)
    publisher = _publisher(producer)
    with pytest.raises(ResultDeliveryError, match="failed for good"):
        publisher.send_result(_result())
        publisher.confirm(threading.Event())


def test_confirm_gives_up_waiting_when_stopping() -> None:
    producer = _Producer()
    producer.stuck = True
    publisher = _publisher(producer)
    publisher.send_result(_result())
    stop = threading.Event()
    stop.set()
    assert not publisher.confirm(stop)


def test_acknowledgement_callbacks_run_once_per_answered_task_substitutes_included() -> None:
    producer = _Producer()
    producer.fail_next += [None, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)]
    publisher = _publisher(producer)
    acked: list[str] = []
    publisher.send_result(_result("order-1"), on_acked=lambda: acked.append("order-1"))
    publisher.send_result(_result("order-2"), on_acked=lambda: acked.append("order-2"))
    assert acked == []
    publisher.poll(0)
    assert acked == ["order-1"], "order-2's delivery failed: not answered yet"
    publisher.handle_failures()  # order-2 is replaced by a small failure
    publisher.poll(0)
    assert acked == ["order-1", "order-2"]
    assert _failure_of(producer.sent[-1][2]).error_type == RESULT_REJECTED


def test_a_report_that_fails_delivery_is_dropped_not_sent_again_nor_substituted() -> None:
    producer = _Producer()
    producer.fail_next += [
        KafkaError(KafkaError._MSG_TIMED_OUT),
        KafkaError(KafkaError.MSG_SIZE_TOO_LARGE),
    ]
    producer.refuse_next.append(KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)))
    publisher = _publisher(producer)
    report = Outgoing(TOPICS.inbox, b"order-1", b"report", best_effort=True)
    publisher.send_report(report)  # refused by the client: dropped at once
    publisher.send_report(report)  # transient failure: dropped
    publisher.send_report(report)  # refused by the broker: dropped
    assert publisher.confirm(threading.Event())
    assert len(producer.sent) == 2, producer.sent


def test_a_fatal_producer_error_stops_the_participant_even_for_a_report() -> None:
    producer = _Producer()
    producer.fail_next.append(KafkaError(KafkaError._FATAL, "fenced", fatal=True))
    publisher = _publisher(producer)
    publisher.send_report(Outgoing(TOPICS.inbox, b"k", b"v", best_effort=True))
    publisher.poll(0)
    with pytest.raises(ResultDeliveryError, match="failed for good"):
        publisher.handle_failures()


def test_results_can_be_sent_from_many_threads_at_once() -> None:
    producer = _Producer()
    publisher = _publisher(producer)
    acked: list[int] = []
    lock = threading.Lock()

    def ack(n: int) -> None:
        with lock:
            acked.append(n)

    def send(n: int) -> None:
        publisher.send_result(_result(f"order-{n}"), on_acked=lambda: ack(n))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert publisher.confirm(threading.Event())
    assert sorted(acked) == list(range(20)) and len(producer.sent) == 20


# --- group membership and clients --------------------------------------------------------


def test_replicas_join_with_cooperative_static_membership_and_the_given_session() -> None:
    settings = ParticipantSettings(instance_id="pay-7", topic_prefix="acme", max_record_bytes=2_000)
    config = consumer_config(settings, "payment", 1_000)
    assert config["group.id"] == "acme.participant.payment"
    assert config["group.instance.id"] == "pay-7"
    assert config["partition.assignment.strategy"] == "cooperative-sticky"
    assert (config["session.timeout.ms"], config["heartbeat.interval.ms"]) == (1_000, 333)
    assert config["isolation.level"] == "read_committed"
    assert config["enable.auto.commit"] is False
    produced = producer_config(settings, "payment")
    assert produced["enable.idempotence"] is True and produced["acks"] == "all"
    assert produced["message.max.bytes"] >= 1_000_000


# --- which database errors are retried in place ------------------------------------------


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (psycopg.InterfaceError("the connection is closed"), True),
        (PoolTimeout("couldn't get a connection after 10.00 sec"), True),
        (psycopg.errors.AdminShutdown(), True),
        (psycopg.errors.SerializationFailure(), True),
        (psycopg.errors.DeadlockDetected(), True),
        (psycopg.errors.ReadOnlySqlTransaction(), True),
        (psycopg.errors.ProgramLimitExceeded(), False),
        (psycopg.errors.UniqueViolation(), False),
        (psycopg.errors.UndefinedTable(), False),
        (psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"), False),
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), False),
        (RuntimeError("a bug"), False),
    ],
)
def test_only_connection_level_database_errors_are_retried_in_place(
    exc: BaseException, retried: bool
) -> None:
    assert is_connection_level(exc) is retried
