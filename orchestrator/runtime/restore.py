"""Rebuilding one partition's workflows from the compacted history topic.

The restore target is the partition's high watermark as read_uncommitted sees it, read
with read_committed (KAFKA_EOS rule 10). Stopping at the last stable offset instead would
miss a previous owner's transaction that is still open, and resume stale state after two
quick handovers. Records are read until ``position() >= target``; never by comparing the
last record's offset, since transaction markers and compaction leave gaps.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
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
from orchestrator.runtime.state import PartitionState
from orchestrator.transport import poll_batch

log = logging.getLogger(__name__)


class RestoreError(SagalineError):
    """A partition could not be restored before the deadline."""


def history_targets(
    admin: AdminClient, topic: str, partitions: list[int], timeout_s: float
) -> dict[int, int]:
    """High watermarks of ``topic``'s ``partitions``, counting open transactions."""
    latest: Any = OffsetSpec.latest()  # type: ignore[no-untyped-call]
    wanted = {TopicPartition(topic, p): latest for p in partitions}
    futures = admin.list_offsets(
        wanted, isolation_level=IsolationLevel.READ_UNCOMMITTED, request_timeout=timeout_s
    )
    targets: dict[int, int] = {}
    for tp, future in futures.items():
        info: Any = future.result(timeout=timeout_s)
        targets[tp.partition] = int(info.offset)
    return targets


def restore_partitions(
    consumer: Consumer,
    admin: AdminClient,
    codec: AvroCodec,
    topic: str,
    partitions: list[int],
    *,
    deadline_s: float,
) -> dict[int, PartitionState]:
    """Read history ``partitions`` from the beginning to their targets, all at once.

    ``consumer`` is an assign-only, read_committed consumer used for restores alone. It
    blocks at a crashed writer's open transaction until the broker aborts it (after the
    transaction timeout), which is exactly the wait that keeps restored state fresh.

    Raises:
        RestoreError: a target was not reached within ``deadline_s`` seconds.
    """
    started = time.monotonic()
    targets = history_targets(admin, topic, partitions, timeout_s=deadline_s)
    states = {p: PartitionState(p) for p in partitions}
    pending = {p for p, target in targets.items() if target > 0}
    if pending:
        assigned = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(pending)]
        consumer.assign(assigned)
        # librdkafka keeps a partition's pause flag across unassign/assign; an earlier
        # restore paused the partitions it finished.
        consumer.resume(assigned)
        try:
            _read_until(consumer, codec, states, topic, targets, pending, started + deadline_s)
        finally:
            consumer.unassign()
    elapsed = time.monotonic() - started
    for partition, state in states.items():
        label = str(partition)
        metrics.RESTORE_SECONDS.labels(label).observe(elapsed)
        metrics.RESTORE_RECORDS.labels(label).inc(state.history_records)
        metrics.WORKFLOWS_IN_FLIGHT.labels(label).set(len(state.running))
        log.info(
            "restored partition=%d target=%d records=%d workflows=%d running=%d seconds=%.3f",
            partition,
            targets[partition],
            state.history_records,
            len(state.workflows),
            len(state.running),
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
    deadline: float,
) -> None:
    while pending:
        for msg in poll_batch(consumer, 5_000, 0.05):
            _apply(msg, codec, states)
        positions = consumer.position([TopicPartition(topic, p) for p in sorted(pending)])
        for tp in positions:
            if tp.offset >= targets[tp.partition]:
                pending.discard(tp.partition)
                # Stop fetching a finished partition: its later records belong to the
                # live loop, not to the restore.
                consumer.pause([TopicPartition(topic, tp.partition)])
        if pending and time.monotonic() > deadline:
            late = {tp.partition: (tp.offset, targets[tp.partition]) for tp in positions}
            raise RestoreError(
                f"restore of {topic} did not reach its targets before the deadline "
                f"(partition: (position, target)) {late}; is an open transaction of a dead "
                "producer holding it?"
            )


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
    value = msg.value()
    if value is None:
        if key is not None:
            state.delete(key.decode())
        return
    try:
        state.put(codec.decode_workflow(value))
    except RecordDecodeError as exc:
        # We wrote these ourselves; a bad one means a foreign writer or code rolled back
        # past a schema change. An older version of the record must not stand in for it:
        # the workflow is quarantined (its inputs are dead-lettered) until a readable
        # record supersedes it.
        workflow_id = key.decode(errors="replace") if key is not None else "?"
        state.quarantine(workflow_id)
        log.error(
            "restore partition=%d offset=%d workflow=%s quarantined, unreadable record: %s",
            state.partition,
            msg.offset(),
            workflow_id,
            exc,
        )
