"""Continue-as-new (issue 13) on the pure engine: ``ctx.continue_as_new`` closes the run
``CONTINUED_AS_NEW`` and starts the next one under the same id in the same transition,
carrying the signals no wait took; ``ctx.history_length`` lets a loop continue in time.
"""

from __future__ import annotations

from typing import Any

from orchestrator import ActivityError, Saga, WorkflowContext, WorkflowRegistry
from orchestrator.errors import ContinueAsNewError
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityResult,
    ParentRef,
    StartWorkflow,
    TerminateWorkflow,
    WakeUp,
    WorkflowStatus,
)
from orchestrator.replay import Limits, advance
from orchestrator.replay.transition import successor_run_id
from orchestrator.testing import WorkflowTester
from tests.unit.conftest import (
    WorkflowRun,
    assert_history,
    assert_status,
    completed,
    history_lines,
    registry_with,
    signal_to,
)


def _registry(fn: Any, name: str = "loop") -> WorkflowRegistry:
    return registry_with(fn, name)


_signal = signal_to


async def _counter(ctx: WorkflowContext, state: Any) -> Any:
    """Adds up ``add`` signals; continues as new every 3 of them; ``stop`` ends it."""
    total, taken = state["total"], 0
    while True:
        which = await ctx.first(ctx.wait_signal("add"), ctx.wait_signal("stop"))
        if which.name == "stop":
            return total
        total += await which
        taken += 1
        if taken == 3:
            ctx.continue_as_new({"total": total})


def test_the_run_closes_and_the_next_starts_in_the_same_transition() -> None:
    run = WorkflowRun(_registry(_counter), "loop", run_id="run-1")
    run.start({"total": 0})
    for n in (1, 2):
        run.send(_signal(run, "add", n, f"s{n}"))
    transition = run.send(_signal(run, "add", 3, "s3"))
    ended, record = transition.replaced, transition.record
    assert ended is not None and record is not None
    assert ended.status is WorkflowStatus.CONTINUED_AS_NEW and ended.run_id == "run-1"
    assert ended.closed_at_ms == run.now_ms
    assert history_lines(ended.events) == ["signal add", "signal add", "signal add"]
    assert record.status is WorkflowStatus.RUNNING
    assert record.run_id == successor_run_id("run-1") != "run-1"
    assert record.workflow_id == ended.workflow_id and record.workflow_type == "loop"
    assert decode_json(record.input) == {"total": 6}
    assert record.events == () and record.started_at_ms == run.now_ms
    run.send(_signal(run, "stop", None, "s4"))
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == 6


def test_successor_run_ids_are_stable_and_distinct() -> None:
    assert successor_run_id("a") == successor_run_id("a")
    assert successor_run_id("a") != successor_run_id("b")
    assert len(successor_run_id("a")) == 32


def test_a_workflow_that_loops_forever_keeps_a_bounded_record() -> None:
    run = WorkflowRun(_registry(_counter), "loop", run_id="run-0")
    run.start({"total": 0})
    runs, longest = {run.run_id}, 0
    for n in range(1, 61):
        transition = run.send(_signal(run, "add", n, f"s{n}"))
        assert transition.record is not None
        runs.add(transition.record.run_id)
        longest = max(longest, len(transition.record.events))
    assert len(runs) == 21  # the first run and one per three signals
    assert longest <= 3
    run.send(_signal(run, "stop", None, "end"))
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == sum(range(1, 61))


async def _batcher(ctx: WorkflowContext, state: Any) -> Any:
    """Takes one ``item`` signal per activity; continues after two."""
    done = list(state["done"])
    for _ in range(2):
        item = await ctx.wait_signal("item")
        await ctx.activity("p.handle", item)
        done.append(item)
    if len(done) >= 4:
        return done
    ctx.continue_as_new({"done": done})


