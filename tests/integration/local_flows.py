"""Workflows with local activities, for the end-to-end tests.

``sagaline orchestrator tests.integration.local_flows:registry`` runs them. Each run of a
local handler appends a line to the file ``LOCAL_FLOWS_LOG`` names, so a test can count
how often a step ran (at least once) against how often history recorded it (once).
``local.mixed`` also needs the order saga's payment participant.
"""

from __future__ import annotations

import os
import time
from typing import Any

from orchestrator import ActivityError, RetryPolicy, WorkflowContext, WorkflowRegistry
from participants import ActivityContext

registry = WorkflowRegistry()


def _note(ctx: ActivityContext, what: str) -> None:
    # One write() per line with O_APPEND: lines of concurrent processes do not interleave.
    line = f"{ctx.workflow_id} {ctx.seq} {ctx.attempt} {what} {os.getpid()}\n".encode()
    fd = os.open(os.environ["LOCAL_FLOWS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@registry.local_activity("add")
def add(value: dict[str, int], *, ctx: ActivityContext) -> int:
    """``a + b``, after ``sleep_ms`` (a step that takes a moment, so a kill can land)."""
    time.sleep(value.get("sleep_ms", 0) / 1000)
    _note(ctx, "add")
    return value["a"] + value["b"]


@registry.local_activity("stall")
def stall(value: Any, *, ctx: ActivityContext) -> str:
    """Hangs on its first attempt (a sync handler the loop cannot cancel); returns after."""
    _note(ctx, "stall")
    if ctx.attempt == 1:
        time.sleep(3_600)
    return "done"


@registry.local_activity("flaky")
def flaky(value: Any, *, ctx: ActivityContext) -> str:
    """Raises on its first two attempts."""
    _note(ctx, "flaky")
    if ctx.attempt < 3:
        raise RuntimeError(f"attempt {ctx.attempt} failed")
    return f"ok on {ctx.attempt}"


@registry.local_activity("broken")
def broken(value: Any, *, ctx: ActivityContext) -> str:
    """Always raises."""
    _note(ctx, "broken")
    raise ValueError("nothing works")


@registry.local_activity("undo")
def undo(value: Any, *, ctx: ActivityContext) -> str:
    """A compensation."""
    _note(ctx, "undo")
    return "undone"


@registry.local_activity("uses-db")
def uses_db(value: Any, *, ctx: ActivityContext) -> Any:
    """Reaches for ``ctx.db``, which local activities do not have."""
    return ctx.db.execute("SELECT 1")


_FAST = RetryPolicy(max_attempts=3, initial_interval=0.05)


@registry.workflow("local.chain")
async def chain(ctx: WorkflowContext, request: dict[str, Any]) -> int:
    """Adds 0..steps-1 up one local step at a time."""
    total = 0
    for i in range(request["steps"]):
        total = await ctx.local_activity(
            "add", {"a": total, "b": i, "sleep_ms": request.get("sleep_ms", 0)}
        )
    return total


@registry.workflow("local.stall")
async def stalled(ctx: WorkflowContext, request: Any) -> str:
    """A local step whose first attempt hangs past its one-second start-to-close."""
    result: str = await ctx.local_activity("stall", None, start_to_close=1, retry=_FAST)
    return result


@registry.workflow("local.retry")
async def retried(ctx: WorkflowContext, request: Any) -> str:
    """A local step that succeeds on its third attempt, retried on durable timers."""
    result: str = await ctx.local_activity("flaky", None, retry=_FAST)
    return result


@registry.workflow("local.compensate")
async def compensate(ctx: WorkflowContext, request: Any) -> str:
    """A local step that fails for good, then a local compensation."""
    await ctx.local_activity("add", {"a": 1, "b": 1})
    try:
        await ctx.local_activity(
            "broken", None, retry=RetryPolicy(max_attempts=2, initial_interval=0.05)
        )
    except ActivityError:
        await ctx.local_activity("undo", None, compensation=True)
        raise
    return "unreachable"


@registry.workflow("local.db")
async def needs_db(ctx: WorkflowContext, request: Any) -> Any:
    """A local step that uses ctx.db: it fails, and says why."""
    return await ctx.local_activity("uses-db", None, retry=RetryPolicy(max_attempts=1))


@registry.workflow("local.mixed")
async def mixed(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    """A local step, a remote one (the order saga's payment participant), a local one."""
    before = await ctx.local_activity("add", {"a": order["total"], "b": 0})
    charge = await ctx.activity(
        "payment.charge", {"order_id": order["order_id"], "amount": before, "card": order["card"]}
    )
    after = await ctx.local_activity("add", {"a": before, "b": 1})
    return {"charge_id": charge["charge_id"], "after": after}
