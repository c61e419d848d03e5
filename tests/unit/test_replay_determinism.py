"""Changed workflow code against recorded history: park as STUCK, never diverge silently.

Each test runs one version of the code for the first inputs and swaps the registry (a
deploy) before the next input, as happens when an orchestrator restarts with new code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import pytest

from examples.order_saga.workflows import process_order
from orchestrator import ActivityError, RetryPolicy, WorkflowContext, WorkflowRegistry
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import WorkflowStatus
from orchestrator.replay import pending_tasks
from tests.unit.conftest import (
    WorkflowRun,
    assert_history,
    assert_status,
    history_lines,
    task_lines,
)

ORDER = {"order_id": "o-1", "items": ["tea"], "total": 100, "card": "tok", "address": "x"}


def _registry(name: str, fn: Any) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow(name)(fn)
    return registry


def _order_v1() -> WorkflowRegistry:
    return _registry("order.process", process_order)


def _order_run() -> WorkflowRun:
    """An order whose reservation completed and whose charge is in flight."""
    run = WorkflowRun(_order_v1(), "order.process", workflow_id="order-1")
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r-1"})
    assert run.tasks() == ["order-1/1/1 payment.charge"]
    return run


def _assert_stuck(
    run: WorkflowRun, *fragments: str, error_type: str = "NonDeterminismError"
) -> str:
    assert_status(run.record, WorkflowStatus.STUCK, error_type)
    assert run.record is not None and run.record.failure is not None
    message = run.record.failure.message
    for fragment in fragments:
        assert fragment in message, (
            f"workflow {run.workflow_id}: failure message {message!r} lacks {fragment!r}"
        )
    assert run.tasks() == [], f"workflow {run.workflow_id}: a stuck step sent {run.tasks()}"
    assert not run.record.status.terminal
    assert run.record.closed_at_ms is None
    return message


async def _renamed_charge(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    reservation = await ctx.activity(
        "inventory.reserve", {"order_id": order["order_id"], "items": order["items"]}
    )
    charge = await ctx.activity("billing.charge", {"amount": order["total"]})
    return [reservation, charge]


async def _reserve_removed(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    charge = await ctx.activity("payment.charge", {"amount": order["total"]})
    shipment = await ctx.activity("shipping.schedule", {"order_id": order["order_id"]})
    return [charge, shipment]


async def _shipping_removed(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    await ctx.activity("inventory.reserve", {"order_id": order["order_id"]})
    charge = await ctx.activity("payment.charge", {"amount": order["total"]})
    return {"charge_id": charge["charge_id"]}


async def _release_not_compensation(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    reservation = await ctx.activity("inventory.reserve", {"order_id": order["order_id"]})
    try:
        await ctx.activity(
            "payment.charge",
            {"amount": order["total"]},
            retry=RetryPolicy(non_retryable_error_types=("PaymentDeclined",)),
        )
    except ActivityError:
        await ctx.activity("inventory.release", reservation)  # lost compensation=True
        raise


def test_a_different_activity_at_a_recorded_step_parks_the_workflow() -> None:
    run = _order_run()
    run.registry = _registry("order.process", _renamed_charge)
    run.complete(1, {"charge_id": "ch-1"})
    _assert_stuck(run, "step 1", "'billing.charge'", "'payment.charge'")
    # The input that arrived is kept, so a fixed deploy can still use it.
    assert_history(
        run.record,
        ["sched 0#1 inventory.reserve", "done 0#1", "sched 1#1 payment.charge", "done 1#1"],
    )


def test_a_removed_first_step_parks_the_workflow() -> None:
    run = _order_run()
    run.registry = _registry("order.process", _reserve_removed)
    run.complete(1, {"charge_id": "ch-1"})
    _assert_stuck(run, "step 0", "'payment.charge'", "'inventory.reserve'")


def test_a_removed_last_step_parks_the_workflow() -> None:
    run = _order_run()
    run.complete(1, {"charge_id": "ch-1"})
    assert run.tasks() == ["order-1/2/1 shipping.schedule"]
    run.registry = _registry("order.process", _shipping_removed)
    run.complete(2, {"shipment_id": "sh-1"})
    _assert_stuck(run, "step 2", "'shipping.schedule'")


def test_a_step_that_lost_its_compensation_flag_parks_the_workflow() -> None:
    run = _order_run()
    run.fail(1, "PaymentDeclined")
    assert run.tasks() == ["order-1/2/1 inventory.release comp"]
    run.registry = _registry("order.process", _release_not_compensation)
    run.complete(2, {"released": True})
    _assert_stuck(run, "step 2", "compensation 'inventory.release'", "activity 'inventory.release'")


class _Foreign:
    """An awaitable that is not a sagaline step (as a third-party library would hand out)."""

    def __await__(self) -> Generator[str, None, int]:
        yield "tick"
        return 1


# Each makes the awaitable inside the workflow, so nothing is created and left unawaited.
# The message names the call and what it yielded (tests/unit/test_engine_asyncio.py has
# the rest of asyncio).
NOT_STEPS: dict[str, tuple[Callable[[], Awaitable[Any]], tuple[str, ...]]] = {
    "asyncio.sleep(0)": (lambda: asyncio.sleep(0), ("asyncio.sleep", "yielded None")),
    "asyncio.sleep(1)": (lambda: asyncio.sleep(1), ("asyncio.sleep",)),
    "foreign-awaitable": (_Foreign, ("_Foreign.__await__", "yielded str")),
}


@pytest.mark.parametrize("kind", list(NOT_STEPS))
def test_awaiting_something_that_is_not_a_step_parks_the_workflow(kind: str) -> None:
    make, awaited = NOT_STEPS[kind]

    async def waits_between_steps(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
        await ctx.activity("inventory.reserve", {"order_id": order["order_id"]})
        await make()
        return await ctx.activity("payment.charge", {"amount": order["total"]})

    run = WorkflowRun(_order_v1(), "order.process", workflow_id="order-1")
    run.start(ORDER)
    run.registry = _registry("order.process", waits_between_steps)
    run.complete(0, {"reservation_id": "r-1"})
    _assert_stuck(run, *awaited, error_type="WorkflowDefinitionError")
    assert_history(run.record, ["sched 0#1 inventory.reserve", "done 0#1"])


@pytest.mark.parametrize("kind", list(NOT_STEPS))
def test_a_new_workflow_awaiting_something_else_is_stuck_from_the_start(kind: str) -> None:
    make, awaited = NOT_STEPS[kind]

    async def waits_first(ctx: WorkflowContext, _: Any) -> Any:
        await make()
        return await ctx.activity("p.work")

    run = WorkflowRun(_registry("t.await", waits_first), "t.await")
    run.start()
    _assert_stuck(run, *awaited, error_type="WorkflowDefinitionError")
    assert_history(run.record, [])


# --- recovery by a fixed deploy ------------------------------------------------------


async def _pair_v1(ctx: WorkflowContext, _: Any) -> Any:
    left, right = await ctx.gather(ctx.activity("p.left"), ctx.activity("p.right"))
    return await ctx.activity("p.join", [left, right])


async def _pair_broken(ctx: WorkflowContext, _: Any) -> Any:
    left, right = await ctx.gather(ctx.activity("p.left"), ctx.activity("p.rite"))
    return await ctx.activity("p.join", [left, right])


def test_a_stuck_workflow_resumes_when_the_code_is_fixed() -> None:
    fixed = _registry("t.pair", _pair_v1)
    run = WorkflowRun(fixed, "t.pair", workflow_id="pair-1")
    run.start()
    run.registry = _registry("t.pair", _pair_broken)
    run.complete(0, "L")
    _assert_stuck(run, "step 1", "'p.rite'", "'p.right'")
    assert run.record is not None
    assert task_lines(pending_tasks(run.record)) == ["pair-1/1/1 p.right"]

    run.registry = fixed
    run.complete(1, "R")
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert run.record is not None and run.record.failure is None
    assert run.tasks() == ["pair-1/2/1 p.join"]
    assert run.last is not None
    assert decode_json(run.last.tasks[0].payload) == ["L", "R"]
    run.complete(2, "joined")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert_history(
        run.record,
        [
            "sched 0#1 p.left",
            "sched 1#1 p.right",
            "done 0#1",
            "done 1#1",
            "sched 2#1 p.join",
            "done 2#1",
        ],
    )


async def _race_v1(ctx: WorkflowContext, _: Any) -> Any:
    audit = ctx.activity("audit.log")
    quote = await ctx.activity("pricing.quote")
    order = await ctx.activity("orders.place", quote)
    await audit
    return order


async def _race_broken(ctx: WorkflowContext, _: Any) -> Any:
    audit = ctx.activity("audit.write")
    quote = await ctx.activity("pricing.quote")
    order = await ctx.activity("orders.place", quote)
    await audit
    return order


def test_a_stuck_workflow_resumes_when_the_fixed_code_schedules_after_the_stuck_input() -> None:
    """The input that arrived while stuck ran no code; the fix must run it, not reject it."""
    fixed = _registry("t.race", _race_v1)
    run = WorkflowRun(fixed, "t.race", workflow_id="race-1")
    run.start()
    assert run.tasks() == ["race-1/0/1 audit.log", "race-1/1/1 pricing.quote"]
    run.registry = _registry("t.race", _race_broken)
    run.complete(1, 42)  # the quote arrives while the code is broken
    _assert_stuck(run, "step 0")

    run.registry = fixed
    run.complete(0, "logged")  # the audit result arrives after the fix
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert run.tasks() == ["race-1/2/1 orders.place"]


def test_a_workflow_stuck_on_an_unknown_type_resumes_when_the_type_is_back() -> None:
    fixed = _registry("t.race", _race_v1)
    run = WorkflowRun(fixed, "t.race", workflow_id="race-2")
    run.start()
    run.registry = WorkflowRegistry()
    run.complete(1, 42)
    assert_status(run.record, WorkflowStatus.STUCK, "UnknownWorkflowType")

    run.registry = fixed
    run.complete(0, "logged")
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert run.tasks() == ["race-2/2/1 orders.place"]


# --- code that runs while the engine closes a suspended workflow ---------------------


async def _with_cleanup(ctx: WorkflowContext, _: Any) -> Any:
    try:
        return await ctx.activity("p.work")
    finally:
        await ctx.activity("p.cleanup")


def test_a_finally_block_runs_only_when_the_code_gets_there() -> None:
    """Suspending a workflow between inputs must not run its finally blocks."""
    run = WorkflowRun(_registry("t.cleanup", _with_cleanup), "t.cleanup")
    run.start()
    assert run.tasks() == ["wf-1/0/1 p.work"], (
        f"workflow wf-1: only p.work may be scheduled while it runs; observed tasks "
        f"{run.tasks()}, history {history_lines(run.record.events if run.record else ())}"
    )
    run.complete(0, "done")
    assert run.tasks() == ["wf-1/1/1 p.cleanup"]
    run.complete(1)
    assert_status(run.record, WorkflowStatus.COMPLETED)
