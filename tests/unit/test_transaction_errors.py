"""Error paths of the transaction loop (KAFKA_EOS rules 4-8) with autospec'd clients.

Crash and timeout paths run against the real broker in tests/integration; these pin what
the loop does with each class of KafkaError, which a live broker cannot produce on demand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest.mock import NonCallableMagicMock, create_autospec

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from examples.order_saga.workflows import registry
from orchestrator.errors import FatalKafkaError, TransactionAbortableError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.partitioning import partition_for
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import StartWorkflow, WorkflowRecord, WorkflowStatus
from orchestrator.runtime.fencing import offset_metadata, owner_of
from orchestrator.runtime.inputs import Batch, Input, Ref
from orchestrator.runtime.loop import Orchestrator
from orchestrator.runtime.state import PartitionState
from orchestrator.settings import OrchestratorSettings

CODEC = AvroCodec()


@pytest.fixture
def orch() -> Iterator[Orchestrator]:
    settings = OrchestratorSettings(
        kafka_bootstrap="127.0.0.1:1",
        topic_prefix="unit",
        instance_id="u1",
        metrics_port=0,
        session_timeout_ms=6000,
        transaction_timeout_ms=10_000,
    )
    loop = Orchestrator(settings, registry)
    # Clients are created without connecting; swap them for autospec'd doubles.
    loop.consumer.close()
    loop.restorer.close()
    loop.consumer = create_autospec(Consumer, instance=True)
    loop.producer = create_autospec(Producer, instance=True)
    loop.txn.producer = loop.producer
    loop.processor.partition_count = 4
    loop.processor.directory.exists = lambda topic: True  # type: ignore[method-assign]
    loop.processor.directory.max_message_bytes = lambda topic: None  # type: ignore[method-assign]
    for partition in (0, 1):
        loop.store.install(PartitionState(partition))
        loop._committed[partition] = 5
    yield loop


def _double(client: object) -> NonCallableMagicMock:
    """A client the fixture replaced, typed as the autospec'd mock it is."""
    assert isinstance(client, NonCallableMagicMock), client
    return client


def _stage_one(loop: Orchestrator, partition: int = 0, wid: str = "wf-1") -> WorkflowRecord:
    record = WorkflowRecord(wid, "order.process", WorkflowStatus.RUNNING, encode_json({}), 1, 1)
    loop.txn.open = True
    loop._batch.inputs += 3
    loop._batch.offsets[partition] = 8
    loop.store.stage(partition, record, CODEC.encode_workflow(record))
    return record


def _error(code: int = KafkaError._STATE, **flags: bool) -> KafkaException:
    return KafkaException(KafkaError(code, "injected", **flags))


def test_an_abortable_commit_aborts_drops_staged_state_and_rewinds(orch: Orchestrator) -> None:
    producer, consumer = _double(orch.producer), _double(orch.consumer)
    _stage_one(orch)
    producer.commit_transaction.side_effect = _error(txn_requires_abort=True)
    orch._commit_batch()
    producer.abort_transaction.assert_called_once()
    consumer.seek.assert_called_once_with(TopicPartition("unit.inbox", 0, 5))
    assert orch.store.staged() == []
    assert orch.store.partition(0).open == {}, "an aborted change must not reach memory"
    assert not orch.txn.open and orch._batch.inputs == 0
    assert orch._committed[0] == 5


def test_a_retriable_error_repeats_the_same_call_then_commits(orch: Orchestrator) -> None:
    producer = _double(orch.producer)
    record = _stage_one(orch)
    producer.send_offsets_to_transaction.side_effect = [_error(retriable=True), None]
    orch._commit_batch()
    first, second = producer.send_offsets_to_transaction.call_args_list
    assert first == second, "a retried send_offsets_to_transaction must repeat its arguments"
    producer.abort_transaction.assert_not_called()
    assert orch.store.cached("wf-1") == record
    assert orch._committed[0] == 8
    offsets = first.args[0]
    assert [(tp.partition, tp.offset) for tp in offsets] == [(0, 8), (1, 5)], (
        "every owned partition's offset is sent, with or without new inputs"
    )
    assert {owner_of(tp.metadata) for tp in offsets} == {"unit.orchestrator.u1"}, (
        "committed offsets name their writer, so a successor can fence it"
    )


def test_a_fatal_error_stops_the_loop_with_nothing_promoted(orch: Orchestrator) -> None:
    _stage_one(orch)
    _double(orch.producer).commit_transaction.side_effect = _error(fatal=True)
    with pytest.raises(FatalKafkaError):
        orch._commit_batch()
    assert orch._committed[0] == 5
    assert orch.store.partition(0).open == {}


def test_lost_partitions_abort_and_rewind_only_the_partitions_kept(orch: Orchestrator) -> None:
    producer, consumer = _double(orch.producer), _double(orch.consumer)
    _stage_one(orch, 0, "wf-0")
    _stage_one(orch, 1, "wf-1")
    orch._on_lost(orch.consumer, [TopicPartition("unit.inbox", 0)])
    producer.abort_transaction.assert_called_once()
    consumer.seek.assert_called_once_with(TopicPartition("unit.inbox", 1, 5))
    assert not orch.store.owns(0) and orch.store.owns(1)
    assert orch.store.staged() == []


