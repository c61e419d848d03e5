"""Runs workflow code forward from its recorded history, deterministically.

Rules of this module:
- It knows the workflow function, the history events and nothing else: no Kafka, no
  clock, no randomness. Time is the ``at_ms`` of the recorded events.
- Every ``ctx.activity`` call gets the next sequence number. A call whose number is in
  history must match the recorded name; a call beyond the recorded steps is new. A
  recorded step the code no longer reaches is non-determinism too.
- Recorded outcomes are delivered in history order, running the code between them, so a
  race between steps replays the way it first ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import ActivityError
from orchestrator.protocol.payloads import PayloadEncodingError, decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    HistoryEvent,
)
from orchestrator.workflow import ActivityHandle, RetryPolicy, WorkflowContext, WorkflowFn


@dataclass(slots=True)
class ReplayResult:
    """What running the code over its history produced."""

    new_steps: list[ActivityScheduled] = field(default_factory=list)
    finished: bool = False
    value: Any = None
    error: BaseException | None = None
    nondeterminism: str | None = None


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
        self.problem: str | None = None

    def schedule(
        self, name: str, value: Any, retry: RetryPolicy, compensation: bool
    ) -> ActivityHandle:
        if self.closing:
            # finally blocks run while the engine closes a blocked coroutine: not real steps.
            return ActivityHandle(-1, name)
        seq = self.next_seq
        self.next_seq += 1
        handle = ActivityHandle(seq, name)
        self.handles[seq] = handle
        recorded = self.recorded.get(seq)
        if recorded is not None:
            if recorded.name != name or recorded.compensation != compensation:
                self._flag(
                    f"step {seq} is {_describe(name, compensation)} in the code but "
                    f"{_describe(recorded.name, recorded.compensation)} in history"
                )
            return handle
        try:
            payload = encode_json(value)
        except PayloadEncodingError as exc:
            handle.reject(exc)
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

    def _flag(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem


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
    """Run ``fn`` over ``events`` and report new steps, completion or non-determinism."""
    replayer = _Replayer(events, started_at_ms)
    ctx = WorkflowContext(workflow_id, workflow_type, replayer)
    outcome = ReplayResult()
    attempts = {e.seq: e.attempt for e in events if isinstance(e, ActivityScheduled)}
    resolutions = final_outcomes(events)
    coro = fn(ctx, input_value)
    try:
        _run(coro, replayer, outcome)
        for event in resolutions:
            if outcome.finished or replayer.problem:
                break
            handle = replayer.handles.get(event.seq)
            if handle is None:
                name = replayer.recorded[event.seq].name if event.seq in replayer.recorded else "?"
                replayer._flag(
                    f"history settles step {event.seq} ({name!r}) before the code schedules it"
                )
                break
            replayer.clock_ms = event.at_ms
            if isinstance(event, ActivityCompleted):
                try:
                    handle.resolve(decode_json(event.result))
                except PayloadEncodingError as exc:
                    handle.reject(exc)
            else:
                assert isinstance(event, ActivityFailed)
                handle.reject(
                    ActivityError(
                        handle.name,
                        event.failure.error_type,
                        event.failure.message,
                        attempts=attempts.get(event.seq, event.attempt),
                    )
                )
            _run(coro, replayer, outcome)
    finally:
        if not outcome.finished:
            replayer.closing = True
            _close(coro)
    if replayer.problem is None:
        missing = sorted(set(replayer.recorded) - set(replayer.handles))
        if missing:
            seq = missing[0]
            replayer._flag(
                f"history holds step {seq} ({replayer.recorded[seq].name!r}) "
                "that the code no longer schedules"
            )
    if replayer.problem is not None:
        outcome.nondeterminism = replayer.problem
        outcome.new_steps = []
        return outcome
    outcome.new_steps = replayer.new_steps
    return outcome


def _run(coro: Coroutine[Any, Any, Any], replayer: _Replayer, outcome: ReplayResult) -> None:
    """Resume the workflow until it blocks on an unsettled step or finishes."""
    if outcome.finished:
        return
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        outcome.finished, outcome.value = True, stop.value
        return
    except RuntimeError as exc:
        if "event loop" in str(exc):
            replayer._flag(f"workflow used asyncio ({exc}); await only what ctx hands out")
            return
        outcome.finished, outcome.error = True, exc
        return
    except Exception as exc:  # the workflow's own failure, recorded as its outcome
        outcome.finished, outcome.error = True, exc
        return
    if not isinstance(yielded, ActivityHandle):
        replayer._flag(
            f"workflow awaited {type(yielded).__name__}, which is not a sagaline "
            "step; await only what ctx hands out (no asyncio in workflows)"
        )


def _close(coro: Coroutine[Any, Any, Any]) -> None:
    # RuntimeError: the code awaited inside a finally block while closing; nothing to keep.
    with contextlib.suppress(RuntimeError):
        coro.close()
