"""Local activities through the orchestrator shell without a broker: the real
``InputProcessor`` over one partition with a fake topic listing, the loop's commit played
by hand (promote). What one input does with the local steps it reaches: a saga closed in
the start's own transaction, a run that continues as new after a local step, a parked
workflow un-parked by another input, the per-input attempt cap, and the input's clock."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityResult,
    ActivityScheduled,
    ActivityStatus,
    InboxBody,
    SignalWorkflow,
    StartWorkflow,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.protocol.topics import Topics
from orchestrator.replay import Transition, pending_tasks
from orchestrator.runtime import local
from orchestrator.runtime.inputs import Batch, Input, InputProcessor
from orchestrator.runtime.local import LocalRunner
from orchestrator.runtime.state import PartitionState, WorkflowStore
from orchestrator.transport import TopicDirectory
from participants import ActivityContext
from tests.unit.conftest import T0

TOPICS = Topics()
WID = "wf"


class _Listing:
    def list_topics(self, topic: str | None = None, timeout: float = 0) -> Any:
        found = SimpleNamespace(partitions={0: SimpleNamespace()}, error=None)
        names = (TOPICS.tasks("p"), TOPICS.replies, TOPICS.inbox, TOPICS.history)
        return SimpleNamespace(topics={name: found for name in names})


class _Shell:
    """One partition of an orchestrator: feed inputs, commit, read what was produced."""

    def __init__(self, registry: WorkflowRegistry) -> None:
        self.codec = AvroCodec()
        self.store = WorkflowStore()
        self.store.install(PartitionState(0))
        self.offset = 0
        self.written: list[WorkflowRecord] = []
        self.last: WorkflowRecord | None = None
        self.processor = InputProcessor(
            codec=self.codec,
            store=self.store,
            topics=TOPICS,
            directory=TopicDirectory(_Listing()),
            registry=registry,
            max_events=1_000,
            max_record_bytes=900_000,
            partition_count=1,
            local=LocalRunner(registry.local_activities, inline=registry.inline_local_activities),
        )

    def feed(self, body: InboxBody, now_ms: int) -> Batch:
        batch = Batch(0.0)
        item = Input(0, self.offset, WID.encode(), self.codec.encode_inbox(body))
        self.offset += 1
        self.processor.apply_input(item, body, batch, now_ms)
        return self._commit(batch)

    def wake(self, now_ms: int) -> Batch:
        batch = Batch(0.0)
        self.processor.wake(0, WID, batch, now_ms)
        return self._commit(batch)

    def _commit(self, batch: Batch) -> Batch:
        """Note what the batch writes (ended runs, then the staged records), then commit."""
        self.written = [
            self.codec.decode_workflow(o.value)
            for o in batch.outputs
            if o.topic == TOPICS.history and o.value is not None
        ]
        self.written += [r for _, _, r, _ in self.store.staged() if r is not None]
        if self.written:
            self.last = self.written[-1]
        self.store.promote()
        return batch

    def replies(self, batch: Batch) -> list[Any]:
        return [
            self.codec.decode_reply(o.value)
            for o in batch.outputs
            if o.topic == TOPICS.replies and o.value is not None
        ]


def _last(shell: _Shell) -> WorkflowRecord:
    assert shell.last is not None
    return shell.last


def _start(workflow_type: str, value: Any = None, request_id: str | None = None) -> StartWorkflow:
    return StartWorkflow(WID, workflow_type, encode_json(value), T0, request_id)


def _registry() -> tuple[WorkflowRegistry, list[str]]:
    registry = WorkflowRegistry()
    ran: list[str] = []

    @registry.local_activity("add", inline=True)
    def add(value: int, *, ctx: ActivityContext) -> int:
        ran.append(f"add {value}")
        return value + 1

    return registry, ran


def test_a_saga_of_local_steps_closes_in_the_starts_transaction_and_says_so() -> None:
    registry, ran = _registry()

    @registry.workflow("w")
    async def workflow(ctx: WorkflowContext, _: Any) -> int:
        total = 0
        for _ in range(3):
            total = await ctx.local_activity("add", total)
        return total

    shell = _Shell(registry)
    batch = Batch(0.0)
    body = _start("w", request_id="r1")
    shell.processor.apply_input(
        Input(0, 0, WID.encode(), shell.codec.encode_inbox(body)), body, batch, T0 + 5
    )
    staged = [r for _, _, r, _ in shell.store.staged() if r is not None]
    assert [r.status for r in staged] == [WorkflowStatus.COMPLETED]
    record = staged[0]
    assert [type(e).__name__ for e in record.events if "Activity" in type(e).__name__] == [
        "ActivityScheduled",
        "ActivityCompleted",
    ] * 3
    # Every event at the input's time: workflow time does not run while handlers do.
    assert {e.at_ms for e in record.events if isinstance(e, ActivityCompleted)} == {T0 + 5}
    replies = [
        shell.codec.decode_reply(o.value) for o in batch.outputs if o.topic == TOPICS.replies
    ]
    assert [(r.status, r.created) for r in replies] == [("COMPLETED", True)]
    assert ran == ["add 0", "add 1", "add 2"]
    assert batch.dead_letters == 0 and not [o for o in batch.outputs if o.topic == TOPICS.dlq]


def test_a_run_that_continues_as_new_after_a_local_step_takes_one_run_per_wake() -> None:
    registry, ran = _registry()

    @registry.workflow("poller")
    async def poller(ctx: WorkflowContext, n: int) -> int:
        seen: int = await ctx.local_activity("add", n)
        if seen < 3:
            ctx.continue_as_new(seen)
        return seen

    shell = _Shell(registry)
    batch = shell.feed(_start("poller", 0, request_id="r1"), T0)
    first, second = shell.written
    # The ended run is written, closed, before the run that continues it.
    assert first.status is WorkflowStatus.CONTINUED_AS_NEW
    assert second.status is WorkflowStatus.RUNNING and second.run_id != first.run_id
    # The new run's local step waits for its wake-up, due at once.
    assert second.wake_at_ms == T0
    assert [(t.participant, t.activity) for t in pending_tasks(second)] == [("local", "add")]
    assert ran == ["add 0"]
    replies = [
        shell.codec.decode_reply(o.value) for o in batch.outputs if o.topic == TOPICS.replies
    ]
    assert [(r.run_id, r.status) for r in replies] == [(first.run_id, "CONTINUED_AS_NEW")]
    assert batch.dead_letters == 0  # the start's input is the first run's, not the second's

    batch = shell.wake(T0 + 1)
    assert [r.status for r in shell.written] == [
        WorkflowStatus.CONTINUED_AS_NEW,
        WorkflowStatus.RUNNING,
    ]
    shell.wake(T0 + 2)
    assert _last(shell).status is WorkflowStatus.COMPLETED
    assert ran == ["add 0", "add 1", "add 2"]


def test_an_unparked_workflow_runs_the_local_step_it_left_pending() -> None:
    registry, ran = _registry()

    async def broken(ctx: WorkflowContext, _: Any) -> Any:
        remote = ctx.activity("p.remote")
        first, second = ctx.local_activity("add", 1), ctx.local_activity("add", 10)
        await first
        await ctx.local_activity(42)  # type: ignore[arg-type]  # a bug: parks the workflow
        return [await second, await remote]

    async def fixed(ctx: WorkflowContext, _: Any) -> Any:
        remote = ctx.activity("p.remote")
        first, second = ctx.local_activity("add", 1), ctx.local_activity("add", 10)
        await first
        return [await second, await remote]

    registry.workflow("w")(broken)
    shell = _Shell(registry)
    batch = shell.feed(_start("w"), T0)
    assert _last(shell).status is WorkflowStatus.STUCK
    assert ran == ["add 1"]
    task = shell.codec.decode_task(
        next(o.value for o in batch.outputs if o.topic == TOPICS.tasks("p") and o.value)
    )
    registry._functions["w"] = fixed  # the fix is deployed
    # The remote step's result arrives before any resume: it un-parks the workflow.
    done = ActivityResult(
        WID,
        task.activity_id,
        task.seq,
        task.attempt,
        ActivityStatus.COMPLETED,
        T0,
        encode_json("r"),
    )
    shell.feed(done, T0 + 10)
    assert ran == ["add 1", "add 10"]
    assert _last(shell).status is WorkflowStatus.COMPLETED


def test_one_input_runs_at_most_the_cap_and_the_rest_on_the_next_wake(monkeypatch: Any) -> None:
    monkeypatch.setattr(local, "MAX_ATTEMPTS_PER_INPUT", 4)
    registry, ran = _registry()

    @registry.workflow("w")
    async def workflow(ctx: WorkflowContext, _: Any) -> int:
        total = 0
        for _ in range(10):
            total = await ctx.local_activity("add", total)
        return total

    shell = _Shell(registry)
    shell.feed(_start("w"), T0)
    record = _last(shell)
    assert len(ran) == 4 and record.status is WorkflowStatus.RUNNING
    assert record.wake_at_ms == T0
    shell.wake(T0 + 1)
    assert len(ran) == 8
    shell.wake(T0 + 2)
    record = _last(shell)
    assert record.status is WorkflowStatus.COMPLETED and len(ran) == 10
    steps = [e for e in record.events if isinstance(e, ActivityScheduled)]
    assert [e.seq for e in steps] == list(range(10))  # each step once, in order


def test_a_pending_local_step_stays_due_whatever_input_writes_the_record_next() -> None:
    registry, ran = _registry()

    @registry.workflow("poller")
    async def poller(ctx: WorkflowContext, n: int) -> int:
        seen: int = await ctx.local_activity("add", n)
        if seen < 2:
            ctx.continue_as_new(seen)
        return seen

    shell = _Shell(registry)
    shell.feed(_start("poller", 0), T0)
    assert ran == ["add 0"] and _last(shell).wake_at_ms == T0
    # A signal reaches the new run before its wake-up: its record still asks for one.
    shell.feed(SignalWorkflow(WID, "nudge", encode_json(None), "s1", T0), T0 + 5)
    record = _last(shell)
    assert record.status is WorkflowStatus.RUNNING and record.wake_at_ms == T0
    assert ran == ["add 0"]
    shell.wake(T0 + 6)
    assert _last(shell).status is WorkflowStatus.COMPLETED and ran == ["add 0", "add 1"]


def test_a_start_whose_continued_run_cannot_be_planned_is_parked_as_it_came() -> None:
    registry, ran = _registry()

    @registry.workflow("w")
    async def workflow(ctx: WorkflowContext, n: int) -> Any:
        if n == 0:
            await ctx.local_activity("add", n)
            ctx.continue_as_new(1)
        return await ctx.activity("missing.step")  # no tasks topic

    shell = _Shell(registry)
    shell.feed(_start("w", 0), T0)
    # Nothing of the first run is written: the start is parked, and a resume applies it
    # again from the beginning (its local step runs again: at least once).
    assert [r.status for r in shell.written] == [WorkflowStatus.STUCK]
    assert _last(shell).input == encode_json(0)
    assert ran == ["add 0"]


def test_a_wake_whose_local_outcomes_are_all_ignored_writes_nothing(monkeypatch: Any) -> None:
    registry, ran = _registry()

    @registry.workflow("w")
    async def workflow(ctx: WorkflowContext, _: Any) -> int:
        value: int = await ctx.local_activity("add", 1)
        return value

    shell = _Shell(registry)
    monkeypatch.setattr(local, "MAX_SECONDS_PER_INPUT", 0.0)  # the start runs no attempt
    shell.feed(_start("w"), T0)
    assert ran == [] and _last(shell).wake_at_ms == T0
    monkeypatch.setattr(local, "MAX_SECONDS_PER_INPUT", 2.0)
    monkeypatch.setattr(local, "advance", lambda *args, **kwargs: Transition(None, ignored="x"))
    batch = shell.wake(T0 + 1)
    # The handler ran, its outcome was ignored: no record staged, the wake is ignored.
    assert ran == ["add 1"] and shell.written == [] and batch.ignored
