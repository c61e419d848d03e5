"""The participant process: consume tasks, run them through the idempotency inbox, publish results.

Invariant: a task's offset is committed only after its outcome is durable (committed in
PostgreSQL when it must be remembered) and its result (or dead letter) is acknowledged by
Kafka with ``acks=all``. A crash anywhere before the commit makes Kafka redeliver the task,
and the idempotency inbox answers it without repeating its effects: at-least-once delivery
plus the inbox gives exactly-once effects. Rules referenced as "EOS n" are in
shared/KAFKA_EOS.md.

A handler's exceptions become failed results. The inbox's own SQL failing (PostgreSQL
down or restarting) does not: the task is retried in place with backoff until the
database answers, because a failed COMMIT may still have committed.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from orchestrator import metrics
from orchestrator.errors import RecordDecodeError, SagalineError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.records import ActivityResult, ActivityStatus, ActivityTask, Failure
from orchestrator.settings import ParticipantSettings
from orchestrator.transport import (
    dead_letter,
    heartbeat_interval_ms,
    poll_batch,
    session_timeout_ms,
)
from participants.idempotency import ensure_schema, execute_task
from participants.participant import Participant

log = logging.getLogger(__name__)
_CONNECT_TIMEOUT_S = 10
_CLOSE_FLUSH_S = 10.0
_DB_RETRY_DELAYS_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class ResultDeliveryError(SagalineError):
    """Kafka did not acknowledge a result or dead letter, so the batch's offsets were not
    committed. The process must restart; the redelivered tasks are answered from the
    idempotency inbox."""


class _ConnectionPool:
    """At most one connection per worker thread, opened lazily, replaced when broken."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._idle: queue.SimpleQueue[psycopg.Connection[Any]] = queue.SimpleQueue()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S)
        try:
            yield conn
        finally:
            idle = conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
            if conn.closed or conn.broken or not idle:
                conn.close()
            else:
                self._idle.put(conn)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class _ParticipantLoop:
    """One participant's consumer, producer, worker threads and database connections."""

    def __init__(self, participant: Participant, settings: ParticipantSettings) -> None:
        self.participant = participant
        self.topics = settings.topics
        self.task_topic = settings.topics.tasks(participant.name)
        self.max_record_bytes = settings.max_record_bytes
        self.group_id = f"{settings.topic_prefix}.participant.{participant.name}"
        self.source = f"participant:{participant.name}"
        self.max_batch = settings.max_batch_records
        self.concurrency = settings.concurrency
        self.dsn = settings.postgres_dsn.get_secret_value()
        self.codec = AvroCodec()
        common = settings.kafka_common()
        session_ms = session_timeout_ms(settings.session_timeout_ms, AdminClient(common))
        self.consumer = Consumer(
            {
                **common,
                "group.id": self.group_id,
                "client.id": f"sagaline-participant-{participant.name}",
                # EOS 17: never act on tasks of an orchestrator transaction that aborted.
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": session_ms,
                "heartbeat.interval.ms": heartbeat_interval_ms(session_ms),
            }
        )
        self.producer = Producer(
            {
                **common,
                "client.id": f"sagaline-participant-{participant.name}",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "partitioner": "murmur2_random",  # EOS 15: same partition as a Java producer
            }
        )
        self.pool = _ConnectionPool(self.dsn)
        self.executor = ThreadPoolExecutor(
            self.concurrency, thread_name_prefix=f"participant-{participant.name}"
        )
        self._delivery_errors: list[str] = []
        self._errors_lock = threading.Lock()
        self._stop = threading.Event()

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S) as conn:
            ensure_schema(conn, self.participant)
        self.consumer.subscribe([self.task_topic])
        log.info(
            "participant started participant=%s topic=%s group=%s concurrency=%d activities=%s",
            self.participant.name,
            self.task_topic,
            self.group_id,
            self.concurrency,
            ",".join(self.participant.activities),
        )
        while not stop.is_set():
            messages = poll_batch(self.consumer, self.max_batch, 0.1)
            if messages:
                self._process(messages)
        log.info("participant stopping participant=%s", self.participant.name)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.consumer.close()  # EOS 19: leave the group now rather than after the timeout
        remaining = self.producer.flush(_CLOSE_FLUSH_S)
        if remaining:
            log.warning(
                "participant=%s closed with %d unacknowledged records",
                self.participant.name,
                remaining,
            )
        self.pool.close()

    # --- one batch ---------------------------------------------------------------------

    def _process(self, messages: list[Message]) -> None:
        next_offsets: dict[tuple[str, int], int] = {}
        tasks: list[ActivityTask] = []
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                log.warning("consumer error participant=%s error=%s", self.participant.name, error)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            next_offsets[(topic, partition)] = offset + 1
            try:
                tasks.append(self.codec.decode_task(msg.value()))
            except RecordDecodeError as exc:
                self._dead_letter(msg, exc)
        abandoned = 0
        for future in as_completed([self.executor.submit(self._handle, t) for t in tasks]):
            result = future.result()
            if result is None:
                abandoned += 1
                continue
            self._produce(self.topics.inbox, result.workflow_id.encode(), self._encode(result))
        if abandoned:
            # Stopping while the database is unreachable: leave the offsets uncommitted so
            # these tasks are delivered again, to this participant or its successor.
            log.warning(
                "batch abandoned participant=%s unanswered=%d", self.participant.name, abandoned
            )
            self.producer.flush()
            return
        if next_offsets:
            self._commit(next_offsets)

    def _encode(self, result: ActivityResult) -> bytes:
        """The inbox record for ``result``; a result too large for Kafka becomes a failure.

        The substitution is derived from the stored outcome, so every redelivery of the
        task publishes the same record.
        """
        data = self.codec.encode_inbox(result)
        if len(data) <= self.max_record_bytes:
            return data
        log.error(
            "result too large participant=%s activity_id=%s bytes=%d limit=%d",
            self.participant.name,
            result.activity_id,
            len(data),
            self.max_record_bytes,
        )
        failure = Failure(
            "ResultTooLarge",
            f"activity {result.activity_id} returned a result of {len(data)} bytes, above "
            f"the limit of {self.max_record_bytes}; return a reference instead of the data",
        )
        smaller = dataclasses.replace(
            result, status=ActivityStatus.FAILED, result=None, failure=failure
        )
        return self.codec.encode_inbox(smaller)

    def _handle(self, task: ActivityTask) -> ActivityResult | None:
        """Answer one task; None if stopping before the inbox could be reached."""
        started = time.perf_counter()
        retries = 0
        while True:
            try:
                with self.pool.connection() as conn:
                    execution = execute_task(conn, self.participant, task)
                break
            except Exception as exc:
                # The handler's own errors are outcomes already; this is the inbox's SQL
                # failing (connection lost, server restarting). Reporting a failure here
                # could be wrong: a failed COMMIT may have committed, and the orchestrator
                # would retry under a new activity id. So retry: execute_task's lock and
                # lookup then tell whether the attempt took effect.
                delay = _DB_RETRY_DELAYS_S[min(retries, len(_DB_RETRY_DELAYS_S) - 1)]
                retries += 1
                log.warning(
                    "idempotency inbox failed participant=%s activity_id=%s retry=%d "
                    "error_type=%s error=%s",
                    self.participant.name,
                    task.activity_id,
                    retries,
                    type(exc).__name__,
                    exc,
                )
                if self._stop.wait(delay):
                    return None
        elapsed = time.perf_counter() - started
        label = self.participant.metric_label(task.activity)
        outcome = execution.outcome.status.value.lower()
        metrics.ACTIVITY_ATTEMPTS.labels(label, outcome).inc()
        metrics.ACTIVITY_SECONDS.labels(label, outcome).observe(elapsed)
        failure = execution.outcome.failure
        log.info(
            "activity handled participant=%s activity=%s activity_id=%s attempt=%d "
            "outcome=%s error_type=%s duplicate=%s ms=%.1f",
            self.participant.name,
            task.activity,
            task.activity_id,
            task.attempt,
            outcome,
            "" if failure is None else failure.error_type,
            str(execution.duplicate).lower(),
            elapsed * 1000,
        )
        return execution.outcome.result_for(task)

    def _dead_letter(self, msg: Message, exc: RecordDecodeError) -> None:
        letter = dead_letter(
            msg,
            reason=exc.reason,
            error=str(exc),
            source=self.source,
            max_record_bytes=self.max_record_bytes,
        )
        headers: list[tuple[str, str | bytes | None]] = [*letter.headers]
        self._produce(self.topics.dlq, letter.key, letter.value, headers)
        metrics.DEAD_LETTERS.labels(self.source, exc.reason).inc()
        log.warning(
            "dead letter participant=%s reason=%s topic=%s partition=%d offset=%d",
            self.participant.name,
            exc.reason,
            msg.topic(),
            msg.partition(),
            msg.offset(),
        )

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> None:
        while True:
            try:
                self.producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery
                )
                return
            except BufferError:  # local queue full: let deliveries drain
                self.producer.poll(0.1)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        # EOS 8: never raise from a delivery callback; record and check after flush.
        if err is not None:
            with self._errors_lock:
                self._delivery_errors.append(f"{msg.topic()}: {err}")

    def _commit(self, next_offsets: dict[tuple[str, int], int]) -> None:
        remaining = self.producer.flush()
        with self._errors_lock:
            errors, self._delivery_errors = self._delivery_errors, []
        if errors or remaining:
            raise ResultDeliveryError(
                f"participant {self.participant.name}: {len(errors)} record(s) failed and "
                f"{remaining} unacknowledged ({'; '.join(errors[:3])}); offsets not "
                "committed, restart to have the tasks redelivered"
            )
        offsets = [
            TopicPartition(topic, partition, offset)
            for (topic, partition), offset in sorted(next_offsets.items())
        ]
        try:
            committed = self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Usually a rebalance: the new owner gets these tasks again and the inbox
            # answers them, so losing this commit costs only duplicate work.
            log.warning("offset commit failed participant=%s error=%s", self.participant.name, exc)
            return
        for tp in committed or ():
            if tp.error is not None:
                log.warning(
                    "offset commit failed participant=%s partition=%d error=%s",
                    self.participant.name,
                    tp.partition,
                    tp.error,
                )


def run_participant(
    participant: Participant, settings: ParticipantSettings, stop: threading.Event
) -> None:
    """Serve ``participant``'s tasks until ``stop`` is set; blocks the calling thread.

    Creates the idempotency table and the participant's tables first. Returns after the
    batch in progress is published and committed, with the consumer closed.

    Raises:
        ResultDeliveryError: Kafka did not acknowledge a result; the process should exit
            non-zero (offsets were not committed, so nothing is lost).
        confluent_kafka.KafkaException: a fatal client error.
        psycopg.Error: the schema could not be created at startup.

    Example::

        stop = threading.Event()
        run_participant(payment, ParticipantSettings(), stop)  # until stop.set()
    """
    loop = _ParticipantLoop(participant, settings)
    try:
        loop.run(stop)
    finally:
        loop.close()
