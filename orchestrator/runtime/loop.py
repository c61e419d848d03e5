"""The orchestrator's read-process-write loop: one Kafka transaction per batch.

Invariant: a workflow's state changes only inside a committed transaction that also
commits the inbox offsets of the inputs that caused the change. Staged changes are
promoted to memory after the commit and dropped on abort, when the consumer is rewound to
the last committed offsets. Rules referenced as "EOS n" are in shared/KAFKA_EOS.md.

What one input does is decided in :mod:`orchestrator.runtime.inputs`; this module owns the
clients, the rebalance protocol, restores, and when a transaction commits: when the inbox
is drained, when the batch is full, when it has been open ``commit_interval_ms``, and
always before ``transaction_budget`` of the transaction timeout has passed, however slow
the inputs are.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Final

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
    RecordRejectedError,
    TransactionAbortableError,
)
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.records import WorkflowStatus
from orchestrator.protocol.topics import held_key
from orchestrator.replay.driver import ReplayCache
from orchestrator.runtime.fencing import fence_previous_owners, offset_metadata
from orchestrator.runtime.inputs import Batch, InputProcessor, Ref, RetentionHook
from orchestrator.runtime.local import LocalRunner
from orchestrator.runtime.restore import restore_partitions
from orchestrator.runtime.state import WorkflowStore
from orchestrator.runtime.txn import DeliveryFailure, Transaction
from orchestrator.settings import OrchestratorSettings, transactional_id
from orchestrator.transport import (
    TopicDirectory,
    classify_delivery_error,
    heartbeat_interval_ms,
    poll_batch,
    producer_message_max_bytes,
    session_timeout_ms,
)
from orchestrator.visibility.archive import archive_gate
from orchestrator.workflow import WorkflowRegistry

log = logging.getLogger(__name__)
_SWEEP_INTERVAL_S: Final = 1.0
_SWEEP_LIMIT: Final = 1_000
_REDRIVES_PER_ROUND: Final = 200
# The longest a poll waits for input when nothing is pending.
_IDLE_POLL_S: Final = 0.1
# Restored STUCK workflows decoded per gauge refresh to learn when they were parked.
_DATES_PER_REFRESH: Final = 200
# Gauges of an owned partition, removed when it is given away.
_PARTITION_GAUGES: Final = (
    metrics.WORKFLOWS_IN_FLIGHT,
    metrics.WORKFLOWS_RETAINED,
    metrics.PENDING_WAKES,
    metrics.WORKFLOWS_IN_FLIGHT_STUCK,
    metrics.STUCK_OLDEST_AGE,
    metrics.INBOX_LAG,
)


def inbox_lag(low: int, high: int, committed: int) -> int | None:
    """Inbox records of a partition not processed yet, from its cached watermarks and its
    committed offset (negative: nothing committed yet, so from the low watermark); None
    while the watermarks are unknown (no fetch response yet)."""
    if high < 0:
        return None
    start = committed if committed >= 0 else low
    if start < 0:
        return None
    return max(0, high - start)


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
        *,
        retention_hook: RetentionHook | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        replays = {
            True: metrics.REPLAYS.labels("resumed"),
            False: metrics.REPLAYS.labels("from_start"),
        }
        registry.replay_cache = ReplayCache(
            settings.replay_cache_size, on_replay=lambda resumed: replays[resumed].inc()
        )
        self.codec = codec or AvroCodec(max_record_bytes=settings.max_record_bytes)
        self.topics = settings.topics
        self.store = WorkflowStore(settings.decoded_cache)
        self._batch = Batch(opened=time.monotonic())
        self._carry: list[Message] = []
        self._to_restore: list[int] = []
        self._committed: dict[int, int] = {}
        self._callback_error: BaseException | None = None
        self._idle = True
        self._aborts_in_a_row = 0
        self._next_sweep = 0.0
        self._next_gauges = 0.0
        self._budget_s = settings.transaction_timeout_ms * settings.transaction_budget / 1000
        common = settings.kafka_common()
        self._kafka_config = common
        self.admin = AdminClient(common)
        session_ms = session_timeout_ms(settings.session_timeout_ms, self.admin)
        self._session_ms = session_ms
        self._assigned_at: dict[int, float] = {}
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
                # Partitions an instance keeps stay with it, and it keeps processing them,
                # through every rebalance; only moved partitions are revoked and restored.
                "partition.assignment.strategy": "cooperative-sticky",
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
                "auto.offset.reset": "earliest",
                "max.partition.fetch.bytes": 8 << 20,
                # A restore ends when the position passes the last transaction marker, which
                # only an (empty) fetch reveals: do not let each of those wait 500 ms.
                "fetch.wait.max.ms": 10,
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
                "message.max.bytes": producer_message_max_bytes(settings.max_record_bytes),
                "client.id": f"sagaline-orchestrator-{settings.instance_id}",
            }
        )
        self.txn = Transaction(self.producer)
        self._directory = TopicDirectory(self.admin)
        # Topics whose size limit is below what sagaline batches together: their records
        # are sent one per request (see _abort).
        self._careful: set[str] = set()
        self.processor = InputProcessor(
            codec=self.codec,
            store=self.store,
            topics=self.topics,
            directory=self._directory,
            registry=registry,
            max_events=settings.max_history_events,
            max_record_bytes=settings.max_record_bytes,
            partition_count=0,
            retention_hook=retention_hook or archive_gate(settings),
            local=LocalRunner(
                registry.local_activities,
                timeout_s=settings.local_activity_timeout_s,
                inline=registry.inline_local_activities,
            ),
        )

    # --- lifecycle --------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Process the inbox until ``stop`` is set.

        Raises:
            FatalKafkaError: fenced or fatal Kafka error; nothing uncommitted is kept.
        """
        partitions = check_copartitioned(self.admin, self.topics)
        self.processor.partition_count = partitions
        metrics.INBOX_PARTITIONS.set(partitions)
        metrics.PARTITIONS_OWNED.set(0)
        log.info(
            "orchestrator instance=%s transactional_id=%s partitions=%d session_timeout_ms=%d "
            "types=%s",
            self.settings.instance_id,
            self.settings.transactional_id,
            partitions,
            self._session_ms,
            ",".join(sorted(self.registry.names())),
        )
        # Fences a previous incarnation of this instance and aborts its open transaction.
        self.txn.call(lambda: self.producer.init_transactions(30))
        self.consumer.subscribe(
            [self.topics.inbox],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            while not stop.is_set():
                self._restore_assigned()
                self._redrive_queued()
                self._sweep_retention()
                self._refresh_gauges()
                # Timers first, with a share of the batch of their own: a backlog of inbox
                # input must not hold back the timers, backoffs and timeouts that fall due.
                self._fire_timers()
                self._poll_once()
                self._fire_timers()
                if self._batch_due():
                    self._commit_batch()
            self._commit_batch()
        finally:
            self._close()

    def _close(self) -> None:
        try:
            self.txn.abort()
        except FatalKafkaError as exc:
            log.warning("abort at shutdown failed: %s", exc)
        # Nothing left to commit when close() fires the revoke callback.
        self.txn.open = False
        self._batch = Batch(opened=time.monotonic())
        self._carry = []
        self.store.discard_staged()
        self.consumer.close()
        self.restorer.close()
        self.processor.local.close()
        # Their finally blocks run now, counting for nothing, not at interpreter exit.
        self.registry.replay_cache.clear()
        try:
            self.producer.flush(10)
        except KafkaException as exc:  # a fenced producer refuses even this; nothing is lost
            log.warning("flush at shutdown failed: %s", exc)

    # --- rebalancing (EOS 7, 9, 13) ---------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            consumer.incremental_assign(partitions)
            # Nothing is consumed from a partition until its history is restored.
            consumer.pause(partitions)
            self._to_restore.extend(tp.partition for tp in partitions)
            now = time.monotonic()
            self._assigned_at.update((tp.partition, now) for tp in partitions)
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
        # The lost partitions' new owner reads from the committed offsets; the open
        # transaction also holds inputs of partitions we keep, which are rewound.
        self._forget([tp.partition for tp in partitions], "lost")
        try:
            self._abort("partitions-lost")
        except BaseException as exc:
            self._callback_error = exc

    def _forget(self, partitions: list[int], why: str) -> None:
        if not partitions:
            return
        gone = set(partitions)
        self.store.drop(gone)
        # Their runs' kept coroutines go too (a rare event: the rest are rebuilt by one
        # replay from the start each); a partition that comes back is replayed anew.
        self.registry.replay_cache.clear()
        for partition in gone:
            self._committed.pop(partition, None)
            # Another instance exports this partition now: a series left here would be
            # counted twice in every sum over instances.
            for gauge in _PARTITION_GAUGES:
                metrics.forget(gauge, str(partition))
        metrics.PARTITIONS_OWNED.set(sum(1 for _ in self.store.partitions()))
        self._to_restore = [p for p in self._to_restore if p not in gone]
        self._carry = [m for m in self._carry if m.partition() not in gone]
        queue = self.processor.redrive_queue
        kept = [item for item in queue if item[0] not in gone]
        queue.clear()
        queue.extend(kept)
        log.info("%s partitions=%s", why, sorted(gone))

    def _restore_assigned(self) -> None:
        if self._to_restore:
            # A restore can wait out a dead writer's transaction: close ours first so it
            # cannot time out meanwhile.
            self._commit_batch()
        if not self._to_restore:
            return
        partitions, self._to_restore = sorted(set(self._to_restore)), []
        inbox = [TopicPartition(self.topics.inbox, p) for p in partitions]
        timeout_s = max(30.0, self.settings.transaction_timeout_ms / 1000)
        fence_previous_owners(
            self.admin,
            group=self.settings.consumer_group,
            topic=self.topics.inbox,
            partitions=partitions,
            own_transactional_id=self.settings.transactional_id,
            transactional_id_of=lambda instance: transactional_id(
                self.settings.consumer_group, instance
            ),
            kafka_config=self._kafka_config,
            timeout_s=timeout_s,
        )
        # Committed offsets first: read_committed waits for a previous owner's pending
        # transactional offsets (EOS 11), and once those are resolved its history records
        # are in the log too, so the restore target below cannot miss them.
        for tp in self.consumer.committed(inbox, timeout=timeout_s):
            self._committed[tp.partition] = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
        states = restore_partitions(
            self.restorer,
            self.admin,
            self.codec,
            self.topics.history,
            partitions,
            stall_s=2 * self.settings.transaction_timeout_ms / 1000 + 30,
            timeout_s=timeout_s,
        )
        for state in states.values():
            self.store.install(state)
            # Code deployed since a workflow was parked may now handle it.
            self.processor.queue_resume_all(state.partition)
        # What a restore builds lives as long as the partition: keep the collector from
        # scanning it on every full collection (one took ~120 ms with 20k workflows, a
        # stall for every timer due meanwhile).
        gc.collect()
        gc.freeze()
        self.consumer.resume(inbox)
        metrics.PARTITIONS_OWNED.set(sum(1 for _ in self.store.partitions()))
        self._next_gauges = 0.0  # the restored partitions' gauges, at once
        now = time.monotonic()
        waited = max(now - self._assigned_at.pop(p, now) for p in partitions)
        log.info("resumed partitions=%s since_assigned_s=%.3f", partitions, waited)

    # --- processing -------------------------------------------------------------------

    def _redrive_queued(self) -> None:
        queue = self.processor.redrive_queue
        done = 0
        now_ms = int(time.time() * 1000)
        while queue and done < _REDRIVES_PER_ROUND and not self._over_budget():
            partition, wid = queue.popleft()
            if not self.store.owns(partition):
                continue
            self._note_activity()
            self.processor.redrive(partition, wid, self._batch, now_ms)
            done += 1

    def _sweep_retention(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep or self._over_budget():
            return
        self._next_sweep = now + _SWEEP_INTERVAL_S
        before = self._batch.tombstones
        self.processor.sweep(
            int(time.time() * 1000), self.settings.closed_retention_ms, self._batch, _SWEEP_LIMIT
        )
        if self._batch.tombstones > before:
            self._note_activity()

    def _refresh_gauges(self) -> None:
        """Set the gauges of the owned partitions that are not kept up per commit (inbox
        lag, stuck workflows), at most every ``metrics.GAUGE_REFRESH_S``: off the per-input
        path, and cheap (cached watermarks, no request to the broker)."""
        now = time.monotonic()
        if now < self._next_gauges:
            return
        self._next_gauges = now + metrics.GAUGE_REFRESH_S
        now_ms = int(time.time() * 1000)
        inbox = self.topics.inbox
        # One budget for the whole refresh, not one per partition: after a restore that
        # found many parked workflows, the loop pays for at most this many decodes.
        budget = _DATES_PER_REFRESH
        for state in self.store.partitions():
            partition = state.partition
            label = str(partition)
            metrics.child(metrics.WORKFLOWS_IN_FLIGHT_STUCK, label).set(len(state.stuck))
            # Also kept per commit; here too, so a partition restored while the inbox is
            # quiet (no commit yet) is exported.
            metrics.child(metrics.PENDING_WAKES, label).set(len(state.wake))
            metrics.child(metrics.WORKFLOWS_IN_FLIGHT, label).set(len(state.open))
            metrics.child(metrics.WORKFLOWS_RETAINED, label).set(len(state.closed))
            if state.stuck_since and budget > 0:
                undated_before = sum(1 for at in state.stuck_since.values() if not at)
                left = self.store.date_stuck(partition, self._parked_at, budget)
                budget -= max(0, undated_before - left)
            oldest = state.oldest_stuck()
            age = 0.0 if oldest is None else max(0, now_ms - oldest) / 1000
            metrics.child(metrics.STUCK_OLDEST_AGE, label).set(age)
            try:
                low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(inbox, partition), cached=True
                )
            except KafkaException:
                continue  # not known to the consumer (yet): leave the last value
            lag = inbox_lag(low, high, self._committed.get(partition, OFFSET_BEGINNING))
            if lag is not None:
                metrics.child(metrics.INBOX_LAG, label).set(lag)

    def _parked_at(self, encoded: bytes) -> int:
        """When a restored STUCK workflow was parked: its record's last write."""
        try:
            return self.codec.decode_workflow(encoded).updated_at_ms
        except RecordDecodeError:
            # Its head was readable at restore but the rest is not: dating it now gives a
            # lower bound of its age rather than none.
            return int(time.time() * 1000)

    def _poll_once(self) -> None:
        if self._carry:
            messages, self._carry = self._carry, []
        else:
            room = max(1, self.settings.max_batch_records - self._batch.inputs)
            messages = poll_batch(self.consumer, room, self._poll_timeout())
        self._idle = not messages
        # Consumed is not processed: an abort must rewind these partitions even if it comes
        # before their messages' turn.
        self._batch.consumed.update(p for m in messages if (p := m.partition()) is not None)
        if self._callback_error is not None:
            failed, self._callback_error = self._callback_error, None
            raise FatalKafkaError(f"rebalance callback failed: {failed!r}") from failed
        now_ms = int(time.time() * 1000)
        for index, msg in enumerate(messages):
            if self._over_budget():
                # Slow inputs must not carry the transaction past its timeout: commit what
                # is done and take the rest in the next transaction.
                self._carry = messages[index:]
                metrics.BUDGET_COMMITS.inc()
                log.info(
                    "budget commit after %d inputs, %d carried to the next transaction",
                    self._batch.inputs,
                    len(self._carry),
                )
                return
            error = msg.error()
            if error is not None:
                if error.fatal():
                    raise FatalKafkaError(f"consumer: {error}")
                log.warning("consumer error: %s", error)
                continue
            partition = msg.partition()
            if partition is None or not self.store.owns(partition):
                # A fetch that raced a revoke; the new owner will read it again.
                continue
            self._note_activity()
            self._batch.inputs += 1
            self._batch.offsets[partition] = int(msg.offset() or 0) + 1
            try:
                self.processor.process(msg, self._batch, now_ms)
            except TransactionAbortableError as exc:
                self._abort(str(exc))
                return

    def _fire_timers(self) -> None:
        """Wake the workflows whose timers, retries or timeouts are due, in this batch:
        a timer fires in the same transaction as inbox inputs, never beside it."""
        if self._carry:
            return  # a budget commit is under way; wake in the next transaction
        now_ms = int(time.time() * 1000)
        batch = self._batch
        for state in self.store.partitions():
            # Wakes may take the batch's free room, and at least half of it even when
            # inbox input fills the rest.
            limit = self.settings.max_batch_records
            room = max(limit - batch.inputs, (limit + 1) // 2) - batch.wakes
            if room <= 0 or self._over_budget():
                return
            for wid in state.due(now_ms, room):
                self._note_activity()
                metrics.WAKES.inc()
                metrics.WAKE_LAG_SECONDS.observe(
                    max(0, now_ms - state.wake.get(wid, now_ms)) / 1000
                )
                self.processor.wake(state.partition, wid, self._batch, now_ms)
                if self._over_budget():
                    return

    def _note_activity(self) -> None:
        batch = self._batch
        if not (batch.inputs or batch.redrives or batch.tombstones or batch.wakes):
            batch.opened = time.monotonic()

    def _poll_timeout(self) -> float:
        if self._batch.inputs or self.store.staged_count():
            # Inputs are waiting to be committed: only take what has already arrived.
            return 0.0
        # Wait for input, but not past the next timer's due time.
        wake_at = self.store.next_wake()
        if wake_at is None:
            return _IDLE_POLL_S
        return min(_IDLE_POLL_S, max(0.0, wake_at / 1000 - time.time()))

    def _over_budget(self) -> bool:
        opened = time.monotonic() - self._batch.opened if self._pending() else 0.0
        return max(opened, self.txn.age()) >= self._budget_s

    def _pending(self) -> bool:
        batch = self._batch
        return bool(batch.inputs or batch.redrives or batch.tombstones or self.store.staged_count())

    def _batch_due(self) -> bool:
        if not self._pending() and not self.txn.open:
            return False
        # Commit once nothing more is waiting (low latency when idle; batches grow by
        # themselves under load), when the batch is full, when it has been open too long,
        # or when its transaction has used its share of the timeout.
        return (
            (self._idle and not self._carry)
            or self._batch.inputs >= self.settings.max_batch_records
            or time.monotonic() - self._batch.opened >= self.settings.commit_interval_ms / 1000
            or self._over_budget()
        )

    # --- transactions (EOS 1-8) -------------------------------------------------------

    def _commit_batch(self) -> None:
        batch = self._batch
        if not self._pending() and not self.txn.open:
            return
        started = time.monotonic()
        written: list[str] = []
        try:
            # Everything is produced here, at commit: the transaction is open only for as
            # long as producing and committing take, never while workflow code runs.
            for out in batch.outputs:
                self._emit(
                    out.topic,
                    out.key,
                    out.value,
                    out.ref,
                    headers=out.headers,
                    partition=out.partition,
                )
            for partition, wid, record, encoded in self.store.staged():
                # Explicit partition: history p belongs to whoever owns inbox p.
                kind = "workflow" if record is not None else "tombstone"
                self._emit(
                    self.topics.history,
                    wid.encode(),
                    encoded,
                    Ref(kind, partition, wid),
                    partition=partition,
                )
                written.append(wid)
            for partition, wid, offset, value in self.store.staged_held():
                ref = Ref("workflow", partition, wid)
                key = held_key(wid, offset)
                self._emit(self.topics.history, key, value, ref, partition=partition)
            self.txn.commit(self._offsets(batch), self.consumer.consumer_group_metadata)
        except TransactionAbortableError as exc:
            self._abort(str(exc))
            return
        self._aborts_in_a_row = 0
        metrics.TXN_COMMIT_SECONDS.observe(time.monotonic() - started)
        metrics.BATCH_SIZE.observe(batch.inputs)
        self.store.promote()
        self._committed.update(batch.offsets)
        self.processor.forget_poison(self._committed, written)
        self._batch = Batch(opened=time.monotonic())
        self._record_metrics(batch)

    def _emit(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        ref: Ref,
        *,
        headers: tuple[tuple[str, bytes | None], ...] = (),
        partition: int | None = None,
    ) -> None:
        try:
            self.txn.produce(
                topic, key=key, value=value, ref=ref, headers=headers, partition=partition
            )
        except RecordRejectedError as exc:
            self.processor.mark_poisoned(ref, f"Kafka refused a record for {topic}: {exc}")
            raise TransactionAbortableError(str(exc)) from exc
        if topic in self._careful:
            # Alone in its request, a record is judged by its own size, not its batch's.
            self.producer.flush(30)

    def _offsets(self, batch: Batch) -> list[TopicPartition]:
        """Offsets for every owned partition, not only those with new inputs.

        Each carries our transactional id, so whoever takes a partition over knows whom to
        fence, and each commit is checked against the group's generation, so a zombie that
        lost its partitions cannot commit anything, not even re-drives or tombstones.
        """
        metadata = offset_metadata(self.settings.transactional_id)
        offsets = []
        for state in self.store.partitions():
            partition = state.partition
            offset = batch.offsets.get(partition, self._committed.get(partition, 0))
            offsets.append(
                TopicPartition(self.topics.inbox, partition, max(0, offset), metadata=metadata)
            )
        return offsets

    def _abort(self, reason: str) -> None:
        """Abort the open transaction, drop staged state, rewind to committed offsets."""
        if self.txn.open:
            log.warning("aborting transaction reason=%s", reason)
            metrics.TXN_ABORTS.labels(reason[:60]).inc()
            # The report of the record that doomed the transaction may still be queued (a
            # later produce learns of the failure first): serve it before it is purged.
            self.producer.poll(0)
            self.txn.abort()
        failures = self.txn.take_failures()
        blamed = 0
        for failure in failures:
            error = failure.error
            verdict = classify_delivery_error(error)
            if verdict == "fatal":
                raise FatalKafkaError(f"delivery failed fatally: {error.name()}: {error.str()}")
            if verdict != "record" or not isinstance(failure.ref, Ref):
                continue
            if self._batch_too_large(failure):
                continue
            blamed += 1
            self.processor.mark_poisoned(
                failure.ref, f"Kafka refused a record at delivery: {error.name()}: {error.str()}"
            )
        self.store.discard_staged()
        batch = self._batch
        # Re-drives of the aborted batch are lost with it: do them again.
        self.processor.redrive_queue.extendleft(reversed(batch.redrives))
        rewind = set(batch.offsets) | batch.consumed
        rewind.update(p for m in self._carry if (p := m.partition()) is not None)
        for partition in sorted(rewind):
            offset = self._committed.get(partition)
            if offset is not None and self.store.owns(partition):
                self.consumer.seek(TopicPartition(self.topics.inbox, partition, offset))
        self._carry = []
        self._batch = Batch(opened=time.monotonic())
        if not blamed:
            # Nothing to change on the retry (a broker or network failure, or a batch now
            # sent record by record): back off.
            self._aborts_in_a_row += 1
            time.sleep(min(0.05 * 2 ** min(self._aborts_in_a_row, 6), 2.0))

    def _batch_too_large(self, failure: DeliveryFailure) -> bool:
        """True when a size refusal was the batch's fault, not this record's.

        A topic checks ``max.message.bytes`` against a whole record batch, so records that
        fit on their own fail together when librdkafka batches them. Blaming them would park
        innocent workflows; instead that topic's records are sent one per request from now.
        """
        if failure.error.code() not in (
            KafkaError.MSG_SIZE_TOO_LARGE,
            KafkaError.RECORD_LIST_TOO_LARGE,
        ):
            return False
        limit = self._directory.max_message_bytes(failure.topic)
        # Record overhead within a batch, and the batch header, are well under 200 bytes.
        if limit is None or failure.size + 200 > limit:
            return False
        if failure.topic not in self._careful:
            log.warning(
                "topic=%s max.message.bytes=%d is below what records are batched to; "
                "sending its records one per request: raise its limit to at least "
                "SAGALINE_MAX_RECORD_BYTES + 64 KiB",
                failure.topic,
                limit,
            )
            self._careful.add(failure.topic)
        return True

    def _record_metrics(self, batch: Batch) -> None:
        for reason in batch.ignored:
            metrics.child(metrics.INPUTS_IGNORED, reason).inc()
        metrics.WORKFLOWS_TOMBSTONED.inc(batch.tombstones)
        for started, record, _tasks in batch.changed:
            wtype = record.workflow_type
            if started:
                metrics.child(metrics.WORKFLOWS_STARTED, wtype).inc()
            if record.status is WorkflowStatus.STUCK:
                metrics.child(metrics.WORKFLOWS_STUCK, wtype).inc()
            elif record.status.terminal and record.closed_at_ms is not None:
                status = record.status.value.lower()
                metrics.child(metrics.WORKFLOWS_CLOSED, wtype, status).inc()
                metrics.child(metrics.WORKFLOW_DURATION, wtype, status).observe(
                    (record.closed_at_ms - record.started_at_ms) / 1000
                )
        for state in self.store.partitions():
            label = str(state.partition)
            metrics.child(metrics.WORKFLOWS_IN_FLIGHT, label).set(len(state.open))
            metrics.child(metrics.WORKFLOWS_RETAINED, label).set(len(state.closed))
            metrics.child(metrics.PENDING_WAKES, label).set(len(state.wake))
