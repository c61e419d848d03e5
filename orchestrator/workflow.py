"""What users program against: the ``@workflow`` decorator, the registry and the context.

A workflow is a plain ``async def f(ctx, input)``. It must be deterministic: all I/O goes
through ``ctx.activity`` (run by a participant, recorded in history), and it awaits only
what ``ctx`` hands out. The engine replays the function from its history whenever the
workflow advances, so the same history must always lead to the same calls.

An ``Exception`` out of the function fails the workflow (``COMPENSATED`` or
``COMPENSATION_FAILED`` when compensations ran). What shows the code itself is wrong parks
it ``STUCK`` until a deploy fixes it and it is resumed: a different step than history
holds, a BaseException that is not an Exception, asyncio or any other foreign awaitable,
ctx calls with invalid arguments. Arguments are checked where they are given, and the
engine hears of a bad one before the code does, so catching the error hides nothing.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar, cast

from orchestrator.errors import ConfigurationError
from orchestrator.protocol.failures import MAX_NAME_CHARS, safe_text
from orchestrator.protocol.topics import activity_name_problem

WorkflowFn = Callable[["WorkflowContext", Any], Coroutine[Any, Any, Any]]
F = TypeVar("F", bound=WorkflowFn)

# Attempts travel as an Avro int.
MAX_ATTEMPTS: Final = 2**31 - 1


@dataclass(frozen=True, slots=True, init=False)
class RetryPolicy:
    """How often the orchestrator re-sends an activity whose attempt failed.

    Only failures the participant marks retryable are retried, and never those whose
    error type is listed in ``non_retryable_error_types``. Each attempt gets its own
    activity id. Backoff between attempts arrives with durable timers.

    Args:
        max_attempts: attempts in all, 1 to 2**31 - 1 (1 means no retry).
        non_retryable_error_types: error types (a participant's ``ActivityFailure``
            class names) never retried: any iterable of str except a str itself.

    Raises:
        ConfigurationError: an argument of the wrong type or out of range, e.g.
            ``non_retryable_error_types="PaymentDeclined"`` (write ``("PaymentDeclined",)``).

    Example::

        await ctx.activity("payment.charge", total, retry=RetryPolicy(max_attempts=5))
    """

    max_attempts: int
    non_retryable_error_types: tuple[str, ...]

    def __init__(
        self, max_attempts: int = 3, non_retryable_error_types: Iterable[str] = ()
    ) -> None:
        object.__setattr__(self, "max_attempts", _checked_attempts(max_attempts))
        object.__setattr__(
            self, "non_retryable_error_types", _checked_error_types(non_retryable_error_types)
        )


def _checked_attempts(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigurationError(
            f"RetryPolicy.max_attempts must be an int, got {_type_name(value)}"
        )
    # A copy as a plain int: an int subclass must not reach the record.
    attempts = int.__index__(value)
    if not 1 <= attempts <= MAX_ATTEMPTS:
        raise ConfigurationError(
            f"RetryPolicy.max_attempts must be between 1 and {MAX_ATTEMPTS}, got {attempts}"
        )
    return attempts


def _checked_error_types(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ConfigurationError(
            "RetryPolicy.non_retryable_error_types must be a sequence of error types, got "
            f"the str {_shown(value)}; write ({_shown(value)},)"
        )
    try:
        items: tuple[object, ...] = tuple(cast(Iterable[object], value))
    except Exception as exc:
        raise ConfigurationError(
            "RetryPolicy.non_retryable_error_types must be an iterable of str, got "
            f"{_type_name(value)}"
        ) from exc
    checked: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError(
                f"RetryPolicy.non_retryable_error_types must hold only str, got {_type_name(item)}"
            )
        # Participants report error types through safe_text(name, MAX_NAME_CHARS): any other
        # text could never match, and could not be written to the record.
        if not item or safe_text(item, MAX_NAME_CHARS) != item:
            raise ConfigurationError(
                f"non-retryable error type {_shown(item)} must be "
                f"1-{MAX_NAME_CHARS} characters of UTF-8 text without NUL"
            )
        checked.append(str.__str__(item))
    return tuple(checked)


def _type_name(value: object) -> str:
    try:
        return safe_text(type(value).__qualname__, MAX_NAME_CHARS)
    except BaseException:  # a metaclass can do anything
        return "<unnamed type>"


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

    def misuse(self, message: str) -> None:
        """Note that the code called the API wrongly; the engine parks the workflow."""
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
            name: participant and activity, e.g. ``"payment.charge"``; the participant
                part becomes part of a topic name (letters, digits, '_' and '-').
            value: the single argument the participant's handler receives.
            retry: attempts and non-retryable error types; default 3 attempts.
            compensation: mark this step as undoing an earlier one, so a workflow that
                then fails ends ``COMPENSATED`` rather than ``FAILED``.

        Returns:
            A handle; ``await`` it for the handler's return value. It raises
            :class:`~orchestrator.errors.ActivityError` when the activity fails for good:
            ``RecordTooLargeError`` or ``HistoryLimitExceededError`` when the step (or its
            result) does not fit the workflow's limits, with ``effects_committed`` True
            when the step ran and its writes committed (compensate it).

        Raises:
            ConfigurationError: an invalid name, ``retry`` or ``compensation``. The code is
                wrong, so the workflow is parked as ``STUCK`` even if the code catches this.
        """
        problem = _name_problem(name)
        if problem is not None:
            raise self._misuse(f"ctx.activity({_shown(name)}): {problem}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise self._misuse(
                f"ctx.activity({_shown(name)}, retry=...) takes a RetryPolicy or None, got "
                f"{_type_name(retry)}"
            )
        if type(compensation) is not bool:
            raise self._misuse(
                f"ctx.activity({_shown(name)}, compensation=...) takes a bool, got "
                f"{_type_name(compensation)}"
            )
        # A plain str copy: a str subclass must not reach the record or the comparisons.
        plain = str.__str__(name)
        return self._scheduler.schedule(plain, value, retry or DEFAULT_RETRY, compensation)

    def gather(self, *handles: ActivityHandle) -> Awaitable[list[Any]]:
        """Await several scheduled activities; results in argument order.

        Waits for all of them; if any failed, raises the first failure (argument order)
        once the rest have finished.

        Raises:
            ConfigurationError: an argument is not a handle from ``ctx.activity`` (the
                workflow is parked as ``STUCK``).
        """
        for handle in handles:
            if type(handle) is not ActivityHandle:
                raise self._misuse(
                    f"ctx.gather takes handles returned by ctx.activity, got {_type_name(handle)}"
                )
        return _Gather(tuple(handles))

    def now(self) -> float:
        """Deterministic time (seconds since the epoch) of the input being replayed."""
        return self._scheduler.now_ms() / 1000.0

    def _misuse(self, message: str) -> ConfigurationError:
        """Tell the engine first, so code that catches the error cannot hide the bug."""
        self._scheduler.misuse(message)
        return ConfigurationError(message)


