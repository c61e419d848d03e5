"""The replay cache: a waiting run's coroutine kept between inputs and run on, used only
where its history continues what the coroutine ran over, and giving what a replay from the
start gives (orchestrator/replay/driver.py, ``ReplayCache``)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    Failure,
    HistoryEvent,
    Payload,
)
from orchestrator.replay.driver import (
    _UNSTOPPABLE,
    Ask,
    ReplayCache,
    ReplayResult,
    replay,
)
from orchestrator.testing import WorkflowBlockedError, WorkflowStatus, WorkflowTester
from tests.unit.conftest import unstoppable_flow

ONE = Payload(b"1")


async def _chain(ctx: WorkflowContext, steps: int) -> int:
    total = 0
    for step in range(steps):
        total += await ctx.activity("p.step", {"step": step}, result_type=int)
    return total


class _Replays:
    """Replays of one run of ``_chain`` through one cache, counting how each went."""

    def __init__(self, cache: ReplayCache, fn: Any = _chain, steps: int = 3) -> None:
        self.resumed: list[bool] = []
        cache.on_replay = self.resumed.append
        self.cache, self.fn, self.steps = cache, fn, steps
        self.events: tuple[HistoryEvent, ...] = ()

    def run(self, events: tuple[HistoryEvent, ...] | None = None) -> ReplayResult:
        if events is not None:
            self.events = events
        return replay(
            self.fn, "wf-1", "t.chain", self.steps, self.events, 0, run_id="r1", cache=self.cache
        )

    def complete_next(self, result: ReplayResult) -> ReplayResult:
        """Record the step ``result`` asked for and its completion, and replay."""
        (step,) = result.new_steps
        return self.run((*self.events, step, ActivityCompleted(step.seq, 1, ONE, step.at_ms)))


def _finish(replays: _Replays) -> ReplayResult:
    result = replays.run()
    while not result.finished:
        result = replays.complete_next(result)
    return result


def test_each_input_after_the_first_runs_the_kept_coroutine_on() -> None:
    cache = ReplayCache(10, check=True)
    replays = _Replays(cache)
    result = _finish(replays)
    assert result.value == 3 and result.payload is not None
    assert replays.resumed == [False, True, True, True]
    assert len(cache) == 0  # a finished run keeps nothing


def test_a_history_that_does_not_continue_the_kept_one_replays_from_the_start() -> None:
    cache = ReplayCache(10, check=True)
    replays = _Replays(cache)
    first = replays.run()
    second = replays.complete_next(first)
    # The transaction that wrote the second step aborted: the first input comes again.
    (step,) = first.new_steps
    again = replays.run((step, ActivityCompleted(step.seq, 1, ONE, 0)))
    assert again.new_steps == second.new_steps
    # A completion written differently from the one the code saw (a restored record
    # another instance wrote, say) is not the history the coroutine ran over either.
    other = ActivityCompleted(step.seq, 1, Payload(b"2"), 0)
    changed = replays.run((step, other, *replays.events[2:]))
    assert changed.new_steps == second.new_steps
    assert replays.resumed == [False, True, False, False]


def test_steps_recorded_other_than_the_code_asked_replay_from_the_start() -> None:
    cache = ReplayCache(10, check=True)
    replays = _Replays(cache)
    (step,) = replays.run().new_steps
    assert isinstance(step, ActivityScheduled)
    rewritten = dataclasses.replace(step, max_attempts=7)
    result = replays.run((rewritten, ActivityCompleted(step.seq, 1, ONE, 0)))
    assert [s.seq for s in result.new_steps] == [1]
    # Nothing of what the code asked for was recorded: the same steps come again.
    assert replays.run(()).new_steps == [step]
    assert replays.resumed == [False, False, False]


def test_a_failure_the_code_saw_as_final_that_history_retries_replays_from_the_start() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> str:
        try:
            await ctx.activity("p.flaky")
            first = "ok"
        except Exception:
            first = "failed"
        await ctx.activity("p.next")
        return first

    cache = ReplayCache(10, check=True)
    replays = _Replays(cache, flow)
    (flaky,) = replays.run().new_steps
    failed = ActivityFailed(flaky.seq, 1, Failure("Boom", "boom", True), 0)
    (after,) = replays.run((flaky, failed)).new_steps
    assert len(cache) == 1  # it caught the failure and waits for p.next
    # A history in which that failure was retried (and p.next recorded) is not what the
    # kept coroutine saw: the failure is no longer among the outcomes.
    assert isinstance(flaky, ActivityScheduled)
    retry = dataclasses.replace(flaky, attempt=2)
    retried = replays.run((flaky, failed, after, retry, ActivityCompleted(0, 2, ONE, 0)))
    assert not retried.finished and retried.new_steps == []
    done = replays.run((*replays.events, ActivityCompleted(after.seq, 1, ONE, 0)))
    assert done.value == "ok"
    assert replays.resumed == [False, True, False, True]


def test_the_least_recently_kept_run_is_closed_beyond_the_size() -> None:
    closed: list[str] = []

    async def flow(ctx: WorkflowContext, name: str) -> None:
        try:
            await ctx.activity("p.wait")
        finally:
            closed.append(name)

    cache = ReplayCache(2, check=False)
    for name in ("a", "b", "c"):
        replay(flow, name, "t.flow", name, (), 0, run_id="r1", cache=cache)
    assert len(cache) == 2 and closed == ["a"]
    cache.clear()
    assert len(cache) == 0 and sorted(closed) == ["a", "b", "c"]


def test_a_cache_of_size_0_keeps_nothing_and_closes_each_replays_coroutine() -> None:
    closed: list[int] = []

    async def flow(ctx: WorkflowContext, _: Any) -> None:
        try:
            await ctx.activity("p.wait")
        finally:
            closed.append(1)

    cache = ReplayCache(0)
    seen: list[bool] = []
    cache.on_replay = seen.append
    replay(flow, "wf-1", "t.flow", None, (), 0, run_id="r1", cache=cache)
    assert len(cache) == 0 and closed == [1] and seen == []


def test_another_function_or_input_for_the_same_run_replays_from_the_start() -> None:
    async def other(ctx: WorkflowContext, steps: int) -> int:
        return int(await ctx.activity("p.other", steps, result_type=int))

    cache = ReplayCache(10, check=True)
    replays = _Replays(cache)
    replays.run()
    replays.fn = other  # a deploy changed the code under the same type
    steps = replays.run().new_steps
    assert [s.name for s in steps if isinstance(s, ActivityScheduled)] == ["p.other"]
    replays.steps = 4  # a restored record of another run with the id reused
    replays.run()
    assert replays.resumed == [False, False, False]


def test_queries_never_use_or_take_a_kept_coroutine() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> None:
        state = {"step": 0}
        ctx.on_query("step", lambda: state["step"])
        for step in range(3):
            await ctx.activity("p.step")
            state["step"] = step + 1

    cache = ReplayCache(10, check=True)
    replays = _Replays(cache, flow)
    first = replays.complete_next(replays.run())
    assert len(cache) == 1
    asked = replay(
        flow,
        "wf-1",
        "t.chain",
        3,
        replays.events,
        0,
        run_id="r1",
        cache=cache,
        ask=Ask("query", "step", None),
    )
    assert asked.answer is not None and asked.answer.value == 1
    # The kept run is still there, untouched, for the next input.
    assert len(cache) == 1
    replays.complete_next(first)
    assert replays.resumed == [False, True, True]


def test_the_check_raises_where_a_continued_replay_differs_from_one_from_the_start() -> None:
    calls = 0

    async def flow(ctx: WorkflowContext, _: Any) -> None:
        nonlocal calls
        calls += 1  # not deterministic: a replay from the start takes another path
        await ctx.activity("p.first")
        await ctx.activity("p.second" if calls == 1 else "p.elsewhere")

    replays = _Replays(ReplayCache(10, check=True), flow)
    first = replays.run()
    with pytest.raises(AssertionError, match="differs from one from the start"):
        replays.complete_next(first)


def test_the_size_cannot_be_negative() -> None:
    with pytest.raises(ValueError, match="at least 0"):
        ReplayCache(-1)


def test_a_registry_makes_its_cache_at_first_use_and_a_new_one_closes_the_old() -> None:
    registry = WorkflowRegistry()
    cache = registry.replay_cache
    assert registry.replay_cache is cache and cache.size > 0
    replays = _Replays(cache)
    replays.run()
    assert len(cache) == 1
    registry.replay_cache = ReplayCache(5)
    assert len(cache) == 0 and registry.replay_cache.size == 5


def test_a_command_recorded_twice_does_not_stand_in_for_one_not_recorded() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> None:
        await ctx.gather(ctx.activity("p.a"), ctx.activity("p.b"))
        await ctx.activity("p.c")

    replays = _Replays(ReplayCache(10, check=True), flow)
    a, b = replays.run().new_steps
    result = replays.run((a, a, ActivityCompleted(a.seq, 1, ONE, 0)))
    assert result.new_steps == [b]  # from the start: p.b was never recorded
    assert replays.resumed == [False, False]


def _refuses_once() -> Any:
    return unstoppable_flow()[0]


def _bury_zombie() -> None:
    zombie = _UNSTOPPABLE.pop()
    zombie.close()  # one more GeneratorExit than the engine sent: it stops
    assert zombie.cr_frame is None  # type: ignore[attr-defined]


def test_a_refusal_to_stop_parks_every_replay_of_that_code_until_the_code_changes() -> None:
    flow = _refuses_once()

    async def fixed(ctx: WorkflowContext, _: Any) -> None:
        await ctx.activity("p.poll")

    cache = ReplayCache(10, check=False)
    replays = _Replays(cache, flow)
    (poll,) = replays.run().new_steps
    cache.clear()  # evicted, say; it would not stop
    # However many of the transitions these replays belong to the engine throws away.
    for _ in range(2):
        problem = replays.run((poll,)).problem
        assert problem is not None and "keeps running" in problem.message
    replays.fn = fixed  # the deploy that fixes it
    assert replays.run((poll,)).problem is None
    _bury_zombie()


def test_kept_coroutines_are_closed_with_no_real_event_loop_to_reach() -> None:
    seen: list[str] = []

    async def flow(ctx: WorkflowContext, _: Any) -> None:
        try:
            await ctx.activity("p.wait")
        finally:
            seen.append(type(asyncio.get_running_loop()).__name__)

    async def main() -> None:
        cache = ReplayCache(10, check=False)
        replay(flow, "wf-1", "t.flow", None, (), 0, run_id="r1", cache=cache)
        cache.clear()

    asyncio.run(main())
    assert seen == ["LoopGuard"]


def test_the_tester_closes_its_runs_coroutine_so_the_next_run_never_meets_it() -> None:
    registry = WorkflowRegistry()
    registry.workflow("t.bad")(_refuses_once())

    @registry.workflow("t.good")
    async def good(ctx: WorkflowContext, _: Any) -> str:
        return str(await ctx.activity("p.work"))

    tester = WorkflowTester(registry)
    tester.activity("p.work").returns("done")
    tester.activity("p.poll").hangs()
    # The run's own outcome stands; its kept coroutine (which will not stop) is closed.
    with pytest.raises(WorkflowBlockedError):
        tester.run("t.bad", None)
    assert len(registry.replay_cache) == 0
    # The next run, under the same test ids, is not blamed for it.
    assert tester.run("t.good", None).status is WorkflowStatus.COMPLETED
    _bury_zombie()


def test_the_replay_benchmark_runs_a_chain_to_its_end_both_ways() -> None:
    from bench.replay import replay_once  # noqa: PLC0415 - the benchmark, only here

    assert replay_once(5, kept=True) > 0
    assert replay_once(5, kept=False) > 0
