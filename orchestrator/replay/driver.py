"""Runs workflow code forward from its recorded history, deterministically.

Rules of this module:
- It knows the workflow function, the history events and nothing else: no Kafka, no
  clock, no randomness. Time is the ``at_ms`` of the recorded events.
- Every command (``ctx.activity``, a timer from ``ctx.sleep``, ``ctx.sleep_until`` or
  ``with_timeout``) gets the next sequence number. History keeps one table of commands
  keyed by number, each of a kind (an activity's first ``ActivityScheduled``, a
  ``TimerStarted``); a call whose number is in history must be of the recorded kind and,
  for an activity, have the recorded name (a timer's time is not compared: it may be
  computed). A call beyond the table is new; a recorded command the code no longer
  reaches is non-determinism too. A new kind of command (a signal, a child workflow) is
  a new entry in ``_KINDS``, and a new method that claims a number and matches it.
- Recorded outcomes (completions, final failures, fired timers) are delivered in history
  order, running the code between them and with ``ctx.now()`` at each event's time, so
  a race between steps (``ctx.first``, ``with_timeout``) replays the way it first ran. A
  cancelled timer never delivers anything. Cancelling a timer that neither fired nor was
  cancelled in history is a new ``TimerCancelled``.
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
import os
import threading
import types
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from orchestrator.convert import DEFAULT_CONVERTER, DataConverter, input_hint
from orchestrator.errors import (
    ActivityError,
    ChildWorkflowError,
    ConfigurationError,
    ContinueAsNewError,
    HistoryLimitExceededError,
    PromiseFailedError,
    RecordTooLargeError,
    WorkflowCancelledError,
    WorkflowDefinitionError,
)
from orchestrator.protocol.failures import MAX_NAME_CHARS, describe, safe_text
from orchestrator.protocol.payloads import PayloadEncodingError
from orchestrator.protocol.records import (
    JSON_ENCODING,
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    CancelRequested,
    Failure,
    HistoryEvent,
    PatchMarker,
    Payload,
    PromiseCompleted,
    PromiseCreated,
    SignalReceived,
    TimerCancelled,
    TimerFired,
    TimerStarted,
    UpdateAccepted,
    promise_id,
)
from orchestrator.replay.guard import (
    ADVICE,
    AsyncioMisuse,
    LoopGuard,
    describe_asyncio_error,
    describe_await,
    installed,
)
from orchestrator.workflow import (
    ActivityHandle,
    ActivityTimeouts,
    ChildSpec,
    CommandHandle,
    Handler,
    PromiseHandle,
    RetryPolicy,
    SignalBox,
    SignalHandle,
    TimerHandle,
    WorkflowContext,
    WorkflowFn,
)

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

# The payload of a call before it is known to be new (a replayed call is never encoded).
_UNENCODED: Final = Payload(b"", JSON_ENCODING)

Command = ActivityScheduled | TimerStarted | PromiseCreated
"""What a ``ctx`` call records: an activity step (its first attempt), a timer or a
promise."""


@dataclass(frozen=True, slots=True)
class _Kind:
    """One kind of command: which of its events records it, how messages name it, and
    what of a recorded command a replayed call must repeat."""

    records: Callable[[Any], bool]
    describe: Callable[[Any], str]
    label: Callable[[Any], str]
    same: Callable[[Any, Any], bool]


_KINDS: Final[dict[type[Command], _Kind]] = {
    ActivityScheduled: _Kind(
        records=lambda e: e.attempt == 1,  # later attempts are retries of the same command
        describe=lambda e: _describe(e.name, e.compensation, e.child_workflow_id),
        label=lambda e: repr(e.name),
        # _Replayer.schedule repeats this test before it builds the call: keep both alike.
        same=lambda recorded, call: (
            recorded.name == call.name
            and recorded.compensation == call.compensation
            and recorded.child_workflow_id == call.child_workflow_id
        ),
    ),
    TimerStarted: _Kind(
        records=lambda e: True,
        describe=lambda e: "a timer",
        label=lambda e: "a timer",
        same=lambda recorded, call: True,  # its time may be computed: only the kind counts
    ),
    PromiseCreated: _Kind(
        records=lambda e: True,
        describe=lambda e: f"promise {safe_text(e.name, MAX_NAME_CHARS)!r}",
        label=lambda e: f"promise {safe_text(e.name, MAX_NAME_CHARS)!r}",
        same=lambda recorded, call: recorded.name == call.name,
    ),
}


def command_of(event: HistoryEvent) -> Command | None:
    """``event`` if it records a command, keyed by its ``seq`` (later attempts do not)."""
    kind = _KINDS.get(type(event))  # type: ignore[arg-type]
    if kind is None or not kind.records(event):
        return None
    assert isinstance(event, ActivityScheduled | TimerStarted | PromiseCreated)
    return event


def describe_command(command: Command) -> str:
    """How messages name a command: ``activity 'p.x'``, ``compensation 'p.y'``, ``a timer``."""
    return _KINDS[type(command)].describe(command)


@dataclass(slots=True)
class ReplayResult:
    """What running the code over its history produced.

    ``problem`` set: the code is wrong; park the workflow with it (``new_steps`` and
    ``cancels`` are empty). Else ``finished`` with ``error`` (the workflow failed) or
    ``value`` and its ``payload`` (``payload_error`` when the value is not JSON), or still
    waiting; ``new_steps`` are the new commands in order, ``cancels`` the timers the code
    no longer waits for, ``markers`` the patches it turned on past recorded history.
    ``continued`` set (with ``finished``): the code called ``ctx.continue_as_new`` with
    that input; ``carried`` are the signals no wait took, for the next run.
    """

    new_steps: list[Command] = field(default_factory=list)
    cancels: list[TimerCancelled] = field(default_factory=list)
    finished: bool = False
    value: Any = None
    payload: Payload | None = None
    payload_error: str | None = None
    error: BaseException | None = None
    problem: Failure | None = None
    updates: dict[str, HandlerOutcome] = field(default_factory=dict)
    answer: HandlerOutcome | None = None
    markers: list[PatchMarker] = field(default_factory=list)
    continued: Payload | None = None
    carried: list[SignalReceived] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class HandlerOutcome:
    """What a query handler, update handler or validator did: returned ``value`` (a
    handler's as JSON in ``payload``, encoded the moment it returned, so later code
    cannot change the answer), or raised ``error`` (``missing`` too when there was no
    such handler)."""

    value: Any = None
    error: BaseException | None = None
    missing: bool = False
    payload: Payload | None = None


@dataclass(frozen=True, slots=True)
class Ask:
    """A question put to the code once it has replayed its whole history: ``kind``
    ``query`` calls query handler ``name``, ``validate`` the validator of update
    ``name`` (a missing validator accepts), both with ``value``."""

    kind: str
    name: str
    value: Any


class HandlerMisuseError(ConfigurationError):
    """A query or update handler tried to start something; only the workflow's code may."""


