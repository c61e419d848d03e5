"""Writing order-saga workflows straight to a history topic, and watching probes close.

The records are built with :mod:`orchestrator.protocol.records` and encoded with
:class:`AvroCodec`, so they are in the current schema. Encoding a million of them one by one
costs about a minute on a 2-core machine, so each shape is encoded once as a template whose
ids are fixed-width placeholders, and each workflow's bytes are the template with its own
ids put in place (same widths, so every Avro length prefix stays right). The splice is
checked: for every template, one spliced record is compared byte for byte with the same
record built and encoded the ordinary way.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.partitioning import partition_for
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    Failure,
    HistoryEvent,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.workflow import DEFAULT_RETRY

from .workflows import ORDER_TYPE

# Placeholders and real values have the same widths: "order-<8 hex>-<7 digits>", a 32-hex
# run id, and a uuid4-shaped id for the reservation, charge and shipment.
_WID_HOLE: Final = "order-@@@@@@@@-@@@@@@@"
_RUN_HOLE: Final = "#" * 32
_UUID_HOLE: Final = "%%%%%%%%-%%%%-%%%%-%%%%-%%%%%%%%%%%%"
_VARIANTS: Final = 7
PROBE_PREFIX: Final = "probe-"


class Shape(enum.Enum):
    """What a written workflow looks like."""

    OPEN = "open"  # RUNNING, waiting on payment.charge (its second step)
    COMPLETED = "completed"  # reserved, charged, shipped
    COMPENSATED = "compensated"  # payment declined, reservation released


@dataclass(frozen=True, slots=True)
class WorkflowIds:
    """The ids one written workflow carries; all fixed-width."""

    workflow_id: str
    run_id: str
    uid: str

    @staticmethod
    def of(tag: str, index: int) -> WorkflowIds:
        """Ids of workflow ``index`` of the batch ``tag`` (8 hex characters)."""
        run = f"{tag}{index:024x}"
        uid = f"{run[:8]}-{run[8:12]}-{run[12:16]}-{run[16:20]}-{run[20:]}"
        return WorkflowIds(f"order-{tag}-{index:07d}", run, uid)


def order_record(ids: WorkflowIds, shape: Shape, variant: int, started_ms: int) -> WorkflowRecord:
    """An order saga's record as the engine writes it, in the given shape.

    The input is ~155 bytes of JSON (two items, a total, a card, an address). OPEN is waiting
    on its second step: ``inventory.reserve`` scheduled and completed, ``payment.charge``
    scheduled (revision 2). COMPLETED ran all three steps (revision 4); COMPENSATED had its
    payment declined and its reservation released (revision 4, failure set).
    """
    wid = ids.workflow_id
    declined = shape is Shape.COMPENSATED
    items = [
        {"sku": f"sku-{variant}", "qty": 1 + variant % 3},
        {"sku": f"sku-{(variant + 3) % _VARIANTS}", "qty": 1},
    ]
    total = 1_000 + 137 * variant
    card = "declined" if declined else "visa-4242"
    order = {
        "order_id": wid,
        "items": items,
        "total": total,
        "card": card,
        "address": f"{100 + variant} Kafka Street",
    }
    reservation = {"reservation_id": f"res-{ids.uid}", "order_id": wid}
    charge_policy = ("PaymentDeclined",)
    t = started_ms
    events: list[HistoryEvent] = [
        ActivityScheduled(
            0,
            1,
            "inventory.reserve",
            encode_json({"order_id": wid, "items": items}),
            t,
            max_attempts=DEFAULT_RETRY.max_attempts,
        ),
        ActivityCompleted(0, 1, encode_json(reservation), t + 38),
        ActivityScheduled(
            1,
            1,
            "payment.charge",
            encode_json({"order_id": wid, "amount": total, "card": card}),
            t + 41,
            max_attempts=5,
            non_retryable=charge_policy,
        ),
    ]
    base = WorkflowRecord(
        workflow_id=wid,
        workflow_type=ORDER_TYPE,
        status=WorkflowStatus.RUNNING,
        input=encode_json(order),
        started_at_ms=t,
        updated_at_ms=t + 41,
        revision=2,
        events=tuple(events),
        run_id=ids.run_id,
    )
    if shape is Shape.OPEN:
        return base
    if shape is Shape.COMPLETED:
        events += [
            ActivityCompleted(1, 1, encode_json({"charge_id": f"ch-{ids.uid}"}), t + 95),
            ActivityScheduled(
                2,
                1,
                "shipping.schedule",
                encode_json({"order_id": wid, "address": order["address"]}),
                t + 97,
                max_attempts=DEFAULT_RETRY.max_attempts,
            ),
            ActivityCompleted(2, 1, encode_json({"shipment_id": f"sh-{ids.uid}"}), t + 140),
        ]
        return dataclasses.replace(
            base,
            status=WorkflowStatus.COMPLETED,
            events=tuple(events),
            result=encode_json({"charge_id": f"ch-{ids.uid}", "shipment_id": f"sh-{ids.uid}"}),
            closed_at_ms=t + 141,
            updated_at_ms=t + 141,
            revision=4,
        )
    declined_failure = Failure("PaymentDeclined", "card refused")
    events += [
        ActivityFailed(1, 1, declined_failure, t + 90),
        ActivityScheduled(
            2,
            1,
            "inventory.release",
            encode_json(reservation),
            t + 92,
            compensation=True,
            max_attempts=DEFAULT_RETRY.max_attempts,
        ),
        ActivityCompleted(
            2, 1, encode_json({"reservation_id": f"res-{ids.uid}", "released": True}), t + 130
        ),
    ]
    return dataclasses.replace(
        base,
        status=WorkflowStatus.COMPENSATED,
        events=tuple(events),
        failure=Failure(
            "ActivityError",
            "activity payment.charge failed after 1 attempt(s): PaymentDeclined: card refused",
        ),
        closed_at_ms=t + 131,
        updated_at_ms=t + 131,
        revision=4,
    )


class RecordFactory:
    """Encoded order-saga records for a batch of workflows, by template splicing."""

    def __init__(self, codec: AvroCodec, started_ms: int) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self._codec = codec
        self._started_ms = started_ms
        self._templates: dict[tuple[Shape, int], bytes] = {}
        holes = WorkflowIds(_WID_HOLE, _RUN_HOLE, _UUID_HOLE)
        for shape in Shape:
            for variant in range(_VARIANTS):
                template = codec.encode_workflow(order_record(holes, shape, variant, started_ms))
                self._templates[shape, variant] = template
                self._check(shape, variant, index=9_999_000 + variant)

    def _check(self, shape: Shape, variant: int, index: int) -> None:
        ids = WorkflowIds.of(self.tag, index)
        built = self._codec.encode_workflow(order_record(ids, shape, variant, self._started_ms))
        spliced = self.encode(ids, shape, variant)
        if built != spliced:
            raise AssertionError(
                f"template splice of {shape.value} variant {variant} differs from the codec's "
                f"encoding ({len(spliced)} vs {len(built)} bytes); the record has a field the "
                "splice cannot fill, write records one by one instead"
            )

    def encode(self, ids: WorkflowIds, shape: Shape, variant: int) -> bytes:
        """The encoded record of one workflow."""
        return (
            self._templates[shape, variant]
            .replace(_WID_HOLE.encode(), ids.workflow_id.encode())
            .replace(_RUN_HOLE.encode(), ids.run_id.encode())
            .replace(_UUID_HOLE.encode(), ids.uid.encode())
        )

    def size(self, shape: Shape) -> int:
        """Bytes of one record of ``shape`` (variant 0)."""
        return len(self._templates[shape, 0])

    def records(
        self, count: int, shape_of: Callable[[int], Shape], first: int = 0
    ) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of workflows ``first`` .. ``first + count - 1``."""
        for index in range(first, first + count):
            ids = WorkflowIds.of(self.tag, index)
            yield ids.workflow_id.encode(), self.encode(ids, shape_of(index), index % _VARIANTS)


