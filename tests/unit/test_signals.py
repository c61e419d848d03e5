"""Signals in the pure engine (issue 12): ``ctx.wait_signal``, buffering in arrival order,
timeouts, dedupe by signal id, signal-with-start, and refusals that never harm the workflow.

Every test drives ``advance`` input by input (``WorkflowRun``), which also checks that every
record survives the Avro round trip and carries the right wake time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from orchestrator import (
    ConfigurationError,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowTimeoutError,
)
from orchestrator.protocol.payloads import PayloadEncodingError, decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityStatus,
    Payload,
    SignalWorkflow,
    StartWorkflow,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.replay import IGNORED_REASONS, Limits, advance
from orchestrator.replay.engine import REJECTED_REASONS
from tests.unit.conftest import T0, WorkflowRun, assert_history, assert_status, encoded_size

_IDS = iter(range(1_000_000))


def _registry(fn: Any, name: str = "t") -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow(name)(fn)
    return registry


def _signal(
    run: WorkflowRun, name: str, value: Any = None, *, signal_id: str | None = None
) -> SignalWorkflow:
    sid = signal_id if signal_id is not None else f"sig-{next(_IDS)}"
    return SignalWorkflow(run.workflow_id, name, encode_json(value), sid, run.now_ms)


def _record(run: WorkflowRun) -> WorkflowRecord:
    assert run.record is not None, f"workflow {run.workflow_id} has no record"
    return run.record


def _result_value(run: WorkflowRun) -> Any:
    record = _record(run)
    assert record.result is not None, f"workflow {run.workflow_id} has no result: {record}"
    return decode_json(record.result)


def _ignored(run: WorkflowRun, body: Any, reason: str) -> None:
    before = run.record
    transition = run.send(body)
    assert transition.ignored == reason, (
        f"workflow {run.workflow_id}: expected {reason!r}, observed {transition.ignored!r}"
    )
    assert transition.record is None and run.record is before


async def _two_approvals(ctx: WorkflowContext, _: Any) -> Any:
    first = await ctx.wait_signal("approve")
    second = await ctx.wait_signal("approve")
    return [first, second]


def test_a_waiting_workflow_continues_when_its_signal_arrives() -> None:
    run = WorkflowRun(_registry(_two_approvals), "t")
    run.start({})
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert _record(run).wake_at_ms is None  # waits for input, not for time
    run.send(_signal(run, "approve", {"by": "ann"}))
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.send(_signal(run, "approve", {"by": "bob"}))
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _result_value(run) == [{"by": "ann"}, {"by": "bob"}]
    assert_history(run.record, ["signal approve", "signal approve"])


def test_signals_sent_before_the_wait_are_kept_in_order() -> None:
    async def later(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.first")
        taken = [await ctx.wait_signal("n") for _ in range(3)]
        other = await ctx.wait_signal("other")
        return [taken, other]

    run = WorkflowRun(_registry(later), "t")
    run.start({})
    for value in (1, 2):
        run.send(_signal(run, "n", value))
    run.send(_signal(run, "other", "x"))
    run.send(_signal(run, "n", 3))
    assert_status(run.record, WorkflowStatus.RUNNING)  # still in the activity
    run.complete(0, None)
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _result_value(run) == [[1, 2, 3], "x"]


def test_a_duplicate_signal_id_is_ignored() -> None:
    run = WorkflowRun(_registry(_two_approvals), "t")
    run.start({})
    run.send(_signal(run, "approve", 1, signal_id="same"))
    _ignored(run, _signal(run, "approve", 2, signal_id="same"), "duplicate-signal")
    run.send(_signal(run, "approve", 3, signal_id="other"))
    assert _result_value(run) == [1, 3]


def test_a_wait_with_a_timeout_raises_and_leaves_later_signals_for_the_next_wait() -> None:
    async def patient(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.wait_signal("approve", timeout=60)
        except WorkflowTimeoutError:
            late = await ctx.wait_signal("approve")
            return ["timed out", late]
        return ["in time"]

    run = WorkflowRun(_registry(patient), "t")
    run.start({})
    assert _record(run).wake_at_ms == run.now_ms + 60_000
    run.wake()
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.send(_signal(run, "approve", "yes"))
    assert _result_value(run) == ["timed out", "yes"]
    assert_history(run.record, ["timer 0 +60000", "fired 0", "signal approve"])


def test_a_signal_in_time_cancels_the_timeout_timer() -> None:
    async def patient(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.wait_signal("approve", timeout=60)

    run = WorkflowRun(_registry(patient), "t")
    run.start({})
    run.send(_signal(run, "approve", "yes"))
    assert _result_value(run) == "yes"
    assert_history(run.record, ["timer 0 +60000", "signal approve", "cancel 0"])
    assert _record(run).wake_at_ms is None


def test_first_and_gather_take_signal_waits() -> None:
    async def race(ctx: WorkflowContext, _: Any) -> Any:
        charge = ctx.activity("p.charge")
        cancel = ctx.wait_signal("cancel")
        winner = await ctx.first(charge, cancel)
        both = await ctx.gather(ctx.activity("p.log"), ctx.wait_signal("done"))
        return ["cancel" if winner is cancel else "charge", both]

    run = WorkflowRun(_registry(race), "t")
    run.start({})
    run.send(_signal(run, "cancel", "please"))
    run.send(_signal(run, "done", 7))
    run.complete(1, "logged")
    assert _result_value(run) == ["cancel", ["logged", 7]]


def test_signals_replay_the_same_way_after_a_restart() -> None:
    """A record read back (a restore) gives the next input the same outcome."""
    run = WorkflowRun(_registry(_two_approvals), "t")
    run.start({})
    run.send(_signal(run, "approve", 1))
    record = _record(run)
    second = _signal(run, "approve", 2)
    again = dataclasses.replace(record)
    first = advance(record, second, run.now_ms + 5, run.registry)
    other = advance(again, second, run.now_ms + 5, run.registry)
    assert first == other and first.record is not None
    assert decode_json(first.record.result or Payload(b"null")) == [1, 2]


def test_a_signal_for_a_closed_workflow_is_ignored() -> None:
    async def once(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.wait_signal("go")

    run = WorkflowRun(_registry(once), "t")
    run.start({})
    run.send(_signal(run, "go"))
    assert_status(run.record, WorkflowStatus.COMPLETED)
    _ignored(run, _signal(run, "go"), "workflow-closed")


def test_a_signal_for_no_workflow_is_rejected_and_with_start_starts_it() -> None:
    registry = _registry(_two_approvals, "approval")
    now = T0
    orphan = SignalWorkflow("wf-9", "approve", encode_json(1), "s-1", now)
    transition = advance(None, orphan, now, registry)
    assert transition.ignored == "unknown-workflow" and "unknown-workflow" in REJECTED_REASONS
    start = StartWorkflow("wf-9", "approval", encode_json({}), now)
    with_start = dataclasses.replace(orphan, start=start)
    started = advance(None, with_start, now, registry, run_id="r" * 32)
    record = started.record
    assert record is not None and record.status is WorkflowStatus.RUNNING
    assert record.run_id == "r" * 32 and record.revision == 1
    assert_history(record, ["signal approve"])
    # The same signal-with-start again (a retried send): the start is not repeated, the
    # signal is a duplicate.
    assert advance(record, with_start, now + 1, registry).ignored == "duplicate-signal"
    # Another signal-with-start for the now existing workflow only delivers its signal.
    again = dataclasses.replace(with_start, signal_id="s-2", payload=encode_json(2))
    done = advance(record, again, now + 2, registry).record
    assert done is not None and done.status is WorkflowStatus.COMPLETED
    assert decode_json(done.result or Payload(b"null")) == [1, 2]


def test_a_start_for_another_workflow_id_is_refused() -> None:
    registry = _registry(_two_approvals, "approval")
    start = StartWorkflow("wf-other", "approval", encode_json({}), T0)
    body = SignalWorkflow("wf-9", "approve", encode_json(1), "s-1", T0, start)
    assert advance(None, body, T0, registry, run_id="r").ignored == "signal-refused"


@pytest.mark.parametrize("name", ["", "x" * 201, "nul\x00", "\ud800"])
def test_an_invalid_signal_name_is_refused(name: str) -> None:
    run = WorkflowRun(_registry(_two_approvals), "t")
    run.start({})
    _ignored(run, _signal(run, name), "signal-refused")


def test_a_signal_too_large_for_the_record_is_refused_and_the_workflow_goes_on() -> None:
    run = WorkflowRun(
        _registry(_two_approvals), "t", limits=Limits(max_record_bytes=4_000, measure=encoded_size)
    )
    run.start({})
    _ignored(run, _signal(run, "approve", "x" * 5_000), "signal-refused")
    assert "signal-refused" in REJECTED_REASONS and "signal-refused" in IGNORED_REASONS
    run.send(_signal(run, "approve", 1))
    run.send(_signal(run, "approve", 2))
    assert _result_value(run) == [1, 2]


def test_a_flood_of_signals_nobody_waits_for_leaves_the_steps_their_room() -> None:
    async def busy(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.first")
        await ctx.activity("p.second")
        return "done"

    run = WorkflowRun(_registry(busy), "t", limits=Limits(max_events=20))
    run.start({})
    outcomes = [run.send(_signal(run, "noise", index)).ignored for index in range(40)]
    assert outcomes.count(None) == 5 and outcomes.count("signal-refused") == 35  # 20 // 4
    run.complete(0, 1)
    run.complete(1, 2)
    assert _result_value(run) == "done"


def test_a_signal_whose_consequences_do_not_fit_is_refused_not_fatal() -> None:
    """Accepting the signal would make the code schedule steps that cannot fit: the
    workflow would close at its last good state; the signal is refused instead."""

    async def fan_out(ctx: WorkflowContext, _: Any) -> Any:
        value = await ctx.wait_signal("go")
        return await ctx.gather(*(ctx.activity("p.work", value) for _ in range(20)))

    limits = Limits(max_record_bytes=4_000, measure=encoded_size)
    run = WorkflowRun(_registry(fan_out), "t", limits=limits)
    run.start({})
    _ignored(run, _signal(run, "go", "x" * 100), "signal-refused")
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert_history(run.record, [])


def test_a_signal_that_came_before_the_timeout_wins_though_the_code_was_busy() -> None:
    async def busy(ctx: WorkflowContext, _: Any) -> Any:
        wait = ctx.wait_signal("approve", timeout=10)
        await ctx.activity("p.work")
        try:
            return ["in time", await wait]
        except WorkflowTimeoutError:
            return ["timed out", await ctx.wait_signal("approve")]

    run = WorkflowRun(_registry(busy), "t")
    run.start({})
    run.send(_signal(run, "approve", "yes"))  # 2 s in, before the 10 s timeout
    run.wake()  # the timer fires while the activity still runs
    run.complete(1, "worked")
    assert _result_value(run) == ["in time", "yes"]


def test_first_takes_signals_in_arrival_order_and_losers_give_theirs_back() -> None:
    async def both(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.busy")
        seen = []
        for _ in range(2):
            a, b = ctx.wait_signal("a"), ctx.wait_signal("b")
            winner = await ctx.first(a, b)
            seen.append(["a" if winner is a else "b", await winner])
        return seen

    run = WorkflowRun(_registry(both), "t")
    run.start({})
    run.send(_signal(run, "b", "b1"))  # b arrives first
    run.send(_signal(run, "a", "a1"))
    run.complete(0, None)
    assert _result_value(run) == [["b", "b1"], ["a", "a1"]]


def test_a_wait_is_done_as_soon_as_it_has_a_signal() -> None:
    async def polling(ctx: WorkflowContext, _: Any) -> Any:
        wait = ctx.wait_signal("go")
        naps = 0
        while not wait.done:
            await ctx.sleep(1)
            naps += 1
        return [naps, await wait]

    run = WorkflowRun(_registry(polling), "t")
    run.start({})
    run.wake()
    run.send(_signal(run, "go", "now"))
    run.wake()
    assert _result_value(run) == [2, "now"]


def test_an_empty_signal_id_is_refused() -> None:
    run = WorkflowRun(_registry(_two_approvals), "t")
    run.start({})
    _ignored(run, _signal(run, "approve", signal_id=""), "signal-refused")


def test_a_signal_payload_that_is_not_json_raises_at_the_wait() -> None:
    async def careful(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.wait_signal("data")
        except PayloadEncodingError as exc:
            return f"bad: {type(exc).__name__}"

    run = WorkflowRun(_registry(careful), "t")
    run.start({})
    bad = dataclasses.replace(_signal(run, "data"), payload=Payload(b"\xff not json"))
    run.send(bad)
    assert _result_value(run) == "bad: PayloadEncodingError"


@pytest.mark.parametrize("name", ["", 5, "x" * 201])
def test_waiting_on_an_invalid_name_parks_the_workflow(name: Any) -> None:
    async def wrong(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.wait_signal(name)
        except ConfigurationError:
            return "caught"  # catching cannot hide the bug

    run = WorkflowRun(_registry(wrong), "t")
    run.start({})
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")


def test_a_workflow_waiting_for_a_signal_takes_results_and_wakes_as_before() -> None:
    async def mixed(ctx: WorkflowContext, _: Any) -> Any:
        step = ctx.activity("p.work")
        await ctx.sleep(10)
        value = await step
        signal = await ctx.wait_signal("go")
        return [value, signal]

    run = WorkflowRun(_registry(mixed), "t")
    run.start({})
    run.send(_signal(run, "go", "early"))
    result = ActivityResult(
        run.workflow_id,
        activity_id(run.workflow_id, 0, 1, run.run_id),
        0,
        1,
        ActivityStatus.COMPLETED,
        run.now_ms,
        encode_json("done"),
    )
    run.send(result)
    run.send(WakeUp(run.workflow_id), at_ms=_record(run).wake_at_ms)
    assert _result_value(run) == ["done", "early"]


def test_a_wait_that_lost_a_race_waits_again_when_raced_again() -> None:
    async def ticking(ctx: WorkflowContext, _: Any) -> Any:
        stop = ctx.wait_signal("stop")
        rounds = 0
        while True:
            winner = await ctx.first(stop, ctx.sleep(10))
            if winner is stop:
                return {"stopped": await stop, "rounds": rounds}
            rounds += 1

    run = WorkflowRun(_registry(ticking), "t")
    run.start({})
    run.wake()  # a tick wins the first round
    run.send(_signal(run, "stop", "now"))
    assert _result_value(run) == {"stopped": "now", "rounds": 1}


def test_a_wait_that_timed_out_takes_a_later_signal_when_awaited_again() -> None:
    async def retrying(ctx: WorkflowContext, _: Any) -> Any:
        wait = ctx.wait_signal("x")
        for _ in range(3):
            try:
                return await wait.with_timeout(10)
            except WorkflowTimeoutError:
                pass
        return "timed out 3x"

    run = WorkflowRun(_registry(retrying), "t")
    run.start({})
    run.wake()
    run.send(_signal(run, "x", "hello"))
    assert _result_value(run) == "hello"


@pytest.mark.parametrize("wait_first", [True, False])
def test_a_gather_that_raises_gives_its_signal_back_whatever_the_order(wait_first: bool) -> None:
    async def gathering(ctx: WorkflowContext, _: Any) -> Any:
        wait, step = ctx.wait_signal("x"), ctx.activity("p.step")
        try:
            await (ctx.gather(wait, step) if wait_first else ctx.gather(step, wait))
        except Exception:
            return await ctx.wait_signal("x", timeout=5)
        return "gathered"

    run = WorkflowRun(_registry(gathering), "t")
    run.start({})
    run.send(_signal(run, "x", "s1"))
    run.fail(0, "Boom")
    assert _result_value(run) == "s1"
