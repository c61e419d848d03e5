"""Durable timers for ``bench.state``: pending timers written straight to history, and the
lag with which an orchestrator fires them.

A sleeper (``bench.sleeper``) is a workflow whose whole history is one ``TimerStarted``;
its record is written as the engine writes it after the start (revision 1, ``wake_at_ms`` =
the timer's due time). When the timer fires, the workflow closes in the same transition, so
its closed record on the history topic carries both times: ``TimerStarted.fire_at_ms`` (due)
and ``TimerFired.at_ms`` (when the orchestrator fired it). The lag is the second minus the
first, and also the time this watcher read the committed record minus the due time.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from confluent_kafka import Consumer, TopicPartition

from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    TimerFired,
    TimerStarted,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.transport import poll_batch

from .workflows import SLEEPER_TYPE


def sleeper_record(codec: AvroCodec, wid: str, started_ms: int, fire_at_ms: int) -> bytes:
    """The encoded record of a sleeper waiting for its timer."""
    record = WorkflowRecord(
        workflow_id=wid,
        workflow_type=SLEEPER_TYPE,
        status=WorkflowStatus.RUNNING,
        input=encode_json({"at_ms": fire_at_ms}),
        started_at_ms=started_ms,
        updated_at_ms=started_ms,
        revision=1,
        events=(TimerStarted(0, fire_at_ms, started_ms),),
        run_id=uuid.uuid4().hex,
        wake_at_ms=fire_at_ms,
    )
    return codec.encode_workflow(record)


def sleepers(
    codec: AvroCodec, tag: str, fire_times_ms: Iterator[int], started_ms: int
) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of one sleeper per fire time."""
    for index, fire_at in enumerate(fire_times_ms):
        wid = f"sleeper-{tag}-{index:07d}"
        yield wid.encode(), sleeper_record(codec, wid, started_ms, fire_at)


@dataclass
class FireWatcher:
    """Reads closed sleepers from the history topic (read_committed) and their lags."""

    bootstrap: str
    topic: str
    partitions: int
    codec: AvroCodec = field(default_factory=AvroCodec)
    fired_lag_ms: list[float] = field(default_factory=list)
    seen_lag_ms: list[float] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    _consumer: Consumer | None = None

    def __post_init__(self) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"bench-timers-{uuid.uuid4().hex[:8]}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
                "auto.offset.reset": "earliest",
            }
        )
        self._consumer.assign([TopicPartition(self.topic, p, 0) for p in range(self.partitions)])

    def poll(self, timeout_s: float) -> int:
        """Read what has arrived; returns how many sleepers closed in it."""
        assert self._consumer is not None
        closed = 0
        messages = poll_batch(self._consumer, 10_000, timeout_s)
        seen_ms = time.time() * 1000  # when they were read, before any of them is decoded
        for msg in messages:
            key, value = msg.key(), msg.value()
            if msg.error() is not None or key is None or value is None:
                continue
            if not key.startswith(b"sleeper-"):
                continue
            head = self.codec.peek_workflow(value)
            if not head.status.terminal:
                continue
            record = self.codec.decode_workflow(value)
            if record.workflow_id in self.done:
                continue
            due = next(e.fire_at_ms for e in record.events if isinstance(e, TimerStarted))
            fired = next((e.at_ms for e in record.events if isinstance(e, TimerFired)), None)
            if fired is None:
                continue
            self.done.add(record.workflow_id)
            self.fired_lag_ms.append(fired - due)
            self.seen_lag_ms.append(seen_ms - due)
            closed += 1
        return closed

    def close(self) -> None:
        """Close the consumer."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def percentiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p99 and the maximum of ``values``."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered), p99, ordered[-1]
