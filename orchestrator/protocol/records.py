"""The records that travel on sagaline's topics, as immutable Python values.

Each class mirrors one schema in ``schemas/avro/``; :mod:`orchestrator.protocol.codec`
turns them into Avro bytes and back. The replay engine keeps its state in these same
types, so what is in memory is exactly what is durable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

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
    TERMINATED = "TERMINATED"
    CONTINUED_AS_NEW = "CONTINUED_AS_NEW"
    """The run ended by starting the next run of the same workflow id
    (``ctx.continue_as_new``); the workflow goes on in that run."""
    UNKNOWN = "UNKNOWN"

    @property
    def terminal(self) -> bool:
        """True once the workflow will take no further input."""
        return self not in _OPEN_STATUSES


# A module-level set: member lookups through the enum class are slow, and the loop asks
# this of every record it handles.
_OPEN_STATUSES: Final = frozenset(
    (WorkflowStatus.RUNNING, WorkflowStatus.STUCK, WorkflowStatus.UNKNOWN)
)


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
    """Why an activity or workflow failed.

    ``retry_after_ms``: the participant asks that the next attempt wait at least this long
    (a rate-limited API); it overrides the retry policy's next interval.
    """

    error_type: str
    message: str
    retryable: bool = False
    effects_committed: bool = False
    retry_after_ms: int | None = None


class IfRunning(enum.Enum):
    """What a start does when its workflow id has a run that is still open."""

    USE_EXISTING = "USE_EXISTING"
    """Start nothing; answer with the open run (``created`` false)."""
    FAIL = "FAIL"
    """Start nothing; answer with a failure naming the open run."""
    TERMINATE_EXISTING = "TERMINATE_EXISTING"
    """Close the open run as TERMINATED (no compensation runs) and start a new one."""


class IfClosed(enum.Enum):
    """What a start does when its workflow id's last run has closed (and is retained)."""

    ALLOW = "ALLOW"
    """Start a new run under the same id."""
    ALLOW_IF_FAILED = "ALLOW_IF_FAILED"
    """Start a new run only if the last one did not complete (failed, compensated,
    cancelled or terminated)."""
    REJECT = "REJECT"
    """Start nothing; answer with a failure."""


class ParentClosePolicy(enum.Enum):
    """What happens to a child workflow still running when its parent closes."""

    TERMINATE = "TERMINATE"
    """The child is terminated (no compensations run)."""
    REQUEST_CANCEL = "REQUEST_CANCEL"
    """The child is asked to cancel: it sees ``WorkflowCancelledError`` and compensates."""
    ABANDON = "ABANDON"
    """The child runs on; its outcome is no longer awaited."""


@dataclass(frozen=True, slots=True)
class ParentRef:
    """The step ``seq`` of run ``run_id`` of workflow ``workflow_id`` that started a child
    workflow; the child reports its outcome to it."""

    workflow_id: str
    run_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class StartWorkflow:
    """Inbox input: start ``workflow_type`` under ``workflow_id`` with ``input``.

    ``request_id`` set: the orchestrator answers with a :class:`Reply`, and a start with
    the request id of the run it created (a retried send) gets the same answer again.
    ``if_running`` / ``if_closed`` None mean ``USE_EXISTING`` / ``REJECT`` (what a start
    always did before they existed).
    """

    workflow_id: str
    workflow_type: str
    input: Payload
    requested_at_ms: int
    request_id: str | None = None
    if_running: IfRunning | None = None
    if_closed: IfClosed | None = None
    parent: ParentRef | None = None


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


@dataclass(frozen=True, slots=True)
class ActivityStarted:
    """Inbox input: a participant began running one activity attempt.

    Sent only for tasks with ``report_start`` (a start-to-close or heartbeat timeout), so
    those timeouts count from the real start.
    """

    workflow_id: str
    activity_id: str
    seq: int
    attempt: int
    started_at_ms: int


@dataclass(frozen=True, slots=True)
class ActivityHeartbeat:
    """Inbox input: a running attempt is alive; ``details`` is its progress so far.

    The last details are kept with the workflow and handed to the next attempt.
    """

    workflow_id: str
    activity_id: str
    seq: int
    attempt: int
    at_ms: int
    details: Payload | None = None


@dataclass(frozen=True, slots=True)
class SignalWorkflow:
    """Inbox input: the named signal ``name`` with ``payload`` for a running workflow.

    ``signal_id`` is unique per signal: a workflow ignores a second signal with an id it
    already received, so a retried send is safe. ``start``, if set, starts the workflow
    first when it does not exist (signal-with-start).
    """

    workflow_id: str
    name: str
    payload: Payload
    signal_id: str
    sent_at_ms: int
    start: StartWorkflow | None = None


