"""State transitions of one workflow: (record, input, time) in, (record, tasks) out.

Rules of this module:
- Pure: no Kafka, no clock, no randomness; ``now_ms`` and ``run_id`` are arguments.
- Every input either changes the record (a new revision) or is ignored with a reason.
  Nothing here raises for anything workflow code does; the shell still parks a workflow
  (``park``) if the engine itself fails.
- A record whose status this code does not know was written by newer code: it is never
  overwritten, whatever the input.
- Retries are decided here from the policy recorded with the step, never by code replay,
  so a retry needs no user code at all.
- Every text that reaches a record from outside (participants, workflow code, the shell)
  goes through ``safe_text`` first, so every record this module returns can be encoded.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from orchestrator.protocol.failures import MAX_NAME_CHARS, safe_text
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityResult,
    ActivityScheduled,
    ActivityStatus,
    ActivityTask,
    Failure,
    HistoryEvent,
    InboxBody,
    ResumeWorkflow,
    StartWorkflow,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.replay.limits import Limits, Tier, reserved_events
from orchestrator.replay.transition import CodeRun, Transition, close, revise, task_for
from orchestrator.workflow import WorkflowRegistry

# Why an input changed nothing (Transition.ignored).
DUPLICATE_START: Final = "duplicate-start"
UNKNOWN_WORKFLOW: Final = "unknown-workflow"
WORKFLOW_CLOSED: Final = "workflow-closed"
UNKNOWN_STATUS: Final = "unknown-status"
STALE_ATTEMPT: Final = "stale-attempt"
ACTIVITY_ID_MISMATCH: Final = "activity-id-mismatch"
DUPLICATE_RESULT: Final = "duplicate-result"
NOT_STUCK: Final = "not-stuck"
STILL_STUCK: Final = "still-stuck"
UNKNOWN_INPUT: Final = "unknown-input"

DEFAULT_LIMITS: Final = Limits()


def advance(
    record: WorkflowRecord | None,
    body: InboxBody,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits = DEFAULT_LIMITS,
    *,
    run_id: str = "",
) -> Transition:
    """Apply one inbox input to a workflow.

    Args:
        record: the workflow's current state, or None if it does not exist (yet).
        body: a start request, an activity result or a resume request.
        now_ms: the orchestrator's clock, recorded in new events.
        registry: the workflow functions to replay.
        limits: size bounds.
        run_id: the run id a start gives the new record; every activity id of the run
            carries it. Unused by other inputs.

    Returns:
        The new record and the tasks to send, or ``ignored`` with the reason. A start
        of a type the registry lacks is kept as a STUCK record (resumed once a deploy
        registers the type).
    """
    if record is not None and record.status is WorkflowStatus.UNKNOWN:
        return Transition(None, ignored=UNKNOWN_STATUS)
    if isinstance(body, StartWorkflow):
        return _start(record, body, now_ms, registry, limits, run_id)
    if isinstance(body, ActivityResult):
        return _apply_result(record, body, now_ms, registry, limits)
    if isinstance(body, ResumeWorkflow):
        return _resume(record, now_ms, registry, limits)
    return Transition(None, ignored=UNKNOWN_INPUT)


def _start(
    record: WorkflowRecord | None,
    start: StartWorkflow,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
    run_id: str,
) -> Transition:
    if record is not None:
        return Transition(None, ignored=DUPLICATE_START)
    return CodeRun(_fresh(start, now_ms, run_id), now_ms, registry, limits).transition()


def _fresh(start: StartWorkflow, now_ms: int, run_id: str) -> WorkflowRecord:
    return WorkflowRecord(
        workflow_id=_encodable(start.workflow_id),
        workflow_type=_encodable(start.workflow_type),
        status=WorkflowStatus.RUNNING,
        input=start.input,
        started_at_ms=now_ms,
        updated_at_ms=now_ms,
        revision=0,
        run_id=_encodable(run_id),
    )


def _resume(
    record: WorkflowRecord | None, now_ms: int, registry: WorkflowRegistry, limits: Limits
) -> Transition:
    if record is None:
        return Transition(None, ignored=UNKNOWN_WORKFLOW)
    if record.status.terminal:
        return Transition(None, ignored=WORKFLOW_CLOSED)
    if record.status is not WorkflowStatus.STUCK:
        return Transition(None, ignored=NOT_STUCK)
    transition = CodeRun(record, now_ms, registry, limits).transition()
    again = transition.record
    if (
        again is not None
        and again.status is WorkflowStatus.STUCK
        and again.failure == record.failure
        and again.events == record.events
    ):
        # Re-driving after every restore must write nothing while the code is unchanged.
        return Transition(None, ignored=STILL_STUCK)
    return transition


def _latest_attempt(events: tuple[HistoryEvent, ...], seq: int) -> ActivityScheduled | None:
    for event in reversed(events):
        if isinstance(event, ActivityScheduled) and event.seq == seq:
            return event
    return None


def _apply_result(
    record: WorkflowRecord | None,
    result: ActivityResult,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
) -> Transition:
    if record is None:
        return Transition(None, ignored=UNKNOWN_WORKFLOW)
    if record.status.terminal:
        return Transition(None, ignored=WORKFLOW_CLOSED)
    step = _latest_attempt(record.events, result.seq)
    if step is None or step.attempt != result.attempt:
        return Transition(None, ignored=STALE_ATTEMPT)
    expected = activity_id(record.workflow_id, result.seq, result.attempt, record.run_id)
    if result.activity_id != expected:
        return Transition(None, ignored=ACTIVITY_ID_MISMATCH)
    for event in reversed(record.events):
        if (
            isinstance(event, ActivityCompleted | ActivityFailed)
            and event.seq == result.seq
            and event.attempt == result.attempt
        ):
            return Transition(None, ignored=DUPLICATE_RESULT)
    outcome = _outcome(result, now_ms)
    if isinstance(outcome, ActivityFailed) and _should_retry(step, outcome.failure):
        retried = _retry(record, step, outcome, now_ms, limits)
        if retried is not None:
            return retried
        # The retry does not fit the limits: the failure is final.
    return CodeRun(record, now_ms, registry, limits, outcome=outcome, step=step).transition()


def _outcome(result: ActivityResult, now_ms: int) -> HistoryEvent:
    if result.status is ActivityStatus.COMPLETED:
        if result.result is not None:
            return ActivityCompleted(result.seq, result.attempt, result.result, now_ms)
        failure = Failure("MissingResult", "participant reported success without a result")
    elif result.failure is None:
        failure = Failure("UnknownError", "participant gave no failure")
    else:
        failure = _safe_failure(result.failure)
    return ActivityFailed(result.seq, result.attempt, failure, now_ms)


def _should_retry(step: ActivityScheduled, failure: Failure) -> bool:
    # A failure whose effects committed is never retried: a new attempt would repeat them.
    return (
        failure.retryable
        and not failure.effects_committed
        and step.attempt < step.max_attempts
        and failure.error_type not in step.non_retryable
    )


def _retry(
    record: WorkflowRecord,
    step: ActivityScheduled,
    failed: ActivityFailed,
    now_ms: int,
    limits: Limits,
) -> Transition | None:
    events = (*record.events, failed)
    tier = Tier.GRACE if step.compensation else Tier.NORMAL
    if reserved_events(events) + 2 > limits.event_budget(tier):
        return None
    retry = dataclasses.replace(step, attempt=step.attempt + 1, at_ms=now_ms)
    updated = revise(record, now_ms, events=(*events, retry))
    if not limits.fits(updated, tier):
        return None
    return Transition(updated, tasks=(task_for(updated, retry),))


def park(
    record: WorkflowRecord | None,
    body: InboxBody,
    failure: Failure,
    now_ms: int,
    *,
    run_id: str,
) -> WorkflowRecord:
    """The STUCK record the shell writes when it cannot apply ``body`` to a workflow.

    Args:
        record: the workflow's current state, or None when ``body`` starts it.
        body: the input that could not be applied (the shell keeps it beside the record).
        failure: why; its text is made safe to encode.
        now_ms: the orchestrator's clock.
        run_id: the run id of a record made from a start; unused for an existing record.

    Returns:
        ``record`` (or a new record made from the start, with its input and no events),
        status STUCK with ``failure``, one revision later. Always encodable.

    Raises:
        ValueError: ``record`` is None and ``body`` is not a start: there is no workflow
            to park.
    """
    if record is None:
        if not isinstance(body, StartWorkflow):
            raise ValueError(
                f"cannot park a {type(body).__name__} for a workflow that does not exist"
            )
        record = _fresh(body, now_ms, run_id)
    return revise(record, now_ms, status=WorkflowStatus.STUCK, failure=_safe_failure(failure))


def fail(record: WorkflowRecord, now_ms: int, failure: Failure) -> WorkflowRecord:
    """Close a workflow as FAILED from outside its code (e.g. its record grew too large)."""
    return close(record, now_ms, WorkflowStatus.FAILED, failure=_safe_failure(failure))


def pending_tasks(record: WorkflowRecord) -> tuple[ActivityTask, ...]:
    """Tasks of an open workflow whose latest attempt has no outcome yet.

    None for a closed workflow, nor for one whose status this code does not know.
    """
    if record.status.terminal or record.status is WorkflowStatus.UNKNOWN:
        return ()
    latest: dict[int, ActivityScheduled] = {}
    settled: set[tuple[int, int]] = set()
    for event in record.events:
        if isinstance(event, ActivityScheduled):
            latest[event.seq] = event
        else:
            settled.add((event.seq, event.attempt))
    return tuple(task_for(record, s) for s in latest.values() if (s.seq, s.attempt) not in settled)


def _safe_failure(failure: Failure) -> Failure:
    return Failure(
        safe_text(failure.error_type, MAX_NAME_CHARS),
        safe_text(failure.message),
        retryable=failure.retryable is True,
        effects_committed=failure.effects_committed is True,
    )


def _encodable(text: str) -> str:
    """``text`` unchanged if UTF-8 can encode it (anything decoded from a record can)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return safe_text(text, len(text) * 7 + 8)
    return text


# The shell imports these from here; they live beside the code that uses them most.
__all__ = ["Limits", "Transition", "advance", "fail", "park", "pending_tasks"]
