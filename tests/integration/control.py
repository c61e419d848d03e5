"""Workflows that wait for control from outside, for the end-to-end tests.

``sagaline orchestrator tests.integration.control:registry`` runs them; only
``control.reserve_then_wait`` needs a participant (the order saga's inventory).
"""

from __future__ import annotations

from typing import Any

from orchestrator import (
    ParentClosePolicy,
    RetryPolicy,
    Saga,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowTimeoutError,
)

registry = WorkflowRegistry()


@registry.workflow("control.approval")
async def approval(ctx: WorkflowContext, request: dict[str, Any]) -> dict[str, Any]:
    """Waits for ``approvals`` signals named ``approve`` and returns them in order; gives
    up after ``timeout_s`` without one."""
    taken = []
    for _ in range(request.get("approvals", 1)):
        try:
            taken.append(await ctx.wait_signal("approve", timeout=request.get("timeout_s", 300)))
        except WorkflowTimeoutError:
            return {"approved": taken, "timed_out": True}
    return {"approved": taken, "timed_out": False}


@registry.workflow("control.callback")
async def callback(ctx: WorkflowContext, request: dict[str, Any]) -> Any:
    """Waits for a promise that something outside completes (its id is in the history:
    ``<workflow id>/<run id>/p0``); a failed one raises, and the workflow fails."""
    return await ctx.promise("provider-callback").with_timeout(request.get("timeout_s", 300))


@registry.workflow("control.reserve_then_wait")
async def reserve_then_wait(ctx: WorkflowContext, order: dict[str, Any]) -> str:
    """Reserves stock twice (the order saga's inventory participant), then waits for the
    signal ``ship``; a cancel meanwhile releases both reservations, newest first."""
    async with Saga(ctx) as saga:
        for part in ("a", "b"):
            reservation = await ctx.activity(
                "inventory.reserve",
                {"order_id": f"{order['order_id']}-{part}", "items": order["items"]},
            )
            saga.add_compensation("inventory.release", reservation)
        await ctx.wait_signal("ship")
    return "shipped"


@registry.workflow("control.cart")
async def cart(ctx: WorkflowContext, request: dict[str, Any]) -> list[str]:
    """A cart that answers the query ``state`` and takes the update ``add`` (a non-empty
    string; returns the item count) while it sleeps ``sleep_s``; then returns its items."""
    items: list[str] = []
    phase = {"now": "sleeping"}
    ctx.on_query("state", lambda: {"items": list(items), "phase": phase["now"]})

    def add(item: str) -> int:
        items.append(item)
        return len(items)

    def check(item: Any) -> None:
        if not isinstance(item, str) or not item:
            raise ValueError("an item is a non-empty string")

    ctx.on_update("add", add, validator=check)
    await ctx.sleep(request.get("sleep_s", 0))
    phase["now"] = "done"
    return items


@registry.workflow("control.charge")
async def charge(ctx: WorkflowContext, request: dict[str, Any]) -> Any:
    """A child: charges the card once (the order saga's payment participant)."""
    return await ctx.activity("payment.charge", request, retry=RetryPolicy(max_attempts=1))


@registry.workflow("control.order_with_child")
async def order_with_child(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    """Reserves stock, then charges in a child workflow; a child that fails (a declined
    card) makes the saga release the stock."""
    async with Saga(ctx) as saga:
        reservation = await ctx.activity(
            "inventory.reserve", {"order_id": order["order_id"], "items": order["items"]}
        )
        saga.add_compensation("inventory.release", reservation)
        return await ctx.child_workflow(
            "control.charge",
            {"order_id": order["order_id"], "card": order["card"], "amount": order["amount"]},
            id=f"{order['order_id']}-charge",
        )


@registry.workflow("control.parent")
async def parent(ctx: WorkflowContext, request: dict[str, Any]) -> Any:
    """Waits for a sleeping cart as its child, under the close policy ``policy``."""
    return await ctx.child_workflow(
        "control.cart",
        {"sleep_s": 3600},
        id=request["child_id"],
        parent_close_policy=ParentClosePolicy[request["policy"]],
    )
