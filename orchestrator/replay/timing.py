"""Durable time, read from a workflow's events alone: what is due when, and when it wakes.

Rules of this module:
- Pure: times are the events' ``at_ms`` and ``now_ms`` arguments; no clock.
- Four things can come due: a timer (``TimerStarted.fire_at_ms``), a retry waiting for
  its backoff (``ActivityFailed.retry_at_ms``), and three timeouts of a running attempt:
  start-to-close (from its ``AttemptStarted``), heartbeat (from its start or its last
  heartbeat, whichever is later; not before a start report) and schedule-to-close (from
  the step's first attempt, covering every attempt and every wait between them).
- ``next_wake`` is the earliest of them for a RUNNING record, None for any other: a
  closed workflow never wakes, a STUCK one waits for its resume, which recomputes it.
  ``transition.revise`` sets ``wake_at_ms`` from it on every record the engine returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from orchestrator.protocol.failures import MAX_NAME_CHARS, safe_text
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    AttemptHeartbeat,
    AttemptStarted,
    Failure,
    HistoryEvent,
    TimerCancelled,
    TimerFired,
    TimerStarted,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.protocol.topics import LOCAL_PARTICIPANT

START_TO_CLOSE: Final = "StartToCloseTimeout"
HEARTBEAT: Final = "HeartbeatTimeout"
SCHEDULE_TO_CLOSE: Final = "ScheduleToCloseTimeout"
TIMEOUTS: Final = frozenset({START_TO_CLOSE, HEARTBEAT, SCHEDULE_TO_CLOSE})
# What comes due at the same millisecond is handled in this order, then by step.
TIMER: Final = "timer"
RETRY: Final = "retry"
# A local activity's attempt with no outcome: the orchestrator runs it, so it is due as
# soon as it is scheduled (the runtime runs it on the wake-up; the engine adds nothing).
LOCAL: Final = "local"
_LOCAL_PREFIX: Final = f"{LOCAL_PARTICIPANT}."
_RANK: Final = {
    SCHEDULE_TO_CLOSE: 0,
    START_TO_CLOSE: 1,
    HEARTBEAT: 2,
    RETRY: 3,
    TIMER: 4,
    LOCAL: 5,
}


def report_start(step: ActivityScheduled) -> bool:
    """Whether the participant must report the attempt's start (a timeout counts from it)."""
    return step.start_to_close_ms is not None or step.heartbeat_timeout_ms is not None


@dataclass(slots=True)
class StepState:
    """One activity step as its events leave it."""

    first: ActivityScheduled
    latest: ActivityScheduled
    outcome: ActivityCompleted | ActivityFailed | None = None
    """The latest attempt's outcome."""
    started: AttemptStarted | None = None
    """The latest attempt's start report."""
    heartbeat: AttemptHeartbeat | None = None
    """The step's last heartbeat, of any attempt."""

    @property
    def running(self) -> bool:
        """The latest attempt was sent and has no outcome."""
        return self.outcome is None

    @property
    def retry_at_ms(self) -> int | None:
        """When the next attempt is due, if the step waits to retry."""
        if isinstance(self.outcome, ActivityFailed):
            return self.outcome.retry_at_ms
        return None

    @property
    def deadline_ms(self) -> int | None:
        """When schedule-to-close fails the step, if it has that timeout."""
        limit = self.latest.schedule_to_close_ms
        return None if limit is None else self.first.at_ms + limit

    def timeout(self) -> tuple[int, str] | None:
        """The running attempt's earliest timeout: (due at, error type), or None."""
        latest = self.latest
        if self.outcome is not None or (
            latest.schedule_to_close_ms is None
            and latest.start_to_close_ms is None
            and latest.heartbeat_timeout_ms is None
        ):
            return None  # most steps: no timeouts at all
        due: list[tuple[int, int, str]] = []
        if self.deadline_ms is not None:
            due.append((self.deadline_ms, _RANK[SCHEDULE_TO_CLOSE], SCHEDULE_TO_CLOSE))
        started = self.started
        if started is not None:
            if latest.start_to_close_ms is not None:
                at = started.at_ms + latest.start_to_close_ms
                due.append((at, _RANK[START_TO_CLOSE], START_TO_CLOSE))
            if latest.heartbeat_timeout_ms is not None:
                beat = self.heartbeat
                alive = started.at_ms
                if beat is not None and beat.attempt == latest.attempt:
                    alive = max(alive, beat.at_ms)
                due.append((alive + latest.heartbeat_timeout_ms, _RANK[HEARTBEAT], HEARTBEAT))
        if not due:
            return None
        at, _, kind = min(due)
        return at, kind


@dataclass(slots=True)
class TimeState:
    """Every step and every timer that has not fired or been cancelled."""

    steps: dict[int, StepState] = field(default_factory=dict)
    timers: dict[int, TimerStarted] = field(default_factory=dict)


def scan(events: tuple[HistoryEvent, ...]) -> TimeState:
    """The steps and open timers of ``events``, in one pass.

    One transition asks this of the same events several times (its wake time, its tasks):
    the last answer is kept for the same tuple. Callers only read the state.
    """
    memo = _LAST_SCAN[0]
    if memo is not None and memo[0] is events:
        return memo[1]
    state = _scan(events)
    _LAST_SCAN[0] = (events, state)
    return state