def final_outcomes(events: tuple[HistoryEvent, ...]) -> list[HistoryEvent]:
    """The events that settle a command, in history order: completions, fired timers, and
    failures with no retry after them and none waiting (``retry_at_ms`` None); and the
    signals received, which settle waits."""
    retried = {
        (e.seq, e.attempt - 1) for e in events if type(e) is ActivityScheduled and e.attempt > 1
    }
    return [
        e
        for e in events
        if type(e) in _ALWAYS_FINAL
        or (
            type(e) is ActivityFailed
            and e.retry_at_ms is None
            and (e.seq, e.attempt) not in retried
        )
    ]


def _added_outcomes(finals: list[HistoryEvent], added: tuple[HistoryEvent, ...]) -> int:
    """How many of ``finals`` (in history order) are among ``added``, the last events of
    the same history: walked from the end, as ``added`` holds one input's few events."""
    count, index, position = 0, len(finals), len(added) - 1
    while index and position >= 0:
        if finals[index - 1] is added[position]:
            count += 1
            index -= 1
        position -= 1
    return count


def _index_of(events: tuple[HistoryEvent, ...], event: HistoryEvent | None) -> int:
    """Where ``event`` (that very object) is in ``events``; -1 if it is not."""
    for index, candidate in enumerate(events):
        if candidate is event:
            return index
    return -1


# Events that always settle something (event classes are final: their type is exact).
_ALWAYS_FINAL: Final = frozenset(
    (
        ActivityCompleted,
        TimerFired,
        SignalReceived,
        PromiseCompleted,
        CancelRequested,
        UpdateAccepted,
    )
)


