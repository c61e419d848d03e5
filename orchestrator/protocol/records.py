"""The records that travel on sagaline's topics, as immutable Python values.

Each class mirrors one schema in ``schemas/avro/``; :mod:`orchestrator.protocol.codec`
turns them into Avro bytes and back. The replay engine keeps its state in these same
types, so what is in memory is exactly what is durable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

JSON_ENCODING = "json/plain"


class WorkflowStatus(enum.Enum):
    """Lifecycle of a workflow. Every status but RUNNING and STUCK is terminal."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    STUCK = "STUCK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"

    @property
    def terminal(self) -> bool:
        """True once the workflow will take no further input."""
        return self not in (WorkflowStatus.RUNNING, WorkflowStatus.STUCK, WorkflowStatus.UNKNOWN)


class ActivityStatus(enum.Enum):
    """Outcome of one activity attempt."""

    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class Payload:
    """A user value in transit; ``encoding`` says how to read ``data``."""

    data: bytes
    encoding: str = JSON_ENCODING


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an activity or workflow failed."""

    error_type: str
    message: str
    retryable: bool = False
    effects_committed: bool = False


@dataclass(frozen=True, slots=True)
class StartWorkflow:
    """Inbox input: start ``workflow_type`` under ``workflow_id`` with ``input``."""

    workflow_id: str
    workflow_type: str
    input: Payload
    requested_at_ms: int


@dataclass(frozen=True, slots=True)
class ActivityResult:
    """Inbox input: the outcome of one activity attempt, from a participant."""

    workflow_id: str
    activity_id: str
    seq: int
    attempt: int
    status: ActivityStatus
    finished_at_ms: int
    result: Payload | None = None
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class ResumeWorkflow:
    """Inbox input: re-drive a STUCK workflow with the code deployed now.

    ``workflow_id`` None means every stuck workflow of the inbox partition the record is
    produced to.
    """

    workflow_id: str | None
    requested_at_ms: int


InboxBody = StartWorkflow | ActivityResult | ResumeWorkflow


@dataclass(frozen=True, slots=True)
class ActivityTask:
    """Command to a participant: run one attempt of an activity."""

    workflow_id: str
    workflow_type: str
    activity_id: str
    seq: int
    attempt: int
    participant: str
    activity: str
    payload: Payload
    scheduled_at_ms: int
    compensation: bool = False
    deadline_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ActivityScheduled:
    """History event: attempt ``attempt`` of step ``seq`` was sent to a participant."""

    seq: int
    attempt: int
    name: str
    payload: Payload
    at_ms: int
    compensation: bool = False
    max_attempts: int = 1
    non_retryable: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ActivityCompleted:
    """History event: attempt ``attempt`` of step ``seq`` returned ``result``."""

    seq: int
    attempt: int
    result: Payload
    at_ms: int


@dataclass(frozen=True, slots=True)
class ActivityFailed:
    """History event: attempt ``attempt`` of step ``seq`` failed."""

    seq: int
    attempt: int
    failure: Failure
    at_ms: int


HistoryEvent = ActivityScheduled | ActivityCompleted | ActivityFailed


@dataclass(frozen=True, slots=True)
class WorkflowRecord:
    """The whole durable state of one workflow, as stored on the history topic."""

    workflow_id: str
    workflow_type: str
    status: WorkflowStatus
    input: Payload
    started_at_ms: int
    updated_at_ms: int
    revision: int = 0
    events: tuple[HistoryEvent, ...] = field(default=())
    result: Payload | None = None
    failure: Failure | None = None
    closed_at_ms: int | None = None
    run_id: str = ""


def activity_id(workflow_id: str, seq: int, attempt: int, run_id: str = "") -> str:
    """The stable id of one activity attempt, which participants dedupe on.

    ``<workflow id>/<run id>/<seq>/<attempt>``; records written before run ids existed
    (empty ``run_id``) keep the older ``<workflow id>/<seq>/<attempt>``.
    """
    if run_id:
        return f"{workflow_id}/{run_id}/{seq}/{attempt}"
    return f"{workflow_id}/{seq}/{attempt}"
