"""Rebuilding partitions' workflows from the compacted history topic.

The restore target is each partition's high watermark as read_uncommitted sees it, read
with read_committed (KAFKA_EOS rule 10). Stopping at the last stable offset instead would
miss a previous owner's transaction that is still open, and resume stale state after two
quick handovers. Records are read until ``position() >= target``; never by comparing the
last record's offset, since transaction markers and compaction leave gaps.

Restore is cheap per record: a workflow record is kept as its bytes, and only its status
closing time and wake time are read (``AvroCodec.peek_workflow``); whole records are decoded when an
input for the workflow arrives. There is no fixed deadline: a restore fails only when no
partition has moved for ``stall_s`` (a dead writer's transaction is normally fenced before
the restore starts, see ``fencing``, or aborted by the broker at its timeout).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from orchestrator import metrics
from orchestrator.errors import RecordDecodeError, SagalineError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.failures import safe_text
from orchestrator.protocol.topics import parse_held_key
from orchestrator.runtime.state import PartitionState
from orchestrator.transport import poll_batch

log = logging.getLogger(__name__)
_BATCH: Final = 10_000
_PROGRESS_LOG_S: Final = 5.0


class RestoreError(SagalineError):
    """A restore made no progress for too long."""


def history_targets(
    admin: AdminClient, topic: str, partitions: list[int], timeout_s: float
) -> dict[int, int]:
    """High watermarks of ``topic``'s ``partitions``, counting open transactions."""
    return _offsets(admin, topic, partitions, OffsetSpec.latest(), timeout_s)  # type: ignore[no-untyped-call]


def history_starts(
    admin: AdminClient, topic: str, partitions: list[int], timeout_s: float
) -> dict[int, int]:
    """The first offsets still in ``topic``'s ``partitions`` (compaction moves them)."""
    return _offsets(admin, topic, partitions, OffsetSpec.earliest(), timeout_s)  # type: ignore[no-untyped-call]


def _offsets(
    admin: AdminClient, topic: str, partitions: list[int], spec: Any, timeout_s: float
) -> dict[int, int]:
    wanted = {TopicPartition(topic, p): spec for p in partitions}
    futures = admin.list_offsets(
        wanted, isolation_level=IsolationLevel.READ_UNCOMMITTED, request_timeout=timeout_s
    )
    found: dict[int, int] = {}
    for tp, future in futures.items():
        info: Any = future.result(timeout=timeout_s)
        found[tp.partition] = int(info.offset)
    return found


def restore_partitions(
    consumer: Consumer,
    admin: AdminClient,
    codec: AvroCodec,
    topic: str,
    partitions: list[int],
    *,
    stall_s: float,
    timeout_s: float = 30.0,
) -> dict[int, PartitionState]:
    """Read history ``partitions`` from the beginning to their targets, all at once.

    ``consumer`` is an assign-only, read_committed consumer used for restores alone. It
    blocks at a writer's open transaction until that transaction ends, which is exactly
    the wait that keeps restored state fresh.

    Raises:
        RestoreError: no partition advanced for ``stall_s`` seconds.
    """
    started = time.monotonic()
    targets = history_targets(admin, topic, partitions, timeout_s=timeout_s)
    states = {p: PartitionState(p) for p in partitions}
    pending = {p for p, target in targets.items() if target > 0}
    if pending:
        # Concrete start offsets: with OFFSET_BEGINNING, librdkafka first asks for the
        # offset, and that query often waits out a fixed 500 ms retry. The restore consumer
        # resets to the earliest offset should compaction have moved it meanwhile.
        starts = history_starts(admin, topic, sorted(pending), timeout_s=timeout_s)
        assigned = [TopicPartition(topic, p, starts[p]) for p in sorted(pending)]
        # A consumer that has no metadata of the topic yet waits for its next periodic
        # refresh (up to a second) before the first fetch: ask for it now.
        consumer.list_topics(topic, timeout=timeout_s)
        # Never paused: a paused partition, resumed at the next restore, waits up to a
        # second for its broker thread to notice.
        consumer.assign(assigned)
        try:
            _read_until(consumer, codec, states, topic, targets, pending, stall_s)
        finally:
            consumer.unassign()
    elapsed = time.monotonic() - started
    metrics.RESTORE_SECONDS.observe(elapsed)
    records = opened = closed = 0
    for partition, state in states.items():
        label = str(partition)
        metrics.RESTORE_RECORDS.labels(label).inc(state.history_records)
        metrics.WORKFLOWS_IN_FLIGHT.labels(label).set(len(state.open))
        metrics.WORKFLOWS_RETAINED.labels(label).set(len(state.closed))
        records += state.history_records
        opened += len(state.open)
        closed += len(state.closed)
    log.info(
        "restore done partitions=%s records=%d workflows=%d open=%d closed=%d "
        "stuck=%d held=%d unreadable=%d seconds=%.3f",
        sorted(states),
        records,
        opened + closed,
        opened,
        closed,
        sum(len(s.stuck) for s in states.values()),
        sum(len(s.held) for s in states.values()),
        sum(len(s.unwritable) for s in states.values()),
        elapsed,
    )
    return states


