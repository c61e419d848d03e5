"""How the orchestrator keeps its per-partition gauges: stuck workflows and their age, inbox
lag, partitions owned, and what a revoked partition leaves behind (nothing).

The loop runs with autospec'd Kafka clients, as in test_transaction_errors; the real
broker and a real Prometheus scrape of these gauges are in
tests/integration/test_prometheus_scrape.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from unittest.mock import NonCallableMagicMock, create_autospec

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from prometheus_client import REGISTRY

from examples.order_saga.workflows import registry
from orchestrator import metrics
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import WorkflowRecord, WorkflowStatus
from orchestrator.runtime.loop import Orchestrator, inbox_lag
from orchestrator.runtime.state import PartitionState, WorkflowStore
from orchestrator.settings import OrchestratorSettings

CODEC = AvroCodec()


def _record(wid: str, status: WorkflowStatus, updated_at_ms: int) -> WorkflowRecord:
    closed = updated_at_ms if status.terminal else None
    return WorkflowRecord(
        wid,
        "order.process",
        status,
        encode_json({"id": wid}),
        started_at_ms=updated_at_ms - 1_000,
        updated_at_ms=updated_at_ms,
        revision=1,
        closed_at_ms=closed,
    )


def _commit(store: WorkflowStore, partition: int, record: WorkflowRecord) -> None:
    store.stage(partition, record, CODEC.encode_workflow(record))
    store.promote()


def _restored(state: PartitionState, record: WorkflowRecord) -> None:
    """What a restore does: it knows the head, not when the workflow was parked."""
    encoded = CODEC.encode_workflow(record)
    head = CODEC.peek_workflow(encoded)
    state.put(record.workflow_id, encoded, head.status, head.closed_at_ms or 0, head.wake_at_ms)


def _sample(name: str, partition: int | None = None) -> float | None:
    labels = {} if partition is None else {"partition": str(partition)}
    return REGISTRY.get_sample_value(name, labels)


# --- the stuck index ------------------------------------------------------------------


def test_a_parked_workflow_is_dated_by_its_record_and_stays_dated_while_stuck() -> None:
    store = WorkflowStore()
    store.install(PartitionState(0))
    state = store.partition(0)
    _commit(store, 0, _record("w", WorkflowStatus.STUCK, 5_000))
    assert state.stuck_since == {"w": 5_000} and state.oldest_stuck() == 5_000
    # Re-parked for another reason later: it has been stuck since the first time.
    _commit(store, 0, _record("w", WorkflowStatus.STUCK, 9_000))
    assert state.oldest_stuck() == 5_000
    _commit(store, 0, _record("w", WorkflowStatus.RUNNING, 10_000))
    assert state.stuck_since == {} and state.oldest_stuck() is None
    _commit(store, 0, _record("w", WorkflowStatus.STUCK, 11_000))
    assert state.oldest_stuck() == 11_000, "stuck again: a new parking time"


@pytest.mark.parametrize(
    "gone",
    [
        lambda s: s.put("w", b"", WorkflowStatus.COMPENSATED, 7),
        lambda s: s.delete("w"),
        lambda s: s.mark_unwritable("w", "unreadable"),
        lambda s: s.put("w", b"", WorkflowStatus.UNKNOWN, 0),
    ],
    ids=["closed", "deleted", "unwritable", "unknown-status"],
)
def test_a_workflow_leaving_the_stuck_set_leaves_its_date(gone: object) -> None:
    state = PartitionState(0)
    state.put("w", b"x", WorkflowStatus.STUCK, 0, stuck_at=3)
    state.put("v", b"x", WorkflowStatus.STUCK, 0, stuck_at=8)
    assert callable(gone)
    gone(state)
    assert state.stuck == {"v"} and state.stuck_since == {"v": 8}
    assert state.oldest_stuck() == 8


def test_restored_stuck_workflows_are_dated_from_the_cache_first_then_boundedly() -> None:
    store = WorkflowStore()
    store.install(PartitionState(0))
    state = store.partition(0)
    records = [_record(f"w{i}", WorkflowStatus.STUCK, 1_000 * (i + 1)) for i in range(5)]
    for record in records:
        _restored(state, record)
    assert set(state.stuck_since.values()) == {0}, "a restore reads heads only"
    assert state.oldest_stuck() is None, "undated ones are not guessed at"
    store.remember("w4", records[4])  # decoded by a re-drive: dated for free
    decoded: list[bytes] = []

    def parked_at(encoded: bytes) -> int:
        decoded.append(encoded)
        return CODEC.decode_workflow(encoded).updated_at_ms

    assert store.date_stuck(0, parked_at, limit=2) == 2
    assert len(decoded) == 2 and state.stuck_since["w4"] == 5_000
    assert state.oldest_stuck() == 1_000
    assert store.date_stuck(0, parked_at, limit=2) == 0
    assert store.date_stuck(0, parked_at, limit=2) == 0 and len(decoded) == 4
    assert state.stuck_since == {f"w{i}": 1_000 * (i + 1) for i in range(5)}


# --- inbox lag ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("low", "high", "committed", "lag"),
    [
        (0, 120, 100, 20),
        (0, 100, 100, 0),
        (0, 100, 101, 0),  # a watermark cached before the last commit
        (40, 100, -2, 60),  # nothing committed yet: from the first offset kept
        (-1001, 100, -1001, None),
        (-1001, -1001, 5, None),  # no fetch response yet
    ],
)
def test_inbox_lag(low: int, high: int, committed: int, lag: int | None) -> None:
    assert inbox_lag(low, high, committed) == lag


# --- the loop's gauges ----------------------------------------------------------------


@pytest.fixture
def orch() -> Iterator[Orchestrator]:
    settings = OrchestratorSettings(
        kafka_bootstrap="127.0.0.1:1",
        topic_prefix="gauges",
        instance_id="g1",
        metrics_port=0,
        session_timeout_ms=6000,
        transaction_timeout_ms=10_000,
    )
    loop = Orchestrator(settings, registry)
    loop.consumer.close()
    loop.restorer.close()
    loop.consumer = create_autospec(Consumer, instance=True)
    loop.producer = create_autospec(Producer, instance=True)
    loop.txn.producer = loop.producer
    for partition in (0, 1):
        loop.store.install(PartitionState(partition))
    yield loop
    loop._forget([0, 1], "test over")


def _consumer(loop: Orchestrator) -> NonCallableMagicMock:
    assert isinstance(loop.consumer, NonCallableMagicMock)
    return loop.consumer


def test_refresh_sets_stuck_age_and_lag_of_each_owned_partition(orch: Orchestrator) -> None:
    watermarks = {0: (0, 250), 1: (-1001, -1001)}
    _consumer(orch).get_watermark_offsets.side_effect = lambda tp, cached: watermarks[tp.partition]
    orch._committed.update({0: 200, 1: 7})
    # Read the clock here, not at import: the full suite runs this a minute or more later.
    now_ms = int(time.time() * 1000)
    _commit(orch.store, 0, _record("old", WorkflowStatus.STUCK, now_ms - 90_000))
    _commit(orch.store, 0, _record("new", WorkflowStatus.STUCK, now_ms - 10_000))
    _restored(orch.store.partition(1), _record("r", WorkflowStatus.STUCK, now_ms - 30_000))
    orch._refresh_gauges()
    assert _sample("sagaline_workflows_in_flight_stuck", 0) == 2
    assert _sample("sagaline_workflows_in_flight_stuck", 1) == 1
    age = _sample("sagaline_workflows_stuck_oldest_age_seconds", 0)
    assert age is not None and 90 <= age < 120
    age = _sample("sagaline_workflows_stuck_oldest_age_seconds", 1)
    assert age is not None and 30 <= age < 60, "a restored stuck workflow is dated"
    assert _sample("sagaline_inbox_lag_records", 0) == 50
    assert _sample("sagaline_inbox_lag_records", 1) is None, "unknown watermarks: no sample"
    for tp in [c.args[0] for c in _consumer(orch).get_watermark_offsets.call_args_list]:
        assert tp.topic == "gauges.inbox"
    assert all(
        c.kwargs == {"cached": True} for c in _consumer(orch).get_watermark_offsets.call_args_list
    ), "the loop never waits for the broker for a gauge"


def test_refresh_runs_at_most_once_per_interval(orch: Orchestrator) -> None:
    consumer = _consumer(orch)
    consumer.get_watermark_offsets.return_value = (0, 10)
    orch._refresh_gauges()
    calls = consumer.get_watermark_offsets.call_count
    assert calls == 2
    for _ in range(100):
        orch._refresh_gauges()
    assert consumer.get_watermark_offsets.call_count == calls
    orch._next_gauges = 0.0
    orch._refresh_gauges()
    assert consumer.get_watermark_offsets.call_count == 2 * calls


def test_a_partition_the_consumer_does_not_know_keeps_no_lag(orch: Orchestrator) -> None:
    error = KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, "not assigned"))
    _consumer(orch).get_watermark_offsets.side_effect = error
    orch._refresh_gauges()
    assert _sample("sagaline_inbox_lag_records", 0) is None
    assert _sample("sagaline_workflows_stuck_oldest_age_seconds", 0) == 0


def test_a_revoked_partition_leaves_no_series_behind(orch: Orchestrator) -> None:
    _consumer(orch).get_watermark_offsets.return_value = (0, 10)
    _commit(orch.store, 1, _record("w", WorkflowStatus.STUCK, int(time.time() * 1000)))
    orch._record_metrics(orch._batch)
    orch._refresh_gauges()
    per_partition = [
        "sagaline_workflows_in_flight",
        "sagaline_workflows_closed_retained",
        "sagaline_workflows_waiting_on_time",
        "sagaline_workflows_in_flight_stuck",
        "sagaline_workflows_stuck_oldest_age_seconds",
        "sagaline_inbox_lag_records",
    ]
    assert all(_sample(name, 1) is not None for name in per_partition)
    orch._on_revoke(orch.consumer, [TopicPartition("gauges.inbox", 1)])
    assert [name for name in per_partition if _sample(name, 1) is not None] == []
    assert all(_sample(name, 0) is not None for name in per_partition), "partition 0 is kept"
    assert _sample("sagaline_partitions_owned") == 1
    # Taken back later: the cached children were dropped with the series, so updates show.
    orch.store.install(PartitionState(1))
    orch._record_metrics(orch._batch)
    orch._next_gauges = 0.0
    orch._refresh_gauges()
    assert _sample("sagaline_workflows_in_flight", 1) == 0
    assert _sample("sagaline_inbox_lag_records", 1) == 10


def test_forget_drops_the_cached_child_with_the_series() -> None:
    gauge = metrics.WORKFLOWS_IN_FLIGHT_STUCK
    metrics.child(gauge, "97").set(4)
    metrics.forget(gauge, "97")
    metrics.forget(gauge, "97")  # twice: nothing there, nothing raised
    assert _sample("sagaline_workflows_in_flight_stuck", 97) is None
    metrics.child(gauge, "97").set(5)
    assert _sample("sagaline_workflows_in_flight_stuck", 97) == 5
    metrics.forget(gauge, "97")
