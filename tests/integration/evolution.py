"""Three deploys of one order workflow, for the evolution end-to-end test, and a workflow
that loops forever by continuing as new.

``registry_v1`` reserves, charges, then holds the order until the signal ``release``
before it ships. The business then wants the card charged only once the hold is
released: ``registry_v2`` moves the charge after the wait, which strands every order
already charged and waiting (its history has the charge where the new code waits).
``registry_v2_patched`` makes the same change behind ``ctx.patched``: orders that were
charged before the deploy keep the old order of steps, new ones take the new.

All use the order saga's participants (``inventory``, ``payment``, ``shipping``), so the
harness's effect audit applies: one reservation, one payment and one shipment per order.
"""

from __future__ import annotations

from typing import Any

from orchestrator import WorkflowContext, WorkflowRegistry

CHANGE = "charge-after-release"

registry_v1 = WorkflowRegistry()
registry_v2 = WorkflowRegistry()
registry_v2_patched = WorkflowRegistry()


async def _reserve(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    return await ctx.activity(
        "inventory.reserve", {"order_id": order["order_id"], "items": order["items"]}
    )


async def _charge(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    return await ctx.activity(
        "payment.charge",
        {"order_id": order["order_id"], "amount": order["total"], "card": order["card"]},
    )


async def _ship(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    return await ctx.activity(
        "shipping.schedule", {"order_id": order["order_id"], "address": order["address"]}
    )


@registry_v1.workflow("evolution.order")
async def order_v1(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    """Reserve, charge, wait for ``release``, ship."""
    await _reserve(ctx, order)
    charge = await _charge(ctx, order)
    await ctx.wait_signal("release")
    shipment = await _ship(ctx, order)
    return {"charge_id": charge["charge_id"], "shipment_id": shipment["shipment_id"], "path": 1}


@registry_v2.workflow("evolution.order")
async def order_v2(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    """Reserve, wait for ``release``, charge, ship: incompatible with v1's histories."""
    await _reserve(ctx, order)
    await ctx.wait_signal("release")
    charge = await _charge(ctx, order)
    shipment = await _ship(ctx, order)
    return {"charge_id": charge["charge_id"], "shipment_id": shipment["shipment_id"], "path": 2}


@registry_v2_patched.workflow("evolution.order")
async def order_v2_patched(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    """v2's change behind a patch: runs charged under v1 keep v1's order of steps."""
    await _reserve(ctx, order)
    if ctx.patched(CHANGE):
        await ctx.wait_signal("release")
        charge = await _charge(ctx, order)
        path = 2
    else:
        charge = await _charge(ctx, order)
        await ctx.wait_signal("release")
        path = 1
    shipment = await _ship(ctx, order)
    return {"charge_id": charge["charge_id"], "shipment_id": shipment["shipment_id"], "path": path}


async def counter(ctx: WorkflowContext, state: dict[str, Any]) -> Any:
    """Adds up ``add`` signals until ``stop``; continues as new every ``every`` signals,
    so its record stays small however long it runs. Answers the query ``total``."""
    total, taken, runs = state["total"], 0, state.get("runs", 1)
    ctx.on_query("total", lambda: {"total": total, "runs": runs})
    while True:
        which = await ctx.first(ctx.wait_signal("add"), ctx.wait_signal("stop"))
        if which.name == "stop":
            return {"total": total, "runs": runs}
        total += await which
        taken += 1
        if taken == state["every"]:
            ctx.continue_as_new({"total": total, "every": state["every"], "runs": runs + 1})


for _registry in (registry_v1, registry_v2, registry_v2_patched):
    _registry.workflow("evolution.counter")(counter)