class _Replayer:
    """Implements the context's scheduler during one replay."""

    def __init__(
        self,
        events: tuple[HistoryEvent, ...],
        started_at_ms: int,
        workflow_id: str = "",
        run_id: str = "",
        converter: DataConverter = DEFAULT_CONVERTER,
        recorded_before: int | None = None,
    ) -> None:
        self.workflow_id = workflow_id
        # Events before this index were in history before the input being applied: the
        # code as it was then has already run past them.
        self.recorded_before = len(events) if recorded_before is None else recorded_before
        self.run_id = run_id
        self.converter = converter
        self.recorded: dict[int, Command] = {}
        # Timers that fired or were cancelled in history: cancelling them adds nothing.
        self.closed_timers: set[int] = set()
        # Patches recorded on, by id; what this replay answered, by id.
        self.markers: dict[str, PatchMarker] = {}
        self.patches: dict[str, bool] = {}
        self.new_markers: list[PatchMarker] = []
        self.events = events
        self.last_recorded = -1  # the highest command number in history
        self.take_in(events)
        # Recorded outcomes not yet delivered to the code, those of them that were in
        # history before this input, how many were delivered, and the one delivered last;
        # kept by ``_drive``.
        self.undelivered = 0
        self.undelivered_before = 0
        self.delivered = 0
        self.current: HistoryEvent | None = None
        self.finals: list[HistoryEvent] = []
        self.continued: Payload | None = None
        # What the code awaits now, for messages.
        self.blocked_on: CommandHandle | None = None
        # The signals delivered so far, by the order the box gave them.
        self.arrived: dict[int, SignalReceived] = {}
        self.handles: dict[int, CommandHandle] = {}
        self.new_steps: list[Command] = []
        self.cancels: list[TimerCancelled] = []
        self.next_seq = 0
        self.closing = False
        self.clock_ms = started_at_ms
        self.problem: Failure | None = None
        self.signals = SignalBox()
        self.queries: dict[str, Handler] = {}
        self.updates: dict[str, tuple[Handler, Handler | None]] = {}
        # Set while a query or update handler runs: it may read and change state only.
        self.handling = False

    def take_in(self, events: Iterable[HistoryEvent]) -> None:
        """Add history ``events`` to the tables of what history recorded: commands by
        number, closed timers, patch markers (the first of each id)."""
        for event in events:
            command = command_of(event)
            if command is not None:
                self.recorded[command.seq] = command
                self.last_recorded = max(self.last_recorded, command.seq)
            elif isinstance(event, TimerFired | TimerCancelled):
                self.closed_timers.add(event.seq)
            elif type(event) is PatchMarker and event.patch_id not in self.markers:
                self.markers[event.patch_id] = event

    def _take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def _match(self, call: Command) -> Command | None:
        """What history recorded under ``call.seq``, checked against the call: the same
        kind, and the same in what that kind compares."""
        recorded = self.recorded.get(call.seq)
        if recorded is not None and (
            type(recorded) is not type(call) or not _KINDS[type(call)].same(recorded, call)
        ):
            self.flag(
                NONDETERMINISM,
                f"step {call.seq} is {describe_command(call)} in the code but "
                f"{describe_command(recorded)} in history",
            )
        return recorded

    def schedule(
        self,
        name: str,
        value: Any,
        retry: RetryPolicy,
        compensation: bool,
        timeouts: ActivityTimeouts,
        child: ChildSpec | None = None,
    ) -> ActivityHandle:
        self._not_handling("ctx.activity" if child is None else "ctx.child_workflow")
        if self.closing or self.problem is not None:
            # finally blocks run while the engine closes a blocked coroutine, and nothing a
            # parked workflow asks for is kept: not real steps.
            return ActivityHandle(self, -1, name)
        seq = self._take_seq()
        recorded = self.recorded.get(seq)
        if (
            child is None
            and type(recorded) is ActivityScheduled
            and recorded.name == name
            and recorded.compensation == compensation
            and recorded.child_workflow_id is None
        ):
            # Replaying a recorded step (what most calls are): the full comparison below
            # would build the whole event just to find it the same.
            handle = ActivityHandle(self, seq, name)
            self.handles[seq] = handle
            return handle
        call = ActivityScheduled(
            seq=seq,
            attempt=1,
            name=name,
            payload=_UNENCODED,  # encoded only if the step is new
            at_ms=self.clock_ms,
            compensation=compensation,
            max_attempts=retry.max_attempts,
            non_retryable=retry.non_retryable_error_types,
            initial_interval_ms=round(retry.initial_interval * 1000),
            backoff_coefficient=retry.backoff_coefficient,
            maximum_interval_ms=round(retry.maximum_interval * 1000),
            schedule_to_close_ms=timeouts.schedule_to_close_ms,
            start_to_close_ms=timeouts.start_to_close_ms,
            heartbeat_timeout_ms=timeouts.heartbeat_timeout_ms,
        )
        if child is not None:
            object.__setattr__(
                call,
                "child_workflow_id",
                child.workflow_id or f"{self.workflow_id}/{self.run_id}/c{seq}",
            )
            object.__setattr__(call, "parent_close_policy", child.parent_close_policy)
        handle = ActivityHandle(self, call.seq, name)
        self.handles[call.seq] = handle
        if self._match(call) is not None:
            return handle
        try:
            payload = self.converter.to_payload(value)
        except Exception as exc:  # a converter link of the user's may raise anything
            handle.reject(
                exc
                if isinstance(exc, PayloadEncodingError)
                else PayloadEncodingError(f"value is not JSON-serialisable: {describe(exc)}")
            )
            return handle
        # ``call`` is fresh and nobody else holds it: fill in its payload in place.
        object.__setattr__(call, "payload", payload)
        self.new_steps.append(call)
        return handle

    def timer(self, fire_at_ms: int) -> TimerHandle:
        self._not_handling("a timer")
        if self.closing or self.problem is not None:
            return TimerHandle(self, -1, fire_at_ms)
        call = TimerStarted(self._take_seq(), fire_at_ms, self.clock_ms)
        recorded = self._match(call)
        if isinstance(recorded, TimerStarted):
            call = recorded  # history's time wins on replay
        handle = TimerHandle(self, call.seq, call.fire_at_ms)
        self.handles[call.seq] = handle
        if recorded is None:
            self.new_steps.append(call)
        return handle

    def promise(self, name: str) -> PromiseHandle:
        self._not_handling("ctx.promise")
        if self.closing or self.problem is not None:
            return PromiseHandle(self, -1, name, "")
        call = PromiseCreated(self._take_seq(), name, self.clock_ms)
        recorded = self._match(call)
        if isinstance(recorded, PromiseCreated):
            call = recorded
        handle = PromiseHandle(
            self, call.seq, name, promise_id(self.workflow_id, self.run_id, call.seq)
        )
        self.handles[call.seq] = handle
        if recorded is None:
            self.new_steps.append(call)
        return handle

    def cancel(self, timer: TimerHandle) -> None:
        self._not_handling("cancelling a timer")
        if self.closing or self.problem is not None or self.handles.get(timer.seq) is not timer:
            return
        if timer.seq in self.closed_timers or timer.done:
            return
        self.closed_timers.add(timer.seq)
        self.cancels.append(TimerCancelled(timer.seq, self.clock_ms))

    def now_ms(self) -> int:
        return self.clock_ms

    def receive(self, signal: SignalReceived) -> None:
        """A recorded signal arrives (in history order): to the oldest wait without one,
        or kept for the next wait."""
        try:
            value: Any = self.converter.from_payload(signal.payload)
            error: BaseException | None = None
        except BaseException as exc:  # not JSON, nested too deep, a codec that raises
            value = None
            error = self.unreadable(exc, "signal payload")
        self.arrived[self.signals.arrive(signal.name, value, error)] = signal

    def wait_signal(self, handle: SignalHandle) -> None:
        self._not_handling("ctx.wait_signal")
        if self.closing or self.problem is not None:
            return  # finally blocks of a closing coroutine take nothing
        self.signals.wait(handle)

    def give_back(self, handle: SignalHandle) -> None:
        self.signals.give_back(handle)

    def misuse(self, message: str) -> None:
        if self.handling:
            return  # the error reaches the handler, whose caller gets it
        self.flag(DEFINITION, message)

    def handle(self, kind: str, name: str, handler: Handler, validator: Handler | None) -> None:
        if self.closing or self.problem is not None:
            return
        if kind == "query":
            self.queries[name] = handler
        else:
            self.updates[name] = (handler, validator)

    def patched(self, patch_id: str, deprecated: bool) -> bool:
        """On if history recorded the patch; off if the code is still where history from
        before this input shows it went on (the run passed this point before the patch
        existed); else on, recorded now. The first answer of a replay holds for the rest
        of it. Handlers record nothing: they see the code's answer, or else whether
        history had the patch on before the point they run at."""
        known = self.patches.get(patch_id)
        if known is not None:
            return known
        marker = self.markers.get(patch_id)
        if self.handling:
            # A handler runs where history has its input: the patch counts if it was
            # recorded before that point.
            return marker is not None and (
                _index_of(self.events, marker) < _index_of(self.events, self.current)
            )
        if self.closing or self.problem is not None:
            return marker is not None  # a closing coroutine: nothing it does counts
        if marker is not None:
            if marker.position != self.next_seq:
                self.flag(
                    NONDETERMINISM,
                    f"patch {safe_text(patch_id, MAX_NAME_CHARS)!r} went on after step "
                    f"{marker.position - 1} in history but the code asks for it after step "
                    f"{self.next_seq - 1}",
                )
            on = True
        elif self.undelivered_before or self.next_seq <= self.last_recorded:
            on = False
        else:
            marker = PatchMarker(patch_id, self.next_seq, deprecated, self.clock_ms)
            self.markers[patch_id] = marker
            self.new_markers.append(marker)
            on = True
        self.patches[patch_id] = on
        return on

    def continue_as_new(self, value: Any) -> None:
        self._not_handling("ctx.continue_as_new")
        if self.closing or self.problem is not None:
            return
        try:
            payload = self.converter.to_payload(value)
        except PayloadEncodingError:
            raise
        except Exception as exc:  # RecursionError and user __iter__ failures too
            raise PayloadEncodingError(
                f"the next run's input is not JSON-serialisable: {describe(exc)}"
            ) from None
        if self.continued is None:
            self.continued = payload

    def convert(self, value: Any, hint: Any) -> Any:
        return self.converter.from_json(value, hint)

    def history_length(self) -> int:
        # Commands made and outcomes seen: what the code reached, never the events the
        # engine adds or replaces beside them (start reports, heartbeats, retries).
        return self.next_seq + self.delivered

    def _not_handling(self, what: str) -> None:
        if self.handling:
            raise HandlerMisuseError(
                f"{what} inside a query or update handler: handlers may read and change "
                "the workflow's state only; start steps from the workflow's code"
            )

    def call(self, handler: Handler, value: Any, *, answer: bool = True) -> HandlerOutcome:
        """Run a handler with ``value`` (none when None); nothing it raises escapes.

        ``answer``: encode what it returns now (a query's or update's answer; a
        validator's return value means nothing). An ``Exception`` is the caller's error;
        any other ``BaseException`` shows the code is wrong, as in the workflow's body.
        """
        self.handling = True
        try:
            if value is not None:
                value = self.converter.from_json(value, input_hint(handler, 0))
            result = handler() if value is None else handler(value)
            if isinstance(result, Coroutine):
                result.close()
                raise TypeError(
                    "query and update handlers and validators must be plain functions, "
                    "not async ones: they run between the workflow's awaits"
                )
            if not answer:
                return HandlerOutcome(result)
            return HandlerOutcome(result, payload=self.converter.to_payload(result))
        except Exception as exc:  # the caller's error, never the workflow's
            return HandlerOutcome(error=exc)
        except BaseException as exc:
            self.flag(
                DEFINITION,
                f"a query or update handler raised {_raised(exc)}, a BaseException that is "
                "not an Exception; raise an Exception to refuse the request",
            )
            return HandlerOutcome(error=exc)
        finally:
            self.handling = False

    def apply_update(self, event: UpdateAccepted, outcome: ReplayResult) -> None:
        """Run update ``event`` where history recorded it; its outcome is kept by id."""
        entry = self.updates.get(event.name)
        if entry is None:
            self.flag(
                NONDETERMINISM,
                f"history applies update {safe_text(event.name, MAX_NAME_CHARS)!r} where "
                "the code has no handler for it",
            )
            return
        try:
            value: Any = self.converter.from_payload(event.args)
        except BaseException as exc:  # not JSON, nested too deep, a codec that raises
            outcome.updates[event.update_id] = HandlerOutcome(
                error=self.unreadable(exc, "update argument")
            )
            return
        outcome.updates[event.update_id] = self.call(entry[0], value)

    def answer(self, ask: Ask) -> HandlerOutcome:
        """Put ``ask`` to the handlers registered by now."""
        if ask.kind == "query":
            handler = self.queries.get(ask.name)
            if handler is None:
                return HandlerOutcome(
                    error=LookupError(_missing("query", ask, self.queries)), missing=True
                )
            return self.call(handler, ask.value)
        entry = self.updates.get(ask.name)
        if entry is None:
            return HandlerOutcome(
                error=LookupError(_missing("update", ask, self.updates)), missing=True
            )
        validator = entry[1]
        if validator is None:
            return HandlerOutcome()
        return self.call(validator, ask.value, answer=False)

    def unreadable(self, exc: BaseException, what: str) -> PayloadEncodingError:
        """The error a wait raises for a value that could not be read; one that is not an
        ``Exception`` (a user validator's ``SystemExit``) shows the code is wrong."""
        if not isinstance(exc, Exception):
            self.flag(
                DEFINITION,
                f"reading a {what} raised {_raised(exc)}, a BaseException that is not an "
                "Exception (in a converter link, validator or codec)",
            )
        if isinstance(exc, PayloadEncodingError):
            return exc
        return PayloadEncodingError(f"{what} is not readable: {describe(exc)}")

    def flag(self, error_type: str, message: str) -> None:
        """Note why the workflow must park; the first reason wins, closing notes nothing."""
        if not self.closing:
            self.note(error_type, message)

    def note(self, error_type: str, message: str) -> None:
        """Note why the workflow must park unless a reason is known; the engine's own checks."""
        if self.problem is None:
            self.problem = Failure(error_type, safe_text(message))


