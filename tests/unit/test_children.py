"""Child workflows and TerminateWorkflow in the pure engine: ``ctx.child_workflow`` steps
sent as ``StartWorkflow`` messages, a child's report to its parent's step, refused and
retried child starts, parent close policies, cancels reaching children, terminations,
determinism of child steps, argument checks and ``WorkflowTester.child``.

Parent and child are each driven by a ``WorkflowRun`` (every record survives the Avro
round trip and carries the right wake time); the test carries each ``Transition.messages``
record from one to the other, as the orchestrator shell would through the inbox topic.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator import (
    ActivityError,
    ChildWorkflowError,
    ConfigurationError,
    IfClosed,
    IfRunning,
    ParentClosePolicy,
    Saga,
    WorkflowCancelledError,
    WorkflowContext,
    WorkflowRegistry,
)
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.failures import safe_text
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityScheduled,
    ActivityStatus,
    CancelWorkflow,
    Failure,
    InboxBody,
    ParentRef,
    Reply,
    StartWorkflow,
    TerminateWorkflow,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.protocol.topics import Topics
from orchestrator.replay import Limits, Transition, advance
from orchestrator.replay.engine import (
    IGNORED_REASONS,
    MAX_REASON_CHARS,
    OTHER_RUN,
    REJECTED_REASONS,
    ClosedRun,
    park,
    start_again,
)
from orchestrator.replay.links import CHILD_FAILED, CHILD_PARTICIPANT, child_request_id
from orchestrator.runtime.inputs import Batch, Input, InputProcessor
from orchestrator.runtime.state import PartitionState, WorkflowStore
from orchestrator.testing import UnscriptedActivityError, WorkflowBlockedError, WorkflowTester
from orchestrator.transport import TopicDirectory, record_size
from tests.unit.conftest import (
    T0,
    WorkflowRun,
    assert_encodable,
    assert_history,
    assert_status,
    task_lines,
)

CODEC = AvroCodec()
PID = "wf-1"
PRUN = "r1"
DEFAULT_CHILD_ID = f"{PID}/{PRUN}/c0"
POLICIES = list(ParentClosePolicy)
FIRST_STEP = ParentRef(PID, PRUN, 0)
"""The parent's step 0, which the child of most tests reports to."""


# --- workflows ------------------------------------------------------------------------


async def _child(ctx: WorkflowContext, value: Any) -> Any:
    """Raises for ``"raise"``; otherwise reserves, charges (a Saga) and returns the charge."""
    if value == "raise":
        raise ValueError("nope")
    async with Saga(ctx) as saga:
        reservation = await ctx.activity("inv.reserve", value)
        saga.add_compensation("inv.release", reservation)
        return await ctx.activity("pay.charge", reservation)


async def _parent(ctx: WorkflowContext, value: Any) -> Any:
    """Awaits one child with the default id and policy; returns how it failed, if it did."""
    try:
        return await ctx.child_workflow("child", value)
    except ChildWorkflowError as err:
        return {
            "error": err.error_type,
            "message": err.message,
            "activity_error": isinstance(err, ActivityError),
        }


async def _saga_parent(ctx: WorkflowContext, value: Any) -> Any:
    async with Saga(ctx) as saga:
        reservation = await ctx.activity("inv.reserve", value)
        saga.add_compensation("inv.release", reservation)
        return await ctx.child_workflow("child", value)


async def _named_parent(ctx: WorkflowContext, value: Any) -> Any:
    """One child under an explicit id, ``value["id"]``, with ``value["policy"]``."""
    policy = ParentClosePolicy(value.get("policy", "TERMINATE"))
    try:
        return await ctx.child_workflow(
            "child", value.get("input"), id=value["id"], parent_close_policy=policy
        )
    except ChildWorkflowError as err:
        return {"error": err.error_type, "message": err.message}


async def _leaving_parent(ctx: WorkflowContext, value: Any) -> Any:
    """Starts a child (``value["policy"]``) without awaiting it, waits for ``p.work``, then
    completes or (``value["fail"]``) fails while the child runs."""
    ctx.child_workflow("child", "x", parent_close_policy=ParentClosePolicy(value["policy"]))
    work = await ctx.activity("p.work")
    if value.get("fail"):
        raise RuntimeError("parent gave up")
    return work


def _registry(**workflows: Any) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow("child")(_child)
    for name, fn in workflows.items():
        registry.workflow(name)(fn)
    return registry


REGISTRY = _registry(
    parent=_parent, saga_parent=_saga_parent, named=_named_parent, leaving=_leaving_parent
)


# --- helpers --------------------------------------------------------------------------


def _record(run: WorkflowRun) -> WorkflowRecord:
    assert run.record is not None, f"workflow {run.workflow_id} has no record"
    return run.record


def _result(run: WorkflowRun) -> Any:
    record = _record(run)
    assert record.result is not None, f"workflow {run.workflow_id} has no result: {record}"
    return decode_json(record.result)


def _last(run: WorkflowRun) -> Transition:
    assert run.last is not None, f"workflow {run.workflow_id} has had no input"
    return run.last


def _parent_run(
    workflow_type: str = "parent", value: Any = "in", registry: WorkflowRegistry = REGISTRY
) -> WorkflowRun:
    run = WorkflowRun(registry, workflow_type, workflow_id=PID, run_id=PRUN)
    run.start(value)
    return run


def _only_start(transition: Transition) -> StartWorkflow:
    """The one message of ``transition``, a child's start, which must not also be a task."""
    assert len(transition.messages) == 1, f"expected one child start: {transition.messages}"
    start = transition.messages[0]
    assert isinstance(start, StartWorkflow), f"expected a StartWorkflow, observed {start}"
    assert not any(t.participant == CHILD_PARTICIPANT for t in transition.tasks)
    return start


def _only_report(transition: Transition) -> ActivityResult:
    assert len(transition.messages) == 1, f"expected one report: {transition.messages}"
    report = transition.messages[0]
    assert isinstance(report, ActivityResult), f"expected an ActivityResult, observed {report}"
    return report


def _child_run(start: StartWorkflow, run_id: str = "c1") -> WorkflowRun:
    """The child workflow started by ``start`` (the parent's message)."""
    child = WorkflowRun(REGISTRY, start.workflow_type, workflow_id=start.workflow_id, run_id=run_id)
    child.now_ms = T0 + 100_000  # later than anything the parents do before
    child.send(start)
    return child


def _round_trip(message: InboxBody) -> None:
    assert CODEC.decode_inbox(CODEC.encode_inbox(message)) == message, message


def _child_report(
    status: ActivityStatus,
    now_ms: int,
    *,
    result: Any = None,
    failure: Failure | None = None,
    parent: ParentRef = FIRST_STEP,
) -> ActivityResult:
    return ActivityResult(
        workflow_id=parent.workflow_id,
        activity_id=activity_id(parent.workflow_id, parent.seq, 1, parent.run_id),
        seq=parent.seq,
        attempt=1,
        status=status,
        finished_at_ms=now_ms,
        result=None if failure is not None else encode_json(result),
        failure=failure,
    )


def _finish_child(child: WorkflowRun, charge: Any = "charged") -> ActivityResult:
    """Completes the child's reservation and charge; returns its report to the parent."""
    child.complete(0, "res-1")
    child.complete(1, charge)
    assert_status(child.record, WorkflowStatus.COMPLETED)
    return _only_report(_last(child))


# --- 1. the child's start --------------------------------------------------------------


def test_a_child_step_sends_exactly_one_start_and_no_task() -> None:
    run = _parent_run(value={"amount": 5})
    transition = _last(run)
    assert transition.tasks == ()
    start = _only_start(transition)
    assert start == StartWorkflow(
        workflow_id=DEFAULT_CHILD_ID,
        workflow_type="child",
        input=encode_json({"amount": 5}),
        requested_at_ms=run.now_ms,
        request_id=f"child:{PRUN}:0",
        if_running=IfRunning.FAIL,
        if_closed=IfClosed.ALLOW,
        parent=FIRST_STEP,
    )
    assert child_request_id(_record(run), 0) == start.request_id
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert_history(run.record, ["sched 0#1 child"])
    step = _record(run).events[0]
    assert isinstance(step, ActivityScheduled)
    assert step.child_workflow_id == DEFAULT_CHILD_ID
    assert step.parent_close_policy is ParentClosePolicy.TERMINATE
    assert step.schedule_to_close_ms is None
    assert _record(run).wake_at_ms is None  # waits for the child, not for time


def test_the_default_child_id_is_made_of_the_parent_id_run_and_step() -> None:
    async def later(ctx: WorkflowContext, value: Any) -> Any:
        await ctx.activity("p.first")
        await ctx.sleep(1)
        return await ctx.child_workflow("child", value)

    registry = _registry(later=later)
    run = WorkflowRun(registry, "later", workflow_id="order-9", run_id="run-x")
    run.start(1)
    assert run.last is not None and run.last.messages == ()
    run.complete(0, None)
    run.wake()
    start = _only_start(_last(run))
    assert start.workflow_id == "order-9/run-x/c2"
    assert start.request_id == "child:run-x:2"
    assert start.parent == ParentRef("order-9", "run-x", 2)
    assert start.requested_at_ms == run.now_ms


def test_an_explicit_child_id_and_policy_are_kept() -> None:
    run = _parent_run("named", {"id": "payment-of-7", "policy": "ABANDON", "input": [1, 2]})
    start = _only_start(_last(run))
    assert start.workflow_id == "payment-of-7"
    assert start.parent == FIRST_STEP
    assert decode_json(start.input) == [1, 2]
    step = _record(run).events[0]
    assert isinstance(step, ActivityScheduled)
    assert step.child_workflow_id == "payment-of-7"
    assert step.parent_close_policy is ParentClosePolicy.ABANDON


