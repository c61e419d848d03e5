"""Order processing: reserve stock, charge, ship; undo the reservation if payment fails
(and refund the order when the charge was given up on, since it may have gone through)."""

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
            # An order may carry a payment deadline: a charge not done that many seconds
            # after it was first sent (every attempt and wait included) is given up.
            schedule_to_close=order.get("payment_deadline_s"),
        )
    except ActivityError as failure:
        if failure.error_type == "ScheduleToCloseTimeout":
            # Given up is not undone: an attempt may still have charged the card (a
            # deadline stops waiting, not the payment network), so refund whatever this
            # order was charged; with no charge, the refund changes nothing.
            await ctx.activity("payment.refund", {"order_id": order["order_id"]}, compensation=True)
        await ctx.activity("inventory.release", reservation, compensation=True)
        raise
    shipment = await ctx.activity(
        "shipping.schedule", {"order_id": order["order_id"], "address": order["address"]}
    )
    return {"charge_id": charge["charge_id"], "shipment_id": shipment["shipment_id"]}
