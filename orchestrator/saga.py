"""The ``Saga`` helper: register an undo step as each step completes, run them on failure."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from orchestrator.errors import ActivityError, ConfigurationError, WorkflowCancelledError
from orchestrator.protocol.topics import activity_name_problem
from orchestrator.workflow import (
    ActivityHandle,
    RetryPolicy,
    WorkflowContext,
    _shown,
    _type_name,
)

COMPENSATION_RETRY = RetryPolicy(
    max_attempts=30, initial_interval=1, backoff_coefficient=2, maximum_interval=600
)
"""The default policy of compensations: patient, because an undo must not give up on a
short outage. 30 attempts, 1 s, 2 s, 4 s ... apart, at most 10 minutes apart: about 3.5
hours of retries (12,423 s of waiting) before a compensation fails for good."""


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
        """Bind the saga to the workflow's context.

        Raises:
            ConfigurationError: ``ctx`` is not the workflow's context, ``parallel`` is not
                a bool or ``retry`` not a RetryPolicy (the workflow is parked as STUCK).
        """
        if not isinstance(ctx, WorkflowContext):
            raise ConfigurationError(
                f"Saga(ctx) takes the workflow's WorkflowContext, got {_type_name(ctx)}"
            )
        if type(parallel) is not bool:
            raise ctx._misuse(f"Saga(parallel=...) takes a bool, got {_type_name(parallel)}")
        if not isinstance(retry, RetryPolicy):
            raise ctx._misuse(f"Saga(retry=...) takes a RetryPolicy, got {_type_name(retry)}")
        self._ctx = ctx
        self._parallel = parallel
        self._retry = retry
        self._steps: list[tuple[str, Any]] = []

    def add_compensation(self, activity: str, value: Any = None) -> None:
        """Register the activity that undoes the step that just completed.

        Raises:
            ConfigurationError: ``activity`` is not a valid '<participant>.<activity>'
                name (checked here, not when the compensation runs; the workflow is parked
                as STUCK).
        """
        problem = activity_name_problem(activity)
        if problem is not None:
            raise self._ctx._misuse(f"Saga.add_compensation({_shown(activity)}): {problem}")
        self._steps.append((str.__str__(activity), value))

    async def compensate(self) -> None:
        """Run the registered compensations now (once); later calls do nothing.

        A cancel that arrives while they run does not stop them: they all finish, then
        ``WorkflowCancelledError`` is raised (unless a compensation failed for good, whose
        ``ActivityError`` is raised instead).
        """
        steps, self._steps = list(reversed(self._steps)), []
        cancelled: WorkflowCancelledError | None = None
        if self._parallel:
            handles: list[ActivityHandle] = [
                self._ctx.activity(name, value, retry=self._retry, compensation=True)
                for name, value in steps
            ]
            while True:
                try:
                    await self._ctx.gather(*handles)
                    break
                except WorkflowCancelledError as exc:
                    cancelled = exc  # undo everything anyway: wait for them again
            if cancelled is not None:
                raise cancelled
            return
        first_error: ActivityError | None = None
        for name, value in steps:
            handle = self._ctx.activity(name, value, retry=self._retry, compensation=True)
            while True:
                # Keep undoing the older steps even if one undo fails for good.
                try:
                    await handle
                    break
                except WorkflowCancelledError as exc:
                    cancelled = exc  # a cancel does not stop an undo: wait for it again
                except ActivityError as exc:
                    first_error = first_error or exc
                    break
        if first_error is not None:
            raise first_error
        if cancelled is not None:
            raise cancelled

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