# The events of the last scan (held, so their id cannot be reused) and its result.
_LAST_SCAN: Final[list[tuple[tuple[HistoryEvent, ...], TimeState] | None]] = [None]


def _scan(events: Iterable[HistoryEvent]) -> TimeState:
    state = TimeState()
    steps = state.steps
    outcomes: dict[tuple[int, int], ActivityCompleted | ActivityFailed] = {}
    started: dict[tuple[int, int], AttemptStarted] = {}
    heartbeats: dict[int, AttemptHeartbeat] = {}
    closed: set[int] = set()
    # Event classes are final: comparing types is the cheapest dispatch, and every
    # transition scans its whole history.
    for event in events:
        if type(event) is ActivityScheduled:
            step = steps.get(event.seq)
            if step is None:
                steps[event.seq] = StepState(event, event)
            elif event.attempt >= step.latest.attempt:
                step.latest = event
        elif type(event) is ActivityCompleted or type(event) is ActivityFailed:
            outcomes[(event.seq, event.attempt)] = event
        elif type(event) is AttemptStarted:
            started[(event.seq, event.attempt)] = event
        elif type(event) is AttemptHeartbeat:
            heartbeats[event.seq] = event
        elif type(event) is TimerStarted:
            state.timers[event.seq] = event
        elif type(event) is TimerFired or type(event) is TimerCancelled:
            closed.add(event.seq)
    for seq, step in steps.items():
        key = (seq, step.latest.attempt)
        step.outcome = outcomes.get(key)
        step.started = started.get(key)
        step.heartbeat = heartbeats.get(seq)
    for seq in closed:
        state.timers.pop(seq, None)
    return state


@dataclass(frozen=True, slots=True, order=True)
class Due:
    """One thing that comes due at ``at_ms``: a timer, a retry or a timeout (``kind``)."""

    at_ms: int
    rank: int
    seq: int
    kind: str


def dues(state: TimeState) -> list[Due]:
    """Everything that will come due, earliest first (then by kind and step)."""
    found: list[Due] = []
    for seq, timer in state.timers.items():
        found.append(Due(timer.fire_at_ms, _RANK[TIMER], seq, TIMER))
    for seq, step in state.steps.items():
        retry_at = step.retry_at_ms
        if retry_at is not None:
            found.append(Due(retry_at, _RANK[RETRY], seq, RETRY))
        timeout = step.timeout()
        if timeout is not None:
            found.append(Due(timeout[0], _RANK[timeout[1]], seq, timeout[1]))
        if step.outcome is None and step.latest.name.startswith(_LOCAL_PREFIX):
            found.append(Due(step.latest.at_ms, _RANK[LOCAL], seq, LOCAL))
    found.sort()
    return found


def next_wake(record: WorkflowRecord) -> int | None:
    """When ``record`` must next be woken (a ``WakeUp``): the earliest timer, retry or
    timeout due, or a local activity's attempt left without an outcome (due when it was
    scheduled); None for a workflow that is not RUNNING or has nothing to wait for."""
    if record.status is not WorkflowStatus.RUNNING:
        return None
    return _earliest(scan(record.events))


def _earliest(state: TimeState) -> int | None:
    """``min(d.at_ms for d in dues(state))`` without building and sorting the dues: every
    transition asks it."""
    best: int | None = None
    for timer in state.timers.values():
        if best is None or timer.fire_at_ms < best:
            best = timer.fire_at_ms
    for step in state.steps.values():
        outcome = step.outcome
        if outcome is None:
            timeout = step.timeout()
            at = None if timeout is None else timeout[0]
            if step.latest.name.startswith(_LOCAL_PREFIX):
                scheduled = step.latest.at_ms
                at = scheduled if at is None else min(at, scheduled)
        else:
            at = outcome.retry_at_ms if isinstance(outcome, ActivityFailed) else None
        if at is not None and (best is None or at < best):
            best = at
    return best


def timeout_failure(step: StepState, kind: str) -> Failure:
    """The failure a timeout of ``step``'s running attempt records; only schedule-to-close
    is final (the step's time is up), the others are retryable like any failure."""
    latest = step.latest
    name = safe_text(latest.name, MAX_NAME_CHARS)
    where = f"step {latest.seq} ({name!r}) attempt {latest.attempt}"
    if kind == SCHEDULE_TO_CLOSE:
        limit = latest.schedule_to_close_ms
        message = (
            f"{where} timed out: the step did not finish within its schedule-to-close "
            f"timeout of {_seconds(limit)} (every attempt and the waits between them)"
        )
    elif kind == START_TO_CLOSE:
        message = (
            f"{where} timed out: no result within the start-to-close timeout of "
            f"{_seconds(latest.start_to_close_ms)} after the participant started it"
        )
    else:
        message = (
            f"{where} timed out: no heartbeat within the heartbeat timeout of "
            f"{_seconds(latest.heartbeat_timeout_ms)}"
        )
    return Failure(kind, message, retryable=kind != SCHEDULE_TO_CLOSE)


def _seconds(ms: int | None) -> str:
    return "?" if ms is None else f"{ms / 1000:g} s"
