"""Order processing: reserve stock, charge, ship; undo the reservation if payment fails."""

from __future__ import annotations

from typing import Any

from orchestrator import ActivityError, RetryPolicy, WorkflowContext, WorkflowRegistry

registry = WorkflowRegistry()


@registry.workflow("order.process")
async def process_order(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    """Reserve, charge and ship one order; release the stock when payment fails."""
    reservation = await ctx.activity(
        "inventory.reserve", {"order_id": order["order_id"], "items": order["items"]}
    )
    try:
        charge = await ctx.activity(
            "payment.charge",
            {"order_id": order["order_id"], "amount": order["total"], "card": order["card"]},
            retry=RetryPolicy(max_attempts=5, non_retryable_error_types=("PaymentDeclined",)),
        )
    except ActivityError:
        await ctx.activity("inventory.release", reservation, compensation=True)
        raise
    shipment = await ctx.activity(
        "shipping.schedule", {"order_id": order["order_id"], "address": order["address"]}
    )
    return {"charge_id": charge["charge_id"], "shipment_id": shipment["shipment_id"]}