@dataclass(frozen=True, slots=True)
class WriteStats:
    """What :func:`write_history` wrote."""

    records: int
    bytes: int
    seconds: float


def write_history(
    bootstrap: str, topic: str, partitions: int, records: Iterator[tuple[bytes, bytes]]
) -> WriteStats:
    """Produce ``records`` to ``topic``, each on Kafka's murmur2 partition for its key.

    A plain (non-transactional) producer tuned for bulk: the orchestrator must read these
    exactly as if it had written them, and acks=1 is enough for a benchmark's own data.
    """
    errors: list[str] = []

    def delivered(error: KafkaError | None, msg: Message) -> None:
        if error is not None and len(errors) < 10:
            errors.append(f"{msg.key()!r}: {error}")

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "compression.type": "none",
            "acks": 1,
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )
    started = time.monotonic()
    count = size = 0
    for key, value in records:
        while True:
            try:
                producer.produce(
                    topic,
                    key=key,
                    value=value,
                    partition=partition_for(key, partitions),
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
        size += len(key) + len(value)
        if count % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left or errors:
        raise RuntimeError(
            f"writing {topic}: {left} record(s) undelivered after 120 s, errors: {errors}"
        )
    return WriteStats(count, size, time.monotonic() - started)


class ProbeIds:
    """Workflow ids for probes, on the partition asked for (Kafka's murmur2 partitioner)."""

    def __init__(self, tag: str, partitions: int) -> None:
        self._prefix = f"{PROBE_PREFIX}{tag}-"
        self._partitions = partitions
        self._next = 0
        self._spare: dict[int, list[str]] = {p: [] for p in range(partitions)}

    def on(self, partition: int) -> str:
        """A fresh probe id whose key lands on ``partition``."""
        spare = self._spare[partition]
        while not spare:
            wid = f"{self._prefix}{self._next}"
            self._next += 1
            self._spare[partition_for(wid.encode(), self._partitions)].append(wid)
        return spare.pop()


@dataclass(frozen=True, slots=True)
class ProbeClose:
    """A probe's closed record, as seen on the history topic."""

    partition: int
    workflow_id: str
    closed_ms: float  # closed_at_ms: when the orchestrator applied the start
    seen_ms: float  # when this watcher read the committed record


@dataclass
class ProbeWatcher:
    """Reads the history topic (read_committed) from its end at creation, probes only.

    Only records whose key starts with ``probe-`` are decoded, so the bulk records an
    orchestrator may rewrite cost nothing here.
    """

    bootstrap: str
    topic: str
    partitions: int
    codec: AvroCodec = field(default_factory=AvroCodec)
    closes: dict[int, list[ProbeClose]] = field(default_factory=dict)
    closed: dict[str, ProbeClose] = field(default_factory=dict)
    records_seen: int = 0  # every record read, probe or not, tombstones included
    _consumer: Consumer | None = None

    def __post_init__(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"bench-watcher-{uuid.uuid4().hex[:8]}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        starts = [
            TopicPartition(self.topic, p, _high_watermark(consumer, self.topic, p))
            for p in range(self.partitions)
        ]
        consumer.assign(starts)
        self._consumer = consumer
        self.closes = {p: [] for p in range(self.partitions)}

    def poll(self, timeout_s: float) -> int:
        """Read what has arrived; returns the number of records read."""
        assert self._consumer is not None
        seen_ms = time.time() * 1000
        read = 0
        prefix = PROBE_PREFIX.encode()
        for msg in self._consumer.consume(num_messages=10_000, timeout=timeout_s):
            if msg.error() is not None:
                continue
            read += 1
            key, value, partition = msg.key(), msg.value(), msg.partition()
            if key is None or value is None or partition is None or not key.startswith(prefix):
                continue
            record = self.codec.decode_workflow(value)
            if not record.status.terminal or record.workflow_id in self.closed:
                continue
            closed_ms = float(record.closed_at_ms) if record.closed_at_ms else seen_ms
            close = ProbeClose(partition, record.workflow_id, closed_ms, seen_ms)
            self.closed[record.workflow_id] = close
            self.closes[partition].append(close)
        self.records_seen += read
        return read

    def catch_up(self, quiet_s: float = 0.3, deadline_s: float = 60.0) -> None:
        """Read until a poll of ``quiet_s`` brings nothing."""
        end = time.monotonic() + deadline_s
        while self.poll(quiet_s):
            if time.monotonic() > end:
                raise TimeoutError(f"{self.topic} kept delivering records for {deadline_s} s")

    def first_after(self, partition: int, after_ms: float) -> ProbeClose | None:
        """The earliest probe on ``partition`` that closed after ``after_ms``."""
        later = [c for c in self.closes[partition] if c.closed_ms > after_ms]
        return min(later, key=lambda c: c.closed_ms) if later else None

    def count_after(self, partition: int, after_ms: float) -> int:
        """Probes on ``partition`` that closed after ``after_ms``."""
        return sum(1 for c in self.closes[partition] if c.closed_ms > after_ms)

    def largest_gap(self, partition: int, since_ms: float, until_ms: float) -> float:
        """Longest time (ms) between consecutive probe closes on ``partition`` in a window.

        The window starts at the last close before ``since_ms`` (or at ``since_ms``), so a
        stall that began with the event is counted whole.
        """
        times = sorted(c.closed_ms for c in self.closes[partition])
        before = [t for t in times if t <= since_ms]
        inside = [t for t in times if since_ms < t <= until_ms]
        points = [before[-1] if before else since_ms, *inside]
        return max((b - a for a, b in itertools.pairwise(points)), default=0.0)

    def close(self) -> None:
        """Close the consumer."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def _high_watermark(consumer: Consumer, topic: str, partition: int, deadline_s: float = 30) -> int:
    """The partition's high watermark; a topic created a moment ago may have no leader yet."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            marks = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        except KafkaException:
            # NOT_LEADER_FOR_PARTITION and the like, until the new topic's leaders are known.
            if time.monotonic() > end:
                raise
            marks = None
        if marks is not None:
            return int(marks[1])
        if time.monotonic() > end:
            raise TimeoutError(f"no watermarks for {topic}[{partition}] within {deadline_s} s")
        time.sleep(0.1)  # pacing retries of a metadata race, not waiting for the system
