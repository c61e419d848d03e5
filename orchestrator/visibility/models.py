"""Rows of the visibility tables, as the store returns them (pure data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.protocol.records import WorkflowStatus

STATUSES: tuple[str, ...] = tuple(s.value for s in WorkflowStatus)


@dataclass(frozen=True, slots=True)
class WorkflowRow:
    """One run of one workflow, as last projected from the history topic.

    ``current_step``: what an open run waits on (``activity <name>``, ``timer``,
    ``signal <name>``, ``promise <name>``), None once closed. ``attempts``: the attempt
    number of the step it waits on (0 if none). ``error_type``/``error_message``: the
    failure of a closed run, or the reason a STUCK run is parked. ``result`` and ``input``
    are the payloads as text (JSON as sent; other encodings as ``<N bytes ENC>``).
    ``archived``: retention has tombstoned the run's history record; this row is all
    that is left of it. ``partition``/``offset``: where its last projected record is.
    """

    workflow_id: str
    run_id: str
    workflow_type: str
    status: str
    started_at_ms: int
    updated_at_ms: int
    closed_at_ms: int | None
    revision: int
    current_step: str | None
    attempts: int
    error_type: str | None
    error_message: str | None
    result: str | None
    input: str | None
    parent_workflow_id: str | None
    partition: int
    offset: int
    archived: bool = False

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict (``sagaline describe --json``, the UI's API)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class EventRow:
    """One history event of a run, in history order (``index`` from 0).

    ``kind``: the event's class name (``ActivityScheduled``, ``ActivityFailed``,
    ``TimerStarted``, ``SignalReceived``, ...). ``seq``/``attempt``: the command and
    attempt it belongs to, where it has them. ``name``: the activity, signal, promise,
    update or patch name, where it has one. ``detail``: the rest of its fields, JSON-ready
    (payloads as text, failures as ``{"error_type", "message", "retryable"}``).
    """

    index: int
    kind: str
    at_ms: int
    seq: int | None = None
    attempt: int | None = None
    name: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class WorkflowFilter:
    """Which runs ``list`` returns; every field narrows, None means any.

    Runs come newest first by ``started_at_ms`` (then workflow id, run id); pass the
    last row's ``(started_at_ms, workflow_id, run_id)`` as ``before`` for the next page.
    """

    workflow_type: str | None = None
    statuses: tuple[str, ...] = ()
    id_prefix: str | None = None
    started_after_ms: int | None = None
    started_before_ms: int | None = None
    before: tuple[int, str, str] | None = None
    limit: int = 50
