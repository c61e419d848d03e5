"""State transitions of one workflow: (record, input, time) in, (record, tasks) out.

Rules of this module:
- Pure: no Kafka, no clock, no randomness; ``now_ms`` is an argument.
- Every input either changes the record (a new revision) or is ignored with a reason;
  nothing here raises for bad runtime input except an unknown workflow type on start,
  which the shell turns into a dead letter.
- Retries are decided here from the policy recorded with the step, never by code replay,
  so a retry needs no user code at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import UnknownWorkflowTypeError
from orchestrator.protocol.payloads import PayloadEncodingError, decode_json, encode_json
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
    StartWorkflow,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.replay.driver import final_outcomes, replay
from orchestrator.workflow import WorkflowRegistry


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that keep one workflow's record small."""

    max_events: int = 1_000


@dataclass(frozen=True, slots=True)
class Transition:
    """Result of applying one input: the new record and the tasks to send, or a reason."""

    record: WorkflowRecord | None
    tasks: tuple[ActivityTask, ...] = ()
    ignored: str | None = None

    @property
    def changed(self) -> bool:
        """True when there is a new record to write."""
        return self.record is not None


def advance(
    record: WorkflowRecord | None,
    body: InboxBody,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits = Limits(),
) -> Transition:
    """Apply one inbox input to a workflow.

    Args:
        record: the workflow's current state, or None if it does not exist (yet).
        body: a start request or an activity result.
        now_ms: the orchestrator's clock, recorded in new events.
        registry: the workflow functions to replay.
        limits: size bounds.

    Raises:
        UnknownWorkflowTypeError: a start names a type the registry lacks.
    """
    if isinstance(body, StartWorkflow):
        return _start(record, body, now_ms, registry, limits)
    if isinstance(body, ActivityResult):
        return _apply_result(record, body, now_ms, registry, limits)
    return Transition(None, ignored="resume-unsupported")


def _start(
    record: WorkflowRecord | None,
    start: StartWorkflow,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
) -> Transition:
    if record is not None:
        return Transition(None, ignored="duplicate-start")
    if registry.get(start.workflow_type) is None:
        raise UnknownWorkflowTypeError(
            f"workflow {start.workflow_id}: type {start.workflow_type!r} is not registered "
            f"here (known: {', '.join(sorted(registry.names())) or 'none'})"
        )
    fresh = WorkflowRecord(
        workflow_id=start.workflow_id,
        workflow_type=start.workflow_type,
        status=WorkflowStatus.RUNNING,
        input=start.input,
        started_at_ms=now_ms,
        updated_at_ms=now_ms,
        revision=0,
    )
    return _run_code(fresh, now_ms, registry, limits)


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
        return Transition(None, ignored="unknown-workflow")
    if record.status.terminal:
        return Transition(None, ignored="workflow-closed")
    step = _latest_attempt(record.events, result.seq)
    if step is None or step.attempt != result.attempt:
        return Transition(None, ignored="stale-attempt")
    if result.activity_id != activity_id(record.workflow_id, result.seq, result.attempt):
        return Transition(None, ignored="activity-id-mismatch")
    for event in reversed(record.events):
        if (
            isinstance(event, ActivityCompleted | ActivityFailed)
            and event.seq == result.seq
            and event.attempt == result.attempt
        ):
            return Transition(None, ignored="duplicate-result")
    if result.status is ActivityStatus.COMPLETED:
        if result.result is None:
            failure = Failure("MissingResult", "participant reported success without a result")
            outcome: HistoryEvent = ActivityFailed(result.seq, result.attempt, failure, now_ms)
        else:
            outcome = ActivityCompleted(result.seq, result.attempt, result.result, now_ms)
    else:
        failure = result.failure or Failure("UnknownError", "participant gave no failure")
        outcome = ActivityFailed(result.seq, result.attempt, failure, now_ms)
    events = (*record.events, outcome)
    if isinstance(outcome, ActivityFailed) and _should_retry(step, outcome.failure):
        if len(events) + 1 > limits.max_events:
            return Transition(
                _close(
                    dataclasses.replace(record, events=events),
                    now_ms,
                    WorkflowStatus.FAILED,
                    failure=_over_limit(record, limits),
                )
            )
        retry = dataclasses.replace(step, attempt=step.attempt + 1, at_ms=now_ms)
        updated = _revise(record, now_ms, events=(*events, retry))
        return Transition(updated, tasks=(_task(updated, retry),))
    return _run_code(dataclasses.replace(record, events=events), now_ms, registry, limits)


def _should_retry(step: ActivityScheduled, failure: Failure) -> bool:
    return (
        failure.retryable
        and step.attempt < step.max_attempts
        and failure.error_type not in step.non_retryable
    )


