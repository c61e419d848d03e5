"""Workflows that misbehave in every way one found in review, beside the real order saga.

The hardening tests run ``sagaline orchestrator tests.integration.misbehaving:registry`` and
check that each of these affects only itself while order sagas on the same partition
complete. ``registry_mismatch`` and ``registry_fixed`` are two deploys of one sequential
workflow, the first of which no longer matches the history the second wrote.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from examples.order_saga.workflows import process_order
from orchestrator import ActivityError, WorkflowContext, WorkflowRegistry
from participants import ActivityContext, Participant


class UnprintableError(Exception):
    """An exception whose ``str()`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("no string for you")


def _reserve_value(order: dict[str, Any]) -> dict[str, Any]:
    return {"order_id": order["order_id"], "items": [{"sku": "sku-bad", "qty": 1}]}


registry = WorkflowRegistry()
registry.workflow("order.process")(process_order)


@registry.workflow("bad.cancelled")
async def raises_cancelled(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Raises a BaseException that is not an Exception after its first step."""
    await ctx.activity("inventory.reserve", _reserve_value(order))
    raise asyncio.CancelledError("cancelled by the workflow itself")


@registry.workflow("bad.system_exit")
async def raises_system_exit(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Calls sys.exit from workflow code."""
    sys.exit(3)


@registry.workflow("bad.finally_raises")
async def finally_raises(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Its finally raises, also while the engine closes it blocked on a step."""
    try:
        await ctx.activity("inventory.reserve", _reserve_value(order))
    finally:
        raise ValueError("boom in finally")


@registry.workflow("bad.bare_except")
async def bare_except(ctx: WorkflowContext, order: dict[str, Any]) -> str:
    """A bare except that turns the engine's GeneratorExit into another exception."""
    try:
        await ctx.activity("inventory.reserve", _reserve_value(order))
    except:  # noqa: E722 - the point of the test
        raise KeyError("rewrapped") from None
    return "done"


@registry.workflow("bad.unprintable")
async def raises_unprintable(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Fails with an exception whose str() raises."""
    raise UnprintableError


@registry.workflow("bad.surrogate_error")
async def surrogate_error(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Fails with a message holding a lone surrogate that came from JSON input."""
    raise ValueError(f"bad text {order['text']}")


@registry.workflow("bad.surrogate_activity")
async def surrogate_activity(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Names an activity with a lone surrogate in it."""
    await ctx.activity(f"inventory.reserve{order['text']}", _reserve_value(order))


@registry.workflow("bad.invalid_topic")
async def invalid_topic(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Names a participant that cannot be part of a topic name."""
    await ctx.activity("no such!.go", {})


@registry.workflow("bad.missing_topic")
async def missing_topic(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Calls a participant that has no tasks topic."""
    await ctx.activity("ghost.go", {})


@registry.workflow("bad.asyncio_sleep")
async def asyncio_sleep(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Awaits asyncio directly."""
    await asyncio.sleep(0.5)


@registry.workflow("bad.asyncio_gather")
async def asyncio_gather(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Awaits asyncio.gather over sagaline handles."""
    await asyncio.gather(ctx.activity("inventory.reserve", _reserve_value(order)))


@registry.workflow("bad.tiny_topic")
async def tiny_topic(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Sends a task that fits sagaline's limit but not its topic's max.message.bytes."""
    await ctx.activity("tiny.go", {"pad": "x" * order["pad"]})


@registry.workflow("bad.big_key")
async def big_key(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """Schedules a step whose record is under the limit only without its long key."""
    await ctx.activity("inventory.reserve", {**_reserve_value(order), "pad": "x" * order["pad"]})


@registry.workflow("bad.too_large_step")
async def too_large_step(ctx: WorkflowContext, order: dict[str, Any]) -> None:
    """A step too large to record; its compensation must still run."""
    reservation = await ctx.activity("inventory.reserve", _reserve_value(order))
    try:
        await ctx.activity("payment.charge", {"pad": "x" * order["pad"]})
    except ActivityError:
        await ctx.activity("inventory.release", reservation, compensation=True)
        raise


@registry.workflow("slow.replay")
async def slow_replay(ctx: WorkflowContext, value: dict[str, Any]) -> str:
    """Takes ``ms`` of CPU on every replay (deterministic, only slow), then sends a task."""
    end = time.perf_counter() + value["ms"] / 1000
    while time.perf_counter() < end:
        pass
    await ctx.activity("audit.record", {"slow": True})
    return "slow"


@registry.workflow("held.audit")
async def audited(ctx: WorkflowContext, order: dict[str, Any]) -> str:
    """Reserves, then asks a participant whose topic may not exist yet."""
    reservation = await ctx.activity("inventory.reserve", _reserve_value(order))
    await ctx.activity("audit.record", {"reservation": reservation})
    return "audited"


audit = Participant("audit")


@audit.activity("record")
def record(value: dict[str, Any], *, ctx: ActivityContext) -> str:
    """Accepts anything."""
    return f"audited {ctx.activity_id}"


async def _sequential(ctx: WorkflowContext, order: dict[str, Any]) -> str:
    reservation = await ctx.activity("inventory.reserve", _reserve_value(order))
    await ctx.activity("audit.record", {"reservation": reservation})
    return "recorded"


async def _sequential_mismatch(ctx: WorkflowContext, order: dict[str, Any]) -> str:
    reservation = await ctx.activity("inventory.reserve", _reserve_value(order))
    # A deploy that changed the second step: it no longer matches recorded histories.
    await ctx.activity("shipping.schedule", {"order_id": order["order_id"], "r": reservation})
    return "shipped"


registry_fixed = WorkflowRegistry()
registry_fixed.workflow("order.process")(process_order)
registry_fixed.workflow("seq.flow")(_sequential)
registry_fixed.workflow("late.type")(_sequential)

registry_mismatch = WorkflowRegistry()
registry_mismatch.workflow("order.process")(process_order)
registry_mismatch.workflow("seq.flow")(_sequential_mismatch)
