"""Runs workflow code forward from its recorded history, deterministically.

Rules of this module:
- It knows the workflow function, the history events and nothing else: no Kafka, no
  clock, no randomness. Time is the ``at_ms`` of the recorded events.
- Every ``ctx.activity`` call gets the next sequence number. A call whose number is in
  history must match the recorded name; a call beyond the recorded steps is new. A
  recorded step the code no longer reaches is non-determinism too.
- Recorded outcomes are delivered in history order, running the code between them, so a
  race between steps replays the way it first ran.
- Workflow code can do anything; nothing it does escapes from here. An ordinary
  ``Exception`` out of the function is the workflow's own failure. What shows that the
  code is wrong is a *problem* that parks the workflow: non-determinism, a BaseException
  that is not an Exception, asyncio, ctx calls with invalid arguments, sagaline's own
  ConfigurationError or WorkflowDefinitionError. A problem is noted before anything is
  raised into the code, and the first one wins, so catching cannot hide it.
- Closing a suspended coroutine runs its ``finally`` blocks; whatever they do is ignored.
"""

from __future__ import annotations

import contextlib
import types
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from orchestrator.errors import (
    ActivityError,
    ConfigurationError,
    HistoryLimitExceededError,
    RecordTooLargeError,
    WorkflowDefinitionError,
)
from orchestrator.protocol.failures import MAX_NAME_CHARS, describe, safe_text
from orchestrator.protocol.payloads import PayloadEncodingError, decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    Failure,
    HistoryEvent,
    Payload,
)
from orchestrator.replay.guard import (
    ADVICE,
    AsyncioMisuse,
    LoopGuard,
    describe_asyncio_error,
    describe_await,
    installed,
)
from orchestrator.workflow import ActivityHandle, RetryPolicy, WorkflowContext, WorkflowFn

NONDETERMINISM: Final = "NonDeterminismError"
DEFINITION: Final = "WorkflowDefinitionError"
# A coroutine that swallows GeneratorExit and awaits again is closed again, this often.
_CLOSE_ATTEMPTS: Final = 8
# Coroutines that refused to stop; a few are kept so their code does not run during gc.
_UNSTOPPABLE: Final[deque[Coroutine[Any, Any, Any]]] = deque(maxlen=64)
_FAILURES: Final[dict[str, type[ActivityError]]] = {
    RecordTooLargeError.ERROR_TYPE: RecordTooLargeError,
    HistoryLimitExceededError.ERROR_TYPE: HistoryLimitExceededError,
}


@dataclass(slots=True)
class ReplayResult:
    """What running the code over its history produced.

    ``problem`` set: the code is wrong; park the workflow with it (``new_steps`` is empty).
    Else ``finished`` with ``error`` (the workflow failed) or ``value`` and its ``payload``
    (``payload_error`` when the value is not JSON), or still waiting with ``new_steps``.
    """

    new_steps: list[ActivityScheduled] = field(default_factory=list)
    finished: bool = False
    value: Any = None
    payload: Payload | None = None
    payload_error: str | None = None
    error: BaseException | None = None
    problem: Failure | None = None


def final_outcomes(events: tuple[HistoryEvent, ...]) -> list[HistoryEvent]:
    """The events that settle a step: completions, and failures with no retry after them."""
    retried = {
        (e.seq, e.attempt - 1) for e in events if isinstance(e, ActivityScheduled) and e.attempt > 1
    }
    return [
        e
        for e in events
        if isinstance(e, ActivityCompleted)
        or (isinstance(e, ActivityFailed) and (e.seq, e.attempt) not in retried)
    ]


