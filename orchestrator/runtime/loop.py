"""The orchestrator's read-process-write loop: one Kafka transaction per batch.

Invariant: a workflow's state changes only inside a committed transaction that also
commits the inbox offsets of the inputs that caused the change. Staged changes are
promoted to memory after the commit and dropped on abort, when the consumer is rewound to
the last committed offsets. Rules referenced as "EOS n" are in shared/KAFKA_EOS.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from orchestrator import metrics
from orchestrator.admin import check_copartitioned
from orchestrator.errors import (
    FatalKafkaError,
    RecordDecodeError,
    UnknownWorkflowTypeError,
)
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.partitioning import partition_for
from orchestrator.protocol.records import ActivityTask, Failure, StartWorkflow, WorkflowStatus
from orchestrator.replay.engine import Limits, Transition, advance, fail
from orchestrator.runtime.restore import restore_partitions
from orchestrator.runtime.state import WorkflowStore
from orchestrator.settings import OrchestratorSettings
from orchestrator.transport import (
    DeadLetter,
    dead_letter,
    heartbeat_interval_ms,
    poll_batch,
    session_timeout_ms,
)
from orchestrator.workflow import WorkflowRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")
_RETRIES = 10


class _Abortable(Exception):  # noqa: N818 - internal control flow, never escapes the loop
    """The open transaction must be aborted and the batch retried."""


@dataclass(slots=True)
class _Batch:
    """Inputs consumed since the last commit, and what they produced."""

    opened: float = field(default_factory=time.monotonic)
    inputs: int = 0
    offsets: dict[int, int] = field(default_factory=dict)
    transitions: list[tuple[StartWorkflow | None, Transition]] = field(default_factory=list)
    dead_letters: int = 0
    ignored: list[str] = field(default_factory=list)


class Orchestrator:
    """Runs the workflows of a registry against the inbox and history topics.

    Example::

        Orchestrator(OrchestratorSettings(), registry).run(stop_event)
    """

    def __init__(
        self,
        settings: OrchestratorSettings,
        registry: WorkflowRegistry,
        codec: AvroCodec | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.codec = codec or AvroCodec(max_record_bytes=settings.max_record_bytes)
        self.topics = settings.topics
        self.limits = Limits(max_events=settings.max_history_events)
        self.store = WorkflowStore()
        self._batch = _Batch()
        self._in_txn = False
        self._to_restore: list[int] = []
        self._committed: dict[int, int] = {}
        self._callback_error: BaseException | None = None
        self._idle = True
        self._partition_count = 0
        common = settings.kafka_common()
        admin = AdminClient(common)
        session_ms = session_timeout_ms(settings.session_timeout_ms, admin)
        self._max_message_bytes = max(1_000_000, settings.max_record_bytes + 65_536)
        self.consumer = Consumer(
            {
                **common,
                "group.id": settings.consumer_group,
                "group.instance.id": settings.instance_id,
                "client.id": f"sagaline-orchestrator-{settings.instance_id}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                # Eager range assignment keeps every rebalance a full revoke/assign (EOS 13).
                "partition.assignment.strategy": "range",
                "session.timeout.ms": session_ms,
                "heartbeat.interval.ms": heartbeat_interval_ms(session_ms),
            }
        )
        self.restorer = Consumer(
            {
                **common,
                "group.id": f"{settings.consumer_group}.restore",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "client.id": f"sagaline-restore-{settings.instance_id}",
            }
        )
        self.producer = Producer(
            {
                **common,
                "transactional.id": settings.transactional_id,
                "transaction.timeout.ms": settings.transaction_timeout_ms,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 1,
                # The CONCURRENT_TRANSACTIONS back-off dominates latency at librdkafka's
                # defaults (EOS 20).
                "retry.backoff.ms": 5,
                "retry.backoff.max.ms": 20,
                "partitioner": "murmur2_random",
                # Room for a maximal record plus headers and batch overhead.
                "message.max.bytes": self._max_message_bytes,
                "client.id": f"sagaline-orchestrator-{settings.instance_id}",
            }
        )
        self.admin = admin

    # --- lifecycle --------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Process the inbox until ``stop`` is set.

        Raises:
            FatalKafkaError: fenced or fatal Kafka error; nothing uncommitted is kept.
        """
        partitions = check_copartitioned(self.admin, self.topics)
        self._partition_count = partitions
        log.info(
            "orchestrator instance=%s transactional_id=%s partitions=%d types=%s",
            self.settings.instance_id,
            self.settings.transactional_id,
            partitions,
            ",".join(sorted(self.registry.names())),
        )
        # Fences a previous incarnation of this instance and aborts its open transaction.
        self._kafka(lambda: self.producer.init_transactions(30))
        self.consumer.subscribe(
            [self.topics.inbox],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            while not stop.is_set():
                self._restore_assigned()
                self._poll_once()
                if self._batch_due():
                    self._commit_batch()
            self._commit_batch()
        finally:
            self._close()

    def _close(self) -> None:
        try:
            if self._in_txn:
                self.producer.abort_transaction(10)
        except KafkaException as exc:
            log.warning("abort at shutdown failed: %s", exc)
        # Nothing left to commit when close() fires the revoke callback.
        self._in_txn = False
        self._batch = _Batch()
        self.store.discard_staged()
        self.consumer.close()
        self.restorer.close()
        self.producer.flush(10)

    # --- rebalancing (EOS 7, 9) ---------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            consumer.assign(partitions)
            # Nothing is consumed from a partition until its history is restored.
            consumer.pause(partitions)
            self._to_restore.extend(tp.partition for tp in partitions)
            log.info("assigned partitions=%s", [tp.partition for tp in partitions])
        except BaseException as exc:
            self._callback_error = exc

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            # A transaction spans all partitions: commit it before giving any away.
            self._commit_batch()
        except BaseException as exc:
            self._callback_error = exc
        self._forget([tp.partition for tp in partitions], "revoked")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            # Nothing to rewind: the partitions are gone, their new owner reads from the
            # committed offsets.
            self._abort("partitions-lost", rewind=False)
        except BaseException as exc:
            self._callback_error = exc
        self._forget([tp.partition for tp in partitions], "lost")

    def _forget(self, partitions: list[int], why: str) -> None:
        self.store.drop(partitions)
        for partition in partitions:
            self._committed.pop(partition, None)
            metrics.WORKFLOWS_IN_FLIGHT.labels(str(partition)).set(0)
        self._to_restore = [p for p in self._to_restore if p not in partitions]
        log.info("%s partitions=%s", why, partitions)

    def _restore_assigned(self) -> None:
        if self._to_restore:
            # A restore can wait out a dead writer's transaction: close ours first so it
            # cannot time out meanwhile.
            self._commit_batch()
        if not self._to_restore:
            return
        partitions, self._to_restore = sorted(set(self._to_restore)), []
        inbox = [TopicPartition(self.topics.inbox, p) for p in partitions]
        # Committed offsets first: read_committed waits for a previous owner's pending
        # transactional offsets (EOS 11), and once those are resolved its history records
        # are in the log too, so the restore target below cannot miss them.
        for tp in self.consumer.committed(inbox, timeout=30):
            self._committed[tp.partition] = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
        states = restore_partitions(
            self.restorer,
            self.admin,
            self.codec,
            self.topics.history,
            partitions,
            deadline_s=max(60.0, 4 * self.settings.transaction_timeout_ms / 1000),
        )
        for state in states.values():
            self.store.install(state)
        self.consumer.resume(inbox)

    # --- processing ---------------------------------------------------------------------

    def _poll_once(self) -> None:
        room = max(1, self.settings.max_batch_records - self._batch.inputs)
        messages = poll_batch(self.consumer, room, self._poll_timeout())
        self._idle = not messages
        if self._callback_error is not None:
            failed, self._callback_error = self._callback_error, None
            raise FatalKafkaError(f"rebalance callback failed: {failed!r}") from failed
        now_ms = int(time.time() * 1000)
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.fatal():
                    raise FatalKafkaError(f"consumer: {error}")
                log.warning("consumer error: %s", error)
                continue
            self._process(msg, now_ms)

    def _poll_timeout(self) -> float:
        if self._batch.inputs == 0:
            return 0.1
        # Inputs are waiting to be committed: only take what has already arrived.
        return 0.0

    def _batch_due(self) -> bool:
        batch = self._batch
        if batch.inputs == 0:
            return False
        # Commit once nothing more is waiting (low latency when idle; batches grow by
        # themselves under load), when the batch is full, or when it has been open too long.
        return (
            self._idle
            or batch.inputs >= self.settings.max_batch_records
            or time.monotonic() - batch.opened >= self.settings.commit_interval_ms / 1000
        )

    def _process(self, msg: Message, now_ms: int) -> None:
        partition = _partition(msg)
        if not self.store.owns(partition):
            # A fetch that raced a revoke; the new owner will read it again.
            return
        if self._batch.inputs == 0:
            self._batch.opened = time.monotonic()
        self._batch.inputs += 1
        self._batch.offsets[partition] = int(msg.offset() or 0) + 1
        try:
            body = self.codec.decode_inbox(msg.value())
        except RecordDecodeError as exc:
            self._reject(msg, exc.reason, str(exc))
            return
        key = msg.key()
        if key is not None and partition != partition_for(key, self._partition_count):
            self._reject(
                msg,
                "wrong-partition",
                f"workflow {body.workflow_id!r} arrived on partition {partition}, but Kafka's "
                f"default (murmur2) partitioner puts its key on "
                f"{partition_for(key, self._partition_count)}; produce with murmur2",
            )
            return
        if key is None or key.decode(errors="replace") != body.workflow_id:
            self._reject(
                msg,
                "key-mismatch",
                f"record key {key!r} is not the workflow id {body.workflow_id!r}; "
                "inputs must be keyed by workflow id to reach the owning partition",
            )
            return
        if self.store.quarantined(partition, body.workflow_id):
            self._reject(
                msg,
                "quarantined-workflow",
                f"the history record of {body.workflow_id!r} could not be read at restore",
            )
            return
        current = self.store.get(partition, body.workflow_id)
        try:
            transition = advance(current, body, now_ms, self.registry, self.limits)
        except UnknownWorkflowTypeError as exc:
            self._reject(msg, exc.reason, str(exc))
            return
        except Exception as exc:
            # A poison input must not crash-loop the partition (EOS 16): its effects are
            # dropped (nothing was staged) and the input is parked with the reason.
            log.exception(
                "engine failed workflow=%s partition=%d offset=%d",
                body.workflow_id,
                partition,
                msg.offset(),
            )
            self._reject(msg, "engine-error", f"{type(exc).__name__}: {exc}")
            return
        if transition.ignored is not None:
            if transition.ignored == "unknown-workflow":
                self._reject(
                    msg,
                    "unknown-workflow",
                    f"no workflow {body.workflow_id!r} in partition {partition}",
                )
            else:
                self._batch.ignored.append(transition.ignored)
            return
        record = transition.record
        assert record is not None
        encoded = self.codec.encode_workflow(record)
        tasks = [(t, self.codec.encode_task(t)) for t in transition.tasks]
        largest = max([len(encoded), *(len(data) for _, data in tasks)])
        if largest > self.settings.max_record_bytes:
            # Kafka would refuse the write and the whole batch with it: end the workflow
            # at its last good state instead.
            detail = (
                f"workflow {body.workflow_id}: a record of {largest} bytes exceeds "
                f"max_record_bytes ({self.settings.max_record_bytes})"
            )
            if current is None:
                self._reject(msg, "oversized", detail)
                return
            record = fail(current, now_ms, Failure("RecordTooLarge", detail))
            transition = Transition(record)
            encoded, tasks = self.codec.encode_workflow(record), []
        self._begin()
        for task, data in tasks:
            self._produce(self.topics.tasks(task.participant), task.workflow_id.encode(), data)
        self.store.stage(partition, record, encoded)
        start = body if isinstance(body, StartWorkflow) else None
        self._batch.transitions.append((start, transition))

    def _reject(self, msg: Message, reason: str, error: str) -> None:
        log.warning(
            "dead letter reason=%s partition=%d offset=%d error=%s",
            reason,
            msg.partition(),
            msg.offset(),
            error,
        )
        letter: DeadLetter = dead_letter(
            msg,
            reason=reason,
            error=error,
            source="orchestrator",
            max_record_bytes=self._max_message_bytes - 65_536,
        )
        self._begin()
        self._produce(self.topics.dlq, letter.key, letter.value, letter.headers)
        self._batch.dead_letters += 1
        metrics.DEAD_LETTERS.labels("orchestrator", reason).inc()

    # --- transactions (EOS 1-6) ---------------------------------------------------------

    def _begin(self) -> None:
        if not self._in_txn:
            self._kafka(self.producer.begin_transaction)
            self._in_txn = True

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]] | None = None,
        partition: int | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"key": key, "value": value}
        if headers:
            kwargs["headers"] = headers
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self.producer.produce(topic, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _commit_batch(self) -> None:
        batch = self._batch
        if batch.inputs == 0 and not self._in_txn:
            return
        started = time.monotonic()
        try:
            self._begin()
            for partition, record, encoded in self.store.staged():
                # Explicit partition: history p belongs to whoever owns inbox p.
                self._produce(
                    self.topics.history,
                    record.workflow_id.encode(),
                    encoded,
                    partition=partition,
                )
            offsets = [TopicPartition(self.topics.inbox, p, o) for p, o in batch.offsets.items()]
            if offsets:
                # Retries must repeat identical arguments (EOS 4).
                group = self.consumer.consumer_group_metadata()
                self._kafka(lambda: self.producer.send_offsets_to_transaction(offsets, group, 30))
            self._kafka(lambda: self.producer.commit_transaction(30))
        except _Abortable as exc:
            self._abort(str(exc))
            return
        self._in_txn = False
        metrics.TXN_COMMIT_SECONDS.observe(time.monotonic() - started)
        metrics.BATCH_SIZE.observe(batch.inputs)
        self.store.promote()
        self._committed.update(batch.offsets)
        self._batch = _Batch()
        self._record_metrics(batch)

    def _abort(self, reason: str, *, rewind: bool = True) -> None:
        """Abort the open transaction, drop staged state, rewind to committed offsets."""
        if self._in_txn:
            log.warning("aborting transaction reason=%s", reason)
            metrics.TXN_ABORTS.labels(reason[:60]).inc()
            self._kafka(lambda: self.producer.abort_transaction(30), abortable_ok=False)
            self._in_txn = False
        self.store.discard_staged()
        for partition in self._batch.offsets if rewind else ():
            offset = self._committed.get(partition)
            if offset is not None and self.store.owns(partition):
                self.consumer.seek(TopicPartition(self.topics.inbox, partition, offset))
        self._batch = _Batch()

    def _kafka(self, call: Callable[[], T], *, abortable_ok: bool = True) -> T:
        """Run a producer call with the error rules of EOS 4-6."""
        for attempt in range(_RETRIES):
            try:
                return call()
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.retriable() and attempt < _RETRIES - 1:
                    log.warning("retrying after %s", error)
                    time.sleep(min(0.05 * 2**attempt, 1.0))
                    continue
                if error.txn_requires_abort() and abortable_ok:
                    raise _Abortable(error.name()) from exc
                raise FatalKafkaError(f"{error.name()}: {error.str()}") from exc
        raise AssertionError("unreachable")

    def _record_metrics(self, batch: _Batch) -> None:
        for reason in batch.ignored:
            metrics.INPUTS_IGNORED.labels(reason).inc()
        for start, transition in batch.transitions:
            record = transition.record
            assert record is not None
            wtype = record.workflow_type
            if start is not None:
                metrics.WORKFLOWS_STARTED.labels(wtype).inc()
            for task in transition.tasks:
                metrics.ACTIVITIES_SCHEDULED.labels(_activity_name(task)).inc()
            if record.status is WorkflowStatus.STUCK:
                metrics.WORKFLOWS_STUCK.labels(wtype).inc()
            elif record.status.terminal and record.closed_at_ms is not None:
                status = record.status.value.lower()
                metrics.WORKFLOWS_CLOSED.labels(wtype, status).inc()
                metrics.WORKFLOW_DURATION.labels(wtype, status).observe(
                    (record.closed_at_ms - record.started_at_ms) / 1000
                )
        for state in self.store.partitions():
            metrics.WORKFLOWS_IN_FLIGHT.labels(str(state.partition)).set(len(state.running))


def _partition(msg: Message) -> int:
    partition = msg.partition()
    assert partition is not None, "consumed messages always have a partition"
    return partition


def _activity_name(task: ActivityTask) -> str:
    return f"{task.participant}.{task.activity}"
