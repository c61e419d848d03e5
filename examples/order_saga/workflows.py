"""Order processing: reserve stock, charge, ship; undo the reservation if payment fails
(and refund the order when the charge was given up on, since it may have gone through)."""

from __future__ import annotations

from typing import Any

from orchestrator import ActivityError, RetryPolicy, WorkflowContext, WorkflowRegistry
from participants import ActivityContext, ActivityFailure

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


# --- the same saga with local activities -------------------------------------------------
# Steps that need no service of their own (here, a quote computed from the order) run inside
# the orchestrator: no task on Kafka, and the whole saga is recorded in the transaction of
# its start. They run at least once (again if the orchestrator dies before that commit), so
# they must be idempotent: these only compute, and cannot block, so they run on the loop's
# own thread (inline=True).


class CardDeclined(ActivityFailure):
    """The order's card is refused; not retried."""

    retryable = False


@registry.local_activity("reserve", inline=True)
def reserve_quote(order: dict[str, Any], *, ctx: ActivityContext) -> dict[str, Any]:
    """A reservation id and the units held, derived from the order."""
    units = sum(int(item["qty"]) for item in order["items"])
    return {"reservation_id": f"r-{order['order_id']}", "units": units}


@registry.local_activity("charge", inline=True)
def charge_quote(request: dict[str, Any], *, ctx: ActivityContext) -> dict[str, Any]:
    """A charge id for the amount; the card ``"declined"`` raises CardDeclined."""
    if request["card"] == "declined":
        raise CardDeclined(f"order {request['order_id']}: card declined")
    return {"charge_id": f"c-{request['order_id']}", "amount": request["amount"]}


@registry.local_activity("release", inline=True)
def release_quote(reservation: dict[str, Any], *, ctx: ActivityContext) -> dict[str, Any]:
    """Undo of ``reserve``: nothing was held outside the workflow."""
    return {"released": reservation["reservation_id"]}


@registry.local_activity("ship", inline=True)
def ship_quote(request: dict[str, Any], *, ctx: ActivityContext) -> dict[str, Any]:
    """A shipment id for the address."""
    return {"shipment_id": f"s-{request['order_id']}"}


@registry.workflow("order.local")
async def process_order_locally(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    """``order.process``'s shape with local steps: reserve, charge, ship; release the
    reservation when the charge is declined."""
    reservation = await ctx.local_activity(
        "reserve", {"order_id": order["order_id"], "items": order["items"]}
    )
    try:
        charge = await ctx.local_activity(
            "charge",
            {"order_id": order["order_id"], "amount": order["total"], "card": order["card"]},
            retry=RetryPolicy(max_attempts=5),
        )
    except ActivityError:
        await ctx.local_activity("release", reservation, compensation=True)
        raise
    shipment = await ctx.local_activity(
        "ship", {"order_id": order["order_id"], "address": order["address"]}
    )
    return {"charge_id": charge["charge_id"], "shipment_id": shipment["shipment_id"]}
