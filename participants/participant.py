"""A participant service: its activity handlers and how one task attempt turns into an outcome.

Rules of this module: it runs handlers and maps what they return or raise to an
:class:`Outcome`; it never opens, commits or rolls back a database transaction (that is
:mod:`participants.idempotency`) and never touches Kafka (that is :mod:`participants.runtime`).
Time comes in through a ``now_ms`` argument so the mapping is testable without a clock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import psycopg

from orchestrator.convert import DEFAULT_CONVERTER, DataConverter, input_hint
from orchestrator.errors import ConfigurationError
from orchestrator.protocol.celery import CELERY_PARTICIPANT
from orchestrator.protocol.failures import (
    MAX_NAME_CHARS,
    describe,
    failure_from_exception,
    safe_text,
)
from orchestrator.protocol.payloads import PayloadEncodingError
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    Failure,
    Payload,
)
from orchestrator.protocol.topics import ACTIVITY_NAME, LOCAL_PARTICIPANT, PARTICIPANT_NAME

log = logging.getLogger(__name__)

UNKNOWN_ACTIVITY = "UnknownActivity"
# How the failure that replaces a sync handler's outcome past its deadline begins its detail.
LATE_RETURN = "returned after its"
WRONG_PARTICIPANT = "WrongParticipant"
START_TO_CLOSE_TIMEOUT = "StartToCloseTimeout"
SCHEDULE_TO_CLOSE_TIMEOUT = "ScheduleToCloseTimeout"
TIMEOUT_ERROR_TYPES = frozenset({START_TO_CLOSE_TIMEOUT, SCHEDULE_TO_CLOSE_TIMEOUT})


def wall_clock_ms() -> int:
    """Milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


class ActivityFailure(Exception):  # noqa: N818 - users raise it as a business outcome
    """A deliberate, business-level failure of an activity.

    Subclass it per failure kind; the subclass name becomes the result's ``error_type``
    (what ``RetryPolicy.non_retryable_error_types`` matches) and ``str(exc)`` its message.
    ``retryable`` defaults to False because a business refusal (card declined, out of
    stock) is usually final; set it to True on the subclass, or per raise, for failures
    that another attempt may cure. Any other exception a handler raises is reported as a
    retryable failure named after its class.

    Example::

        class PaymentDeclined(ActivityFailure):
            retryable = False

        raise PaymentDeclined(f"card refused for order {order_id}")
    """

    retryable: bool = False
    retry_after: float | dt.timedelta | None = None

    def __init__(
        self,
        message: str = "",
        *,
        retryable: bool | None = None,
        retry_after: float | dt.timedelta | None = None,
    ) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable
        if retry_after is not None:
            self.retry_after = retry_after
        # Validated here, so a bad value fails at the raise, naming itself.
        self.retry_after_ms: int | None = retry_after_ms(self.retry_after)


