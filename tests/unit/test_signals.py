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


def test_signals_count_against_the_event_limit_and_are_refused_past_it() -> None:
    run = WorkflowRun(_registry(_two_approvals), "t", limits=Limits(max_events=20))
    run.start({})

    async def deaf(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.wait_signal("never")

    run.registry = _registry(deaf)
    refused = 0
    for index in range(40):
        transition = run.send(_signal(run, "noise", index))
        refused += transition.ignored == "signal-refused"
    assert refused > 0
    assert_status(run.record, WorkflowStatus.RUNNING)


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
