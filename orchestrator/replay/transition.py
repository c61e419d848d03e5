"""From one input to the next record: run the code, admit its new steps within the limits.

Rules of this module:
- Pure: the record before the input, the input's history event and ``now_ms`` in; the
  new record and the tasks to send out. Sizes come from ``Limits.measure`` only.
- A limit is never a crash and never a silent cut. A step that does not fit is recorded
  as scheduled with an empty payload and failed at once (``RecordTooLarge`` or
  ``HistoryLimitExceeded``, not retryable), and the code runs again, so the failure is
  raised at its ``await`` and its compensations are scheduled (they may use the grace).
  A result that does not fit is recorded as such a failure with ``effects_committed``.
  Only when even those failure reports do not fit is the workflow closed ``FAILED`` at
  its last good state: the input's event kept, nothing the code asked for after it.
- The steps the code asks for between two inputs are admitted in order while they fit;
  the first that does not fit, and every later one of the same round, is rejected.
- Timers are tiny and use the grace. A timer cannot be rejected (it has no failure to
  report), so one that does not fit even the grace closes the workflow ``FAILED`` at its
  last good state; timers after a rejected step are left out of that round and asked
  for again by the next one.
- What the code asked for is kept only if it runs: a parked workflow keeps the input's
  event and nothing its code did; a closed one drops the steps it never awaited and the
  timers it started last.
- Every record returned carries ``wake_at_ms = timing.next_wake(record)`` (set by
  ``revise``, which every record passes through).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, Final

from orchestrator.errors import (
    HistoryLimitExceededError,
    RecordTooLargeError,
    WorkflowCancelledError,
)
from orchestrator.protocol.failures import MAX_NAME_CHARS, failure_from_exception, safe_text
from orchestrator.protocol.records import (
    JSON_ENCODING,
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    ActivityTask,
    Failure,
    HistoryEvent,
    InboxBody,
    Payload,
    PromiseCreated,
    Reply,
    RunRequest,
    SignalReceived,
    TimerCancelled,
    TimerFired,
    TimerStarted,
    UpdateAccepted,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.replay.driver import (
    DEFINITION,
    Command,
    HandlerOutcome,
    ReplayResult,
    final_outcomes,
    replay,
)
from orchestrator.replay.limits import Limits, Tier, command_events, reserved_events
from orchestrator.replay.timing import TimeState, next_wake, report_start, scan
from orchestrator.workflow import WorkflowFn, WorkflowRegistry

TOO_LARGE: Final = RecordTooLargeError.ERROR_TYPE
OVER_HISTORY: Final = HistoryLimitExceededError.ERROR_TYPE
# Rounds of "replay, reject what does not fit, replay again" one input may take.
MAX_REJECTION_ROUNDS: Final = 16
# The payload of a step that was rejected and never sent: nothing was kept.
EMPTY: Final = Payload(b"", JSON_ENCODING)
# Earlier runs' starts a record remembers (newest first), so a retried start of a run that
# was since replaced is still recognised.
MAX_EARLIER_REQUESTS: Final = 8
# Run ids of runs started by ctx.continue_as_new derive from the run they follow, so the
# engine stays pure and a transaction that is retried makes the same run.
_SUCCESSOR_NAMESPACE: Final = uuid.UUID("6f1d3c1e-4a8b-5e57-9c2d-5a6761c1b7e0")


def successor_run_id(run_id: str) -> str:
    """The run id of the run that ``ctx.continue_as_new`` starts after run ``run_id``."""
    return uuid.uuid5(_SUCCESSOR_NAMESPACE, run_id).hex


# Signal and update ids of earlier runs a run remembers, newest first.
MAX_EARLIER_INPUTS: Final = 128


def taken_inputs(ended: WorkflowRecord, carried: list[SignalReceived]) -> tuple[str, ...]:
    """What the run after ``ended`` remembers of the inputs taken before it: the signals
    ``ended`` took (not the ``carried`` ones: the next run takes them) and the updates it
    applied, newest first, then what ``ended`` remembered; at most ``MAX_EARLIER_INPUTS``."""
    passed_on = {e.signal_id for e in carried}
    taken: list[str] = []
    for event in reversed(ended.events):
        if type(event) is SignalReceived and event.signal_id not in passed_on:
            taken.append(f"s:{event.signal_id}")
        elif type(event) is UpdateAccepted:
            taken.append(f"u:{event.update_id}")
    return (*taken, *ended.earlier_inputs)[:MAX_EARLIER_INPUTS]


def remembered_requests(record: WorkflowRecord) -> tuple[RunRequest, ...]:
    """The starts a run that replaces ``record``'s run remembers: ``record``'s own, then
    the ones it remembered, newest first."""
    own = () if record.request_id is None else (RunRequest(record.request_id, record.run_id),)
    return (*own, *record.earlier_requests)[:MAX_EARLIER_REQUESTS]


@dataclass(frozen=True, slots=True)
class Transition:
    """Result of applying one input: the new record and the tasks to send, or a reason.

    ``reply``: the answer to send the caller (a start that asked for one, an update),
    whether or not anything changed. ``replaced``: the closed record of the run a new run
    replaces (a start that terminated it), written to history before ``record``.
    ``messages``: inbox records for other workflows (a child's start, a report to a
    parent, a child's termination or cancel), produced in the same transaction.
    """

    record: WorkflowRecord | None
    tasks: tuple[ActivityTask, ...] = ()
    ignored: str | None = None
    reply: Reply | None = None
    replaced: WorkflowRecord | None = None
    messages: tuple[InboxBody, ...] = ()

    @property
    def changed(self) -> bool:
        """True when there is a new record to write."""
        return self.record is not None


class CodeRun:
    """Runs a workflow's code after one input and builds its next record.

    ``base`` is the record before the input (a fresh one with revision 0 for a start);
    ``outcome`` the history event the input adds, if any, and ``step`` the attempt it
    settles. ``carried_in``: ``base`` is a run that ``ctx.continue_as_new`` starts in this
    same transition, with that many signals. ``recorded_before``: how many of
    ``base.events`` were in history before this input (default: all of them).
    ``cached``: False replays from the start without the registry's replay cache.
    """

    def __init__(
        self,
        base: WorkflowRecord,
        now_ms: int,
        registry: WorkflowRegistry,
        limits: Limits,
        *,
        outcome: HistoryEvent | None = None,
        step: ActivityScheduled | None = None,
        carried_in: int | None = None,
        recorded_before: int | None = None,
        cached: bool = True,
    ) -> None:
        self.base = base
        # How many of ``base.events`` were in history before this input (the rest were
        # added by it, as a WakeUp's fired timers are): ctx.patched goes on past them.
        self.recorded_before = len(base.events) if recorded_before is None else recorded_before
        # Set when this run was started by its predecessor's continue_as_new in this same
        # transition: the number of signals it was handed.
        self.carried_in = carried_in
        # False: replay from the start and keep nothing (the registry's replay cache).
        self.cached = cached
        self.now_ms = now_ms
        self.registry = registry
        self.limits = limits
        self.outcome = outcome
        self.step = step
        # Only a result can be too large by itself; it is measured once, on the slow path.
        self._result_checked = not isinstance(outcome, ActivityCompleted)
        self._first_ok: bool | None = None
        self.last_resort = False
        """True once the transition closed the workflow at its last good state (nothing
        the code asked for fitted): a caller whose input may be refused refuses it."""
        self.updates: dict[str, HandlerOutcome] = {}
        """What the update handlers of the last replay did, by update id."""

    def transition(self) -> Transition:
        """The new record and its tasks; never raises for what the workflow code does."""
        while True:
            done = self._attempt()
            if done is not None:
                return done
            # The input's result did not fit and became a failure: run the code again.

    # --- one attempt ----------------------------------------------------------------

    def _attempt(self) -> Transition | None:
        base = self.base
        first = base.events if self.outcome is None else (*base.events, self.outcome)
        fn = self.registry.get(base.workflow_type)
        if fn is None:
            failure = Failure(
                "UnknownWorkflowType",
                f"workflow type {safe_text(base.workflow_type, MAX_NAME_CHARS)!r} is not "
                "registered in this orchestrator; deploy code that registers it and resume",
            )
            return self._settle(self._record(first, WorkflowStatus.STUCK, failure=failure))
        try:
            input_value: Any = self.registry.converter.from_payload(base.input)
        except Exception as exc:  # not JSON, or nested past the recursion limit
            failure = Failure("InvalidInput", safe_text(exc))
            return self._settle(self._closed(first, WorkflowStatus.FAILED, failure=failure))
        return self._rounds(fn, input_value, first)

    def _rounds(
        self, fn: WorkflowFn, input_value: Any, first: tuple[HistoryEvent, ...]
    ) -> Transition | None:
        base, limits = self.base, self.limits
        events = first
        # Each round that rejects a step adds two events, so the grace bounds the rounds;
        # so does MAX_REJECTION_ROUNDS, since every round replays and measures the record
        # and code that keeps scheduling what cannot fit would hold the loop for seconds.
        rounds = min(limits.event_budget(Tier.GRACE) // 2 + 2, MAX_REJECTION_ROUNDS)
        too_large = False
        for round_number in range(rounds):
            result = replay(
                fn,
                base.workflow_id,
                base.workflow_type,
                input_value,
                events,
                base.started_at_ms,
                run_id=base.run_id,
                converter=self.registry.converter,
                recorded_before=self.recorded_before,
                cache=self.registry.replay_cache if self.cached else None,
            )
            self.updates = result.updates
            if result.problem is not None:
                stuck = self._record(first, WorkflowStatus.STUCK, failure=result.problem)
                return self._settle(stuck)
            if result.finished and result.continued is not None:
                return self._continue(events, first, result)
            if result.finished:
                # Cancels of timers already in history are kept; new steps die unsent.
                timers = {e.seq for e in events if isinstance(e, TimerStarted)}
                cancels = [c for c in result.cancels if c.seq in timers]
                return self._finish(
                    (*events, *cancels), result.error, result.payload, result.payload_error
                )
            steps, cancels = result.new_steps, result.cancels
            if result.markers:
                # Patches the code turned on are recorded before what it asked for next.
                events = (*events, *result.markers)
            admitted = self._count_admitted(events, steps)
            if admitted is None:
                return self._settle(None, OVER_HISTORY)
            # The input's result was checked with the first round; later rounds add steps.
            ordinary_result = round_number == 0 and self._settles_normal_step()
            candidate = self._fitting(events, steps, cancels, admitted, admitted, ordinary_result)
            if candidate is None:
                if self._result_too_large():
                    return None
                kept, candidate = self._largest_fit(
                    events, steps, cancels, admitted, ordinary_result
                )
                if candidate is None or isinstance(steps[kept], TimerStarted | PromiseCreated):
                    # A timer or promise that does not fit cannot be reported to the code.
                    return self._settle(None, TOO_LARGE)
                too_large = True
            elif admitted == len(steps):
                return Transition(candidate, self._tasks(candidate))
            events = candidate.events
        return self._settle(None, TOO_LARGE if too_large else OVER_HISTORY)

    def _count_admitted(self, events: tuple[HistoryEvent, ...], steps: list[Command]) -> int | None:
        """How many of ``steps`` fit the event budgets in order; None if even the
        rejections of the rest do not fit, or the first that does not fit is a timer."""
        limits = self.limits
        reserved = reserved_events(events)
        admitted = 0
        for step in steps:
            cost = command_events(step)
            if reserved + cost > limits.event_budget(_tier(step)):
                break
            reserved += cost
            admitted += 1
        if admitted < len(steps) and isinstance(steps[admitted], TimerStarted | PromiseCreated):
            return None
        rejected = sum(isinstance(s, ActivityScheduled) for s in steps[admitted:])
        if reserved + 2 * rejected > limits.event_budget(Tier.GRACE):
            return None
        return admitted

    def _largest_fit(
        self,
        events: tuple[HistoryEvent, ...],
        steps: list[Command],
        cancels: list[TimerCancelled],
        admitted: int,
        ordinary_result: bool,
    ) -> tuple[int, WorkflowRecord | None]:
        """The longest prefix of ``steps`` (below ``admitted``, which did not fit) whose
        record, with the rest rejected, fits, and that record; a binary search, so few
        measures."""
        low, high, best = -1, admitted, None
        while high - low > 1:
            middle = (low + high) // 2
            candidate = self._fitting(events, steps, cancels, middle, admitted, ordinary_result)
            if candidate is not None:
                low, best = middle, candidate
            else:
                high = middle
        return max(low, 0), best

    def _fitting(
        self,
        events: tuple[HistoryEvent, ...],
        steps: list[Command],
        cancels: list[TimerCancelled],
        kept: int,
        counted: int,
        ordinary_result: bool,
    ) -> WorkflowRecord | None:
        """The RUNNING record with ``steps[:kept]`` scheduled and the rest rejected, if
        each part fits its budget: everything up to the last ordinary step (or up to the
        input's ordinary result) the normal budget, the whole record the grace. One
        measure when the record ends with an ordinary step, two otherwise."""
        candidate = self._with_steps(events, steps, cancels, kept, counted)
        limits = self.limits
        ordinary = [i for i in range(kept) if _tier(steps[i]) is Tier.NORMAL]
        if ordinary:
            if ordinary[-1] == len(steps) - 1 and not cancels:  # one budget covers all
                return candidate if limits.fits(candidate, Tier.NORMAL) else None
            prefix = self._record((*events, *steps[: ordinary[-1] + 1]), WorkflowStatus.RUNNING)
            if not limits.fits(prefix, Tier.NORMAL):
                return None
        elif ordinary_result:
            if not steps and not cancels:
                return candidate if limits.fits(candidate, Tier.NORMAL) else None
            if not self._first_fits():
                return None
        return candidate if limits.fits(candidate, Tier.GRACE) else None

    def _with_steps(
        self,
        events: tuple[HistoryEvent, ...],
        steps: list[Command],
        cancels: list[TimerCancelled],
        kept: int,
        counted: int,
    ) -> WorkflowRecord:
        """RUNNING with ``steps[:kept]`` scheduled; the rest rejected, those from
        ``counted`` on for the event limit, the others for size. Timers in the rest are
        left out (and their cancels): the next round asks for them again."""
        added: list[HistoryEvent] = list(steps[:kept])
        left_out: set[int] = set()
        for index, step in enumerate(steps[kept:], start=kept):
            if isinstance(step, TimerStarted | PromiseCreated):
                left_out.add(step.seq)
                continue
            added.extend(self._rejection(step, TOO_LARGE if index < counted else OVER_HISTORY))
        added.extend(c for c in cancels if c.seq not in left_out)
        return self._record((*events, *added), WorkflowStatus.RUNNING, failure=None)

    def _rejection(self, step: ActivityScheduled, error_type: str) -> list[HistoryEvent]:
        limits, name = self.limits, safe_text(step.name, MAX_NAME_CHARS)
        if error_type == TOO_LARGE:
            budget = limits.byte_budget(Tier.GRACE if step.compensation else Tier.NORMAL)
            message = (
                f"step {step.seq} ({name!r}, payload {len(step.payload.data)} bytes) was not "
                f"sent: the workflow's record would exceed {budget} bytes "
                f"(max_record_bytes {limits.max_record_bytes})"
            )
        else:
            budget = limits.event_budget(Tier.GRACE if step.compensation else Tier.NORMAL)
            message = (
                f"step {step.seq} ({name!r}) was not sent: workflow "
                f"{safe_text(self.base.workflow_id, MAX_NAME_CHARS)} would exceed {budget} "
                f"history events (max_events {limits.max_events}, compensations "
                f"{limits.event_grace} more)"
            )
        failed = ActivityFailed(step.seq, step.attempt, Failure(error_type, message), step.at_ms)
        return [dataclasses.replace(step, payload=EMPTY), failed]

    # --- endings --------------------------------------------------------------------

    def _finish(
        self,
        events: tuple[HistoryEvent, ...],
        error: BaseException | None,
        payload: Payload | None,
        payload_error: str | None,
    ) -> Transition | None:
        kept = self._without_unsent(events)
        if error is not None:
            failure = failure_from_exception(error, retryable=False)
            status = (
                WorkflowStatus.CANCELLED
                if isinstance(error, WorkflowCancelledError)
                else _failed_status(kept)
            )
            return self._settle(self._closed(kept, status, failure=failure))
        if payload is None:
            failure = Failure("InvalidResult", safe_text(payload_error))
            return self._settle(self._closed(kept, WorkflowStatus.FAILED, failure=failure))
        completed = self._closed(kept, WorkflowStatus.COMPLETED, result=payload, failure=None)
        if self.limits.fits(completed, Tier.CLOSE):
            return Transition(completed)
        if self._result_too_large():
            return None  # the code sees the failure at its await, and may compensate
        failure = Failure(
            TOO_LARGE,
            f"the workflow's result of {len(payload.data)} bytes does not fit in its record "
            f"(max_record_bytes {self.limits.max_record_bytes})",
        )
        return self._settle(self._closed(kept, WorkflowStatus.FAILED, failure=failure))

    def _continue(
        self,
        events: tuple[HistoryEvent, ...],
        first: tuple[HistoryEvent, ...],
        result: ReplayResult,
    ) -> Transition | None:
        """Close this run ``CONTINUED_AS_NEW`` and start the next one: the same id, type
        and parent, the input the code gave, the signals no wait took; its code runs now,
        in this transition, and the closed run is written before it (``replaced``)."""
        base = self.base
        if self.carried_in is not None and len(result.carried) >= self.carried_in:
            # Started in this transition, it took none of the signals it was handed: the
            # next run would do the same, without end, inside one transaction.
            failure = Failure(
                DEFINITION,
                "the workflow called ctx.continue_as_new in a run that had just started "
                "and taken nothing (no step, no signal); a run must wait for something "
                "before it continues",
            )
            return self._settle(self._record(first, WorkflowStatus.STUCK, failure=failure))
        ended = self._closed(
            self._without_unsent(events), WorkflowStatus.CONTINUED_AS_NEW, failure=None
        )
        if not self.limits.fits(ended, Tier.CLOSE):
            return self._settle(None)
        assert result.continued is not None
        successor = WorkflowRecord(
            workflow_id=base.workflow_id,
            workflow_type=base.workflow_type,
            status=WorkflowStatus.RUNNING,
            input=result.continued,
            started_at_ms=self.now_ms,
            updated_at_ms=self.now_ms,
            revision=0,
            # Received now, by this run: its clock never goes back to when they came.
            events=tuple(dataclasses.replace(e, at_ms=self.now_ms) for e in result.carried),
            run_id=successor_run_id(base.run_id),
            earlier_requests=remembered_requests(base),
            parent=base.parent,
            earlier_inputs=taken_inputs(ended, result.carried),
        )
        if not self.limits.fits(successor, Tier.NORMAL):
            # Nothing is lost: this run keeps its history and says why it stopped.
            failure = Failure(
                TOO_LARGE,
                f"ctx.continue_as_new gave the next run an input of "
                f"{len(result.continued.data)} bytes, which does not fit in a record "
                f"(max_record_bytes {self.limits.max_record_bytes})",
            )
            kept = self._without_unsent(events)
            return self._settle(self._closed(kept, WorkflowStatus.FAILED, failure=failure))
        following = CodeRun(
            successor,
            self.now_ms,
            self.registry,
            self.limits,
            carried_in=len(result.carried),
            recorded_before=0,  # a new run: no code ran past any of its events yet
        ).transition()
        # A run that took some of its signals and continued at once is not written: the
        # last run of this transition follows the one that was open before it.
        return dataclasses.replace(following, replaced=ended)

    def _settle(
        self, record: WorkflowRecord | None, error_type: str = TOO_LARGE
    ) -> Transition | None:
        """``record`` if it fits as a closing or parking record; else the input's result
        becomes a failure (None: run again), else the last good state, closed FAILED."""
        if record is not None and (
            self._still_stuck(record) or self.limits.fits(record, Tier.CLOSE)
        ):
            return Transition(record)
        if self._result_too_large():
            return None
        return Transition(self._last_resort(error_type))

    def _still_stuck(self, record: WorkflowRecord) -> bool:
        """A resume that changes nothing (the caller ignores it): no need to measure."""
        base = self.base
        return (
            base.status is WorkflowStatus.STUCK
            and record.status is WorkflowStatus.STUCK
            and record.failure == base.failure
            and record.events == base.events
        )

    def _result_too_large(self) -> bool:
        """True if the input's result alone is over its budget; it is then replaced by a
        RecordTooLarge failure whose effects committed (checked once per input)."""
        if self._result_checked:
            return False
        self._result_checked = True
        if self._first_fits():
            return False
        outcome, step = self.outcome, self.step
        assert isinstance(outcome, ActivityCompleted) and step is not None
        tier = Tier.GRACE if step.compensation else Tier.NORMAL
        message = (
            f"the result of step {step.seq} ({safe_text(step.name, MAX_NAME_CHARS)!r}) "
            f"attempt {outcome.attempt}, {len(outcome.result.data)} bytes, does not fit in "
            f"the workflow's record ({self.limits.byte_budget(tier)} bytes for it, "
            f"max_record_bytes {self.limits.max_record_bytes}); the step's effects "
            "committed: compensate it"
        )
        failure = Failure(TOO_LARGE, message, retryable=False, effects_committed=True)
        self.outcome = ActivityFailed(outcome.seq, outcome.attempt, failure, outcome.at_ms)
        self._first_ok = None
        return True

    def _first_fits(self) -> bool:
        """Whether the record with the input's result (nothing the code did) is within
        the result's budget; measured at most once."""
        if self._first_ok is None:
            outcome, step = self.outcome, self.step
            if not isinstance(outcome, ActivityCompleted) or step is None:
                self._first_ok = True
            else:
                tier = Tier.GRACE if step.compensation else Tier.NORMAL
                first = self._record((*self.base.events, outcome), self.base.status)
                self._first_ok = self.limits.fits(first, tier)
        return self._first_ok

    def _last_resort(self, error_type: str) -> WorkflowRecord:
        """Closed FAILED with the input's event but nothing the code asked for after it;
        without the input's event if even that does not fit, and without the input
        payload if the workflow is a start whose input is too large by itself."""
        self.last_resort = True
        limit = (
            f"max_record_bytes {self.limits.max_record_bytes}"
            if error_type == TOO_LARGE
            else f"max_events {self.limits.max_events}"
        )
        failure = Failure(
            error_type,
            f"workflow {safe_text(self.base.workflow_id, MAX_NAME_CHARS)} closed at its last "
            f"good state: even the failures that report its next steps do not fit ({limit})",
        )
        events = self.base.events if self.outcome is None else (*self.base.events, self.outcome)
        record = self._closed(events, WorkflowStatus.FAILED, failure=failure)
        if self.outcome is not None and not self.limits.fits(record, Tier.CLOSE):
            record = self._closed(self.base.events, WorkflowStatus.FAILED, failure=failure)
        if not self.base.events and not self.limits.fits(record, Tier.CLOSE):
            record = dataclasses.replace(record, input=EMPTY)
        return record

    # --- helpers --------------------------------------------------------------------

    def _settles_normal_step(self) -> bool:
        return (
            isinstance(self.outcome, ActivityCompleted)
            and self.step is not None
            and not self.step.compensation
        )

    def _record(
        self, events: tuple[HistoryEvent, ...], status: WorkflowStatus, **changes: Any
    ) -> WorkflowRecord:
        return revise(self.base, self.now_ms, events=events, status=status, **changes)

    def _closed(
        self, events: tuple[HistoryEvent, ...], status: WorkflowStatus, **changes: Any
    ) -> WorkflowRecord:
        return close(self.base, self.now_ms, status, events=events, **changes)

    def _added(self, events: tuple[HistoryEvent, ...]) -> tuple[HistoryEvent, ...]:
        return events[len(self.base.events) :]

    def _tasks(self, record: WorkflowRecord) -> tuple[ActivityTask, ...]:
        """Tasks for the steps this input scheduled that were not rejected."""
        settled = _settled(record.events)
        state = scan(record.events)
        return tuple(
            task_for(record, e, state)
            for e in self._added(record.events)
            if isinstance(e, ActivityScheduled) and (e.seq, e.attempt) not in settled
        )

    def _without_unsent(self, events: tuple[HistoryEvent, ...]) -> tuple[HistoryEvent, ...]:
        """Steps scheduled by this input but never awaited die with the workflow, and so
        do the timers it started (they could only fire after the end)."""
        settled = _settled(events)
        fired = {e.seq for e in events if isinstance(e, TimerFired)}
        dropped: set[int] = set()
        added: list[HistoryEvent] = []
        for event in self._added(events):
            if isinstance(event, ActivityScheduled) and (event.seq, event.attempt) not in settled:
                continue
            if isinstance(event, TimerStarted) and event.seq not in fired:
                dropped.add(event.seq)
                continue
            if isinstance(event, TimerCancelled) and event.seq in dropped:
                continue
            added.append(event)
        return (*self.base.events, *added)


def _tier(command: Command) -> Tier:
    """Ordinary steps use the normal budget; compensations, timers and promises the grace
    (a timer or promise may be what a compensation waits on; both are small)."""
    if isinstance(command, ActivityScheduled) and not command.compensation:
        return Tier.NORMAL
    return Tier.GRACE


def _settled(events: tuple[HistoryEvent, ...]) -> set[tuple[int, int]]:
    return {(e.seq, e.attempt) for e in events if isinstance(e, ActivityCompleted | ActivityFailed)}


def _failed_status(events: tuple[HistoryEvent, ...]) -> WorkflowStatus:
    """FAILED, or COMPENSATED / COMPENSATION_FAILED when compensations ran."""
    compensations = {e.seq for e in events if isinstance(e, ActivityScheduled) and e.compensation}
    if not compensations:
        return WorkflowStatus.FAILED
    completed = {e.seq for e in final_outcomes(events) if isinstance(e, ActivityCompleted)}
    if compensations <= completed:
        return WorkflowStatus.COMPENSATED
    return WorkflowStatus.COMPENSATION_FAILED


_RECORD_FIELDS: Final = tuple(f.name for f in dataclasses.fields(WorkflowRecord) if f.init)


def revise(record: WorkflowRecord, now_ms: int, **changes: Any) -> WorkflowRecord:
    """``record`` with ``changes``, one revision later, updated at ``now_ms``, and its
    ``wake_at_ms`` recomputed (None unless RUNNING), so no path can forget it."""
    if "revision" in changes or "updated_at_ms" in changes:
        raise TypeError("revise() sets revision and updated_at_ms itself")
    for name in _RECORD_FIELDS:
        if name not in changes:
            changes[name] = getattr(record, name)
    changes["revision"] = record.revision + 1
    changes["updated_at_ms"] = now_ms
    # What dataclasses.replace does, without looking the fields up on every transition.
    revised = WorkflowRecord(**changes)
    # Set on the fresh, not yet shared record: a second replace would copy every field
    # again, on every transition.
    object.__setattr__(revised, "wake_at_ms", next_wake(revised))
    return revised


def close(
    record: WorkflowRecord, now_ms: int, status: WorkflowStatus, **changes: Any
) -> WorkflowRecord:
    """``record`` closed with ``status`` at ``now_ms``."""
    return revise(record, now_ms, status=status, closed_at_ms=now_ms, **changes)


def task_for(
    record: WorkflowRecord, step: ActivityScheduled, state: TimeState | None = None
) -> ActivityTask:
    """The task that sends ``step`` to its participant; the activity id carries the run id.

    ``deadline_ms`` is the step's schedule-to-close deadline (from its first attempt);
    the step's last heartbeat details, of any attempt, go with it so a new attempt can
    resume. ``state`` is ``scan(record.events)`` if the caller has it.
    """
    if step.child_workflow_id is not None:
        # A child workflow: the shell never routes it to a participant (see replay.links).
        participant, activity = "", step.name
    else:
        participant, _, activity = step.name.partition(".")
    info = (state or scan(record.events)).steps.get(step.seq)
    first_at = step.at_ms if info is None else info.first.at_ms
    heartbeat = None if info is None else info.heartbeat
    limit = step.schedule_to_close_ms
    return ActivityTask(
        workflow_id=record.workflow_id,
        workflow_type=record.workflow_type,
        activity_id=activity_id(record.workflow_id, step.seq, step.attempt, record.run_id),
        seq=step.seq,
        attempt=step.attempt,
        participant=participant,
        activity=activity,
        payload=step.payload,
        scheduled_at_ms=step.at_ms,
        compensation=step.compensation,
        deadline_ms=None if limit is None else first_at + limit,
        start_to_close_ms=step.start_to_close_ms,
        heartbeat_timeout_ms=step.heartbeat_timeout_ms,
        heartbeat_details=None if heartbeat is None else heartbeat.details,
        report_start=report_start(step),
    )
