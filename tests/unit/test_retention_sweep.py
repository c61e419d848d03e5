"""Retention asks its hook before it tombstones, and does not let the workflows the hook
keeps hold back the rest of the partition."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.records import WorkflowStatus
from orchestrator.protocol.topics import Topics
from orchestrator.runtime.inputs import Batch, InputProcessor
from orchestrator.runtime.state import PartitionState, WorkflowStore
from orchestrator.transport import TopicDirectory
from orchestrator.workflow import WorkflowRegistry
from tests.unit.test_runtime_requests import _Listing

NOW = 10_000_000


class _Keeps:
    """A hook that never releases ``kept``, and records what it was asked."""

    def __init__(self, *kept: str) -> None:
        self.kept = set(kept)
        self.asked: list[dict[str, str]] = []

    def release(self, partition: int, runs: Mapping[str, str]) -> Collection[str]:
        self.asked.append(dict(runs))
        return [wid for wid in runs if wid not in self.kept]


def _processor(hook: _Keeps, *closed: str) -> tuple[InputProcessor, PartitionState]:
    store = WorkflowStore()
    state = PartitionState(0)
    store.install(state)
    for i, wid in enumerate(closed):
        state.closed[wid] = i  # long past retention, in closing order
        state.closed_runs[wid] = (WorkflowStatus.COMPLETED, f"run-{wid}", None, ())
    processor = InputProcessor(
        codec=AvroCodec(),
        store=store,
        topics=Topics(),
        directory=TopicDirectory(_Listing()),
        registry=WorkflowRegistry(),
        max_events=1_000,
        max_record_bytes=900_000,
        partition_count=1,
        retention_hook=hook,
    )
    return processor, state


def test_the_hook_is_asked_with_each_closed_runs_id_and_only_released_ones_go() -> None:
    hook = _Keeps("a")
    processor, _ = _processor(hook, "a", "b")
    batch = Batch(opened=0.0)
    processor.sweep(NOW, 1_000, batch, limit=10)
    assert hook.asked == [{"a": "run-a", "b": "run-b"}]
    assert batch.tombstones == 1
    assert processor.store.staged_record("b") is None and "a" in processor.store.partition(0).closed


def test_workflows_the_hook_keeps_do_not_fill_every_later_sweep() -> None:
    hook = _Keeps("a", "b")
    processor, state = _processor(hook, "a", "b", "c", "d")
    processor.sweep(NOW, 1_000, Batch(opened=0.0), limit=2)
    assert list(hook.asked[-1]) == ["a", "b"]
    # The next sweep, within the minute, skips the two kept and reaches the others.
    processor.sweep(NOW + 1_000, 1_000, Batch(opened=0.0), limit=2)
    assert list(hook.asked[-1]) == ["c", "d"]
    # A minute on, the kept ones are asked about again.
    for wid in ("c", "d"):
        del state.closed[wid]  # their tombstones committed
    processor.sweep(NOW + 61_000, 1_000, Batch(opened=0.0), limit=2)
    assert list(hook.asked[-1]) == ["a", "b"]
