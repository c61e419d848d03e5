"""Kafka plumbing that orchestrators, participants and clients share, written once.

Rules of this module: it knows confluent-kafka and the wire's size rule, nothing of
workflows. One error policy for producing, one size rule, one shape of dead letter and one
way to poll, so the orchestrator, the participants and a Celery worker behave alike. Rules
referenced as "EOS n" are in shared/KAFKA_EOS.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka.admin import ConfigResource, ResourceType

from orchestrator.errors import (
    FatalKafkaError,
    RecordRejectedError,
    TransactionAbortableError,
)
from orchestrator.protocol.failures import safe_text

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes | None]]
DeliveryCallback = Callable[[KafkaError | None, Message], None]

# Errors about one record that sending it again cannot cure: the record is the problem
# (too large, for a topic that is gone or forbidden, refused by a policy).
RECORD_ERRORS: Final = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.POLICY_VIOLATION,
        KafkaError._INVALID_ARG,
    }
)
_BACKPRESSURE_POLL_S: Final = 0.05

# --- the size rule -----------------------------------------------------------------


def record_size(key: bytes | None, value: bytes | None, headers: Headers | None = None) -> int:
    """What Kafka counts against ``message.max.bytes``: key + value + header names and values.

    Checking the value alone is not enough: a long key or large headers push a record
    under the value limit over the broker's (EOS 23).
    """
    size = len(key or b"") + len(value or b"")
    for name, data in headers or ():
        size += len(name.encode()) + len(data or b"")
    return size


def producer_message_max_bytes(max_record_bytes: int) -> int:
    """``message.max.bytes`` for producers that enforce ``max_record_bytes`` themselves:
    the record limit plus room for batch overhead, never below Kafka's 1,000,000 default."""
    return max(1_000_000, max_record_bytes + 65_536)


def dead_letter_max_bytes(max_record_bytes: int) -> int:
    """The largest dead letter to send: as large as Kafka takes, so that an original that
    broke sagaline's own ``max_record_bytes`` is still kept whole when Kafka allows it."""
    return producer_message_max_bytes(max_record_bytes) - 65_536


# --- producing -----------------------------------------------------------------------


class _Producing(Protocol):
    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...


def produce(
    producer: _Producing,
    topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    headers: Headers | None = None,
    partition: int | None = None,
    on_delivery: DeliveryCallback | None = None,
) -> None:
    """Queue one record, waiting while the local queue is full; every error has one meaning.

    Raises:
        RecordRejectedError: librdkafka refused this record (too large, unknown topic or
            partition, bad argument); it was not queued and the transaction is unaffected.
        TransactionAbortableError: the open transaction can no longer commit, typically
            because an earlier record of it failed delivery (librdkafka answers every
            later produce with ``_STATE``).
        FatalKafkaError: the producer is fenced or failed fatally.
    """
    kwargs: dict[str, Any] = {"key": key, "value": value}
    if headers:
        kwargs["headers"] = list(headers)
    if partition is not None:
        kwargs["partition"] = partition
    if on_delivery is not None:
        kwargs["on_delivery"] = on_delivery
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:
            # The local queue is full: serve delivery reports until there is room.
            producer.poll(_BACKPRESSURE_POLL_S)
        except KafkaException as exc:
            raise _classify_produce_error(exc, topic) from exc
        except (TypeError, ValueError) as exc:
            raise RecordRejectedError(
                "invalid-argument", f"record for {topic} refused: {safe_text(exc)}"
            ) from exc


def _classify_produce_error(exc: KafkaException, topic: str) -> Exception:
    error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    if error is None:
        return RecordRejectedError("unknown", f"record for {topic} refused: {safe_text(exc)}")
    code = error.code()
    detail = f"{error.name()}: {error.str()}"
    if error.fatal() or code in (KafkaError._FATAL, KafkaError._FENCED):
        return FatalKafkaError(f"producing to {topic}: {detail}")
    if error.txn_requires_abort() or code == KafkaError._STATE:
        return TransactionAbortableError(f"producing to {topic}: {detail}")
    return RecordRejectedError(error.name(), f"record for {topic} refused: {detail}")