def _missing(kind: str, ask: Ask, known: dict[str, Any]) -> str:
    names = ", ".join(repr(safe_text(n, MAX_NAME_CHARS)) for n in sorted(known)[:20])
    return (
        f"the workflow has no {kind} handler {safe_text(ask.name, MAX_NAME_CHARS)!r} "
        f"(it has {names or 'none'}): register it with ctx.on_{kind} before the "
        "workflow's first await"
    )


def _describe(name: str, compensation: bool, child: str | None = None) -> str:
    if child is not None:
        return f"child workflow {name!r} ({safe_text(child, MAX_NAME_CHARS)!r})"
    return f"compensation {name!r}" if compensation else f"activity {name!r}"


def replay(
    fn: WorkflowFn,
    workflow_id: str,
    workflow_type: str,
    input_value: Any,
    events: tuple[HistoryEvent, ...],
    started_at_ms: int,
    *,
    run_id: str = "",
    ask: Ask | None = None,
    converter: DataConverter = DEFAULT_CONVERTER,
    recorded_before: int | None = None,
    cache: ReplayCache | None = None,
) -> ReplayResult:
    """Run ``fn`` over ``events`` and report new steps, completion or a problem.

    ``run_id`` seeds ``ctx.random()`` and ``ctx.uuid4()``. ``ask``: once the history is
    replayed (and before the coroutine is closed), call that query handler or update
    validator; its outcome is ``answer`` (None if the code had a problem first).
    ``converter`` turns ``input_value`` (plain JSON) into the type of the function's input
    parameter, and values into payloads and back (the registry's). ``recorded_before``:
    how many of ``events`` were in history before the input being applied (default all:
    a replay that applies nothing new); ``ctx.patched`` goes on past them. ``cache``: where
    the run's coroutine is kept while it waits, and taken from when ``events`` continue
    the history it has run over (see :class:`ReplayCache`); the result is the same either
    way. Never raises for anything the workflow code does.
    """
    key = (workflow_id, run_id)
    if cache is not None and not cache.size:
        cache = None  # keeps nothing: each replay closes its coroutine, as without one
    if cache is not None and ask is None:
        live = cache.take(key)
        if live is not None:
            resumed = None
            if live.same_run(fn, workflow_type, input_value, started_at_ms, converter):
                resumed = _resume(live, events, recorded_before)
            if resumed is None:
                cache.discard(key, live)
            else:
                outcome, kept = resumed
                if cache.on_replay is not None:
                    cache.on_replay(True)
                if kept:
                    cache.put(key, live)
                if cache.check:
                    _check_resumed(
                        outcome,
                        replay(
                            fn,
                            workflow_id,
                            workflow_type,
                            input_value,
                            events,
                            started_at_ms,
                            run_id=run_id,
                            converter=converter,
                            recorded_before=recorded_before,
                        ),
                    )
                return outcome
    replayer = _Replayer(events, started_at_ms, workflow_id, run_id, converter, recorded_before)
    if cache is not None and ask is None:
        if cache.on_replay is not None:
            cache.on_replay(False)
        if cache.refused(key, fn):
            replayer.note(DEFINITION, KEEPS_RUNNING)
    outcome = ReplayResult()
    keep = cache is not None and ask is None
    coro: Coroutine[Any, Any, Any] | None = None
    with installed(LoopGuard(replayer.misuse)):
        context = WorkflowContext(workflow_id, workflow_type, replayer, run_id=run_id)
        made = _create(fn, context, input_value, converter)
        if isinstance(made, str):
            replayer.flag(DEFINITION, made)
        else:
            coro = made
            try:
                _drive(coro, replayer, outcome, events)
                if ask is not None and replayer.problem is None:
                    outcome.answer = replayer.answer(ask)
            except BaseException:
                keep = False
                raise
            finally:
                if not (keep and _waiting(outcome, replayer)):
                    _close_run(coro, replayer)
                    coro = None
    kept = _result(outcome, replayer, coro)
    if kept and coro is not None and cache is not None:
        cache.put(
            key,
            _Live(fn, workflow_type, input_value, started_at_ms, converter, coro, replayer, events),
        )
    return outcome