def _read_until(
    consumer: Consumer,
    codec: AvroCodec,
    states: dict[int, PartitionState],
    topic: str,
    targets: dict[int, int],
    pending: set[int],
    stall_s: float,
) -> None:
    last: dict[int, int] = {}
    progressed = logged = time.monotonic()
    while pending:
        for msg in poll_batch(consumer, _BATCH, 0.05):
            _apply(msg, codec, states)
        positions = consumer.position([TopicPartition(topic, p) for p in sorted(pending)])
        now = time.monotonic()
        for tp in positions:
            if tp.offset > last.get(tp.partition, -1):
                last[tp.partition] = tp.offset
                progressed = now
            if tp.offset >= targets[tp.partition]:
                # Nothing follows the target while we restore: the previous owner is gone
                # and our own inbox partition is still paused.
                pending.discard(tp.partition)
        if not pending:
            return
        behind = {tp.partition: (tp.offset, targets[tp.partition]) for tp in positions}
        if now - progressed > stall_s:
            raise RestoreError(
                f"restore of {topic} made no progress for {stall_s:.0f}s (partition: "
                f"(position, target)) {behind}; is a dead producer's transaction open and "
                "the broker not aborting it?"
            )
        if now - logged > _PROGRESS_LOG_S:
            logged = now
            log.info("restoring topic=%s (position, target)=%s", topic, behind)


def _apply(msg: Message, codec: AvroCodec, states: dict[int, PartitionState]) -> None:
    error = msg.error()
    if error is not None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise RestoreError(f"restore of {msg.topic()}: {error}")
        log.warning("restore error=%s", error)
        return
    partition = msg.partition()
    state = states.get(partition) if partition is not None else None
    if state is None:
        return
    state.history_records += 1
    key = msg.key()
    if key is None:
        log.warning(
            "restore partition=%d offset=%s: history record without a key", partition, msg.offset()
        )
        return
    value = msg.value()
    try:
        held = parse_held_key(key)
        workflow_id = key.decode() if held is None else held[0]
    except (ValueError, UnicodeDecodeError):
        log.warning(
            "restore partition=%d offset=%s: key %r is neither a workflow id nor a held input",
            partition,
            msg.offset(),
            key[:80],
        )
        return
    if held is not None:
        if value is None:
            state.release(workflow_id, held[1])
        else:
            state.hold(workflow_id, held[1], value)
        return
    if value is None:
        state.delete(workflow_id)
        return
    try:
        head = codec.peek_workflow(value)
    except RecordDecodeError as exc:
        # We wrote these ourselves; a bad one means newer code (a schema this version
        # lacks), a foreign writer, or code rolled back past a schema change. An older
        # version of the record must not stand in for it, and it must not be overwritten:
        # the workflow's inputs are held until code that can read it owns the partition.
        state.mark_unwritable(
            workflow_id,
            f"its history record cannot be read by this version ({safe_text(exc)}); its "
            "inputs are held until code that can read it owns the partition",
        )
        log.error(
            "restore partition=%d offset=%s workflow=%s unreadable, inputs will be held: %s",
            partition,
            msg.offset(),
            safe_text(workflow_id, 200),
            safe_text(exc),
        )
        return
    state.put(
        workflow_id,
        value,
        head.status,
        head.closed_at_ms or 0,
        head.wake_at_ms,
        head.run_id,
        head.request_id,
        head.earlier_requests,
    )