DeliveryVerdict = Literal["record", "transient", "fatal"]


def classify_delivery_error(error: KafkaError) -> DeliveryVerdict:
    """What a failed delivery means.

    ``record``: this record can never be delivered (too large for the topic, topic gone,
    not allowed); whoever produced it must change what it produces. ``transient``: the
    broker or network failed, and the same records may go through later. ``fatal``: the
    producer cannot continue.
    """
    if error.fatal():
        return "fatal"
    if error.code() in RECORD_ERRORS:
        return "record"
    return "transient"


# --- topics --------------------------------------------------------------------------


class _Listing(Protocol):
    def list_topics(self, topic: str | None = ..., timeout: float = ...) -> Any: ...


class TopicDirectory:
    """Which topics exist, from cached cluster metadata, checked before producing to one.

    A record for a topic that does not exist fails only after librdkafka's metadata wait
    and then dooms the whole transaction, on every retry (EOS 24); knowing beforehand
    lets the caller make it that one input's problem. Existing topics are cached for good
    (call :meth:`forget` after a delivery says otherwise); a missing one is looked up again
    at most every ``recheck_s``. The whole topic list is fetched, never one topic's
    metadata, because asking for one can auto-create it on brokers that allow that.
    """

    def __init__(
        self, client: _Listing, *, recheck_s: float = 1.0, timeout_s: float = 10.0
    ) -> None:
        self._client = client
        self._recheck_s = recheck_s
        self._timeout_s = timeout_s
        self._known: set[str] = set()
        self._missing: dict[str, float] = {}
        self._limits: dict[str, int | None] = {}

    def exists(self, topic: str) -> bool:
        """True if ``topic`` exists with at least one partition."""
        if topic in self._known:
            return True
        checked = self._missing.get(topic)
        if checked is not None and time.monotonic() - checked < self._recheck_s:
            return False
        try:
            metadata = self._client.list_topics(timeout=self._timeout_s)
        except KafkaException as exc:
            # Unknown is not missing: let the produce decide, as it would without us.
            log.warning("topic metadata unavailable topic=%s error=%s", topic, exc)
            return True
        for name, info in metadata.topics.items():
            if info.error is None and info.partitions:
                self._known.add(name)
        if topic in self._known:
            self._missing.pop(topic, None)
            return True
        self._missing[topic] = time.monotonic()
        return False

    def max_message_bytes(self, topic: str) -> int | None:
        """The topic's ``max.message.bytes``, or None if it cannot be read (cached)."""
        if topic in self._limits:
            return self._limits[topic]
        limit: int | None = None
        describe = getattr(self._client, "describe_configs", None)
        if describe is not None:
            resource = ConfigResource(ResourceType.TOPIC, topic)
            try:
                config = describe([resource], request_timeout=self._timeout_s)[resource]
                limit = int(config.result(timeout=self._timeout_s)["max.message.bytes"].value)
            except Exception as exc:  # unknown is an answer too: the caller blames nobody
                log.warning("cannot read max.message.bytes topic=%s: %s", topic, safe_text(exc))
                return None
        self._limits[topic] = limit
        return limit

    def forget(self, topic: str) -> None:
        """Look ``topic`` up again next time (a delivery to it failed)."""
        self._known.discard(topic)

    def recheck_missing(self) -> None:
        """Look every missing topic up again next time (someone may have created it)."""
        self._missing.clear()


# --- group membership ----------------------------------------------------------------

FALLBACK_SESSION_TIMEOUT_MS: Final = 10_000


class _Describing(_Listing, Protocol):
    def describe_configs(self, resources: list[Any], **kwargs: Any) -> dict[Any, Any]: ...


