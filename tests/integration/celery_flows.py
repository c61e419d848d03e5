"""Workflows that call Celery tasks (``ctx.celery``), for the Celery end-to-end test:
``sagaline orchestrator tests.integration.celery_flows:registry``."""

from __future__ import annotations

from typing import Any

from orchestrator import ActivityError, RetryPolicy, WorkflowContext, WorkflowRegistry

registry = WorkflowRegistry()


@registry.workflow("celery.checkout")
async def checkout(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    """Charges the card with the Celery task; a decline is refunded (a compensation that
    is a Celery task too) and ends the workflow as its own result."""
    queue = order["queue"]
    try:
        return await ctx.celery(
            "shop.tasks.charge_card",
            order["order_id"],
            amount=order["amount"],
            card=order["card"],
            queue=queue,
            retry=RetryPolicy(max_attempts=3, non_retryable_error_types=("CardDeclined",)),
        )
    except ActivityError as failure:
        # The compensation is retried by the workflow's policy like any step.
        refunded = await ctx.celery(
            "shop.tasks.refund",
            order["order_id"],
            fail_attempts=order.get("refund_fails", 0),
            queue=queue,
            compensation=True,
            retry=RetryPolicy(max_attempts=4, initial_interval=0.1),
        )
        return {"declined": failure.error_type, "refund": refunded}


@registry.workflow("celery.quote")
async def quote(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    """A task that hangs on its first attempt: its start-to-close timeout fails that
    attempt and the retry answers."""
    return await ctx.celery(
        "shop.tasks.slow_quote",
        order["order_id"],
        hang_s=order["hang_s"],
        queue=order["queue"],
        start_to_close=order["start_to_close_s"],
        retry=RetryPolicy(max_attempts=2, initial_interval=0.1),
    )
