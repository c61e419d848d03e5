"""One attempt without a database or broker: retry-after hints, deadlines, cancellation of
async handlers, start reports and ``ctx.heartbeat``."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from typing import Any, cast

import psycopg
import pytest

from orchestrator.protocol import (
    ActivityTask,
    Failure,
    Payload,
    activity_id,
    decode_json,
    encode_json,
)
from orchestrator.protocol.payloads import PayloadEncodingError
from participants import ActivityContext, ActivityFailure, Participant
from participants.participant import (
    SCHEDULE_TO_CLOSE_TIMEOUT,
    START_TO_CLOSE_TIMEOUT,
    Deadline,
    Outcome,
    handler_failure,
    retry_after_ms,
    wall_clock_ms,
)

WAIT_S = 10.0
NO_DB = cast(psycopg.Connection[Any], object())


class RateLimited(ActivityFailure):
    retryable = True


class SlowDown(ActivityFailure):
    retryable = True
    retry_after = dt.timedelta(minutes=1)


# --- retry-after ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ms"),
    [(0, 0), (1, 1_000), (1.5, 1_500), (0.0004, 1), (dt.timedelta(seconds=2.25), 2_250)],
)
def test_retry_after_is_whole_milliseconds_rounded_up(value: float | dt.timedelta, ms: int) -> None:
    assert retry_after_ms(value) == ms
    assert RateLimited("slow down", retry_after=value).retry_after_ms == ms


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (dt.timedelta(seconds=-1), ValueError),
        (True, TypeError),
        ("5", TypeError),
    ],
)
def test_an_invalid_retry_after_fails_at_the_raise(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="retry_after"):
        RateLimited("x", retry_after=value)


def test_retry_after_reaches_the_failure_of_a_retryable_activity_failure() -> None:
    assert handler_failure(RateLimited("429", retry_after=30)) == Failure(
        "RateLimited", "429", True, retry_after_ms=30_000
    )
    assert handler_failure(SlowDown("busy")).retry_after_ms == 60_000, "the class default"
    assert handler_failure(SlowDown("busy", retry_after=2)).retry_after_ms == 2_000
    # A final failure is not retried, so a hint would mean nothing.
    assert handler_failure(RateLimited("no", retryable=False, retry_after=5)).retry_after_ms is None
    assert handler_failure(RuntimeError("x")).retry_after_ms is None


class _SkipsInit(ActivityFailure):
    retryable = True
    retry_after = 3

    def __init__(self) -> None:  # never calls ActivityFailure.__init__
        Exception.__init__(self, "skipped")


def test_a_subclass_that_skips_init_still_has_its_class_retry_after() -> None:
    assert handler_failure(_SkipsInit()).retry_after_ms == 3_000


def test_a_handler_raising_retry_after_is_answered_with_it() -> None:
    svc = Participant("svc")

    @svc.activity("call")
    def call(value: Any, *, ctx: ActivityContext) -> Any:
        raise RateLimited("upstream says 429", retry_after=value["wait"])

    outcome = svc.run_task(_task("call", {"wait": 12.5}), NO_DB, now_ms=lambda: 5)
    assert outcome == Outcome.failed(
        Failure("RateLimited", "upstream says 429", True, retry_after_ms=12_500), 5
    )


# --- deadlines -----------------------------------------------------------------------------


def _task(
    activity: str,
    value: Any = None,
    *,
    deadline_ms: int | None = None,
    start_to_close_ms: int | None = None,
    heartbeat_timeout_ms: int | None = None,
    heartbeat_details: Payload | None = None,
    report_start: bool = False,
) -> ActivityTask:
    return ActivityTask(
        workflow_id="wf-1",
        workflow_type="order.process",
        activity_id=activity_id("wf-1", 1, 1),
        seq=1,
        attempt=1,
        participant="svc",
        activity=activity,
        payload=encode_json(value),
        scheduled_at_ms=0,
        deadline_ms=deadline_ms,
        start_to_close_ms=start_to_close_ms,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
        heartbeat_details=heartbeat_details,
        report_start=report_start,
    )


class Reporter:
    def __init__(self) -> None:
        self.starts: list[tuple[int, Deadline | None]] = []
        self.beats: list[Payload | None] = []

    def started(self, started_at_ms: int, deadline: Deadline | None) -> None:
        self.starts.append((started_at_ms, deadline))

    def heartbeat(self, details: Payload | None) -> None:
        self.beats.append(details)


class Calls:
    def __init__(self) -> None:
        self.ran: list[str] = []
        self.release = threading.Event()


def _participant(calls: Calls) -> Participant:
    svc = Participant("svc")

    @svc.activity("sync")
    def sync(value: Any, *, ctx: ActivityContext) -> Any:
        calls.ran.append("sync")
        return {"deadline": ctx.deadline}

    @svc.activity("hangs_async")
    async def hangs_async(value: Any, *, ctx: ActivityContext) -> Any:
        calls.ran.append("hangs_async")
        await asyncio.Event().wait()  # never set

    @svc.activity("swallows_cancel")
    async def swallows_cancel(value: Any, *, ctx: ActivityContext) -> Any:
        calls.ran.append("swallows_cancel")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "pretended to finish"

    @svc.activity("own_timeout")
    async def own_timeout(value: Any, *, ctx: ActivityContext) -> Any:
        calls.ran.append("own_timeout")
        raise TimeoutError("the upstream call timed out")

    @svc.activity("quick_async")
    async def quick_async(value: Any, *, ctx: ActivityContext) -> Any:
        await asyncio.sleep(0)
        return "in time"

    return svc


def test_a_task_whose_deadline_passed_is_answered_without_running_the_handler() -> None:
    calls = Calls()
    reporter = Reporter()
    task = _task("sync", deadline_ms=1_000, start_to_close_ms=60_000, report_start=True)
    outcome = _participant(calls).run_task(task, NO_DB, now_ms=lambda: 1_000, reporter=reporter)
    assert outcome.failure is not None
    assert (outcome.failure.error_type, outcome.failure.retryable) == (
        SCHEDULE_TO_CLOSE_TIMEOUT,
        True,
    )
    assert calls.ran == [] and reporter.starts == [], "not run, so not reported as started"


def test_the_handler_sees_its_deadline_and_the_reporter_hears_the_start_first() -> None:
    calls = Calls()
    reporter = Reporter()
    task = _task("sync", deadline_ms=90_000, start_to_close_ms=5_000)
    outcome = _participant(calls).run_task(task, NO_DB, now_ms=lambda: 10_000, reporter=reporter)
    assert outcome.result is not None and decode_json(outcome.result) == {"deadline": 15.0}
    assert reporter.starts == [(10_000, Deadline(15_000, START_TO_CLOSE_TIMEOUT, 5_000))]


def test_a_sync_handler_past_its_deadline_is_answered_by_the_timeout() -> None:
    """Its writes roll back with a failed outcome: the workflow retries under a new id."""
    calls = Calls()
    clock = iter([1_000, 99_000])  # started, finished: long past start + 500 ms
    task = _task("sync", start_to_close_ms=500)
    outcome = _participant(calls).run_task(task, NO_DB, now_ms=lambda: next(clock))
    assert calls.ran == ["sync"]
    assert outcome.failure is not None and outcome.finished_at_ms == 99_000
    assert (outcome.failure.error_type, outcome.failure.retryable) == (START_TO_CLOSE_TIMEOUT, True)
    assert "rolled back" in outcome.failure.message


def test_a_sync_handler_that_returns_on_its_deadline_keeps_its_outcome() -> None:
    calls = Calls()
    clock = iter([1_000, 1_500])  # exactly start + 500 ms: in time
    task = _task("sync", start_to_close_ms=500)
    outcome = _participant(calls).run_task(task, NO_DB, now_ms=lambda: next(clock))
    assert outcome.is_completed and outcome.finished_at_ms == 1_500


@pytest.mark.parametrize("activity", ["hangs_async", "swallows_cancel"])
def test_an_async_handler_is_cancelled_at_its_start_to_close_deadline(activity: str) -> None:
    calls = Calls()
    task = _task(activity, start_to_close_ms=200)
    before = wall_clock_ms()
    outcome = _participant(calls).run_task(task, NO_DB)
    assert calls.ran == [activity]
    assert outcome.failure is not None, outcome
    assert (outcome.failure.error_type, outcome.failure.retryable) == (
        START_TO_CLOSE_TIMEOUT,
        True,
    )
    assert "200 ms" in outcome.failure.message
    assert before + 200 <= outcome.finished_at_ms < before + 200 + WAIT_S * 1000


def test_an_async_handler_is_cancelled_at_an_earlier_schedule_to_close_deadline() -> None:
    calls = Calls()
    now = wall_clock_ms()
    task = _task("hangs_async", deadline_ms=now + 150, start_to_close_ms=60_000)
    outcome = _participant(calls).run_task(task, NO_DB)
    assert outcome.failure is not None
    assert outcome.failure.error_type == SCHEDULE_TO_CLOSE_TIMEOUT


def test_a_handlers_own_timeout_error_is_not_a_deadline() -> None:
    calls = Calls()
    svc = _participant(calls)
    outcome = svc.run_task(_task("own_timeout", start_to_close_ms=60_000), NO_DB)
    assert outcome.failure == Failure("TimeoutError", "the upstream call timed out", True)
    quick = svc.run_task(_task("quick_async", start_to_close_ms=60_000), NO_DB)
    assert quick.result is not None and decode_json(quick.result) == "in time"


# --- heartbeats from the handler -----------------------------------------------------------


def test_ctx_heartbeat_hands_json_details_to_the_reporter_from_any_thread() -> None:
    svc = Participant("svc")
    seen: dict[str, Any] = {}

    @svc.activity("beats")
    def beats(value: Any, *, ctx: ActivityContext) -> Any:
        seen["previous"] = ctx.heartbeat_details
        seen["timeout"] = ctx.heartbeat_timeout
        ctx.heartbeat({"done": 1})
        helper = threading.Thread(target=ctx.heartbeat, args=({"done": 2},))
        helper.start()
        helper.join(WAIT_S)
        ctx.heartbeat()
        return "ok"

    @svc.activity("beats_async")
    async def beats_async(value: Any, *, ctx: ActivityContext) -> Any:
        ctx.heartbeat([3])
        return "ok"

    reporter = Reporter()
    task = _task("beats", heartbeat_timeout_ms=9_000, heartbeat_details=encode_json({"done": 0}))
    assert svc.run_task(task, NO_DB, reporter=reporter).is_completed
    assert seen == {"previous": {"done": 0}, "timeout": 9.0}
    assert reporter.beats == [encode_json({"done": 1}), encode_json({"done": 2}), None]
    assert svc.run_task(_task("beats_async"), NO_DB, reporter=reporter).is_completed
    assert reporter.beats[-1] == encode_json([3])


def test_heartbeat_details_that_are_not_json_fail_at_the_call() -> None:
    svc = Participant("svc")
    errors: list[BaseException] = []

    @svc.activity("bad_details")
    def bad_details(value: Any, *, ctx: ActivityContext) -> Any:
        try:
            ctx.heartbeat({"when": object()})
        except PayloadEncodingError as exc:
            errors.append(exc)
        return "went on"

    reporter = Reporter()
    assert svc.run_task(_task("bad_details"), NO_DB, reporter=reporter).is_completed
    assert len(errors) == 1 and "heartbeat details of activity wf-1/1/1" in str(errors[0])
    assert reporter.beats == []


def test_without_a_reporter_heartbeat_is_a_no_op_and_bad_details_still_fail() -> None:
    ctx = ActivityContext(
        db=NO_DB,
        activity_id="a",
        workflow_id="w",
        attempt=1,
        compensation=False,
        participant="svc",
        activity="x",
    )
    ctx.heartbeat({"fine": True})
    with pytest.raises(PayloadEncodingError):
        ctx.heartbeat(float("nan"))
    assert ctx.deadline is None and ctx.time_left() is None


def test_unreadable_previous_details_reach_the_handler_as_none() -> None:
    svc = Participant("svc")
    seen: list[Any] = []

    @svc.activity("look")
    def look(value: Any, *, ctx: ActivityContext) -> Any:
        seen.append(ctx.heartbeat_details)
        return "ok"

    task = _task("look", heartbeat_details=Payload(b"{not json"))
    assert svc.run_task(task, NO_DB).is_completed
    assert seen == [None]
