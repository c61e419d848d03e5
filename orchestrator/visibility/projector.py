"""``sagaline projector``: the history topic, projected into PostgreSQL.

A plain consumer group (``<prefix>.projector``) reads the history topic read_committed,
so it sees exactly what the orchestrators committed. Each poll batch is collapsed to the
last record of each workflow, written in one PostgreSQL transaction, and only then are
the Kafka offsets committed: a crash between the two replays the batch, which the
store's revision guard makes harmless (at least once into an idempotent table is
exactly-once rows). PostgreSQL being down stops progress, never loses a record: the
batch is retried with backoff until it lands.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from orchestrator import metrics
from orchestrator.errors import ConfigurationError
from orchestrator.metrics import child
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.topics import HELD_PREFIX
from orchestrator.settings import ProjectorSettings
from orchestrator.transport import poll_batch
from orchestrator.visibility.models import EventRow, WorkflowRow
from orchestrator.visibility.projection import clean, project
from orchestrator.visibility.store import VisibilityStore

log = logging.getLogger(__name__)
_POLL_S: Final = 0.5
_LAG_EVERY_S: Final = 5.0
_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
# Errors about the data, not the database's health: the same rows fail again on retry.
_REFUSED: Final = (psycopg.DataError, psycopg.IntegrityError)
# The history topic takes records up to 8 MiB (orchestrator.protocol.topics): the
# projector reads whatever the orchestrators were allowed to write.
_MAX_READ_BYTES: Final = 16 << 20


@dataclass(slots=True)
class Collapsed:
    """One poll batch, reduced to what PostgreSQL needs: the last record of each run,
    the tombstones with their offsets, and the next offset to commit per partition."""

    runs: dict[tuple[str, str], tuple[WorkflowRow, list[EventRow]]] = field(default_factory=dict)
    tombstones: list[tuple[str, int]] = field(default_factory=list)
    next_offsets: dict[int, int] = field(default_factory=dict)
    workflows: int = 0
    skipped: int = 0


def collapse(codec: AvroCodec, messages: Sequence[Message]) -> Collapsed:
    """Decode and reduce a batch; records that cannot be read are counted, logged and
    skipped (a newer schema or garbage must not stop the projection)."""
    batch = Collapsed()
    for msg in messages:
        partition, offset, key = msg.partition(), msg.offset(), msg.key()
        if partition is None or offset is None:
            continue
        batch.next_offsets[partition] = max(batch.next_offsets.get(partition, 0), offset + 1)
        if key is None or key.startswith(HELD_PREFIX):
            batch.skipped += 1
            continue
        value = msg.value()
        if value is None:
            batch.tombstones.append((clean(key.decode("utf-8", "replace")), offset))
            continue
        try:
            record = codec.decode_workflow(value)
        except Exception as exc:
            batch.skipped += 1
            metrics.PROJECTOR_UNREADABLE.inc()
            log.warning(
                "skipping history record partition=%d offset=%d key=%r: %s",
                partition,
                offset,
                key[:200],
                exc,
                extra={"partition": partition, "offset": offset},
            )
            continue
        batch.workflows += 1
        # Later records of a run replace earlier ones; the store's guard would discard the
        # older anyway, this only saves the round trip.
        batch.runs[(record.workflow_id, record.run_id)] = project(record, partition, offset)
    return batch


class Projector:
    """The projection loop; :func:`run_projector` runs it with the UI and metrics."""

    def __init__(self, settings: ProjectorSettings, store: VisibilityStore) -> None:
        self.settings = settings
        self.store = store
        self.codec = AvroCodec(max_record_bytes=_MAX_READ_BYTES)
        self.topic = settings.topics.history
        self._assigned: set[int] = set()
        self._next_lag = 0.0
        self.consumer = Consumer(
            {
                **settings.kafka_common(),
                "group.id": settings.consumer_group,
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
            }
        )

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._assigned.update(tp.partition for tp in partitions)
        log.info("projecting partitions %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._assigned.discard(tp.partition)
            with contextlib.suppress(KeyError):
                metrics.PROJECTOR_LAG.remove(str(tp.partition))

    def run(self, stop: threading.Event) -> None:
        """Project until ``stop`` is set; closes the consumer (leaving the group)."""
        self.consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        try:
            while not stop.is_set():
                messages = poll_batch(self.consumer, self.settings.max_batch_records, _POLL_S)
                good = [m for m in messages if not self._is_error(m)]
                if good:
                    self._apply(collapse(self.codec, good), stop)
                self._refresh_lag()
        finally:
            self.consumer.close()

    def _is_error(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return False
        if err.code() == KafkaError._PARTITION_EOF:
            return True
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            log.error(
                "topic %s does not exist: create it (sagaline topics create) or check "
                "SAGALINE_TOPIC_PREFIX (%r)",
                self.topic,
                self.settings.topic_prefix,
            )
        else:
            log.warning("consumer error: %s", err)
        return True

    def _apply(self, batch: Collapsed, stop: threading.Event) -> None:
        attempt = 0
        while True:
            try:
                self.store.apply(list(batch.runs.values()), batch.tombstones)
                break
            except _REFUSED:
                # The database refuses something in the batch itself: retrying cannot
                # help, and one bad run must not stop the projection. Apply the batch a run
                # at a time and skip (count, log) the ones it refuses.
                self._apply_each(batch)
                break
            except psycopg.Error as exc:
                metrics.PROJECTOR_APPLY_FAILURES.inc()
                delay = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
                attempt += 1
                log.warning(
                    "writing %d runs to PostgreSQL failed (attempt %d), retrying in %.1f s: %s",
                    len(batch.runs),
                    attempt,
                    delay,
                    exc,
                )
                # The lag gauge must keep moving while nothing is applied, or an outage
                # would look like a projector that is keeping up.
                self._refresh_lag()
                if stop.wait(delay):
                    return  # not committed: the next projector replays the batch
        metrics.PROJECTOR_LAST_APPLIED.set(time.time())
        child(metrics.PROJECTOR_APPLIED, "workflow").inc(batch.workflows)
        child(metrics.PROJECTOR_APPLIED, "tombstone").inc(len(batch.tombstones))
        child(metrics.PROJECTOR_APPLIED, "skipped").inc(batch.skipped)
        offsets = [TopicPartition(self.topic, p, o) for p, o in batch.next_offsets.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:
            # A rebalance took the partition: its new owner replays from the last commit,
            # which the store's revision guard absorbs.
            log.info("offset commit failed (replayed by the next owner): %s", exc)

    def _apply_each(self, batch: Collapsed) -> None:
        for run in batch.runs.values():
            try:
                self.store.apply([run])
            except _REFUSED as exc:
                batch.skipped += 1
                batch.workflows -= 1
                metrics.PROJECTOR_UNREADABLE.inc()
                row = run[0]
                log.error(
                    "PostgreSQL refused workflow %r run %r (partition %d offset %d), skipped: %s",
                    row.workflow_id,
                    row.run_id,
                    row.partition,
                    row.offset,
                    exc,
                    extra={
                        "workflow_id": row.workflow_id,
                        "run_id": row.run_id,
                        "partition": row.partition,
                        "offset": row.offset,
                    },
                )
        self.store.apply([], batch.tombstones)

    def _refresh_lag(self) -> None:
        now = time.monotonic()
        if now < self._next_lag or not self._assigned:
            return
        self._next_lag = now + _LAG_EVERY_S
        for partition in sorted(self._assigned):
            tp = TopicPartition(self.topic, partition)
            try:
                _, high = self.consumer.get_watermark_offsets(tp, timeout=2.0, cached=False)
                position = self.consumer.position([tp])[0].offset
                if position < 0:
                    committed = self.consumer.committed([tp], timeout=2.0)[0].offset
                    position = committed if committed >= 0 else 0
            except Exception as exc:
                log.debug("lag of partition %d unknown: %s", partition, exc)
                continue
            # Not child(): its cache would keep a child that a revoke removed.
            metrics.PROJECTOR_LAG.labels(str(partition)).set(max(0, high - position))


def open_store(settings: ProjectorSettings) -> VisibilityStore:
    """The visibility store of ``settings``, its tables created.

    Raises:
        ConfigurationError: PostgreSQL cannot be reached (names SAGALINE_POSTGRES_DSN).
    """
    store = VisibilityStore(
        settings.postgres_dsn.get_secret_value(), connect_timeout_s=settings.db_connect_timeout_s
    )
    try:
        store.ensure_schema()
    except psycopg.Error as exc:
        raise ConfigurationError(
            f"cannot set up the visibility tables in PostgreSQL (SAGALINE_POSTGRES_DSN): "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        ) from exc
    return store


def require_history_topic(settings: ProjectorSettings, timeout_s: float = 30.0) -> None:
    """Fail at start, not in a loop of consumer errors, when the history topic is missing.

    Raises:
        ConfigurationError: Kafka is out of reach, or the topic does not exist.
    """
    from confluent_kafka import KafkaException  # noqa: PLC0415
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    topic = settings.topics.history
    try:
        found = AdminClient(settings.kafka_common()).list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise ConfigurationError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} (SAGALINE_KAFKA_BOOTSTRAP) "
            f"within {timeout_s:g} s: {exc}"
        ) from exc
    meta = found.get(topic)
    if meta is None or meta.error is not None:
        raise ConfigurationError(
            f"topic {topic} does not exist: create the topics (sagaline topics create) or "
            f"check SAGALINE_TOPIC_PREFIX ({settings.topic_prefix!r})"
        )


def run_projector(settings: ProjectorSettings, stop: threading.Event) -> None:
    """Run the projector, and the web UI when ``settings.ui_port`` is set, until ``stop``.

    Raises:
        ConfigurationError: PostgreSQL or Kafka cannot be reached, the history topic is
            missing, or the UI's port cannot be bound.
    """
    require_history_topic(settings)
    store = open_store(settings)
    ui: Any = None
    if settings.ui_port:
        from orchestrator.visibility.ui import start_ui  # noqa: PLC0415 (optional part)

        ui = start_ui(settings)
        log.info("web UI at %s", ui.url)
    try:
        Projector(settings, store).run(stop)
    finally:
        if ui is not None:
            ui.close()
        store.close()
