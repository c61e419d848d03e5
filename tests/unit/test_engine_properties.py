"""What is in memory is what was committed (issue 10, item 7), for random workflows.

One registered interpreter runs a random *program* taken from its input: sequential
steps with random names, retry policies (with and without backoff) and timeouts
(start-to-close, heartbeat, schedule-to-close), parallel gathers, compensations registered
with a ``Saga`` (sequential or parallel undo), caught failures, fire-and-forget steps,
sleeps, steps raced against a timeout (``with_timeout``) or a timer (``ctx.first``),
exceptions with unencodable text, and in some programs a bug (an invalid name, asyncio). A
random sequence of inputs drives it: results with random JSON, retryable, non-retryable
and final failures, failures whose effects committed, start reports and heartbeats,
wake-ups at the record's wake time and too early, re-delivered old inputs, results of
stale attempts, of unknown steps or with a wrong activity id, resumes and duplicate
starts, under random event and size limits.

After every transition the record is encoded and decoded with the real codec; the
decoded record must equal the one in memory and lead to the same next transition as it,
and its ``wake_at_ms`` must be ``next_wake`` of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import (
    ActivityError,
    ActivityHandle,
    RetryPolicy,
    Saga,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowTimeoutError,
)
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityHeartbeat,
    ActivityResult,
    ActivityStarted,
    ActivityStatus,
    ActivityTask,
    Failure,
    InboxBody,
    ResumeWorkflow,
    StartWorkflow,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.replay import Limits, Transition, advance, next_wake, pending_tasks
from tests.unit.conftest import CODEC, T0, encoded_size, history_lines

REGISTRY = WorkflowRegistry()
WID = "prop-1"
RUN = "r-1"


@REGISTRY.workflow("prop.program")
async def program(ctx: WorkflowContext, plan: dict[str, Any]) -> Any:
    """Runs the stages of ``plan``; see ``stages`` below for what each one does."""
    results: list[Any] = []
    async with Saga(ctx, parallel=plan["parallel"]) as saga:
        for index, stage in enumerate(plan["stages"]):
            if plan["bug"] == "asyncio" and index == plan["bug_at"]:
                await asyncio.sleep(0)
            elif plan["bug"] is not None and index == plan["bug_at"]:
                handle: ActivityHandle = ctx.activity(plan["bug"])
                results.append(await handle)
            kind = stage["kind"]
            retry = RetryPolicy(
                max_attempts=stage.get("attempts", 1),
                non_retryable_error_types=stage.get("fatal", ()),
                initial_interval=stage.get("backoff", 1),
            )
            timeouts = stage.get("timeouts", {})
            if kind == "step":
                value = stage["value"]
                if isinstance(value, dict) and list(value) == ["__big__"]:
                    value = "x" * (700 * value["__big__"])  # large, from a small input
                try:
                    step = ctx.activity(stage["name"], value, retry=retry, **timeouts)
                    if stage["race"] == "timeout":
                        results.append(await step.with_timeout(stage["seconds"]))
                    elif stage["race"] == "timer":
                        winner = await ctx.first(step, ctx.sleep(stage["seconds"]))
                        results.append(None if winner is not step else await step)
                    else:
                        results.append(await step)
                except WorkflowTimeoutError as err:
                    if not stage["catch"]:
                        raise
                    results.append(["timeout", err.seconds])
                    continue
                except ActivityError as err:
                    if not stage["catch"]:
                        raise
                    results.append([err.error_type, err.attempts, err.effects_committed])
                    continue
                if stage["undo"] is not None:
                    saga.add_compensation(stage["undo"], results[-1])
            elif kind == "gather":
                handles = [
                    ctx.activity(name, index, retry=retry)
                    for index, name in enumerate(stage["names"])
                ]
                results.append(await ctx.gather(*handles))
            elif kind == "fire":
                ctx.activity(stage["name"], None)
            elif kind == "sleep":
                await ctx.sleep(stage["seconds"])
                results.append(ctx.now())
            else:
                assert kind == "raise"
                raise ValueError(stage["message"])
    return results


# --- random programs ---------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_-]{0,4}\.[a-z0-9_][a-z0-9_.-]{0,5}", fullmatch=True)
odd_text = st.sampled_from(["\ud800", "a\udfffb", "nul\x00", "é€😀", ""])
text = st.text(max_size=12) | odd_text
error_types = st.sampled_from(["Busy", "Fatal", "Declined", "RecordTooLarge"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
big_step = st.integers(1, 3).map(lambda n: {"__big__": n})
big_result = st.integers(1, 3).map(lambda n: "x" * (700 * n))

seconds = st.sampled_from([0, 0.5, 1, 2, 30])
timeouts = st.fixed_dictionaries(
    {},
    optional={
        "start_to_close": st.sampled_from([1, 3]),
        "heartbeat_timeout": st.sampled_from([1, 2]),
        "schedule_to_close": st.sampled_from([2, 5, 60]),
    },
)
step = st.fixed_dictionaries(
    {
        "kind": st.just("step"),
        "name": names,
        "value": json_values | big_step,
        "attempts": st.integers(1, 4),
        "fatal": st.lists(error_types, max_size=2, unique=True),
        "undo": st.none() | names,
        "catch": st.booleans(),
        "backoff": st.sampled_from([0, 1, 2.5]),
        "timeouts": timeouts,
        "race": st.sampled_from([None, None, "timeout", "timer"]),
        "seconds": seconds,
    }
)
sleep = st.fixed_dictionaries({"kind": st.just("sleep"), "seconds": seconds})
gather = st.fixed_dictionaries(
    {
        "kind": st.just("gather"),
        "names": st.lists(names, min_size=1, max_size=4),
        "attempts": st.integers(1, 3),
    }
)
fire = st.fixed_dictionaries({"kind": st.just("fire"), "name": names})
raises = st.fixed_dictionaries({"kind": st.just("raise"), "message": text})
# Mostly steps, so that many programs get far enough to compensate; a bug (an invalid
# name, asyncio) in one program of five.
plans = st.fixed_dictionaries(
    {
        "parallel": st.booleans(),
        "stages": st.lists(
            st.one_of(step, step, step, step, gather, gather, fire, raises, sleep),
            min_size=1,
            max_size=6,
        ),
        "bug": st.sampled_from([None, None, None, None, "nodot", "a b.c", "p.\ud800", "asyncio"]),
        "bug_at": st.integers(0, 5),
    }
)
limits = st.one_of(
    st.just(Limits()),
    st.builds(Limits, max_events=st.integers(4, 30)),
    st.builds(
        Limits,
        max_events=st.integers(4, 60),
        max_record_bytes=st.integers(1_200, 6_000),
        measure=st.just(encoded_size),
    ),
)
MOVES = (
    ("complete",) * 12
    + ("retryable", "fatal", "final", "final", "committed")
    + ("redeliver", "stale", "unknown-step", "wrong-id", "resume", "restart")
    + ("wake",) * 8
    + ("early-wake", "retryable", "retryable")
    + ("started",) * 6
    + ("heartbeat",) * 3
)
moves = st.lists(
    st.tuples(st.sampled_from(MOVES), st.integers(0, 1_000), json_values | big_result),
    max_size=30,
)


def _result(
    task: ActivityTask, status: ActivityStatus, now_ms: int, **fields: Any
) -> ActivityResult:
    return ActivityResult(WID, task.activity_id, task.seq, task.attempt, status, now_ms, **fields)


def _input(
    kind: str,
    pick: int,
    value: Any,
    record: WorkflowRecord,
    sent: list[ActivityTask],
    seen: list[InboxBody | WakeUp],
    now_ms: int,
) -> tuple[InboxBody | WakeUp, int]:
    """The next input and when: ``kind`` aimed at a task chosen by ``pick``."""
    pending = pending_tasks(record)
    wake_at = record.wake_at_ms
    if kind == "early-wake" or (kind == "wake" and wake_at is None):
        return WakeUp(WID), now_ms
    if wake_at is not None and (kind == "wake" or not pending):
        return WakeUp(WID), max(now_ms, wake_at)  # as the shell's timer index would
    return _message(kind, pick, value, pending or tuple(sent), seen, now_ms), now_ms


def _message(
    kind: str,
    pick: int,
    value: Any,
    in_flight: tuple[ActivityTask, ...],
    seen: list[InboxBody | WakeUp],
    now_ms: int,
) -> InboxBody | WakeUp:
    if not in_flight and pick % 2:
        return ResumeWorkflow(WID, now_ms)
    if kind == "redeliver" or not in_flight:
        return seen[1:][pick % (len(seen) - 1)] if len(seen) > 1 else seen[0]
    if kind == "resume":
        return ResumeWorkflow(WID, now_ms)
    if kind == "restart":
        return StartWorkflow(
            WID, "prop.program", encode_json({"parallel": False, "stages": []}), now_ms
        )
    task = in_flight[pick % len(in_flight)]
    if kind == "started":
        # The participant's clock may be off either way; the engine clamps it.
        return ActivityStarted(WID, task.activity_id, task.seq, task.attempt, now_ms - pick)
    if kind == "heartbeat":
        details = None if pick % 3 == 0 else encode_json(value)
        return ActivityHeartbeat(WID, task.activity_id, task.seq, task.attempt, now_ms, details)
    if kind == "complete":
        return _result(task, ActivityStatus.COMPLETED, now_ms, result=encode_json(value))
    if kind == "stale":
        old = dataclasses.replace(task, attempt=max(1, task.attempt - 1))
        return _result(old, ActivityStatus.COMPLETED, now_ms, result=encode_json(value))
    if kind == "unknown-step":
        ghost = dataclasses.replace(task, seq=task.seq + 50, activity_id=f"{WID}/{RUN}/99/1")
        return _result(ghost, ActivityStatus.COMPLETED, now_ms, result=encode_json(value))
    if kind == "wrong-id":
        other = dataclasses.replace(task, activity_id=activity_id(WID, task.seq, task.attempt))
        return _result(other, ActivityStatus.COMPLETED, now_ms, result=encode_json(value))
    # Raw text from the value, lone surrogates and NUL included, as a buggy participant
    # could send it; also as the error type.
    raw = value if isinstance(value, str) else encode_json(value).data[:200].decode()
    error_type = {"retryable": "Busy", "fatal": "Fatal", "final": "Declined"}.get(kind, "Lost")
    failure = Failure(
        error_type + (raw[:3] if "\ud800" in raw else ""),
        f"{kind} {raw}",
        retryable=kind != "final",
        effects_committed=kind == "committed",
    )
    return _result(task, ActivityStatus.FAILED, now_ms, failure=failure)


def _where(plan: dict[str, Any], record: WorkflowRecord | None, index: int) -> str:
    if record is None:
        return f"workflow {WID}, input {index}: no record\n  plan: {plan}"
    return (
        f"workflow {WID} ({record.status.value}), input {index}\n  plan: {plan}\n"
        f"  history: {history_lines(record.events)}\n  failure: {record.failure}"
    )


@given(plans, moves, limits)
@settings(max_examples=300)
def test_every_committed_record_decodes_to_itself_and_acts_the_same(
    plan: dict[str, Any], plan_moves: list[tuple[str, int, Any]], bounds: Limits
) -> None:
    _play(plan, plan_moves, bounds)


def _play(
    plan: dict[str, Any], plan_moves: list[tuple[str, int, Any]], bounds: Limits
) -> WorkflowRecord:
    """Drive ``plan`` with ``plan_moves``, checking every transition; the last record."""
    now_ms = T0
    start = StartWorkflow(WID, "prop.program", encode_json(plan), now_ms)
    seen: list[InboxBody | WakeUp] = [start]
    sent: list[ActivityTask] = []
    record: WorkflowRecord | None = None
    body: InboxBody | WakeUp = start
    at_ms = now_ms + 1_000
    late = 0  # inputs after the workflow closed: a few are enough
    for index in range(len(plan_moves) + 1):
        now_ms = max(now_ms + 1, at_ms)
        transition = advance(record, body, now_ms, REGISTRY, bounds, run_id=RUN)
        where = _where(plan, transition.record or record, index)
        if record is not None:
            # The same input applied to the record as a restart would restore it.
            restored = CODEC.decode_workflow(CODEC.encode_workflow(record))
            again = advance(restored, body, now_ms, REGISTRY, bounds, run_id=RUN)
            assert again == transition, f"{where}\n  in memory: {transition}\n  restored: {again}"
        _check(transition, record, bounds, where)
        record = transition.record or record
        sent.extend(transition.tasks)
        assert record is not None
        late += record.status.terminal or not (pending_tasks(record) or record.wake_at_ms)
        if index == len(plan_moves) or late > 3:
            break
        kind, pick, value = plan_moves[index]
        body, at_ms = _input(kind, pick, value, record, sent, seen, now_ms + 1_000)
        seen.append(body)
    assert record is not None
    return record


def _stage(name: str, **fields: Any) -> dict[str, Any]:
    stage: dict[str, Any] = {
        "kind": "step",
        "name": name,
        "value": None,
        "attempts": 1,
        "fatal": [],
        "undo": None,
        "catch": True,
        "backoff": 0,
        "timeouts": {},
        "race": None,
        "seconds": 0,
    }
    return {**stage, **fields}


def test_the_strategy_reaches_durable_time() -> None:
    """Guard against moves that never reach a timeout, a heartbeat or a race: one plan
    that meets them all, each checked through the same loop."""
    plan = {
        "parallel": False,
        "bug": None,
        "bug_at": 0,
        "stages": [
            _stage(
                "p.a",
                attempts=3,
                backoff=1,
                undo="p.undo",
                timeouts={"start_to_close": 3, "heartbeat_timeout": 1},
            ),
            {"kind": "sleep", "seconds": 2},
            _stage("p.b", race="timeout", seconds=1, timeouts={"schedule_to_close": 60}),
            _stage("p.c", race="timeout", seconds=30),
            _stage("p.d", race="timer", seconds=30),
        ],
    }
    moves: list[tuple[str, int, Any]] = [
        ("heartbeat", 0, "before the start"),
        ("started", 0, None),
        ("wake", 0, None),  # the heartbeat timeout
        ("wake", 0, None),  # the retry after 1 s
        ("started", 0, None),
        ("heartbeat", 1, {"done": 1}),
        ("complete", 0, "A"),
        ("wake", 0, None),  # the sleep
        ("wake", 0, None),  # p.b loses its race against 1 s
        ("complete", 1, "C"),  # p.c wins against its timeout: the timer is cancelled
        ("complete", 1, "D"),  # p.d wins its race against a timer
    ]
    record = _play(plan, moves, Limits())
    lines = history_lines(record.events)
    assert record.status is WorkflowStatus.COMPLETED, lines
    for expected in (
        "beat 0#2",
        "fail 0#1 HeartbeatTimeout retry+1000",
        "fired 1",
        "fired 3",
        "cancel 5",
        "timer 7 +30000",
        "done 6#1",
    ):
        assert expected in lines, (expected, lines)
    assert "fired 7" not in lines and record.wake_at_ms is None


def _check(
    transition: Transition, before: WorkflowRecord | None, bounds: Limits, where: str
) -> None:
    assert (transition.record is None) == (transition.ignored is not None), where
    after = transition.record
    if after is None:
        assert transition.tasks == (), where
        return
    data = CODEC.encode_workflow(after)
    assert CODEC.decode_workflow(data) == after, f"{where}\n  the decoded record differs"
    assert after.wake_at_ms == next_wake(after), f"{where}\n  wake_at_ms {after.wake_at_ms}"
    if after.status is not WorkflowStatus.RUNNING:
        assert after.wake_at_ms is None, where
    assert after.revision == (1 if before is None else before.revision + 1), where
    assert len(after.events) <= bounds.max_events + bounds.event_grace, where
    if bounds.max_record_bytes is not None and after.input.data:
        assert encoded_size(after) <= bounds.max_record_bytes, where
    for task in transition.tasks:
        CODEC.decode_task(CODEC.encode_task(task))
        assert task.activity_id == activity_id(WID, task.seq, task.attempt, RUN), where
    if after.status is WorkflowStatus.RUNNING:
        expected = {t.activity_id for t in pending_tasks(after)}
        assert {t.activity_id for t in transition.tasks} <= expected, where
    if after.status.terminal:
        assert after.closed_at_ms == after.updated_at_ms, where
        assert pending_tasks(after) == (), where