class _Replayer:
    """Implements the context's scheduler during one replay."""

    def __init__(self, events: tuple[HistoryEvent, ...], started_at_ms: int) -> None:
        self.recorded: dict[int, ActivityScheduled] = {}
        for event in events:
            if isinstance(event, ActivityScheduled) and event.attempt == 1:
                self.recorded[event.seq] = event
        self.handles: dict[int, ActivityHandle] = {}
        self.new_steps: list[ActivityScheduled] = []
        self.next_seq = 0
        self.closing = False
        self.clock_ms = started_at_ms
        self.problem: Failure | None = None

    def schedule(
        self, name: str, value: Any, retry: RetryPolicy, compensation: bool
    ) -> ActivityHandle:
        if self.closing or self.problem is not None:
            # finally blocks run while the engine closes a blocked coroutine, and nothing a
            # parked workflow asks for is kept: not real steps.
            return ActivityHandle(-1, name)
        seq = self.next_seq
        self.next_seq += 1
        handle = ActivityHandle(seq, name)
        self.handles[seq] = handle
        recorded = self.recorded.get(seq)
        if recorded is not None:
            if recorded.name != name or recorded.compensation != compensation:
                self.flag(
                    NONDETERMINISM,
                    f"step {seq} is {_describe(name, compensation)} in the code but "
                    f"{_describe(recorded.name, recorded.compensation)} in history",
                )
            return handle
        try:
            payload = encode_json(value)
        except Exception as exc:  # RecursionError and user __iter__ failures too
            handle.reject(
                exc
                if isinstance(exc, PayloadEncodingError)
                else PayloadEncodingError(f"value is not JSON-serialisable: {describe(exc)}")
            )
            return handle
        self.new_steps.append(
            ActivityScheduled(
                seq=seq,
                attempt=1,
                name=name,
                payload=payload,
                at_ms=self.clock_ms,
                compensation=compensation,
                max_attempts=retry.max_attempts,
                non_retryable=retry.non_retryable_error_types,
            )
        )
        return handle

    def now_ms(self) -> int:
        return self.clock_ms

    def misuse(self, message: str) -> None:
        self.flag(DEFINITION, message)

    def flag(self, error_type: str, message: str) -> None:
        """Note why the workflow must park; the first reason wins, closing notes nothing."""
        if not self.closing:
            self.note(error_type, message)

    def note(self, error_type: str, message: str) -> None:
        """Note why the workflow must park unless a reason is known; the engine's own checks."""
        if self.problem is None:
            self.problem = Failure(error_type, safe_text(message))


def _describe(name: str, compensation: bool) -> str:
    return f"compensation {name!r}" if compensation else f"activity {name!r}"


def replay(
    fn: WorkflowFn,
    workflow_id: str,
    workflow_type: str,
    input_value: Any,
    events: tuple[HistoryEvent, ...],
    started_at_ms: int,
) -> ReplayResult:
    """Run ``fn`` over ``events`` and report new steps, completion or a problem.

    Never raises for anything the workflow code does.
    """
    replayer = _Replayer(events, started_at_ms)
    outcome = ReplayResult()
    with installed(LoopGuard(replayer.misuse)):
        coro = _create(fn, WorkflowContext(workflow_id, workflow_type, replayer), input_value)
        if isinstance(coro, str):
            replayer.flag(DEFINITION, coro)
        else:
            try:
                _drive(coro, replayer, outcome, events)
            finally:
                # From here on, whatever the coroutine still runs (finally blocks now, or
                # at garbage collection if it refuses to stop) schedules nothing real.
                replayer.closing = True
                if not _close(coro):
                    replayer.note(
                        DEFINITION,
                        "workflow code keeps running after the engine closed it: it catches "
                        "GeneratorExit (a bare except or except BaseException) and awaits "
                        "again; let GeneratorExit propagate",
                    )
        if outcome.finished and outcome.error is None and replayer.problem is None:
            _encode_result(outcome, replayer)
    if replayer.problem is None:
        missing = sorted(set(replayer.recorded) - set(replayer.handles))
        if missing:
            seq = missing[0]
            replayer.note(
                NONDETERMINISM,
                f"history holds step {seq} ({replayer.recorded[seq].name!r}) "
                "that the code no longer schedules",
            )
    if replayer.problem is not None:
        outcome.problem = replayer.problem
        outcome.new_steps = []
        return outcome
    outcome.new_steps = list(replayer.new_steps)
    return outcome


def _create(
    fn: WorkflowFn, ctx: WorkflowContext, input_value: Any
) -> Coroutine[Any, Any, Any] | str:
    """The workflow's coroutine, or why it could not be made."""
    try:
        coro: object = fn(ctx, input_value)
    except BaseException as exc:  # a signature that does not take (ctx, input), a wrapper
        return f"calling the workflow function failed: {describe(exc)}"
    if type(coro) is not types.CoroutineType:
        return f"the workflow function returned {_type_name(coro)}, not a coroutine"
    return coro