def _run_code(
    record: WorkflowRecord, now_ms: int, registry: WorkflowRegistry, limits: Limits
) -> Transition:
    fn = registry.get(record.workflow_type)
    if fn is None:
        return Transition(
            _revise(
                record,
                now_ms,
                status=WorkflowStatus.STUCK,
                failure=Failure(
                    "UnknownWorkflowType",
                    f"workflow type {record.workflow_type!r} is not registered in this "
                    "orchestrator; deploy code that registers it to resume",
                ),
            )
        )
    try:
        input_value: Any = decode_json(record.input)
    except PayloadEncodingError as exc:
        return Transition(
            _close(record, now_ms, WorkflowStatus.FAILED, failure=Failure("InvalidInput", str(exc)))
        )
    result = replay(
        fn,
        record.workflow_id,
        record.workflow_type,
        input_value,
        record.events,
        record.started_at_ms,
    )
    if result.nondeterminism is not None:
        return Transition(
            _revise(
                record,
                now_ms,
                status=WorkflowStatus.STUCK,
                failure=Failure("NonDeterminismError", result.nondeterminism),
            )
        )
    if result.finished:
        # Steps scheduled but never awaited die with the workflow: no task, no record.
        updated = record
        if result.error is None:
            try:
                payload = encode_json(result.value)
            except PayloadEncodingError as exc:
                return Transition(
                    _close(
                        updated,
                        now_ms,
                        WorkflowStatus.FAILED,
                        failure=Failure("InvalidResult", str(exc)),
                    )
                )
            return Transition(_close(updated, now_ms, WorkflowStatus.COMPLETED, result=payload))
        failure = Failure(type(result.error).__name__, str(result.error))
        return Transition(_close(updated, now_ms, _failed_status(updated.events), failure=failure))
    events = (*record.events, *result.new_steps)
    if len(events) > limits.max_events:
        return Transition(
            _close(record, now_ms, WorkflowStatus.FAILED, failure=_over_limit(record, limits))
        )
    updated = dataclasses.replace(record, events=events)
    revised = _revise(updated, now_ms, status=WorkflowStatus.RUNNING, failure=None)
    return Transition(revised, tasks=tuple(_task(revised, s) for s in result.new_steps))


def _over_limit(record: WorkflowRecord, limits: Limits) -> Failure:
    return Failure(
        "HistoryLimitExceeded",
        f"workflow {record.workflow_id} would exceed its limit of "
        f"{limits.max_events} history events",
    )


def _failed_status(events: tuple[HistoryEvent, ...]) -> WorkflowStatus:
    """FAILED, or COMPENSATED / COMPENSATION_FAILED when compensations ran."""
    compensations = {e.seq for e in events if isinstance(e, ActivityScheduled) and e.compensation}
    if not compensations:
        return WorkflowStatus.FAILED
    completed = {e.seq for e in final_outcomes(events) if isinstance(e, ActivityCompleted)}
    if compensations <= completed:
        return WorkflowStatus.COMPENSATED
    return WorkflowStatus.COMPENSATION_FAILED


def _revise(record: WorkflowRecord, now_ms: int, **changes: Any) -> WorkflowRecord:
    return dataclasses.replace(
        record, revision=record.revision + 1, updated_at_ms=now_ms, **changes
    )


def _close(
    record: WorkflowRecord, now_ms: int, status: WorkflowStatus, **changes: Any
) -> WorkflowRecord:
    return _revise(record, now_ms, status=status, closed_at_ms=now_ms, **changes)


def _task(record: WorkflowRecord, step: ActivityScheduled) -> ActivityTask:
    participant, _, activity = step.name.partition(".")
    return ActivityTask(
        workflow_id=record.workflow_id,
        workflow_type=record.workflow_type,
        activity_id=activity_id(record.workflow_id, step.seq, step.attempt),
        seq=step.seq,
        attempt=step.attempt,
        participant=participant,
        activity=activity,
        payload=step.payload,
        scheduled_at_ms=step.at_ms,
        compensation=step.compensation,
    )


def fail(record: WorkflowRecord, now_ms: int, failure: Failure) -> WorkflowRecord:
    """Close a workflow as FAILED from outside its code (e.g. its record grew too large)."""
    return _close(record, now_ms, WorkflowStatus.FAILED, failure=failure)


def pending_tasks(record: WorkflowRecord) -> tuple[ActivityTask, ...]:
    """Tasks of a running workflow whose latest attempt has no outcome yet."""
    if record.status.terminal:
        return ()
    latest: dict[int, ActivityScheduled] = {}
    settled: set[tuple[int, int]] = set()
    for event in record.events:
        if isinstance(event, ActivityScheduled):
            latest[event.seq] = event
        else:
            settled.add((event.seq, event.attempt))
    return tuple(_task(record, s) for s in latest.values() if (s.seq, s.attempt) not in settled)
