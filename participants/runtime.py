"""The participant process: consume tasks, run them through the idempotency inbox, publish results.

Invariant: a task's offset is committed only after its outcome is durable (committed in
PostgreSQL when it must be remembered) and its result (or dead letter) is acknowledged by
Kafka with ``acks=all``. A crash anywhere before the commit makes Kafka redeliver the task,
and the idempotency inbox answers it without repeating its effects: at-least-once delivery
plus the inbox gives exactly-once effects. Rules referenced as "EOS n" are in
shared/KAFKA_EOS.md.

A handler's exceptions, and outcomes PostgreSQL refuses, become failed results. Only
connection-level database errors (PostgreSQL down, restarting, failing over) are retried in
place, with backoff until the database answers, because a failed COMMIT may still have
committed.

Replicas of a participant share one consumer group with cooperative-sticky assignment and
static membership (``group.instance.id`` = ``SAGALINE_INSTANCE_ID``): a rebalance moves
only the partitions that change owner, so live replicas keep working while a dead one's
partitions wait out its session (by default the shortest the broker allows) and move.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Final

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from psycopg_pool import ConnectionPool

from orchestrator import metrics
from orchestrator.errors import FatalKafkaError, RecordDecodeError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.failures import describe, safe_text
from orchestrator.protocol.records import ActivityResult, ActivityTask
from orchestrator.settings import ParticipantSettings
from orchestrator.transport import (
    heartbeat_interval_ms,
    poll_batch,
    producer_message_max_bytes,
    session_timeout_ms,
)
from participants.delivery import Publisher, ResultDeliveryError
from participants.idempotency import ensure_schema, execute_task, is_connection_level
from participants.participant import Participant

__all__ = ["ResultDeliveryError", "consumer_config", "producer_config", "run_participant"]

log = logging.getLogger(__name__)
_CLOSE_FLUSH_S: Final = 10.0
_POLL_WAIT_S: Final = 0.1
_COMMIT_RETRY_S: Final = 1.0
_DB_RETRY_DELAYS_S: Final = (0.1, 0.5, 1.0, 2.0, 5.0)
_Offsets = dict[tuple[str, int], int]


class _IdleCheck:
    """The pool's health check, paid only by connections that sat idle.

    A connection in steady use has just proved itself; checking it on every checkout would
    cost a round trip per task. One idle for longer than ``IDLE_CHECK_S`` (the server may
    have restarted, a proxy may have dropped it) is pinged before it is handed out, and
    replaced if that fails. A connection that fails in use is retried in place anyway.
    """

    IDLE_CHECK_S: Final = 5.0

    def __init__(self) -> None:
        self._returned: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = (
            weakref.WeakKeyDictionary()
        )

    def used(self, conn: psycopg.Connection[Any]) -> None:
        """Remember that ``conn`` just worked (call before returning it to the pool)."""
        self._returned[conn] = time.monotonic()

    def check(self, conn: psycopg.Connection[Any]) -> None:
        """Pool ``check`` callback: ping a connection that sat idle; raise if it is dead."""
        if time.monotonic() - self._returned.get(conn, 0.0) > self.IDLE_CHECK_S:
            ConnectionPool.check_connection(conn)


def group_id(settings: ParticipantSettings, participant: str) -> str:
    """The consumer group every replica of ``participant`` joins."""
    return f"{settings.topic_prefix}.participant.{participant}"


def consumer_config(
    settings: ParticipantSettings, participant: str, session_ms: int
) -> dict[str, Any]:
    """librdkafka settings of a participant's task consumer."""
    return {
        **settings.kafka_common(),
        "group.id": group_id(settings, participant),
        "client.id": f"sagaline-participant-{participant}",
        # Static membership: a restart under the same id gets its partitions back without
        # a rebalance. Unique per replica within the group; each participant has its own
        # group, so all participants of one process share the process's id.
        "group.instance.id": settings.instance_id,
        # A rebalance moves only partitions that change owner: the others keep being
        # served while a dead replica's session expires (EOS 13, EOS 25).
        "partition.assignment.strategy": "cooperative-sticky",
        # EOS 17: never act on tasks of an orchestrator transaction that aborted.
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": session_ms,
        "heartbeat.interval.ms": heartbeat_interval_ms(session_ms),
    }