def _waiting(outcome: ReplayResult, replayer: _Replayer) -> bool:
    """The code waits for an outcome and nothing is wrong: its coroutine can be kept."""
    return not outcome.finished and replayer.problem is None and replayer.continued is None


def _close_run(coro: Coroutine[Any, Any, Any], replayer: _Replayer) -> None:
    # From here on, whatever the coroutine still runs (finally blocks now, or at garbage
    # collection if it refuses to stop) schedules nothing real.
    replayer.closing = True
    with installed(LoopGuard(replayer.misuse)):  # nor reaches a real event loop
        stopped = _close(coro)
    if not stopped:
        replayer.note(DEFINITION, KEEPS_RUNNING)


KEEPS_RUNNING: Final = (
    "workflow code keeps running after the engine closed it: it catches GeneratorExit (a "
    "bare except or except BaseException) and awaits again; let GeneratorExit propagate"
)


def _result(
    outcome: ReplayResult, replayer: _Replayer, coro: Coroutine[Any, Any, Any] | None
) -> bool:
    """Complete ``outcome`` from what the replay did; True when ``coro`` (still open) may
    be kept for the next input, and it is closed otherwise."""
    if (
        outcome.finished
        and outcome.error is None
        and outcome.continued is None
        and replayer.problem is None
    ):
        _encode_result(outcome, replayer)
    if replayer.problem is None:
        missing = sorted(set(replayer.recorded) - set(replayer.handles))
        if missing:
            seq = missing[0]
            replayer.note(
                NONDETERMINISM,
                f"history holds step {seq} ({_recorded_name(replayer.recorded[seq])}) "
                "that the code no longer schedules",
            )
    if replayer.problem is not None:
        if coro is not None:
            _close_run(coro, replayer)
        outcome.problem = replayer.problem
        outcome.new_steps, outcome.cancels = [], []
        outcome.continued, outcome.carried = None, []
        return False
    outcome.new_steps = list(replayer.new_steps)
    outcome.cancels = list(replayer.cancels)
    outcome.markers = list(replayer.new_markers)
    return coro is not None


