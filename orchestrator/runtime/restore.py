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
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from orchestrator import metrics
from orchestrator.errors import RecordDecodeError, SagalineError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.runtime.state import PartitionState

log = logging.getLogger(__name__)


class RestoreError(SagalineError):
    """A partition could not be restored before the deadline."""


def history_target(admin: AdminClient, topic: str, partition: int, timeout_s: float) -> int:
    """High watermark of ``topic``/``partition`` including open transactions."""
    tp = TopicPartition(topic, partition)
    latest: Any = OffsetSpec.latest()  # type: ignore[no-untyped-call]
    futures = admin.list_offsets(
        {tp: latest}, isolation_level=IsolationLevel.READ_UNCOMMITTED, request_timeout=timeout_s
    )
    info: Any = futures[tp].result(timeout=timeout_s)
    return int(info.offset)


def restore_partition(
    consumer: Consumer,
    admin: AdminClient,
    codec: AvroCodec,
    topic: str,
    partition: int,
    *,
    deadline_s: float,
) -> PartitionState:
    """Read history ``partition`` from the beginning to its target; return its workflows.

    ``consumer`` is an assign-only, read_committed consumer used for restores alone. It
    blocks at a crashed writer's open transaction until the broker aborts it (after the
    transaction timeout), which is exactly the wait that keeps restored state fresh.

    Raises:
        RestoreError: the target was not reached within ``deadline_s`` seconds.
    """
    started = time.monotonic()
    target = history_target(admin, topic, partition, timeout_s=deadline_s)
    state = PartitionState(partition)
    tp = TopicPartition(topic, partition, OFFSET_BEGINNING)
    if target > 0:
        consumer.assign([tp])
        try:
            _read_until(consumer, codec, state, tp, target, started + deadline_s)
        finally:
            consumer.unassign()
    elapsed = time.monotonic() - started
    metrics.RESTORE_SECONDS.labels(str(partition)).observe(elapsed)
    metrics.RESTORE_RECORDS.labels(str(partition)).inc(state.history_records)
    metrics.WORKFLOWS_IN_FLIGHT.labels(str(partition)).set(len(state.running))
    log.info(
        "restored partition=%d target=%d records=%d workflows=%d running=%d seconds=%.3f",
        partition,
        target,
        state.history_records,
        len(state.workflows),
        len(state.running),
        elapsed,
    )
    return state


def _read_until(
    consumer: Consumer,
    codec: AvroCodec,
    state: PartitionState,
    tp: TopicPartition,
    target: int,
    deadline: float,
) -> None:
    position = 0
    while True:
        for msg in consumer.consume(num_messages=1000, timeout=0.2):
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.fatal():
                    raise RestoreError(f"restore of {tp.topic}[{tp.partition}]: {error}")
                log.warning("restore partition=%d error=%s", tp.partition, error)
                continue
            state.history_records += 1
            key = msg.key()
            value = msg.value()
            if value is None:
                if key is not None:
                    state.delete(key.decode())
                continue
            try:
                state.put(codec.decode_workflow(value))
            except RecordDecodeError as exc:
                # We wrote these ourselves; a bad one means a foreign writer or a schema
                # removed too early. Keep restoring the rest and make it loud.
                log.error(
                    "restore partition=%d offset=%d undecodable history record: %s",
                    tp.partition,
                    msg.offset(),
                    exc,
                )
        position = consumer.position([TopicPartition(tp.topic, tp.partition)])[0].offset
        if position >= target:
            return
        if time.monotonic() > deadline:
            raise RestoreError(
                f"restore of {tp.topic}[{tp.partition}] reached offset {position} of {target} "
                "before its deadline; is an open transaction of a dead producer holding it?"
            )