def _name_problem(name: object) -> str | None:
    # Every replay checks every name again; a deploy has few distinct names.
    if type(name) is str:
        return _str_name_problem(name)
    return activity_name_problem(name)


@functools.lru_cache(maxsize=4_096)
def _str_name_problem(name: str) -> str | None:
    return activity_name_problem(name)


def _shown(name: object) -> str:
    if isinstance(name, str):
        # str's own repr escapes lone surrogates and NUL; a subclass's repr could do anything.
        return safe_text(str.__repr__(name), MAX_NAME_CHARS)
    return f"<{_type_name(name)}>"


class WorkflowRegistry:
    """Maps workflow type names to functions; an orchestrator runs one registry."""

    def __init__(self) -> None:
        self._functions: dict[str, WorkflowFn] = {}

    def workflow(self, name: str) -> Callable[[F], F]:
        """Decorator registering an ``async def f(ctx, input)`` as workflow type ``name``.

        Raises:
            ConfigurationError: ``name`` is not a non-empty str of at most 200 characters
                of UTF-8 text without NUL, or the decorated function is not an
                ``async def`` taking ``(ctx, input)``, or the name is taken.
        """
        if not isinstance(name, str):
            raise ConfigurationError(
                f"a workflow type name must be a str, got {_type_name(name)}; "
                "write @registry.workflow('order.process')"
            )
        if not name or safe_text(name, MAX_NAME_CHARS) != name:
            raise ConfigurationError(
                f"workflow type name {_shown(name)} must be 1-{MAX_NAME_CHARS} characters "
                "of UTF-8 text without NUL"
            )
        type_name = str.__str__(name)

        def register(fn: F) -> F:
            if not inspect.iscoroutinefunction(fn):
                raise ConfigurationError(
                    f"workflow {type_name!r} must be an 'async def' function, got {_type_name(fn)}"
                )
            _check_signature(type_name, fn)
            existing = self._functions.get(type_name)
            if existing is not None and existing is not fn:
                raise ConfigurationError(f"workflow type {type_name!r} is registered twice")
            self._functions[type_name] = fn
            return fn

        return register

    def get(self, name: str) -> WorkflowFn | None:
        """The function for ``name``, or None."""
        return self._functions.get(name)

    def names(self) -> Iterable[str]:
        """Registered workflow type names."""
        return tuple(self._functions)


def _check_signature(name: str, fn: WorkflowFn) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some callables have no signature to read
        return
    try:
        signature.bind(None, None)
    except TypeError as exc:
        raise ConfigurationError(
            f"workflow {name!r} must take two positional arguments (ctx, input): {exc}"
        ) from exc


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
