"""Workflow id reuse in the pure engine: what a start does when its id has an open run
(``if_running``) or a closed one (``if_closed``), the ``Reply`` it is answered with, retried
sends recognised by their request id, and the shell's bookkeeping of closed runs.

Every test drives ``advance`` / ``start_again`` directly or through ``WorkflowRun`` (which
also checks that every new record survives the Avro round trip).
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import IfClosed, IfRunning, WorkflowContext, WorkflowRegistry
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityScheduled,
    Failure,
    Reply,
    ReplyKind,
    RunRequest,
    StartWorkflow,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.replay import IGNORED_REASONS, Limits, Transition, advance
from orchestrator.replay.engine import (
    MAX_REQUEST_ID_CHARS,
    ClosedRun,
    park,
    start_again,
)
from orchestrator.replay.transition import MAX_EARLIER_REQUESTS
from orchestrator.runtime.state import PartitionState, Presence, WorkflowStore
from tests.unit.conftest import (
    T0,
    WorkflowRun,
    assert_encodable,
    assert_history,
    assert_status,
    completed,
    task_lines,
)

CODEC = AvroCodec()
WID = "wf-1"
CLOSED_STATUSES = [s for s in WorkflowStatus if s.terminal]
NOT_COMPLETED = [s for s in CLOSED_STATUSES if s is not WorkflowStatus.COMPLETED]
PARKED = Failure("SomethingBroke", "parked for the test")


async def _one_step(ctx: WorkflowContext, value: Any) -> Any:
    result = await ctx.activity("p.first", value)
    return {"input": value, "result": result}


def _registry() -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow("t")(_one_step)
    return registry


REGISTRY = _registry()


def _start(
    request_id: str | None = None,
    if_running: IfRunning | None = None,
    if_closed: IfClosed | None = None,
    *,
    value: Any = 1,
    at_ms: int = T0,
) -> StartWorkflow:
    return StartWorkflow(WID, "t", encode_json(value), at_ms, request_id, if_running, if_closed)


def _running(request_id: str | None = "req-1", run_id: str = "r1") -> WorkflowRun:
    """A workflow started (run ``run_id``) by a start with ``request_id``, waiting on its
    first activity."""
    run = WorkflowRun(REGISTRY, "t", run_id=run_id)
    first = run.send(_start(request_id, value="first"))
    assert first.record is not None and first.record.request_id == request_id
    assert_status(run.record, WorkflowStatus.RUNNING)
    return run


def _record(run: WorkflowRun) -> WorkflowRecord:
    assert run.record is not None, f"workflow {run.workflow_id} has no record"
    return run.record


def _reply(transition: Transition) -> Reply:
    assert transition.reply is not None, f"expected a reply, observed none: {transition}"
    assert transition.reply.kind is ReplyKind.START
    assert transition.reply.workflow_id == WID
    return transition.reply


def _closed(status: WorkflowStatus, request_id: str | None = "req-1") -> ClosedRun:
    return ClosedRun(status, "r1", request_id)


def _assert_unchanged(run: WorkflowRun, before: WorkflowRecord, transition: Transition) -> None:
    assert transition.record is None and transition.replaced is None
    assert transition.tasks == ()
    assert transition.ignored == "duplicate-start"
    assert run.record is before


# --- a new id -------------------------------------------------------------------------


def test_a_start_with_a_request_id_is_answered_and_the_record_keeps_the_id() -> None:
    run = WorkflowRun(REGISTRY, "t", run_id="r1")
    transition = run.send(_start("req-1", IfRunning.FAIL, IfClosed.ALLOW, value="x"))
    record = _record(run)
    assert record.request_id == "req-1" and record.run_id == "r1"
    assert task_lines(transition.tasks) == ["wf-1/r1/0/1 p.first"]
    reply = _reply(transition)
    assert reply == Reply(
        "req-1", ReplyKind.START, WID, "r1", True, "RUNNING", run.now_ms, created=True
    )


def test_a_start_without_a_request_id_gets_no_reply() -> None:
    run = WorkflowRun(REGISTRY, "t", run_id="r1")
    transition = run.send(_start(None, IfRunning.FAIL, IfClosed.ALLOW))
    assert transition.reply is None
    assert _record(run).request_id is None
    assert task_lines(transition.tasks) == ["wf-1/r1/0/1 p.first"]


# --- an open run: if_running -----------------------------------------------------------


def test_use_existing_answers_with_the_open_run_and_changes_nothing() -> None:
    run = _running()
    before = _record(run)
    transition = run.send(_start("req-2", IfRunning.USE_EXISTING, value="second"))
    _assert_unchanged(run, before, transition)
    reply = _reply(transition)
    assert reply.ok and not reply.created and reply.failure is None
    assert reply.request_id == "req-2"
    assert reply.run_id == "r1" and reply.status == "RUNNING"
    assert reply.at_ms == run.now_ms


def test_fail_answers_with_a_failure_naming_the_open_run_and_changes_nothing() -> None:
    run = _running()
    before = _record(run)
    transition = run.send(_start("req-2", IfRunning.FAIL, value="second"))
    _assert_unchanged(run, before, transition)
    reply = _reply(transition)
    assert not reply.ok and not reply.created and reply.payload is None
    assert reply.failure is not None
    assert reply.failure.error_type == "WorkflowAlreadyRunning"
    assert "r1" in reply.failure.message and "FAIL" in reply.failure.message
    assert reply.run_id == "r1" and reply.status == "RUNNING"
    # The open run goes on as if nothing had come.
    run.complete(0, "done")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert decode_json(_record(run).result or encode_json(None)) == {
        "input": "first",
        "result": "done",
    }


def test_terminate_existing_closes_the_open_run_and_starts_a_new_one() -> None:
    run = _running()
    old = _record(run)
    run.run_id = "r2"  # the shell gives every start a fresh run id
    transition = run.send(_start("req-2", IfRunning.TERMINATE_EXISTING, value="second"))
    now = run.now_ms

    replaced = transition.replaced
    assert replaced is not None
    assert_status(replaced, WorkflowStatus.TERMINATED, "Terminated")
    assert replaced.failure is not None and "TERMINATE_EXISTING" in replaced.failure.message
    assert replaced.closed_at_ms == now and replaced.updated_at_ms == now
    assert replaced.revision == old.revision + 1
    assert replaced.wake_at_ms is None
    assert replaced.run_id == "r1" and replaced.request_id == "req-1"
    assert replaced.events == old.events  # no compensation, nothing added
    assert replaced.result is None
    assert_encodable(replaced)

    fresh = _record(run)
    assert fresh is transition.record
    assert_status(fresh, WorkflowStatus.RUNNING)
    assert fresh.run_id == "r2" and fresh.request_id == "req-2"
    assert fresh.started_at_ms == now and fresh.revision == 1
    assert decode_json(fresh.input) == "second"
    assert_history(fresh, ["sched 0#1 p.first"])
    assert task_lines(transition.tasks) == ["wf-1/r2/0/1 p.first"]

    reply = _reply(transition)
    assert reply.ok and reply.created and reply.failure is None
    assert (reply.request_id, reply.run_id, reply.status) == ("req-2", "r2", "RUNNING")


def test_the_terminated_runs_late_result_is_ignored_by_the_new_run() -> None:
    run = _running()
    run.run_id = "r2"
    run.send(_start("req-2", IfRunning.TERMINATE_EXISTING, value="second"))
    fresh = _record(run)
    # Both runs sent step 0 attempt 1; the old run's activity id carries its run id.
    late = completed(WID, 0, 1, "from the old run", run.now_ms, run_id="r1")
    assert late.activity_id == activity_id(WID, 0, 1, "r1") != activity_id(WID, 0, 1, "r2")
    transition = run.send(late)
    assert transition.ignored == "activity-id-mismatch"
    assert transition.record is None and run.record is fresh
    # The new run's own result is taken.
    run.complete(0, "from the new run")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert decode_json(_record(run).result or encode_json(None)) == {
        "input": "second",
        "result": "from the new run",
    }


def test_terminate_existing_also_replaces_a_parked_run() -> None:
    run = _running()
    stuck = park(_record(run), _start(), PARKED, run.now_ms, run_id="")
    assert_status(stuck, WorkflowStatus.STUCK)
    transition = advance(
        stuck, _start("req-2", IfRunning.TERMINATE_EXISTING), T0 + 50_000, REGISTRY, run_id="r2"
    )
    assert transition.replaced is not None
    assert_status(transition.replaced, WorkflowStatus.TERMINATED, "Terminated")
    assert transition.record is not None and transition.record.run_id == "r2"
    assert_status(transition.record, WorkflowStatus.RUNNING)


def test_a_terminated_record_without_room_for_its_reason_still_closes() -> None:
    """The reason is dropped when the closed record would not fit the grace budget."""

    def measure(record: WorkflowRecord) -> int:
        too_big = record.status is WorkflowStatus.TERMINATED and record.failure is not None
        return 10**9 if too_big else 100

    limits = Limits(max_record_bytes=100_000, measure=measure)
    run = _running()
    transition = advance(
        _record(run),
        _start("req-2", IfRunning.TERMINATE_EXISTING),
        run.now_ms + 1,
        REGISTRY,
        limits,
        run_id="r2",
    )
    assert transition.replaced is not None
    assert transition.replaced.status is WorkflowStatus.TERMINATED
    assert transition.replaced.failure is None
    assert transition.replaced.closed_at_ms == run.now_ms + 1
    assert transition.record is not None and transition.record.run_id == "r2"


def test_a_start_without_options_keeps_the_old_behaviour_on_an_open_run() -> None:
    run = _running(request_id=None)
    before = _record(run)
    transition = run.send(_start(None, value="second"))
    _assert_unchanged(run, before, transition)
    assert transition.reply is None
    assert "duplicate-start" in IGNORED_REASONS


def test_a_request_id_without_a_policy_uses_the_existing_run() -> None:
    run = _running()
    before = _record(run)
    transition = run.send(_start("req-2"))
    _assert_unchanged(run, before, transition)
    reply = _reply(transition)
    assert reply.ok and not reply.created and reply.run_id == "r1"


@pytest.mark.parametrize("policy", [None, *IfRunning], ids=lambda p: getattr(p, "value", "none"))
def test_a_retried_start_of_the_open_run_is_answered_as_the_first_time(
    policy: IfRunning | None,
) -> None:
    run = _running("req-1", run_id="r1")
    first = run.last
    assert first is not None
    before = _record(run)
    run.run_id = "r2"  # what the shell would give the retried send
    transition = run.send(_start("req-1", policy, value="retried"))
    _assert_unchanged(run, before, transition)  # TERMINATE_EXISTING terminates nothing
    reply = _reply(transition)
    assert reply.ok and reply.created and reply.failure is None
    assert (reply.request_id, reply.run_id, reply.status) == ("req-1", "r1", "RUNNING")
    assert first.reply is not None
    assert (reply.ok, reply.created, reply.run_id) == (
        first.reply.ok,
        first.reply.created,
        first.reply.run_id,
    )


def test_a_retried_start_of_a_run_made_by_terminate_existing_keeps_that_run() -> None:
    run = _running()
    run.run_id = "r2"
    run.send(_start("req-2", IfRunning.TERMINATE_EXISTING, value="second"))
    second = _record(run)
    run.run_id = "r3"
    transition = run.send(_start("req-2", IfRunning.TERMINATE_EXISTING, value="second"))
    _assert_unchanged(run, second, transition)
    reply = _reply(transition)
    assert reply.ok and reply.created and reply.run_id == "r2"


def test_a_retried_start_of_a_parked_run_is_answered_with_it() -> None:
    run = _running()
    stuck = park(_record(run), _start(), PARKED, run.now_ms, run_id="")
    transition = advance(
        stuck, _start("req-1", IfRunning.TERMINATE_EXISTING), T0 + 9_000, REGISTRY, run_id="r9"
    )
    assert transition.ignored == "duplicate-start" and transition.replaced is None
    reply = _reply(transition)
    assert reply.created and reply.run_id == "r1" and reply.status == "STUCK"


def test_a_start_of_a_workflow_with_a_status_from_newer_code_is_refused_with_a_reply() -> None:
    run = _running()
    newer = WorkflowRecord(WID, "t", WorkflowStatus.UNKNOWN, encode_json(1), T0, T0, 3, run_id="r1")
    for start in (_start("req-2", IfRunning.TERMINATE_EXISTING), _start("req-2")):
        transition = advance(newer, start, run.now_ms, REGISTRY, run_id="r2")
        assert transition.ignored == "unknown-status"
        assert transition.record is None and transition.replaced is None
        reply = _reply(transition)
        assert not reply.ok and reply.failure is not None
        assert reply.failure.error_type == "UnknownStatus"
    assert advance(newer, _start(None), run.now_ms, REGISTRY).reply is None


# --- a closed run: if_closed ------------------------------------------------------------


def _new_run(transition: Transition, request_id: str | None = "req-2") -> WorkflowRecord:
    assert transition.ignored is None, f"expected a new run, observed {transition.ignored!r}"
    record = transition.record
    assert record is not None
    assert_status(record, WorkflowStatus.RUNNING)
    assert record.run_id == "r2" and record.request_id == request_id
    assert record.revision == 1 and record.started_at_ms == T0 + 1
    assert transition.replaced is None
    assert task_lines(transition.tasks) == ["wf-1/r2/0/1 p.first"]
    if request_id is not None:
        reply = _reply(transition)
        assert reply.ok and reply.created and reply.run_id == "r2" and reply.status == "RUNNING"
    else:
        assert transition.reply is None
    return record


def _refused(transition: Transition, status: WorkflowStatus, policy: str) -> Reply:
    assert transition.ignored == "duplicate-start"
    assert transition.record is None and transition.tasks == () and transition.replaced is None
    reply = _reply(transition)
    assert not reply.ok and not reply.created
    assert reply.failure is not None
    assert reply.failure.error_type == "WorkflowIdReuseRejected"
    assert status.value in reply.failure.message and policy in reply.failure.message
    assert reply.run_id == "r1" and reply.status == status.value
    return reply


@pytest.mark.parametrize("status", CLOSED_STATUSES, ids=lambda s: s.value)
def test_allow_starts_a_new_run_after_any_closed_run(status: WorkflowStatus) -> None:
    transition = start_again(
        _closed(status), _start("req-2", if_closed=IfClosed.ALLOW), T0 + 1, REGISTRY, run_id="r2"
    )
    _new_run(transition)


@pytest.mark.parametrize("status", NOT_COMPLETED, ids=lambda s: s.value)
def test_allow_if_failed_starts_a_new_run_after_a_run_that_did_not_complete(
    status: WorkflowStatus,
) -> None:
    start = _start("req-2", if_closed=IfClosed.ALLOW_IF_FAILED)
    _new_run(start_again(_closed(status), start, T0 + 1, REGISTRY, run_id="r2"))


def test_allow_if_failed_refuses_after_a_completed_run() -> None:
    start = _start("req-2", if_closed=IfClosed.ALLOW_IF_FAILED)
    transition = start_again(
        _closed(WorkflowStatus.COMPLETED), start, T0 + 1, REGISTRY, run_id="r2"
    )
    _refused(transition, WorkflowStatus.COMPLETED, "ALLOW_IF_FAILED")


@pytest.mark.parametrize("policy", [None, IfClosed.REJECT], ids=["none", "REJECT"])
@pytest.mark.parametrize("status", CLOSED_STATUSES, ids=lambda s: s.value)
def test_reject_and_no_policy_refuse_after_any_closed_run(
    status: WorkflowStatus, policy: IfClosed | None
) -> None:
    start = _start("req-2", if_closed=policy)
    transition = start_again(_closed(status), start, T0 + 1, REGISTRY, run_id="r2")
    _refused(transition, status, "REJECT")


def test_a_start_without_a_request_id_after_a_closed_run_keeps_the_old_behaviour() -> None:
    transition = start_again(
        _closed(WorkflowStatus.FAILED), _start(None), T0 + 1, REGISTRY, run_id="r2"
    )
    assert transition.ignored == "duplicate-start"
    assert transition.record is None and transition.reply is None
    # With a policy that allows it, the new run starts without a reply.
    allowed = start_again(
        _closed(WorkflowStatus.FAILED),
        _start(None, if_closed=IfClosed.ALLOW),
        T0 + 1,
        REGISTRY,
        run_id="r2",
    )
    _new_run(allowed, request_id=None)


@pytest.mark.parametrize("policy", [None, *IfClosed], ids=lambda p: getattr(p, "value", "none"))
@pytest.mark.parametrize(
    "status", [WorkflowStatus.COMPLETED, WorkflowStatus.FAILED], ids=lambda s: s.value
)
def test_a_retried_start_of_a_closed_run_is_answered_as_the_first_time(
    status: WorkflowStatus, policy: IfClosed | None
) -> None:
    start = _start("req-1", IfRunning.TERMINATE_EXISTING, policy)
    transition = start_again(_closed(status, "req-1"), start, T0 + 1, REGISTRY, run_id="r2")
    assert transition.ignored == "duplicate-start"
    assert transition.record is None and transition.tasks == ()
    reply = _reply(transition)
    assert reply.ok and reply.created and reply.failure is None
    assert (reply.request_id, reply.run_id, reply.status) == ("req-1", "r1", status.value)


def test_advance_applies_if_closed_to_a_closed_record_it_is_given() -> None:
    run = _running()
    run.complete(0, "done")
    done = _record(run)
    assert_status(done, WorkflowStatus.COMPLETED)
    now = run.now_ms + 1

    refused = advance(done, _start("req-2", if_closed=IfClosed.ALLOW_IF_FAILED), now, REGISTRY)
    _refused(refused, WorkflowStatus.COMPLETED, "ALLOW_IF_FAILED")

    retried = advance(done, _start("req-1", if_closed=IfClosed.ALLOW), now, REGISTRY, run_id="r2")
    assert retried.ignored == "duplicate-start" and retried.record is None
    assert _reply(retried).created and _reply(retried).run_id == "r1"

    allowed = advance(done, _start("req-2", if_closed=IfClosed.ALLOW), now, REGISTRY, run_id="r2")
    assert allowed.record is not None and allowed.record.run_id == "r2"
    assert allowed.record.request_id == "req-2" and allowed.record.revision == 1
    assert allowed.replaced is None  # a closed run is replaced, not terminated
    assert _reply(allowed).created


def test_a_failed_run_may_be_started_again_with_allow_if_failed() -> None:
    run = _running()
    run.fail(0, "Declined")
    failed = _record(run)
    assert_status(failed, WorkflowStatus.FAILED)
    closed = ClosedRun(failed.status, failed.run_id, failed.request_id)
    start = _start("req-2", if_closed=IfClosed.ALLOW_IF_FAILED, at_ms=run.now_ms)
    transition = start_again(closed, start, run.now_ms + 1, REGISTRY, run_id="r2")
    assert transition.record is not None and transition.record.run_id == "r2"
    assert task_lines(transition.tasks) == ["wf-1/r2/0/1 p.first"]


# --- request ids ----------------------------------------------------------------------


def test_a_request_id_of_200_characters_is_kept() -> None:
    request_id = "r" * MAX_REQUEST_ID_CHARS
    assert MAX_REQUEST_ID_CHARS == 200
    transition = advance(None, _start(request_id), T0, REGISTRY, run_id="r1")
    assert transition.record is not None and transition.record.request_id == request_id
    retried = advance(
        transition.record, _start(request_id, IfRunning.FAIL), T0 + 1, REGISTRY, run_id="r2"
    )
    assert _reply(retried).ok and _reply(retried).created


def test_a_longer_request_id_is_refused_under_every_policy() -> None:
    """A request id that cannot be kept could not be recognised when retried (a retried
    TERMINATE_EXISTING would end its own run): such a start is refused, changes nothing."""
    request_id = "r" * (MAX_REQUEST_ID_CHARS + 1)
    fresh = advance(None, _start(request_id), T0, REGISTRY, run_id="r1")
    assert fresh.record is None and fresh.ignored == "start-refused"
    reply = _reply(fresh)
    assert not reply.ok and reply.failure is not None
    assert reply.failure.error_type == "InvalidRequest"
    running = advance(None, _start("short"), T0, REGISTRY, run_id="r1").record
    assert running is not None
    for policy in IfRunning:
        again = advance(running, _start(request_id, policy), T0 + 1, REGISTRY, run_id="r2")
        assert again.record is None and again.replaced is None
        assert _reply(again).failure is not None
    closed = ClosedRun(WorkflowStatus.FAILED, "r1", None, ())
    later = start_again(
        closed, _start(request_id, if_closed=IfClosed.ALLOW), T0, REGISTRY, run_id="r3"
    )
    assert later.record is None and later.ignored == "start-refused"


# --- records through the codec --------------------------------------------------------


def test_records_with_request_ids_and_terminated_round_trip_through_the_codec() -> None:
    run = _running("req-ü-1")
    run.run_id = "r2"
    transition = run.send(_start("req-2", IfRunning.TERMINATE_EXISTING))
    assert transition.replaced is not None and transition.record is not None
    for record in (transition.replaced, transition.record):
        data = CODEC.encode_workflow(record)
        assert CODEC.decode_workflow(data) == record
        assert data == CODEC.encode_workflow_whole(record)
        head = CODEC.peek_workflow(data)
        assert (head.status, head.run_id, head.request_id) == (
            record.status,
            record.run_id,
            record.request_id,
        )
    assert CODEC.decode_workflow(CODEC.encode_workflow(transition.replaced)).status is (
        WorkflowStatus.TERMINATED
    )
    assert CODEC.peek_workflow(CODEC.encode_workflow(transition.replaced)).closed_at_ms == (
        run.now_ms
    )


def test_starts_with_options_round_trip_through_the_codec() -> None:
    for start in (
        _start("req-1", IfRunning.TERMINATE_EXISTING, IfClosed.ALLOW_IF_FAILED),
        _start(None, IfRunning.FAIL),
        _start(None, None, IfClosed.REJECT),
        _start("req-2"),
    ):
        assert CODEC.decode_inbox(CODEC.encode_inbox(start)) == start


# --- the shell's bookkeeping of closed runs -------------------------------------------


def _put(state: PartitionState, record: WorkflowRecord) -> None:
    data = CODEC.encode_workflow(record)
    head = CODEC.peek_workflow(data)
    state.put(
        record.workflow_id,
        data,
        head.status,
        head.closed_at_ms or 0,
        head.wake_at_ms,
        head.run_id,
        head.request_id,
    )


def _rec(
    wid: str,
    status: WorkflowStatus,
    *,
    run_id: str = "r1",
    request_id: str | None = "req-1",
    closed_at: int = 500,
) -> WorkflowRecord:
    return WorkflowRecord(
        wid,
        "t",
        status,
        encode_json(None),
        1,
        closed_at,
        2,
        closed_at_ms=closed_at if status.terminal else None,
        run_id=run_id,
        request_id=request_id,
    )


@pytest.mark.parametrize("status", CLOSED_STATUSES, ids=lambda s: s.value)
def test_a_closed_workflow_keeps_its_closed_run(status: WorkflowStatus) -> None:
    state = PartitionState(0)
    _put(state, _rec("w-1", WorkflowStatus.RUNNING))
    assert state.closed_runs == {}
    _put(state, _rec("w-1", status))
    assert state.closed_runs == {"w-1": (status, "r1", "req-1", ())}
    assert state.closed == {"w-1": 500} and "w-1" not in state.open
    assert ClosedRun(*state.closed_runs["w-1"]) == ClosedRun(status, "r1", "req-1")


def test_open_and_unknown_statuses_keep_no_closed_run() -> None:
    state = PartitionState(0)
    _put(state, _rec("w-1", WorkflowStatus.RUNNING))
    _put(state, _rec("w-2", WorkflowStatus.STUCK))
    state.put("w-3", b"opaque", WorkflowStatus.UNKNOWN, 0)
    assert state.closed_runs == {}


def test_a_closed_run_without_a_request_id_is_kept_with_none() -> None:
    state = PartitionState(0)
    _put(state, _rec("w-1", WorkflowStatus.CANCELLED, request_id=None))
    assert state.closed_runs == {"w-1": (WorkflowStatus.CANCELLED, "r1", None, ())}


def test_a_reopened_id_forgets_its_closed_run() -> None:
    state = PartitionState(0)
    _put(state, _rec("w-1", WorkflowStatus.COMPLETED))
    _put(state, _rec("w-1", WorkflowStatus.RUNNING, run_id="r2", request_id="req-2"))
    assert state.closed_runs == {} and state.closed == {}
    assert "w-1" in state.open
    # ... and closing the new run keeps the new run's identity.
    _put(state, _rec("w-1", WorkflowStatus.FAILED, run_id="r2", request_id="req-2", closed_at=900))
    assert state.closed_runs == {"w-1": (WorkflowStatus.FAILED, "r2", "req-2", ())}
    assert state.closed == {"w-1": 900}


def test_a_deleted_id_forgets_its_closed_run() -> None:
    state = PartitionState(0)
    _put(state, _rec("w-1", WorkflowStatus.COMPLETED))
    _put(state, _rec("w-2", WorkflowStatus.TERMINATED))
    state.delete("w-1")
    assert state.closed_runs == {"w-2": (WorkflowStatus.TERMINATED, "r1", "req-1", ())}
    assert "w-1" not in state.closed
    state.mark_unwritable("w-2", "unreadable")
    assert state.closed_runs == {}


def test_closed_stays_in_closing_order_when_an_id_closes_again() -> None:
    state = PartitionState(0)
    _put(state, _rec("a", WorkflowStatus.COMPLETED, closed_at=100))
    _put(state, _rec("b", WorkflowStatus.COMPLETED, closed_at=200))
    _put(state, _rec("c", WorkflowStatus.COMPLETED, closed_at=300))
    # "a" runs again and closes last.
    _put(state, _rec("a", WorkflowStatus.RUNNING, run_id="r2"))
    _put(state, _rec("a", WorkflowStatus.TERMINATED, run_id="r2", closed_at=400))
    assert list(state.closed.items()) == [("b", 200), ("c", 300), ("a", 400)]
    # A closed id written closed again (a start that replaced it without reopening it in
    # between, as the shell commits it) moves to the end as well.
    _put(state, _rec("b", WorkflowStatus.FAILED, run_id="r3", closed_at=500))
    assert list(state.closed.items()) == [("c", 300), ("a", 400), ("b", 500)]
    assert state.closed_runs["b"] == (WorkflowStatus.FAILED, "r3", "req-1", ())
    assert state.closed_runs["a"] == (WorkflowStatus.TERMINATED, "r2", "req-1", ())


def test_the_store_promotes_closed_runs_with_their_run_and_request_ids() -> None:
    store = WorkflowStore()
    store.install(PartitionState(0))
    closed = _rec("w-1", WorkflowStatus.TERMINATED, run_id="r7", request_id="req-7")
    store.stage(0, closed, CODEC.encode_workflow(closed))
    assert store.partition(0).closed_runs == {}  # staged, not yet committed
    store.promote()
    assert store.partition(0).closed_runs == {"w-1": (WorkflowStatus.TERMINATED, "r7", "req-7", ())}
    store.stage_tombstone(0, "w-1")
    store.promote()
    assert store.partition(0).closed_runs == {}


def test_a_run_replaced_by_terminate_existing_is_tracked_through_the_store() -> None:
    """The shell writes the TERMINATED record, then the new run: the id ends open."""
    run = _running()
    run.run_id = "r2"
    transition = run.send(_start("req-2", IfRunning.TERMINATE_EXISTING))
    assert transition.replaced is not None and transition.record is not None
    state = PartitionState(0)
    _put(state, transition.replaced)
    assert state.closed_runs == {WID: (WorkflowStatus.TERMINATED, "r1", "req-1", ())}
    _put(state, transition.record)
    assert state.closed_runs == {} and WID in state.open
    first = [e for e in transition.record.events if isinstance(e, ActivityScheduled)]
    assert len(first) == 1


def test_an_id_that_newer_code_wrote_after_it_closed_is_not_closed_any_more() -> None:
    store = WorkflowStore()
    store.install(PartitionState(0))
    state = store.partition(0)
    _put(state, _rec("w-1", WorkflowStatus.COMPLETED))
    # Restore goes on: a later record of the id has a status this code does not know.
    state.put("w-1", b"written by newer code", WorkflowStatus.UNKNOWN, 0)
    assert "w-1" in state.unwritable
    assert "w-1" not in state.closed_runs, "a stale closed run would let a start reuse the id"
    assert store.presence(0, "w-1") is Presence.UNWRITABLE


# --- starts of earlier runs -----------------------------------------------------------


def _replace(run: WorkflowRun, request_id: str, run_id: str) -> WorkflowRecord:
    """Start run ``run_id`` with ``request_id`` over the open one (TERMINATE_EXISTING)."""
    run.run_id = run_id
    transition = run.send(_start(request_id, IfRunning.TERMINATE_EXISTING))
    assert transition.replaced is not None, f"{request_id} replaced nothing: {transition}"
    record = _record(run)
    assert (record.run_id, record.request_id) == (run_id, request_id)
    return record


def _answered_with(transition: Transition, request_id: str, run_id: str, status: str) -> None:
    """A retried start: answered as the first time, nothing changed."""
    assert transition.ignored == "duplicate-start", transition
    assert transition.record is None and transition.replaced is None
    assert transition.tasks == ()
    reply = _reply(transition)
    assert reply.ok and reply.created and reply.failure is None
    assert (reply.request_id, reply.run_id, reply.status) == (request_id, run_id, status)


def _completed_then_allowed() -> WorkflowRun:
    """Run r1 (req-1) completed, then run r2 started by req-2 with ALLOW."""
    run = _running()
    run.complete(0, "done")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    run.run_id = "r2"
    run.send(_start("req-2", if_closed=IfClosed.ALLOW, value="second"))
    assert _record(run).run_id == "r2"
    return run


def test_a_new_run_remembers_the_starts_of_the_runs_it_replaced() -> None:
    run = _running()
    second = _replace(run, "req-2", "r2")
    assert second.earlier_requests == (RunRequest("req-1", "r1"),)
    third = _replace(run, "req-3", "r3")
    assert third.earlier_requests == (RunRequest("req-2", "r2"), RunRequest("req-1", "r1"))
    # Across a closed run started again too, newest first.
    run.complete(0, "done")
    run.run_id = "r4"
    run.send(_start("req-4", if_closed=IfClosed.ALLOW))
    fourth = _record(run)
    assert fourth.run_id == "r4"
    assert fourth.earlier_requests == (
        RunRequest("req-3", "r3"),
        RunRequest("req-2", "r2"),
        RunRequest("req-1", "r1"),
    )


@pytest.mark.parametrize("policy", [None, *IfRunning], ids=lambda p: getattr(p, "value", "none"))
def test_a_retried_start_of_a_terminated_run_is_answered_and_ends_nothing(
    policy: IfRunning | None,
) -> None:
    run = _running()
    second = _replace(run, "req-2", "r2")
    run.run_id = "r3"
    transition = run.send(_start("req-1", policy, IfClosed.ALLOW, value="retried"))
    # The status is not r1's any more: the id's latest run is r2.
    _answered_with(transition, "req-1", "r1", "")
    assert run.record is second


@pytest.mark.parametrize("policy", [None, *IfClosed], ids=lambda p: getattr(p, "value", "none"))
def test_a_retried_start_of_a_closed_run_replaced_by_allow_starts_nothing(
    policy: IfClosed | None,
) -> None:
    run = _completed_then_allowed()
    second = _record(run)
    assert second.earlier_requests == (RunRequest("req-1", "r1"),)
    run.run_id = "r3"
    # While r2 is open: even TERMINATE_EXISTING does not end it.
    open_retry = run.send(_start("req-1", IfRunning.TERMINATE_EXISTING, policy))
    _answered_with(open_retry, "req-1", "r1", "")
    assert run.record is second
    # Once r2 has closed too: ALLOW starts nothing, through advance and start_again.
    run.run_id = "r2"
    run.complete(0, "done again")
    done = _record(run)
    assert_status(done, WorkflowStatus.COMPLETED)
    assert done.earlier_requests == (RunRequest("req-1", "r1"),)
    retried = _start("req-1", IfRunning.TERMINATE_EXISTING, policy)
    _answered_with(advance(done, retried, run.now_ms, REGISTRY, run_id="r3"), "req-1", "r1", "")
    closed = ClosedRun(done.status, done.run_id, done.request_id, done.earlier_requests)
    again = start_again(closed, retried, run.now_ms, REGISTRY, run_id="r3")
    _answered_with(again, "req-1", "r1", "")
    # The latest run's own start is answered with its status.
    own = start_again(closed, _start("req-2", None, policy), run.now_ms, REGISTRY, run_id="r3")
    _answered_with(own, "req-2", "r2", "COMPLETED")


def test_only_the_starts_of_the_last_eight_replaced_runs_are_remembered() -> None:
    assert MAX_EARLIER_REQUESTS == 8
    run = _running("req-0", run_id="r0")
    for n in range(1, 11):
        latest = _replace(run, f"req-{n}", f"r{n}")
    assert latest.earlier_requests == tuple(
        RunRequest(f"req-{n}", f"r{n}") for n in range(9, 9 - MAX_EARLIER_REQUESTS, -1)
    )
    assert_encodable(latest)
    # The oldest still remembered is recognised ...
    run.run_id = "r11"
    _answered_with(run.send(_start("req-2", IfRunning.TERMINATE_EXISTING)), "req-2", "r2", "")
    assert run.record is latest
    # ... one forgotten is a new request: TERMINATE_EXISTING ends the open run.
    forgotten = run.send(_start("req-1", IfRunning.TERMINATE_EXISTING))
    assert forgotten.ignored is None and forgotten.replaced is not None
    assert forgotten.replaced.run_id == "r10"
    assert _record(run).run_id == "r11"
    assert len(_record(run).earlier_requests) == MAX_EARLIER_REQUESTS
    assert _record(run).earlier_requests[0] == RunRequest("req-10", "r10")


def test_an_empty_request_id_is_refused_under_every_policy() -> None:
    fresh = advance(None, _start(""), T0, REGISTRY, run_id="r1")
    assert fresh.record is None and fresh.ignored == "start-refused"
    reply = _reply(fresh)
    assert reply.request_id == "" and not reply.ok and not reply.created
    assert reply.failure is not None and reply.failure.error_type == "InvalidRequest"
    running = _record(_running())
    for policy in IfRunning:
        again = advance(running, _start("", policy), T0 + 1, REGISTRY, run_id="r2")
        assert again.ignored == "start-refused", policy
        assert again.record is None and again.replaced is None
        assert _reply(again).failure is not None
        assert (_reply(again).run_id, _reply(again).status) == ("r1", "RUNNING")
    for status in CLOSED_STATUSES:
        later = start_again(
            _closed(status), _start("", if_closed=IfClosed.ALLOW), T0, REGISTRY, run_id="r3"
        )
        assert later.record is None and later.ignored == "start-refused"
        assert _reply(later).failure is not None


def test_earlier_requests_are_in_the_head_and_kept_for_closed_runs() -> None:
    run = _running()
    _replace(run, "req-2", "r2")
    run.complete(0, "done")
    done = _record(run)
    assert_status(done, WorkflowStatus.COMPLETED)
    data = CODEC.encode_workflow(done)
    assert CODEC.decode_workflow(data).earlier_requests == (RunRequest("req-1", "r1"),)
    head = CODEC.peek_workflow(data)
    assert head.earlier_requests == (RunRequest("req-1", "r1"),)
    # The store keeps them for the closed run, as a start of the id needs them.
    store = WorkflowStore()
    store.install(PartitionState(0))
    store.stage(0, done, data)
    store.promote()
    kept = store.partition(0).closed_runs[WID]
    assert kept == (WorkflowStatus.COMPLETED, "r2", "req-2", (RunRequest("req-1", "r1"),))
    retried = start_again(
        ClosedRun(*kept), _start("req-1", if_closed=IfClosed.ALLOW), T0, REGISTRY, run_id="r3"
    )
    _answered_with(retried, "req-1", "r1", "")
    # And so does a restore, from the peeked head alone.
    state = PartitionState(0)
    state.put(
        WID,
        data,
        head.status,
        head.closed_at_ms or 0,
        head.wake_at_ms,
        head.run_id,
        head.request_id,
        head.earlier_requests,
    )
    assert state.closed_runs[WID] == kept
