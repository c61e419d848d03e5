"""The orchestrator's wake path without a broker: the timer index, the InputProcessor and
what happens when Kafka refuses what a wake produced."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import ResumeWorkflow, StartWorkflow, WorkflowStatus
from orchestrator.protocol.topics import Topics
from orchestrator.runtime.inputs import Batch, Input, InputProcessor
from orchestrator.runtime.state import PartitionState, WorkflowStore
from orchestrator.transport import TopicDirectory


class _Listing:
    """Metadata that says every tasks topic exists (no broker in unit tests)."""

    def list_topics(self, topic: str | None = None, timeout: float = 0) -> Any:
        found = SimpleNamespace(partitions={0: SimpleNamespace()}, error=None)
        return SimpleNamespace(topics={"sagaline.tasks.p": found})


async def _sleeps_then_works(ctx: WorkflowContext, _: Any) -> int:
    await ctx.sleep(10)
    await ctx.activity("p.work")
    return 1


def _processor() -> tuple[InputProcessor, WorkflowStore, AvroCodec]:
    registry = WorkflowRegistry()
    registry.workflow("t")(_sleeps_then_works)
    codec, store = AvroCodec(), WorkflowStore()
    store.install(PartitionState(0))
    processor = InputProcessor(
        codec=codec,
        store=store,
        topics=Topics(),
        directory=TopicDirectory(_Listing()),
        registry=registry,
        max_events=1_000,
        max_record_bytes=900_000,
        partition_count=1,
    )
    start = StartWorkflow("wf", "t", encode_json(None), 0)
    processor.apply_input(Input(0, 0, b"wf", codec.encode_inbox(start)), start, Batch(0.0), 0)
    store.promote()
    return processor, store, codec


def test_a_due_timer_fires_in_the_batch_and_leaves_the_index_until_committed() -> None:
    processor, store, codec = _processor()
    state = store.partition(0)
    assert state.wake == {"wf": 10_000}
    batch = Batch(0.0)
    assert state.due(9_999, 10) == []
    for wid in state.due(10_000, 10):
        processor.wake(0, wid, batch, 10_000)
    assert [o.topic for o in batch.outputs] == ["sagaline.tasks.p"]
    assert state.due(10_000, 10) == [], "woken once per batch"
    store.promote()
    assert state.wake == {}, "waiting on its activity now: nothing due"
    assert codec.decode_workflow(state.open["wf"]).wake_at_ms is None


def test_a_wake_whose_records_kafka_refused_parks_the_workflow_and_resume_wakes_it() -> None:
    processor, store, codec = _processor()
    state = store.partition(0)
    batch = Batch(0.0)
    for wid in state.due(20_000, 10):
        processor.wake(0, wid, batch, 20_000)
    processor.mark_poisoned(batch.outputs[0].ref, "TOPIC_AUTHORIZATION_FAILED")
    store.discard_staged()  # the transaction aborted
    assert state.wake == {"wf": 10_000}, "still due"
    batch = Batch(0.0)
    for wid in state.due(21_000, 10):
        processor.wake(0, wid, batch, 21_000)
    store.promote()
    parked = codec.decode_workflow(state.open["wf"])
    assert parked.status is WorkflowStatus.STUCK and parked.failure is not None
    assert parked.failure.error_type == "UndeliverableRecord"
    assert "TOPIC_AUTHORIZATION_FAILED" in parked.failure.message
    assert state.wake == {} and state.stuck == {"wf"}
    # The operator fixes the ACL and resumes: the timer is due again at once.
    resume = ResumeWorkflow("wf", 22_000)
    processor.apply_input(
        Input(0, 1, b"wf", codec.encode_inbox(resume)), resume, Batch(0.0), 22_000
    )
    store.promote()
    assert state.wake == {"wf": 10_000} and state.stuck == set()