def _start(wid: str, partition: int, offset: int) -> Message:
    value = CODEC.encode_inbox(StartWorkflow(wid, "order.process", encode_json(_order(wid)), 1))
    return Message(
        topic="unit.inbox", partition=partition, offset=offset, key=wid.encode(), value=value
    )


def _order(wid: str) -> dict[str, Any]:
    return {"order_id": wid, "items": [], "total": 1, "card": "visa", "address": "x"}


def _wid_on(partition: int) -> str:
    i = 0
    while partition_for(f"w-{i}".encode(), 4) != partition:
        i += 1
    return f"w-{i}"


def test_a_record_refused_at_delivery_parks_its_input_on_the_retry(orch: Orchestrator) -> None:
    """An asynchronous delivery failure dooms the transaction; the retry must differ."""
    callbacks: list[tuple[str, Callable[[Any, Any], None]]] = []

    def produce(topic: str, **kwargs: Any) -> None:
        callbacks.append((topic, kwargs["on_delivery"]))

    def commit(timeout: float) -> None:
        for topic, report in callbacks:
            if ".tasks." in topic:
                sent = Message(topic=topic, partition=0, offset=-1, key=b"k", value=b"v" * 9)
                report(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"), sent)
        raise _error(txn_requires_abort=True)

    producer, consumer = _double(orch.producer), _double(orch.consumer)
    producer.produce.side_effect = produce
    producer.commit_transaction.side_effect = commit
    wid = _wid_on(0)
    message = _start(wid, 0, 5)
    consumer.consume.side_effect = [[message], [], [message], []]
    orch._poll_once()
    orch._commit_batch()
    assert orch.processor.poison[Ref("input", 0, 5)][0] == 1
    producer.commit_transaction.side_effect = None
    callbacks.clear()
    orch._poll_once()  # the rewound input again
    orch._commit_batch()
    parked = orch.store.cached(wid) or CODEC.decode_workflow(orch.store.partition(0).open[wid])
    assert parked.status is WorkflowStatus.STUCK
    assert parked.failure is not None and parked.failure.error_type == "UndeliverableRecord"
    assert not any(".tasks." in topic for topic, _ in callbacks), "no task sent on the retry"


def test_a_batch_commits_before_its_time_budget_and_keeps_the_rest(orch: Orchestrator) -> None:
    messages = [_start(_wid_on(1), 1, 5 + i) for i in range(4)]
    _double(orch.consumer).consume.side_effect = [messages, []]
    orch.txn.open = True
    orch.txn.started = time.monotonic() - orch._budget_s  # the transaction is out of time
    orch._poll_once()
    assert orch._carry == messages, "nothing more is processed once the budget is spent"
    assert orch._batch_due()


def test_offset_metadata_round_trips() -> None:
    assert owner_of(offset_metadata("g.i")) == "g.i"
    assert owner_of("someone else's") is None and owner_of(None) is None


def test_an_abort_mid_poll_rewinds_the_partitions_of_messages_not_processed_yet(
    orch: Orchestrator,
) -> None:
    """Consumed but unprocessed inputs must be read again, not skipped until a restart."""
    consumer = _double(orch.consumer)
    messages = [_start(_wid_on(0), 0, 5), _start(_wid_on(1), 1, 5)]
    consumer.consume.side_effect = [messages, []]
    orch.txn.open, orch.txn.started = True, time.monotonic()

    def fail(msg: Message, batch: Batch, now_ms: int) -> None:
        raise TransactionAbortableError("injected")

    orch.processor.process = fail  # type: ignore[method-assign]
    orch._poll_once()
    seeks = {call.args[0].partition for call in consumer.seek.call_args_list}
    assert seeks == {0, 1}, seeks


def test_a_size_refusal_of_a_record_that_fits_alone_blames_the_batch_not_the_input(
    orch: Orchestrator,
) -> None:
    """A topic checks its limit against whole batches: innocent records fail together."""
    producer, consumer = _double(orch.producer), _double(orch.consumer)
    callbacks: list[tuple[str, Callable[[Any, Any], None]]] = []
    producer.produce.side_effect = lambda topic, **kw: callbacks.append((topic, kw["on_delivery"]))

    def commit(timeout: float) -> None:
        for topic, report in callbacks:
            if ".tasks." in topic:
                sent = Message(topic=topic, partition=0, offset=-1, key=b"k", value=b"v" * 500)
                report(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "batch too large"), sent)
        raise _error(txn_requires_abort=True)

    producer.commit_transaction.side_effect = commit
    orch.processor.directory.max_message_bytes = lambda topic: 4096  # type: ignore[method-assign]
    message = _start(_wid_on(0), 0, 5)
    consumer.consume.side_effect = [[message], []]
    orch._poll_once()
    orch._commit_batch()
    assert orch.processor.poison == {}, "no input is blamed for its batch's size"
    assert orch._careful == {"unit.tasks.inventory"}, "the topic's records now go one by one"


def test_a_redrive_is_attributed_to_its_workflow() -> None:
    assert Input(3, -1, b"wf-9", b"", held=True).ref == Ref("workflow", 3, "wf-9")
    assert Input(3, 17, b"wf-9", b"x").ref == Ref("input", 3, 17)
