"""A participant service: its activity handlers and how one task attempt turns into an outcome.

Rules of this module: it runs handlers and maps what they return or raise to an
:class:`Outcome`; it never opens, commits or rolls back a database transaction (that is
:mod:`participants.idempotency`) and never touches Kafka (that is :mod:`participants.runtime`).
Time comes in through a ``now_ms`` argument so the mapping is testable without a clock.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psycopg

from orchestrator.errors import ConfigurationError
from orchestrator.protocol.failures import MAX_NAME_CHARS, failure_from_exception, safe_text
from orchestrator.protocol.payloads import PayloadEncodingError, decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    Failure,
    Payload,
)
from orchestrator.protocol.topics import ACTIVITY_NAME, PARTICIPANT_NAME

log = logging.getLogger(__name__)

UNKNOWN_ACTIVITY = "UnknownActivity"
WRONG_PARTICIPANT = "WrongParticipant"


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

    def __init__(self, message: str = "", *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


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


class ActivityHandler(Protocol):
    """A handler: the task's JSON value positionally, the context as ``ctx``; may be async."""

    def __call__(self, value: Any, /, *, ctx: ActivityContext) -> Any: ...


H = TypeVar("H", bound=ActivityHandler)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended: a JSON result, or a failure; what the idempotency inbox stores."""

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

    An :class:`ActivityFailure` keeps its own ``retryable`` flag. Anything else is
    transient, so retryable: an ``Exception`` (a database error, a bug, a timeout talking
    to another service) and a ``BaseException`` alike. A handler's ``SystemExit``,
    ``KeyboardInterrupt``, ``GeneratorExit`` or ``asyncio.CancelledError`` cannot be told
    apart from an interruption another attempt would not meet, and the workflow's
    ``RetryPolicy`` bounds the attempts (``non_retryable_error_types`` can name them).
    Text is made safe for UTF-8, Avro and PostgreSQL: lone surrogates and NUL are escaped.
    """
    retryable = True
    if isinstance(exc, ActivityFailure):
        try:
            retryable = bool(exc.retryable)
        except BaseException:  # a property that raises: fall back to the class's default
            retryable = bool(ActivityFailure.retryable)
    return failure_from_exception(exc, retryable=retryable)


class Participant:
    """A service that runs activities for workflows, e.g. ``payment`` (``charge``, ``refund``).

    Its tasks arrive on ``<prefix>.tasks.<name>``; workflows call its activities as
    ``"<name>.<activity>"``. ``setup_sql`` creates the service's own tables; it runs at
    startup with the idempotency table, so it must be idempotent (``IF NOT EXISTS``).

    Example::

        payment = Participant("payment", setup_sql="CREATE TABLE IF NOT EXISTS payments (...)")

        @payment.activity("charge")
        def charge(value: dict, *, ctx: ActivityContext) -> dict:
            ctx.db.execute("INSERT INTO payments ...")
            return {"charge_id": charge_id}
    """

    def __init__(self, name: str, *, setup_sql: str = "") -> None:
        if not PARTICIPANT_NAME.fullmatch(name):
            raise ConfigurationError(
                f"participant name {name!r} must be 1-100 letters, digits, '_' or '-' "
                "(it is part of a topic name and of '<participant>.<activity>')"
            )
        self._name = name
        self._setup_sql = setup_sql
        self._handlers: dict[str, ActivityHandler] = {}

    @property
    def name(self) -> str:
        """The participant's name, e.g. ``"payment"``."""
        return self._name

    @property
    def setup_sql(self) -> str:
        """SQL that creates the participant's business tables (idempotent)."""
        return self._setup_sql

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
    ) -> Outcome:
        """Run the handler for ``task`` once and map its return or exception to an outcome.

        Never raises for what the handler does. ``db`` is handed to the handler as
        ``ctx.db``; transaction control belongs to the caller
        (:func:`participants.idempotency.execute_task`).
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
            value = decode_json(task.payload)
        except PayloadEncodingError as exc:
            # The same bytes will arrive on every attempt: retrying cannot help.
            return Outcome.failed(failure_from_exception(exc, retryable=False), now_ms())
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
        )
        try:
            returned = handler(value, ctx=ctx)
            if inspect.iscoroutine(returned):
                returned = asyncio.run(returned)
            payload = encode_json(returned)
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
        return Outcome.completed(payload, now_ms())

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