def producer_config(settings: ParticipantSettings, participant: str) -> dict[str, Any]:
    """librdkafka settings of a participant's result producer."""
    return {
        **settings.kafka_common(),
        "client.id": f"sagaline-participant-{participant}",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "partitioner": "murmur2_random",  # EOS 15: same partition as a Java producer
        # The size rule is ours (record_size against max_record_bytes); never let the
        # client refuse first with a smaller default.
        "message.max.bytes": producer_message_max_bytes(settings.max_record_bytes),
    }


def _partitions(partitions: list[TopicPartition]) -> str:
    return ",".join(str(tp.partition) for tp in sorted(partitions, key=lambda tp: tp.partition))


class _ParticipantLoop:
    """One participant's consumer, producer, worker threads and database connections."""

    def __init__(self, participant: Participant, settings: ParticipantSettings) -> None:
        self.participant = participant
        self.name = participant.name
        self.instance_id = settings.instance_id
        self.task_topic = settings.topics.tasks(participant.name)
        self.group_id = group_id(settings, participant.name)
        self.max_batch = settings.max_batch_records
        self.concurrency = settings.concurrency
        self.db_timeout_s = settings.db_connect_timeout_s
        self.codec = AvroCodec()
        self.session_ms = session_timeout_ms(
            settings.session_timeout_ms, AdminClient(settings.kafka_common())
        )
        self.consumer = Consumer(consumer_config(settings, participant.name, self.session_ms))
        self.publisher = Publisher(
            Producer(producer_config(settings, participant.name)),
            participant=participant.name,
            topics=settings.topics,
            codec=self.codec,
            max_record_bytes=settings.max_record_bytes,
        )
        # psycopg_pool logs every checkout at INFO: one line per task, twice.
        pool_log = logging.getLogger("psycopg.pool")
        if pool_log.level == logging.NOTSET:
            pool_log.setLevel(logging.WARNING)
        self._idle_check = _IdleCheck()
        self.pool: ConnectionPool[Any] = ConnectionPool(
            settings.postgres_dsn.get_secret_value(),
            # One connection per worker thread: a task never waits for another's.
            min_size=settings.concurrency,
            max_size=settings.concurrency,
            # Autocommit, so that conn.transaction() in the inbox is the whole transaction.
            kwargs={
                "autocommit": True,
                "connect_timeout": max(2, math.ceil(settings.db_connect_timeout_s)),
            },
            # No reset callback: with one, psycopg_pool returns every connection through
            # a worker thread, two thread hops per task.
            check=self._idle_check.check,
            timeout=settings.db_connect_timeout_s,
            name=f"participant-{participant.name}",
            open=False,
        )
        self.executor = ThreadPoolExecutor(
            self.concurrency, thread_name_prefix=f"participant-{participant.name}"
        )
        # Offsets whose results Kafka acknowledged but the group has not committed yet: a
        # commit failing during a rebalance is tried again rather than forgotten.
        self._uncommitted: _Offsets = {}
        self._commit_retry_at = 0.0
        self._stop = threading.Event()
        self._closing = threading.Event()

    # --- lifecycle ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self.pool.open(wait=False)
        with self.pool.connection(timeout=self.db_timeout_s) as conn:
            ensure_schema(conn, self.participant)
        self.consumer.subscribe(
            [self.task_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "participant started participant=%s topic=%s group=%s instance=%s session_ms=%d "
            "concurrency=%d activities=%s",
            self.name,
            self.task_topic,
            self.group_id,
            self.instance_id,
            self.session_ms,
            self.concurrency,
            ",".join(self.participant.activities),
        )
        while not stop.is_set():
            messages = poll_batch(self.consumer, self.max_batch, _POLL_WAIT_S)
            if messages:
                self._process(messages)
            elif self._uncommitted and time.monotonic() >= self._commit_retry_at:
                self._commit()
        log.info("participant stopping participant=%s", self.name)

    def close(self) -> None:
        self._closing.set()  # tasks retrying the database give up; their offsets stay
        self.executor.shutdown(wait=True, cancel_futures=True)
        try:
            # EOS 19. A static member does not leave the group here: its partitions wait
            # for it to come back under the same id, or for its session to expire.
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close failed participant=%s error=%s", self.name, exc)
        remaining = self.publisher.close(_CLOSE_FLUSH_S)
        if remaining:
            log.warning(
                "participant=%s closed with %d unacknowledged records", self.name, remaining
            )
        self.pool.close()

    # --- group membership ----------------------------------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Cooperative assignment: when this callback does not call incremental_assign(),
        # confluent-kafka does it (checked against the broker), and offsets come from the
        # group, so there is nothing to prepare.
        if partitions:
            log.info(
                "partitions assigned participant=%s partitions=%s",
                self.name,
                _partitions(partitions),
            )

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Still ours until this returns: commit what Kafka acknowledged for them, so the
        # next owner does not repeat it. Must not raise (it would re-raise from poll).
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        try:
            self._commit(only=revoked)
        except Exception as exc:  # e.g. the consumer closing: only duplicate work is at stake
            log.warning("commit on revoke failed participant=%s error=%s", self.name, exc)
        for key in revoked:
            self._uncommitted.pop(key, None)
        if partitions:
            log.info(
                "partitions revoked participant=%s partitions=%s",
                self.name,
                _partitions(partitions),
            )

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Already another member's: a commit now could move its offsets. Its owner
        # repeats those tasks and the inbox answers them.
        for tp in partitions:
            self._uncommitted.pop((tp.topic, tp.partition), None)
        log.warning(
            "partitions lost participant=%s partitions=%s", self.name, _partitions(partitions)
        )

    def _consumer_error(self, error: KafkaError) -> None:
        # librdkafka raises one fatal consumer error: a static member fenced by another
        # with the same group.instance.id (FENCED_INSTANCE_ID).
        if error.code() != KafkaError._FATAL and not error.fatal():
            log.warning("consumer error participant=%s error=%s", self.name, error)
            return
        detail = safe_text(error.str(), 500)
        if "fenced" in detail.lower():
            message = (
                f"participant {self.name} stopped: another live process joined group "
                f"{self.group_id} with the same SAGALINE_INSTANCE_ID={self.instance_id}; "
                "give every replica its own SAGALINE_INSTANCE_ID (Kafka: FENCED_INSTANCE_ID)"
            )
        else:
            message = f"participant {self.name} stopped: fatal consumer error ({detail})"
        log.error("%s", message)
        raise FatalKafkaError(message)

    # --- one batch -----------------------------------------------------------------------

    def _process(self, messages: list[Message]) -> None:
        next_offsets: _Offsets = {}
        work: list[tuple[ActivityTask, int, int]] = []
        for msg in messages:
            error = msg.error()
            if error is not None:
                self._consumer_error(error)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            next_offsets[(topic, partition)] = offset + 1
            try:
                work.append((self.codec.decode_task(msg.value()), partition, offset))
            except RecordDecodeError as exc:
                self.publisher.send_dead_letter(msg, reason=exc.reason, error=str(exc))
                log.warning(
                    "dead letter participant=%s reason=%s partition=%d offset=%d",
                    self.name,
                    exc.reason,
                    partition,
                    offset,
                )
        futures = [self.executor.submit(self._handle, *item) for item in work]
        abandoned = 0
        for future in as_completed(futures):
            result = future.result()
            if result is None:
                abandoned += 1
            else:
                self.publisher.send_result(result)
        if abandoned:
            # Stopping while the database is unreachable: leave the offsets uncommitted so
            # these tasks are delivered again, to this participant or its successor.
            log.warning("batch abandoned participant=%s unanswered=%d", self.name, abandoned)
            return
        if not self.publisher.confirm(self._stop):
            log.warning("stopping with results unacknowledged participant=%s", self.name)
            return
        for key, offset in next_offsets.items():
            self._uncommitted[key] = max(offset, self._uncommitted.get(key, 0))
        self._commit()

    def _handle(self, task: ActivityTask, partition: int, offset: int) -> ActivityResult | None:
        """Answer one task; None if stopping before the inbox could be reached."""
        started = time.perf_counter()
        retries = 0
        while True:
            try:
                with self.pool.connection() as conn:
                    execution = execute_task(conn, self.participant, task)
                    self._idle_check.used(conn)
                break
            except Exception as exc:
                # Everything the task causes is an outcome already; what is left is the
                # database being unreachable. Reporting a failure could be wrong (a failed
                # COMMIT may have committed, and the orchestrator would retry under a new
                # activity id), so retry: the inbox's lock and lookup tell what took effect.
                if not is_connection_level(exc):
                    raise
                retries += 1
                log.warning(
                    "idempotency inbox unreachable participant=%s activity_id=%s retry=%d error=%s",
                    self.name,
                    task.activity_id,
                    retries,
                    describe(exc),
                )
                if self._halted(_DB_RETRY_DELAYS_S[min(retries, len(_DB_RETRY_DELAYS_S)) - 1]):
                    return None
        elapsed = time.perf_counter() - started
        label = self.participant.metric_label(task.activity)
        outcome = execution.outcome.status.value.lower()
        metrics.ACTIVITY_ATTEMPTS.labels(label, outcome).inc()
        metrics.ACTIVITY_SECONDS.labels(label, outcome).observe(elapsed)
        failure = execution.outcome.failure
        log.info(
            "activity handled participant=%s activity=%s activity_id=%s attempt=%d "
            "partition=%d offset=%d outcome=%s error_type=%s duplicate=%s ms=%.1f",
            self.name,
            safe_text(task.activity, 200),
            safe_text(task.activity_id, 300),
            task.attempt,
            partition,
            offset,
            outcome,
            "" if failure is None else failure.error_type,
            str(execution.duplicate).lower(),
            elapsed * 1000,
        )
        return execution.outcome.result_for(task)

    def _halted(self, delay_s: float) -> bool:
        """Wait ``delay_s`` unless stopping; True when stopping."""
        deadline = time.monotonic() + delay_s
        while not (self._stop.is_set() or self._closing.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # Two events to watch; a short wait on one keeps the other's latency low.
            self._closing.wait(min(left, 0.1))
        return True

    def _commit(self, only: set[tuple[str, int]] | None = None) -> None:
        pending = {k: v for k, v in self._uncommitted.items() if only is None or k in only}
        if not pending:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in sorted(pending.items())]
        try:
            committed = self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Typically a rebalance under way. The offsets stay pending: committed by the
            # next attempt, or dropped if their partitions move (then the new owner repeats
            # those tasks and the inbox answers them).
            log.warning("offset commit failed participant=%s error=%s", self.name, exc)
            self._commit_retry_at = time.monotonic() + _COMMIT_RETRY_S
            return
        for tp in committed or ():
            key = (tp.topic, tp.partition)
            if tp.error is not None:
                log.warning(
                    "offset commit failed participant=%s partition=%d error=%s",
                    self.name,
                    tp.partition,
                    tp.error,
                )
                self._commit_retry_at = time.monotonic() + _COMMIT_RETRY_S
            elif self._uncommitted.get(key) == pending.get(key):
                del self._uncommitted[key]


def run_participant(
    participant: Participant, settings: ParticipantSettings, stop: threading.Event
) -> None:
    """Serve ``participant``'s tasks until ``stop`` is set; blocks the calling thread.

    Creates the idempotency table and the participant's tables first. Returns after the
    batch in progress is published and committed, with the consumer closed.

    Raises:
        ResultDeliveryError: Kafka refused a record that no substitute could answer for,
            or the producer failed for good; the process should exit non-zero (offsets
            were not committed, so nothing is lost).
        FatalKafkaError: the consumer was fenced by another process with the same
            ``SAGALINE_INSTANCE_ID``.
        InboxUnavailableError: the idempotency table refuses writes (dropped, privileges).
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