def test_a_burst_of_carried_signals_may_continue_again_at_once() -> None:
    async def pairs(ctx: WorkflowContext, state: Any) -> Any:
        if state["runs"] == 0:
            await ctx.sleep(10)  # signals pile up meanwhile
        elif state["runs"] == 4:
            return state
        else:
            for _ in range(2):
                state["items"].append(await ctx.wait_signal("item"))
        ctx.continue_as_new({"items": state["items"], "runs": state["runs"] + 1})

    run = WorkflowRun(_registry(pairs), "loop", run_id="r1")
    run.start({"items": [], "runs": 0})
    for n in range(6):
        run.send(_signal(run, "item", n, f"s{n}"))
    transition = run.wake()
    # Four runs in one transition: the first continued after its sleep, two took two
    # signals each and continued at once, the last took two and returned. Only the first
    # (open before) is written as continued.
    assert transition.replaced is not None and transition.replaced.run_id == "r1"
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == {"items": [0, 1, 2, 3, 4, 5], "runs": 4}
    assert run.record.run_id == successor_run_id(
        successor_run_id(successor_run_id(successor_run_id("r1")))
    )


def test_signals_no_wait_took_are_carried_to_the_next_run_in_order() -> None:
    run = WorkflowRun(_registry(_batcher), "loop", run_id="r1")
    run.start({"done": []})
    run.send(_signal(run, "item", "a", "s-a"))  # taken; p.handle(a) runs
    for item in ("b", "c", "d"):
        run.send(_signal(run, "item", item, f"s-{item}"))  # queued while it runs
    run.complete(0)  # b is taken next
    transition = run.complete(1)  # two done: continue; c and d were never taken
    assert transition.replaced is not None and transition.record is not None
    assert [e.signal_id for e in transition.record.events[:2]] == ["s-c", "s-d"]  # type: ignore[union-attr]
    # The next run took c at once and asked for its step.
    assert_history(transition.record, ["signal item", "signal item", "sched 0#1 p.handle"])
    run.complete(0)
    run.complete(1)
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == ["a", "b", "c", "d"]


def test_results_for_the_previous_run_are_ignored() -> None:
    async def fire_and_continue(ctx: WorkflowContext, state: Any) -> Any:
        if state == "second":
            return await ctx.activity("p.slow", 2)
        ctx.activity("p.slow", 1)  # scheduled, never awaited
        await ctx.sleep(1)
        ctx.continue_as_new("second")

    run = WorkflowRun(_registry(fire_and_continue), "loop", run_id="r1")
    run.start("first")
    assert [t.activity for t in run.sent] == ["slow"]
    first_task = run.sent[0]
    transition = run.wake()
    assert transition.replaced is not None and transition.record is not None
    assert transition.record.run_id == successor_run_id("r1")
    # The old run's step reports late: its activity id names the old run.
    late = ActivityResult(
        run.workflow_id,
        first_task.activity_id,
        0,
        1,
        completed("x", 0, 1, "old", 0).status,
        run.now_ms,
        result=encode_json("old"),
    )
    assert run.send(late).ignored is not None
    run.complete(0, "new")
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == "new"


def test_a_run_that_continues_before_taking_any_step_is_parked() -> None:
    async def spin(ctx: WorkflowContext, _: Any) -> Any:
        ctx.continue_as_new(None)

    run = WorkflowRun(_registry(spin), "loop", run_id="r1")
    transition = run.start()
    assert transition.replaced is not None
    assert transition.replaced.status is WorkflowStatus.CONTINUED_AS_NEW
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    assert run.record is not None and run.record.failure is not None
    assert "just started" in run.record.failure.message


def test_code_that_swallows_the_continue_is_parked() -> None:
    async def swallow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(1)
        try:
            ctx.continue_as_new(1)
        except BaseException:
            return "went on"
        return "unreachable"

    run = WorkflowRun(_registry(swallow), "loop", run_id="r1")
    run.start()
    run.wake()
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    assert run.record is not None and run.record.failure is not None
    assert "continue_as_new" in run.record.failure.message


