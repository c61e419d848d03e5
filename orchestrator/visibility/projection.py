"""From a history record to visibility rows: pure, so it is tested without a database."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Final

from orchestrator.protocol.records import (
    JSON_ENCODING,
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    Failure,
    HistoryEvent,
    Payload,
    PromiseCompleted,
    PromiseCreated,
    TimerCancelled,
    TimerFired,
    TimerStarted,
    WorkflowRecord,
)
from orchestrator.visibility.models import EventRow, WorkflowRow

# Payloads are shown, not archived in full: a row holds at most this much of one.
MAX_PAYLOAD_CHARS: Final = 16_384
# The fields an EventRow has columns for; the rest of an event goes to ``detail``.
_COLUMNS: Final = frozenset(("seq", "attempt", "at_ms", "name"))


def clean(text: str) -> str:
    """``text`` as PostgreSQL stores it: NUL, which no text or jsonb value may hold, shown
    as U+FFFD. Any client can put one in a workflow type, a signal id or a payload, and
    one such record must not stop the projection."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def payload_text(payload: Payload | None) -> str | None:
    """A payload as readers see it: JSON as sent, other encodings as a size note.

    Longer text is cut at :data:`MAX_PAYLOAD_CHARS` and says how long it was.
    """
    if payload is None:
        return None
    if payload.encoding != JSON_ENCODING:
        return clean(f"<{len(payload.data)} bytes {payload.encoding}>")
    text = clean(payload.data.decode("utf-8", "replace"))
    if len(text) > MAX_PAYLOAD_CHARS:
        return f"{text[:MAX_PAYLOAD_CHARS]}… ({len(payload.data)} bytes)"
    return text


def failure_json(failure: Failure) -> dict[str, Any]:
    """A failure as JSON: its type, message and whether it was retryable."""
    return {
        "error_type": clean(failure.error_type),
        "message": clean(failure.message),
        "retryable": failure.retryable,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Payload):
        return payload_text(value)
    if isinstance(value, Failure):
        return failure_json(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, str):
        return clean(value)
    return value


def event_row(index: int, event: HistoryEvent) -> EventRow:
    """One history event as an :class:`EventRow`."""
    detail: dict[str, Any] = {}
    for f in dataclasses.fields(event):
        if f.name in _COLUMNS:
            continue
        value = getattr(event, f.name)
        if value is None or value == () or (f.name == "compensation" and value is False):
            continue
        detail[f.name] = _jsonable(value)
    return EventRow(
        index=index,
        kind=type(event).__name__,
        at_ms=event.at_ms,
        seq=getattr(event, "seq", None),
        attempt=getattr(event, "attempt", None),
        name=_text(getattr(event, "name", None) or getattr(event, "patch_id", None)),
        detail=detail,
    )


def _text(value: str | None) -> str | None:
    return None if value is None else clean(value)


def waiting_on(record: WorkflowRecord) -> tuple[str | None, int]:
    """What an open run waits on, and the attempt number of that step.

    The latest command still pending wins: an activity (or child workflow) with no final
    outcome yet, a timer not fired or cancelled, a promise not completed. An open run with
    none of these waits on a signal or an update (``waiting``); a STUCK run is ``stuck``.
    A closed run waits on nothing.
    """
    pending: dict[int, tuple[str, int]] = {}
    last_attempt = 0
    for event in record.events:
        if isinstance(event, ActivityScheduled):
            kind = "child" if event.child_workflow_id else "activity"
            label = event.child_workflow_id if event.child_workflow_id else event.name
            if event.compensation:
                kind = "compensation"
            pending[event.seq] = (clean(f"{kind} {label}"), event.attempt)
            last_attempt = event.attempt
        elif isinstance(event, ActivityCompleted) or (
            isinstance(event, ActivityFailed) and event.retry_at_ms is None
        ):
            pending.pop(event.seq, None)
        elif isinstance(event, TimerStarted):
            pending[event.seq] = ("timer", 0)
        elif isinstance(event, TimerFired | TimerCancelled | PromiseCompleted):
            pending.pop(event.seq, None)
        elif isinstance(event, PromiseCreated):
            pending[event.seq] = (clean(f"promise {event.name}"), 0)
    if record.status.terminal:
        return None, last_attempt
    if record.status.value == "STUCK":
        return "stuck", last_attempt
    if not pending:
        return "waiting", last_attempt
    step, attempt = pending[max(pending)]
    return step, attempt


def project(
    record: WorkflowRecord, partition: int, offset: int
) -> tuple[WorkflowRow, list[EventRow]]:
    """The workflow row and the event rows of one history record."""
    step, attempts = waiting_on(record)
    failure = record.failure
    row = WorkflowRow(
        workflow_id=clean(record.workflow_id),
        run_id=clean(record.run_id),
        workflow_type=clean(record.workflow_type),
        status=record.status.value,
        started_at_ms=record.started_at_ms,
        updated_at_ms=record.updated_at_ms,
        closed_at_ms=record.closed_at_ms,
        revision=record.revision,
        current_step=step,
        attempts=attempts,
        error_type=clean(failure.error_type) if failure else None,
        error_message=clean(failure.message) if failure else None,
        result=payload_text(record.result),
        input=payload_text(record.input),
        parent_workflow_id=clean(record.parent.workflow_id) if record.parent else None,
        partition=partition,
        offset=offset,
    )
    return row, [event_row(i, e) for i, e in enumerate(record.events)]
