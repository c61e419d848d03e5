"""Testing workflows in-process: scripted activities, no broker, virtual time that skips.

:class:`WorkflowTester` runs a workflow through the same pure engine the orchestrator runs
(``orchestrator.replay.advance``), with no Kafka, no participants and no waiting. Each
activity the workflow sends is answered from a script (``tester.activity(name)``), and
whenever nothing is ready the virtual clock jumps to what comes next: a scripted answer,
a timer, a retry's backoff or a timeout. A workflow that sleeps for a week, or a charge
that times out after a minute, runs in milliseconds.

Every input and record goes through the Avro codec on its way, so what the test sees is
what the orchestrator would commit; the record limits are the orchestrator's defaults.

Example::

    from orchestrator.testing import WorkflowStatus, WorkflowTester

    def test_a_declined_card_releases_the_stock() -> None:
        tester = WorkflowTester(registry)
        tester.activity("inventory.reserve").returns({"reservation_id": "res-1"})
        tester.activity("payment.charge").fails("PaymentDeclined", "card refused")
        tester.activity("inventory.release").returns({"released": True})
        run = tester.run("order.process", order)
        assert run.status is WorkflowStatus.COMPENSATED, run
        assert run.calls_to("inventory.release")[0].value == {"reservation_id": "res-1"}

See ``docs/testing.md`` for the rules of virtual time and more examples.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Final, Literal

from orchestrator.convert import DEFAULT_CONVERTER, DataConverter, return_hint
from orchestrator.errors import ConfigurationError, SagalineError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.failures import MAX_NAME_CHARS, safe_text
from orchestrator.protocol.records import (
    ActivityHeartbeat,
    ActivityResult,
    ActivityStarted,
    ActivityStatus,
    ActivityTask,
    CompletePromise,
    Failure,
    HistoryEvent,
    InboxBody,
    Payload,
    PromiseCompleted,
    PromiseCreated,
    QueryWorkflow,
    Reply,
    SignalWorkflow,
    StartWorkflow,
    UpdateWorkflow,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
    promise_id,
)
from orchestrator.protocol.topics import LOCAL_PARTICIPANT, activity_name_problem
from orchestrator.replay import Limits, advance, pending_tasks
from orchestrator.replay.driver import KEEPS_RUNNING
from orchestrator.replay.engine import answer_query
from orchestrator.replay.links import CHILD_FAILED
from orchestrator.replay.timing import LOCAL, dues, scan
from orchestrator.runtime.local import LocalRunner
from orchestrator.workflow import (
    MAX_EPOCH_S,
    WorkflowRegistry,
    _checked_number,
    _checked_seconds,
    _shown,
    _type_name,
    default_registry,
    signal_name_problem,
)

DEFAULT_START: Final = datetime(2025, 1, 1, tzinfo=UTC)
"""Where the virtual clock starts unless ``run(start_at=...)`` says otherwise."""
DEFAULT_WORKFLOW_ID: Final = "test-workflow"
RUN_ID: Final = "test-run"
"""The run id every tested workflow gets (the orchestrator gives each start a random one)."""
DEFAULT_MAX_HISTORY_EVENTS: Final = 1_000
"""The orchestrator's default ``SAGALINE_MAX_HISTORY_EVENTS``."""
DEFAULT_MAX_RECORD_BYTES: Final = 900_000
"""The orchestrator's default ``SAGALINE_MAX_RECORD_BYTES``."""
DEFAULT_MAX_STEPS: Final = 10_000
"""Inputs one run may apply before it is stopped as a runaway."""
CHILD_SCRIPT: Final = "child"
"""Scripts of child workflows are named ``child.<workflow type>``."""

Kind = Literal["returns", "fails", "hangs"]


class WorkflowTesterError(SagalineError):
    """A tested run could not go on; ``run`` holds the workflow as far as it got."""

    def __init__(self, message: str, run: RunResult) -> None:
        super().__init__(message)
        self.run = run


class UnscriptedActivityError(WorkflowTesterError):
    """The workflow sent an activity the tester has no script for."""

    def __init__(self, message: str, run: RunResult, activity: str) -> None:
        super().__init__(message, run)
        self.activity = activity


class WorkflowBlockedError(WorkflowTesterError):
    """The workflow waits for something that can never happen (an activity scripted to
    hang, a promise nothing completes, a signal nobody sends, with no timeout to give up
    on it)."""


class StepLimitError(WorkflowTesterError):
    """The run applied ``max_steps`` inputs without the workflow closing."""