def test_child_steps_and_messages_round_trip_through_the_codec() -> None:
    run = _parent_run("named", {"id": "kid-ü", "policy": "REQUEST_CANCEL", "input": "x"})
    parent = assert_encodable(run.record)
    decoded = CODEC.decode_workflow(CODEC.encode_workflow(parent))
    step = decoded.events[0]
    assert isinstance(step, ActivityScheduled)
    assert (step.child_workflow_id, step.parent_close_policy) == (
        "kid-ü",
        ParentClosePolicy.REQUEST_CANCEL,
    )
    start = _only_start(_last(run))
    _round_trip(start)
    child = _child_run(start)
    record = assert_encodable(child.record)
    assert CODEC.decode_workflow(CODEC.encode_workflow(record)).parent == FIRST_STEP
    report = _finish_child(child)
    _round_trip(report)
    _round_trip(TerminateWorkflow("kid-ü", "because", T0))
    _round_trip(CancelWorkflow("kid-ü", "because", T0))
    _round_trip(TerminateWorkflow("kid-ü", "because", T0, ParentRef("pä", "r", 3)))
    _round_trip(CancelWorkflow("kid-ü", "because", T0, ParentRef("pä", "r", 3)))


# --- 2. reports to the parent ----------------------------------------------------------


def test_a_child_records_its_parent_and_its_completion_completes_the_parent() -> None:
    run = _parent_run(value="order")
    start = _only_start(_last(run))
    child = _child_run(start)
    first = _last(child)
    record = _record(child)
    assert record.parent == FIRST_STEP
    assert record.request_id == f"child:{PRUN}:0"
    assert record.workflow_id == DEFAULT_CHILD_ID and record.run_id == "c1"
    assert first.messages == ()  # nothing to report yet
    assert first.reply is not None and first.reply.ok and first.reply.created
    assert task_lines(first.tasks) == [f"{DEFAULT_CHILD_ID}/c1/0/1 inv.reserve"]
    child.complete(0, "res-1")
    assert _last(child).messages == ()
    child.complete(1, {"charge": 5})
    assert_status(child.record, WorkflowStatus.COMPLETED)
    report = _only_report(_last(child))
    assert report == _child_report(ActivityStatus.COMPLETED, child.now_ms, result={"charge": 5})
    assert report.activity_id == activity_id(PID, 0, 1, PRUN)
    run.send(report)
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _result(run) == {"charge": 5}
    assert_history(run.record, ["sched 0#1 child", "done 0#1"])
    assert _last(run).messages == ()  # the parent has no parent; the child reported


def _end_child(child: WorkflowRun, how: str) -> WorkflowStatus:
    """Ends the (running) child ``how``; returns the status it must end with."""
    if how == "compensated":
        child.complete(0, "res-1")
        child.fail(1, "PaymentDeclined")
        assert task_lines(_last(child).tasks) == [f"{child.workflow_id}/c1/2/1 inv.release comp"]
        child.complete(2, None)
        return WorkflowStatus.COMPENSATED
    if how == "cancelled":
        child.send(CancelWorkflow(child.workflow_id, "stop it", child.now_ms))
        return WorkflowStatus.CANCELLED
    assert how == "terminated"
    child.send(TerminateWorkflow(child.workflow_id, "ops said so", child.now_ms))
    return WorkflowStatus.TERMINATED


@pytest.mark.parametrize("how", ["raised", "compensated", "cancelled", "terminated"])
def test_a_child_that_does_not_complete_fails_the_parents_step(how: str) -> None:
    run = _parent_run(value="raise" if how == "raised" else "order")
    child = _child_run(_only_start(_last(run)))
    if how == "raised":
        expected = WorkflowStatus.FAILED
    else:
        assert_status(child.record, WorkflowStatus.RUNNING)
        expected = _end_child(child, how)
    assert_status(child.record, expected)
    report = _only_report(_last(child))
    assert report.status is ActivityStatus.FAILED and report.result is None
    assert report.failure is not None
    assert report.failure.error_type == CHILD_FAILED == "ChildWorkflowFailed"
    assert not report.failure.retryable
    assert f"ended {expected.value}" in report.failure.message
    assert repr(DEFAULT_CHILD_ID) in report.failure.message
    own = _record(child).failure
    assert own is not None and f"{own.error_type}: {own.message}" in report.failure.message
    if how == "raised":
        assert "ValueError: nope" in report.failure.message
    if how == "terminated":
        assert "ops said so" in report.failure.message
    assert report.activity_id == activity_id(PID, 0, 1, PRUN)
    assert (report.workflow_id, report.seq, report.attempt) == (PID, 0, 1)
    run.send(report)
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _result(run) == {
        "error": "ChildWorkflowFailed",
        "message": report.failure.message,
        "activity_error": True,
    }


def test_a_saga_in_the_parent_compensates_when_its_child_fails() -> None:
    run = _parent_run("saga_parent", "raise")
    assert task_lines(_last(run).tasks) == [f"{PID}/{PRUN}/0/1 inv.reserve"]
    run.complete(0, "res-9")
    start = _only_start(_last(run))
    assert _last(run).tasks == ()
    assert start.parent == ParentRef(PID, PRUN, 1)
    child = _child_run(start)
    report = _only_report(_last(child))
    assert report.seq == 1 and report.activity_id == activity_id(PID, 1, 1, PRUN)
    run.send(report)
    assert task_lines(_last(run).tasks) == [f"{PID}/{PRUN}/2/1 inv.release comp"]
    run.complete(2, None)
    assert_status(run.record, WorkflowStatus.COMPENSATED, "ChildWorkflowError")
    assert_history(
        run.record,
        [
            "sched 0#1 inv.reserve",
            "done 0#1",
            "sched 1#1 child",
            "fail 1#1 ChildWorkflowFailed",
            "sched 2#1 inv.release comp",
            "done 2#1",
        ],
    )


def test_a_grandchild_reports_to_its_parent_and_that_parent_to_its_own() -> None:
    async def middle(ctx: WorkflowContext, value: Any) -> Any:
        return {"middle": await ctx.child_workflow("child", value)}

    async def top(ctx: WorkflowContext, value: Any) -> Any:
        return {"top": await ctx.child_workflow("middle", value)}

    registry = _registry(middle=middle, top=top)
    run = _parent_run("top", "v", registry)
    mid = WorkflowRun(registry, "middle", workflow_id=DEFAULT_CHILD_ID, run_id="m1")
    mid.send(_only_start(_last(run)))
    leaf_start = _only_start(_last(mid))
    assert leaf_start.workflow_id == f"{DEFAULT_CHILD_ID}/m1/c0"
    assert leaf_start.parent == ParentRef(DEFAULT_CHILD_ID, "m1", 0)
    leaf = _child_run(leaf_start)
    mid.send(_finish_child(leaf, 42))
    assert_status(mid.record, WorkflowStatus.COMPLETED)
    run.send(_only_report(_last(mid)))
    assert _result(run) == {"top": {"middle": 42}}


# --- 3. refused and retried child starts ----------------------------------------------


def test_a_child_start_refused_by_an_open_run_is_reported_failed_to_the_parent() -> None:
    other = WorkflowRun(REGISTRY, "child", workflow_id="shared", run_id="o1")
    other.start("someone else's")
    before = _record(other)
    run = _parent_run("named", {"id": "shared"})
    start = _only_start(_last(run))
    refused = other.send(start)
    assert refused.ignored == "duplicate-start" and refused.record is None
    assert other.record is before  # the open run goes on untouched
    assert refused.tasks == ()
    assert refused.reply is not None and not refused.reply.ok
    report = _only_report(refused)
    assert report.status is ActivityStatus.FAILED
    assert report.activity_id == activity_id(PID, 0, 1, PRUN)
    assert report.failure is not None
    assert report.failure.error_type == "WorkflowAlreadyRunning"
    assert "'shared' was not started" in report.failure.message
    assert "o1" in report.failure.message
    run.send(report)
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _result(run)["error"] == "WorkflowAlreadyRunning"
    # The run under that id is not the parent's child: the parent's close leaves it alone.
    assert _last(run).messages == ()


def test_a_retried_child_start_changes_nothing_and_sends_nothing() -> None:
    run = _parent_run()
    start = _only_start(_last(run))
    child = _child_run(start)
    before = _record(child)
    again = child.send(start)
    assert again.ignored == "duplicate-start" and again.record is None
    assert child.record is before
    assert again.messages == () and again.tasks == ()
    assert again.reply is not None and again.reply.ok and again.reply.created
    assert again.reply.run_id == "c1"
    # Also once the child has closed: the record given, or the shell's closed run.
    report = _finish_child(child)
    closed = _record(child)
    late = advance(closed, start, child.now_ms + 1, REGISTRY, run_id="c2")
    assert late.ignored == "duplicate-start" and late.record is None
    assert late.messages == () and late.tasks == () and late.replaced is None
    assert late.reply is not None and late.reply.ok and late.reply.run_id == "c1"
    kept = ClosedRun(closed.status, closed.run_id, closed.request_id)
    later = start_again(kept, start, child.now_ms + 2, REGISTRY, run_id="c3")
    assert later.ignored == "duplicate-start" and later.record is None
    assert later.messages == () and later.tasks == ()
    run.send(report)
    assert _result(run) == "charged"


