"""Parent and child workflows: the inbox records one workflow's transition sends others.

Rules of this module:
- Pure, like the engine: a transition in, the same transition with ``messages`` (inbox
  records for other workflows, produced in the same Kafka transaction) out.
- A child step (``ctx.child_workflow``: an ``ActivityScheduled`` with a
  ``child_workflow_id``) is sent as a ``StartWorkflow`` keyed by the child's id, not as a
  task; its request id is the parent's run and step, so a start sent again is recognised.
- A child reports to its parent's step when it closes, as the outcome of that step's only
  attempt (an ``ActivityResult``); a child whose start was refused is reported failed.
- A workflow that closes applies each open child's ``ParentClosePolicy`` (terminate, ask
  to cancel, or abandon); a cancel requested of a workflow reaches its open children whose
  policy is not ``ABANDON``, so their compensations run.
- Nothing here reads the code or the clock: only the records before and after.
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
    CancelRequested,
    CancelWorkflow,
    Failure,
    IfClosed,
    IfRunning,
    InboxBody,
    ParentClosePolicy,
    ParentRef,
    StartWorkflow,
    TerminateWorkflow,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.replay.timing import TIMEOUTS
from orchestrator.replay.transition import Transition

CHILD_FAILED: Final = "ChildWorkflowFailed"
"""The error type a parent's step fails with when its child ended other than COMPLETED."""
CHILD_PARTICIPANT: Final = ""
"""The participant of a child step's task: no participant has it, so the shell can tell a
child step from an activity without looking the step up."""


def link(
    before: WorkflowRecord | None,
    body: InboxBody | WakeUp,
    transition: Transition,
    now_ms: int,
) -> Transition:
    """``transition`` with the child starts it makes sent as inbox records instead of
    tasks, and the reports, terminations and cancels its closing or cancel sends."""
    after = transition.record
    messages: list[InboxBody] = []
    if transition.replaced is not None:
        # The run a start replaces goes first: its children are terminated (or asked to
        # cancel) before the new run starts any under the same ids.
        messages.extend(closing_messages(transition.replaced, now_ms))
    tasks = transition.tasks
    if after is not None and any(t.participant == CHILD_PARTICIPANT for t in tasks):
        tasks = _start_children(after, tasks, now_ms, messages)
    if (
        isinstance(body, StartWorkflow)
        and body.parent is not None
        and transition.reply is not None
        and not transition.reply.ok
    ):
        refused = transition.reply.failure or Failure("StartRefused", "the start was refused")
        why = Failure(
            refused.error_type,
            f"child workflow {safe_text(body.workflow_id, MAX_NAME_CHARS)!r} was not "
            f"started: {refused.message}",
        )
        messages.append(_report(body.parent, now_ms, failure=why))
    prior = before
    if prior is not None and after is not None and prior.run_id != after.run_id:
        prior = None  # a new run of the id: it did not close before, whatever the last did
    if transition.replaced is not None:
        prior = None
    if after is not None:
        if after.status.terminal and (prior is None or not prior.status.terminal):
            messages.extend(closing_messages(after, now_ms))
        elif isinstance(body, CancelWorkflow) and prior is not None and not prior.status.terminal:
            # Passed on to the children open before the cancel (one started while
            # handling it is the code's own business).
            reason = f"its parent {safe_text(after.workflow_id, MAX_NAME_CHARS)!r} was cancelled"
            for child in _open_children(prior):
                if child.parent_close_policy is not ParentClosePolicy.ABANDON:
                    messages.append(_child_cancel(after, child, reason, now_ms))
    if not messages and tasks is transition.tasks:
        return transition
    return dataclasses.replace(transition, tasks=tasks, messages=(*transition.messages, *messages))


