"""The order saga driving the shop's Celery tasks: reserve, charge, ship; release the
reservation when the charge fails for good.

Run it with ``sagaline orchestrator examples.celery_shop.workflows:registry`` beside
``celery -A examples.celery_shop.tasks worker -Q shop-inventory,shop-payments,shop-shipping``.
"""

from __future__ import annotations

from typing import Any

from examples.celery_shop import queues
from orchestrator import ActivityError, RetryPolicy, WorkflowContext, WorkflowRegistry

registry = WorkflowRegistry()
# Each step's hard time limit on the worker, and how long the workflow waits for a
# started task before it tries again.
STEP_TIMEOUT_S = 30
# Compensations retry for longer: giving one up leaves stock held.
UNDO = RetryPolicy(max_attempts=10, initial_interval=1, maximum_interval=30)


@registry.workflow("shop.order")
async def order(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    """One order through the shop's Celery tasks."""
    order_id = order["order_id"]
    reservation = await ctx.celery(
        "shop.inventory.reserve",
        order_id,
        order["items"],
        queue=queues.INVENTORY,
        start_to_close=STEP_TIMEOUT_S,
    )
    try:
        charge = await ctx.celery(
            "shop.payments.charge",
            order_id,
            order["total"],
            card=order["card"],
            queue=queues.PAYMENTS,
            retry=RetryPolicy(max_attempts=5, non_retryable_error_types=("PaymentDeclined",)),
            # An order may carry its own limit on one charge attempt.
            start_to_close=order.get("charge_timeout_s", STEP_TIMEOUT_S),
        )
    except ActivityError:
        await ctx.celery(
            "shop.inventory.release",
            reservation["reservation_id"],
            queue=queues.INVENTORY,
            compensation=True,
            retry=UNDO,
            start_to_close=STEP_TIMEOUT_S,
        )
        raise
    shipment = await ctx.celery(
        "shop.shipping.schedule",
        order_id,
        order["address"],
        queue=queues.SHIPPING,
        start_to_close=STEP_TIMEOUT_S,
    )
    return {"charge_id": charge["charge_id"], "shipment_id": shipment["shipment_id"]}
