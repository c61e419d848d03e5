"""What users program against: the ``@workflow`` decorator, the registry and the context.

A workflow is a plain ``async def f(ctx, input)``. It must be deterministic: all I/O goes
through ``ctx.activity`` (run by a participant, recorded in history), all waiting through
``ctx.sleep`` / ``ctx.sleep_until`` (durable timers, recorded too), and it awaits only what
``ctx`` hands out: handles, ``ctx.gather``, ``ctx.first`` and their ``with_timeout``. The
engine replays the function from its history whenever the workflow advances, so the same
history must always lead to the same calls. Time in a workflow is ``ctx.now()``, the time
of the input being replayed, never the machine's clock.

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
import itertools
import math
import re
import uuid
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from random import Random
from typing import TYPE_CHECKING, Any, Final, Generic, NoReturn, Protocol, TypeVar, cast, overload

from orchestrator.convert import DEFAULT_CONVERTER, DataConverter
from orchestrator.errors import ConfigurationError, ContinueAsNewError, WorkflowTimeoutError
from orchestrator.protocol.celery import CELERY_PARTICIPANT, DEFAULT_QUEUE
from orchestrator.protocol.failures import MAX_NAME_CHARS, safe_text
from orchestrator.protocol.records import ParentClosePolicy
from orchestrator.protocol.topics import LOCAL_PARTICIPANT, activity_name_problem

if TYPE_CHECKING:
    from orchestrator.replay.driver import ReplayCache
    from participants.participant import ActivityHandler, Participant

WorkflowFn = Callable[["WorkflowContext", Any], Coroutine[Any, Any, Any]]
F = TypeVar("F", bound=WorkflowFn)
T = TypeVar("T")
H = TypeVar("H", bound="CommandHandle")
A = TypeVar("A", bound="ActivityHandler")

# A Celery queue is a Kafka topic (kombu's confluentkafka transport).
_QUEUE: Final = re.compile(r"[A-Za-z0-9._-]{1,200}")
# Attempts travel as an Avro int.
MAX_ATTEMPTS: Final = 2**31 - 1
# The longest interval, timeout or sleep: 100 years keeps every time in the record a long.
MAX_DURATION_S: Final = 100 * 365 * 24 * 3600
# The latest instant ctx.sleep_until takes: 9999-12-31T23:59:59Z.
MAX_EPOCH_S: Final = 253_402_300_799
# Temporal's default: the maximum interval is 100 times the initial one.
DEFAULT_MAXIMUM_FACTOR: Final = 100
_DEFAULT_MAXIMUM_S: Final = min(1.0 * DEFAULT_MAXIMUM_FACTOR, float(MAX_DURATION_S))


@dataclass(frozen=True, slots=True, init=False)
class RetryPolicy:
    """How often, and how patiently, the orchestrator re-sends an activity whose attempt failed.

    Only failures the participant marks retryable are retried (timeouts too), and never
    those whose error type is listed in ``non_retryable_error_types``. Each attempt gets
    its own activity id. Between attempts the workflow waits on a durable timer: the
    interval before attempt ``n + 1`` is ``min(initial_interval * backoff_coefficient **
    (n - 1), maximum_interval)``, unless the participant's failure asks for a longer wait
    (``retry_after_ms``), which replaces it. An interval of 0 retries at once.

    Args:
        max_attempts: attempts in all, 1 to 2**31 - 1 (1 means no retry).
        non_retryable_error_types: error types (a participant's ``ActivityFailure``
            class names) never retried: any iterable of str except a str itself.
        initial_interval: seconds (int, float or timedelta) before the second attempt,
            0 to 100 years.
        backoff_coefficient: how much each interval grows, a finite number >= 1.
        maximum_interval: the longest interval (seconds or timedelta), at least
            ``initial_interval``; None means 100 times ``initial_interval``.

    Raises:
        ConfigurationError: an argument of the wrong type or out of range, e.g.
            ``non_retryable_error_types="PaymentDeclined"`` (write ``("PaymentDeclined",)``).

    Example::

        await ctx.activity("payment.charge", total, retry=RetryPolicy(max_attempts=5))
    """

    max_attempts: int
    non_retryable_error_types: tuple[str, ...]
    initial_interval: float
    backoff_coefficient: float
    maximum_interval: float

    def __init__(
        self,
        max_attempts: int = 3,
        non_retryable_error_types: Iterable[str] = (),
        initial_interval: float | timedelta = 1.0,
        backoff_coefficient: float = 2.0,
        maximum_interval: float | timedelta | None = None,
    ) -> None:
        object.__setattr__(self, "max_attempts", _checked_attempts(max_attempts))
        object.__setattr__(
            self, "non_retryable_error_types", _checked_error_types(non_retryable_error_types)
        )
        if (
            type(initial_interval) is float
            and initial_interval == 1.0
            and type(backoff_coefficient) is float
            and backoff_coefficient == 2.0
            and maximum_interval is None
        ):
            # The defaults, checked once: workflow code builds its policies on every replay.
            object.__setattr__(self, "initial_interval", 1.0)
            object.__setattr__(self, "backoff_coefficient", 2.0)
            object.__setattr__(self, "maximum_interval", _DEFAULT_MAXIMUM_S)
            return
        initial = _checked_seconds(initial_interval, "RetryPolicy.initial_interval")
        object.__setattr__(self, "initial_interval", initial)
        object.__setattr__(self, "backoff_coefficient", _checked_coefficient(backoff_coefficient))
        if maximum_interval is None:
            maximum = min(initial * DEFAULT_MAXIMUM_FACTOR, float(MAX_DURATION_S))
        else:
            maximum = _checked_seconds(maximum_interval, "RetryPolicy.maximum_interval")
            if maximum < initial:
                raise ConfigurationError(
                    f"RetryPolicy.maximum_interval ({maximum:g} s) must be at least "
                    f"initial_interval ({initial:g} s)"
                )
        object.__setattr__(self, "maximum_interval", maximum)

    def interval(self, failed_attempts: int) -> float:
        """Seconds the policy waits before the next attempt after ``failed_attempts`` (>= 1)."""
        return (
            backoff_ms(
                _ms(self.initial_interval),
                self.backoff_coefficient,
                _ms(self.maximum_interval),
                failed_attempts,
            )
            / 1000.0
        )


def backoff_ms(initial_ms: int, coefficient: float, maximum_ms: int, failed_attempts: int) -> int:
    """Milliseconds to wait before attempt ``failed_attempts + 1``:
    ``min(initial * coefficient ** (failed_attempts - 1), maximum)``, for any count (no
    float overflow) and any recorded values (a v2 record's zeros mean "at once")."""
    if initial_ms <= 0 or maximum_ms <= 0:
        return 0
    exponent = max(failed_attempts - 1, 0)
    if exponent == 0 or not coefficient > 1.0:  # NaN from a damaged record too
        return min(initial_ms, maximum_ms)
    if exponent * math.log(coefficient) >= math.log(maximum_ms / initial_ms):
        return maximum_ms
    return min(round(initial_ms * coefficient**exponent), maximum_ms)


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
    if type(value) is tuple and all(
        type(i) is str and len(i) <= MAX_NAME_CHARS and _plain_error_type(i) for i in value
    ):
        return value  # what workflow code writes on every replay, checked once per name
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


@functools.lru_cache(maxsize=4_096)
def _plain_error_type(item: str) -> bool:
    return bool(item) and safe_text(item, MAX_NAME_CHARS) == item


def _checked_number(value: object, what: str) -> float:
    """``value`` as a plain finite float, for an int or float argument (not a bool)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigurationError(f"{what} must be an int or float, got {_type_name(value)}")
    try:
        # The base class's conversion: a subclass's __float__ could do anything.
        number = float.__float__(value) if isinstance(value, float) else int.__float__(value)
    except OverflowError as exc:  # an int too large for a float
        raise ConfigurationError(
            f"{what} must be a finite number, got {_type_name(value)}"
        ) from exc
    if not math.isfinite(number):
        raise ConfigurationError(f"{what} must be a finite number, got {number!r}")
    return number


def _checked_seconds(value: object, what: str) -> float:
    """A duration in seconds, 0 to 100 years, from seconds (int or float) or a timedelta."""
    if isinstance(value, timedelta):
        seconds = timedelta.total_seconds(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = _checked_number(value, what)
    else:
        raise ConfigurationError(
            f"{what} must be seconds (an int or float) or a timedelta, got {_type_name(value)}"
        )
    if not 0 <= seconds <= MAX_DURATION_S:
        raise ConfigurationError(
            f"{what} must be between 0 and {MAX_DURATION_S} seconds (100 years), got {seconds:g}"
        )
    return seconds


def _checked_coefficient(value: object) -> float:
    coefficient = _checked_number(value, "RetryPolicy.backoff_coefficient")
    if coefficient < 1.0:
        raise ConfigurationError(
            f"RetryPolicy.backoff_coefficient must be at least 1.0, got {coefficient:g}"
        )
    return coefficient


MIN_HEARTBEAT_TIMEOUT_MS: Final = 1_000


def _activity_timeouts(
    name: str, schedule_to_close: object, start_to_close: object, heartbeat_timeout: object
) -> ActivityTimeouts:
    """The checked timeouts of one ``ctx.activity`` call.

    Every replay makes the same calls again, so results are cached, keyed with the
    values' types too (``True == 1``, and a bool is refused where an int is not).
    """
    values = (schedule_to_close, start_to_close, heartbeat_timeout)
    try:
        return _cached_timeouts(name, tuple(type(v) for v in values), values)
    except TypeError:  # an unhashable value: check it without the cache
        return _timeouts_of(name, values)


@functools.lru_cache(maxsize=1_024)
def _cached_timeouts(
    name: str, _types: tuple[type, ...], values: tuple[object, object, object]
) -> ActivityTimeouts:
    return _timeouts_of(name, values)


def _timeouts_of(name: str, values: tuple[object, object, object]) -> ActivityTimeouts:
    schedule_to_close, start_to_close, heartbeat_timeout = values
    shown = _shown(name)
    heartbeat_ms = _checked_timeout(
        heartbeat_timeout, f"ctx.activity({shown}, heartbeat_timeout=...)"
    )
    if heartbeat_ms is not None and heartbeat_ms < MIN_HEARTBEAT_TIMEOUT_MS:
        # Participants heartbeat at most every third of it; below a second the messages
        # would cost more than the step, and clock jitter would time attempts out.
        raise ConfigurationError(
            f"ctx.activity({shown}, heartbeat_timeout=...) must be at least 1 second, "
            f"got {heartbeat_ms / 1000:g}"
        )
    return ActivityTimeouts(
        _checked_timeout(schedule_to_close, f"ctx.activity({shown}, schedule_to_close=...)"),
        _checked_timeout(start_to_close, f"ctx.activity({shown}, start_to_close=...)"),
        heartbeat_ms,
    )


def _checked_timeout(value: object, what: str) -> int | None:
    """Milliseconds of an optional timeout: None, or more than 0 and at most 100 years."""
    if value is None:
        return None
    milliseconds = _ms(_checked_seconds(value, what))
    if milliseconds < 1:
        raise ConfigurationError(f"{what} must be at least 0.001 seconds, got {value!r}")
    return milliseconds


def _epoch_of(moment: datetime, what: str) -> float:
    try:
        aware = moment.utcoffset() is not None
        epoch = datetime.timestamp(moment) if aware else None
    except Exception as exc:  # a tzinfo is user code
        raise ConfigurationError(f"{what}: the datetime has no usable time zone") from exc
    if epoch is None:
        raise ConfigurationError(
            f"{what} takes a timezone-aware datetime, got a naive one; "
            "write datetime(..., tzinfo=timezone.utc)"
        )
    return epoch


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _type_name(value: object) -> str:
    try:
        return safe_text(type(value).__qualname__, MAX_NAME_CHARS)
    except BaseException:  # a metaclass can do anything
        return "<unnamed type>"


DEFAULT_RETRY = RetryPolicy()
"""3 attempts, 1 s before the second, 2 s before the third (at most 100 s)."""
CHILD_RETRY = RetryPolicy(max_attempts=1)
"""A child workflow is one attempt: it runs its own retries."""


@dataclass(frozen=True, slots=True)
class ActivityTimeouts:
    """An activity's timeouts in milliseconds; None: no such timeout."""

    schedule_to_close_ms: int | None = None
    start_to_close_ms: int | None = None
    heartbeat_timeout_ms: int | None = None


NO_TIMEOUTS: Final = ActivityTimeouts()


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What makes a step a child workflow: its id (None: ``<parent id>/<run id>/c<step>``)
    and what happens to it when the parent closes."""

    workflow_id: str | None
    parent_close_policy: ParentClosePolicy


# Settling order of every handle, so races replay the way they first ran (only the order
# of the handles of one replay is ever compared).
_SETTLED: Final = itertools.count()


class Waitable(Generic[T]):
    """Something workflow code may ``await``: a handle from ``ctx``, ``ctx.gather``,
    ``ctx.first`` or ``with_timeout``. Nothing else may be awaited in a workflow."""

    __slots__ = ("_scheduler",)

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def _settled_order(self) -> int | None:
        """When this settled (comparable within one replay), or None while it waits."""
        raise NotImplementedError

    def _blocker(self) -> CommandHandle:
        """A handle that has not settled, yielded to the engine while waiting."""
        raise NotImplementedError

    def _outcome(self) -> T:
        """The value (or raise the error) once settled."""
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    def _release(self) -> None:
        """This lost a race (``ctx.first``, a timeout): give back what it holds unseen."""

    def _arm(self) -> None:
        """This is awaited (again): a signal wait that lost a race earlier waits anew."""

    def __await__(self) -> Generator[CommandHandle, None, T]:
        self._arm()
        while self._settled_order() is None:
            yield self._blocker()
        return self._outcome()

    def with_timeout(self, seconds: float | timedelta) -> Timeout[T]:
        """Await this, but for at most ``seconds`` (int, float or timedelta).

        A durable timer starts now (it takes the next step number); awaiting the result
        returns this awaitable's outcome if it settles first, else raises
        :class:`~orchestrator.errors.WorkflowTimeoutError`. If it settles first, the timer
        is cancelled and never wakes the workflow. A timed-out activity is *not*
        cancelled: it may still run and commit; await its handle again to see its outcome.

        Raises:
            ConfigurationError: ``seconds`` is not 0 to 100 years (the workflow is parked
                as ``STUCK``).
        """
        try:
            delay = _checked_seconds(seconds, f"{self._describe()}.with_timeout(seconds)")
        except ConfigurationError as exc:
            self._scheduler.misuse(str(exc))
            raise
        timer = self._scheduler.timer(self._scheduler.now_ms() + _ms(delay))
        return Timeout(self._scheduler, self, timer, delay)


class CommandHandle(Waitable[Any]):
    """One recorded command (an activity or a timer); ``await`` it for its outcome."""

    __slots__ = ("_done", "_error", "_order", "_value", "seq")

    def __init__(self, scheduler: Scheduler, seq: int) -> None:
        # No super().__init__: every step of every replay makes a handle.
        self._scheduler = scheduler
        self.seq = seq
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._order: int | None = None

    def __await__(self) -> Generator[CommandHandle, None, Any]:
        # Waitable.__await__ without its method calls: the path every await takes.
        while self._order is None:
            yield self
        if self._error is not None:
            raise self._error
        return self._value

    @property
    def done(self) -> bool:
        """True once the final outcome is known."""
        return self._done

    def resolve(self, value: Any) -> None:
        """Engine use: the command completed with ``value``."""
        self._done, self._value, self._order = True, value, next(_SETTLED)

    def reject(self, error: BaseException) -> None:
        """Engine use: the command failed for good with ``error``."""
        self._done, self._error, self._order = True, error, next(_SETTLED)

    def _settled_order(self) -> int | None:
        return self._order

    def _blocker(self) -> CommandHandle:
        return self

    def _outcome(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class ActivityHandle(CommandHandle):
    """An activity that has been scheduled; ``await`` it for its result.

    Scheduling happens when ``ctx.activity`` is called, not when the handle is awaited,
    so several handles can be created first and awaited together with ``ctx.gather``.
    """

    __slots__ = ("name", "result_type")

    def __init__(self, scheduler: Scheduler, seq: int, name: str) -> None:
        super().__init__(scheduler, seq)
        self.name = name
        # What the result converts to (ctx.activity's result_type); Any: plain JSON.
        self.result_type: Any = Any

    def _describe(self) -> str:
        return f"activity {self.name!r} (step {self.seq})"


class TimerHandle(CommandHandle):
    """A durable timer from ``ctx.sleep`` or ``ctx.sleep_until``; ``await`` it (None).

    The timer starts when it is created, not when it is awaited, so it can be raced
    (``ctx.first``) or gathered with activities.
    """

    __slots__ = ("fire_at_ms",)

    def __init__(self, scheduler: Scheduler, seq: int, fire_at_ms: int) -> None:
        super().__init__(scheduler, seq)
        self.fire_at_ms = fire_at_ms

    def _describe(self) -> str:
        return f"timer (step {self.seq})"


class PromiseHandle(CommandHandle):
    """A promise from ``ctx.promise``: something outside the workflow completes or fails it
    by :attr:`id` (``WorkflowClient.complete_promise``, ``sagaline promise``, or a
    ``CompletePromise`` record from any Kafka producer); ``await`` it for the value.

    Awaiting a failed promise raises :class:`~orchestrator.errors.PromiseFailedError`.
    """

    __slots__ = ("id", "name", "value_type")

    def __init__(self, scheduler: Scheduler, seq: int, name: str, promise_id: str) -> None:
        super().__init__(scheduler, seq)
        self.name = name
        self.id = promise_id
        # What the completion's value converts to (ctx.promise's value_type).
        self.value_type: Any = Any

    def _describe(self) -> str:
        return f"promise {self.name!r} (step {self.seq})"


class SignalHandle(CommandHandle):
    """A wait from ``ctx.wait_signal``: ``await`` it for the next signal of its name.

    Waits get a name's signals in the order the waits were made: one made when a signal
    is already there takes the oldest untaken one at once, others take the next ones as
    they arrive. A wait that loses a race (``ctx.first``, a ``with_timeout`` that fires
    first, a ``ctx.gather`` that raises) gives its signal back, unseen, to the next wait
    that takes one (so a later wait may already hold a newer signal); awaiting it again,
    alone or in a race, makes it a new wait.
    """

    __slots__ = ("_consumed", "_registered", "name", "value_type")

    def __init__(self, scheduler: Scheduler, name: str, value_type: Any = Any) -> None:
        super().__init__(scheduler, -1)  # not a command: signals are inputs, not steps
        self.name = name
        self.value_type = value_type
        self._consumed = False
        self._registered = True
        scheduler.wait_signal(self)

    def __await__(self) -> Generator[CommandHandle, None, Any]:
        self._arm()
        while self._order is None:
            yield self
        return self._outcome()

    def _arm(self) -> None:
        if not self._registered and self._order is None:  # given up earlier: wait anew
            self._registered = True
            self._scheduler.wait_signal(self)

    def settle(self, value: Any, error: BaseException | None, order: int) -> None:
        """Engine use: the wait takes a signal that arrived ``order``-th."""
        self._done, self._value, self._error, self._order = True, value, error, order

    def unsettle(self) -> None:
        """Engine use: the wait gave its signal back and waits for nothing now."""
        self._done, self._value, self._error, self._order = False, None, None, None
        self._registered = False

    def _outcome(self) -> Any:
        self._consumed = True
        value = super()._outcome()
        if self.value_type is Any:
            return value
        return self._scheduler.convert(value, self.value_type)

    def _release(self) -> None:
        if not self._consumed and self._registered:
            self._scheduler.give_back(self)

    def _describe(self) -> str:
        return f"signal {self.name!r}"


class SignalBox:
    """The signals a replay received and no wait took yet, and the waits that have none
    yet, per name; both oldest first. Pure bookkeeping for the engine's scheduler."""

    def __init__(self) -> None:
        # name -> [(order, value, error)] by arrival; name -> waits by creation.
        self._queued: dict[str, list[tuple[int, Any, BaseException | None]]] = {}
        self._waiting: dict[str, list[SignalHandle]] = {}

    def arrive(self, name: str, value: Any, error: BaseException | None) -> int:
        """A signal arrives now (in history order); returns the order it got."""
        order = next(_SETTLED)
        self._queued.setdefault(name, []).append((order, value, error))
        self._match(name)
        return order

    def untaken(self) -> list[int]:
        """The orders of the signals no wait took, oldest first."""
        return sorted(entry[0] for queued in self._queued.values() for entry in queued)

    def wait(self, handle: SignalHandle) -> None:
        """A new wait (or one awaited again)."""
        self._waiting.setdefault(handle.name, []).append(handle)
        self._match(handle.name)

    def give_back(self, handle: SignalHandle) -> None:
        """``handle`` lost a race: its signal, if it took one, goes to the next wait."""
        waiting = self._waiting.get(handle.name, [])
        if handle in waiting:
            waiting.remove(handle)
        if handle._order is not None:
            entry = (handle._order, handle._value, handle._error)
            queued = self._queued.setdefault(handle.name, [])
            queued.append(entry)
            queued.sort(key=lambda item: item[0])
        handle.unsettle()
        self._match(handle.name)

    def drop_waits(self) -> None:
        """The code was interrupted (a cancel): waits it makes again, or awaits again,
        take the signals; the ones it abandoned take none."""
        for waiting in self._waiting.values():
            for handle in waiting:
                handle.unsettle()
            waiting.clear()

    def _match(self, name: str) -> None:
        queued, waiting = self._queued.get(name), self._waiting.get(name)
        while queued and waiting:
            order, value, error = queued.pop(0)
            waiting.pop(0).settle(value, error, order)


class _Group(Waitable[T]):
    """A wait over several handles (``gather``, ``first``)."""

    __slots__ = ("_handles",)

    def __init__(self, scheduler: Scheduler, handles: tuple[CommandHandle, ...]) -> None:
        super().__init__(scheduler)
        self._handles = handles

    def _release_others(self, kept: CommandHandle | None) -> None:
        """Every handle but ``kept`` lost: a signal nobody will see goes to the next wait."""
        for handle in self._handles:
            if handle is not kept:
                handle._release()

    def _release(self) -> None:
        self._release_others(None)

    def _arm(self) -> None:
        for handle in self._handles:
            handle._arm()


class Gather(_Group[list[Any]]):
    """``ctx.gather``: every handle's outcome, in argument order."""

    __slots__ = ()

    def _settled_order(self) -> int | None:
        orders = [h._settled_order() for h in self._handles]
        if any(order is None for order in orders):
            return None
        return max((order for order in orders if order is not None), default=-1)

    def _blocker(self) -> CommandHandle:
        return next(h for h in self._handles if h._settled_order() is None)

    def _outcome(self) -> list[Any]:
        # Every branch has settled before this raises, so a compensation sees which finished.
        failing = next((h for h in self._handles if h._error is not None), None)
        if failing is not None:
            self._release_others(failing)
            failing._outcome()  # raises
        return [handle._outcome() for handle in self._handles]

    def _describe(self) -> str:
        return f"ctx.gather of {len(self._handles)}"


class First(_Group[H]):
    """``ctx.first``: the handle that settled first, in history order."""

    __slots__ = ()

    def __init__(self, scheduler: Scheduler, handles: tuple[H, ...]) -> None:
        super().__init__(scheduler, handles)

    def _settled_order(self) -> int | None:
        orders = [o for o in (h._settled_order() for h in self._handles) if o is not None]
        return min(orders, default=None)

    def _blocker(self) -> CommandHandle:
        return self._handles[0]

    def _outcome(self) -> H:
        winner = min(
            (h for h in self._handles if h._settled_order() is not None),
            key=lambda h: cast(int, h._settled_order()),
        )
        self._release_others(winner)  # a losing signal wait gives its signal back
        return cast(H, winner)

    def _describe(self) -> str:
        return f"ctx.first of {len(self._handles)}"


class Timeout(Waitable[T]):
    """``awaitable.with_timeout(seconds)``: its outcome, or WorkflowTimeoutError."""

    __slots__ = ("_inner", "_seconds", "_timer")

    def __init__(
        self, scheduler: Scheduler, inner: Waitable[T], timer: TimerHandle, seconds: float
    ) -> None:
        super().__init__(scheduler)
        self._inner = inner
        self._timer = timer
        self._seconds = seconds

    def _settled_order(self) -> int | None:
        orders = [
            o for o in (self._inner._settled_order(), self._timer._settled_order()) if o is not None
        ]
        return min(orders, default=None)

    def _blocker(self) -> CommandHandle:
        return self._inner._blocker()

    def _outcome(self) -> T:
        inner, timer = self._inner._settled_order(), self._timer._settled_order()
        if inner is not None and (timer is None or inner < timer):
            self._scheduler.cancel(self._timer)
            return self._inner._outcome()
        self._inner._release()  # a signal wait that timed out takes nothing
        raise WorkflowTimeoutError(self._inner._describe(), self._seconds)

    def _release(self) -> None:
        self._inner._release()

    def _arm(self) -> None:
        self._inner._arm()

    def _describe(self) -> str:
        return self._inner._describe()


class Scheduler(Protocol):
    """The engine side of a context: turns calls into recorded commands."""

    def schedule(
        self,
        name: str,
        value: Any,
        retry: RetryPolicy,
        compensation: bool,
        timeouts: ActivityTimeouts,
        child: ChildSpec | None = None,
    ) -> ActivityHandle:
        """Record (or match, on replay) one activity call, or with ``child`` one child
        workflow of type ``name``, and return its handle."""
        ...

    def timer(self, fire_at_ms: int) -> TimerHandle:
        """Record (or match, on replay) one durable timer and return its handle."""
        ...

    def cancel(self, timer: TimerHandle) -> None:
        """The code no longer waits for ``timer``: it must never fire (no-op once fired)."""
        ...

    def now_ms(self) -> int:
        """The workflow's deterministic clock."""
        ...

    def promise(self, name: str) -> PromiseHandle:
        """Record (or match, on replay) one promise and return its handle."""
        ...

    def wait_signal(self, handle: SignalHandle) -> None:
        """A new signal wait: it takes the oldest untaken signal of its name, now or when
        one arrives."""
        ...

    def give_back(self, handle: SignalHandle) -> None:
        """``handle`` lost a race: its signal, if any, goes to the next wait."""
        ...

    def misuse(self, message: str) -> None:
        """Note that the code called the API wrongly; the engine parks the workflow."""
        ...

    def handle(self, kind: str, name: str, handler: Handler, validator: Handler | None) -> None:
        """Register the ``kind`` (``query`` or ``update``) handler ``name``; a later
        registration of the same name replaces it."""
        ...

    def patched(self, patch_id: str, deprecated: bool) -> bool:
        """Whether patch ``patch_id`` is on for this run (see ``WorkflowContext.patched``);
        records it when the code asks past all recorded history."""
        ...

    def continue_as_new(self, value: Any) -> None:
        """Note that the run ends by starting the next one with input ``value``; raises
        what encoding ``value`` raises."""
        ...

    def history_length(self) -> int:
        """How far the code has got: commands made plus outcomes delivered."""
        ...

    def convert(self, value: Any, hint: Any) -> Any:
        """Plain JSON ``value`` as type ``hint`` by the registry's converter; raises
        ``PayloadEncodingError`` when it does not fit."""
        ...


Handler = Callable[..., Any]
"""A query handler, update handler or update validator: a plain function called with the
request's argument (or with none when the argument is None)."""


class WorkflowContext:
    """The handle a workflow function receives as its first argument."""

    __slots__ = ("_rng", "_scheduler", "_seed", "workflow_id", "workflow_type")

    def __init__(
        self, workflow_id: str, workflow_type: str, scheduler: Scheduler, *, run_id: str = ""
    ) -> None:
        self.workflow_id = workflow_id
        self.workflow_type = workflow_type
        self._scheduler = scheduler
        # The run's own seed: the same numbers on every replay of this run, others for
        # another run under the same workflow id.
        self._seed = f"{workflow_id}\x00{run_id}"
        self._rng: Random | None = None

    def activity(
        self,
        name: str,
        value: Any = None,
        *,
        retry: RetryPolicy | None = None,
        compensation: bool = False,
        schedule_to_close: float | timedelta | None = None,
        start_to_close: float | timedelta | None = None,
        heartbeat_timeout: float | timedelta | None = None,
        result_type: Any = Any,
    ) -> ActivityHandle:
        """Schedule activity ``name`` ('<participant>.<activity>') with a value.

        Args:
            name: participant and activity, e.g. ``"payment.charge"``; the participant
                part becomes part of a topic name (letters, digits, '_' and '-').
            value: the single argument the participant's handler receives: JSON, or a
                dataclass or pydantic model (the registry's converter writes it).
            retry: attempts, backoff and non-retryable error types; default
                ``DEFAULT_RETRY`` (3 attempts, 1 s then 2 s apart).
            compensation: mark this step as undoing an earlier one, so a workflow that
                then fails ends ``COMPENSATED`` rather than ``FAILED``.
            schedule_to_close: seconds (or timedelta) for the whole step, every attempt
                and every wait between them; when it passes the step fails for good
                (``ScheduleToCloseTimeout``), and no retry is started that could not
                begin before it.
            start_to_close: seconds one attempt may run from the participant's start
                report; then the attempt fails (``StartToCloseTimeout``, retryable).
            heartbeat_timeout: seconds a started attempt may go without a heartbeat;
                then it fails (``HeartbeatTimeout``, retryable). The last heartbeat's
                details are handed to the next attempt.
            result_type: what the handler's return value converts to (a dataclass, a
                pydantic model, ``list[Item]``...); default ``Any``, plain JSON. A result
                that does not fit raises ``PayloadEncodingError`` at the ``await``.

        Returns:
            A handle; ``await`` it for the handler's return value. It raises
            :class:`~orchestrator.errors.ActivityError` when the activity fails for good:
            ``RecordTooLargeError`` or ``HistoryLimitExceededError`` when the step (or its
            result) does not fit the workflow's limits, with ``effects_committed`` True
            when the step ran and its writes committed (compensate it).

        Raises:
            ConfigurationError: an invalid name, ``retry``, ``compensation`` or timeout.
                The code is wrong, so the workflow is parked as ``STUCK`` even if the code
                catches this.
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
        timeouts = NO_TIMEOUTS
        if (
            schedule_to_close is not None
            or start_to_close is not None
            or heartbeat_timeout is not None
        ):
            try:
                timeouts = _activity_timeouts(
                    name, schedule_to_close, start_to_close, heartbeat_timeout
                )
            except ConfigurationError as exc:
                raise self._misuse(str(exc)) from None
        # A plain str copy: a str subclass must not reach the record or the comparisons.
        plain = str.__str__(name)
        handle = self._scheduler.schedule(
            plain, value, retry or DEFAULT_RETRY, compensation, timeouts
        )
        handle.result_type = result_type
        return handle

    def local_activity(
        self,
        name: str,
        value: Any = None,
        *,
        retry: RetryPolicy | None = None,
        compensation: bool = False,
        schedule_to_close: float | timedelta | None = None,
        start_to_close: float | timedelta | None = None,
        result_type: Any = Any,
    ) -> ActivityHandle:
        """Run the registry's local activity ``name`` inside the orchestrator, as a step.

        For short steps that need no participant service (a computation, a call to a
        fast idempotent API): no task goes through Kafka, and the step's scheduling and
        its outcome are written in the same transaction as the input that reached it, so
        a workflow of local steps advances in one transaction per input. The handler is
        registered with :meth:`WorkflowRegistry.local_activity` and has a participant
        handler's signature (``ctx.db`` is not available).

        **At least once**, like Temporal's local activities: if the orchestrator dies
        before that transaction commits, the step runs again when the input is applied
        again. Keep the handler's effects idempotent. A failed attempt is retried by
        ``retry`` on a durable timer, as a remote step is; ``start_to_close`` bounds one
        attempt (default ``SAGALINE_LOCAL_ACTIVITY_TIMEOUT_S``, at most 60 s), and the
        orchestrator's other workflows wait while it runs: keep it short.

        ``retry``, ``compensation``, ``schedule_to_close`` and ``result_type`` work as for
        :meth:`activity`; the step is recorded in history as ``local.<name>``.

        Raises:
            ConfigurationError: an invalid name or option (the workflow is parked as
                ``STUCK``).
        """
        if not isinstance(name, str) or "." in name[:1]:
            raise self._misuse(
                f"ctx.local_activity({_shown(name)}): a local activity name must be a str "
                "starting with a letter, digit or '_'"
            )
        return self.activity(
            f"{LOCAL_PARTICIPANT}.{str.__str__(name)}",
            value,
            retry=retry,
            compensation=compensation,
            schedule_to_close=schedule_to_close,
            start_to_close=start_to_close,
            result_type=result_type,
        )

    def celery(
        self,
        task_name: str,
        *args: Any,
        queue: str = DEFAULT_QUEUE,
        retry: RetryPolicy | None = None,
        compensation: bool = False,
        schedule_to_close: float | timedelta | None = None,
        start_to_close: float | timedelta | None = None,
        result_type: Any = Any,
        **kwargs: Any,
    ) -> ActivityHandle:
        """Run the Celery task registered as ``task_name`` with ``args`` and ``kwargs`` on a
        Celery worker that consumes ``queue``, as a step of this workflow.

        The orchestrator sends the task message in its transaction to the Kafka topic
        named ``queue``, which an unmodified ``celery worker -Q <queue>`` on a
        ``confluentkafka://`` broker consumes; the Celery task id is the activity id. The
        worker-side integration (``participants.celery.attach(app)``) reports the outcome.
        ``retry``, ``compensation``, ``schedule_to_close`` and ``result_type`` work as for
        :meth:`activity`; ``start_to_close`` is also the task's hard time limit. Keyword
        arguments named like these options cannot be passed to the task.

        Raises:
            ConfigurationError: an invalid task name, queue or option (the workflow is
                parked as ``STUCK``).
        """
        name = f"{CELERY_PARTICIPANT}.{task_name}" if isinstance(task_name, str) else task_name
        problem = _name_problem(name)
        if problem is not None or not isinstance(task_name, str):
            raise self._misuse(
                f"ctx.celery({_shown(task_name)}): a task name must be 1-200 letters, "
                "digits, '_', '.' and '-', starting with a letter, digit or '_'"
            )
        if not isinstance(queue, str) or not _QUEUE.fullmatch(queue):
            raise self._misuse(
                f"ctx.celery({_shown(task_name)}, queue={_shown(queue)}): a queue is 1-200 "
                "letters, digits, '_', '.' and '-' (it is a Kafka topic name)"
            )
        value = {"args": list(args), "kwargs": kwargs, "queue": str.__str__(queue)}
        return self.activity(
            name,
            value,
            retry=retry,
            compensation=compensation,
            schedule_to_close=schedule_to_close,
            start_to_close=start_to_close,
            result_type=result_type,
        )

    def sleep(self, seconds: float | timedelta) -> TimerHandle:
        """A durable timer that fires ``seconds`` (int, float or timedelta) from now.

        ``await ctx.sleep(60)`` suspends the workflow for a minute; nothing runs and
        nothing is held in memory meanwhile, and the wait survives restarts. The timer
        starts at this call, so the handle can also be raced or gathered.

        Raises:
            ConfigurationError: ``seconds`` is not 0 to 100 years (the workflow is parked
                as ``STUCK``).
        """
        try:
            delay = _checked_seconds(seconds, "ctx.sleep(seconds)")
        except ConfigurationError as exc:
            raise self._misuse(str(exc)) from None
        return self._scheduler.timer(self._scheduler.now_ms() + _ms(delay))

    def sleep_until(self, epoch_seconds: float | datetime) -> TimerHandle:
        """A durable timer that fires at ``epoch_seconds`` (seconds since the epoch, or a
        timezone-aware datetime); a time already past fires at the next wake-up.

        Raises:
            ConfigurationError: not a finite time from 1970 to the year 9999, or a naive
                datetime (the workflow is parked as ``STUCK``).
        """
        what = "ctx.sleep_until(epoch_seconds)"
        try:
            if isinstance(epoch_seconds, datetime):
                epoch = _epoch_of(epoch_seconds, what)
            else:
                epoch = _checked_number(epoch_seconds, what)
            if not 0 <= epoch <= MAX_EPOCH_S:
                raise ConfigurationError(
                    f"{what} must be between 0 and {MAX_EPOCH_S} (the year 9999), got {epoch:g}"
                )
        except ConfigurationError as exc:
            raise self._misuse(str(exc)) from None
        return self._scheduler.timer(int(epoch * 1000))

    def gather(self, *handles: CommandHandle) -> Gather:
        """Await several activities and timers; results in argument order (None for a
        timer).

        Waits for all of them; if any failed, raises the first failure (argument order)
        once the rest have finished.

        Raises:
            ConfigurationError: an argument is not a handle from ``ctx.activity``,
                ``ctx.sleep`` or ``ctx.sleep_until`` (the workflow is parked as ``STUCK``).
        """
        return Gather(self._scheduler, self._handles("ctx.gather", handles))

    def first(self, *handles: H) -> First[H]:
        """Await whichever of ``handles`` settles first; returns that handle.

        "First" is history order, so a replay returns the same handle. Failed handles
        count: ``await`` the returned handle for its value or error. The others keep
        running (an activity is not cancelled; a timer still fires).

        Raises:
            ConfigurationError: no handles, or one that is not a handle from
                ``ctx.activity``, ``ctx.sleep`` or ``ctx.sleep_until`` (the workflow is
                parked as ``STUCK``).
        """
        if not handles:
            raise self._misuse("ctx.first() needs at least one handle; it would wait forever")
        return First(self._scheduler, self._handles("ctx.first", handles))

    def promise(self, name: str, *, value_type: Any = Any) -> PromiseHandle:
        """A promise that something outside the workflow completes later: a person's
        approval, a payment provider's callback, any system given :attr:`PromiseHandle.id`.

        Hand the id out (usually through an activity: an e-mail with a link, a request to
        a provider), then ``await`` the handle for the value it is completed with; a
        failed promise raises :class:`~orchestrator.errors.PromiseFailedError`. Like any
        handle it takes ``with_timeout``, ``ctx.gather`` and ``ctx.first``. The id is
        ``<workflow id>/<run id>/p<step>``, stable across replays; a promise completes
        once (later completions are ignored). ``value_type``: what the value converts to
        (a dataclass, a pydantic model; default plain JSON); one that does not fit raises
        ``PayloadEncodingError`` at the ``await``.

        Raises:
            ConfigurationError: ``name`` is not 1-200 characters of UTF-8 text without
                NUL (the workflow is parked as ``STUCK``).
        """
        problem = signal_name_problem(name)
        if problem is not None:
            raise self._misuse(
                f"ctx.promise({_shown(name)}): {problem.replace('signal', 'promise')}"
            )
        handle = self._scheduler.promise(str.__str__(name))
        handle.value_type = value_type
        return handle

    @overload
    def wait_signal(
        self, name: str, timeout: None = None, *, value_type: Any = Any
    ) -> SignalHandle: ...

    @overload
    def wait_signal(
        self, name: str, timeout: float | timedelta, *, value_type: Any = Any
    ) -> Timeout[Any]: ...

    def wait_signal(
        self, name: str, timeout: float | timedelta | None = None, *, value_type: Any = Any
    ) -> SignalHandle | Timeout[Any]:
        """Wait for the signal ``name``: ``await`` it for the signal's value.

        Signals sent to the workflow (``WorkflowClient.signal``, ``sagaline signal`` or a
        ``SignalWorkflow`` record from any Kafka producer) are kept in its history in the
        order they arrived; a wait takes the oldest one of its name not taken yet, so
        signals sent before the wait are not lost. With ``timeout`` (seconds or
        timedelta) a durable timer races the signal and awaiting raises
        :class:`~orchestrator.errors.WorkflowTimeoutError` if it fires first; the signal
        is then left for a later wait. ``value_type``: what the signal's value converts
        to (a dataclass, a pydantic model; default plain JSON); one that does not fit
        raises ``PayloadEncodingError`` at the ``await`` (the signal is taken).

        Raises:
            ConfigurationError: ``name`` is not 1-200 characters of UTF-8 text without
                NUL, or ``timeout`` is not 0 to 100 years (the workflow is parked as
                ``STUCK``).
        """
        problem = signal_name_problem(name)
        if problem is not None:
            raise self._misuse(f"ctx.wait_signal({_shown(name)}): {problem}")
        handle = SignalHandle(self._scheduler, str.__str__(name), value_type)
        if timeout is None:
            return handle
        return handle.with_timeout(timeout)

    def random(self) -> float:
        """A random float in [0, 1) that is the same on every replay of this run.

        Values come from a generator seeded with the workflow id and run id (Python's
        Mersenne Twister, seeded from the text's SHA-512), so the n-th call of a run
        always returns the same number; a code change that adds or removes calls before
        a use changes what that use gets. Not for secrets: use an activity.
        """
        return self._generator().random()

    def uuid4(self) -> uuid.UUID:
        """A version 4 UUID that is the same on every replay of this run (drawn from the
        generator of :meth:`random`): use it for idempotency keys and ids of things the
        workflow creates, where ``uuid.uuid4()`` would change on every replay."""
        return uuid.UUID(int=self._generator().getrandbits(128), version=4)

    def _generator(self) -> Random:
        if self._rng is None:
            self._rng = Random(self._seed)
        return self._rng

    def now(self) -> float:
        """Deterministic time (seconds since the epoch) of the input being replayed."""
        return self._scheduler.now_ms() / 1000.0

    def child_workflow(
        self,
        workflow_type: str,
        value: Any = None,
        *,
        id: str | None = None,
        parent_close_policy: ParentClosePolicy = ParentClosePolicy.TERMINATE,
        execution_timeout: float | timedelta | None = None,
        result_type: Any = Any,
    ) -> ActivityHandle:
        """Start workflow ``workflow_type`` with ``value`` as a child of this one; ``await``
        the handle for its result (converted to ``result_type``, as ``ctx.activity`` does).

        The child's start is produced in the same transaction that records this step,
        keyed by its id, so it starts on whichever orchestrator owns that id's partition;
        when it closes, its result (or failure) comes back as this step's outcome. A child
        that does not complete raises :class:`~orchestrator.errors.ChildWorkflowError`
        (an ``ActivityError``, so ``Saga`` blocks compensate), as does a start refused
        because a run with that id is open. The child is a step like an activity: it
        takes ``with_timeout``, ``ctx.gather`` and ``ctx.first``, and it is never retried.

        Args:
            workflow_type: the child's registered type.
            value: its input (JSON).
            id: its workflow id; default ``<this id>/<run id>/c<step>``, unique per run.
            parent_close_policy: when this workflow closes while the child runs:
                ``TERMINATE`` it (the default), ``REQUEST_CANCEL`` it (it compensates) or
                ``ABANDON`` it. Cancelling this workflow cancels children whose policy is
                not ``ABANDON``.
            execution_timeout: seconds (or timedelta) this step waits for the child at
                most; then it fails with ``ScheduleToCloseTimeout`` (the child is left to
                the close policy).

        Raises:
            ConfigurationError: an invalid type, id, policy or timeout (the workflow is
                parked as ``STUCK``).
        """
        problem = signal_name_problem(workflow_type)
        if problem is not None:
            raise self._misuse(
                f"ctx.child_workflow({_shown(workflow_type)}): "
                + problem.replace("a signal name", "a workflow type")
            )
        if id is not None and (not isinstance(id, str) or signal_name_problem(id) is not None):
            raise self._misuse(
                f"ctx.child_workflow({_shown(workflow_type)}, id=...) takes None or 1-"
                f"{MAX_NAME_CHARS} characters of UTF-8 text without NUL, got {_shown(id)}"
            )
        if not isinstance(parent_close_policy, ParentClosePolicy):
            raise self._misuse(
                f"ctx.child_workflow({_shown(workflow_type)}, parent_close_policy=...) takes a "
                f"ParentClosePolicy, got {_type_name(parent_close_policy)}"
            )
        timeouts = NO_TIMEOUTS
        if execution_timeout is not None:
            what = f"ctx.child_workflow({_shown(workflow_type)}, execution_timeout=...)"
            try:
                timeouts = ActivityTimeouts(_checked_timeout(execution_timeout, what))
            except ConfigurationError as exc:
                raise self._misuse(str(exc)) from None
        spec = ChildSpec(None if id is None else str.__str__(id), parent_close_policy)
        handle = self._scheduler.schedule(
            str.__str__(workflow_type), value, CHILD_RETRY, False, timeouts, spec
        )
        handle.result_type = result_type
        return handle

    def patched(self, patch_id: str) -> bool:
        """True where this run takes the new code of a change named ``patch_id``.

        Wrap a change to the steps a workflow takes in ``if ctx.patched("id"): new
        else: old``. A run that reaches this point after the deploy (every new run, and
        every running one that had not got this far) gets True, and history records that
        the patch is on for it; a run whose history shows it passed this point with the
        old code (a step recorded after it, an input taken after it) gets False, so its
        replay matches what it did. The first answer in a run holds for the rest of the
        run, so a loop asks once. Query and update handlers see the run's answer.

        Later, when no run that took the old path is open any more, replace the call
        with :meth:`deprecate_patch` and drop the old branch; once no run that recorded
        the patch is open, drop that call too. See docs/evolution.md.

        Raises nothing; an id that is not a non-empty string of at most 200 characters
        parks the workflow.
        """
        if not self._valid_patch_id(patch_id):
            return False
        return self._scheduler.patched(str.__str__(patch_id), False)

    def deprecate_patch(self, patch_id: str) -> None:
        """Mark where ``ctx.patched(patch_id)`` was, once the old branch is gone.

        Runs that recorded the patch replay as before; runs that reach this point record
        it, so processes still running the previous deploy (with ``ctx.patched``) take the
        new branch for them during a rolling deploy.
        """
        if self._valid_patch_id(patch_id):
            self._scheduler.patched(str.__str__(patch_id), True)

    def _valid_patch_id(self, patch_id: object) -> bool:
        if isinstance(patch_id, str) and signal_name_problem(patch_id) is None:
            return True
        self._scheduler.misuse(
            f"a patch id is 1-{MAX_NAME_CHARS} characters of UTF-8 text without NUL, "
            f"got {safe_text(repr(patch_id), MAX_NAME_CHARS)}"
        )
        return False

    def continue_as_new(self, value: Any = None) -> NoReturn:
        """End this run and start the next run of this workflow with input ``value``.

        The next run has the same workflow id and type, a new run id, an empty history
        but for the signals this run received and no wait took (they arrive again, in
        order, as received when it starts), remembers the signal and update ids this run
        took (a resent one is not applied again), and starts in the same transaction that
        closes this one
        (``CONTINUED_AS_NEW``). Use it to keep the record of a workflow that loops
        forever (a subscription, a poller) bounded: continue when
        :attr:`history_length` grows large. Steps this run scheduled and did not await,
        and its timers, are dropped; results of steps still running are ignored.

        Raises :class:`~orchestrator.errors.ContinueAsNewError` (a ``BaseException``:
        let it propagate), or ``PayloadEncodingError`` when ``value`` is not JSON.
        """
        self._scheduler.continue_as_new(value)
        raise ContinueAsNewError(self.workflow_id)

    @property
    def history_length(self) -> int:
        """How far the run has got: the commands it made (steps, timers, promises,
        children) and the outcomes it has seen (results, fired timers, signals, updates)
        so far, the same on every replay. The record holds at least this many events
        (each step two, retries, start reports and heartbeats more): continue as new
        well before the orchestrator's ``max_events`` (default 1,000)."""
        return self._scheduler.history_length()

    def on_query(self, name: str, handler: Handler) -> None:
        """Answer query ``name`` with ``handler``: a plain function of the workflow's
        current state (usually a closure over the workflow function's variables).

        A query (``WorkflowClient.query``, ``sagaline query`` or a ``QueryWorkflow``
        record) runs on the orchestrator that owns the workflow, against its state
        replayed up to now, and never changes it: the handler is called with the query's
        argument (with no argument when that is None), and its return value (JSON) is
        the answer. What it raises is the caller's error, not the workflow's. A handler
        must not start activities, timers, promises or waits; registering a name again
        replaces its handler. Register handlers early (before the first ``await``), so a
        query finds them whatever the workflow waits for.

        Raises:
            ConfigurationError: ``name`` is not 1-200 characters of UTF-8 text without
                NUL, or ``handler`` is not callable (the workflow is parked as ``STUCK``).
        """
        self._register("query", "ctx.on_query", name, handler, None)

    def on_update(self, name: str, handler: Handler, *, validator: Handler | None = None) -> None:
        """Apply update ``name`` with ``handler``, which may change the workflow's state
        and returns the caller's answer.

        An update (``WorkflowClient.update``, ``sagaline update`` or an
        ``UpdateWorkflow`` record) first runs ``validator`` (if given) against the
        current state; if it raises, the update is rejected and nothing is recorded.
        Otherwise the update is recorded in the history and ``handler`` runs at that
        point, now and on every replay, so what it changes stays changed; the caller gets
        its return value (JSON) once the record is committed. The workflow's code sees the
        change when it next runs (after its current await settles). Both are called with
        the update's argument (with none when it is None); a handler's exception fails the
        update but not the workflow. Neither may start activities, timers, promises or
        waits.

        Raises:
            ConfigurationError: ``name`` is not 1-200 characters of UTF-8 text without
                NUL, or ``handler`` or ``validator`` is not callable (the workflow is
                parked as ``STUCK``).
        """
        self._register("update", "ctx.on_update", name, handler, validator)

    def _register(
        self, kind: str, call: str, name: str, handler: Handler, validator: Handler | None
    ) -> None:
        problem = signal_name_problem(name)
        if problem is not None:
            raise self._misuse(f"{call}({_shown(name)}): {problem.replace('signal', kind)}")
        if not callable(handler) or (validator is not None and not callable(validator)):
            raise self._misuse(f"{call}({_shown(name)}): handlers must be callable")
        self._scheduler.handle(kind, str.__str__(name), handler, validator)

    def _handles(self, call: str, handles: tuple[H, ...]) -> tuple[H, ...]:
        for handle in handles:
            if type(handle) not in (ActivityHandle, TimerHandle, SignalHandle, PromiseHandle):
                raise self._misuse(
                    f"{call} takes handles returned by ctx.activity, ctx.sleep, "
                    f"ctx.sleep_until, ctx.wait_signal or ctx.promise, got {_type_name(handle)}"
                )
        return tuple(handles)

    def _misuse(self, message: str) -> ConfigurationError:
        """Tell the engine first, so code that catches the error cannot hide the bug."""
        self._scheduler.misuse(message)
        return ConfigurationError(message)


def signal_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a signal, or None if it can: 1-200 characters of UTF-8
    text without NUL."""
    if not isinstance(name, str):
        return f"a signal name must be a str, got {_type_name(name)}"
    if not name or len(name) > MAX_NAME_CHARS or safe_text(name, MAX_NAME_CHARS) != name:
        return f"a signal name must be 1-{MAX_NAME_CHARS} characters of UTF-8 text without NUL"
    return None


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

    def __init__(self, *, converter: DataConverter = DEFAULT_CONVERTER) -> None:
        """``converter`` turns the workflows' inputs, results, activity arguments and
        results, and handler values into payloads and back (docs/payloads.md)."""
        self._functions: dict[str, WorkflowFn] = {}
        self.converter = converter
        self._local: Participant | None = None
        self._inline: set[str] = set()
        self._replay_cache: ReplayCache | None = None

    @property
    def replay_cache(self) -> ReplayCache:
        """The coroutines of waiting runs kept between their inputs (docs/architecture.md,
        "The replay cache"), made at first use with the default size; the orchestrator
        sets one sized by ``SAGALINE_REPLAY_CACHE_SIZE``, and ``ReplayCache(0)`` keeps
        nothing."""
        if self._replay_cache is None:
            # Made here, not at import: the replay engine imports this module, and a
            # participant process that only defines activities never loads the engine.
            from orchestrator.replay.driver import ReplayCache  # noqa: PLC0415

            self._replay_cache = ReplayCache()
        return self._replay_cache

    @replay_cache.setter
    def replay_cache(self, cache: ReplayCache) -> None:
        previous, self._replay_cache = self._replay_cache, cache
        if previous is not None and previous is not cache:
            previous.clear()

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

    def local_activity(self, name: str, *, inline: bool = False) -> Callable[[A], A]:
        """Decorator registering a handler as local activity ``name``, which workflows
        run inside the orchestrator with ``ctx.local_activity(name, value)``.

        The handler takes the value positionally and the attempt's
        :class:`~participants.participant.ActivityContext` as ``ctx`` (without
        ``ctx.db``), may be async, and its value and result convert as a participant
        handler's do (the registry's converter). See
        :meth:`WorkflowContext.local_activity` for what running in the orchestrator means.

        ``inline``: run the handler on the orchestrator's loop thread instead of a worker
        thread, which saves the hand-over between threads (60-90 us per attempt on the
        development machine). Only for a handler that cannot block, a computation like
        workflow code itself: an inline handler that hangs stops the loop, where a worker
        thread's would be written off at its deadline.

        Raises:
            ConfigurationError: ``name`` is not a valid activity name or is taken, or
                ``inline`` is not a bool.
        """
        if type(inline) is not bool:
            raise ConfigurationError(
                f"registry.local_activity({_shown(name)}, inline=...) takes a bool, got "
                f"{_type_name(inline)}"
            )
        register = self.local_activities.activity(name)
        if inline:
            self._inline.add(name)
        return register

    @property
    def inline_local_activities(self) -> frozenset[str]:
        """Names of the local activities registered with ``inline=True``."""
        return frozenset(self._inline)

    @property
    def local_activities(self) -> Participant:
        """The handlers of this registry's local activities (empty if none)."""
        if self._local is None:
            # Here, not at the top: participants build on this package.
            from participants.participant import Participant  # noqa: PLC0415

            self._local = Participant.in_orchestrator(self.converter)
        return self._local

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