def test_raising_the_error_by_hand_is_a_definition_problem() -> None:
    async def by_hand(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(1)
        raise ContinueAsNewError("x")

    run = WorkflowRun(_registry(by_hand), "loop", run_id="r1")
    run.start()
    run.wake()
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")


def test_an_input_that_is_not_json_raises_in_the_code() -> None:
    async def bad_input(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(1)
        try:
            ctx.continue_as_new(object())
        except ContinueAsNewError:
            raise
        except Exception as exc:
            return type(exc).__name__

    run = WorkflowRun(_registry(bad_input), "loop", run_id="r1")
    run.start()
    run.wake()
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == "PayloadEncodingError"


def test_a_saga_block_does_not_compensate_on_continue() -> None:
    async def saga_loop(ctx: WorkflowContext, state: Any) -> Any:
        if state == "next":
            return "done"
        async with Saga(ctx) as saga:
            await ctx.activity("p.book", 1)
            saga.add_compensation("p.cancel", 1)
            ctx.continue_as_new("next")
        return "unreachable"

    run = WorkflowRun(_registry(saga_loop), "loop", run_id="r1")
    run.start()
    transition = run.complete(0)
    assert transition.replaced is not None
    assert [t.activity for t in run.sent] == ["book"]  # no compensation sent
    assert_status(run.record, WorkflowStatus.COMPLETED)


def test_history_length_grows_and_replays_the_same() -> None:
    async def measured(ctx: WorkflowContext, _: Any) -> Any:
        lengths = [ctx.history_length]
        for n in range(3):
            await ctx.activity("p.step", n)
            lengths.append(ctx.history_length)
        return lengths

    run = WorkflowRun(_registry(measured), "loop", run_id="r1")
    run.start()
    for seq in range(3):
        run.complete(seq)
    assert run.record is not None and run.record.result is not None
    # Each step adds its scheduling and its result; the code sees up to the result.
    assert decode_json(run.record.result) == [0, 2, 4, 6]


def test_a_retried_start_is_still_recognised_after_the_run_continued() -> None:
    async def once(ctx: WorkflowContext, state: Any) -> Any:
        await ctx.sleep(1)
        if state == "first":
            ctx.continue_as_new("second")
        return state

    registry = _registry(once)
    start = StartWorkflow("w", "loop", encode_json("first"), 0, request_id="req-1")
    first = advance(None, start, 1, registry, run_id="r1")
    assert first.record is not None
    woke = advance(first.record, _wake(first.record), 1_001, registry)
    assert woke.record is not None and woke.replaced is not None
    again = advance(woke.record, start, 1_002, registry, run_id="r9")
    assert again.ignored == "duplicate-start"
    assert again.reply is not None and again.reply.created and again.reply.run_id == "r1"


def _wake(record: Any) -> WakeUp:
    return WakeUp(record.workflow_id)


def test_a_child_that_continues_reports_to_its_parent_only_at_its_end() -> None:
    async def child(ctx: WorkflowContext, state: Any) -> Any:
        await ctx.sleep(1)
        if state < 2:
            ctx.continue_as_new(state + 1)
        return state

    registry = _registry(child, "child")
    parent = ParentRef("parent-1", "pr", 0)
    start = StartWorkflow("c", "child", encode_json(0), 0, request_id="child:pr:0", parent=parent)
    transition = advance(None, start, 1, registry, run_id="c1")
    record = transition.record
    reports = []
    now = 1
    while record is not None and record.status is WorkflowStatus.RUNNING:
        now += 1_000
        transition = advance(record, _wake(record), now, registry)
        reports += [m for m in transition.messages if isinstance(m, ActivityResult)]
        if transition.replaced is not None:
            assert transition.record is not None
            assert transition.record.parent == parent
            assert not reports, "a run that continued reported to the parent"
        record = transition.record
    assert record is not None and record.status is WorkflowStatus.COMPLETED
    assert len(reports) == 1 and reports[0].workflow_id == "parent-1"
    assert reports[0].result is not None and decode_json(reports[0].result) == 2


def test_a_parent_that_continues_applies_its_children_close_policy() -> None:
    async def parent(ctx: WorkflowContext, state: Any) -> Any:
        if state == "next":
            return "done"
        ctx.child_workflow("kid", 1, id="kid-1")  # started, never awaited
        await ctx.sleep(1)
        ctx.continue_as_new("next")

    registry = _registry(parent, "parent")
    first = advance(None, StartWorkflow("p", "parent", encode_json(0), 0), 1, registry, run_id="p1")
    assert first.record is not None
    assert any(isinstance(m, StartWorkflow) for m in first.messages)
    woke = advance(first.record, _wake(first.record), 1_001, registry)
    terminations = [m for m in woke.messages if isinstance(m, TerminateWorkflow)]
    assert [t.workflow_id for t in terminations] == ["kid-1"]
    assert terminations[0].parent == ParentRef("p", "p1", 0)
    assert woke.record is not None and woke.record.status is WorkflowStatus.COMPLETED


def test_the_tester_follows_the_runs() -> None:
    tester = WorkflowTester(_registry(_batcher))
    tester.activity("p.handle").returns("ok", times=10)
    for n, item in enumerate("abcd"):
        tester.signal("item", item, at=n)
    result = tester.run("loop", {"done": []})
    assert result.status is WorkflowStatus.COMPLETED
    assert result.result == ["a", "b", "c", "d"]
    assert [r.status for r in result.earlier_runs] == [WorkflowStatus.CONTINUED_AS_NEW]


def test_a_continue_that_does_not_fit_closes_the_run_at_its_last_good_state() -> None:
    async def big(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(1)
        ctx.continue_as_new("x" * 5_000)

    limits = Limits(max_record_bytes=4_000, measure=lambda r: len(r.input.data) + 500)
    run = WorkflowRun(_registry(big), "loop", run_id="r1", limits=limits, check_codec=False)
    run.start()
    transition = run.wake()
    # The next run's record could not hold its input: the run fails with the reason and
    # keeps its history; nothing starts.
    assert transition.replaced is None
    assert_status(run.record, WorkflowStatus.FAILED, "RecordTooLarge")
    assert run.record is not None and run.record.failure is not None
    assert "input of 5002 bytes" in run.record.failure.message
    assert history_lines(run.record.events) == ["timer 0 +1000", "fired 0"]


def test_activity_error_inside_a_continued_run_fails_that_run_only() -> None:
    async def fails_second(ctx: WorkflowContext, state: Any) -> Any:
        await ctx.activity("p.step", state)
        if state == 0:
            ctx.continue_as_new(1)
        return state

    run = WorkflowRun(_registry(fails_second), "loop", run_id="r1")
    run.start(0)
    transition = run.complete(0)
    assert transition.replaced is not None
    assert transition.replaced.status is WorkflowStatus.CONTINUED_AS_NEW
    run.fail(0, "Boom")
    assert_status(run.record, WorkflowStatus.FAILED, ActivityError.__name__)


def test_a_start_that_continues_at_once_answers_with_the_run_it_made() -> None:
    async def hop(ctx: WorkflowContext, state: Any) -> Any:
        if state == "first":
            ctx.continue_as_new("second")
        await ctx.sleep(1)
        return state

    registry = _registry(hop)
    start = StartWorkflow("w", "loop", encode_json("first"), 0, request_id="req-1")
    made = advance(None, start, 1, registry, run_id="r1")
    assert made.replaced is not None and made.replaced.run_id == "r1"
    assert made.record is not None and made.record.run_id == successor_run_id("r1")
    assert made.reply is not None and made.reply.run_id == "r1" and made.reply.created
    again = advance(made.record, start, 2, registry, run_id="r9")
    assert again.reply is not None and again.reply.run_id == "r1"