@dataclass(frozen=True, slots=True)
class CompletePromise:
    """Inbox input: complete (``payload``) or fail (``failure``) the promise ``promise_id``
    that a workflow made with ``ctx.promise`` and handed out."""

    workflow_id: str
    promise_id: str
    completed_at_ms: int
    payload: Payload | None = None
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class CancelWorkflow:
    """Inbox input: ask the running workflow to cancel, for ``reason``; with ``parent``
    (a parent passing its cancel or close on), only the run that parent step started."""

    workflow_id: str
    reason: str
    requested_at_ms: int
    parent: ParentRef | None = None


@dataclass(frozen=True, slots=True)
class TerminateWorkflow:
    """Inbox input: end the workflow now as TERMINATED, for ``reason``, without running
    its code (no compensations)."""

    workflow_id: str
    reason: str
    requested_at_ms: int
    parent: ParentRef | None = None
    """Set by a parent closing: only the run that this parent step started is ended."""


@dataclass(frozen=True, slots=True)
class QueryWorkflow:
    """Inbox input: answer query ``name`` with ``args`` from the workflow's current state
    (its ``ctx.on_query`` handler); the answer is a :class:`Reply` keyed by
    ``request_id``. Never changes the workflow."""

    workflow_id: str
    request_id: str
    name: str
    args: Payload
    sent_at_ms: int


@dataclass(frozen=True, slots=True)
class UpdateWorkflow:
    """Inbox input: apply update ``name`` with ``args`` (its ``ctx.on_update`` handler,
    after its validator); the answer is a :class:`Reply` keyed by ``update_id``, sent
    once the update is recorded."""

    workflow_id: str
    update_id: str
    name: str
    args: Payload
    sent_at_ms: int


InboxBody = (
    StartWorkflow
    | ActivityResult
    | ResumeWorkflow
    | ActivityStarted
    | ActivityHeartbeat
    | SignalWorkflow
    | CompletePromise
    | CancelWorkflow
    | QueryWorkflow
    | UpdateWorkflow
    | TerminateWorkflow
)


class ReplyKind(enum.Enum):
    """Which request a :class:`Reply` answers."""

    START = "START"
    QUERY = "QUERY"
    UPDATE = "UPDATE"


@dataclass(frozen=True, slots=True)
class Reply:
    """The orchestrator's answer to a request that asked for one, on the replies topic.

    ``ok``: ``payload`` is the answer (a query's or update's value; None for a start).
    Otherwise ``failure`` says why not. ``run_id`` and ``status`` describe the run the
    answer is about (empty when there is none); ``created`` is true when a start made a
    new run.
    """

    request_id: str
    kind: ReplyKind
    workflow_id: str
    run_id: str
    ok: bool
    status: str
    at_ms: int
    created: bool = False
    payload: Payload | None = None
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class WakeUp:
    """Internal input, never on the wire: the workflow's ``wake_at_ms`` has come.

    The orchestrator feeds it from its timer index inside the same transaction as inbox
    inputs; the engine fires every timer, retry and timeout that is due.
    """

    workflow_id: str


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
    start_to_close_ms: int | None = None
    heartbeat_timeout_ms: int | None = None
    heartbeat_details: Payload | None = None
    report_start: bool = False


@dataclass(frozen=True, slots=True)
class ActivityScheduled:
    """History event: attempt ``attempt`` of step ``seq`` was sent to a participant.

    Every attempt carries the step's retry policy and timeouts (milliseconds; None means
    no such timeout), so retries and timeouts are decided from the record alone.
    ``backoff_ms`` is how long the engine waited after the previous attempt failed.
    """

    seq: int
    attempt: int
    name: str
    payload: Payload
    at_ms: int
    compensation: bool = False
    max_attempts: int = 1
    non_retryable: tuple[str, ...] = ()
    initial_interval_ms: int = 0
    backoff_coefficient: float = 2.0
    maximum_interval_ms: int = 0
    schedule_to_close_ms: int | None = None
    start_to_close_ms: int | None = None
    heartbeat_timeout_ms: int | None = None
    backoff_ms: int = 0
    child_workflow_id: str | None = None
    parent_close_policy: ParentClosePolicy | None = None


@dataclass(frozen=True, slots=True)
class ActivityCompleted:
    """History event: attempt ``attempt`` of step ``seq`` returned ``result``."""

    seq: int
    attempt: int
    result: Payload
    at_ms: int


