"""``orchestrator.testing``: scripted activities, virtual time, and the errors of a run.

Times are asserted on the virtual clock (``sent_at``, ``elapsed``), never the wall clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestrator import (
    ActivityError,
    ConfigurationError,
    RecordTooLargeError,
    RetryPolicy,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowTimeoutError,
)
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.records import (
    ActivityFailed,
    AttemptHeartbeat,
    AttemptStarted,
    TimerFired,
    WorkflowStatus,
)
from orchestrator.settings import OrchestratorSettings
from orchestrator.testing import (
    DEFAULT_MAX_HISTORY_EVENTS,
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_START,
    RunResult,
    StepLimitError,
    UnscriptedActivityError,
    WorkflowBlockedError,
    WorkflowTester,
    WorkflowTesterError,
)
from tests.unit.conftest import history_lines

WEEK = timedelta(days=7)


def _tester(fn: Any, **kwargs: Any) -> WorkflowTester:
    registry = WorkflowRegistry()
    registry.workflow("t")(fn)
    return WorkflowTester(registry, **kwargs)


def _sent(run: RunResult, name: str) -> list[float]:
    return [call.sent_at for call in run.calls_to(name)]


# --- virtual time ----------------------------------------------------------------------


def test_a_week_long_sleep_passes_in_virtual_time() -> None:
    async def reminder(ctx: WorkflowContext, user: str) -> Any:
        await ctx.activity("mail.send", {"to": user, "text": "welcome"})
        await ctx.sleep(WEEK)
        await ctx.activity("mail.send", {"to": user, "text": "how is it going?"})
        return ctx.now()

    tester = _tester(reminder)
    tester.activity("mail.send").returns("sent")
    run = tester.run("t", "ada@example.com")
    assert run.status is WorkflowStatus.COMPLETED, run
    assert run.elapsed == WEEK.total_seconds()
    assert _sent(run, "mail.send") == [0, WEEK.total_seconds()]
    assert run.started_at == DEFAULT_START.timestamp()
    assert run.result == DEFAULT_START.timestamp() + WEEK.total_seconds()
    assert run.steps == 4, "start, answer, one wake-up, answer"
    assert history_lines(run.history)[2:4] == ["timer 1 +604800000", "fired 1"]


def test_the_clock_starts_where_the_run_says() -> None:
    async def clock(ctx: WorkflowContext, _: Any) -> Any:
        return ctx.now()

    tester = _tester(clock)
    assert tester.run("t", start_at=1_000).result == 1_000
    moment = datetime(2030, 6, 1, 12, tzinfo=UTC)
    assert tester.run("t", start_at=moment).result == moment.timestamp()
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        tester.run("t", start_at=datetime(2030, 6, 1))
    with pytest.raises(ConfigurationError, match="between 0 and"):
        tester.run("t", start_at=-1)


def test_retries_are_sent_after_their_backoff() -> None:
    policy = RetryPolicy(max_attempts=5, initial_interval=1, backoff_coefficient=2)

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.flaky", retry=policy)

    tester = _tester(flow)
    tester.activity("p.flaky").fails("Busy", retryable=True, times=3).returns("ok")
    run = tester.run("t")
    assert run.status is WorkflowStatus.COMPLETED and run.result == "ok", run
    assert _sent(run, "p.flaky") == [0, 1, 3, 7]
    assert [call.attempt for call in run.calls] == [1, 2, 3, 4]
    assert [call.outcome for call in run.calls] == ["fails", "fails", "fails", "returns"]

    # Attempts that take time: the backoff counts from each failure.
    tester.activity("p.flaky").fails("Busy", retryable=True, after=0.5, times=3).returns("ok")
    assert _sent(tester.run("t"), "p.flaky") == [0, 1.5, 4, 8.5]

    # A participant's retry_after replaces the policy's interval.
    tester.activity("p.flaky").fails("RateLimited", retryable=True, retry_after=30).returns("ok")
    assert _sent(tester.run("t"), "p.flaky") == [0, 30]

    # Out of attempts: the failure reaches the code.
    tester.activity("p.flaky").fails("Busy", "still busy", retryable=True)
    run = tester.run("t")
    assert run.status is WorkflowStatus.FAILED, run
    assert _sent(run, "p.flaky") == [0, 1, 3, 7, 15]
    assert run.failure is not None and "after 5 attempt(s): Busy: still busy" in run.failure.message


def test_a_failure_that_is_not_retryable_is_final_at_once() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("p.pay")
        except ActivityError as err:
            return [err.error_type, err.message, err.attempts]

    tester = _tester(flow)
    tester.activity("p.pay").fails("Declined", "no funds")
    run = tester.run("t")
    assert run.result == ["Declined", "no funds", 1]
    tester.activity("p.pay").fails("Declined")
    assert tester.run("t").result == ["Declined", "Declined", 1], "message defaults to the type"


def test_a_hung_attempt_with_start_to_close_is_timed_out_and_retried() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity(
            "p.slow", start_to_close=10, retry=RetryPolicy(max_attempts=3, initial_interval=2)
        )

    tester = _tester(flow)
    tester.activity("p.slow").hangs().returns("second time lucky", after=1)
    run = tester.run("t")
    assert run.status is WorkflowStatus.COMPLETED and run.result == "second time lucky", run
    assert _sent(run, "p.slow") == [0, 12]
    assert run.elapsed == 13
    assert history_lines(run.history) == [
        "sched 0#1 p.slow",
        "started 0#1",
        "fail 0#1 StartToCloseTimeout retry+2000",
        "sched 0#2 p.slow",
        "started 0#2",
        "done 0#2",
    ]
    assert sum(isinstance(e, AttemptStarted) for e in run.history) == 2, "start reports sent"


def test_an_answer_after_the_attempt_timed_out_is_ignored() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity(
            "p.slow", start_to_close=10, retry=RetryPolicy(max_attempts=2, initial_interval=30)
        )

    tester = _tester(flow)
    tester.activity("p.slow").returns("late", after=20).returns("in time")
    run = tester.run("t")
    assert run.result == "in time", run
    first, second = run.calls
    assert first.ignored == "late-result" and first.result == "late"
    assert second.ignored is None and second.sent_at == 40


def test_an_answer_due_with_a_timeout_arrives_first() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.a", schedule_to_close=5)

    tester = _tester(flow)
    tester.activity("p.a").returns("just in time", after=5)
    run = tester.run("t")
    assert run.status is WorkflowStatus.COMPLETED, run
    tester.activity("p.a").returns("too late", after=5.001)
    run = tester.run("t")
    assert run.status is WorkflowStatus.FAILED and run.elapsed == 5, run
    assert run.calls[0].ignored is None, "the run ends with the workflow, before the answer"


def test_heartbeat_details_reach_the_next_attempt() -> None:
    async def copy(ctx: WorkflowContext, files: int) -> Any:
        return await ctx.activity(
            "files.copy",
            files,
            heartbeat_timeout=30,
            retry=RetryPolicy(max_attempts=2, initial_interval=5),
        )

    def resume(files: int, attempt: int) -> Any:
        return {"copied": files, "attempt": attempt}

    tester = _tester(copy)
    tester.activity("files.copy").hangs(heartbeats=[(10, {"copied": 3})]).returns(resume)
    run = tester.run("t", 8)
    assert run.status is WorkflowStatus.COMPLETED, run
    assert run.result == {"copied": 8, "attempt": 2}
    first, second = run.calls_to("files.copy")
    assert first.heartbeat_details is None
    assert second.heartbeat_details == {"copied": 3}
    # Alive at 10 s, no heartbeat for 30 s: timed out at 40 s, retried 5 s later.
    assert second.sent_at == 45
    failure = next(e for e in run.history if isinstance(e, ActivityFailed))
    assert (
        failure.failure.error_type == "HeartbeatTimeout"
        and failure.at_ms - run.record.started_at_ms == 40_000
    )


def test_a_heartbeat_without_details_repeats_the_latest() -> None:
    """As a participant's ``ctx.heartbeat()`` does: the details of this attempt or the task's."""

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity(
            "p.scan", heartbeat_timeout=30, retry=RetryPolicy(max_attempts=3, initial_interval=0)
        )

    tester = _tester(flow)
    script = tester.activity("p.scan")
    script.hangs(heartbeats=[(5, {"page": 1}), (10, None)])  # attempt 1: page 1, then alive
    script.hangs(heartbeats=[(5, None)])  # attempt 2 starts from the task's page 1
    script.returns("done")
    run = tester.run("t")
    assert run.status is WorkflowStatus.COMPLETED, run
    assert [c.heartbeat_details for c in run.calls] == [None, {"page": 1}, {"page": 1}]
    assert _sent(run, "p.scan") == [0, 40, 75]


def test_heartbeats_keep_a_long_attempt_alive() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.long", heartbeat_timeout=30, start_to_close=3600)

    tester = _tester(flow)
    beats = [(float(s), {"at": s}) for s in range(20, 100, 20)]
    tester.activity("p.long").returns("done", after=100, heartbeats=beats)
    run = tester.run("t")
    assert run.status is WorkflowStatus.COMPLETED and run.elapsed == 100, run
    (beat,) = [e for e in run.history if isinstance(e, AttemptHeartbeat)]
    assert beat.at_ms - run.record.started_at_ms == 80_000, "the last heartbeat is kept"


def test_with_timeout_gives_up_on_an_activity_that_hangs() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("p.slow").with_timeout(timedelta(hours=1))
        except WorkflowTimeoutError:
            return await ctx.activity("p.fallback")

    tester = _tester(flow)
    tester.activity("p.slow").hangs()
    tester.activity("p.fallback").returns("plan b")
    run = tester.run("t")
    assert run.result == "plan b" and run.elapsed == 3600, run
    assert _sent(run, "p.fallback") == [3600]
    assert any(isinstance(e, TimerFired) for e in run.history)


def test_parallel_steps_answer_in_order_of_their_durations() -> None:
    async def race(ctx: WorkflowContext, _: Any) -> Any:
        slow, fast = ctx.activity("p.slow"), ctx.activity("p.fast")
        winner = await ctx.first(slow, fast)
        both = await ctx.gather(slow, fast)
        return [winner.seq, both, ctx.now() - (DEFAULT_START.timestamp())]

    tester = _tester(race)
    tester.activity("p.slow").returns("s", after=9)
    tester.activity("p.fast").returns("f", after=2)
    run = tester.run("t")
    assert run.result == [1, ["s", "f"], 9], run


# --- scripts -------------------------------------------------------------------------------


def test_a_callable_answer_sees_the_argument_and_the_attempt() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        first = await ctx.activity("p.echo", {"n": 1})
        second = await ctx.activity("p.echo", {"n": 2})
        return [first, second]

    seen: list[tuple[Any, int]] = []

    def echo(value: Any, attempt: int) -> Any:
        seen.append((value, attempt))
        return value["n"] * 10

    tester = _tester(flow)
    tester.activity("p.echo").returns(echo)
    run = tester.run("t")
    assert run.result == [10, 20]
    assert seen == [({"n": 1}, 1), ({"n": 2}, 1)]
    assert [call.result for call in run.calls] == [10, 20]


def test_answers_are_used_in_the_order_attempts_are_sent_and_the_last_repeats() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return [await ctx.activity("p.n", retry=RetryPolicy(initial_interval=0)) for _ in range(4)]

    tester = _tester(flow)
    tester.activity("p.n").returns(1).fails("Busy", retryable=True).returns(2)
    run = tester.run("t")
    assert run.result == [1, 2, 2, 2]
    assert [(c.seq, c.attempt, c.outcome) for c in run.calls] == [
        (0, 1, "returns"),
        (1, 1, "fails"),
        (1, 2, "returns"),
        (2, 1, "returns"),
        (3, 1, "returns"),
    ]
    assert tester.run("t").result == [1, 2, 2, 2], "every run starts the scripts again"


def test_a_new_script_replaces_the_earlier_one() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.a")

    tester = _tester(flow)
    tester.activity("p.a").returns("default")
    tester.activity("p.a").returns("override")
    assert tester.run("t").result == "override"


@pytest.mark.parametrize(
    ("script", "fragment"),
    [
        (lambda t: t.activity("no-dot"), "'<participant>.<activity>'"),
        (lambda t: t.activity("p.a").returns(object()), "no converter for a value of type"),
        (lambda t: t.activity("p.a").returns(1, times=0), "times=...) must be an int"),
        (lambda t: t.activity("p.a").returns(1, after=-1), "after=...) must be between 0"),
        (lambda t: t.activity("p.a").fails(""), "must be a non-empty str"),
        (lambda t: t.activity("p.a").fails("X", retry_after=5), "needs retryable=True"),
        (lambda t: t.activity("p.a").fails("X", retryable=1), "must be a bool"),
        (lambda t: t.activity("p.a").hangs(heartbeats=[5]), "(seconds, details) pairs"),
        (lambda t: t.activity("p.a").hangs(heartbeats=[(1, {1j})]), "value of type complex"),
    ],
    ids=[
        "name",
        "value",
        "times",
        "after",
        "error-type",
        "retry-after",
        "retryable",
        "heartbeat-pair",
        "heartbeat-details",
    ],
)
def test_scripts_are_checked_when_they_are_written(script: Any, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        script(WorkflowTester(WorkflowRegistry()))
    assert fragment in str(caught.value)


# --- runs that cannot finish --------------------------------------------------------------


def test_an_unscripted_activity_fails_the_run_naming_it() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.known")
        return await ctx.activity("billing.invoice", {"n": 1})

    tester = _tester(flow)
    tester.activity("p.known").returns(None)
    with pytest.raises(UnscriptedActivityError) as caught:
        tester.run("t")
    error = caught.value
    assert error.activity == "billing.invoice"
    assert "sent activity 'billing.invoice' (step 1, attempt 1)" in str(error)
    assert "tester.activity('billing.invoice').returns(...)" in str(error)
    assert "scripted: 'p.known'" in str(error)
    assert error.run.status is WorkflowStatus.RUNNING
    assert [call.name for call in error.run.calls] == ["p.known"]


def test_a_script_without_answers_fails_the_run_naming_the_activity() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.a")

    tester = _tester(flow)
    tester.activity("p.a")  # forgot .returns(...)
    with pytest.raises(UnscriptedActivityError, match="has a script without answers for"):
        tester.run("t")


def test_a_workflow_that_can_never_progress_ends_the_run_naming_what_it_waits_on() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(60)
        return await ctx.activity("payment.charge", {"amount": 5})

    tester = _tester(flow)
    tester.activity("payment.charge").hangs()
    with pytest.raises(WorkflowBlockedError) as caught:
        tester.run("t")
    message = str(caught.value)
    assert "can never finish: at +60 s virtual" in message
    assert "step 1 'payment.charge' attempt 1, which the tester scripted to hang" in message
    assert "schedule_to_close, start_to_close or heartbeat_timeout" in message
    assert caught.value.run.status is WorkflowStatus.RUNNING
    assert isinstance(caught.value, WorkflowTesterError)


def test_a_runaway_workflow_stops_at_the_step_limit() -> None:
    async def forever(ctx: WorkflowContext, _: Any) -> Any:
        while True:
            await ctx.activity("p.tick")

    tester = _tester(forever, max_steps=50)
    tester.activity("p.tick").returns(None)
    with pytest.raises(StepLimitError, match="did not close within 50 inputs"):
        tester.run("t")


def test_a_stuck_workflow_returns_with_its_failure() -> None:
    async def broken(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.a")
        await ctx.sleep(-1)

    tester = _tester(broken)
    tester.activity("p.a").returns(None)
    run = tester.run("t")
    assert run.status is WorkflowStatus.STUCK, run
    assert run.error_type == "WorkflowDefinitionError"
    assert run.failure is not None and "ctx.sleep(seconds)" in run.failure.message


def test_an_unregistered_type_is_refused_naming_the_registered_ones() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return None

    with pytest.raises(ConfigurationError, match=r"'order\.proces' is not registered.*'t'"):
        _tester(flow).run("order.proces")


# --- what the orchestrator would commit -----------------------------------------------------


def test_every_record_is_what_the_codec_gives_back() -> None:
    async def flow(ctx: WorkflowContext, text: str) -> Any:
        return await ctx.activity("p.echo", text)

    tester = _tester(flow)
    tester.activity("p.echo").returns(lambda value, attempt: value + " é ✓")
    run = tester.run("t", "naïve")
    assert run.result == "naïve é ✓"
    codec = AvroCodec()
    assert codec.decode_workflow(codec.encode_workflow(run.record)) == run.record
    assert run.record.run_id == "test-run"
    assert run.calls[0].activity_id == "test-workflow/test-run/0/1"


def test_the_orchestrators_record_limits_apply() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("p.big")
        except RecordTooLargeError as err:
            return ["too large", err.effects_committed]

    tester = _tester(flow, max_record_bytes=4_096)
    tester.activity("p.big").returns("x" * 5_000)
    assert tester.run("t").result == ["too large", True]


def test_the_default_limits_are_the_orchestrators() -> None:
    fields = OrchestratorSettings.model_fields
    assert fields["max_record_bytes"].default == DEFAULT_MAX_RECORD_BYTES
    assert fields["max_history_events"].default == DEFAULT_MAX_HISTORY_EVENTS


def test_the_result_reads_as_a_summary() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.a")
        raise ValueError("nope")

    tester = _tester(flow)
    tester.activity("p.a").returns(None)
    assert repr(tester.run("t")) == (
        "RunResult(t 'test-workflow': FAILED after 0 s virtual, ValueError: nope\n"
        "  +0s p.a#1 -> returns)"
    )