# --- keeping a waiting run's coroutine between inputs ------------------------------------

DEFAULT_CACHE_SIZE: Final = 1_000
CHECK_ENV: Final = "SAGALINE_REPLAY_CACHE_CHECK"


@dataclass(eq=False)
class _Live:
    """A run's coroutine, suspended where its code waits, with the replayer it ran with and
    the history it has run over (``consumed``)."""

    fn: WorkflowFn
    workflow_type: str
    input_value: Any
    started_at_ms: int
    converter: DataConverter
    coro: Coroutine[Any, Any, Any]
    replayer: _Replayer
    consumed: tuple[HistoryEvent, ...]

    def same_run(
        self,
        fn: WorkflowFn,
        workflow_type: str,
        input_value: Any,
        started_at_ms: int,
        converter: DataConverter,
    ) -> bool:
        """Whether a replay with these arguments is of the run this coroutine is."""
        return (
            fn is self.fn
            and converter is self.converter
            and workflow_type == self.workflow_type
            and started_at_ms == self.started_at_ms
            and _equal(input_value, self.input_value)
        )

    def close(self) -> bool:
        """Close the coroutine (its finally blocks run; nothing they do counts, and no
        real event loop is theirs to reach); False if it would not stop."""
        self.replayer.closing = True
        with installed(LoopGuard(self.replayer.misuse)):
            return _close(self.coro)


def _equal(left: Any, right: Any) -> bool:
    try:
        return bool(left == right)
    except Exception:  # a converted input's __eq__ is the user's
        return False


class ReplayCache:
    """The coroutines of runs that wait, kept between their inputs (at most ``size``, the
    least recently used closed first), so that the next input runs the code on from the
    await it waits at instead of replaying the whole history again.

    What the code does next is the same either way, because it is deterministic: that is
    what replay assumes already. A kept coroutine is used only for a replay of the same
    run (the same function, input, start time and converter) whose history begins with
    everything the coroutine has run over, continued by exactly the commands, patch markers
    and timer cancels it asked for, and in which the outcomes it was given are still the
    run's first outcomes; anything else (a transaction that aborted, a record restored
    from Kafka, a rejected step written differently, an update) replays from the start.
    Queries and update validators always replay from the start and keep nothing.

    With ``check`` (or ``SAGALINE_REPLAY_CACHE_CHECK=1`` in the environment), every
    continued replay is also run from the start and any difference raises
    ``AssertionError``: the test suite runs so. Safe to share between threads.
    """

    def __init__(
        self,
        size: int = DEFAULT_CACHE_SIZE,
        *,
        check: bool | None = None,
        on_replay: Callable[[bool], None] | None = None,
    ) -> None:
        """``on_replay`` is told of every replay that could use the cache: True when it
        ran a kept coroutine on, False when it replayed from the start."""
        if size < 0:
            raise ValueError(f"a replay cache holds at least 0 runs, not {size}")
        self.size = size
        self.check = os.environ.get(CHECK_ENV, "") == "1" if check is None else check
        self.on_replay = on_replay
        self._runs: OrderedDict[tuple[str, str], _Live] = OrderedDict()
        # Runs whose kept coroutine would not stop when closed, with the function it ran:
        # every replay of them with that function parks them.
        self._refused: OrderedDict[tuple[str, str], WorkflowFn] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._runs)

    def take(self, key: tuple[str, str]) -> _Live | None:
        """Remove and return the run kept under ``key`` (workflow id, run id), if any."""
        with self._lock:
            return self._runs.pop(key, None)

    def put(self, key: tuple[str, str], live: _Live) -> None:
        """Keep ``live``; the least recently kept runs beyond ``size`` are closed."""
        evicted: list[tuple[tuple[str, str], _Live]] = []
        with self._lock:
            previous = self._runs.pop(key, None)
            if previous is not None:
                evicted.append((key, previous))
            if self.size:
                self._runs[key] = live
            else:
                evicted.append((key, live))
            while len(self._runs) > self.size:
                evicted.append(self._runs.popitem(last=False))
        for old_key, old in evicted:  # outside the lock: finally blocks are the user's code
            self.discard(old_key, old)

    def drop(self, key: tuple[str, str]) -> bool:
        """Close the run kept under ``key``, if any, and forget any refusal noted for the
        key; False if its coroutine would not stop (told to the caller, not remembered)."""
        live = self.take(key)
        with self._lock:
            self._refused.pop(key, None)
        return live is None or live.close()

    def discard(self, key: tuple[str, str], live: _Live) -> None:
        """Close ``live``, taken from under ``key``; one that will not stop is remembered,
        so that the run's replays with that function park it, as a replay that closes it
        does."""
        if not live.close():
            with self._lock:
                self._refused[key] = live.fn
                while len(self._refused) > max(self.size, 1):
                    self._refused.popitem(last=False)

    def refused(self, key: tuple[str, str], fn: WorkflowFn) -> bool:
        """Whether a coroutine of this run and function would not stop when closed. Asked
        on every replay from the start, so the answer holds however many transitions the
        engine discards; other code (a deploy, or another run under the same key) clears
        it."""
        with self._lock:
            known = self._refused.get(key)
            if known is None:
                return False
            if known is not fn:
                del self._refused[key]
                return False
            return True

    def clear(self) -> None:
        """Close every kept run (partitions given up, the orchestrator stopping, a test's
        run over)."""
        with self._lock:
            runs = list(self._runs.items())
            self._runs.clear()
        for key, live in runs:
            self.discard(key, live)

    def __del__(self) -> None:
        # Closed here, with nothing they do counting, rather than by the garbage collector
        # one by one, which would run their finally blocks as if they were real.
        if hasattr(self, "_runs"):  # not if __init__ refused its arguments
            self.clear()


