"""Workflows and a participant that use durable time, for the end-to-end tests.

``sagaline orchestrator tests.integration.timed:registry`` runs the workflows;
``sagaline participant tests.integration.timed:slow`` the ``slow`` participant, whose
handlers hang, heartbeat and fail on purpose. The order saga's participants serve the
inventory steps.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from orchestrator import RetryPolicy, Saga, WorkflowContext, WorkflowRegistry
from participants import ActivityContext, ActivityFailure, Participant

registry = WorkflowRegistry()


@registry.workflow("timed.sleeper")
async def sleeper(ctx: WorkflowContext, value: dict[str, Any]) -> dict[str, Any]:
    """Sleeps, then records when it woke through an activity."""
    before = ctx.now()
    await ctx.sleep(value["seconds"])
    woke = ctx.now()
    note = await ctx.activity("slow.note", {"workflow": ctx.workflow_id, "woke": woke})
    return {"slept_from": before, "woke": woke, "note": note}


@registry.workflow("timed.hung_saga")
async def hung_saga(ctx: WorkflowContext, order: dict[str, Any]) -> str:
    """Reserves stock, then calls a step that hangs: it times out twice and is undone."""
    async with Saga(ctx) as saga:
        reservation = await ctx.activity(
            "inventory.reserve", {"order_id": order["order_id"], "items": order["items"]}
        )
        saga.add_compensation("inventory.release", reservation)
        await ctx.activity(
            "slow.hang",
            {"order_id": order["order_id"]},
            start_to_close=2,
            retry=RetryPolicy(max_attempts=2, initial_interval=0.5),
        )
    return "not reached"


@registry.workflow("timed.resumable")
async def resumable(ctx: WorkflowContext, value: dict[str, Any]) -> Any:
    """A long step that heartbeats, stops heartbeating once, and resumes from its details."""
    return await ctx.activity(
        "slow.beat",
        value,
        heartbeat_timeout=1.5,
        start_to_close=60,
        retry=RetryPolicy(max_attempts=3, initial_interval=0.2),
    )


@registry.workflow("timed.flaky")
async def flaky(ctx: WorkflowContext, value: dict[str, Any]) -> Any:
    """A step that fails twice before it works: the retries back off 1 s, then 2 s."""
    return await ctx.activity(
        "slow.flaky",
        value,
        retry=RetryPolicy(max_attempts=4, initial_interval=1, backoff_coefficient=2),
    )


@registry.workflow("timed.rate_limited")
async def rate_limited(ctx: WorkflowContext, value: dict[str, Any]) -> Any:
    """A step whose first attempt asks to be retried after 1.5 s, overriding the policy."""
    return await ctx.activity(
        "slow.limited", value, retry=RetryPolicy(max_attempts=3, initial_interval=0.1)
    )


@registry.workflow("timed.quick")
async def quick(ctx: WorkflowContext, value: dict[str, Any]) -> Any:
    """One quick step on the slow participant, to show it keeps serving."""
    return await ctx.activity("slow.quick", value)


slow = Participant("slow")
# Hung sync handlers wait on this; it is never set while the process lives.
_NEVER = threading.Event()


class RateLimited(ActivityFailure):
    """The downstream API said: not now, in a moment."""

    retryable = True


@slow.activity("note")
def note(value: dict[str, Any], *, ctx: ActivityContext) -> str:
    return f"noted {ctx.activity_id}"


@slow.activity("hang")
async def hang(value: dict[str, Any], *, ctx: ActivityContext) -> str:
    await asyncio.sleep(3_600)
    return "never"


@slow.activity("beat")
async def beat(value: dict[str, Any], *, ctx: ActivityContext) -> dict[str, Any]:
    resumed = ctx.heartbeat_details
    if resumed is not None:
        return {"resumed_from": resumed, "attempt": ctx.attempt}
    for done in (1, 2, 3):
        ctx.heartbeat({"done": done})
        await asyncio.sleep(0.4)
    await asyncio.sleep(3_600)  # stops heartbeating: the orchestrator times it out
    return {"never": True}


@slow.activity("flaky")
def flaky_step(value: dict[str, Any], *, ctx: ActivityContext) -> dict[str, Any]:
    if ctx.attempt < 3:
        raise ConnectionError(f"downstream blip on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


@slow.activity("limited")
def limited(value: dict[str, Any], *, ctx: ActivityContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise RateLimited("429 Too Many Requests", retry_after=1.5)
    return {"attempt": ctx.attempt}


@slow.activity("quick")
def quick_step(value: dict[str, Any], *, ctx: ActivityContext) -> str:
    return f"quick {value['n']}"