def retry_after_ms(value: object) -> int | None:
    """``value`` (seconds as int/float, or a timedelta) in whole milliseconds, rounded up.

    Raises:
        TypeError: not a number of seconds nor a timedelta (a bool is refused too).
        ValueError: negative, NaN or infinite.
    """
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(
            f"retry_after must be seconds (int or float) or a datetime.timedelta, "
            f"not {type(value).__name__}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"retry_after must be finite and at least 0 seconds, not {value!r}")
    return math.ceil(seconds * 1000)


@dataclass(frozen=True, slots=True)
class Deadline:
    """When an attempt must be over, and which timeout that is.

    Attributes:
        at_ms: epoch milliseconds.
        error_type: ``StartToCloseTimeout`` or ``ScheduleToCloseTimeout``.
        limit_ms: the timeout's length, for messages (start-to-close, or the time the
            schedule-to-close deadline left when the attempt started).
    """

    at_ms: int
    error_type: str
    limit_ms: int

    def failure(self, task: ActivityTask, *, ran: bool, late: bool = False) -> Failure:
        """The retryable failure that answers an attempt past this deadline.

        ``late``: a sync handler returned after it (it could not be cancelled).
        """
        name = safe_text(f"{task.participant}.{task.activity}", MAX_NAME_CHARS)
        what = (
            "start-to-close timeout"
            if self.error_type == START_TO_CLOSE_TIMEOUT
            else "schedule-to-close deadline"
        )
        if late:
            detail = (
                f"{LATE_RETURN} {what} ({self.limit_ms} ms); its outcome was replaced by "
                "this failure and its writes were rolled back"
            )
        elif ran:
            detail = (
                f"was cancelled at its {what} ({self.limit_ms} ms); its writes were rolled back"
            )
        else:
            detail = f"was not run: its {what} had passed when the participant picked it up"
        return Failure(
            self.error_type,
            safe_text(f"activity {name} {safe_text(task.activity_id, 300)} {detail}"),
            True,
        )


def attempt_deadline(task: ActivityTask, started_at_ms: int) -> Deadline | None:
    """min(``task.deadline_ms``, start + ``task.start_to_close_ms``); None when neither is set.

    On a tie the schedule-to-close deadline wins: another attempt could not finish in time
    either.
    """
    candidates: list[Deadline] = []
    if task.deadline_ms is not None:
        candidates.append(
            Deadline(
                task.deadline_ms,
                SCHEDULE_TO_CLOSE_TIMEOUT,
                max(0, task.deadline_ms - started_at_ms),
            )
        )
    if task.start_to_close_ms is not None:
        candidates.append(
            Deadline(
                started_at_ms + task.start_to_close_ms,
                START_TO_CLOSE_TIMEOUT,
                task.start_to_close_ms,
            )
        )
    if not candidates:
        return None
    return min(candidates, key=lambda d: (d.at_ms, d.error_type != SCHEDULE_TO_CLOSE_TIMEOUT))


class AttemptReporter(Protocol):
    """Where a running attempt reports to (the runtime publishes to the inbox).

    Both methods are called from the thread that runs the attempt and must not raise.
    """

    def started(self, started_at_ms: int, deadline: Deadline | None) -> None:
        """The handler is about to run (not called for an attempt answered without it)."""

    def heartbeat(self, details: Payload | None) -> None:
        """The handler called ``ctx.heartbeat``; ``details`` already encoded."""


@dataclass(frozen=True, slots=True)
class ActivityContext:
    """What a handler knows about the attempt it runs, and the database it writes to.

    Attributes:
        db: a psycopg 3 connection with the idempotency transaction open; the handler's
            writes commit together with the stored result, or not at all (a handler that
            raises has its writes rolled back). Do not call ``commit()``/``rollback()``
            on it nor run ``COMMIT``/``ROLLBACK`` as SQL; ``db.transaction()`` gives a
            savepoint.
        activity_id: stable id of this attempt (``<workflow>/<seq>/<attempt>``).
        workflow_id: the workflow that scheduled it.
        attempt: 1 for the first attempt, then 2, 3... (each attempt has its own id).
        compensation: True when the workflow runs it to undo an earlier step.
        participant: the participant's name, e.g. ``"payment"``.
        activity: the activity's name, e.g. ``"charge"``.
        seq: the step's position in the workflow; the same for every attempt.
        workflow_type: the workflow's registered type, e.g. ``"order.process"``.
        deadline: when this attempt must be over (epoch seconds): the earlier of the
            step's schedule-to-close deadline and this attempt's start plus its
            start-to-close timeout; None when neither is set. An async handler still
            running then is cancelled; a sync one cannot be: when it returns past the
            deadline its writes are rolled back and the stored outcome is the timeout
            failure (the workflow has moved on, and a retry would repeat the writes).
        heartbeat_details: the details the step's last heartbeat reported (from an
            earlier attempt), as plain JSON (a dataclass reported comes back as a dict):
            where to resume; None if there were none.
        heartbeat_timeout: seconds without a heartbeat after which the workflow gives up
            on this attempt; None when the step expects no heartbeats.
        converter: the participant's :class:`~orchestrator.convert.DataConverter`, which
            encodes heartbeat details.
    """

    db: psycopg.Connection[Any]
    activity_id: str
    workflow_id: str
    attempt: int
    compensation: bool
    participant: str
    activity: str
    seq: int = 0
    workflow_type: str = ""
    deadline: float | None = None
    heartbeat_details: Any = None
    heartbeat_timeout: float | None = None
    reporter: AttemptReporter | None = field(default=None, repr=False, compare=False)
    converter: DataConverter = field(default=DEFAULT_CONVERTER, repr=False, compare=False)

    def heartbeat(self, details: Any = None) -> None:
        """Tell the workflow this attempt is alive, with its progress so far.

        ``details`` is JSON or a value the participant's converter converts (a dataclass,
        a pydantic model; docs/payloads.md); the latest details reach the workflow and
        are handed to the next attempt as ``ctx.heartbeat_details``. Calls are cheap: at
        most one heartbeat per third of the heartbeat timeout (at least 1 s apart) is
        published, and the latest details are sent when that window ends. Without
        ``details`` the latest details given before (by this attempt or an earlier one)
        are kept. Callable from any thread, from sync and async handlers.

        Raises:
            PayloadEncodingError: ``details`` cannot be converted to JSON.
        """
        payload: Payload | None = None
        if details is not None:
            try:
                payload = self.converter.to_payload(details)
            except PayloadEncodingError as exc:
                raise PayloadEncodingError(
                    f"heartbeat details of activity {self.activity_id} must convert to JSON: {exc}"
                ) from exc
        if self.reporter is not None:
            self.reporter.heartbeat(payload)

    def time_left(self) -> float | None:
        """Seconds until :attr:`deadline` (negative once past); None without a deadline."""
        return None if self.deadline is None else self.deadline - time.time()


class ActivityHandler(Protocol):
    """A handler: the task's value positionally, the context as ``ctx``; may be async.

    The value arrives as the type the first parameter is annotated with (a dataclass, a
    pydantic model, ``list[Item]``...; plain JSON without an annotation), and what the
    handler returns is converted to JSON (docs/payloads.md).
    """

    def __call__(self, value: Any, /, *, ctx: ActivityContext) -> Any: ...


H = TypeVar("H", bound=ActivityHandler)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended: an encoded result, or a failure; what the idempotency inbox
    stores."""

    status: ActivityStatus
    finished_at_ms: int
    result: Payload | None = None
    failure: Failure | None = None

    @classmethod
    def completed(cls, result: Payload, finished_at_ms: int) -> Outcome:
        """A successful attempt that returned ``result``."""
        return cls(ActivityStatus.COMPLETED, finished_at_ms, result=result)

    @classmethod
    def failed(cls, failure: Failure, finished_at_ms: int) -> Outcome:
        """An attempt that failed with ``failure``."""
        return cls(ActivityStatus.FAILED, finished_at_ms, failure=failure)

    @property
    def is_completed(self) -> bool:
        """True for a successful attempt."""
        return self.status is ActivityStatus.COMPLETED

    @property
    def retryable(self) -> bool:
        """True for a failure another attempt (under a new activity id) may cure."""
        return self.failure is not None and self.failure.retryable

    def result_for(self, task: ActivityTask) -> ActivityResult:
        """The inbox record that answers ``task``."""
        return ActivityResult(
            workflow_id=task.workflow_id,
            activity_id=task.activity_id,
            seq=task.seq,
            attempt=task.attempt,
            status=self.status,
            finished_at_ms=self.finished_at_ms,
            result=self.result,
            failure=self.failure,
        )


def handler_failure(exc: BaseException) -> Failure:
    """Map what a handler raised to a :class:`Failure`; never raises.

    An :class:`ActivityFailure` keeps its own ``retryable`` flag and, when retryable, its
    ``retry_after`` (as ``Failure.retry_after_ms``). Anything else is
    transient, so retryable: an ``Exception`` (a database error, a bug, a timeout talking
    to another service) and a ``BaseException`` alike. A handler's ``SystemExit``,
    ``KeyboardInterrupt``, ``GeneratorExit`` or ``asyncio.CancelledError`` cannot be told
    apart from an interruption another attempt would not meet, and the workflow's
    ``RetryPolicy`` bounds the attempts (``non_retryable_error_types`` can name them).
    Text is made safe for UTF-8, Avro and PostgreSQL: lone surrogates and NUL are escaped.
    """
    retryable = True
    after: int | None = None
    if isinstance(exc, ActivityFailure):
        try:
            retryable = bool(exc.retryable)
        except BaseException:  # a property that raises: fall back to the class's default
            retryable = bool(ActivityFailure.retryable)
        try:
            # A subclass whose __init__ skipped ours has only the class's retry_after.
            after = getattr(exc, "retry_after_ms", None) or retry_after_ms(exc.retry_after)
        except BaseException:  # a property that raises, an invalid class value: no hint
            after = None
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            after = None
    failure = failure_from_exception(exc, retryable=retryable)
    if retryable and after is not None:
        failure = replace(failure, retry_after_ms=after)
    return failure


class Participant:
    """A service that runs activities for workflows, e.g. ``payment`` (``charge``, ``refund``).

    Its tasks arrive on ``<prefix>.tasks.<name>``; workflows call its activities as
    ``"<name>.<activity>"``. ``setup_sql`` creates the service's own tables; it runs at
    startup with the idempotency table, so it must be idempotent (``IF NOT EXISTS``).
    ``converter`` turns task values into the types handlers annotate their first
    parameter with, and their results and heartbeat details into payloads.

    Example::

        payment = Participant("payment", setup_sql="CREATE TABLE IF NOT EXISTS payments (...)")

        @payment.activity("charge")
        def charge(request: ChargeRequest, *, ctx: ActivityContext) -> Charge:
            ctx.db.execute("INSERT INTO payments ...")
            return Charge(charge_id=charge_id)
    """

    def __init__(
        self, name: str, *, setup_sql: str = "", converter: DataConverter = DEFAULT_CONVERTER
    ) -> None:
        if not PARTICIPANT_NAME.fullmatch(name):
            raise ConfigurationError(
                f"participant name {name!r} must be 1-100 letters, digits, '_' or '-' "
                "(it is part of a topic name and of '<participant>.<activity>')"
            )
        if name == CELERY_PARTICIPANT:
            raise ConfigurationError(
                f"participant name {name!r} is reserved: workflows' ctx.celery steps are "
                "sent to Celery workers under it; choose another name"
            )
        if name == LOCAL_PARTICIPANT:
            raise ConfigurationError(
                f"participant name {name!r} is reserved: workflows' ctx.local_activity steps "
                "run inside the orchestrator under it; choose another name"
            )
        self._name = name
        self._setup_sql = setup_sql
        self._converter = converter
        self._handlers: dict[str, ActivityHandler] = {}

    @classmethod
    def in_orchestrator(cls, converter: DataConverter = DEFAULT_CONVERTER) -> Participant:
        """The orchestrator's own participant, under the reserved name ``local``: the
        handlers of a registry's local activities (``WorkflowRegistry.local_activity``)."""
        local = cls.__new__(cls)
        local._name = LOCAL_PARTICIPANT
        local._setup_sql = ""
        local._converter = converter
        local._handlers = {}
        return local

    @property
    def name(self) -> str:
        """The participant's name, e.g. ``"payment"``."""
        return self._name

    @property
    def setup_sql(self) -> str:
        """SQL that creates the participant's business tables (idempotent)."""
        return self._setup_sql

    @property
    def converter(self) -> DataConverter:
        """Converts task values, results and heartbeat details (docs/payloads.md)."""
        return self._converter

    @property
    def activities(self) -> tuple[str, ...]:
        """Names of the registered activities, sorted."""
        return tuple(sorted(self._handlers))

    def __repr__(self) -> str:
        return f"Participant({self._name!r}, activities={list(self.activities)})"

    def activity(self, name: str) -> Callable[[H], H]:
        """Register the decorated function as activity ``name``; returns it unchanged.

        Raises:
            ConfigurationError: ``name`` is not a valid activity name or is taken.
        """
        if not ACTIVITY_NAME.fullmatch(name):
            raise ConfigurationError(
                f"activity name {name!r} of participant {self._name} must start with a "
                "letter, digit or '_' and contain only those, '.' and '-' (max 200)"
            )
        if name in self._handlers:
            raise ConfigurationError(
                f"activity {self._name}.{name} is registered twice; rename one of them"
            )

        def register(handler: H) -> H:
            self._handlers[name] = handler
            return handler

        return register

    def handler(self, activity: str) -> ActivityHandler | None:
        """The handler registered as ``activity``, if any."""
        return self._handlers.get(activity)

    def metric_label(self, activity: str) -> str:
        """``<participant>.<activity>`` for registered activities; unknown ones share one
        label so garbage names cannot grow metric cardinality."""
        known = activity if activity in self._handlers else "<unknown>"
        return f"{self._name}.{known}"

    def run_task(
        self,
        task: ActivityTask,
        db: psycopg.Connection[Any],
        *,
        now_ms: Callable[[], int] = wall_clock_ms,
        reporter: AttemptReporter | None = None,
    ) -> Outcome:
        """Run the handler for ``task`` once and map its return or exception to an outcome.

        Never raises for what the handler does. ``db`` is handed to the handler as
        ``ctx.db``; transaction control belongs to the caller
        (:func:`participants.idempotency.execute_task`). The attempt's deadline
        (:func:`attempt_deadline`) counts from now: a task whose schedule-to-close deadline
        has passed is answered with a retryable ``ScheduleToCloseTimeout`` without running
        the handler, and an async handler still running at the deadline is cancelled and
        answered with a retryable ``StartToCloseTimeout`` (or ``ScheduleToCloseTimeout``).
        ``reporter`` hears of the start, just before the handler runs, and of heartbeats.
        """
        if task.participant != self._name:
            return Outcome.failed(
                Failure(
                    WRONG_PARTICIPANT,
                    safe_text(
                        f"task {task.activity_id} is for participant {task.participant!r}, "
                        f"but reached {self._name!r}; check the orchestrator's routing"
                    ),
                    False,
                ),
                now_ms(),
            )
        handler = self._handlers.get(task.activity)
        if handler is None:
            return self._unknown_activity(task, now_ms())
        try:
            # Read lazily, not at registration: a hint may name a class defined further down.
            value = self._converter.from_payload(task.payload, input_hint(handler, 0))
        except PayloadEncodingError as exc:
            # The same bytes will arrive on every attempt: retrying cannot help.
            activity = safe_text(task.activity, MAX_NAME_CHARS)
            bad_input = PayloadEncodingError(f"input of activity {self._name}.{activity}: {exc}")
            return Outcome.failed(failure_from_exception(bad_input, retryable=False), now_ms())
        except BaseException as exc:
            # Not an Exception (the converter turns those into PayloadEncodingError): a
            # validator, link or codec raised SystemExit or the like. As from a handler,
            # it is this task's failure, never the process's; and since the same bytes
            # meet the same code on every attempt, a failure for good.
            return self._unconvertible_input(task, exc, now_ms())
        started_at_ms = now_ms()
        deadline = attempt_deadline(task, started_at_ms)
        if deadline is not None and deadline.at_ms <= started_at_ms:
            log.warning(
                "activity not run, deadline passed participant=%s activity=%s activity_id=%s "
                "error_type=%s overdue_ms=%d",
                self._name,
                task.activity,
                task.activity_id,
                deadline.error_type,
                started_at_ms - deadline.at_ms,
            )
            return Outcome.failed(deadline.failure(task, ran=False), started_at_ms)
        ctx = ActivityContext(
            db=db,
            activity_id=task.activity_id,
            workflow_id=task.workflow_id,
            attempt=task.attempt,
            compensation=task.compensation,
            participant=self._name,
            activity=task.activity,
            seq=task.seq,
            workflow_type=task.workflow_type,
            deadline=None if deadline is None else deadline.at_ms / 1000,
            heartbeat_details=self._previous_details(task),
            heartbeat_timeout=(
                None if task.heartbeat_timeout_ms is None else task.heartbeat_timeout_ms / 1000
            ),
            reporter=reporter,
            converter=self._converter,
        )
        if reporter is not None:
            reporter.started(started_at_ms, deadline)
        try:
            returned = handler(value, ctx=ctx)
            if inspect.iscoroutine(returned):
                returned = _run_until(returned, deadline, now_ms)
            payload = self._converter.to_payload(returned)
        except _DeadlineExceededError:
            assert deadline is not None
            log.warning(
                "activity cancelled at its deadline participant=%s activity=%s "
                "activity_id=%s error_type=%s",
                self._name,
                task.activity,
                task.activity_id,
                deadline.error_type,
            )
            return Outcome.failed(deadline.failure(task, ran=True), now_ms())
        except ActivityFailure as exc:
            failure = handler_failure(exc)
            log.info(
                "activity failed participant=%s activity=%s activity_id=%s "
                "error_type=%s retryable=%s",
                self._name,
                task.activity,
                task.activity_id,
                failure.error_type,
                failure.retryable,
            )
            return Outcome.failed(failure, now_ms())
        except BaseException as exc:
            # BaseException, not Exception: SystemExit, CancelledError and friends raised
            # by one handler are that task's failure, never the process's.
            failure = handler_failure(exc)
            log.warning(
                "activity raised participant=%s activity=%s activity_id=%s error_type=%s",
                self._name,
                task.activity,
                task.activity_id,
                failure.error_type,
                exc_info=True,
            )
            return Outcome.failed(failure, now_ms())
        finished_ms = now_ms()
        if deadline is not None and finished_ms > deadline.at_ms:
            # A sync handler cannot be cancelled. Its writes must not commit now: the
            # workflow has timed the attempt out and retries it under a new activity id
            # (or gives the step up), so they would happen twice, or never be undone.
            log.warning(
                "activity returned past its deadline, writes rolled back participant=%s "
                "activity=%s activity_id=%s error_type=%s late_ms=%d",
                self._name,
                task.activity,
                task.activity_id,
                deadline.error_type,
                finished_ms - deadline.at_ms,
            )
            return Outcome.failed(deadline.failure(task, ran=True, late=True), finished_ms)
        return Outcome.completed(payload, finished_ms)

    def _unconvertible_input(
        self, task: ActivityTask, exc: BaseException, finished_at_ms: int
    ) -> Outcome:
        activity = safe_text(task.activity, MAX_NAME_CHARS)
        failure = failure_from_exception(exc, retryable=False)
        failure = replace(
            failure,
            message=safe_text(
                f"input of activity {self._name}.{activity}: converting it raised {describe(exc)}"
            ),
        )
        log.warning(
            "activity input conversion raised participant=%s activity=%s activity_id=%s "
            "error_type=%s",
            self._name,
            activity,
            safe_text(task.activity_id, 300),
            failure.error_type,
            exc_info=True,
        )
        return Outcome.failed(failure, finished_at_ms)

    def _previous_details(self, task: ActivityTask) -> Any:
        if task.heartbeat_details is None:
            return None
        try:
            return self._converter.from_payload(task.heartbeat_details)
        except BaseException as exc:  # a codec's SystemExit must not escape run_task either
            log.warning(
                "heartbeat details unreadable, handing the handler None participant=%s "
                "activity_id=%s error=%s",
                self._name,
                safe_text(task.activity_id, 300),
                exc if isinstance(exc, PayloadEncodingError) else describe(exc),
            )
            return None

    def _unknown_activity(self, task: ActivityTask, finished_at_ms: int) -> Outcome:
        # Version skew during a deploy: an older replica gets a task for an activity only
        # the newer code registers. Retryable, so the workflow's RetryPolicy decides, and
        # a later attempt may reach a replica that has it.
        activity = safe_text(task.activity, MAX_NAME_CHARS)
        registered = ", ".join(self.activities) or "none"
        log.error(
            "unknown activity participant=%s activity=%s activity_id=%s registered=%s",
            self._name,
            activity,
            safe_text(task.activity_id),
            registered,
        )
        return Outcome.failed(
            Failure(
                UNKNOWN_ACTIVITY,
                safe_text(
                    f"participant {self._name} has no activity {activity!r} (registered: "
                    f"{registered}); deploy a version that registers it on every replica"
                ),
                True,
            ),
            finished_at_ms,
        )


class _DeadlineExceededError(Exception):
    """An async handler was cancelled at its attempt's deadline."""


def _run_until(
    coro: Coroutine[Any, Any, Any], deadline: Deadline | None, now_ms: Callable[[], int]
) -> Any:
    """Run ``coro`` in a fresh event loop, cancelled at ``deadline``.

    Raises:
        _DeadlineExceededError: the deadline came first, whether the handler let the
            cancellation through or swallowed it and returned.
    """
    timeout_s = None if deadline is None else max(0.0, (deadline.at_ms - now_ms()) / 1000)

    async def bounded() -> Any:
        scope = asyncio.timeout(timeout_s)
        try:
            async with scope:
                returned = await coro
        except BaseException:
            if scope.expired():
                raise _DeadlineExceededError from None
            raise
        if scope.expired():
            raise _DeadlineExceededError
        return returned

    return asyncio.run(bounded())