def _resume(
    live: _Live, events: tuple[HistoryEvent, ...], recorded_before: int | None
) -> tuple[ReplayResult, bool] | None:
    """Run ``live`` on over what ``events`` add to the history it ran over: the outcome,
    and whether the coroutine may be kept again; None when ``events`` do not continue
    that history as the code left it (the caller replays from the start)."""
    replayer, consumed = live.replayer, live.consumed
    count = len(consumed)
    if len(events) < count or events[:count] != consumed:
        return None
    added = events[count:]
    if not _continues(replayer, added):
        return None
    finals = final_outcomes(events)
    delivered = replayer.delivered
    if len(finals) < delivered or finals[:delivered] != replayer.finals[:delivered]:
        return None
    _rebase(replayer, events, added, finals, recorded_before)
    attempts = {e.seq: e.attempt for e in events if isinstance(e, ActivityScheduled)}
    outcome = ReplayResult()
    keep = True
    with installed(LoopGuard(replayer.misuse)):
        try:
            _deliver(live.coro, replayer, outcome, finals[delivered:], attempts)
        except BaseException:
            keep = False
            raise
        finally:
            if not (keep and _waiting(outcome, replayer)):
                _close_run(live.coro, replayer)
                keep = False
    kept = _result(outcome, replayer, live.coro if keep else None)
    live.consumed = events
    return outcome, kept


def _continues(replayer: _Replayer, added: tuple[HistoryEvent, ...]) -> bool:
    """``added`` records exactly the commands, patch markers and timer cancels the code
    asked for in its last replay (with outcomes and other events beside them)."""
    steps = {c.seq: c for c in replayer.new_steps}
    markers: list[HistoryEvent] = list(replayer.new_markers)
    cancels: list[HistoryEvent] = list(replayer.cancels)
    for event in added:
        kind = type(event)
        if kind is UpdateAccepted:
            return False  # its handler's outcome is reported for the whole history
        command = command_of(event)
        if command is not None:
            mine = steps.pop(command.seq, None)  # each once: a second copy does not match
            if mine is None or not (mine is command or mine == command):
                return False
        elif kind is PatchMarker or kind is TimerCancelled:
            wanted = markers if kind is PatchMarker else cancels
            if event not in wanted:
                return False
            wanted.remove(event)
    return not (steps or markers or cancels)


def _rebase(
    replayer: _Replayer,
    events: tuple[HistoryEvent, ...],
    added: tuple[HistoryEvent, ...],
    finals: list[HistoryEvent],
    recorded_before: int | None,
) -> None:
    """Bring ``replayer`` to where a replay of ``events`` from the start would be once it
    has delivered the outcomes the code has seen: its tables hold ``added`` too, and what
    its last replay asked for is history now."""
    replayer.events = events
    replayer.recorded_before = len(events) if recorded_before is None else recorded_before
    replayer.take_in(added)
    replayer.new_steps, replayer.cancels, replayer.new_markers = [], [], []
    delivered = replayer.delivered
    replayer.finals = finals
    replayer.undelivered = len(finals) - delivered
    before = len(finals) - _added_outcomes(finals, events[replayer.recorded_before :])
    replayer.undelivered_before = max(0, before - delivered)


def _check_resumed(resumed: ReplayResult, scratch: ReplayResult) -> None:
    """Raise ``AssertionError`` where a continued replay differs from one from the start."""

    # Not ``updates``: a replay from the start reports every update handler it ran again,
    # a continued one none (an input that applies an update always replays from the start,
    # and only that update's outcome is ever read).
    def seen(result: ReplayResult) -> dict[str, Any]:
        error = result.error
        return {
            "new_steps": result.new_steps,
            "cancels": result.cancels,
            "markers": result.markers,
            "finished": result.finished,
            "payload": result.payload,
            "payload_error": result.payload_error,
            "error": None if error is None else (type(error), _raised(error)),
            "problem": result.problem,
            "continued": result.continued,
            "carried": result.carried,
        }

    mine, theirs = seen(resumed), seen(scratch)
    if mine != theirs:
        differ = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
        raise AssertionError(f"a continued replay differs from one from the start: {differ}")


# The handle each outcome settles; another handle at that number is non-determinism.
_SETTLES: Final[dict[type, type]] = {
    ActivityCompleted: ActivityHandle,
    ActivityFailed: ActivityHandle,
    TimerFired: TimerHandle,
    PromiseCompleted: PromiseHandle,
}


def _settle_promise(handle: CommandHandle, event: PromiseCompleted, replayer: _Replayer) -> None:
    assert isinstance(handle, PromiseHandle)
    if event.failure is not None:
        failure = event.failure
        handle.reject(PromiseFailedError(repr(handle.name), failure.error_type, failure.message))
        return
    try:
        value_type = handle.value_type
        handle.resolve(replayer.converter.from_payload(event.payload or _UNENCODED, value_type))
    except BaseException as exc:  # not JSON, nested too deep, a codec that raises
        handle.reject(replayer.unreadable(exc, "promise value"))


def _recorded_name(command: Command) -> str:
    return _KINDS[type(command)].label(command)


def _create(
    fn: WorkflowFn, ctx: WorkflowContext, input_value: Any, converter: DataConverter
) -> Coroutine[Any, Any, Any] | str:
    """The workflow's coroutine, or why it could not be made."""
    try:
        input_value = converter.from_json(input_value, input_hint(fn, 1))
    except BaseException as exc:  # a validator or link of the user's may raise anything
        # Parked, not failed: the input may be right and the type hint a deploy's mistake.
        return f"the workflow's input does not convert to its parameter's type: {_raised(exc)}"
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
    finals = replayer.finals = final_outcomes(events)
    replayer.undelivered = len(finals)
    replayer.undelivered_before = len(finals) - _added_outcomes(
        finals, events[replayer.recorded_before :]
    )
    _step(coro, replayer, outcome)
    _deliver(coro, replayer, outcome, finals, attempts)