@dataclass(frozen=True, slots=True)
class ActivityFailed:
    """History event: attempt ``attempt`` of step ``seq`` failed.

    ``retry_at_ms`` set: another attempt is due then (a durable backoff timer); the
    failure is final only when it is None.
    """

    seq: int
    attempt: int
    failure: Failure
    at_ms: int
    retry_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    """History event: the participant began attempt ``attempt`` of step ``seq``."""

    seq: int
    attempt: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class AttemptHeartbeat:
    """History event: the latest heartbeat of attempt ``attempt`` of step ``seq``.

    Only the latest heartbeat of a step is kept: a new one replaces it.
    """

    seq: int
    attempt: int
    at_ms: int
    details: Payload | None = None


@dataclass(frozen=True, slots=True)
class TimerStarted:
    """History event: command ``seq`` is a durable timer that fires at ``fire_at_ms``."""

    seq: int
    fire_at_ms: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class TimerFired:
    """History event: timer ``seq`` fired (``at_ms`` is when, at or after it was due)."""

    seq: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class TimerCancelled:
    """History event: the code no longer needs timer ``seq`` (e.g. a timeout not reached)."""

    seq: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class SignalReceived:
    """History event: the workflow received signal ``name`` (``ctx.wait_signal`` takes the
    signals of a name in this order)."""

    name: str
    payload: Payload
    signal_id: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class PromiseCreated:
    """History event: command ``seq`` is a promise named ``name`` that something outside
    the workflow completes by its id (:func:`promise_id`)."""

    seq: int
    name: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class PromiseCompleted:
    """History event: promise ``seq`` was completed with ``payload`` or failed with
    ``failure`` (exactly one is set)."""

    seq: int
    at_ms: int
    payload: Payload | None = None
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """History event: cancellation was asked for; the code saw ``WorkflowCancelledError``
    at this point of its history."""

    reason: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class UpdateAccepted:
    """History event: update ``update_id`` (handler ``name``, argument ``args``) passed its
    validator and is applied at this point of the history: replay calls its handler here."""

    update_id: str
    name: str
    args: Payload
    at_ms: int


@dataclass(frozen=True, slots=True)
class PatchMarker:
    """History event: the code asked ``ctx.patched(patch_id)`` (or
    ``ctx.deprecate_patch``, then ``deprecated``) for the first time in this run while past
    all recorded history, so the patch is on for the rest of the run. ``position``: the
    number of commands the code had scheduled when it asked (replay checks the code asks
    at the same point)."""

    patch_id: str
    position: int
    deprecated: bool
    at_ms: int


HistoryEvent = (
    ActivityScheduled
    | ActivityCompleted
    | ActivityFailed
    | AttemptStarted
    | AttemptHeartbeat
    | TimerStarted
    | TimerFired
    | TimerCancelled
    | SignalReceived
    | PromiseCreated
    | PromiseCompleted
    | CancelRequested
    | UpdateAccepted
    | PatchMarker
)


@dataclass(frozen=True, slots=True)
class RunRequest:
    """The request id of the start that created a run, and the run's id."""

    request_id: str
    run_id: str


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
    wake_at_ms: int | None = None
    request_id: str | None = None
    earlier_requests: tuple[RunRequest, ...] = ()
    parent: ParentRef | None = None
    earlier_inputs: tuple[str, ...] = ()
    """Signal ids (``s:<id>``) and update ids (``u:<id>``) earlier runs took, newest
    first, carried by ``ctx.continue_as_new`` so a resent one is not applied again."""


def promise_id(workflow_id: str, run_id: str, seq: int) -> str:
    """The id of promise ``seq`` of a run: ``<workflow id>/<run id>/p<seq>``."""
    return f"{workflow_id}/{run_id}/p{seq}"


def parse_promise_id(text: str) -> tuple[str, str, int] | None:
    """(workflow id, run id, seq) of a promise id, or None if it is not one."""
    workflow_id, sep, rest = text.rpartition("/")
    digits = rest[1:]
    # Canonical only: one id per promise, and never a number past an Avro int.
    if (
        not sep
        or not rest.startswith("p")
        or not digits.isascii()
        or not digits.isdigit()
        or len(digits) > 10
        or (digits != "0" and digits.startswith("0"))
        or int(digits) > 2**31 - 1
    ):
        return None
    workflow_id, sep, run_id = workflow_id.rpartition("/")
    if not sep or not workflow_id:
        return None
    return workflow_id, run_id, int(digits)


def activity_id(workflow_id: str, seq: int, attempt: int, run_id: str = "") -> str:
    """The stable id of one activity attempt, which participants dedupe on.

    ``<workflow id>/<run id>/<seq>/<attempt>``; records written before run ids existed
    (empty ``run_id``) keep the older ``<workflow id>/<seq>/<attempt>``.
    """
    if run_id:
        return f"{workflow_id}/{run_id}/{seq}/{attempt}"
    return f"{workflow_id}/{seq}/{attempt}"