def test_a_new_child_start_after_a_closed_run_under_that_id_is_allowed() -> None:
    old = WorkflowRun(REGISTRY, "child", workflow_id="shared", run_id="o1")
    old.start("raise")
    assert_status(old.record, WorkflowStatus.FAILED)
    run = _parent_run("named", {"id": "shared", "input": "fresh"})
    started = advance(_record(old), _only_start(_last(run)), old.now_ms + 1, REGISTRY, run_id="c9")
    assert started.record is not None and started.record.run_id == "c9"
    assert started.record.parent == FIRST_STEP
    assert started.messages == ()  # the old run had no parent to tell


def test_a_retried_refused_child_start_reports_again_and_the_parent_ignores_it() -> None:
    async def tolerant(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.child_workflow("child", 1, id="shared")
        except ChildWorkflowError as err:
            return [err.error_type, await ctx.activity("p.work")]
        return "started"

    other = WorkflowRun(REGISTRY, "child", workflow_id="shared", run_id="o1")
    other.start("x")
    run = _parent_run("tolerant", None, _registry(tolerant=tolerant))
    start = _only_start(_last(run))
    run.send(_only_report(other.send(start)))
    assert_history(
        run.record, ["sched 0#1 child", "fail 0#1 WorkflowAlreadyRunning", "sched 1#1 p.work"]
    )
    before = _record(run)
    again = run.send(_only_report(other.send(start)))
    assert again.record is None and again.ignored == "duplicate-result"
    assert run.record is before and again.messages == ()


def test_a_child_input_too_large_for_the_record_fails_the_step_and_starts_nothing() -> None:
    async def big(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.child_workflow("child", "x" * 5_000)
        except ActivityError as err:
            return [type(err).__name__, err.error_type, isinstance(err, ChildWorkflowError)]

    def measure(record: WorkflowRecord) -> int:
        return len(CODEC.encode_workflow(record)) + len(record.workflow_id.encode())

    limits = Limits(max_record_bytes=3_000, measure=measure)
    run = WorkflowRun(_registry(big=big), "big", workflow_id=PID, run_id=PRUN, limits=limits)
    transition = run.start(None)
    assert transition.messages == () and transition.tasks == ()
    # As an activity step too large to record: RecordTooLargeError, not ChildWorkflowError.
    assert _result(run) == ["RecordTooLargeError", "RecordTooLarge", False]
    assert_history(run.record, ["sched 0#1 child", "fail 0#1 RecordTooLarge"])


@pytest.mark.parametrize("old_parent", [None, ParentRef("old-parent", "o", 3)], ids=["", "child"])
def test_a_child_run_over_a_closed_record_that_ends_at_once_reports_to_its_parent(
    old_parent: ParentRef | None,
) -> None:
    old = WorkflowRun(REGISTRY, "child", workflow_id="shared", run_id="o1")
    old.send(StartWorkflow("shared", "child", encode_json("raise"), T0, "r-old", parent=old_parent))
    closed = _record(old)
    assert_status(closed, WorkflowStatus.FAILED)
    assert closed.parent == old_parent
    run = _parent_run("named", {"id": "shared", "input": "raise"})
    start = _only_start(_last(run))
    now = old.now_ms + 1
    message = "child workflow 'shared' ended FAILED: ValueError: nope"
    expected = _child_report(ActivityStatus.FAILED, now, failure=Failure(CHILD_FAILED, message))
    kept = ClosedRun(closed.status, closed.run_id, closed.request_id)
    via_shell = start_again(kept, start, now, REGISTRY, run_id="c9")
    assert via_shell.record is not None and via_shell.record.status is WorkflowStatus.FAILED
    assert via_shell.messages == (expected,)
    # The engine given the closed record: the new run (another run id) closing is new, and
    # it reports to its own parent, never to the old run's.
    direct = advance(closed, start, now, REGISTRY, run_id="c9")
    assert direct.record is not None and direct.record.status is WorkflowStatus.FAILED
    assert direct.record.run_id == "c9" and direct.record.parent == FIRST_STEP
    assert direct.messages == (expected,)
    run.send(expected)
    assert _result(run) == {"error": CHILD_FAILED, "message": message}


# --- 4. parent close policies ---------------------------------------------------------


def _close_message(policy: ParentClosePolicy, reason: str, now_ms: int) -> tuple[InboxBody, ...]:
    """What the parent's closing sends its open default child (step 0), by ``policy``."""
    if policy is ParentClosePolicy.TERMINATE:
        return (TerminateWorkflow(DEFAULT_CHILD_ID, reason, now_ms, FIRST_STEP),)
    if policy is ParentClosePolicy.REQUEST_CANCEL:
        return (CancelWorkflow(DEFAULT_CHILD_ID, reason, now_ms, FIRST_STEP),)
    return ()


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.value)
@pytest.mark.parametrize("ending", ["completes", "fails", "is terminated"])
def test_a_parent_closing_applies_its_open_childs_policy(
    policy: ParentClosePolicy, ending: str
) -> None:
    run = _parent_run("leaving", {"policy": policy.value, "fail": ending == "fails"})
    start = _only_start(_last(run))
    assert task_lines(_last(run).tasks) == [f"{PID}/{PRUN}/1/1 p.work"]
    step = _record(run).events[0]
    assert isinstance(step, ActivityScheduled) and step.parent_close_policy is policy
    if ending == "is terminated":
        transition = run.send(TerminateWorkflow(PID, "shut down", run.now_ms))
        status = WorkflowStatus.TERMINATED
    else:
        transition = run.complete(1, "worked")
        status = WorkflowStatus.COMPLETED if ending == "completes" else WorkflowStatus.FAILED
    assert_status(run.record, status)
    reason = f"its parent {PID!r} ended {status.value}"
    assert transition.messages == _close_message(policy, reason, run.now_ms)
    for message in transition.messages:
        _round_trip(message)
    # What the child does with it (ABANDON: it runs on and its report is ignored).
    child = _child_run(start)
    for message in transition.messages:
        child.send(message)
    if policy is ParentClosePolicy.ABANDON:
        assert_status(child.record, WorkflowStatus.RUNNING)
        late = run.send(_finish_child(child))
        assert late.ignored == "workflow-closed"
    elif policy is ParentClosePolicy.TERMINATE:
        assert_status(child.record, WorkflowStatus.TERMINATED, "Terminated")
        assert _record(child).failure == Failure("Terminated", reason)
    else:
        assert_status(child.record, WorkflowStatus.CANCELLED, "WorkflowCancelledError")


@pytest.mark.parametrize("outcome", ["completed", "failed", "refused"])
def test_a_child_that_already_reported_gets_nothing_when_its_parent_closes(
    outcome: str,
) -> None:
    async def two(ctx: WorkflowContext, _: Any) -> Any:
        first = ctx.child_workflow("child", 1, id="kid-a")
        ctx.child_workflow("child", 2, id="kid-b")  # never awaited: open at the close
        try:
            got = await first
        except ChildWorkflowError as err:
            got = err.error_type
        return [got, await ctx.activity("p.work")]

    run = _parent_run("two", None, _registry(two=two))
    assert [m.workflow_id for m in _last(run).messages if isinstance(m, StartWorkflow)] == [
        "kid-a",
        "kid-b",
    ]
    kind = CHILD_FAILED if outcome == "failed" else "WorkflowAlreadyRunning"
    if outcome == "completed":
        run.send(_child_report(ActivityStatus.COMPLETED, run.now_ms, result="a"))
    else:
        run.send(_child_report(ActivityStatus.FAILED, run.now_ms, failure=Failure(kind, "no luck")))
    assert _last(run).messages == ()
    transition = run.complete(2, "done")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _result(run) == [{"completed": "a"}.get(outcome, kind), "done"]
    reason = f"its parent {PID!r} ended COMPLETED"
    assert transition.messages == (
        TerminateWorkflow("kid-b", reason, run.now_ms, ParentRef(PID, PRUN, 1)),
    )


def test_a_child_whose_step_timed_out_still_counts_as_open() -> None:
    async def impatient(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.child_workflow("child", "x", execution_timeout=60)
        except ChildWorkflowError as err:
            return [err.error_type, await ctx.activity("p.work")]
        return "in time"

    run = _parent_run("impatient", None, _registry(impatient=impatient))
    start = _only_start(_last(run))
    step = _record(run).events[0]
    assert isinstance(step, ActivityScheduled) and step.schedule_to_close_ms == 60_000
    assert _record(run).wake_at_ms == run.now_ms + 60_000
    timed_out = run.wake()
    assert timed_out.messages == ()  # no report, no start again
    assert_history(
        run.record,
        ["sched 0#1 child", "fail 0#1 ScheduleToCloseTimeout", "sched 1#1 p.work"],
    )
    # The child's report after the timeout changes nothing.
    child = _child_run(start)
    late = run.send(_finish_child(child))
    assert late.record is None and late.ignored == "late-result" and late.messages == ()
    assert_status(run.record, WorkflowStatus.RUNNING)
    transition = run.complete(1, "w")
    assert _result(run) == ["ScheduleToCloseTimeout", "w"]
    reason = f"its parent {PID!r} ended COMPLETED"
    assert transition.messages == (
        TerminateWorkflow(DEFAULT_CHILD_ID, reason, run.now_ms, FIRST_STEP),
    )


def test_a_parent_closing_reports_to_its_own_parent_and_closes_its_children() -> None:
    async def middle(ctx: WorkflowContext, _: Any) -> Any:
        ctx.child_workflow("child", "x", id="leaf")
        await ctx.activity("p.work")
        raise RuntimeError("middle gave up")

    async def top(ctx: WorkflowContext, value: Any) -> Any:
        return await ctx.child_workflow("middle", value)

    registry = _registry(middle=middle, top=top)
    run = _parent_run("top", "v", registry)
    mid = WorkflowRun(registry, "middle", workflow_id=DEFAULT_CHILD_ID, run_id="m1")
    mid.send(_only_start(_last(run)))
    transition = mid.complete(1, "w")
    assert_status(mid.record, WorkflowStatus.FAILED)
    reason = f"its parent {DEFAULT_CHILD_ID!r} ended FAILED"
    assert transition.messages[1:] == (
        TerminateWorkflow("leaf", reason, mid.now_ms, ParentRef(DEFAULT_CHILD_ID, "m1", 0)),
    )
    report = transition.messages[0]
    assert isinstance(report, ActivityResult) and report.status is ActivityStatus.FAILED
    assert report.activity_id == activity_id(PID, 0, 1, PRUN)
    assert report.failure is not None and "RuntimeError: middle gave up" in report.failure.message


def test_a_stuck_parent_terminated_applies_its_open_childs_policy() -> None:
    run = _parent_run("leaving", {"policy": "REQUEST_CANCEL"})
    stuck = park(
        _record(run), WakeUp(PID), Failure("SomethingBroke", "parked"), run.now_ms, run_id=PRUN
    )
    assert_status(stuck, WorkflowStatus.STUCK)
    run.record = stuck
    transition = run.send(TerminateWorkflow(PID, "give up", run.now_ms))
    assert_status(run.record, WorkflowStatus.TERMINATED, "Terminated")
    reason = f"its parent {PID!r} ended TERMINATED"
    assert transition.messages == (
        CancelWorkflow(DEFAULT_CHILD_ID, reason, run.now_ms, FIRST_STEP),
    )


# --- 5. cancelling the parent ----------------------------------------------------------


async def _three_children(ctx: WorkflowContext, _: Any) -> Any:
    async with Saga(ctx) as saga:
        reservation = await ctx.activity("inv.reserve")
        saga.add_compensation("inv.release", reservation)
        done = ctx.child_workflow("child", 0, id="kid-done")
        await done
        handles = [
            ctx.child_workflow("child", 1, id="kid-t"),
            ctx.child_workflow(
                "child", 2, id="kid-c", parent_close_policy=ParentClosePolicy.REQUEST_CANCEL
            ),
            ctx.child_workflow(
                "child", 3, id="kid-a", parent_close_policy=ParentClosePolicy.ABANDON
            ),
        ]
        return await ctx.gather(*handles)


KID_T = ParentRef(PID, PRUN, 2)
KID_C = ParentRef(PID, PRUN, 3)


def _three_open(registry: WorkflowRegistry | None = None) -> WorkflowRun:
    """A ``three`` parent with kid-done reported and kid-t (TERMINATE, step 2), kid-c
    (REQUEST_CANCEL, step 3) and kid-a (ABANDON, step 4) open."""
    run = _parent_run("three", None, registry or _registry(three=_three_children))
    run.complete(0, "res")
    assert [m.workflow_id for m in _last(run).messages] == ["kid-done"]
    run.send(_child_report(ActivityStatus.COMPLETED, run.now_ms, parent=ParentRef(PID, PRUN, 1)))
    starts = _last(run).messages
    assert [m.workflow_id for m in starts] == ["kid-t", "kid-c", "kid-a"]
    assert [m.parent for m in starts if isinstance(m, StartWorkflow)] == [
        KID_T,
        KID_C,
        ParentRef(PID, PRUN, 4),
    ]
    return run


def test_a_cancel_reaches_open_children_unless_abandoned_and_only_once() -> None:
    run = _three_open()
    cancelled = run.send(CancelWorkflow(PID, "customer left", run.now_ms))
    assert_status(run.record, WorkflowStatus.RUNNING)  # compensating
    assert task_lines(cancelled.tasks) == [f"{PID}/{PRUN}/5/1 inv.release comp"]
    reason = f"its parent {PID!r} was cancelled"
    assert cancelled.messages == (
        CancelWorkflow("kid-t", reason, run.now_ms, KID_T),
        CancelWorkflow("kid-c", reason, run.now_ms, KID_C),
    )
    again = run.send(CancelWorkflow(PID, "customer left again", run.now_ms))
    assert again.ignored == "duplicate-cancel" and again.messages == () and again.record is None
    closed = run.complete(5, None)
    assert_status(run.record, WorkflowStatus.CANCELLED)
    # Asked to cancel, the parent asks its TERMINATE child to cancel too: it does not
    # terminate the child whose compensations it set going.
    reason = f"its parent {PID!r} ended CANCELLED"
    assert closed.messages == (
        CancelWorkflow("kid-t", reason, run.now_ms, KID_T),
        CancelWorkflow("kid-c", reason, run.now_ms, KID_C),
    )


def test_a_cancelled_parent_terminated_while_compensating_asks_its_children_to_cancel() -> None:
    run = _three_open()
    run.send(CancelWorkflow(PID, "customer left", run.now_ms))
    closed = run.send(TerminateWorkflow(PID, "ops", run.now_ms))
    assert_status(run.record, WorkflowStatus.TERMINATED, "Terminated")
    reason = f"its parent {PID!r} ended TERMINATED"
    assert closed.messages == (
        CancelWorkflow("kid-t", reason, run.now_ms, KID_T),
        CancelWorkflow("kid-c", reason, run.now_ms, KID_C),
    )


def test_a_terminate_child_of_a_cancelled_parent_compensates_and_is_not_terminated() -> None:
    run = _parent_run("saga_parent", "order")
    run.complete(0, "res-p")
    start = _only_start(_last(run))
    kid = f"{PID}/{PRUN}/c1"
    assert (start.workflow_id, start.parent) == (kid, ParentRef(PID, PRUN, 1))
    child = _child_run(start)
    child.complete(0, "res-c")  # the child waits for its charge
    cancelled = run.send(CancelWorkflow(PID, "customer left", run.now_ms))
    assert task_lines(cancelled.tasks) == [f"{PID}/{PRUN}/2/1 inv.release comp"]
    [ask] = cancelled.messages
    assert ask == CancelWorkflow(
        kid, f"its parent {PID!r} was cancelled", run.now_ms, ParentRef(PID, PRUN, 1)
    )
    closed = run.complete(2, None)
    assert_status(run.record, WorkflowStatus.CANCELLED)
    [again] = closed.messages
    assert again == CancelWorkflow(
        kid, f"its parent {PID!r} ended CANCELLED", run.now_ms, ParentRef(PID, PRUN, 1)
    )
    _round_trip(ask)
    _round_trip(again)
    # The child: the first cancel starts its compensation, the second is a duplicate.
    compensating = child.send(ask)
    assert_status(child.record, WorkflowStatus.RUNNING)
    assert task_lines(compensating.tasks) == [f"{kid}/c1/2/1 inv.release comp"]
    duplicate = child.send(again)
    assert duplicate.ignored == "duplicate-cancel" and duplicate.record is None
    assert_status(child.record, WorkflowStatus.RUNNING)
    child.complete(2, None)
    assert_status(child.record, WorkflowStatus.CANCELLED, "WorkflowCancelledError")
    late = run.send(_only_report(_last(child)))
    assert late.ignored == "workflow-closed"


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.value)
def test_a_cancel_that_closes_the_parent_at_once_asks_its_children_to_cancel(
    policy: ParentClosePolicy,
) -> None:
    run = _parent_run("leaving", {"policy": policy.value})
    start = _only_start(_last(run))
    transition = run.send(CancelWorkflow(PID, "stop", run.now_ms))
    assert_status(run.record, WorkflowStatus.CANCELLED)
    reason = f"its parent {PID!r} ended CANCELLED"
    expected: tuple[InboxBody, ...] = ()
    if policy is not ParentClosePolicy.ABANDON:
        # Cancelled, not terminated, even for TERMINATE: the cancel is passed on.
        expected = (CancelWorkflow(DEFAULT_CHILD_ID, reason, run.now_ms, FIRST_STEP),)
    assert transition.messages == expected
    child = _child_run(start)
    for message in transition.messages:
        child.send(message)
    if policy is ParentClosePolicy.ABANDON:
        assert_status(child.record, WorkflowStatus.RUNNING)
    else:
        assert_status(child.record, WorkflowStatus.CANCELLED, "WorkflowCancelledError")


async def _cleaning(ctx: WorkflowContext, _: Any) -> Any:
    """Starts kid-1, then waits for ``p.work``; cancelled, it runs a cleanup child."""
    ctx.child_workflow("child", 1, id="kid-1")
    try:
        return await ctx.activity("p.work")
    except WorkflowCancelledError:
        return await ctx.child_workflow("child", 2, id="kid-cleanup")


def test_a_cancel_reaches_only_the_children_open_before_it() -> None:
    run = _parent_run("cleaning", None, _registry(cleaning=_cleaning))
    assert [m.workflow_id for m in _last(run).messages] == ["kid-1"]
    cancelled = run.send(CancelWorkflow(PID, "stop", run.now_ms))
    assert_status(run.record, WorkflowStatus.RUNNING)
    cleanup = StartWorkflow(
        workflow_id="kid-cleanup",
        workflow_type="child",
        input=encode_json(2),
        requested_at_ms=run.now_ms,
        request_id=f"child:{PRUN}:2",
        if_running=IfRunning.FAIL,
        if_closed=IfClosed.ALLOW,
        parent=ParentRef(PID, PRUN, 2),
    )
    # The cleanup child is started, not cancelled; kid-1 (open before) is asked to cancel.
    assert cancelled.messages == (
        cleanup,
        CancelWorkflow("kid-1", f"its parent {PID!r} was cancelled", run.now_ms, FIRST_STEP),
    )
    closed = run.send(
        _child_report(
            ActivityStatus.COMPLETED, run.now_ms, result="clean", parent=ParentRef(PID, PRUN, 2)
        )
    )
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _result(run) == "clean"
    # Closing after a cancel: kid-1 (TERMINATE, still open) is asked to cancel again.
    assert closed.messages == (
        CancelWorkflow("kid-1", f"its parent {PID!r} ended COMPLETED", run.now_ms, FIRST_STEP),
    )


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.value)
def test_a_cancel_of_a_stuck_parent_reaches_its_open_children(policy: ParentClosePolicy) -> None:
    run = _parent_run("leaving", {"policy": policy.value})

    async def changed(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.other")

    run.registry = _registry(leaving=changed)
    run.complete(1, "w")
    assert_status(run.record, WorkflowStatus.STUCK, "NonDeterminismError")
    assert _last(run).messages == ()
    cancelled = run.send(CancelWorkflow(PID, "stop", run.now_ms))
    assert_status(run.record, WorkflowStatus.STUCK, "NonDeterminismError")
    assert_history(run.record, ["sched 0#1 child", "sched 1#1 p.work", "done 1#1", "cancelled"])
    expected: tuple[InboxBody, ...] = ()
    if policy is not ParentClosePolicy.ABANDON:
        reason = f"its parent {PID!r} was cancelled"
        expected = (CancelWorkflow(DEFAULT_CHILD_ID, reason, run.now_ms, FIRST_STEP),)
    assert cancelled.messages == expected
    again = run.send(CancelWorkflow(PID, "stop", run.now_ms))
    assert again.ignored == "duplicate-cancel" and again.messages == ()


def test_a_cancel_of_a_closed_parent_sends_nothing() -> None:
    run = _parent_run("leaving", {"policy": "TERMINATE"})
    run.complete(1, "w")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    before = _record(run)
    late = run.send(CancelWorkflow(PID, "too late", run.now_ms))
    assert late.ignored == "workflow-closed" and late.record is None and late.messages == ()
    assert run.record is before


# --- 6. TerminateWorkflow --------------------------------------------------------------


async def _with_cleanup(ctx: WorkflowContext, _: Any) -> Any:
    try:
        return await ctx.activity("p.work")
    finally:
        await ctx.activity("p.undo", compensation=True)


def test_terminate_closes_a_running_workflow_without_running_its_code() -> None:
    registry = _registry(cleanup=_with_cleanup)
    # A cancel runs the code: its finally block schedules the compensation.
    control = WorkflowRun(registry, "cleanup", run_id="r1")
    control.start(None)
    cancelled = control.send(CancelWorkflow("wf-1", "stop", control.now_ms))
    assert task_lines(cancelled.tasks) == ["wf-1/r1/1/1 p.undo comp"]
    # A terminate does not.
    run = WorkflowRun(registry, "cleanup", run_id="r1")
    run.start(None)
    before = _record(run)
    reason = "x" * 5_000
    transition = run.send(TerminateWorkflow("wf-1", reason, run.now_ms))
    record = _record(run)
    assert_status(record, WorkflowStatus.TERMINATED, "Terminated")
    assert transition.tasks == () and transition.messages == () and transition.ignored is None
    assert record.events == before.events
    assert record.closed_at_ms == run.now_ms and record.updated_at_ms == run.now_ms
    assert record.wake_at_ms is None and record.result is None
    assert record.revision == before.revision + 1
    assert record.failure is not None
    assert len(record.failure.message) == MAX_REASON_CHARS == 1_000
    assert record.failure.message == "x" * 997 + "..."


def test_terminate_keeps_a_short_reason_and_names_an_empty_one() -> None:
    for given, kept in (("maintenance window", "maintenance window"), ("", "terminated")):
        run = WorkflowRun(REGISTRY, "child", run_id="r1")
        run.start("v")
        run.send(TerminateWorkflow("wf-1", given, run.now_ms))
        assert _record(run).failure == Failure("Terminated", kept)


def test_terminate_closes_a_stuck_workflow() -> None:
    run = WorkflowRun(REGISTRY, "not-registered", run_id="r1")
    run.start(None)
    assert_status(run.record, WorkflowStatus.STUCK, "UnknownWorkflowType")
    transition = run.send(TerminateWorkflow("wf-1", "give up", run.now_ms))
    assert_status(run.record, WorkflowStatus.TERMINATED, "Terminated")
    assert transition.tasks == () and _record(run).closed_at_ms == run.now_ms


@pytest.mark.parametrize("status", ["COMPLETED", "TERMINATED"])
def test_terminate_of_a_closed_workflow_is_ignored(status: str) -> None:
    run = WorkflowRun(REGISTRY, "child", run_id="r1")
    run.start("raise" if status == "COMPLETED" else "v")
    if status == "TERMINATED":
        run.send(TerminateWorkflow("wf-1", "first", run.now_ms))
    before = _record(run)
    assert before.status.terminal
    transition = run.send(TerminateWorkflow("wf-1", "again", run.now_ms))
    assert transition.ignored == "workflow-closed"
    assert transition.record is None and run.record is before and transition.messages == ()


def test_terminate_of_no_workflow_is_rejected() -> None:
    transition = advance(None, TerminateWorkflow("nobody", "why", T0), T0, REGISTRY)
    assert transition.ignored == "unknown-workflow" and transition.record is None
    assert "unknown-workflow" in REJECTED_REASONS
    assert transition.messages == ()


def test_terminate_existing_replacing_a_child_run_reports_it_to_its_parent() -> None:
    run = _parent_run()
    child = _child_run(_only_start(_last(run)))
    child.run_id = "c2"
    replace = StartWorkflow(
        DEFAULT_CHILD_ID,
        "child",
        encode_json("again"),
        child.now_ms,
        "ops-1",
        IfRunning.TERMINATE_EXISTING,
    )
    transition = child.send(replace)
    assert transition.replaced is not None
    assert_status(transition.replaced, WorkflowStatus.TERMINATED, "Terminated")
    assert transition.replaced.parent == FIRST_STEP
    fresh = _record(child)
    assert fresh.run_id == "c2" and fresh.parent is None
    report = _only_report(transition)
    assert report.status is ActivityStatus.FAILED and report.failure is not None
    assert report.failure.error_type == CHILD_FAILED
    assert "ended TERMINATED" in report.failure.message
    assert "TERMINATE_EXISTING" in report.failure.message
    run.send(report)
    assert _result(run)["error"] == CHILD_FAILED
    # The new run has no parent: its end tells nobody.
    child.complete(0, "res")
    child.complete(1, "charged")
    assert_status(child.record, WorkflowStatus.COMPLETED)
    assert _last(child).messages == ()


# --- 6b. a parent's terminate or cancel reaches only the run it started ----------------


def _from_parent(kind: str, workflow_id: str, parent: ParentRef | None) -> InboxBody:
    if kind == "terminate":
        return TerminateWorkflow(workflow_id, "its parent ended", T0, parent)
    return CancelWorkflow(workflow_id, "its parent ended", T0, parent)


KINDS = ["terminate", "cancel"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_parents_terminate_or_cancel_for_no_workflow_is_ignored_not_rejected(
    kind: str,
) -> None:
    transition = advance(None, _from_parent(kind, "nobody", FIRST_STEP), T0, REGISTRY)
    assert transition.ignored == OTHER_RUN == "other-run"
    assert transition.record is None and transition.messages == () and transition.tasks == ()
    assert OTHER_RUN in IGNORED_REASONS and OTHER_RUN not in REJECTED_REASONS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "started_by",
    [None, ParentRef(PID, "r0", 0), ParentRef(PID, PRUN, 1), ParentRef("other-parent", PRUN, 0)],
    ids=["a-client", "another-run-of-the-parent", "another-step", "another-parent"],
)
def test_a_parents_terminate_or_cancel_for_a_run_it_did_not_start_is_ignored(
    kind: str, started_by: ParentRef | None
) -> None:
    run = WorkflowRun(REGISTRY, "child", workflow_id=DEFAULT_CHILD_ID, run_id="c2")
    run.send(
        StartWorkflow(DEFAULT_CHILD_ID, "child", encode_json("v"), T0, "req-1", parent=started_by)
    )
    assert_status(run.record, WorkflowStatus.RUNNING)
    before = _record(run)
    assert before.parent == started_by
    transition = run.send(_from_parent(kind, DEFAULT_CHILD_ID, FIRST_STEP))
    assert transition.ignored == OTHER_RUN and transition.record is None
    assert transition.messages == () and transition.tasks == ()
    assert run.record is before
    # The run's own starter still reaches it (a client's, with no parent, always does).
    applied = run.send(_from_parent(kind, DEFAULT_CHILD_ID, started_by))
    assert applied.ignored is None and applied.record is not None
    if kind == "terminate":
        assert_status(run.record, WorkflowStatus.TERMINATED, "Terminated")
    else:
        assert_status(run.record, WorkflowStatus.CANCELLED, "WorkflowCancelledError")
        assert_history(run.record, ["sched 0#1 inv.reserve", "cancelled"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_parents_terminate_or_cancel_for_its_closed_child_is_a_closed_workflow(
    kind: str,
) -> None:
    run = _parent_run()
    child = _child_run(_only_start(_last(run)))
    _finish_child(child)
    before = _record(child)
    transition = child.send(_from_parent(kind, DEFAULT_CHILD_ID, FIRST_STEP))
    assert transition.ignored == "workflow-closed" and transition.record is None
    assert child.record is before


def test_a_parents_terminate_leaves_a_run_a_client_started_again_under_its_childs_id() -> None:
    async def impatient(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.child_workflow("child", "x", id="shared", execution_timeout=60)
        except ChildWorkflowError as err:
            return [err.error_type, await ctx.activity("p.work")]
        return "in time"

    run = _parent_run("impatient", None, _registry(impatient=impatient))
    child = _child_run(_only_start(_last(run)))
    run.wake()  # the step times out; the child still counts as open
    late = run.send(_finish_child(child))
    assert late.ignored == "late-result"
    # A client starts the id again: a run with no parent.
    child.run_id = "c2"
    again = child.send(
        StartWorkflow(
            "shared", "child", encode_json("y"), child.now_ms, "client-1", None, IfClosed.ALLOW
        )
    )
    assert again.record is not None and again.record.parent is None
    assert again.record.run_id == "c2"
    assert again.messages == ()  # the closed run reported before; the new one is not a child
    client_run = _record(child)
    closed = run.complete(1, "w")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    terminate = TerminateWorkflow(
        "shared", f"its parent {PID!r} ended COMPLETED", run.now_ms, FIRST_STEP
    )
    assert closed.messages == (terminate,)
    ignored = child.send(terminate)
    assert ignored.ignored == OTHER_RUN and ignored.record is None
    assert child.record is client_run
    assert_status(child.record, WorkflowStatus.RUNNING)


def test_terminate_existing_sends_the_replaced_runs_closing_before_the_new_runs_starts() -> None:
    async def middle(ctx: WorkflowContext, value: Any) -> Any:
        return await ctx.child_workflow("child", value, id="leaf")

    async def top(ctx: WorkflowContext, value: Any) -> Any:
        return await ctx.child_workflow("middle", value)

    registry = _registry(middle=middle, top=top)
    run = _parent_run("top", "v", registry)
    mid = WorkflowRun(registry, "middle", workflow_id=DEFAULT_CHILD_ID, run_id="m1")
    mid.send(_only_start(_last(run)))
    first_leaf = _only_start(_last(mid))
    assert first_leaf.parent == ParentRef(DEFAULT_CHILD_ID, "m1", 0)
    leaf = _child_run(first_leaf, "l1")
    mid.run_id = "m2"
    replace = StartWorkflow(
        DEFAULT_CHILD_ID,
        "middle",
        encode_json("w"),
        mid.now_ms,
        "ops-1",
        IfRunning.TERMINATE_EXISTING,
    )
    transition = mid.send(replace)
    assert transition.replaced is not None and transition.replaced.run_id == "m1"
    assert _record(mid).run_id == "m2"
    now = mid.now_ms
    report, terminate, start = transition.messages
    assert isinstance(report, ActivityResult) and report.failure is not None
    assert report.activity_id == activity_id(PID, 0, 1, PRUN)
    assert f"{DEFAULT_CHILD_ID!r} ended TERMINATED" in report.failure.message
    assert terminate == TerminateWorkflow(
        "leaf",
        f"its parent {DEFAULT_CHILD_ID!r} ended TERMINATED",
        now,
        ParentRef(DEFAULT_CHILD_ID, "m1", 0),
    )
    assert start == StartWorkflow(
        workflow_id="leaf",
        workflow_type="child",
        input=encode_json("w"),
        requested_at_ms=now,
        request_id="child:m2:0",
        if_running=IfRunning.FAIL,
        if_closed=IfClosed.ALLOW,
        parent=ParentRef(DEFAULT_CHILD_ID, "m2", 0),
    )
    # In that order the leaf's old run ends before the new run's start arrives, so the
    # start is taken, not refused as WorkflowAlreadyRunning.
    leaf.send(terminate)
    assert_status(leaf.record, WorkflowStatus.TERMINATED, "Terminated")
    old_report = _only_report(_last(leaf))
    assert old_report.activity_id == activity_id(DEFAULT_CHILD_ID, 0, 1, "m1")
    leaf.run_id = "l2"
    started = leaf.send(start)
    assert started.ignored is None and started.reply is not None and started.reply.ok
    assert _record(leaf).run_id == "l2"
    assert _record(leaf).parent == ParentRef(DEFAULT_CHILD_ID, "m2", 0)
    # The old leaf's report does not reach the new middle run's step.
    stale = mid.send(old_report)
    assert stale.record is None and stale.ignored is not None
    run.send(report)
    assert_status(run.record, WorkflowStatus.FAILED, "ChildWorkflowError")
    assert_history(run.record, ["sched 0#1 middle", "fail 0#1 ChildWorkflowFailed"])


# --- 7. determinism -------------------------------------------------------------------


def _stuck(run: WorkflowRun, *fragments: str) -> None:
    assert_status(run.record, WorkflowStatus.STUCK, "NonDeterminismError")
    failure = _record(run).failure
    assert failure is not None
    for fragment in fragments:
        assert fragment in failure.message, f"{fragment!r} not in {failure.message!r}"
    assert _last(run).tasks == () and _last(run).messages == ()


def test_a_child_step_replayed_under_another_id_parks_the_workflow() -> None:
    run = _parent_run("named", {"id": "kid-1"})

    async def renamed(ctx: WorkflowContext, value: Any) -> Any:
        return await ctx.child_workflow("child", value.get("input"), id="kid-2")

    run.registry = _registry(named=renamed)
    run.send(_child_report(ActivityStatus.COMPLETED, run.now_ms, result="x"))
    _stuck(run, "step 0", "kid-1", "kid-2")


def test_the_same_child_id_and_a_changed_policy_replay_without_a_problem() -> None:
    run = _parent_run("named", {"id": "kid-1", "policy": "TERMINATE"})

    async def same(ctx: WorkflowContext, value: Any) -> Any:
        return await ctx.child_workflow(
            "child", None, id="kid-1", parent_close_policy=ParentClosePolicy.ABANDON
        )

    run.registry = _registry(named=same)
    run.send(_child_report(ActivityStatus.COMPLETED, run.now_ms, result="x"))
    assert _result(run) == "x"


def test_an_activity_where_history_has_a_child_of_the_same_name_parks_the_workflow() -> None:
    async def v1(ctx: WorkflowContext, value: Any) -> Any:
        return await ctx.child_workflow("pay.charge", value)

    async def v2(ctx: WorkflowContext, value: Any) -> Any:
        return await ctx.activity("pay.charge", value)

    run = _parent_run("t", 1, _registry(t=v1))
    assert _only_start(_last(run)).workflow_type == "pay.charge"
    run.registry = _registry(t=v2)
    run.send(_child_report(ActivityStatus.COMPLETED, run.now_ms, result="x"))
    _stuck(run, "step 0", "'pay.charge'")


def test_a_child_where_history_has_an_activity_of_the_same_name_parks_the_workflow() -> None:
    async def v1(ctx: WorkflowContext, value: Any) -> Any:
        return await ctx.activity("pay.charge", value)

    async def v2(ctx: WorkflowContext, value: Any) -> Any:
        return await ctx.child_workflow("pay.charge", value)

    run = _parent_run("t", 1, _registry(t=v1))
    run.registry = _registry(t=v2)
    run.complete(0, "x")
    _stuck(run, "step 0", "'pay.charge'")


# --- 8. invalid arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        (("",), {}, "a workflow type"),
        ((7,), {}, "a workflow type must be a str"),
        (("child",), {"id": 5}, "id=..."),
        (("child",), {"id": ""}, "id=..."),
        (("child",), {"parent_close_policy": "TERMINATE"}, "ParentClosePolicy, got str"),
        (("child",), {"execution_timeout": -1}, "got -1"),
    ],
    ids=["empty-type", "type-not-str", "id-not-str", "empty-id", "policy-str", "negative-timeout"],
)
def test_invalid_child_arguments_park_the_workflow(
    args: tuple[Any, ...], kwargs: dict[str, Any], fragment: str
) -> None:
    raised: list[str] = []

    async def wrong(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.child_workflow(*args, **kwargs)
        except ConfigurationError as exc:
            raised.append(str(exc))
            return "caught"  # the workflow is parked all the same
        return "started"

    run = _parent_run("wrong", None, _registry(wrong=wrong))
    assert raised and fragment in raised[0], raised
    # The misuse parks the workflow (as every misuse does) even though the code caught it.
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    failure = _record(run).failure
    assert failure is not None and failure.message == raised[0]
    assert _last(run).tasks == () and _last(run).messages == ()
    assert _record(run).events == ()


CHILD_TIMEOUT = "ctx.child_workflow('Order Saga', execution_timeout=...)"


@pytest.mark.parametrize(
    ("timeout", "problem"),
    [
        (-1, "must be between 0 and 3153600000 seconds (100 years), got -1"),
        (0, "must be at least 0.001 seconds, got 0"),
        ("10", "must be seconds (an int or float) or a timedelta, got str"),
        (float("nan"), "must be a finite number, got nan"),
    ],
    ids=["negative", "zero", "str", "nan"],
)
def test_an_invalid_execution_timeout_parks_naming_the_child_workflow_argument(
    timeout: Any, problem: str
) -> None:
    raised: list[str] = []

    async def wrong(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.child_workflow("Order Saga", execution_timeout=timeout)
        except ConfigurationError as exc:
            raised.append(str(exc))
        return None

    run = _parent_run("wrong", None, _registry(wrong=wrong))
    assert raised == [f"{CHILD_TIMEOUT} {problem}"]
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    assert _record(run).failure == Failure("WorkflowDefinitionError", raised[0])
    assert _record(run).events == () and _last(run).messages == ()


# --- 9. WorkflowTester.child ----------------------------------------------------------


def _tester() -> WorkflowTester:
    tester = WorkflowTester(REGISTRY)
    tester.activity("inv.reserve").returns("res")
    tester.activity("inv.release").returns(None)
    return tester


def test_a_scripted_child_returns_its_value() -> None:
    tester = _tester()
    tester.child("child").returns({"charged": 5})
    result = tester.run("parent", {"amount": 5})
    assert result.status is WorkflowStatus.COMPLETED
    assert result.result == {"charged": 5}
    assert [call.name for call in result.calls] == ["child.child"]
    assert result.calls[0].value == {"amount": 5}
    assert len(result.calls_to("child.child")) == 1


def test_a_scripted_child_failure_reaches_the_workflow_as_production_reports_it() -> None:
    tester = _tester()
    tester.child("child").fails("PaymentDeclined", "card refused")
    result = tester.run("parent", "x")
    assert result.status is WorkflowStatus.COMPLETED
    assert result.result == {
        "error": "ChildWorkflowFailed",
        "message": "child workflow of type 'child' ended FAILED: PaymentDeclined: card refused",
        "activity_error": True,
    }


def test_a_scripted_child_failure_compensates_a_saga() -> None:
    tester = _tester()
    tester.child("child").fails("PaymentDeclined", "card refused")
    result = tester.run("saga_parent", "x")
    assert result.status is WorkflowStatus.COMPENSATED
    assert result.error_type == "ChildWorkflowError"
    assert [call.name for call in result.calls] == ["inv.reserve", "child.child", "inv.release"]
    assert [call.compensation for call in result.calls] == [False, False, True]


async def _order_saga_parent(ctx: WorkflowContext, value: Any) -> Any:
    try:
        return await ctx.child_workflow("Order Saga", value)
    except ChildWorkflowError as err:
        return [type(err).__name__, err.error_type, err.message, err.activity]


def test_a_child_script_takes_any_workflow_type_of_1_to_200_characters() -> None:
    registry = _registry(p=_order_saga_parent)
    tester = WorkflowTester(registry)
    script = tester.child("Order Saga")
    assert script.name == "child.Order Saga"
    script.returns({"ok": True})
    result = tester.run("p", 7)
    assert result.result == {"ok": True}
    assert [(c.name, c.value) for c in result.calls] == [("child.Order Saga", 7)]
    failing = WorkflowTester(registry)
    failing.child("Order Saga").fails("OutOfStock", "none left")
    assert failing.run("p", 7).result == [
        "ChildWorkflowError",
        CHILD_FAILED,
        "child workflow of type 'Order Saga' ended FAILED: OutOfStock: none left",
        "Order Saga",
    ]
    for workflow_type in ("x" * 200, "ü" * 200, "a/b c!"):
        assert WorkflowTester(registry).child(workflow_type).name == f"child.{workflow_type}"


@pytest.mark.parametrize(
    ("workflow_type", "shown"),
    [("", "''"), ("x" * 201, "'xxxx"), ("a\x00b", "'a\\x00b'"), (7, "<int>")],
    ids=["empty", "too-long", "nul", "not-str"],
)
def test_a_child_script_refuses_a_type_that_is_not_1_to_200_characters_of_text(
    workflow_type: Any, shown: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        WorkflowTester(REGISTRY).child(workflow_type)
    assert str(caught.value).startswith(f"tester.child({shown}"), str(caught.value)


def test_a_hanging_child_is_named_by_its_script_when_the_run_is_blocked() -> None:
    tester = WorkflowTester(REGISTRY)
    tester.child("child").hangs()
    with pytest.raises(WorkflowBlockedError) as caught:
        tester.run("parent", 1)
    assert "step 0 'child.child' attempt 1, which the tester scripted to hang" in str(caught.value)
    assert "'.child'" not in str(caught.value)
    tester = WorkflowTester(_registry(p=_order_saga_parent))
    tester.child("Order Saga").hangs()
    with pytest.raises(WorkflowBlockedError) as caught:
        tester.run("p", 1)
    assert "step 0 'child.Order Saga' attempt 1, which the tester scripted to hang" in str(
        caught.value
    )


def test_an_unscripted_child_is_reported_with_advice_that_works() -> None:
    tester = WorkflowTester(_registry(p=_order_saga_parent))
    with pytest.raises(UnscriptedActivityError) as caught:
        tester.run("p", 1)
    assert "'child.Order Saga'" in str(caught.value)
    assert "tester.child('Order Saga')" in str(caught.value), str(caught.value)


def test_a_scripted_child_that_hangs_times_out_with_execution_timeout() -> None:
    async def impatient(ctx: WorkflowContext, value: Any) -> Any:
        try:
            return await ctx.child_workflow("child", value, execution_timeout=30)
        except ChildWorkflowError as err:
            return err.error_type

    tester = WorkflowTester(_registry(impatient=impatient))
    tester.child("child").hangs()
    result = tester.run("impatient", 1)
    assert result.result == "ScheduleToCloseTimeout"
    assert result.elapsed == 30
    assert [(c.name, c.outcome) for c in result.calls] == [("child.child", "hangs")]


def test_a_scripted_child_failure_is_never_retried() -> None:
    tester = WorkflowTester(REGISTRY)
    tester.child("child").fails("Boom", "again?", retryable=True)
    result = tester.run("parent", 1)
    assert result.result == {
        "error": CHILD_FAILED,
        "message": "child workflow of type 'child' ended FAILED: Boom: again?",
        "activity_error": True,
    }
    assert len(result.calls_to("child.child")) == 1


# --- 10. which error a child step's failure raises -------------------------------------


async def _classifying(ctx: WorkflowContext, value: Any) -> Any:
    """One child; how its step failed: the exception's class, error type and whether its
    effects committed."""
    try:
        return await ctx.child_workflow("child", value, execution_timeout=60)
    except ActivityError as err:
        return [type(err).__name__, err.error_type, err.effects_committed]


@pytest.mark.parametrize(
    "failure",
    [
        Failure(CHILD_FAILED, "child workflow 'x' ended FAILED: ValueError: nope"),
        Failure("WorkflowAlreadyRunning", "child workflow 'x' was not started: open run"),
    ],
    ids=["child-failed", "start-refused"],
)
def test_a_childs_failure_raises_child_workflow_error(failure: Failure) -> None:
    run = _parent_run("c", None, _registry(c=_classifying))
    run.send(_child_report(ActivityStatus.FAILED, run.now_ms, failure=failure))
    assert _result(run) == ["ChildWorkflowError", failure.error_type, False]


def test_a_child_step_that_timed_out_raises_child_workflow_error() -> None:
    run = _parent_run("c", None, _registry(c=_classifying))
    run.wake()
    assert _result(run) == ["ChildWorkflowError", "ScheduleToCloseTimeout", False]


def test_a_childs_result_too_large_for_the_parents_record_raises_record_too_large() -> None:
    def measure(record: WorkflowRecord) -> int:
        return len(CODEC.encode_workflow(record)) + len(record.workflow_id.encode())

    limits = Limits(max_record_bytes=6_000, measure=measure)
    run = WorkflowRun(_registry(c=_classifying), "c", workflow_id=PID, run_id=PRUN, limits=limits)
    run.start(None)
    run.send(_child_report(ActivityStatus.COMPLETED, run.now_ms, result="x" * 5_000))
    # As an activity's result that does not fit: its effects committed.
    assert _result(run) == ["RecordTooLargeError", "RecordTooLarge", True]
    assert_history(run.record, ["sched 0#1 child", "fail 0#1 RecordTooLarge"])


def test_a_childs_report_too_large_for_the_inbox_raises_record_too_large() -> None:
    run = _parent_run("c", None, _registry(c=_classifying))
    too_large = Failure(
        "RecordTooLarge",
        "the child's result does not fit an inbox record: ...",
        effects_committed=True,
    )
    run.send(_child_report(ActivityStatus.FAILED, run.now_ms, failure=too_large))
    assert _result(run) == ["RecordTooLargeError", "RecordTooLarge", True]


# --- 11. the orchestrator shell --------------------------------------------------------


TOPICS = Topics()
MISSING = TOPICS.tasks("q")


class _Listing:
    """Topic metadata without a broker: the topics in ``names`` exist."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def list_topics(self, topic: str | None = None, timeout: float = 0) -> Any:
        found = SimpleNamespace(partitions={0: SimpleNamespace()}, error=None)
        return SimpleNamespace(topics={name: found for name in self.names})


async def _needs_q(ctx: WorkflowContext, _: Any) -> Any:
    """Its first step is for participant ``q``, whose tasks topic does not exist."""
    return await ctx.activity("q.work")


class _Shell:
    """An ``InputProcessor`` owning the one partition, with the tasks topics of ``inv``,
    ``pay`` and ``p`` (not ``q``), fed inputs at increasing inbox offsets."""

    def __init__(self, max_record_bytes: int = 900_000) -> None:
        self.codec = AvroCodec()
        self.store = WorkflowStore()
        self.store.install(PartitionState(0))
        listing = _Listing(
            TOPICS.tasks("inv"), TOPICS.tasks("pay"), TOPICS.tasks("p"), TOPICS.replies
        )
        registry = _registry(
            leaving=_leaving_parent, named=_named_parent, parent=_parent, needs_q=_needs_q
        )
        self.processor = InputProcessor(
            codec=self.codec,
            store=self.store,
            topics=TOPICS,
            directory=TopicDirectory(listing),
            registry=registry,
            max_events=1_000,
            max_record_bytes=max_record_bytes,
            partition_count=1,
        )
        self.offset = 0
        self.now_ms = T0

    def feed(self, body: InboxBody) -> Batch:
        """Apply ``body`` (one second later) as the next inbox input, in a batch of its own."""
        assert body.workflow_id is not None
        batch = Batch(0.0)
        self.now_ms += 1_000
        item = Input(0, self.offset, body.workflow_id.encode(), self.codec.encode_inbox(body))
        self.offset += 1
        self.processor.apply_input(item, body, batch, self.now_ms)
        return batch

    def commit(self) -> None:
        written = [wid for _, wid, _, _ in self.store.staged()]
        self.store.promote()
        self.processor.forget_poison({0: self.offset}, written)

    def staged(self, wid: str) -> WorkflowRecord:
        record = self.store.staged_record(wid)
        assert record is not None, f"expected a record staged for {wid!r}, observed none"
        return record

    def inbox(self, batch: Batch) -> list[tuple[bytes | None, InboxBody]]:
        """The inputs the batch sends other workflows, with their keys."""
        return [
            (o.key, self.codec.decode_inbox(o.value or b""))
            for o in batch.outputs
            if o.topic == TOPICS.inbox
        ]

    def replies(self, batch: Batch) -> list[Reply]:
        return [
            self.codec.decode_reply(o.value or b"")
            for o in batch.outputs
            if o.topic == TOPICS.replies
        ]


def _start_of_child(
    workflow_type: str = "child",
    value: Any = "v",
    *,
    workflow_id: str = DEFAULT_CHILD_ID,
    parent: ParentRef = FIRST_STEP,
) -> StartWorkflow:
    """The start a parent's step ``parent`` sends for its child."""
    return StartWorkflow(
        workflow_id=workflow_id,
        workflow_type=workflow_type,
        input=encode_json(value),
        requested_at_ms=T0,
        request_id=f"child:{parent.run_id}:{parent.seq}",
        if_running=IfRunning.FAIL,
        if_closed=IfClosed.ALLOW,
        parent=parent,
    )


def test_the_shell_answers_a_child_start_to_its_parent_never_on_the_replies_topic() -> None:
    shell = _Shell()
    start = _start_of_child()
    batch = shell.feed(start)
    assert [(o.topic, o.key) for o in batch.outputs] == [
        (TOPICS.tasks("inv"), DEFAULT_CHILD_ID.encode())
    ]
    child = shell.staged(DEFAULT_CHILD_ID)
    assert_status(child, WorkflowStatus.RUNNING)
    assert child.parent == FIRST_STEP
    shell.commit()
    # Sent again (the parent's transaction retried): nothing at all.
    again = shell.feed(start)
    assert again.outputs == [] and again.ignored == ["duplicate-start"]
    # Another parent's child under the open id: refused, and only that parent is told.
    other = ParentRef("other-parent", "r9", 2)
    refused = shell.feed(_start_of_child(parent=other))
    assert shell.replies(refused) == [] and refused.ignored == ["duplicate-start"]
    why = (
        f"child workflow {DEFAULT_CHILD_ID!r} was not started: workflow {DEFAULT_CHILD_ID!r} "
        f"has an open run ({child.run_id}, RUNNING) and the start says if_running=FAIL"
    )
    assert shell.inbox(refused) == [
        (
            b"other-parent",
            _child_report(
                ActivityStatus.FAILED,
                shell.now_ms,
                failure=Failure("WorkflowAlreadyRunning", why),
                parent=other,
            ),
        )
    ]
    # A client's start of the same id is answered on the replies topic, as ever.
    client = StartWorkflow(DEFAULT_CHILD_ID, "child", encode_json("v"), T0, "client-1")
    [reply] = shell.replies(shell.feed(client))
    assert reply.request_id == "client-1" and reply.ok and reply.run_id == child.run_id


def test_a_child_start_parked_at_once_gets_no_reply_either() -> None:
    shell = _Shell()
    batch = shell.feed(_start_of_child("needs_q"))
    assert_status(shell.staged(DEFAULT_CHILD_ID), WorkflowStatus.STUCK, "MissingTasksTopic")
    assert shell.replies(batch) == []
    assert [o.topic for o in batch.outputs if o.topic != TOPICS.replies] == []


@pytest.mark.parametrize("kind", KINDS)
def test_the_shell_counts_a_parents_terminate_or_cancel_for_another_run_not_dead_letters_it(
    kind: str,
) -> None:
    shell = _Shell()
    nobody = shell.feed(_from_parent(kind, "nobody", FIRST_STEP))
    assert nobody.outputs == [] and nobody.ignored == [OTHER_RUN]
    assert nobody.dead_letters == 0
    # A client's run under the child's id.
    shell.feed(StartWorkflow(DEFAULT_CHILD_ID, "child", encode_json("v"), T0, "client-1"))
    shell.commit()
    other = shell.feed(_from_parent(kind, DEFAULT_CHILD_ID, FIRST_STEP))
    assert other.outputs == [] and other.ignored == [OTHER_RUN] and other.dead_letters == 0
    assert shell.store.staged() == []
    # Without a parent, an input for no workflow is dead-lettered, as before.
    plain = shell.feed(_from_parent(kind, "nobody", None))
    assert [o.topic for o in plain.outputs] == [TOPICS.dlq] and plain.dead_letters == 1


def test_an_unplannable_terminate_existing_still_sends_what_the_replaced_run_owes() -> None:
    shell = _Shell()
    shell.feed(_start_of_child("leaving", {"policy": "TERMINATE"}))
    first = shell.staged(DEFAULT_CHILD_ID)
    grandchild = f"{DEFAULT_CHILD_ID}/{first.run_id}/c0"
    shell.commit()
    replace = StartWorkflow(
        DEFAULT_CHILD_ID,
        "needs_q",
        encode_json(None),
        T0,
        "ops-1",
        IfRunning.TERMINATE_EXISTING,
    )
    batch = shell.feed(replace)
    now = shell.now_ms
    parked = shell.staged(DEFAULT_CHILD_ID)
    assert_status(parked, WorkflowStatus.STUCK, "MissingTasksTopic")
    assert parked.workflow_type == "needs_q" and parked.run_id != first.run_id
    ended = [
        shell.codec.decode_workflow(o.value or b"")
        for o in batch.outputs
        if o.topic == TOPICS.history
    ]
    assert [(r.run_id, r.status) for r in ended] == [(first.run_id, WorkflowStatus.TERMINATED)]
    why = (
        f"child workflow {DEFAULT_CHILD_ID!r} ended TERMINATED: Terminated: terminated by a "
        f"start with if_running=TERMINATE_EXISTING at {now}"
    )
    assert shell.inbox(batch) == [
        (
            PID.encode(),
            _child_report(ActivityStatus.FAILED, now, failure=Failure(CHILD_FAILED, why)),
        ),
        (
            grandchild.encode(),
            TerminateWorkflow(
                grandchild,
                f"its parent {DEFAULT_CHILD_ID!r} ended TERMINATED",
                now,
                ParentRef(DEFAULT_CHILD_ID, first.run_id, 0),
            ),
        ),
    ]
    assert all(o.topic != MISSING for o in batch.outputs)
    [reply] = shell.replies(batch)
    assert reply.request_id == "ops-1" and reply.ok and reply.run_id == parked.run_id


def test_a_childs_report_too_large_for_an_inbox_record_becomes_a_failed_report() -> None:
    max_bytes = 7_000
    parent = ParentRef("P" * 2_000, "r1", 0)
    shell = _Shell(max_record_bytes=max_bytes)
    shell.feed(_start_of_child(value=None, workflow_id="kid", parent=parent))
    child = shell.staged("kid")
    shell.commit()
    charge = "v" * 1_500

    def result(seq: int, value: Any) -> ActivityResult:
        return ActivityResult(
            "kid",
            activity_id("kid", seq, 1, child.run_id),
            seq,
            1,
            ActivityStatus.COMPLETED,
            shell.now_ms,
            encode_json(value),
        )

    shell.feed(result(0, "res"))
    shell.commit()
    batch = shell.feed(result(1, charge))
    now = shell.now_ms
    done = shell.staged("kid")
    # The child closes (it is not parked): its record fits, its full report would not.
    assert_status(done, WorkflowStatus.COMPLETED)
    assert record_size(b"kid", shell.codec.encode_workflow(done)) <= max_bytes
    full = _child_report(ActivityStatus.COMPLETED, now, result=charge, parent=parent)
    size = record_size(parent.workflow_id.encode(), shell.codec.encode_inbox(full))
    assert size > max_bytes
    message = (
        "the child's result does not fit an inbox record: an input for workflow "
        f"{safe_text(parent.workflow_id, 200)!r} would be {size} bytes, above "
        f"max_record_bytes ({max_bytes})"
    )
    assert shell.inbox(batch) == [
        (
            parent.workflow_id.encode(),
            _child_report(
                ActivityStatus.FAILED,
                now,
                failure=Failure("RecordTooLarge", message, effects_committed=True),
                parent=parent,
            ),
        )
    ]
    assert [o.topic for o in batch.outputs] == [TOPICS.inbox]
    assert shell.replies(batch) == [] and batch.dead_letters == 0
    shell.commit()
    assert shell.store.partition(0).stuck == set()
