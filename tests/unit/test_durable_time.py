"""Durable time in the pure engine (issue 11): timers, backoff, timeouts, races.

Every test drives ``advance`` input by input with an explicit clock; ``WorkflowRun.wake``
plays the shell's timer index, feeding a ``WakeUp`` at the record's ``wake_at_ms``, and
checks after every transition that ``wake_at_ms == next_wake(record)``.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestrator import (
    COMPENSATION_RETRY,
    DEFAULT_RETRY,
    ActivityError,
    ConfigurationError,
    RetryPolicy,
    Saga,
    TimerHandle,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowTimeoutError,
)
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityResult,
    ActivityScheduled,
    ActivityStarted,
    ActivityStatus,
    AttemptHeartbeat,
    AttemptStarted,
    Failure,
    Payload,
    ResumeWorkflow,
    TimerStarted,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.replay import IGNORED_REASONS, Limits, advance, next_wake, park, pending_tasks
from orchestrator.replay.driver import replay
from orchestrator.replay.limits import reserved_events
from tests.unit.conftest import (
    CODEC,
    T0,
    WorkflowRun,
    assert_encodable,
    assert_history,
    assert_status,
    completed,
    history_lines,
)

NOW = RetryPolicy(max_attempts=3, initial_interval=0)  # retries at once, as before issue 11


def _registry(name: str, fn: Any) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow(name)(fn)
    return registry


def _run(fn: Any, **kwargs: Any) -> WorkflowRun:
    return WorkflowRun(_registry("t", fn), "t", **kwargs)


def _record(run: WorkflowRun) -> WorkflowRecord:
    assert run.record is not None, f"workflow {run.workflow_id} has no record"
    return run.record


def _ignored(run: WorkflowRun, reason: str, body: Any = None, *, at_ms: int | None = None) -> None:
    before = run.record
    transition = run.send(WakeUp(run.workflow_id) if body is None else body, at_ms=at_ms)
    assert transition.ignored == reason, (
        f"workflow {run.workflow_id}: expected {reason!r}, observed {transition.ignored!r} "
        f"with {transition.record}"
    )
    assert transition.record is None and transition.tasks == () and run.record is before


def _result(run: WorkflowRun, seq: int, attempt: int, **fields: Any) -> ActivityResult:
    status = ActivityStatus.FAILED if "failure" in fields else ActivityStatus.COMPLETED
    if status is ActivityStatus.COMPLETED:
        fields.setdefault("result", encode_json(fields.pop("value", None)))
    return ActivityResult(
        run.workflow_id,
        activity_id(run.workflow_id, seq, attempt, run.run_id),
        seq,
        attempt,
        status,
        run.now_ms,
        **fields,
    )


def _last(record: WorkflowRecord, kind: type[Any], seq: int) -> Any:
    found = [e for e in record.events if isinstance(e, kind) and e.seq == seq]
    assert found, f"no {kind.__name__} of step {seq}: {history_lines(record.events)}"
    return found[-1]


# --- sleep ---------------------------------------------------------------------------


async def _nap(ctx: WorkflowContext, seconds: Any) -> Any:
    await ctx.activity("p.before")
    await ctx.sleep(seconds)
    return await ctx.activity("p.after", ctx.now())


def test_sleep_records_a_timer_and_the_workflow_wakes_when_it_is_due() -> None:
    run = _run(_nap)
    run.start(60)
    run.complete(0)
    record = _record(run)
    assert_history(record, ["sched 0#1 p.before", "done 0#1", "timer 1 +60000"])
    timer = record.events[-1]
    assert isinstance(timer, TimerStarted) and timer.at_ms == run.now_ms
    assert record.wake_at_ms == timer.fire_at_ms == run.now_ms + 60_000
    assert run.tasks() == [] and pending_tasks(record) == ()

    _ignored(run, "nothing-due", at_ms=timer.fire_at_ms - 1)  # early: nothing written
    run.wake()
    record = _record(run)
    assert run.now_ms == timer.fire_at_ms
    assert_history(
        record,
        ["sched 0#1 p.before", "done 0#1", "timer 1 +60000", "fired 1", "sched 2#1 p.after"],
    )
    assert run.tasks() == ["wf-1/2/1 p.after"]
    assert run.last is not None
    # ctx.now() after the timer is the time it fired.
    assert decode_json(run.last.tasks[0].payload) == timer.fire_at_ms / 1000
    assert record.wake_at_ms is None, "nothing left to wake for"
    run.complete(2, "done")
    assert_status(run.record, WorkflowStatus.COMPLETED)


def test_a_recorded_timer_replays_without_new_steps_and_with_the_same_clock() -> None:
    run = _run(_nap)
    run.start(timedelta(seconds=5).total_seconds())
    run.complete(0)
    run.wake()
    record = _record(run)
    again = replay(_nap, "wf-1", "t", 5, record.events, record.started_at_ms)
    assert again.problem is None and not again.finished and again.new_steps == []
    # The restored record acts exactly as the one in memory.
    restored = CODEC.decode_workflow(CODEC.encode_workflow(record))
    assert restored == record
    result = _result(run, 2, 1, value="x")
    assert advance(restored, result, run.now_ms, run.registry) == advance(
        record, result, run.now_ms, run.registry
    )


def test_sleep_until_a_time_already_past_fires_at_the_next_wake_up() -> None:
    async def until(ctx: WorkflowContext, when: float) -> Any:
        await ctx.sleep_until(when)
        return ctx.now()

    run = _run(until)
    run.start(T0 / 1000 - 3600.5)
    record = _record(run)
    timer = record.events[0]
    assert isinstance(timer, TimerStarted) and timer.fire_at_ms == T0 - 3_600_500
    assert record.wake_at_ms == timer.fire_at_ms < run.now_ms
    run.wake()  # at once: the shell wakes whatever is overdue
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _record(run).result == encode_json(run.now_ms / 1000)


def test_sleep_until_takes_an_aware_datetime_and_refuses_a_naive_one() -> None:
    async def until(ctx: WorkflowContext, aware: bool) -> Any:
        moment = datetime(2030, 1, 1, tzinfo=UTC if aware else None)
        await ctx.sleep_until(moment)

    run = _run(until)
    run.start(True)
    assert _record(run).wake_at_ms == int(datetime(2030, 1, 1, tzinfo=UTC).timestamp() * 1000)
    naive = _run(until)
    naive.start(False)
    assert_status(naive.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    failure = _record(naive).failure
    assert failure is not None and "timezone-aware" in failure.message


@pytest.mark.parametrize(
    ("seconds", "fragment"),
    [
        (-1, "between 0 and"),
        (float("nan"), "finite"),
        (math.inf, "finite"),
        (True, "got bool"),
        ("5", "got str"),
        (None, "got NoneType"),
        (timedelta(seconds=-1), "between 0 and"),
        (10**400, "finite"),
        (200 * 365 * 86400, "between 0 and"),
    ],
    ids=["negative", "nan", "inf", "bool", "str", "none", "negative-delta", "huge-int", "200y"],
)
def test_an_invalid_sleep_parks_the_workflow(seconds: Any, fragment: str) -> None:
    caught: list[str] = []

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.sleep(seconds)
        except ConfigurationError as exc:
            caught.append(str(exc))
            return "hidden"  # catching it hides nothing

    run = _run(flow)
    run.start()
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    failure = _record(run).failure
    assert failure is not None and "ctx.sleep(seconds)" in failure.message
    assert fragment in failure.message and caught and fragment in caught[0]
    assert _record(run).wake_at_ms is None, "a stuck workflow does not wake"


def test_sleep_zero_fires_at_the_next_wake_up() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(0)
        return "awake"

    run = _run(flow)
    run.start()
    assert _record(run).wake_at_ms == run.now_ms
    run.wake()
    assert_status(run.record, WorkflowStatus.COMPLETED)


def test_timers_and_activities_share_the_sequence_and_a_changed_kind_is_nondeterminism() -> None:
    async def first_version(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(10)
        return await ctx.activity("p.work")

    async def changed(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.work")

    run = _run(first_version)
    run.start()
    run.wake()
    assert run.tasks() == ["wf-1/1/1 p.work"]
    run.registry = _registry("t", changed)
    run.complete(1)
    assert_status(run.record, WorkflowStatus.STUCK, "NonDeterminismError")
    failure = _record(run).failure
    assert failure is not None
    assert failure.message == "step 0 is activity 'p.work' in the code but a timer in history"


def test_a_timer_time_computed_differently_on_replay_is_not_nondeterminism() -> None:
    """sleep_until may take a computed time: only the kind of the command is compared."""
    calls: list[int] = []

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        calls.append(1)
        await ctx.sleep_until(ctx.now() + 60 + len(calls))  # differs on every replay
        return await ctx.activity("p.work")

    run = _run(flow)
    run.start()
    fire_at = _record(run).wake_at_ms
    run.wake()
    assert run.tasks() == ["wf-1/1/1 p.work"]
    run.complete(1)
    assert_status(run.record, WorkflowStatus.COMPLETED)
    timer = _record(run).events[0]
    assert isinstance(timer, TimerStarted) and timer.fire_at_ms == fire_at


# --- retry policies and backoff --------------------------------------------------------


def test_the_retry_policy_defaults_and_its_intervals() -> None:
    assert RetryPolicy(3, (), 1.0, 2.0, 100.0) == DEFAULT_RETRY
    assert [DEFAULT_RETRY.interval(n) for n in (1, 2, 3, 8, 9, 100, 2**31 - 1)] == [
        1.0,
        2.0,
        4.0,
        100.0,  # 128 capped
        100.0,
        100.0,
        100.0,
    ]
    assert RetryPolicy(initial_interval=timedelta(minutes=1)).maximum_interval == 6000.0
    assert RetryPolicy(initial_interval=0).interval(5) == 0.0
    assert COMPENSATION_RETRY.max_attempts == 30
    assert [COMPENSATION_RETRY.interval(n) for n in (1, 10, 11, 29)] == [1.0, 512.0, 600.0, 600.0]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"initial_interval": -0.5}, "initial_interval must be between 0 and"),
        ({"initial_interval": float("nan")}, "initial_interval must be a finite number"),
        ({"initial_interval": "1s"}, "initial_interval must be seconds"),
        ({"initial_interval": True}, "initial_interval must be seconds"),
        ({"backoff_coefficient": 0.5}, "backoff_coefficient must be at least 1.0"),
        ({"backoff_coefficient": math.inf}, "backoff_coefficient must be a finite number"),
        ({"backoff_coefficient": None}, "backoff_coefficient must be an int or float"),
        ({"maximum_interval": -1}, "maximum_interval must be between 0 and"),
        ({"initial_interval": 10, "maximum_interval": 5}, "at least initial_interval"),
        ({"maximum_interval": timedelta(days=-1)}, "maximum_interval must be between 0 and"),
    ],
)
def test_every_retry_policy_argument_is_validated(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        RetryPolicy(**kwargs)


def test_backoff_grows_to_the_maximum_and_is_recorded() -> None:
    policy = RetryPolicy(
        max_attempts=5, initial_interval=1, backoff_coefficient=2, maximum_interval=3
    )

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.flaky", retry=policy)

    run = _run(flow)
    run.start()
    for _ in range(4):
        run.fail_and_retry(0)
    record = _record(run)
    assert_history(
        record,
        [
            "sched 0#1 p.flaky",
            "fail 0#1 Busy retry+1000",
            "sched 0#2 p.flaky",
            "fail 0#2 Busy retry+2000",
            "sched 0#3 p.flaky",
            "fail 0#3 Busy retry+3000",
            "sched 0#4 p.flaky",
            "fail 0#4 Busy retry+3000",
            "sched 0#5 p.flaky",
        ],
    )
    failures = [e for e in record.events if isinstance(e, ActivityFailed)]
    retries = [e for e in record.events if isinstance(e, ActivityScheduled) and e.attempt > 1]
    for failure, retry in zip(failures, retries, strict=True):
        assert failure.retry_at_ms == retry.at_ms
        assert retry.backoff_ms == retry.at_ms - failure.at_ms
    first = record.events[0]
    assert isinstance(first, ActivityScheduled)
    assert (first.initial_interval_ms, first.backoff_coefficient, first.maximum_interval_ms) == (
        1000,
        2.0,
        3000,
    )
    assert [t.attempt for t in run.sent] == [1, 2, 3, 4, 5]
    run.fail(0, "Busy", retryable=True)
    assert_status(run.record, WorkflowStatus.FAILED, "ActivityError")


def test_a_waiting_retry_runs_no_code_and_sends_nothing_until_it_is_due() -> None:
    runs: list[int] = []

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        runs.append(1)
        return await ctx.activity("p.flaky")

    run = _run(flow)
    run.start()
    before = len(runs)
    run.fail(0, "Busy", retryable=True)
    assert len(runs) == before, "a failure that is not final runs no code"
    assert run.tasks() == [] and pending_tasks(_record(run)) == ()
    _ignored(run, "nothing-due", at_ms=run.now_ms + 999)
    run.wake()
    assert len(runs) == before and run.tasks() == ["wf-1/0/2 p.flaky"]
    task = run.sent[-1]
    assert task.scheduled_at_ms == run.now_ms


def test_a_participants_retry_after_replaces_the_policy_interval() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("api.call")

    run = _run(flow)
    run.start()
    limited = Failure("RateLimited", "429", retryable=True, retry_after_ms=30_000)
    run.send(_result(run, 0, 1, failure=limited))
    failure = _last(_record(run), ActivityFailed, 0)
    assert failure.retry_at_ms == run.now_ms + 30_000
    assert failure.failure.retry_after_ms == 30_000
    run.wake()
    assert run.tasks() == ["wf-1/0/2 api.call"]
    assert _last(_record(run), ActivityScheduled, 0).backoff_ms == 30_000


@pytest.mark.parametrize("value", [-5, True, 10**30], ids=["negative", "bool", "huge"])
def test_a_participants_odd_retry_after_is_made_safe(value: Any) -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("api.call")

    run = _run(flow)
    run.start()
    odd = Failure("RateLimited", "429", retryable=True, retry_after_ms=value)
    run.send(_result(run, 0, 1, failure=odd))
    failure = _last(_record(run), ActivityFailed, 0)
    if value == 10**30:
        assert failure.failure.retry_after_ms == 100 * 365 * 86400 * 1000
    else:
        assert failure.failure.retry_after_ms is None
        assert failure.retry_at_ms == run.now_ms + 1000, "the policy's interval"


def test_schedule_to_close_stops_retries_that_could_not_begin_in_time() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity(
            "p.flaky",
            retry=RetryPolicy(max_attempts=10, initial_interval=4),
            schedule_to_close=10,
        )

    run = _run(flow)
    run.start()
    started = run.now_ms
    assert run.sent[0].deadline_ms == started + 10_000
    run.fail_and_retry(0)  # +1 s, retry 4 s later: before the deadline
    assert run.sent[-1].deadline_ms == started + 10_000, "every attempt carries the deadline"
    run.fail(0, "Busy", retryable=True)  # +6 s, the next wait of 8 s ends past it
    assert_status(run.record, WorkflowStatus.FAILED, "ActivityError")
    assert_history(
        run.record,
        ["sched 0#1 p.flaky", "fail 0#1 Busy retry+4000", "sched 0#2 p.flaky", "fail 0#2 Busy"],
    )


def test_schedule_to_close_fails_a_running_step_for_good() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("p.slow", schedule_to_close=timedelta(minutes=2))
        except ActivityError as err:
            return [err.error_type, err.attempts]

    run = _run(flow)
    run.start()
    assert _record(run).wake_at_ms == run.now_ms + 120_000
    run.wake()
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _record(run).result == encode_json(["ScheduleToCloseTimeout", 1])
    failure = _last(_record(run), ActivityFailed, 0).failure
    assert not failure.retryable
    assert "'p.slow'" in failure.message and "schedule-to-close timeout of 120 s" in failure.message


def test_compensations_default_to_a_patient_policy() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        async with Saga(ctx) as saga:
            await ctx.activity("p.book")
            saga.add_compensation("p.unbook")
            raise ValueError("changed my mind")

    run = _run(flow)
    run.start()
    run.complete(0)
    undo = _last(_record(run), ActivityScheduled, 1)
    assert undo.compensation
    assert (undo.max_attempts, undo.initial_interval_ms, undo.maximum_interval_ms) == (
        30,
        1000,
        600_000,
    )
    for attempt in range(1, 12):
        run.fail(1, "Down", retryable=True)
        assert _last(_record(run), ActivityFailed, 1).retry_at_ms == run.now_ms + 1000 * min(
            2 ** (attempt - 1), 600
        )
        run.wake()
    assert run.tasks() == ["wf-1/1/12 p.unbook comp"]


def test_a_record_written_before_durable_time_still_retries_at_once() -> None:
    """Protocol v2 steps carry no backoff (initial interval 0): the retry is immediate."""

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.flaky")

    run = _run(flow)
    run.start()
    record = _record(run)
    v2 = dataclasses.replace(
        record,
        events=tuple(
            dataclasses.replace(e, initial_interval_ms=0, maximum_interval_ms=0)
            for e in record.events
            if isinstance(e, ActivityScheduled)
        ),
    )
    run.record = v2
    run.fail(0, "Busy", retryable=True)
    assert run.tasks() == ["wf-1/0/2 p.flaky"]
    assert_history(run.record, ["sched 0#1 p.flaky", "fail 0#1 Busy", "sched 0#2 p.flaky"])
    assert _record(run).wake_at_ms is None


# --- timeouts --------------------------------------------------------------------------


def test_start_to_close_counts_from_the_start_report_and_the_retry_gets_a_new_id() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.work", retry=NOW, start_to_close=30)

    run = _run(flow)
    run.start()
    task = run.sent[0]
    assert (task.report_start, task.start_to_close_ms, task.heartbeat_timeout_ms) == (
        True,
        30_000,
        None,
    )
    assert _record(run).wake_at_ms is None, "no timeout runs before the start report"
    run.started(0)
    began = run.now_ms
    assert_history(run.record, ["sched 0#1 p.work", "started 0#1"])
    assert _record(run).wake_at_ms == began + 30_000
    run.wake()
    assert_history(
        run.record,
        ["sched 0#1 p.work", "started 0#1", "fail 0#1 StartToCloseTimeout", "sched 0#2 p.work"],
    )
    assert run.tasks() == ["wf-1/0/2 p.work"]
    failure = _last(_record(run), ActivityFailed, 0).failure
    assert failure.retryable and "start-to-close timeout of 30 s" in failure.message
    # The timed-out attempt's result arrives after all: counted as late, changes nothing.
    _ignored(run, "late-result", completed("wf-1", 0, 1, "late", run.now_ms))
    run.complete(0, "on time")
    assert_status(run.record, WorkflowStatus.COMPLETED)


def test_a_result_for_a_timed_out_attempt_waiting_to_retry_is_late() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.work", start_to_close=5)

    run = _run(flow)
    run.start()
    run.started(0)
    run.wake()
    assert_history(
        run.record, ["sched 0#1 p.work", "started 0#1", "fail 0#1 StartToCloseTimeout retry+1000"]
    )
    _ignored(run, "late-result", completed("wf-1", 0, 1, "late", run.now_ms))
    # A result after the participant's own failure stays a duplicate.
    own = _run(flow)
    own.start()
    own.fail(0, "Busy", retryable=True)
    _ignored(own, "duplicate-result", completed("wf-1", 0, 1, "again", own.now_ms))
    assert {"late-result", "duplicate-result", "nothing-due"} <= set(IGNORED_REASONS)


def test_a_heartbeat_timeout_runs_from_the_last_heartbeat_and_details_reach_the_retry() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.long", retry=NOW, heartbeat_timeout=10)

    run = _run(flow)
    run.start()
    assert run.sent[0].report_start and run.sent[0].heartbeat_timeout_ms == 10_000
    # A heartbeat before any start report (lost, best effort) starts the attempt's clock:
    # without it the timeout would never run.
    run.heartbeat(0, {"done": 1})
    first_due = _record(run).wake_at_ms
    assert first_due == run.now_ms + 10_000
    assert_history(_record(run), ["sched 0#1 p.long", "started 0#1", "beat 0#1"])
    assert run.started(0).ignored == "already-started"  # the late start report: nothing
    assert _record(run).wake_at_ms == first_due
    run.heartbeat(0, {"done": 3})
    run.heartbeat(0, {"done": 5})
    record = _record(run)
    assert record.wake_at_ms == run.now_ms + 10_000
    assert_history(record, ["sched 0#1 p.long", "started 0#1", "beat 0#1"])  # one kept
    run.wake()
    assert run.tasks() == ["wf-1/0/2 p.long"]
    retry = run.sent[-1]
    assert retry.heartbeat_details == encode_json({"done": 5}), "the next attempt resumes"
    failure = _last(_record(run), ActivityFailed, 0).failure
    assert failure.error_type == "HeartbeatTimeout" and "10 s" in failure.message
    # The retry's own heartbeat replaces the step's last one.
    run.started(0)
    run.heartbeat(0, {"done": 6})
    beats = [e for e in _record(run).events if isinstance(e, AttemptHeartbeat)]
    assert [(b.attempt, b.details) for b in beats] == [(2, encode_json({"done": 6}))]


def test_start_reports_are_clamped_checked_and_never_run_code() -> None:
    runs: list[int] = []

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        runs.append(1)
        return await ctx.activity("p.work", start_to_close=60)

    run = _run(flow)
    run.start()
    sent_at = run.now_ms
    before = len(runs)
    run.started(0, at_ms=sent_at - 50_000)  # a participant clock behind ours
    assert len(runs) == before
    started = _last(_record(run), AttemptStarted, 0)
    assert started.at_ms == sent_at
    _ignored(run, "already-started", _started(run, 0, 1, run.now_ms))
    _ignored(run, "stale-attempt", _started(run, 0, 2, run.now_ms))
    _ignored(run, "stale-attempt", _started(run, 5, 1, run.now_ms))
    wrong = dataclasses.replace(_started(run, 0, 1, run.now_ms), activity_id="wf-2/0/1")
    _ignored(run, "activity-id-mismatch", wrong)

    ahead = _run(flow)
    ahead.start()
    ahead.started(0, at_ms=ahead.now_ms + 10**9)  # a participant clock far ahead
    assert _last(_record(ahead), AttemptStarted, 0).at_ms == ahead.now_ms


def _started(run: WorkflowRun, seq: int, attempt: int, at_ms: int) -> ActivityStarted:
    return ActivityStarted(
        run.workflow_id, activity_id(run.workflow_id, seq, attempt), seq, attempt, at_ms
    )


def test_reports_for_finished_attempts_and_closed_workflows_are_ignored() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.one", heartbeat_timeout=5)
        return await ctx.activity("p.two", heartbeat_timeout=5)

    run = _run(flow)
    run.start()
    run.complete(0)
    _ignored(run, "stale-attempt", _started(run, 0, 1, run.now_ms))
    run.complete(1)
    assert_status(run.record, WorkflowStatus.COMPLETED)
    _ignored(run, "workflow-closed", _started(run, 1, 1, run.now_ms))
    _ignored(run, "workflow-closed")
    unknown = advance(None, WakeUp("ghost"), T0, run.registry)
    assert unknown.ignored == "unknown-workflow"


def test_one_wake_up_fires_everything_due_in_due_time_order() -> None:
    async def race(ctx: WorkflowContext, _: Any) -> Any:
        step = ctx.activity("p.a", retry=RetryPolicy(max_attempts=1), start_to_close=5)
        timer = ctx.sleep(10)
        winner = await ctx.first(step, timer)
        return winner.seq

    run = _run(race)
    run.start()
    run.started(0)
    run.wake(at_ms=run.now_ms + 60_000)  # both overdue: the timeout was due first
    record = _record(run)
    assert_history(
        record,
        [
            "sched 0#1 p.a",
            "timer 1 +10000",
            "started 0#1",
            "fail 0#1 StartToCloseTimeout",
            "fired 1",
        ],
    )
    assert_status(record, WorkflowStatus.COMPLETED)
    assert record.result == encode_json(0)
    assert record.revision == 3, "one transition for everything due"


# --- with_timeout, first, gather -------------------------------------------------------


def test_an_activity_that_wins_its_timeout_cancels_the_timer() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        value = await ctx.activity("p.slow").with_timeout(30)
        await ctx.sleep(100)
        return value

    run = _run(flow)
    run.start()
    started = run.now_ms
    assert run.tasks() == ["wf-1/0/1 p.slow"]
    assert _record(run).wake_at_ms == started + 30_000
    run.complete(0, "fast")
    record = _record(run)
    assert_history(
        record, ["sched 0#1 p.slow", "timer 1 +30000", "done 0#1", "timer 2 +100000", "cancel 1"]
    )
    assert record.wake_at_ms == run.now_ms + 100_000, "the cancelled timer no longer wakes it"
    _ignored(run, "nothing-due", at_ms=started + 30_000)
    run.wake()
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _record(run).result == encode_json("fast")


def test_a_timeout_that_fires_first_raises_and_the_saga_compensates() -> None:
    async def booking(ctx: WorkflowContext, _: Any) -> Any:
        async with Saga(ctx) as saga:
            await ctx.activity("hotel.book")
            saga.add_compensation("hotel.cancel")
            await ctx.activity("pay.charge").with_timeout(timedelta(minutes=5))

    run = _run(booking)
    run.start()
    run.complete(0)
    assert run.tasks() == ["wf-1/1/1 pay.charge"]
    run.wake()
    assert run.tasks() == ["wf-1/3/1 hotel.cancel comp"]
    run.complete(3)
    record = _record(run)
    assert_status(record, WorkflowStatus.COMPENSATED, "WorkflowTimeoutError")
    assert record.failure is not None
    assert record.failure.message == "activity 'pay.charge' (step 1) did not finish within 300 s"
    assert_history(
        record,
        [
            "sched 0#1 hotel.book",
            "done 0#1",
            "sched 1#1 pay.charge",
            "timer 2 +300000",
            "fired 2",
            "sched 3#1 hotel.cancel comp",
            "done 3#1",
        ],
    )
    assert not issubclass(WorkflowTimeoutError, ActivityError)
    assert issubclass(WorkflowTimeoutError, Exception)


def test_a_timed_out_activity_is_not_cancelled_and_can_still_be_awaited() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        charge = ctx.activity("pay.charge")
        try:
            return await charge.with_timeout(5)
        except WorkflowTimeoutError:
            return ["late", await charge]

    run = _run(flow)
    run.start()
    run.wake()
    assert pending_tasks(_record(run)) == tuple(run.sent), "the activity is still out"
    run.complete(0, "charged")
    assert _record(run).result == encode_json(["late", "charged"])


def test_with_timeout_works_on_gather_first_and_timers() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        both = await ctx.gather(ctx.activity("p.a"), ctx.activity("p.b")).with_timeout(60)
        winner = await ctx.first(ctx.activity("p.c"), ctx.sleep(500)).with_timeout(60)
        nap = await ctx.sleep(1).with_timeout(60)
        return [both, winner.seq, nap]

    run = _run(flow)
    run.start()
    run.complete(0, "A")
    run.complete(1, "B")
    assert_history(
        run.record,
        [
            "sched 0#1 p.a",
            "sched 1#1 p.b",
            "timer 2 +60000",
            "done 0#1",
            "done 1#1",
            "sched 3#1 p.c",
            "timer 4 +500000",
            "timer 5 +60000",
            "cancel 2",
        ],
    )
    run.complete(3, "C")
    run.wake()  # the 1 s nap
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _record(run).result == encode_json([["A", "B"], 3, None])
    assert _record(run).wake_at_ms is None


def test_first_returns_the_first_settled_in_history_order_and_replays_the_same() -> None:
    async def race(ctx: WorkflowContext, _: Any) -> Any:
        left, right = ctx.activity("p.left"), ctx.activity("p.right")
        winner = await ctx.first(left, right, ctx.sleep(3600))
        try:
            return [winner.seq, await winner]
        except ActivityError as err:
            return [winner.seq, err.error_type]

    run = _run(race)
    run.start()
    run.fail(1, "Nope")  # a failure settles too
    run.complete(0, "L")  # settled later: not the winner
    record = _record(run)
    assert record.result == encode_json([1, "Nope"])
    again = replay(race, "wf-1", "t", None, record.events, record.started_at_ms)
    assert again.finished and again.value == [1, "Nope"]


def test_gather_accepts_activities_and_timers_mixed() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.gather(ctx.activity("p.a"), ctx.sleep(5), ctx.activity("p.b"))

    run = _run(flow)
    run.start()
    run.complete(0, "A")
    run.complete(2, "B")
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.wake()
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _record(run).result == encode_json(["A", None, "B"])


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        ("first-empty", "ctx.first() needs at least one handle"),
        ("first-other", "ctx.first takes handles"),
        ("timeout-negative", ".with_timeout(seconds) must be between 0 and"),
        ("start-to-close-zero", "start_to_close=...) must be at least 0.001 seconds"),
        ("heartbeat-str", "heartbeat_timeout=...) must be seconds"),
    ],
)
def test_misused_durable_time_calls_park_the_workflow(call: str, fragment: str) -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        if call == "first-empty":
            await ctx.first()
        elif call == "first-other":
            await ctx.first(ctx.gather())  # type: ignore[type-var]
        elif call == "timeout-negative":
            await ctx.sleep(1).with_timeout(-1)
        elif call == "start-to-close-zero":
            await ctx.activity("p.a", start_to_close=0)
        else:
            await ctx.activity("p.a", heartbeat_timeout="5")  # type: ignore[arg-type]

    run = _run(flow)
    run.start()
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    failure = _record(run).failure
    assert failure is not None and fragment in failure.message, failure


# --- wake times on every record --------------------------------------------------------


def test_closed_stuck_and_parked_records_do_not_wake_and_a_resume_recomputes() -> None:
    async def fine(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(60)
        return await ctx.activity("p.after")

    async def broken(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(60)
        return await ctx.activity("no-dot")

    run = _run(fine)
    run.start()
    fire_at = _record(run).wake_at_ms
    assert fire_at is not None
    parked = park(
        _record(run), WakeUp("wf-1"), Failure("EngineError", "boom"), run.now_ms, run_id=""
    )
    assert parked.status is WorkflowStatus.STUCK and parked.wake_at_ms is None
    assert next_wake(parked) is None
    resumed = advance(parked, _resume(), run.now_ms + 5, run.registry)
    assert resumed.record is not None and resumed.record.wake_at_ms == fire_at

    run.registry = _registry("t", broken)
    run.wake()  # the code that runs now is broken: STUCK, nothing more to wake for
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    assert _record(run).wake_at_ms is None
    _ignored(run, "nothing-due", at_ms=run.now_ms + 10**6)


def _resume() -> ResumeWorkflow:
    return ResumeWorkflow("wf-1", T0)


def test_a_closed_workflow_leaves_its_timers_unfired() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        ctx.sleep(3600)  # never awaited
        await ctx.activity("p.a")
        return "done"

    run = _run(flow)
    run.start()
    assert _record(run).wake_at_ms == run.now_ms + 3_600_000
    run.complete(1)
    record = _record(run)
    assert_status(record, WorkflowStatus.COMPLETED)
    assert record.wake_at_ms is None and next_wake(record) is None


# --- limits ----------------------------------------------------------------------------


def test_a_timer_costs_two_events_and_one_that_does_not_fit_closes_the_workflow() -> None:
    async def forever(ctx: WorkflowContext, _: Any) -> Any:
        while True:
            await ctx.sleep(1)

    limits = Limits(max_events=4)
    run = _run(forever, limits=limits)
    run.start()
    assert reserved_events(_record(run).events) == 2
    while not run.status.terminal:
        run.wake()
    record = _record(run)
    assert_status(record, WorkflowStatus.FAILED, "HistoryLimitExceeded")
    assert len(record.events) <= limits.max_events + limits.event_grace
    assert reserved_events(record.events) <= limits.max_events + limits.event_grace


def test_a_cancelled_timer_takes_the_place_of_its_firing_in_the_budget() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.a").with_timeout(5)

    run = _run(flow)
    run.start()
    before = reserved_events(_record(run).events)
    assert before == 4  # the step and its outcome, the timer and its firing
    run.complete(0)
    assert len(_record(run).events) == 4


def test_timeouts_reserve_the_start_report_and_the_heartbeat() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.a", start_to_close=5, heartbeat_timeout=1)

    run = _run(flow)
    run.start()
    assert reserved_events(_record(run).events) == 4  # scheduled, outcome, started, beat
    run.started(0)
    run.heartbeat(0, "x")
    assert reserved_events(_record(run).events) == 4


def _sizes(record: WorkflowRecord) -> int:
    """Payload bytes of steps, results and heartbeat details."""
    size = 0
    for event in record.events:
        if isinstance(event, ActivityScheduled):
            size += len(event.payload.data)
        elif isinstance(event, ActivityCompleted):
            size += len(event.result.data)
        elif isinstance(event, AttemptHeartbeat) and event.details is not None:
            size += len(event.details.data)
    return size


def test_heartbeat_details_too_large_for_the_record_are_dropped_not_the_heartbeat() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.long", heartbeat_timeout=10)

    run = _run(flow, limits=Limits(max_record_bytes=1000, measure=_sizes))
    run.start()
    run.started(0)
    run.heartbeat(0, "d" * 900)
    beat = _last(_record(run), AttemptHeartbeat, 0)
    assert beat.details is None and beat.at_ms == run.now_ms
    assert _record(run).wake_at_ms == run.now_ms + 10_000
    run.heartbeat(0, "small")
    assert _last(_record(run), AttemptHeartbeat, 0).details == encode_json("small")


def test_a_retry_that_no_longer_fits_when_due_makes_the_failure_final_at_that_time() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.gather(ctx.activity("p.big", "m" * 298), ctx.activity("p.other"))
        except ActivityError as err:
            return [err.error_type, err.attempts, ctx.now()]
        return "ok"

    run = _run(flow, limits=Limits(max_record_bytes=1000, measure=_sizes))
    run.start()
    run.fail(0, "Busy", retryable=True)  # with its retry: 300 + 300 + 6 bytes, fits 775
    assert _last(_record(run), ActivityFailed, 0).retry_at_ms is not None
    run.complete(1, "r" * 198)  # the other step's result fills the record meanwhile
    run.wake()
    record = _record(run)
    assert_status(record, WorkflowStatus.COMPLETED)
    assert record.result == encode_json(["Busy", 1, run.now_ms / 1000])
    assert_history(record, ["sched 0#1 p.big", "sched 1#1 p.other", "done 1#1", "fail 0#1 Busy"])
    assert [t.attempt for t in run.sent] == [1, 1]


def test_every_record_of_a_durable_workflow_encodes() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.a", start_to_close=5, heartbeat_timeout=2, schedule_to_close=60)
        await ctx.sleep(1)
        return "ok"

    run = _run(flow)
    run.start()
    run.started(0)
    run.heartbeat(0, {"progress": "é\ud800"})
    run.wake()  # the heartbeat timeout; the retry waits 1 s
    run.wake()  # the retry
    assert run.tasks() == ["wf-1/0/2 p.a"]
    assert isinstance(run.sent[-1].heartbeat_details, Payload)
    run.started(0)
    run.complete(0)
    run.wake()  # the sleep
    assert_status(assert_encodable(run.record), WorkflowStatus.COMPLETED)
    assert_history(
        run.record,
        [
            "sched 0#1 p.a",
            "started 0#1",
            "beat 0#1",
            "fail 0#1 HeartbeatTimeout retry+1000",
            "sched 0#2 p.a",
            "started 0#2",
            "done 0#2",
            "timer 1 +1000",
            "fired 1",
        ],
    )


def test_timer_handles_are_exported_and_awaitable_only_through_ctx() -> None:
    seen: list[Any] = []

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        handle = ctx.sleep(1)
        seen.append(handle)
        await handle

    run = _run(flow)
    run.start()
    assert isinstance(seen[0], TimerHandle) and seen[0].seq == 0
    assert seen[0].fire_at_ms == run.now_ms + 1000 and not seen[0].done
    run.wake()
    assert seen[-1].done and seen[-1] is not seen[0], "each replay makes its own handles"
    assert_status(run.record, WorkflowStatus.COMPLETED)


def test_heartbeats_of_steps_without_a_heartbeat_timeout_leave_the_grace_to_compensations() -> None:
    """Such heartbeats were never reserved: once the normal budget is used, they are
    dropped (``over-limit``) rather than taking the room the compensations need."""
    steps = 10

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        handles = [ctx.activity(f"p.a{i}") for i in range(steps)]
        try:
            await ctx.gather(*handles)
            raise RuntimeError("undo everything")
        except RuntimeError:
            undo = [ctx.activity(f"p.undo{i}", compensation=True) for i in range(steps)]
            await ctx.gather(*undo)
            raise

    run = _run(flow, limits=Limits(max_events=20))
    run.start()
    ignored = [run.heartbeat(i, {"page": i}).ignored for i in range(steps)]
    assert ignored == ["over-limit"] * steps, "the normal budget is full of reserved outcomes"
    for i in range(steps):
        run.complete(i, i)
    record = _record(run)
    undo = [e for e in record.events if isinstance(e, ActivityScheduled) and e.compensation]
    assert len(undo) == steps, "every compensation was scheduled"


def test_a_heartbeat_timeout_under_a_second_parks_the_workflow() -> None:
    """Participants heartbeat at most every third of the timeout: below a second every
    attempt would time out."""

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.long", heartbeat_timeout=0.5)

    run = _run(flow)
    run.start()
    record = _record(run)
    assert record.status is WorkflowStatus.STUCK and record.failure is not None
    assert "heartbeat_timeout" in record.failure.message
    assert "at least 1 second" in record.failure.message


def test_a_resume_restarts_the_heartbeat_clock_of_a_running_attempt() -> None:
    """Heartbeats are not kept while a workflow is parked: counting from the last one kept
    would time the live attempt out at once and start a second one beside it."""

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.long", retry=NOW, heartbeat_timeout=10)

    run = _run(flow)
    run.start()
    run.started(0)
    run.heartbeat(0, {"done": 2})
    record = _record(run)
    parked = park(record, WakeUp("wf-1"), Failure("EngineError", "boom"), run.now_ms, run_id="")
    later = run.now_ms + 60_000  # parked for a minute, long past the heartbeat deadline
    resumed = advance(parked, ResumeWorkflow("wf-1", later), later, run.registry)
    assert resumed.record is not None and resumed.record.status is WorkflowStatus.RUNNING
    assert resumed.record.wake_at_ms == later + 10_000, "counts from the resume"
    beats = [e for e in resumed.record.events if isinstance(e, AttemptHeartbeat)]
    assert [(b.at_ms, b.details) for b in beats] == [(later, encode_json({"done": 2}))]
    assert resumed.tasks == (), "the running attempt is not sent again"
    assert next_wake(resumed.record) == resumed.record.wake_at_ms
