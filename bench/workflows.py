"""The workflows an orchestrator runs during ``bench.state``.

``order.process`` is the order saga itself, so the workflows written straight to the history
topic are ones this registry knows. ``bench.probe`` returns at once without activities: a
probe start closes in the transaction that applies it, so its closed record on the history
topic says "this partition processes inputs now", with nothing but the orchestrator involved.
"""

from __future__ import annotations

from typing import Any, Final

from examples.order_saga.workflows import process_order
from orchestrator import WorkflowContext, WorkflowRegistry

PROBE_TYPE: Final = "bench.probe"
ORDER_TYPE: Final = "order.process"
APP: Final = "bench.workflows:registry"

registry = WorkflowRegistry()
registry.workflow(ORDER_TYPE)(process_order)


@registry.workflow(PROBE_TYPE)
async def probe(ctx: WorkflowContext, value: Any) -> Any:
    """Return the input unchanged: no activity, so the workflow closes when it starts."""
    return value


SLEEPER_TYPE: Final = "bench.sleeper"


@registry.workflow(SLEEPER_TYPE)
async def sleeper(ctx: WorkflowContext, value: Any) -> Any:
    """Sleep until ``value["at_ms"]`` (a durable timer), then close: one timer, no activity."""
    await ctx.sleep_until(value["at_ms"] / 1000)
    return None