def _drive(
    coro: Coroutine[Any, Any, Any],
    replayer: _Replayer,
    outcome: ReplayResult,
    events: tuple[HistoryEvent, ...],
) -> None:
    attempts = {e.seq: e.attempt for e in events if isinstance(e, ActivityScheduled)}
    _step(coro, replayer, outcome)
    for event in final_outcomes(events):
        if outcome.finished or replayer.problem is not None:
            return
        handle = replayer.handles.get(event.seq)
        if handle is None:
            name = replayer.recorded[event.seq].name if event.seq in replayer.recorded else "?"
            replayer.flag(
                NONDETERMINISM,
                f"history settles step {event.seq} ({name!r}) before the code schedules it",
            )
            return
        replayer.clock_ms = event.at_ms
        if isinstance(event, ActivityCompleted):
            try:
                handle.resolve(decode_json(event.result))
            except Exception as exc:  # not JSON, or nested past the recursion limit
                handle.reject(
                    exc
                    if isinstance(exc, PayloadEncodingError)
                    else PayloadEncodingError(f"result is not readable JSON: {describe(exc)}")
                )
        else:
            assert isinstance(event, ActivityFailed)
            failure = event.failure
            error = _FAILURES.get(failure.error_type, ActivityError)
            handle.reject(
                error(
                    handle.name,
                    failure.error_type,
                    failure.message,
                    attempts=attempts.get(event.seq, event.attempt),
                    effects_committed=failure.effects_committed,
                )
            )
        _step(coro, replayer, outcome)


def _step(coro: Coroutine[Any, Any, Any], replayer: _Replayer, outcome: ReplayResult) -> None:
    """Resume the workflow until it blocks on an unsettled step or finishes."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        outcome.finished, outcome.value = True, stop.value
        return
    except BaseException as exc:  # nothing workflow code raises may escape
        problem = _problem(exc)
        if problem is None:
            outcome.finished, outcome.error = True, exc
        else:
            replayer.flag(DEFINITION, problem)
        return
    if type(yielded) is not ActivityHandle:
        replayer.flag(DEFINITION, describe_await(coro, yielded))


def _problem(exc: BaseException) -> str | None:
    """Why ``exc`` leaving the workflow function shows the code is wrong, or None if it is
    the workflow's own failure."""
    kind = type(exc)
    if issubclass(kind, AsyncioMisuse):
        return safe_text(exc)
    if not issubclass(kind, Exception):
        return (
            f"workflow code raised {_raised(exc)}, a BaseException that is not an "
            "Exception; raise an Exception to fail the workflow"
        )
    if issubclass(kind, ConfigurationError | WorkflowDefinitionError):
        return f"workflow code raised {_raised(exc)}"
    return describe_asyncio_error(exc)


def _close(coro: Coroutine[Any, Any, Any]) -> bool:
    """Close ``coro``; False if it cannot be stopped (it keeps swallowing GeneratorExit).

    Whatever finally and except blocks do while closing (raise, await, swallow
    GeneratorExit once) is not the workflow's outcome. A coroutine that awaits again after
    swallowing GeneratorExit is suspended again, so it is closed again; one that never
    stops is kept referenced, so the garbage collector does not run its code later in the
    middle of another workflow's replay.
    """
    for _ in range(_CLOSE_ATTEMPTS):
        with contextlib.suppress(BaseException):
            coro.close()
        if coro.cr_frame is None:  # type: ignore[attr-defined]
            return True
    _UNSTOPPABLE.append(coro)
    return False


def _raised(exc: BaseException) -> str:
    text = safe_text(exc)
    return f"{_type_name(exc)}: {text}" if text else _type_name(exc)


def _type_name(value: object) -> str:
    try:
        return safe_text(type(value).__qualname__, MAX_NAME_CHARS)
    except BaseException:  # a metaclass can do anything
        return "<unnamed type>"


def _encode_result(outcome: ReplayResult, replayer: _Replayer) -> None:
    try:
        outcome.payload = encode_json(outcome.value)
    except PayloadEncodingError as exc:
        outcome.payload_error = safe_text(exc)
    except BaseException as exc:  # RecursionError, user hooks of a value that raise anything
        problem = _problem(exc)
        if problem is None:
            outcome.payload_error = f"value is not JSON-serialisable: {describe(exc)}"
        else:
            replayer.flag(DEFINITION, problem)


__all__ = ["ADVICE", "ReplayResult", "final_outcomes", "replay"]
