"""The ``Saga`` helper: register an undo step as each step completes, run them on failure."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from orchestrator.errors import ActivityError
from orchestrator.workflow import ActivityHandle, RetryPolicy, WorkflowContext

COMPENSATION_RETRY = RetryPolicy(max_attempts=10)


class Saga:
    """Compensations in reverse order of registration, run when the block fails.

    Example::

        async with Saga(ctx) as saga:
            reservation = await ctx.activity("inventory.reserve", items)
            saga.add_compensation("inventory.release", reservation)
            await ctx.activity("payment.charge", total)

    If the block raises, the compensations registered so far run (newest first, or all
    at once with ``parallel=True``) and the exception propagates, so the workflow ends
    ``COMPENSATED`` (or ``COMPENSATION_FAILED`` if an undo step fails for good).
    """

    def __init__(
        self,
        ctx: WorkflowContext,
        *,
        parallel: bool = False,
        retry: RetryPolicy = COMPENSATION_RETRY,
    ) -> None:
        self._ctx = ctx
        self._parallel = parallel
        self._retry = retry
        self._steps: list[tuple[str, Any]] = []

    def add_compensation(self, activity: str, value: Any = None) -> None:
        """Register the activity that undoes the step that just completed."""
        self._steps.append((activity, value))

    async def compensate(self) -> None:
        """Run the registered compensations now (once); later calls do nothing."""
        steps, self._steps = list(reversed(self._steps)), []
        if self._parallel:
            handles: list[ActivityHandle] = [
                self._ctx.activity(name, value, retry=self._retry, compensation=True)
                for name, value in steps
            ]
            await self._ctx.gather(*handles)
            return
        first_error: ActivityError | None = None
        for name, value in steps:
            # Keep undoing the older steps even if one undo fails for good.
            try:
                await self._ctx.activity(name, value, retry=self._retry, compensation=True)
            except ActivityError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    async def __aenter__(self) -> Saga:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and isinstance(exc, Exception):
            await self.compensate()