# --- scripts -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How one attempt answers: its result (a value or a function), its failure, or
    nothing; when (ms after it was sent); and its heartbeats (ms after it was sent)."""

    kind: Kind
    value: Any = None
    failure: Failure | None = None
    after_ms: int = 0
    heartbeats: tuple[tuple[int, Payload | None], ...] = ()


class ActivityScript:
    """The scripted answers of one activity, one per attempt sent, in order.

    Each of :meth:`returns`, :meth:`fails` and :meth:`hangs` adds the answer of the next
    attempt (``times`` attempts with ``times=n``), counting every attempt of every step
    of this activity in the order the workflow sends them; once the script runs out, its
    last answer repeats. So ``.returns(x)`` answers every call, and
    ``.fails("Busy", retryable=True, times=2).returns(x)`` fails twice, then returns.
    Every method returns the script, so answers chain.

    ``after`` (seconds or timedelta, virtual) is how long the attempt takes before its
    answer arrives; ``heartbeats`` are ``(seconds after it was sent, details)`` pairs,
    each sent as the participant's ``ctx.heartbeat(details)`` would (details None: the
    latest details again, of this attempt or the task's).

    ``converter`` checks the scripted values as they are given (the tester's registry's
    converter, for scripts from :meth:`WorkflowTester.activity` and
    :meth:`WorkflowTester.child`).
    """

    __slots__ = ("_child", "_converter", "_outcomes", "name")

    def __init__(
        self, name: str, *, child: bool = False, converter: DataConverter = DEFAULT_CONVERTER
    ) -> None:
        if child:
            problem = signal_name_problem(name)
            problem = None if problem is None else problem.replace("a signal name", "a type")
        else:
            problem = activity_name_problem(name)
        if problem is not None:
            call = "tester.child" if child else "tester.activity"
            raise ConfigurationError(f"{call}({_shown(name)}): {problem}")
        self.name = f"{CHILD_SCRIPT}.{name}" if child else str.__str__(name)
        self._child = child
        self._converter = converter
        self._outcomes: list[_Outcome] = []

    def returns(
        self,
        value: Any = None,
        *,
        after: float | timedelta = 0,
        heartbeats: Iterable[tuple[float | timedelta, Any]] = (),
        times: int = 1,
    ) -> ActivityScript:
        """Answer with ``value``, or with ``value(argument, attempt)`` if it is callable
        (called when the attempt is sent, with the activity's decoded argument).

        Raises:
            ConfigurationError: ``value`` cannot be converted (and is not callable), or
                ``after``, ``heartbeats`` or ``times`` is invalid.
        """
        if not callable(value):
            self._json(value, "returns(value)")
        return self._add(
            _Outcome(
                "returns",
                value=value,
                after_ms=self._ms(after, "returns(after=...)"),
                heartbeats=self._heartbeats(heartbeats),
            ),
            times,
        )

    def fails(
        self,
        error_type: str,
        message: str = "",
        *,
        retryable: bool = False,
        retry_after: float | timedelta | None = None,
        after: float | timedelta = 0,
        heartbeats: Iterable[tuple[float | timedelta, Any]] = (),
        times: int = 1,
    ) -> ActivityScript:
        """Answer with a failure, as a handler raising ``ActivityFailure`` would.

        Args:
            error_type: what ``RetryPolicy.non_retryable_error_types`` matches and
                ``ActivityError.error_type`` shows: the participant's exception class name.
            message: the failure's message (default: ``error_type``).
            retryable: whether the workflow's retry policy may retry it. False by
                default, like ``ActivityFailure``; any other exception a real handler
                raises is retryable, so pass True to model a crash or an outage.
            retry_after: seconds (or timedelta) the participant asks to wait before the
                next attempt, instead of the policy's backoff (retryable failures only).

        Raises:
            ConfigurationError: an argument of the wrong type or out of range.
        """
        if not isinstance(error_type, str) or not error_type:
            raise ConfigurationError(
                f"{self._where('fails(error_type)')} must be a non-empty str, got "
                f"{_type_name(error_type)}"
            )
        if safe_text(error_type, MAX_NAME_CHARS) != error_type:
            raise ConfigurationError(
                f"{self._where('fails(error_type)')} must be at most {MAX_NAME_CHARS} "
                "characters of UTF-8 text without NUL"
            )
        if not isinstance(message, str):
            raise ConfigurationError(
                f"{self._where('fails(message)')} must be a str, got {_type_name(message)}"
            )
        if type(retryable) is not bool:
            raise ConfigurationError(
                f"{self._where('fails(retryable=...)')} must be a bool, got {_type_name(retryable)}"
            )
        wait_ms: int | None = None
        if retry_after is not None:
            if not retryable:
                raise ConfigurationError(
                    f"{self._where('fails(retry_after=...)')} needs retryable=True: "
                    "a failure that is not retried waits for nothing"
                )
            seconds = _checked_seconds(retry_after, self._where("fails(retry_after=...)"))
            wait_ms = math.ceil(seconds * 1000)  # as a participant rounds it
        failure = Failure(
            str.__str__(error_type),
            safe_text(message or error_type),
            retryable=retryable,
            retry_after_ms=wait_ms,
        )
        return self._add(
            _Outcome(
                "fails",
                failure=failure,
                after_ms=self._ms(after, "fails(after=...)"),
                heartbeats=self._heartbeats(heartbeats),
            ),
            times,
        )

    def hangs(
        self, *, heartbeats: Iterable[tuple[float | timedelta, Any]] = (), times: int = 1
    ) -> ActivityScript:
        """Never answer (a handler stuck on a call that never returns); only the step's
        timeouts, or a ``with_timeout`` in the workflow, move it on. Its heartbeats are
        still sent."""
        return self._add(_Outcome("hangs", heartbeats=self._heartbeats(heartbeats)), times)

    def _outcome(self, index: int) -> _Outcome | None:
        """The answer of the attempt sent ``index``-th (from 0); None without answers."""
        if not self._outcomes:
            return None
        return self._outcomes[min(index, len(self._outcomes) - 1)]

    def _add(self, outcome: _Outcome, times: int) -> ActivityScript:
        if type(times) is not int or times < 1:
            raise ConfigurationError(
                f"{self._where(f'{outcome.kind}(times=...)')} must be an int of at least 1, "
                f"got {times!r}"
            )
        self._outcomes.extend([outcome] * times)
        return self

    def _where(self, what: str) -> str:
        prefix = f"{CHILD_SCRIPT}."
        if self._child:
            return f"tester.child({self.name.removeprefix(prefix)!r}).{what}"
        return f"tester.activity({self.name!r}).{what}"

    def _ms(self, seconds: float | timedelta, what: str) -> int:
        return round(_checked_seconds(seconds, self._where(what)) * 1000)

    def _json(self, value: Any, what: str) -> Payload:
        try:
            return self._converter.to_payload(value)
        except Exception as exc:
            raise ConfigurationError(f"{self._where(what)}: {exc}") from exc

    def _heartbeats(
        self, heartbeats: Iterable[tuple[float | timedelta, Any]]
    ) -> tuple[tuple[int, Payload | None], ...]:
        if isinstance(heartbeats, str | bytes) or not isinstance(heartbeats, Iterable):
            raise ConfigurationError(
                f"{self._where('heartbeats')} takes (seconds, details) pairs, got "
                f"{_type_name(heartbeats)}"
            )
        beats: list[tuple[int, Payload | None]] = []
        for beat in heartbeats:
            if not isinstance(beat, tuple) or len(beat) != 2:
                raise ConfigurationError(
                    f"{self._where('heartbeats')} takes (seconds, details) pairs, got {beat!r}"
                )
            at, details = beat
            at_ms = self._ms(at, "heartbeats (seconds)")
            beats.append(
                (at_ms, None if details is None else self._json(details, "heartbeats (details)"))
            )
        return tuple(sorted(beats, key=lambda b: b[0]))


# --- results -----------------------------------------------------------------------------


@dataclass(slots=True)
class ActivityCall:
    """One attempt the workflow sent, as its participant received it.

    Attributes:
        name: ``'<participant>.<activity>'``.
        value: the decoded argument.
        attempt: 1 for the first attempt of the step, then 2, 3...
        seq: the step's number in the workflow.
        activity_id: the attempt's id, as participants dedupe on it.
        sent_at: virtual seconds after the workflow started.
        compensation: the step undoes an earlier one.
        heartbeat_details: the decoded details of the step's last heartbeat (of an earlier
            attempt) that came with the task; None if there were none.
        outcome: what the script answered: ``"returns"``, ``"fails"`` or ``"hangs"``.
        result: the result sent back, for ``"returns"`` (a callable's return value).
        ignored: why the engine ignored the answer, if it did (``"late-result"``: it came
            after the attempt had timed out; ``"workflow-closed"`` is never recorded, the
            run ends when the workflow closes).
    """

    name: str
    value: Any
    attempt: int
    seq: int
    activity_id: str
    sent_at: float
    compensation: bool
    heartbeat_details: Any
    outcome: Kind
    result: Any = None
    ignored: str | None = None

    def line(self) -> str:
        """``+60s inventory.release#1 (compensation) -> returns``, for messages."""
        comp = " (compensation)" if self.compensation else ""
        ignored = f" (ignored: {self.ignored})" if self.ignored else ""
        return f"+{self.sent_at:g}s {self.name}#{self.attempt}{comp} -> {self.outcome}{ignored}"


@dataclass(frozen=True, slots=True)
class Answer:
    """What a query or update sent by the tester got back.

    ``kind`` is ``query`` or ``update``; ``at`` the virtual seconds after the start it
    arrived; ``ok`` with ``value`` (the handler's JSON answer), else ``failure``
    (``UnknownQuery``, ``UpdateRejected``, the class of what the handler raised, ...).
    """

    kind: str
    name: str
    at: float
    ok: bool
    value: Any
    failure: Failure | None


@dataclass(frozen=True, slots=True, repr=False)
class RunResult:
    """A tested workflow as the run left it.

    Attributes:
        workflow_id: the id it ran under.
        workflow_type: its registered type.
        status: ``COMPLETED``, ``FAILED``, ``COMPENSATED``, ``COMPENSATION_FAILED``,
            ``STUCK``; ``RUNNING`` only in the ``run`` of a :class:`WorkflowTesterError`.
        result: the workflow's return value (None unless COMPLETED), converted to the
            return type hint of the workflow function.
        failure: why it failed or is stuck (``failure.error_type``, ``.message``).
        record: the final ``WorkflowRecord``, as decoded from its Avro encoding.
        calls: every attempt sent to a participant, in the order sent.
        started_at: the virtual start, epoch seconds (``ctx.now()`` at the start).
        elapsed: virtual seconds from the start to the end of the run.
        steps: inputs applied (start, answers, start reports, heartbeats, wake-ups).
        answers: what each query and update sent with :meth:`WorkflowTester.query` and
            :meth:`WorkflowTester.update` got, in the order they arrived.
        earlier_runs: the closing records of the runs that continued as new
            (``CONTINUED_AS_NEW``), oldest first; ``record`` is the last run's.
    """

    workflow_id: str
    workflow_type: str
    status: WorkflowStatus
    result: Any
    failure: Failure | None
    record: WorkflowRecord
    calls: tuple[ActivityCall, ...]
    started_at: float
    elapsed: float
    steps: int
    answers: tuple[Answer, ...] = ()
    earlier_runs: tuple[WorkflowRecord, ...] = ()

    def answers_to(self, name: str) -> list[Answer]:
        """The answers of the queries and updates named ``name``, in order."""
        return [answer for answer in self.answers if answer.name == name]

    @property
    def history(self) -> tuple[HistoryEvent, ...]:
        """The workflow's history events."""
        return self.record.events

    @property
    def error_type(self) -> str | None:
        """``failure.error_type``, or None without a failure."""
        return None if self.failure is None else self.failure.error_type

    def calls_to(self, name: str) -> list[ActivityCall]:
        """The attempts of activity ``name`` sent, in order."""
        return [call for call in self.calls if call.name == name]

    def __repr__(self) -> str:
        failure = "" if self.failure is None else f", {self.error_type}: {self.failure.message}"
        lines = [
            f"RunResult({self.workflow_type} {self.workflow_id!r}: {self.status.value} after "
            f"{self.elapsed:g} s virtual{failure}",
            *(f"  {call.line()}" for call in self.calls),
        ]
        return "\n".join(lines) + ")"

    __str__ = __repr__


# --- the tester ----------------------------------------------------------------------------


class WorkflowTester:
    """Runs workflows of ``registry`` (default: the default registry) in-process.

    Args:
        registry: the workflows to test.
        max_history_events: the orchestrator's ``SAGALINE_MAX_HISTORY_EVENTS``.
        max_record_bytes: the orchestrator's ``SAGALINE_MAX_RECORD_BYTES``.
        max_steps: inputs one run may apply before it stops with :class:`StepLimitError`.

    Script activities with :meth:`activity`, then :meth:`run`. One tester may run many
    times; every run starts its scripts from their first answer.
    """

    def __init__(
        self,
        registry: WorkflowRegistry | None = None,
        *,
        max_history_events: int = DEFAULT_MAX_HISTORY_EVENTS,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        max_steps: int = DEFAULT_MAX_STEPS,
    ) -> None:
        if registry is not None and not isinstance(registry, WorkflowRegistry):
            raise ConfigurationError(
                f"WorkflowTester(registry) takes a WorkflowRegistry or None, got "
                f"{_type_name(registry)}"
            )
        if type(max_steps) is not int or max_steps < 1:
            raise ConfigurationError(f"max_steps must be a positive int, got {max_steps!r}")
        self.registry = default_registry if registry is None else registry
        self.limits = Limits(
            max_events=max_history_events,
            max_record_bytes=max_record_bytes,
            measure=_measure,
        )
        self.max_steps = max_steps
        self._scripts: dict[str, ActivityScript] = {}
        # Signals to send: (ms after the start, name, value); promise answers per name:
        # (ms after the promise is made, value or failure), one per promise made.
        self._signals: list[tuple[int, str, Any]] = []
        self._promises: dict[str, list[tuple[int, Any, Failure | None]]] = {}
        # Queries and updates to send: (ms after the start, "query" or "update", name, value).
        self._requests: list[tuple[int, str, str, Any]] = []

    def query(self, name: str, value: Any = None, *, at: float | timedelta = 0) -> None:
        """Ask query ``name`` (with ``value``) of every run, ``at`` seconds (virtual) after
        its start; the answer is in ``RunResult.answers``. A query changes nothing.

        Raises:
            ConfigurationError: an invalid name, or ``at`` not 0 to 100 years.
        """
        self._request("query", name, value, at)

    def update(self, name: str, value: Any = None, *, at: float | timedelta = 0) -> None:
        """Send update ``name`` (with ``value``) to every run, ``at`` seconds (virtual)
        after its start; the answer is in ``RunResult.answers``.

        Raises:
            ConfigurationError: an invalid name, or ``at`` not 0 to 100 years.
        """
        self._request("update", name, value, at)

    def _request(self, kind: str, name: str, value: Any, at: float | timedelta) -> None:
        problem = signal_name_problem(name)
        if problem is not None:
            raise ConfigurationError(f"tester.{kind}({_shown(name)}): {problem}")
        delay = _checked_seconds(at, f"tester.{kind}(at=...)")
        self._requests.append((round(delay * 1000), kind, name, value))

    def signal(self, name: str, value: Any = None, *, at: float | timedelta = 0) -> None:
        """Send the signal ``name`` with ``value`` to every run, ``at`` seconds (virtual)
        after its start; signals of one instant arrive in the order given.

        Raises:
            ConfigurationError: an invalid name, or ``at`` not 0 to 100 years.
        """
        problem = signal_name_problem(name)
        if problem is not None:
            raise ConfigurationError(f"tester.signal({_shown(name)}): {problem}")
        delay = _checked_seconds(at, "tester.signal(at=...)")
        self._signals.append((round(delay * 1000), name, value))

    def complete_promise(
        self, name: str, value: Any = None, *, after: float | timedelta = 0
    ) -> None:
        """Complete the next promise named ``name`` the workflow makes with ``value``,
        ``after`` seconds (virtual) after it is made. Each call answers one promise."""
        self._promise_answer(name, after, value, None)

    def fail_promise(
        self, name: str, error_type: str, message: str = "", *, after: float | timedelta = 0
    ) -> None:
        """Fail the next promise named ``name`` the workflow makes (its await raises
        ``PromiseFailedError``), ``after`` seconds (virtual) after it is made."""
        self._promise_answer(name, after, None, Failure(error_type, message))

    def _promise_answer(
        self, name: str, after: float | timedelta, value: Any, failure: Failure | None
    ) -> None:
        problem = signal_name_problem(name)
        if problem is not None:
            raise ConfigurationError(f"promise name {_shown(name)}: {problem}")
        delay = _checked_seconds(after, "after=...")
        self._promises.setdefault(name, []).append((round(delay * 1000), value, failure))

    def activity(self, name: str) -> ActivityScript:
        """A new script for activity ``name`` (``'<participant>.<activity>'``); it
        replaces any script given before for that name (a fixture's default, say).

        Raises:
            ConfigurationError: ``name`` is not a valid activity name.
        """
        script = ActivityScript(name, converter=self.registry.converter)
        self._scripts[script.name] = script
        return script

    def child(self, workflow_type: str) -> ActivityScript:
        """A script for the child workflows of type ``workflow_type`` the workflow starts
        (``ctx.child_workflow``): what each returns or how it fails, as for an activity
        (``.returns``, ``.fails``, ``.hangs``). A failure reaches the workflow as the
        orchestrator reports a failed child: ``ChildWorkflowError`` with error type
        ``ChildWorkflowFailed``, the scripted error type and message in its message. Calls
        show up as ``child.<workflow_type>``.

        Raises:
            ConfigurationError: ``workflow_type`` is not 1-200 characters of text.
        """
        script = ActivityScript(workflow_type, child=True, converter=self.registry.converter)
        self._scripts[script.name] = script
        return script

    def run(
        self,
        workflow_type: str,
        input: Any = None,
        *,
        workflow_id: str = DEFAULT_WORKFLOW_ID,
        start_at: float | datetime | None = None,
    ) -> RunResult:
        """Start ``workflow_type`` with ``input`` and run it until it closes or is STUCK.

        Args:
            workflow_type: a type registered in the tester's registry.
            input: the workflow's JSON input.
            workflow_id: the id it runs under.
            start_at: the virtual start, epoch seconds or an aware datetime; default
                :data:`DEFAULT_START`.

        Returns:
            The workflow's status, result, failure, record and the activity calls.

        Raises:
            ConfigurationError: the type is not registered, or ``start_at`` is invalid.
            UnscriptedActivityError: the workflow sent an activity with no script.
            WorkflowBlockedError: the workflow waits on an activity scripted to hang that
                nothing will ever time out.
            StepLimitError: ``max_steps`` inputs did not close the workflow.
            PayloadEncodingError: ``input``, or a callable script's result, is not JSON.
        """
        if not isinstance(workflow_type, str) or self.registry.get(workflow_type) is None:
            names = ", ".join(repr(n) for n in sorted(self.registry.names())) or "none"
            raise ConfigurationError(
                f"workflow type {_shown(workflow_type)} is not registered in the tester's "
                f"registry (registered: {names})"
            )
        if not isinstance(workflow_id, str) or not workflow_id:
            raise ConfigurationError(
                f"workflow_id must be a non-empty str, got {_type_name(workflow_id)}"
            )
        return _Run(self, workflow_type, workflow_id, _start_ms(start_at)).go(input)


def _engine_wake(record: WorkflowRecord) -> int | None:
    """When the engine has something due for ``record``: its ``wake_at_ms``, less a
    local activity's pending attempt (the orchestrator's runtime runs those; here the
    tester does, or their script answers)."""
    wake = record.wake_at_ms
    if wake is None or record.status is not WorkflowStatus.RUNNING:
        return wake
    due = [d.at_ms for d in dues(scan(record.events)) if d.kind != LOCAL]
    return min(due) if due else None


def _running(record: WorkflowRecord) -> set[str]:
    """Activity ids of the attempts ``record`` waits on."""
    if record.status is not WorkflowStatus.RUNNING:
        return set()
    return {task.activity_id for task in pending_tasks(record)}


@cache
def _codec() -> AvroCodec:
    return AvroCodec()


def _measure(record: WorkflowRecord) -> int:
    """What the orchestrator's size check measures: the encoded record and its key."""
    return len(_codec().encode_workflow(record)) + len(record.workflow_id.encode())


def _start_ms(start_at: float | datetime | None) -> int:
    if start_at is None:
        start_at = DEFAULT_START
    if isinstance(start_at, datetime):
        if start_at.utcoffset() is None:
            raise ConfigurationError(
                "run(start_at=...) takes a timezone-aware datetime, got a naive one; "
                "write datetime(..., tzinfo=timezone.utc)"
            )
        seconds = start_at.timestamp()
    else:
        seconds = _checked_number(start_at, "run(start_at=...)")
    if not 0 <= seconds <= MAX_EPOCH_S:
        raise ConfigurationError(
            f"run(start_at=...) must be between 0 and {MAX_EPOCH_S} epoch seconds (the year "
            f"9999), got {seconds:g}"
        )
    return round(seconds * 1000)


@dataclass(slots=True)
class _Run:
    """One workflow driven through the engine, as the orchestrator and participants would."""

    tester: WorkflowTester
    workflow_type: str
    workflow_id: str
    start_ms: int
    now_ms: int = 0
    record: WorkflowRecord | None = None
    steps: int = 0
    calls: list[ActivityCall] = field(default_factory=list)
    # Inputs waiting to arrive: (virtual time, order sent, input).
    queue: list[tuple[int, int, InboxBody]] = field(default_factory=list)
    # Local activities' attempts sent and not run yet, in order.
    local_tasks: list[tuple[ActivityTask, str]] = field(default_factory=list)
    local_runner: LocalRunner | None = None
    order: itertools.count[int] = field(default_factory=itertools.count)
    # By activity id: a run that continued as new reuses step numbers, not ids.
    sent: dict[str, ActivityCall] = field(default_factory=dict)
    earlier_runs: list[WorkflowRecord] = field(default_factory=list)
    used: dict[str, int] = field(default_factory=dict)
    promised: set[int] = field(default_factory=set)
    promise_uses: dict[str, int] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)
    asked: dict[str, str] = field(default_factory=dict)

    def go(self, value: Any) -> RunResult:
        self.now_ms = self.start_ms
        convert = self.tester.registry.converter.to_payload
        start = StartWorkflow(self.workflow_id, self.workflow_type, convert(value), self.now_ms)
        for index, (offset, name, signal_value) in enumerate(self.tester._signals):
            at = self.start_ms + offset
            self.queue_input(
                at,
                SignalWorkflow(
                    self.workflow_id, name, convert(signal_value), f"test-signal-{index}", at
                ),
            )
        for index, (offset, kind, name, request_value) in enumerate(self.tester._requests):
            at = self.start_ms + offset
            request_id = f"test-{kind}-{index}"
            self.asked[request_id] = name
            args = convert(request_value)
            request: InboxBody = (
                QueryWorkflow(self.workflow_id, request_id, name, args, at)
                if kind == "query"
                else UpdateWorkflow(self.workflow_id, request_id, name, args, at)
            )
            self.queue_input(at, request)
        # The run's kept coroutine is closed at its end, within its test, not in a later
        # one (all runs share the test ids); code that will not stop then is its outcome.
        cache, key = self.tester.registry.replay_cache, (self.workflow_id, RUN_ID)
        try:
            result = self._go(start)
        except BaseException:
            cache.drop(key)
            raise
        finally:
            if self.local_runner is not None:
                self.local_runner.close()
        if not cache.drop(key):
            raise WorkflowTesterError(KEEPS_RUNNING, result)
        return result

    def _go(self, start: StartWorkflow) -> RunResult:
        self.apply(start, self.now_ms)
        while self.current.status is WorkflowStatus.RUNNING:
            if self.local_tasks:
                # As in the orchestrator: a local step runs, and its outcome is applied,
                # before any other input, one step at a time.
                task, name = self.local_tasks.pop(0)
                if task.activity_id in _running(self.current):
                    self.apply(self.run_local(task, name), self.now_ms)
                continue
            due = self.queue[0][0] if self.queue else None
            wake = _engine_wake(self.current)
            if due is None and wake is None:
                raise WorkflowBlockedError(self.blocked(), self.result())
            # An answer due at the same instant as a timeout arrives first.
            if due is not None and (wake is None or due <= wake):
                at, _, body = heapq.heappop(self.queue)
                self.apply(body, at)
            else:
                assert wake is not None
                self.apply(WakeUp(self.workflow_id), wake)
        return self.result()

    @property
    def current(self) -> WorkflowRecord:
        assert self.record is not None, "the start always makes a record"
        return self.record

    def apply(self, body: InboxBody | WakeUp, at_ms: int) -> None:
        self.steps += 1
        if self.steps > self.tester.max_steps:
            raise StepLimitError(
                f"workflow {self.workflow_type!r} ({self.workflow_id!r}) did not close within "
                f"{self.tester.max_steps} inputs (max_steps), at +{self.seconds():g} s virtual; "
                "a loop that never ends? History so far is in .run.record",
                self.result(),
            )
        self.now_ms = max(self.now_ms, at_ms)
        codec = _codec()
        if not isinstance(body, WakeUp):
            body = codec.decode_inbox(codec.encode_inbox(body))  # as read from the inbox
        if isinstance(body, QueryWorkflow):
            self.answered(answer_query(self.record, body, self.now_ms, self.tester.registry))
            return
        transition = advance(
            self.record,
            body,
            self.now_ms,
            self.tester.registry,
            self.tester.limits,
            run_id=RUN_ID,
        )
        if transition.reply is not None and isinstance(body, UpdateWorkflow):
            self.answered(transition.reply)
        if transition.record is None:
            self.note_ignored(body, transition.ignored)
            return
        record = codec.decode_workflow(codec.encode_workflow(transition.record))
        if record != transition.record:
            self.record = transition.record
            raise WorkflowTesterError(
                f"workflow {self.workflow_id!r}: its record does not survive the Avro round "
                f"trip unchanged\n  in memory: {transition.record}\n  decoded:   {record}",
                self.result(),
            )
        if transition.replaced is not None:
            # The run continued as new: the next run's promises are its own.
            self.earlier_runs.append(transition.replaced)
            self.promised.clear()
        self.record = record
        for task in transition.tasks:
            self.send(codec.decode_task(codec.encode_task(task)))
        for message in transition.messages:
            if isinstance(message, StartWorkflow) and message.parent is not None:
                # A child workflow: its script answers as a participant would.
                self.send(
                    ActivityTask(
                        workflow_id=self.workflow_id,
                        workflow_type=self.workflow_type,
                        activity_id=activity_id(
                            self.workflow_id, message.parent.seq, 1, record.run_id
                        ),
                        seq=message.parent.seq,
                        attempt=1,
                        participant=CHILD_SCRIPT,
                        activity=message.workflow_type,
                        payload=message.input,
                        scheduled_at_ms=self.now_ms,
                    )
                )
        self.answer_promises(record)

    def answered(self, reply: Reply) -> None:
        reply = _codec().decode_reply(_codec().encode_reply(reply))  # as a caller reads it
        converter = self.tester.registry.converter
        value = None if reply.payload is None else converter.from_payload(reply.payload)
        self.answers.append(
            Answer(
                reply.kind.value.lower(),
                self.asked.get(reply.request_id, ""),
                self.seconds(),
                reply.ok,
                value,
                reply.failure,
            )
        )

    def note_ignored(self, body: InboxBody | WakeUp, reason: str | None) -> None:
        if isinstance(body, WakeUp):
            # The loop wakes the workflow only when its wake_at_ms says something is due.
            raise WorkflowTesterError(
                f"workflow {self.workflow_id!r}: the engine ignored the WakeUp due at "
                f"+{self.seconds():g} s ({reason}); this is a bug in sagaline",
                self.result(),
            )
        if isinstance(body, ActivityResult):
            call = self.sent.get(body.activity_id)
            if call is not None:
                call.ignored = reason

    def send(self, task: ActivityTask) -> None:
        """Hand ``task`` to its script: queue its start report, heartbeats and answer."""
        name = f"{task.participant}.{task.activity}"
        script = self.tester._scripts.get(name)
        if script is None and task.participant == LOCAL_PARTICIPANT:
            self.local_tasks.append((task, name))
            return
        index = self.used.get(name, 0)
        self.used[name] = index + 1
        outcome = None if script is None else script._outcome(index)
        if outcome is None:
            scripted = ", ".join(repr(n) for n in sorted(self.tester._scripts)) or "none"
            missing = "has no script for" if script is None else "has a script without answers for"
            child = task.participant == CHILD_SCRIPT
            what = "child workflow" if child else "activity"
            add = f"tester.child({task.activity!r})" if child else f"tester.activity({name!r})"
            raise UnscriptedActivityError(
                f"workflow {self.workflow_type!r} ({self.workflow_id!r}) sent {what} "
                f"{name!r} (step {task.seq}, attempt {task.attempt}) at +{self.seconds():g} s, "
                f"which the tester {missing} (scripted: {scripted}); add "
                f"{add}.returns(...), .fails(...) or .hangs()",
                self.result(),
                name,
            )
        converter = self.tester.registry.converter
        value = converter.from_payload(task.payload)
        details = (
            None
            if task.heartbeat_details is None
            else converter.from_payload(task.heartbeat_details)
        )
        call = self.record_call(task, name, value, details, outcome.kind)
        wid, aid, now = task.workflow_id, task.activity_id, self.now_ms
        if task.report_start:
            self.queue_input(now, ActivityStarted(wid, aid, task.seq, task.attempt, now))
        latest = task.heartbeat_details  # a heartbeat without details repeats the latest
        for offset, beat in outcome.heartbeats:
            at, latest = now + offset, latest if beat is None else beat
            self.queue_input(at, ActivityHeartbeat(wid, aid, task.seq, task.attempt, at, latest))
        if outcome.kind == "hangs":
            return
        done = now + outcome.after_ms
        payload = None
        if outcome.kind == "returns":
            answer_with = outcome.value
            call.result = answer_with(value, task.attempt) if callable(answer_with) else answer_with
            payload = converter.to_payload(call.result)
        failure = outcome.failure
        if failure is not None and task.participant == CHILD_SCRIPT:
            # As the child's orchestrator reports it: how it ended, in the message.
            failure = Failure(
                CHILD_FAILED,
                f"child workflow of type {safe_text(task.activity, MAX_NAME_CHARS)!r} ended "
                f"FAILED: {failure.error_type}: {failure.message}",
            )
        answer = ActivityResult(
            workflow_id=wid,
            activity_id=aid,
            seq=task.seq,
            attempt=task.attempt,
            status=ActivityStatus.COMPLETED if payload is not None else ActivityStatus.FAILED,
            finished_at_ms=done,
            result=payload,
            failure=failure,
        )
        self.queue_input(done, answer)

    def record_call(
        self, task: ActivityTask, name: str, value: Any, details: Any, kind: Kind
    ) -> ActivityCall:
        """Note the attempt ``task`` as sent, answered the ``kind`` way."""
        call = ActivityCall(
            name=name,
            value=value,
            attempt=task.attempt,
            seq=task.seq,
            activity_id=task.activity_id,
            sent_at=self.seconds(),
            compensation=task.compensation,
            heartbeat_details=details,
            outcome=kind,
        )
        self.calls.append(call)
        self.sent[task.activity_id] = call
        return call

    def run_local(self, task: ActivityTask, name: str) -> ActivityResult:
        """Run an unscripted local activity's handler from the registry, as the
        orchestrator does, with outcomes on the virtual clock. Always on the runner's
        worker thread (``inline`` ignored), so an async handler gets an event loop even
        when the test itself runs in one."""
        if self.local_runner is None:
            self.local_runner = LocalRunner(
                self.tester.registry.local_activities, now_ms=lambda: self.now_ms
            )
        result = self.local_runner.run(task)
        converter = self.tester.registry.converter
        try:
            value = converter.from_payload(task.payload)
        except Exception:  # the handler's outcome already says what was wrong with it
            value = None
        done = result.status is ActivityStatus.COMPLETED
        call = self.record_call(task, name, value, None, "returns" if done else "fails")
        if result.result is not None:
            call.result = converter.from_payload(result.result)
        return result

    def answer_promises(self, record: WorkflowRecord) -> None:
        """Queue the scripted answer of every promise the record made that has none yet."""
        for event in record.events:
            if type(event) is not PromiseCreated or event.seq in self.promised:
                continue
            self.promised.add(event.seq)
            answers = self.tester._promises.get(event.name, [])
            index = self.promise_uses.get(event.name, 0)
            self.promise_uses[event.name] = index + 1
            if index >= len(answers):
                continue  # nothing completes it: the run may block on it
            after, value, failure = answers[index]
            at = self.now_ms + after
            pid = promise_id(self.workflow_id, record.run_id, event.seq)
            payload = (
                None if failure is not None else self.tester.registry.converter.to_payload(value)
            )
            self.queue_input(at, CompletePromise(self.workflow_id, pid, at, payload, failure))

    def queue_input(self, at_ms: int, body: InboxBody) -> None:
        heapq.heappush(self.queue, (at_ms, next(self.order), body))

    def seconds(self) -> float:
        return (self.now_ms - self.start_ms) / 1000

    def blocked(self) -> str:
        """What the workflow waits on that will never come."""
        record = self.current
        waits: list[str] = []
        for task in pending_tasks(record):
            call = self.sent.get(task.activity_id)
            participant = task.participant or CHILD_SCRIPT  # a child step has none
            name = f"{participant}.{task.activity}"
            what = f"step {task.seq} {name!r} attempt {task.attempt}"
            if call is not None and call.ignored is not None:
                waits.append(f"{what}, whose answer the engine ignored ({call.ignored})")
            else:
                waits.append(f"{what}, which the tester scripted to hang")
        completed = {e.seq for e in record.events if type(e) is PromiseCompleted}
        for event in record.events:
            if type(event) is PromiseCreated and event.seq not in completed:
                waits.append(
                    f"promise {event.name!r} (step {event.seq}), which nothing completes "
                    f"(tester.complete_promise({event.name!r}, ...))"
                )
        waiting = "; ".join(waits) or (
            "nothing that is running (no activity, timer, retry or promise): a signal? "
            "(tester.signal(name, value, at=...))"
        )
        return (
            f"workflow {self.workflow_type!r} ({self.workflow_id!r}) can never finish: at "
            f"+{self.seconds():g} s virtual it waits on {waiting}, and nothing is due to wake "
            "it (no schedule_to_close, start_to_close or heartbeat_timeout gives up on the "
            "step, no timer is set). Script an answer (.returns/.fails) or give the step a "
            "timeout"
        )

    def result(self) -> RunResult:
        record = self.current
        value = None
        if record.status is WorkflowStatus.COMPLETED and record.result is not None:
            fn = self.tester.registry.get(self.workflow_type)
            hint = Any if fn is None else return_hint(fn)
            value = self.tester.registry.converter.from_payload(record.result, hint)
        return RunResult(
            workflow_id=self.workflow_id,
            workflow_type=self.workflow_type,
            status=record.status,
            result=value,
            failure=record.failure,
            record=record,
            calls=tuple(self.calls),
            started_at=self.start_ms / 1000,
            elapsed=self.seconds(),
            steps=self.steps,
            answers=tuple(self.answers),
            earlier_runs=tuple(self.earlier_runs),
        )


__all__ = [
    "DEFAULT_MAX_HISTORY_EVENTS",
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_MAX_STEPS",
    "DEFAULT_START",
    "DEFAULT_WORKFLOW_ID",
    "RUN_ID",
    "ActivityCall",
    "ActivityScript",
    "Answer",
    "RunResult",
    "StepLimitError",
    "UnscriptedActivityError",
    "WorkflowBlockedError",
    "WorkflowStatus",
    "WorkflowTester",
    "WorkflowTesterError",
]