def closing_messages(record: WorkflowRecord, now_ms: int) -> list[InboxBody]:
    """What a workflow closing sends: its report to its parent, and its open children's
    close policies (a workflow that was asked to cancel asks its children to cancel too,
    rather than terminate them)."""
    messages: list[InboxBody] = []
    parent = record.parent
    # A run that continued as new has not ended the workflow: its last run reports.
    if parent is not None and record.status is not WorkflowStatus.CONTINUED_AS_NEW:
        if record.status is WorkflowStatus.COMPLETED and record.result is not None:
            messages.append(_report(parent, now_ms, result=record))
        else:
            own = record.failure
            detail = "" if own is None else f": {own.error_type}: {own.message}"
            message = (
                f"child workflow {safe_text(record.workflow_id, MAX_NAME_CHARS)!r} ended "
                f"{record.status.value}{detail}"
            )
            messages.append(_report(parent, now_ms, failure=Failure(CHILD_FAILED, message)))
    children = _open_children(record)
    if not children:
        return messages
    cancelled = any(type(e) is CancelRequested for e in record.events)
    reason = (
        f"its parent {safe_text(record.workflow_id, MAX_NAME_CHARS)!r} ended {record.status.value}"
    )
    for child in children:
        policy = child.parent_close_policy or ParentClosePolicy.TERMINATE
        if policy is ParentClosePolicy.TERMINATE and not cancelled:
            assert child.child_workflow_id is not None
            messages.append(
                TerminateWorkflow(
                    child.child_workflow_id, reason, now_ms, _parent_of(record, child)
                )
            )
        elif policy is not ParentClosePolicy.ABANDON:
            messages.append(_child_cancel(record, child, reason, now_ms))
    return messages


def _parent_of(record: WorkflowRecord, child: ActivityScheduled) -> ParentRef:
    return ParentRef(record.workflow_id, record.run_id, child.seq)


def _child_cancel(
    record: WorkflowRecord, child: ActivityScheduled, reason: str, now_ms: int
) -> CancelWorkflow:
    """A cancel for ``child`` that only the run ``record`` started takes."""
    assert child.child_workflow_id is not None
    return CancelWorkflow(child.child_workflow_id, reason, now_ms, _parent_of(record, child))


def child_request_id(parent: WorkflowRecord, seq: int) -> str:
    """The request id of the start of child step ``seq`` of ``parent``'s run."""
    return f"child:{parent.run_id}:{seq}"


def _start_children(
    record: WorkflowRecord,
    tasks: tuple[ActivityTask, ...],
    now_ms: int,
    messages: list[InboxBody],
) -> tuple[ActivityTask, ...]:
    steps = {
        e.seq: e
        for e in record.events
        if type(e) is ActivityScheduled and e.child_workflow_id is not None
    }
    kept: list[ActivityTask] = []
    for task in tasks:
        step = steps.get(task.seq) if task.participant == CHILD_PARTICIPANT else None
        if step is None or step.child_workflow_id is None:
            kept.append(task)
            continue
        messages.append(
            StartWorkflow(
                workflow_id=step.child_workflow_id,
                workflow_type=step.name,
                input=step.payload,
                requested_at_ms=now_ms,
                request_id=child_request_id(record, step.seq),
                if_running=IfRunning.FAIL,
                if_closed=IfClosed.ALLOW,
                parent=ParentRef(record.workflow_id, record.run_id, step.seq),
            )
        )
    return tuple(kept)


def _open_children(record: WorkflowRecord) -> list[ActivityScheduled]:
    """Child steps that were started and have not reported: no outcome, or only a timeout
    of the parent's own (the child may still run)."""
    children: dict[int, ActivityScheduled] = {}
    reported: set[int] = set()
    for event in record.events:
        kind = type(event)
        if kind is ActivityScheduled:
            assert isinstance(event, ActivityScheduled)
            if event.child_workflow_id is not None:
                children[event.seq] = event
        elif kind is ActivityCompleted:
            reported.add(event.seq)  # type: ignore[union-attr]
        elif kind is ActivityFailed:
            assert isinstance(event, ActivityFailed)
            if event.failure.error_type not in TIMEOUTS:
                reported.add(event.seq)
    return [step for seq, step in children.items() if seq not in reported]


def _report(
    parent: ParentRef,
    now_ms: int,
    *,
    result: WorkflowRecord | None = None,
    failure: Failure | None = None,
) -> ActivityResult:
    """The outcome of the parent's child step (its only attempt)."""
    return ActivityResult(
        workflow_id=parent.workflow_id,
        activity_id=activity_id(parent.workflow_id, parent.seq, 1, parent.run_id),
        seq=parent.seq,
        attempt=1,
        status=ActivityStatus.COMPLETED if failure is None else ActivityStatus.FAILED,
        finished_at_ms=now_ms,
        result=None if result is None else result.result,
        failure=failure,
    )


__all__ = ["CHILD_FAILED", "CHILD_PARTICIPANT", "child_request_id", "closing_messages", "link"]
