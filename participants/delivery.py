"""Publishing a participant's results and dead letters, and knowing Kafka took them.

Rules of this module: it knows Kafka and the record formats, never PostgreSQL or
handlers. Every record goes through :func:`orchestrator.transport.produce` (back-pressure
and one error policy) and is measured by :func:`orchestrator.transport.record_size` (key +
value + headers). A result Kafka can never take (too large, refused by the topic) is
answered once by a small substitute failure, so the workflow learns of it and can
compensate; a record that cannot be answered that way stops the participant, because the
offsets of its batch must never be committed past an unacknowledged result. Nothing here
raises from a delivery callback (EOS 8): failures are collected and judged in
:meth:`Publisher.handle_failures` (or :meth:`Publisher.confirm`), on the loop thread.

Start reports and heartbeats are best effort: published once, a failed delivery logged and
dropped (the orchestrator tolerates missing and duplicate ones); they never stop the
participant unless the producer itself failed for good.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from confluent_kafka import KafkaError, Message, Producer

from orchestrator import metrics
from orchestrator.errors import (
    FatalKafkaError,
    RecordRejectedError,
    SagalineError,
    TransactionAbortableError,
)
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.failures import safe_text
from orchestrator.protocol.payloads import PayloadEncodingError
from orchestrator.protocol.records import (
    ActivityHeartbeat,
    ActivityResult,
    ActivityStarted,
    ActivityStatus,
    Failure,
)
from orchestrator.protocol.topics import Topics
from orchestrator.transport import classify_delivery_error, dead_letter, produce, record_size

log = logging.getLogger(__name__)

RESULT_TOO_LARGE: Final = "ResultTooLarge"
RESULT_REJECTED: Final = "ResultRejected"
_FLUSH_SLICE_S: Final = 1.0
# How long a pushed result's flush may wait (measured here: librdkafka sends within 0.4 ms
# of a flush of 1 ms; a flush of 0 ms missed its wakeup about half the time).
_PUSH_S: Final = 0.001


class ResultDeliveryError(SagalineError):
    """Kafka did not take a result or dead letter and no substitute can answer for it, or
    the producer failed fatally. The batch's offsets were not committed: restart the
    participant, and the redelivered tasks are answered from the idempotency inbox."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One record on its way to Kafka, with what it answers.

    Attributes:
        result: the activity result it carries; None for a dead letter or a report.
        substitute: True when it already stands in for a record Kafka refused.
        best_effort: a start report or heartbeat: sent once, a failure logged and dropped.
        on_acked: called once Kafka acknowledged it (or the substitute standing in for it),
            from whichever thread polls the producer.
    """

    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    result: ActivityResult | None = None
    substitute: bool = False
    best_effort: bool = False
    on_acked: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        """What Kafka counts against its limit."""
        return record_size(self.key, self.value, self.headers)


def result_record(
    result: ActivityResult, topics: Topics, codec: AvroCodec, max_record_bytes: int
) -> Outgoing:
    """The inbox record answering ``result``; a result too large for Kafka becomes a
    non-retryable ``ResultTooLarge`` failure.

    The substitute is derived only from the stored outcome, so every redelivery of the
    task publishes the same bytes. Its ``effects_committed`` is True when the attempt
    completed: its writes are in the database and the workflow must compensate them.
    """
    record = Outgoing(
        topics.inbox, result.workflow_id.encode(), codec.encode_inbox(result), result=result
    )
    if record.size <= max_record_bytes:
        return record
    log.error(
        "result too large activity_id=%s bytes=%d limit=%d",
        safe_text(result.activity_id, 300),
        record.size,
        max_record_bytes,
    )
    failure = Failure(
        RESULT_TOO_LARGE,
        f"activity {safe_text(result.activity_id, 300)} returned a result of {record.size} "
        f"bytes with its key, above the limit of {max_record_bytes}; "
        + (
            "its writes committed, so compensate them; return a reference instead of the data"
            if result.status is ActivityStatus.COMPLETED
            else "nothing it wrote was kept"
        ),
        retryable=False,
        effects_committed=result.status is ActivityStatus.COMPLETED,
    )
    substitute = _replacing(record, failure, codec)
    if substitute.size > max_record_bytes:
        raise ResultDeliveryError(
            f"the result of {safe_text(result.activity_id, 300)} does not fit in "
            f"{max_record_bytes} bytes even as a failure (its key alone is "
            f"{len(record.key or b'')} bytes); raise SAGALINE_MAX_RECORD_BYTES"
        )
    return substitute


def _replacing(record: Outgoing, failure: Failure, codec: AvroCodec) -> Outgoing:
    assert record.result is not None
    smaller = dataclasses.replace(
        record.result, status=ActivityStatus.FAILED, result=None, failure=failure
    )
    return Outgoing(
        record.topic,
        record.key,
        codec.encode_inbox(smaller),
        result=smaller,
        substitute=True,
        on_acked=record.on_acked,
    )


def report_record(
    report: ActivityStarted | ActivityHeartbeat,
    topics: Topics,
    codec: AvroCodec,
    max_record_bytes: int,
) -> Outgoing:
    """The inbox record of a start report or heartbeat, keyed like results (by workflow).

    Raises:
        PayloadEncodingError: the record would be larger than ``max_record_bytes``
            (heartbeat details too large).
    """
    record = Outgoing(
        topics.inbox, report.workflow_id.encode(), codec.encode_inbox(report), best_effort=True
    )
    if record.size > max_record_bytes:
        raise PayloadEncodingError(
            f"{type(report).__name__} of activity {safe_text(report.activity_id, 300)} would "
            f"be {record.size} bytes with its key, above the limit of {max_record_bytes}; "
            "keep heartbeat details small (a cursor or a count, not the data)"
        )
    return record


class Publisher:
    """Sends a participant's records and learns which ones Kafka acknowledged.

    The ``send_*`` methods may be called from any thread (workers publish their results as
    they finish). Delivery callbacks run in whichever thread polls the producer; failures
    are collected under a lock and judged by :meth:`handle_failures` (or :meth:`confirm`),
    which only the participant's loop thread calls.
    """

    def __init__(
        self,
        producer: Producer,
        *,
        participant: str,
        topics: Topics,
        codec: AvroCodec,
        max_record_bytes: int,
    ) -> None:
        self._producer = producer
        self._participant = participant
        self._topics = topics
        self._codec = codec
        self._max_record_bytes = max_record_bytes
        self._source = f"participant:{participant}"
        self._lock = threading.Lock()
        self._failures: list[tuple[Outgoing, KafkaError]] = []

    def send_result(
        self,
        result: ActivityResult,
        *,
        on_acked: Callable[[], None] | None = None,
        push: bool = False,
    ) -> None:
        """Queue the record answering ``result`` (or its ``ResultTooLarge`` substitute);
        ``on_acked`` runs once Kafka acknowledged it.

        ``push`` sends it at once instead of after the producer's linger (for a result
        that nothing else would join: the caller waits up to a millisecond)."""
        record = result_record(result, self._topics, self._codec, self._max_record_bytes)
        self._send(dataclasses.replace(record, on_acked=on_acked))
        if push:
            # A flush is what makes librdkafka send without lingering; one that returns at
            # once may miss the wakeup it triggers, a millisecond does not.
            self._producer.flush(_PUSH_S)

    def report(self, report: ActivityStarted | ActivityHeartbeat) -> Outgoing:
        """The record of a start report or heartbeat, checked against the size limit.

        Raises:
            PayloadEncodingError: too large (see :func:`report_record`).
        """
        return report_record(report, self._topics, self._codec, self._max_record_bytes)

    def send_report(self, record: Outgoing) -> None:
        """Queue a record from :meth:`report`, best effort: never resent, never substituted."""
        self._send(record)

    def send_dead_letter(
        self,
        msg: Message,
        *,
        reason: str,
        error: str,
        on_acked: Callable[[], None] | None = None,
    ) -> None:
        """Queue ``msg`` for the DLQ topic, with why in its headers."""
        letter = dead_letter(
            msg,
            reason=reason,
            error=error,
            source=self._source,
            max_record_bytes=self._max_record_bytes,
        )
        self._send(
            Outgoing(
                self._topics.dlq,
                letter.key,
                letter.value,
                tuple(letter.headers),
                on_acked=on_acked,
            )
        )
        metrics.DEAD_LETTERS.labels(self._source, reason).inc()

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve delivery callbacks, waiting up to ``timeout_s`` for the first one."""
        served: int = self._producer.poll(timeout_s)
        return served

    def handle_failures(self) -> None:
        """Send again, or substitute, what failed delivery so far (loop thread only).

        Raises:
            ResultDeliveryError: as :meth:`confirm`.
        """
        with self._lock:
            failures, self._failures = self._failures, []
        for outgoing, error in failures:
            self._redeliver(outgoing, error)

    def confirm(self, stop: threading.Event) -> bool:
        """Wait until Kafka acknowledged everything queued; False if ``stop`` is set first.

        Transient delivery failures (librdkafka already retried them for
        ``message.timeout.ms``) are sent again; a record Kafka refuses is replaced once by a
        small ``ResultRejected`` failure.

        Raises:
            ResultDeliveryError: a refused record that no substitute can answer (a dead
                letter, or a refused substitute), or a fatal producer error.
        """
        while True:
            remaining = self._producer.flush(_FLUSH_SLICE_S)
            with self._lock:
                failures, self._failures = self._failures, []
            for outgoing, error in failures:
                self._redeliver(outgoing, error)
            if remaining == 0 and not failures:
                return True
            if stop.is_set() and remaining:
                return False

    def close(self, timeout_s: float) -> int:
        """Flush what is queued for at most ``timeout_s``; returns what is left."""
        remaining: int = self._producer.flush(timeout_s)
        return remaining

    def _send(self, outgoing: Outgoing) -> None:
        try:
            produce(
                self._producer,
                outgoing.topic,
                key=outgoing.key,
                value=outgoing.value,
                headers=outgoing.headers or None,
                on_delivery=functools.partial(self._delivered, outgoing),
            )
        except RecordRejectedError as exc:
            if outgoing.best_effort:
                self._drop(outgoing, f"{exc.reason}: {exc}")
                return
            self._send(self._substitute(outgoing, f"{exc.reason}: {exc}"))
        except (FatalKafkaError, TransactionAbortableError) as exc:
            raise ResultDeliveryError(
                f"participant {self._participant}: the producer failed for good ({exc}); "
                "offsets not committed, restart to have the tasks redelivered"
            ) from exc

    def _delivered(self, outgoing: Outgoing, error: KafkaError | None, _msg: Message) -> None:
        if error is not None:
            with self._lock:
                self._failures.append((outgoing, error))
        elif outgoing.on_acked is not None:
            outgoing.on_acked()

    def _drop(self, outgoing: Outgoing, cause: str) -> None:
        log.warning(
            "report not delivered, dropped participant=%s topic=%s error=%s",
            self._participant,
            outgoing.topic,
            safe_text(cause, 500),
        )

    def _redeliver(self, outgoing: Outgoing, error: KafkaError) -> None:
        cause = f"{error.name()}: {error.str()}"
        verdict = classify_delivery_error(error)
        if outgoing.best_effort and verdict != "fatal":
            self._drop(outgoing, cause)
            return
        if verdict == "fatal":
            raise ResultDeliveryError(
                f"participant {self._participant}: the producer failed for good delivering "
                f"to {outgoing.topic} ({cause}); offsets not committed, restart to have the "
                "tasks redelivered"
            )
        if verdict == "record":
            self._send(self._substitute(outgoing, cause))
            return
        log.warning(
            "delivery failed, sending again participant=%s topic=%s error=%s",
            self._participant,
            outgoing.topic,
            cause,
        )
        self._send(outgoing)

    def _substitute(self, outgoing: Outgoing, cause: str) -> Outgoing:
        """A small failure standing in for a result Kafka refused."""
        result = outgoing.result
        if result is None or outgoing.substitute:
            what = "a dead letter" if result is None else f"the result of {result.activity_id}"
            raise ResultDeliveryError(
                f"participant {self._participant}: Kafka refused {what} for "
                f"{outgoing.topic} ({safe_text(cause, 500)}), and no smaller record can "
                "answer for it; offsets not committed. Check the topic exists and that its "
                "max.message.bytes is at least SAGALINE_MAX_RECORD_BYTES"
            )
        committed = result.status is ActivityStatus.COMPLETED
        failure = Failure(
            RESULT_REJECTED,
            safe_text(
                f"Kafka refused the result of activity {result.activity_id} "
                f"({safe_text(cause, 500)})"
                + ("; its writes committed, so compensate them" if committed else "")
            ),
            retryable=False,
            effects_committed=committed,
        )
        substitute = _replacing(outgoing, failure, self._codec)
        if substitute.size > self._max_record_bytes:
            raise ResultDeliveryError(
                f"participant {self._participant}: Kafka refused the result of "
                f"{result.activity_id} ({safe_text(cause, 500)}) and a failure in its place "
                f"would not fit in {self._max_record_bytes} bytes"
            )
        log.error(
            "result refused, publishing a failure instead participant=%s activity_id=%s cause=%s",
            self._participant,
            result.activity_id,
            safe_text(cause, 500),
        )
        return substitute
