"""What users program against: the ``@workflow`` decorator, the registry and the context.

A workflow is a plain ``async def f(ctx, input)``. It must be deterministic: all I/O goes
through ``ctx.activity`` (run by a participant, recorded in history), and it awaits only
what ``ctx`` hands out. The engine replays the function from its history whenever the
workflow advances, so the same history must always lead to the same calls.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from orchestrator.errors import ConfigurationError

WorkflowFn = Callable[["WorkflowContext", Any], Coroutine[Any, Any, Any]]
F = TypeVar("F", bound=WorkflowFn)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often the orchestrator re-sends an activity whose attempt failed.

    Only failures the participant marks retryable are retried, and never those whose
    error type is listed in ``non_retryable_error_types``. Each attempt gets its own
    activity id. Backoff between attempts arrives with durable timers.

    Example::

        await ctx.activity("payment.charge", total, retry=RetryPolicy(max_attempts=5))
    """

    max_attempts: int = 3
    non_retryable_error_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be >= 1, got {self.max_attempts}")


DEFAULT_RETRY = RetryPolicy()


class ActivityHandle:
    """An activity that has been scheduled; ``await`` it for its result.

    Scheduling happens when ``ctx.activity`` is called, not when the handle is awaited,
    so several handles can be created first and awaited together with ``ctx.gather``.
    """

    __slots__ = ("_done", "_error", "_value", "name", "seq")

    def __init__(self, seq: int, name: str) -> None:
        self.seq = seq
        self.name = name
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        """True once the activity's final outcome is known."""
        return self._done

    def resolve(self, value: Any) -> None:
        """Engine use: the activity completed with ``value``."""
        self._done, self._value = True, value

    def reject(self, error: BaseException) -> None:
        """Engine use: the activity failed for good with ``error``."""
        self._done, self._error = True, error

    def __await__(self) -> Generator[ActivityHandle, None, Any]:
        while not self._done:
            yield self
        if self._error is not None:
            raise self._error
        return self._value


class _Gather:
    __slots__ = ("_handles",)

    def __init__(self, handles: tuple[ActivityHandle, ...]) -> None:
        self._handles = handles

    def __await__(self) -> Generator[ActivityHandle, None, list[Any]]:
        # Wait for every branch before raising, so a compensation sees which ones finished.
        for handle in self._handles:
            while not handle.done:
                yield handle
        results: list[Any] = []
        for handle in self._handles:
            results.append((yield from handle.__await__()))
        return results


class Scheduler(Protocol):
    """The engine side of a context: turns calls into recorded commands."""

    def schedule(
        self, name: str, value: Any, retry: RetryPolicy, compensation: bool
    ) -> ActivityHandle:
        """Record (or match, on replay) one activity call and return its handle."""
        ...

    def now_ms(self) -> int:
        """The workflow's deterministic clock."""
        ...


class WorkflowContext:
    """The handle a workflow function receives as its first argument."""

    __slots__ = ("_scheduler", "workflow_id", "workflow_type")

    def __init__(self, workflow_id: str, workflow_type: str, scheduler: Scheduler) -> None:
        self.workflow_id = workflow_id
        self.workflow_type = workflow_type
        self._scheduler = scheduler

    def activity(
        self,
        name: str,
        value: Any = None,
        *,
        retry: RetryPolicy | None = None,
        compensation: bool = False,
    ) -> ActivityHandle:
        """Schedule activity ``name`` ('<participant>.<activity>') with a JSON value.

        Args:
            name: participant and activity, e.g. ``"payment.charge"``.
            value: the single argument the participant's handler receives.
            retry: attempts and non-retryable error types; default 3 attempts.
            compensation: mark this step as undoing an earlier one, so a workflow that
                then fails ends ``COMPENSATED`` rather than ``FAILED``.

        Returns:
            A handle; ``await`` it for the handler's return value. It raises
            :class:`~orchestrator.errors.ActivityError` when the activity fails for good.
        """
        participant, sep, activity = name.partition(".")
        if not sep or not participant or not activity:
            raise ConfigurationError(f"activity name {name!r} must be '<participant>.<activity>'")
        return self._scheduler.schedule(name, value, retry or DEFAULT_RETRY, compensation)

    def gather(self, *handles: ActivityHandle) -> Awaitable[list[Any]]:
        """Await several scheduled activities; results in argument order.

        Waits for all of them; if any failed, raises the first failure (argument order)
        once the rest have finished.
        """
        return _Gather(tuple(handles))

    def now(self) -> float:
        """Deterministic time (seconds since the epoch) of the input being replayed."""
        return self._scheduler.now_ms() / 1000.0


class WorkflowRegistry:
    """Maps workflow type names to functions; an orchestrator runs one registry."""

    def __init__(self) -> None:
        self._functions: dict[str, WorkflowFn] = {}

    def workflow(self, name: str) -> Callable[[F], F]:
        """Decorator registering an ``async def f(ctx, input)`` as workflow type ``name``."""

        def register(fn: F) -> F:
            if not inspect.iscoroutinefunction(fn):
                raise ConfigurationError(
                    f"workflow {name!r} must be an 'async def' function, got {fn!r}"
                )
            existing = self._functions.get(name)
            if existing is not None and existing is not fn:
                raise ConfigurationError(f"workflow type {name!r} is registered twice")
            self._functions[name] = fn
            return fn

        return register

    def get(self, name: str) -> WorkflowFn | None:
        """The function for ``name``, or None."""
        return self._functions.get(name)

    def names(self) -> Iterable[str]:
        """Registered workflow type names."""
        return tuple(self._functions)


default_registry = WorkflowRegistry()


def workflow(name: str) -> Callable[[F], F]:
    """Register an async function as workflow type ``name`` in the default registry.

    Example::

        @workflow("order.process")
        async def process_order(ctx: WorkflowContext, order: dict) -> dict:
            reservation = await ctx.activity("inventory.reserve", order["items"])
            ...
    """
    return default_registry.workflow(name)