def session_timeout_ms(configured: int, admin: _Describing, *, timeout_s: float = 10.0) -> int:
    """``configured`` if positive, else the lowest session timeout the broker allows.

    The session timeout bounds how long a dead member's partitions stand still, so the
    default is the broker's ``group.min.session.timeout.ms`` (6 s on a stock broker).
    Liveness is heartbeated by librdkafka's own thread, so a busy Python loop does not
    make a short session expire.
    """
    if configured > 0:
        return configured
    try:
        brokers = sorted(admin.list_topics(timeout=timeout_s).brokers)
        resource = ConfigResource(ResourceType.BROKER, str(brokers[0]))
        config = admin.describe_configs([resource], request_timeout=timeout_s)[resource]
        return int(config.result(timeout=timeout_s)["group.min.session.timeout.ms"].value)
    except Exception as exc:  # any failure here has the same fallback
        log.warning(
            "cannot read the broker's group.min.session.timeout.ms (%s); using %d ms",
            safe_text(exc),
            FALLBACK_SESSION_TIMEOUT_MS,
        )
        return FALLBACK_SESSION_TIMEOUT_MS


def heartbeat_interval_ms(session_ms: int) -> int:
    """A third of the session (Kafka's advice), so two heartbeats may be lost in a row."""
    return max(100, session_ms // 3)


# --- dead letters --------------------------------------------------------------------

REASON: Final = "sagaline.dlq.reason"
ERROR: Final = "sagaline.dlq.error"
SOURCE: Final = "sagaline.dlq.source"
TOPIC: Final = "sagaline.dlq.topic"
PARTITION: Final = "sagaline.dlq.partition"
OFFSET: Final = "sagaline.dlq.offset"
VALUE_DROPPED: Final = "sagaline.dlq.value-dropped"
KEY_DROPPED: Final = "sagaline.dlq.key-dropped"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record for the DLQ topic: the original key and value, the reason in headers."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


def dead_letter(
    msg: Message, *, reason: str, error: str, source: str, max_record_bytes: int
) -> DeadLetter:
    """The dead letter for a consumed ``msg``; see :func:`dead_letter_for`."""
    return dead_letter_for(
        topic=str(msg.topic()),
        partition=msg.partition(),
        offset=msg.offset(),
        key=msg.key(),
        value=msg.value(),
        reason=reason,
        error=error,
        source=source,
        max_record_bytes=max_record_bytes,
    )


def dead_letter_for(
    *,
    topic: str,
    partition: int | None,
    offset: int | None,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    error: str,
    source: str,
    max_record_bytes: int,
) -> DeadLetter:
    """The dead letter of a record read from ``topic``, always small enough to send.

    ``reason`` is a short code operators filter on; ``error`` says what was wrong. An
    original too large to copy keeps its headers and loses its value (then its key), with
    a header saying so; the topic, partition and offset headers still point at it.
    """
    headers: list[tuple[str, bytes | None]] = [
        (REASON, safe_text(reason, 100).encode()),
        (ERROR, safe_text(error).encode()),
        (SOURCE, safe_text(source, 200).encode()),
        (TOPIC, safe_text(topic, 300).encode()),
        (PARTITION, str(partition).encode()),
        (OFFSET, str(offset).encode()),
    ]
    if record_size(key, value, headers) > max_record_bytes:
        value = None
        headers.append((VALUE_DROPPED, b"true"))
    if record_size(key, value, headers) > max_record_bytes:
        key = None
        headers.append((KEY_DROPPED, b"true"))
    return DeadLetter(key, value, headers)


# --- polling -------------------------------------------------------------------------


class _Consuming(Protocol):
    def consume(self, num_messages: int = ..., timeout: float = ...) -> list[Message]: ...


def poll_batch(consumer: _Consuming, max_messages: int, wait_s: float) -> list[Message]:
    """Wait up to ``wait_s`` for one message, then take whatever else is already fetched.

    ``Consumer.consume(n, timeout)`` waits for ``n`` messages or the whole timeout, so under
    light load every hop would cost the full timeout. Waiting only for the first message
    keeps an idle pipeline's latency at a few milliseconds, while a busy one still gets
    large batches from what piled up during the previous one.
    """
    first = consumer.consume(num_messages=1, timeout=wait_s)
    if not first or max_messages <= 1:
        return list(first)
    return [*first, *consumer.consume(num_messages=max_messages - 1, timeout=0)]