def _deliver(
    coro: Coroutine[Any, Any, Any],
    replayer: _Replayer,
    outcome: ReplayResult,
    finals: list[HistoryEvent],
    attempts: dict[int, int],
) -> None:
    """Give the code ``finals`` (recorded outcomes, in history order), running it after
    each, until it finishes, has a problem or has seen them all."""
    for event in finals:
        if outcome.finished or replayer.problem is not None:
            return
        replayer.undelivered -= 1
        if replayer.undelivered_before:
            replayer.undelivered_before -= 1  # finals come in history order: these first
        replayer.delivered += 1
        replayer.current = event
        if isinstance(event, SignalReceived):
            # Not a command's outcome: it joins its name's queue, and the code runs on in
            # case it waits for it (a wait on anything else just waits again).
            replayer.clock_ms = event.at_ms
            replayer.receive(event)
            _step(coro, replayer, outcome)
            continue
        if isinstance(event, UpdateAccepted):
            # Its handler changes the state where history recorded it; then the code
            # runs on, as after a signal.
            replayer.clock_ms = event.at_ms
            replayer.apply_update(event, outcome)
            _step(coro, replayer, outcome)
            continue
        if isinstance(event, CancelRequested):
            # Raised at the await the code is blocked on; its except and finally clauses
            # run now, as ordinary code whose steps are real.
            replayer.clock_ms = event.at_ms
            replayer.signals.drop_waits()
            _step(coro, replayer, outcome, WorkflowCancelledError(event.reason))
            continue
        assert not isinstance(event, PatchMarker)  # never an outcome
        handle = replayer.handles.get(event.seq)
        if handle is None:
            recorded = replayer.recorded.get(event.seq)
            name = "'?'" if recorded is None else _recorded_name(recorded)
            waiting = replayer.blocked_on
            where = "" if waiting is None else f" (the code waits on {waiting._describe()})"
            replayer.flag(
                NONDETERMINISM,
                f"history settles step {event.seq} ({name}) before the code schedules it{where}",
            )
            return
        replayer.clock_ms = event.at_ms
        if type(handle) is not _SETTLES[type(event)]:
            replayer.flag(
                NONDETERMINISM,
                f"history settles step {event.seq} as a {type(event).__name__}, but it is "
                f"{handle._describe()} in the code",
            )
            return
        if isinstance(event, TimerFired):
            handle.resolve(None)
        elif isinstance(event, PromiseCompleted):
            _settle_promise(handle, event, replayer)
        elif isinstance(event, ActivityCompleted):
            assert isinstance(handle, ActivityHandle)
            try:
                handle.resolve(replayer.converter.from_payload(event.result, handle.result_type))
            except BaseException as exc:  # not JSON, does not fit result_type, ...
                handle.reject(replayer.unreadable(exc, "result"))
        else:
            assert isinstance(event, ActivityFailed) and isinstance(handle, ActivityHandle)
            failure = event.failure
            recorded = replayer.recorded.get(event.seq)
            child = (
                isinstance(recorded, ActivityScheduled) and recorded.child_workflow_id is not None
            )
            fallback = ChildWorkflowError if child else ActivityError
            error = _FAILURES.get(failure.error_type, fallback)
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


def _step(
    coro: Coroutine[Any, Any, Any],
    replayer: _Replayer,
    outcome: ReplayResult,
    error: BaseException | None = None,
) -> None:
    """Resume the workflow (raising ``error`` at its await, if given) until it blocks on
    an unsettled step or finishes."""
    try:
        yielded = coro.send(None) if error is None else coro.throw(error)
    except StopIteration as stop:
        outcome.finished, outcome.value = True, stop.value
        if replayer.continued is not None:
            replayer.flag(DEFINITION, _SWALLOWED_CONTINUE)
        return
    except ContinueAsNewError as exc:
        if replayer.continued is None:  # raised by hand, not by ctx.continue_as_new
            replayer.flag(DEFINITION, f"workflow code raised {_raised(exc)} itself")
            return
        outcome.finished, outcome.continued = True, replayer.continued
        # The signals no wait took, then those history holds that the code never reached.
        outcome.carried = [replayer.arrived[o] for o in replayer.signals.untaken()]
        later = replayer.finals[len(replayer.finals) - replayer.undelivered :]
        outcome.carried.extend(e for e in later if type(e) is SignalReceived)
        return
    except BaseException as exc:  # nothing workflow code raises may escape
        if replayer.continued is not None:
            replayer.flag(DEFINITION, _SWALLOWED_CONTINUE)
            return
        problem = _problem(exc)
        if problem is None:
            outcome.finished, outcome.error = True, exc
        else:
            replayer.flag(DEFINITION, problem)
        return
    if replayer.continued is not None:
        replayer.flag(DEFINITION, _SWALLOWED_CONTINUE)
    elif type(yielded) not in (ActivityHandle, TimerHandle, SignalHandle, PromiseHandle):
        replayer.flag(DEFINITION, describe_await(coro, yielded))
    else:
        replayer.blocked_on = yielded


_SWALLOWED_CONTINUE: Final = (
    "workflow code called ctx.continue_as_new and went on instead of letting "
    "ContinueAsNewError end the run (an except BaseException or a finally that returns or "
    "awaits); let it propagate"
)


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
        outcome.payload = replayer.converter.to_payload(outcome.value)
    except PayloadEncodingError as exc:
        outcome.payload_error = safe_text(exc)
    except BaseException as exc:  # RecursionError, user hooks of a value that raise anything
        problem = _problem(exc)
        if problem is None:
            outcome.payload_error = f"value is not JSON-serialisable: {describe(exc)}"
        else:
            replayer.flag(DEFINITION, problem)


__all__ = [
    "ADVICE",
    "DEFAULT_CACHE_SIZE",
    "Ask",
    "Command",
    "HandlerOutcome",
    "ReplayCache",
    "ReplayResult",
    "command_of",
    "final_outcomes",
    "replay",
]
