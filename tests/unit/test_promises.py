"""Promises in the pure engine (issue 12): ``ctx.promise`` gives an id that something outside
completes or fails once; the workflow awaits it like a step, with timeouts and races."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from orchestrator import (
    ActivityError,
    PromiseFailedError,
    PromiseHandle,
    Saga,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowTimeoutError,
)
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    CompletePromise,
    Failure,
    Payload,
    WorkflowRecord,
    WorkflowStatus,
    parse_promise_id,
    promise_id,
)
from orchestrator.replay import Limits, advance
from orchestrator.replay.engine import REJECTED_REASONS
from tests.unit.conftest import WorkflowRun, assert_history, assert_status, encoded_size

RUN = "r" * 32


def _registry(fn: Any) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow("t")(fn)
    return registry


def _record(run: WorkflowRun) -> WorkflowRecord:
    assert run.record is not None, f"workflow {run.workflow_id} has no record"
    return run.record


def _value(run: WorkflowRun) -> Any:
    record = _record(run)
    assert record.result is not None, f"no result: {record}"
    return decode_json(record.result)


def _complete(run: WorkflowRun, seq: int, value: Any = None, **changes: Any) -> CompletePromise:
    body = CompletePromise(
        run.workflow_id,
        promise_id(run.workflow_id, run.run_id, seq),
        run.now_ms,
        encode_json(value),
    )
    return dataclasses.replace(body, **changes)


async def _approval(ctx: WorkflowContext, _: Any) -> Any:
    approval = ctx.promise("manager-approval")
    await ctx.activity("mail.send", {"approve_with": approval.id})
    return await approval


def test_a_promise_is_completed_from_outside_by_its_id() -> None:
    run = WorkflowRun(_registry(_approval), "t", run_id=RUN)
    run.start({})
    (task,) = run.sent
    handed_out = decode_json(task.payload)["approve_with"]
    assert handed_out == promise_id(run.workflow_id, RUN, 0)
    assert parse_promise_id(handed_out) == (run.workflow_id, RUN, 0)
    run.complete(1, "sent")
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.send(_complete(run, 0, {"approved": True}))
    assert _value(run) == {"approved": True}
    assert_history(run.record, ["promise 0", "sched 1#1 mail.send", "done 1#1", "promised 0"])


def test_a_completion_before_the_await_is_kept() -> None:
    run = WorkflowRun(_registry(_approval), "t", run_id=RUN)
    run.start({})
    run.send(_complete(run, 0, "early"))  # the mail step is still running
    run.complete(1, "sent")
    assert _value(run) == "early"


def test_a_failed_promise_raises_an_activity_error_so_sagas_compensate() -> None:
    async def booking(ctx: WorkflowContext, _: Any) -> Any:
        async with Saga(ctx) as saga:
            hold = await ctx.activity("hotel.hold")
            saga.add_compensation("hotel.release", hold)
            await ctx.promise("payment-callback")
        return "booked"

    run = WorkflowRun(_registry(booking), "t", run_id=RUN)
    run.start({})
    run.complete(0, "hold-1")
    failed = _complete(run, 1, payload=None, failure=Failure("CardDeclined", "no funds"))
    run.send(failed)
    run.complete(2, "released")
    record = _record(run)
    assert record.status is WorkflowStatus.COMPENSATED, record
    assert record.failure is not None and record.failure.error_type == "PromiseFailedError"
    assert "CardDeclined: no funds" in record.failure.message
    assert issubclass(PromiseFailedError, ActivityError)


def test_a_promise_completes_once() -> None:
    run = WorkflowRun(_registry(_approval), "t", run_id=RUN)
    run.start({})
    run.send(_complete(run, 0, 1))
    before = run.record
    assert run.send(_complete(run, 0, 2)).ignored == "duplicate-completion"
    assert run.record is before


@pytest.mark.parametrize(
    "change",
    [
        {"promise_id": "wf-1/other-run/p0"},  # another run's promise
        {"promise_id": "not a promise id"},
        {"promise_id": f"wf-1/{RUN}/p1"},  # step 1 is the mail activity, not a promise
        {"promise_id": f"wf-1/{RUN}/p7"},  # no such step
        {"payload": None},  # neither a value nor a failure
        {"failure": Failure("X", "both")},  # both
    ],
)
def test_a_completion_that_names_no_promise_of_this_run_is_refused(change: dict[str, Any]) -> None:
    run = WorkflowRun(_registry(_approval), "t", run_id=RUN)
    run.start({})
    transition = run.send(_complete(run, 0, "v", **change))
    assert transition.ignored == "promise-refused" and "promise-refused" in REJECTED_REASONS


def test_a_completion_for_a_closed_or_missing_workflow_is_ignored_or_rejected() -> None:
    registry = _registry(_approval)
    orphan = CompletePromise("nobody", promise_id("nobody", RUN, 0), 1, encode_json(1))
    assert advance(None, orphan, 1, registry).ignored == "unknown-workflow"
    run = WorkflowRun(registry, "t", run_id=RUN)
    run.start({})
    run.send(_complete(run, 0, 1))
    run.complete(1, "sent")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.send(_complete(run, 0, 2)).ignored == "workflow-closed"


def test_a_promise_with_a_timeout_and_in_a_race() -> None:
    async def waiting(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.promise("quick").with_timeout(30)
        except WorkflowTimeoutError:
            first = "timed out"
        slow = ctx.promise("slow")
        winner = await ctx.first(slow, ctx.sleep(3600))
        return [first, "promise" if isinstance(winner, PromiseHandle) else "timer", await slow]

    run = WorkflowRun(_registry(waiting), "t", run_id=RUN)
    run.start({})
    run.wake()  # the 30 s timeout fires
    run.send(_complete(run, 2, "here"))
    assert _value(run) == ["timed out", "promise", "here"]


def test_a_value_too_large_for_the_record_fails_the_promise() -> None:
    run = WorkflowRun(
        _registry(_approval),
        "t",
        run_id=RUN,
        limits=Limits(max_record_bytes=4_000, measure=encoded_size),
    )
    run.start({})
    run.complete(1, "sent")
    run.send(_complete(run, 0, "x" * 5_000))
    record = _record(run)
    assert record.status is WorkflowStatus.FAILED, record
    assert record.failure is not None and record.failure.error_type == "PromiseFailedError"
    assert "RecordTooLarge" in record.failure.message


def test_an_unreadable_value_raises_at_the_await() -> None:
    run = WorkflowRun(_registry(_approval), "t", run_id=RUN)
    run.start({})
    run.complete(1, "sent")
    run.send(_complete(run, 0, payload=Payload(b"\xff")))
    record = _record(run)
    assert record.status is WorkflowStatus.FAILED
    assert record.failure is not None and record.failure.error_type == "PayloadEncodingError"


def test_changing_a_promise_into_another_step_is_nondeterminism() -> None:
    run = WorkflowRun(_registry(_approval), "t", run_id=RUN)
    run.start({})

    async def changed(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("mail.send", {})

    run.registry = _registry(changed)
    run.complete(1, "sent")
    assert_status(run.record, WorkflowStatus.STUCK, "NonDeterminismError")


@pytest.mark.parametrize("name", ["", 3])
def test_an_invalid_promise_name_parks_the_workflow(name: Any) -> None:
    async def wrong(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.promise(name)

    run = WorkflowRun(_registry(wrong), "t", run_id=RUN)
    run.start({})
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")


def test_a_promise_value_gets_an_ordinary_result_budget_and_compensations_keep_theirs() -> None:
    async def paid(ctx: WorkflowContext, _: Any) -> Any:
        async with Saga(ctx) as saga:
            await ctx.activity("bank.charge")
            saga.add_compensation("bank.refund", {})
            return await ctx.promise("confirmation")

    limits = Limits(max_record_bytes=20_000, measure=encoded_size)
    run = WorkflowRun(_registry(paid), "t", run_id=RUN, limits=limits)
    run.start({})
    run.complete(0, "charged")
    run.send(_complete(run, 1, "x" * 17_000))  # within the grace, past an ordinary result
    run.complete(2, "refunded")
    record = _record(run)
    assert record.status is WorkflowStatus.COMPENSATED, record
    assert "RecordTooLarge" in (record.failure.message if record.failure else "")


@pytest.mark.parametrize(
    "text",
    ["w/r/p01", "w/r/p00", "w/r/p" + "1" * 5_000, "w/r/p2147483648", "w/r/p-1", "w/r/p", "w/p1"],
)
def test_only_canonical_promise_ids_parse(text: str) -> None:
    assert parse_promise_id(text) is None


def test_promise_ids_parse_back() -> None:
    for wid in ("w", "a/b/c", "ü"):
        for seq in (0, 7, 2**31 - 1):
            assert parse_promise_id(promise_id(wid, RUN, seq)) == (wid, RUN, seq)
