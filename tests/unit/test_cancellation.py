"""Cancellation in the pure engine (issue 12): WorkflowCancelledError at the current await,
compensations that run for real, CANCELLED at the end, late results recorded and ignored."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import (
    Saga,
    WorkflowCancelledError,
    WorkflowContext,
    WorkflowRegistry,
)
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityScheduled,
    CancelWorkflow,
    SignalWorkflow,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.replay import IGNORED_REASONS, advance
from tests.unit.conftest import WorkflowRun, assert_status, history_lines


def _registry(fn: Any) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow("t")(fn)
    return registry


def _record(run: WorkflowRun) -> WorkflowRecord:
    assert run.record is not None, f"workflow {run.workflow_id} has no record"
    return run.record


def _cancel(run: WorkflowRun, reason: str = "operator") -> CancelWorkflow:
    return CancelWorkflow(run.workflow_id, reason, run.now_ms)


async def _trip(ctx: WorkflowContext, _: Any) -> Any:
    async with Saga(ctx) as saga:
        flight = await ctx.activity("air.book")
        saga.add_compensation("air.cancel", flight)
        hotel = await ctx.activity("hotel.book")
        saga.add_compensation("hotel.cancel", hotel)
        await ctx.activity("car.book")  # cancelled while this runs
    return "booked"


def _compensations(record: WorkflowRecord) -> list[str]:
    return [e.name for e in record.events if isinstance(e, ActivityScheduled) and e.compensation]


def test_a_cancel_compensates_newest_first_and_ends_cancelled() -> None:
    run = WorkflowRun(_registry(_trip), "t")
    run.start({})
    run.complete(0, "AF123")
    run.complete(1, "H-9")
    run.send(_cancel(run, "customer changed plans"))
    assert _compensations(_record(run)) == ["hotel.cancel"]
    run.complete(3, "ok")
    run.complete(4, "ok")
    record = _record(run)
    assert_status(record, WorkflowStatus.CANCELLED, "WorkflowCancelledError")
    assert _compensations(record) == ["hotel.cancel", "air.cancel"]
    assert record.failure is not None and "customer changed plans" in record.failure.message
    # The car booking still running when the cancel came: its late result is recorded
    # and changes nothing.
    late = run.complete(2, "CAR-1")
    assert late.ignored == "workflow-closed"


def test_a_result_that_arrives_after_the_cancel_is_recorded_and_ignored() -> None:
    async def waiting(ctx: WorkflowContext, _: Any) -> Any:
        step = ctx.activity("p.slow")
        try:
            await ctx.sleep(60)
        except WorkflowCancelledError:
            await ctx.activity("p.cleanup")
            raise
        return await step

    run = WorkflowRun(_registry(waiting), "t")
    run.start({})
    run.send(_cancel(run))
    assert_status(run.record, WorkflowStatus.RUNNING)  # the cleanup runs
    run.complete(0, "late")  # the slow step's result, while cleaning up
    record = _record(run)
    assert any(isinstance(e, ActivityCompleted) and e.seq == 0 for e in record.events)
    assert_status(record, WorkflowStatus.RUNNING)
    run.complete(2, "cleaned")
    assert_status(run.record, WorkflowStatus.CANCELLED)


def test_a_cancel_reaches_a_gather_and_a_signal_wait() -> None:
    async def parallel(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.gather(ctx.activity("p.a"), ctx.wait_signal("go"))
        except WorkflowCancelledError as exc:
            return f"stopped: {exc.reason}"
        return "done"

    run = WorkflowRun(_registry(parallel), "t")
    run.start({})
    run.send(_cancel(run, "enough"))
    record = _record(run)
    assert record.status is WorkflowStatus.COMPLETED  # the code handled it
    assert record.result is not None and decode_json(record.result) == "stopped: enough"


def test_cancelling_a_closed_or_cancelled_workflow_changes_nothing() -> None:
    run = WorkflowRun(_registry(_trip), "t")
    run.start({})
    run.complete(0, "AF123")
    run.send(_cancel(run))  # the flight's compensation runs
    before = run.record
    assert run.send(_cancel(run)).ignored == "duplicate-cancel" and run.record is before
    assert "duplicate-cancel" in IGNORED_REASONS
    run.complete(2, "ok")
    assert_status(run.record, WorkflowStatus.CANCELLED)
    assert run.send(_cancel(run)).ignored == "workflow-closed"
    assert advance(None, _cancel(run), run.now_ms, run.registry).ignored == "unknown-workflow"


def test_the_cancel_is_in_the_history_where_the_code_saw_it() -> None:
    run = WorkflowRun(_registry(_trip), "t")
    run.start({})
    run.complete(0, "AF123")
    run.send(_cancel(run))
    assert history_lines(_record(run).events) == [
        "sched 0#1 air.book",
        "done 0#1",
        "sched 1#1 hotel.book",
        "cancelled",
        "sched 2#1 air.cancel comp",
    ]
    run.complete(2, "ok")
    assert_status(run.record, WorkflowStatus.CANCELLED)


def test_a_signal_wait_abandoned_by_a_cancel_takes_no_signal() -> None:
    async def patient(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.wait_signal("go")
        except WorkflowCancelledError:
            return await ctx.wait_signal("go")  # a new wait gets the next signal
        return "never"

    run = WorkflowRun(_registry(patient), "t")
    run.start({})
    run.send(_cancel(run))
    run.send(SignalWorkflow(run.workflow_id, "go", encode_json("after"), "s-1", run.now_ms))
    record = _record(run)
    assert record.status is WorkflowStatus.COMPLETED, record
    assert record.result is not None and decode_json(record.result) == "after"


@pytest.mark.parametrize("parallel", [False, True])
def test_a_cancel_during_compensation_lets_every_compensation_finish(parallel: bool) -> None:
    async def failing(ctx: WorkflowContext, _: Any) -> Any:
        async with Saga(ctx, parallel=parallel) as saga:
            for name in ("a", "b"):
                await ctx.activity(f"p.{name}")
                saga.add_compensation(f"p.undo_{name}")
            await ctx.activity("p.boom")
        return "done"

    run = WorkflowRun(_registry(failing), "t")
    run.start({})
    run.complete(0, None)
    run.complete(1, None)
    run.fail(2, "Boom")  # compensations start
    run.send(_cancel(run, "stop"))  # ... and a cancel arrives while they run
    for seq in (3, 4):
        run.complete(seq, "undone")
    record = _record(run)
    assert _compensations(record) == ["p.undo_b", "p.undo_a"]
    assert all(
        any(isinstance(e, ActivityCompleted) and e.seq == seq for e in record.events)
        for seq in (3, 4)
    )
    assert_status(record, WorkflowStatus.CANCELLED, "WorkflowCancelledError")
