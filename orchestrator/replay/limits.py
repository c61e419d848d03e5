"""The bounds that keep one workflow's record small, and what each kind of write may use.

Rules of this module:
- Pure arithmetic over events; sizes come only from ``Limits.measure``, which the shell
  supplies (the encoded size of a record with its key).
- Three tiers. Ordinary steps, their retries and their results may use the *normal*
  budget. Compensations and the failure events that report a limit may use a *grace*
  above it, so a workflow that hits a limit can still undo what it did. The last bytes
  are kept for the record that closes or parks the workflow, so that one always fits.
- Every event a command may still add is reserved as soon as it is recorded, so recording
  it later never needs room that is not there: an attempt counts two events (scheduled and
  its outcome) plus its start report when a timeout counts from it; a step with a
  heartbeat timeout one more (its single heartbeat event); a retry waiting for its
  backoff the next attempt's events; a timer two (started, then fired or cancelled).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from orchestrator.errors import ConfigurationError
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    AttemptHeartbeat,
    AttemptStarted,
    HistoryEvent,
    PromiseCompleted,
    PromiseCreated,
    TimerCancelled,
    TimerFired,
    TimerStarted,
    WorkflowRecord,
)
from orchestrator.replay.timing import report_start

MIN_EVENT_GRACE: Final = 20
# Bytes kept for the closing record: a failure of at most ~2,000 characters and the fields
# a close sets.
MAX_CLOSE_RESERVE: Final = 4_096


class Tier(enum.IntEnum):
    """What a write is, and so which budget it may use."""

    NORMAL = 0
    """Workflow steps, their retries and their results."""
    GRACE = 1
    """Compensations, failure events, and the rejections that report a limit."""
    CLOSE = 2
    """The record that closes or parks the workflow."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that keep one workflow's record small.

    Args:
        max_events: history events a workflow's ordinary steps may use (each step counts
            two: scheduled and its outcome, each retry two more, one more per attempt for
            its start report when it has a start-to-close or heartbeat timeout, and one
            for its heartbeat with a heartbeat timeout). Compensations, timers (two each)
            and limit failures get ``event_grace`` more.
        max_record_bytes: the size a record may never exceed (with its key), or None to
            check no size. Ordinary steps may fill it up to ``byte_budget(Tier.NORMAL)``.
        measure: the encoded size of a record including its key; pure. Required with
            ``max_record_bytes``. Called only for records whose ``bound`` reaches their
            budget (for every checked record without a ``bound``).
        bound: optional, pure and cheap: a size never below ``measure``'s for the same
            record. A record whose bound is within its budget fits unmeasured.

    Raises:
        ConfigurationError: a bound of the wrong type or out of range.
    """

    max_events: int = 1_000
    max_record_bytes: int | None = None
    measure: Callable[[WorkflowRecord], int] | None = None
    bound: Callable[[WorkflowRecord], int] | None = None

    def __post_init__(self) -> None:
        if not _positive_int(self.max_events):
            raise ConfigurationError(
                f"Limits.max_events must be a positive int, got {self.max_events!r}"
            )
        if self.max_record_bytes is not None:
            if not _positive_int(self.max_record_bytes):
                raise ConfigurationError(
                    "Limits.max_record_bytes must be a positive int or None, got "
                    f"{self.max_record_bytes!r}"
                )
            if not callable(self.measure):
                raise ConfigurationError("Limits.max_record_bytes needs a measure function")

    @property
    def event_grace(self) -> int:
        """Events compensations and limit failures may use above ``max_events``."""
        return max(MIN_EVENT_GRACE, self.max_events // 10)

    def event_budget(self, tier: Tier) -> int:
        """Events (outcomes of running steps reserved) a write of ``tier`` may leave."""
        if tier is Tier.NORMAL:
            return self.max_events
        return self.max_events + self.event_grace

    def byte_budget(self, tier: Tier) -> int | None:
        """Bytes a record written by a write of ``tier`` may have; None: unchecked."""
        limit = self.max_record_bytes
        if limit is None:
            return None
        if tier is Tier.CLOSE:
            return limit
        grace = limit - min(MAX_CLOSE_RESERVE, limit // 8)
        if tier is Tier.GRACE:
            return grace
        return grace - limit // 10

    def fits(self, record: WorkflowRecord, tier: Tier) -> bool:
        """True if ``record`` is within the byte budget of ``tier``: its ``bound`` is, or
        else its ``measure``."""
        budget = self.byte_budget(tier)
        if budget is None or self.measure is None:
            return True
        if self.bound is not None and self.bound(record) <= budget:
            return True
        return self.measure(record) <= budget


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def attempt_events(step: ActivityScheduled) -> int:
    """Events one attempt of ``step`` may add: scheduled, its outcome, its start report."""
    return 2 + report_start(step)


def command_events(command: ActivityScheduled | TimerStarted | PromiseCreated) -> int:
    """Events a new command reserves: a step's first attempt (and its heartbeat), a
    timer's start and its firing or cancellation, or a promise and its completion."""
    if isinstance(command, TimerStarted | PromiseCreated):
        return 2
    return attempt_events(command) + (command.heartbeat_timeout_ms is not None)


def reserved_events(events: tuple[HistoryEvent, ...]) -> int:
    """Events in history plus every event its open commands may still add (see above)."""
    latest: dict[int, ActivityScheduled] = {}
    outcomes: dict[tuple[int, int], ActivityCompleted | ActivityFailed] = {}
    started: set[tuple[int, int]] = set()
    beating: set[int] = set()
    timers: set[int] = set()
    closed: set[int] = set()
    for event in events:
        # Event classes are final: exact types are the cheapest dispatch.
        if type(event) is ActivityScheduled:
            if event.seq not in latest or event.attempt >= latest[event.seq].attempt:
                latest[event.seq] = event
        elif type(event) is ActivityCompleted or type(event) is ActivityFailed:
            outcomes[(event.seq, event.attempt)] = event
        elif type(event) is AttemptStarted:
            started.add((event.seq, event.attempt))
        elif type(event) is AttemptHeartbeat:
            beating.add(event.seq)
        elif type(event) is TimerStarted or type(event) is PromiseCreated:
            timers.add(event.seq)
        elif (
            type(event) is TimerFired
            or type(event) is TimerCancelled
            or type(event) is PromiseCompleted
        ):
            closed.add(event.seq)
    reserved = len(events) + len(timers - closed)
    for seq, step in latest.items():
        outcome = outcomes.get((seq, step.attempt))
        if outcome is None:  # running: its outcome, maybe its start report
            reserved += 1 + (report_start(step) and (seq, step.attempt) not in started)
        elif isinstance(outcome, ActivityFailed) and outcome.retry_at_ms is not None:
            reserved += attempt_events(step)  # the retry waiting for its backoff
        else:
            continue  # settled for good: it adds nothing more
        reserved += step.heartbeat_timeout_ms is not None and seq not in beating
    return reserved
