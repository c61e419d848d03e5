"""Error paths of the transaction loop (KAFKA_EOS rules 4-6) with autospec'd clients.

Crash and timeout paths run against the real broker in tests/integration; these pin what
the loop does with each class of KafkaError, which a live broker cannot produce on demand.
"""

from __future__ import annotations

from collections.abc import Iterator
from unittest.mock import create_autospec

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from examples.order_saga.workflows import registry
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import WorkflowRecord, WorkflowStatus
from orchestrator.runtime.loop import FatalKafkaError, Orchestrator
from orchestrator.runtime.state import PartitionState
from orchestrator.settings import OrchestratorSettings


@pytest.fixture
def orch() -> Iterator[Orchestrator]:
    settings = OrchestratorSettings(
        kafka_bootstrap="127.0.0.1:1",
        topic_prefix="unit",
        instance_id="u1",
        metrics_port=0,
        session_timeout_ms=6000,
    )
    loop = Orchestrator(settings, registry)
    # Clients are created without connecting; swap them for autospec'd doubles.
    loop.consumer.close()
    loop.restorer.close()
    loop.consumer = create_autospec(Consumer, instance=True)
    loop.producer = create_autospec(Producer, instance=True)
    loop.store.install(PartitionState(0))
    loop._committed[0] = 5
    yield loop


def _stage_one(loop: Orchestrator) -> WorkflowRecord:
    record = WorkflowRecord("wf-1", "order.process", WorkflowStatus.RUNNING, encode_json({}), 1, 1)
    loop._in_txn = True
    loop._batch.inputs = 3
    loop._batch.offsets[0] = 8
    loop.store.stage(0, record, loop.codec.encode_workflow(record))
    return record


def _error(**flags: bool) -> KafkaException:
    return KafkaException(KafkaError(KafkaError._STATE, "injected", **flags))


def test_an_abortable_commit_aborts_drops_staged_state_and_rewinds(orch: Orchestrator) -> None:
    _stage_one(orch)
    orch.producer.commit_transaction.side_effect = _error(txn_requires_abort=True)
    orch._commit_batch()
    orch.producer.abort_transaction.assert_called_once()
    orch.consumer.seek.assert_called_once_with(TopicPartition("unit.inbox", 0, 5))
    assert orch.store.get(0, "wf-1") is None, "an aborted change must not reach memory"
    assert orch.store.staged() == []
    assert not orch._in_txn and orch._batch.inputs == 0
    assert orch._committed[0] == 5


def test_a_retriable_error_repeats_the_same_call_then_commits(orch: Orchestrator) -> None:
    record = _stage_one(orch)
    orch.producer.send_offsets_to_transaction.side_effect = [_error(retriable=True), None]
    orch._commit_batch()
    first, second = orch.producer.send_offsets_to_transaction.call_args_list
    assert first == second, "a retried send_offsets_to_transaction must repeat its arguments"
    orch.producer.abort_transaction.assert_not_called()
    assert orch.store.get(0, "wf-1") == record
    assert orch._committed[0] == 8


def test_a_fatal_error_stops_the_loop_with_nothing_promoted(orch: Orchestrator) -> None:
    _stage_one(orch)
    orch.producer.commit_transaction.side_effect = _error(fatal=True)
    with pytest.raises(FatalKafkaError):
        orch._commit_batch()
    assert orch._committed[0] == 5
    assert orch.store.get(0, "wf-1") is not None  # still only staged
    assert orch.store._partitions[0].workflows == {}


def test_lost_partitions_abort_without_seeking(orch: Orchestrator) -> None:
    _stage_one(orch)
    orch._on_lost(orch.consumer, [TopicPartition("unit.inbox", 0)])
    orch.producer.abort_transaction.assert_called_once()
    orch.consumer.seek.assert_not_called()
    assert not orch.store.owns(0)
