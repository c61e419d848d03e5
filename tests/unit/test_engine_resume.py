"""Resume, park, statuses this code does not know, and run ids (issue 10, items 2, 3, 5).

``ResumeWorkflow`` re-drives a STUCK workflow with the code deployed now. It changes
nothing unless the outcome changes, so the shell may send it after every restore.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from examples.order_saga.workflows import process_order
from orchestrator import ActivityError, WorkflowContext, WorkflowRegistry
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityResult,
    Failure,
    InboxBody,
    ResumeWorkflow,
    StartWorkflow,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.replay import Limits, advance, park, pending_tasks
from tests.unit.conftest import (
    T0,
    WorkflowRun,
    assert_encodable,
    assert_history,
    assert_status,
    completed,
    task_lines,
)

ORDER = {"order_id": "o-1", "items": ["tea"], "total": 100, "card": "tok", "address": "x"}


def _registry(fn: Any, name: str = "order.process") -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow(name)(fn)
    return registry


async def _charge_renamed(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    """A bad deploy of the order saga: the charge step got another name."""
    reservation = await ctx.activity(
        "inventory.reserve", {"order_id": order["order_id"], "items": order["items"]}
    )
    try:
        await ctx.activity("billing.charge", {"amount": order["total"]})
    except ActivityError:
        await ctx.activity("inventory.release", reservation, compensation=True)
        raise
    return None


async def _charge_removed(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    """Another bad deploy, stuck for another reason."""
    await ctx.activity("inventory.reserve", {"order_id": order["order_id"]})
    return await ctx.activity("shipping.schedule", {"order_id": order["order_id"]})


def _parked_order() -> WorkflowRun:
    """A sequential order parked by non-determinism with nothing in flight."""
    run = WorkflowRun(_registry(process_order), "order.process", workflow_id="o-1", run_id="r7")
    run.start(ORDER)
    run.complete(0, {"reservation_id": "res-1"})
    run.registry = _registry(_charge_renamed)
    run.complete(1, {"charge_id": "ch-1"})
    assert_status(run.record, WorkflowStatus.STUCK, "NonDeterminismError")
    assert run.record is not None and pending_tasks(run.record) == ()
    return run


def test_a_sequential_workflow_parked_by_non_determinism_completes_after_a_fixed_deploy() -> None:
    run = _parked_order()
    assert run.resume().ignored == "still-stuck", "the bad code is still deployed"

    run.registry = _registry(process_order)  # the fix
    resumed = run.resume()
    record = assert_encodable(resumed.record)
    assert_status(record, WorkflowStatus.RUNNING)
    assert record.failure is None
    assert task_lines(resumed.tasks) == ["o-1/r7/2/1 shipping.schedule"]
    run.complete(2, {"shipment_id": "sh-1"})
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.COMPLETED)
    assert record.result is not None
    assert decode_json(record.result) == {"charge_id": "ch-1", "shipment_id": "sh-1"}


def test_resuming_a_still_stuck_workflow_writes_nothing() -> None:
    run = _parked_order()
    before = run.record
    for _ in range(3):
        transition = run.resume()
        assert transition.ignored == "still-stuck"
        assert transition.record is None and transition.tasks == ()
    assert run.record is before


def test_a_still_stuck_resume_does_not_even_measure_the_record() -> None:
    """Resumes follow every restore for every stuck workflow: they must cost little."""
    calls: list[WorkflowRecord] = []

    def measure(record: WorkflowRecord) -> int:
        calls.append(record)
        return 0

    run = _parked_order()
    assert run.record is not None
    limits = Limits(max_record_bytes=10_000, measure=measure)
    resume = ResumeWorkflow("o-1", T0)
    transition = advance(run.record, resume, T0, _registry(_charge_renamed), limits)
    assert transition.ignored == "still-stuck" and calls == []


def test_a_resume_without_a_workflow_id_applies_to_the_record_it_is_given() -> None:
    """The shell expands ``ResumeWorkflow(None)`` to every stuck workflow it holds."""
    run = _parked_order()
    assert run.record is not None
    fixed = _registry(process_order)
    transition = advance(run.record, ResumeWorkflow(None, T0), T0, fixed)
    assert task_lines(transition.tasks) == ["o-1/r7/2/1 shipping.schedule"]


def test_resuming_with_code_stuck_for_another_reason_writes_the_new_reason() -> None:
    run = _parked_order()
    before = run.record
    assert before is not None and before.failure is not None
    run.registry = _registry(_charge_removed)
    transition = run.resume()
    record = assert_encodable(transition.record)
    assert_status(record, WorkflowStatus.STUCK, "NonDeterminismError")
    assert record.failure is not None and record.failure != before.failure
    assert "'shipping.schedule'" in record.failure.message
    assert record.revision == before.revision + 1 and record.events == before.events
    assert transition.tasks == ()


def test_a_resume_for_a_workflow_that_is_not_stuck_is_ignored() -> None:
    registry = _registry(process_order)
    run = WorkflowRun(registry, "order.process", workflow_id="o-2", run_id="r")
    assert run.resume().ignored == "unknown-workflow"
    run.start(ORDER)
    assert run.resume().ignored == "not-stuck"
    run.complete(0, {"reservation_id": "r"})
    run.fail(1, "PaymentDeclined")
    run.complete(2, {"released": True})
    assert_status(run.record, WorkflowStatus.COMPENSATED)
    assert run.resume().ignored == "workflow-closed"


def test_a_result_for_a_stuck_workflow_is_recorded_and_replayed() -> None:
    """A pair in flight: the second result arrives while parked, then the fix."""

    async def pair(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.gather(ctx.activity("p.left"), ctx.activity("p.right"))

    async def broken(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.gather(ctx.activity("p.left"), ctx.activity("p.rite"))

    run = WorkflowRun(_registry(pair, "t.pair"), "t.pair", run_id="r")
    run.start()
    run.registry = _registry(broken, "t.pair")
    run.complete(0, "L")
    assert_status(run.record, WorkflowStatus.STUCK, "NonDeterminismError")
    run.complete(1, "R")
    assert_status(run.record, WorkflowStatus.STUCK, "NonDeterminismError")
    assert_history(run.record, ["sched 0#1 p.left", "sched 1#1 p.right", "done 0#1", "done 1#1"])
    run.registry = _registry(pair, "t.pair")
    run.resume()
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.COMPLETED)
    assert record.result is not None and decode_json(record.result) == ["L", "R"]


# --- records written by newer code ---------------------------------------------------


def _unknown_status_record() -> WorkflowRecord:
    run = WorkflowRun(_registry(process_order), "order.process", workflow_id="o-3", run_id="r")
    run.start(ORDER)
    assert run.record is not None
    return dataclasses.replace(run.record, status=WorkflowStatus.UNKNOWN)


@pytest.mark.parametrize(
    "body",
    [
        StartWorkflow("o-3", "order.process", encode_json(ORDER), T0),
        completed("o-3", 0, 1, {"reservation_id": "r"}, T0, run_id="r"),
        ResumeWorkflow("o-3", T0),
    ],
    ids=["start", "result", "resume"],
)
def test_a_record_whose_status_this_code_does_not_know_is_never_overwritten(
    body: InboxBody,
) -> None:
    record = _unknown_status_record()
    transition = advance(record, body, T0 + 1, _registry(process_order))
    assert transition.ignored == "unknown-status"
    assert transition.record is None and transition.tasks == ()
    assert pending_tasks(record) == (), "no task is re-sent for a status we do not know"


# --- park ----------------------------------------------------------------------------


UNSAFE = Failure("Engine\ud800Error", "broke on \ud800 and \x00 " + "x" * 5_000, retryable=True)


def test_park_makes_a_stuck_record_from_a_start_that_could_not_be_applied() -> None:
    start = StartWorkflow("o-4", "order.process", encode_json(ORDER), T0)
    record = assert_encodable(park(None, start, UNSAFE, T0 + 7, run_id="run-4"))
    assert_status(record, WorkflowStatus.STUCK, "Engine\\ud800Error")
    assert record.failure is not None and record.failure.retryable
    assert record.failure.message.startswith("broke on \\ud800 and \\x00 xxx")
    assert len(record.failure.message) == 2_000
    assert (record.workflow_id, record.workflow_type, record.run_id) == (
        "o-4",
        "order.process",
        "run-4",
    )
    assert decode_json(record.input) == ORDER
    assert (record.events, record.revision, record.started_at_ms, record.updated_at_ms) == (
        (),
        1,
        T0 + 7,
        T0 + 7,
    )
    # A later resume with code that works runs it from the start, with its run id.
    resumed = advance(record, ResumeWorkflow("o-4", T0 + 9), T0 + 9, _registry(process_order))
    assert task_lines(resumed.tasks) == ["o-4/run-4/0/1 inventory.reserve"]


def test_park_marks_an_existing_record_stuck_one_revision_later() -> None:
    run = WorkflowRun(_registry(process_order), "order.process", workflow_id="o-5", run_id="r")
    run.start(ORDER)
    current = run.record
    assert current is not None
    body = completed("o-5", 0, 1, {"reservation_id": "r"}, T0, run_id="r")
    record = assert_encodable(
        park(current, body, Failure("EngineError", "boom"), T0 + 50, run_id="")
    )
    assert record == dataclasses.replace(
        current,
        status=WorkflowStatus.STUCK,
        failure=Failure("EngineError", "boom"),
        revision=current.revision + 1,
        updated_at_ms=T0 + 50,
    )
    # The held input, applied once resumed, still matches the run's activity ids.
    resumed = advance(record, ResumeWorkflow("o-5", T0 + 60), T0 + 60, _registry(process_order))
    assert_status(resumed.record, WorkflowStatus.RUNNING)
    assert resumed.tasks == (), "the reservation is already out"
    assert resumed.record is not None
    applied = advance(resumed.record, body, T0 + 70, _registry(process_order))
    assert task_lines(applied.tasks) == ["o-5/r/1/1 payment.charge"]


def test_park_needs_a_record_or_a_start() -> None:
    result = completed("ghost", 0, 1, None, T0)
    with pytest.raises(ValueError, match="does not exist"):
        park(None, result, Failure("EngineError", "boom"), T0, run_id="r")


# --- run ids -------------------------------------------------------------------------


def test_every_activity_id_of_a_run_carries_its_run_id() -> None:
    run = WorkflowRun(_registry(process_order), "order.process", workflow_id="o-6", run_id="a1")
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r"})
    run.fail_and_retry(1, "GatewayTimeout")
    assert run.record is not None and run.record.run_id == "a1"
    assert task_lines(pending_tasks(run.record)) == ["o-6/a1/1/2 payment.charge"]
    assert [t.activity_id for t in run.sent] == ["o-6/a1/0/1", "o-6/a1/1/1", "o-6/a1/1/2"]


def test_an_outcome_stored_for_an_earlier_run_is_not_taken_by_a_later_one() -> None:
    """The same workflow id started again (after the old record was removed)."""
    registry = _registry(process_order)
    first = WorkflowRun(registry, "order.process", workflow_id="o-7", run_id="run-1")
    first.start(ORDER)
    later = WorkflowRun(registry, "order.process", workflow_id="o-7", run_id="run-2")
    later.start(ORDER)
    assert later.tasks() == ["o-7/run-2/0/1 inventory.reserve"]
    for stale in (
        completed("o-7", 0, 1, {"reservation_id": "old"}, T0, run_id="run-1"),
        completed("o-7", 0, 1, {"reservation_id": "old"}, T0),  # before run ids existed
    ):
        assert later.send(stale).ignored == "activity-id-mismatch"
    later.complete(0, {"reservation_id": "new"})
    assert later.tasks() == ["o-7/run-2/1/1 payment.charge"]


def test_a_record_from_before_run_ids_keeps_the_old_activity_ids() -> None:
    run = WorkflowRun(_registry(process_order), "order.process", workflow_id="o-8")
    run.start(ORDER)
    assert run.tasks() == ["o-8/0/1 inventory.reserve"]
    result = ActivityResult(
        "o-8",
        activity_id("o-8", 0, 1),
        0,
        1,
        completed("o-8", 0, 1, None, T0).status,
        T0,
        encode_json({"reservation_id": "r"}),
    )
    run.send(result)
    assert run.tasks() == ["o-8/1/1 payment.charge"]
