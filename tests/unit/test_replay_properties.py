"""Replay determinism under random outcomes (hypothesis).

A workflow with a sequential step, a parallel pair with a compensation, and a final step
receives a random sequence of outcomes (complete, retryable failure, failure of a
non-retryable type, final failure), of wake-ups (at the record's wake time, or too early)
and of re-delivered old inputs. A move finding nothing in flight while a retry waits for
its backoff wakes the workflow instead. Whatever the sequence,
the engine must be a function of its inputs, keep attempts and ids in order, survive the
Avro round trip of every record, and stop changing once the workflow is closed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import ActivityError, RetryPolicy, WorkflowContext, WorkflowRegistry
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    ActivityTask,
    StartWorkflow,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.replay import Limits, Transition, advance, pending_tasks
from tests.unit.conftest import WorkflowRun, completed, failed, history_lines, task_lines

REGISTRY = WorkflowRegistry()
CODEC = AvroCodec()
MAX_ATTEMPTS = {"p.first": 3, "p.left": 2, "p.right": 4, "p.undo": 2, "p.last": 3}


@REGISTRY.workflow("prop.steps")
async def steps(ctx: WorkflowContext, _: Any) -> Any:
    first = await ctx.activity("p.first", retry=RetryPolicy(max_attempts=3))
    try:
        left, right = await ctx.gather(
            ctx.activity("p.left", first, retry=RetryPolicy(max_attempts=2)),
            ctx.activity(
                "p.right",
                first,
                retry=RetryPolicy(max_attempts=4, non_retryable_error_types=("Fatal",)),
            ),
        )
    except ActivityError:
        await ctx.activity("p.undo", first, compensation=True, retry=RetryPolicy(max_attempts=2))
        raise
    last = await ctx.activity("p.last", [left, right])
    return {"first": first, "last": last}


# Completions are drawn most often, so that many runs get past the parallel pair.
KINDS = ("complete",) * 5 + ("retryable",) * 2 + ("fatal", "final", "redeliver", "wake")
moves = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 1_000)), max_size=30)
# Enough runs that every ending (and retries inside the parallel pair) shows up often.
MANY = settings(max_examples=300)


def _play(plan: list[tuple[str, int]]) -> WorkflowRun:
    """Feed ``plan`` to a fresh workflow; targets are drawn among its in-flight tasks."""
    run = WorkflowRun(REGISTRY, "prop.steps", workflow_id="prop-1")
    run.start()
    for kind, pick in plan:
        record = run.record
        assert record is not None
        if kind == "redeliver":
            run.send(run.inputs[pick % len(run.inputs)][0])
            continue
        in_flight = pending_tasks(record) if record.status is WorkflowStatus.RUNNING else ()
        if kind == "wake" and (pick % 2 or record.wake_at_ms is None):
            run.send(WakeUp(run.workflow_id))  # usually too early: nothing due
            continue
        if kind == "wake" or (not in_flight and record.wake_at_ms is not None):
            run.wake()
            continue
        target = (in_flight or tuple(run.sent))[pick % len(in_flight or run.sent)]
        wid, seq, attempt = run.workflow_id, target.seq, target.attempt
        if kind == "complete":
            run.send(completed(wid, seq, attempt, target.activity_id, run.now_ms))
        elif kind == "retryable":
            run.send(failed(wid, seq, attempt, "Busy", run.now_ms, retryable=True))
        elif kind == "fatal":
            run.send(failed(wid, seq, attempt, "Fatal", run.now_ms, retryable=True))
        else:
            run.send(failed(wid, seq, attempt, "Broken", run.now_ms))
    return run


def _records(run: WorkflowRun) -> list[WorkflowRecord | None]:
    """The record before each input, then the final one."""
    states: list[WorkflowRecord | None] = [None]
    for transition in run.transitions:
        states.append(transition.record if transition.record is not None else states[-1])
    return states


def _context(run: WorkflowRun) -> str:
    record = run.record
    assert record is not None
    return (
        f"workflow {run.workflow_id} ({record.status.value})\n"
        f"  inputs: {[type(b).__name__ for b, _ in run.inputs]}\n"
        f"  history: {history_lines(record.events)}\n  sent: {task_lines(run.sent)}"
    )


@given(moves)
@MANY
def test_the_same_inputs_give_the_same_records_and_tasks(plan: list[tuple[str, int]]) -> None:
    run = _play(plan)
    record: WorkflowRecord | None = None
    again: list[Transition] = []
    for body, now_ms in run.inputs:
        transition = advance(record, body, now_ms, REGISTRY, Limits())
        record = transition.record or record
        again.append(transition)
    for index, (first, second) in enumerate(zip(run.transitions, again, strict=True)):
        assert first == second, (
            f"{_context(run)}\n  input {index} gave a different transition on a second run:"
            f"\n  first:  {first}\n  second: {second}"
        )


@given(moves)
@MANY
def test_every_transition_either_changes_the_record_or_says_why_not(
    plan: list[tuple[str, int]],
) -> None:
    run = _play(plan)
    states = _records(run)
    for index, transition in enumerate(run.transitions):
        before = states[index]
        assert (transition.record is None) == (transition.ignored is not None), _context(run)
        if transition.record is None:
            assert transition.tasks == (), _context(run)
            continue
        after = transition.record
        expected_revision = 1 if before is None else before.revision + 1
        assert after.revision == expected_revision, _context(run)
        if before is not None:
            assert after.events[: len(before.events)] == before.events, (
                f"{_context(run)}\n  input {index} rewrote earlier history"
            )


@given(moves)
@MANY
def test_attempts_are_consecutive_and_activity_ids_unique(plan: list[tuple[str, int]]) -> None:
    run = _play(plan)
    record = run.record
    assert record is not None
    attempts: dict[int, list[int]] = defaultdict(list)
    names: dict[int, str] = {}
    for event in record.events:
        if isinstance(event, ActivityScheduled):
            attempts[event.seq].append(event.attempt)
            names[event.seq] = event.name
    for seq, seen in attempts.items():
        assert seen == list(range(1, len(seen) + 1)), f"{_context(run)}\n  step {seq}: {seen}"
        assert len(seen) <= MAX_ATTEMPTS[names[seq]], f"{_context(run)}\n  step {seq}"
    assert sorted(attempts) == list(range(len(attempts))), _context(run)

    ids = [task.activity_id for task in run.sent]
    assert len(ids) == len(set(ids)), f"{_context(run)}\n  ids: {ids}"
    for task in run.sent:
        assert task.activity_id == activity_id(task.workflow_id, task.seq, task.attempt)
    scheduled = {(seq, attempt) for seq, seen in attempts.items() for attempt in seen}
    assert {(t.seq, t.attempt) for t in run.sent} == scheduled, _context(run)


@given(moves)
@MANY
def test_running_workflows_wait_for_exactly_the_unsettled_tasks(
    plan: list[tuple[str, int]],
) -> None:
    run = _play(plan)
    record = run.record
    assert record is not None
    if record.status is not WorkflowStatus.RUNNING:
        return
    settled = {
        (e.seq, e.attempt)
        for e in record.events
        if isinstance(e, ActivityCompleted | ActivityFailed)
    }
    outstanding: list[ActivityTask] = [t for t in run.sent if (t.seq, t.attempt) not in settled]
    assert sorted(task_lines(pending_tasks(record))) == sorted(task_lines(outstanding)), _context(
        run
    )


@given(moves)
@MANY
def test_records_survive_the_avro_round_trip_and_restore_the_same_state(
    plan: list[tuple[str, int]],
) -> None:
    run = _play(plan)
    states = _records(run)
    for index, (body, now_ms) in enumerate(run.inputs):
        before = states[index]
        restored = None if before is None else CODEC.decode_workflow(CODEC.encode_workflow(before))
        assert restored == before, f"{_context(run)}\n  record before input {index}"
        transition = advance(restored, body, now_ms, REGISTRY, Limits())
        assert transition == run.transitions[index], (
            f"{_context(run)}\n  input {index} acts differently on a restored record"
        )


@given(moves, moves)
@MANY
def test_a_closed_workflow_takes_no_further_input(
    plan: list[tuple[str, int]], after: list[tuple[str, int]]
) -> None:
    run = _play(plan)
    record = run.record
    assert record is not None
    if not record.status.terminal:
        return
    closed = record
    late: list[Any] = [body for body, _ in run.inputs]
    late += [completed(run.workflow_id, t.seq, t.attempt, "late", run.now_ms) for t in run.sent]
    late += [
        failed(run.workflow_id, t.seq, t.attempt, "Busy", run.now_ms, retryable=True)
        for t in run.sent
    ]
    late.append(completed(run.workflow_id, 99, 1, "ghost", run.now_ms))
    for _, pick in after:
        transition = run.send(late[pick % len(late)])
        expected = (
            "duplicate-start"
            if isinstance(late[pick % len(late)], StartWorkflow)
            else "workflow-closed"
        )
        assert transition.ignored == expected, _context(run)
        assert run.record is closed, _context(run)


@given(moves)
@MANY
def test_closed_workflows_end_in_the_status_their_history_explains(
    plan: list[tuple[str, int]],
) -> None:
    run = _play(plan)
    record = run.record
    assert record is not None
    undo = [e for e in record.events if isinstance(e, ActivityScheduled) and e.compensation]
    done = {e.seq: e for e in record.events if isinstance(e, ActivityCompleted)}
    if record.status is WorkflowStatus.COMPLETED:
        assert not undo, _context(run)
        assert record.result is not None, _context(run)
        value = decode_json(record.result)
        assert value["first"] == activity_id(run.workflow_id, 0, done[0].attempt)
        assert value["last"] == activity_id(run.workflow_id, 3, done[3].attempt)
    elif record.status is WorkflowStatus.COMPENSATED:
        assert undo and undo[0].seq in done, _context(run)
    elif record.status is WorkflowStatus.COMPENSATION_FAILED:
        assert undo and undo[0].seq not in done, _context(run)
    elif record.status is WorkflowStatus.FAILED:
        assert not undo, _context(run)
        assert record.failure is not None and record.failure.error_type == "ActivityError"
    else:
        assert record.status is WorkflowStatus.RUNNING, _context(run)
        assert record.closed_at_ms is None and record.failure is None, _context(run)
    if record.status.terminal:
        assert record.closed_at_ms == record.updated_at_ms, _context(run)


def test_the_strategy_reaches_every_ending() -> None:
    """Guard against a strategy that never closes the workflow: one plan per ending."""
    ok, final = ("complete", 0), ("final", 0)
    endings = {
        WorkflowStatus.COMPLETED: [ok, ok, ok, ok],
        WorkflowStatus.FAILED: [final],
        WorkflowStatus.COMPENSATED: [ok, final, ok, ok],
        WorkflowStatus.COMPENSATION_FAILED: [ok, final, ok, final],
    }
    for status, plan in endings.items():
        record = _play(plan).record
        assert record is not None and record.status is status, (status, record)
    assert _play([("retryable", 0)] * 5).sent[-1].attempt == 3
