"""Edges of patching, continue-as-new and ``ctx.history_length`` a hostile review found:
a patch asked from an update handler or a query, patches in runs that are new within one
transaction (signal-with-start, a continued run, two timers firing at once), signals and
updates resent after a run continued, a carried signal's time, heartbeats replaced beside
``history_length``, patch ids that cannot be encoded, and the shell writing every run a
new run replaces. Each test failed on the first version of these features.
"""

from __future__ import annotations

from typing import Any

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    IfClosed,
    IfRunning,
    QueryWorkflow,
    ResumeWorkflow,
    SignalWorkflow,
    StartWorkflow,
    TimerStarted,
    UpdateWorkflow,
    WorkflowStatus,
)
from orchestrator.replay import Limits, advance
from orchestrator.replay.engine import answer_query
from orchestrator.runtime.inputs import Batch
from tests.unit.conftest import (
    T0,
    WorkflowRun,
    assert_encodable,
    assert_status,
    encoded_size,
    history_lines,
    registry_with,
    signal_to,
)
from tests.unit.test_runtime_requests import (
    MISSING_TOPIC,
    TOPICS,
    WID,
    _on,
    _Shell,
)
from tests.unit.test_runtime_requests import _signal as _shell_signal
from tests.unit.test_runtime_requests import _start as _shell_start
from tests.unit.test_runtime_requests import _started as _shell_started
from tests.unit.test_runtime_requests import _waits as _shell_waits


def _registry(fn: Any, name: str = "wf") -> WorkflowRegistry:
    return registry_with(fn, name)


_signal = signal_to


def _update(run: WorkflowRun, name: str, value: Any, uid: str) -> UpdateWorkflow:
    return UpdateWorkflow(run.workflow_id, uid, name, encode_json(value), run.now_ms)


# --- 1. ctx.patched asked from an update handler ----------------------------------------


async def _tagged(ctx: WorkflowContext, _: Any) -> Any:
    """An update handler decides by the patch; the main code asks it later (past history,
    so it records the marker) and branches on what the handler decided."""
    state = {"tag": "unset"}

    def set_tag(_value: Any) -> str:
        state["tag"] = "new" if ctx.patched("tagging") else "old"
        return state["tag"]

    ctx.on_update("tag", set_tag)
    await ctx.wait_signal("go")
    ctx.patched("tagging")
    if state["tag"] == "old":
        await ctx.activity("p.old_path", 1)
    else:
        await ctx.activity("p.new_path", 1)
    return state["tag"]


def test_update_handler_patched_answer_is_the_same_on_replay() -> None:
    run = WorkflowRun(_registry(_tagged), "wf", run_id="r1")
    run.start()
    applied = run.send(_update(run, "tag", 1, "u1"))
    assert applied.reply is not None and applied.reply.payload is not None
    assert decode_json(applied.reply.payload) == "old"  # no marker yet: off
    run.send(_signal(run, "go", None, "s1"))  # the main code records the marker now
    assert "sched 0#1 p.old_path" in history_lines(run.record.events)  # type: ignore[union-attr]
    run.complete(0)
    # On replay the handler sees the marker recorded *after* the update and answers
    # "new": the main code then schedules p.new_path where history has p.old_path.
    assert_status(run.record, WorkflowStatus.COMPLETED)


def test_a_retried_update_gets_the_answer_it_first_got_when_a_patch_is_recorded_later() -> None:
    run = WorkflowRun(_registry(_tagged), "wf", run_id="r1")
    run.start()
    first = run.send(_update(run, "tag", 1, "u1"))
    assert first.reply is not None and first.reply.payload is not None
    run.send(_signal(run, "go", None, "s1"))
    again = run.send(_update(run, "tag", 1, "u1"))  # the client retries the same id
    assert again.ignored == "duplicate-update"
    assert again.reply is not None and again.reply.payload is not None
    assert decode_json(again.reply.payload) == decode_json(first.reply.payload)


# --- 2. ctx.history_length is not stable across heartbeats ---------------------------


async def _measures(ctx: WorkflowContext, _: Any) -> Any:
    slow = ctx.activity("p.slow", 1)  # step 0, heartbeats while the rest runs
    await ctx.activity("p.fast", 2)  # step 1
    seen = ctx.history_length  # two commands and one outcome so far: 3
    if seen >= 3:
        await ctx.activity("p.long_history", seen)
    else:
        await ctx.activity("p.short_history", seen)
    return await slow


def test_history_length_is_the_same_on_every_replay_despite_heartbeats() -> None:
    run = WorkflowRun(_registry(_measures), "wf", run_id="r1")
    run.start()
    run.heartbeat(0, {"progress": 1})
    run.complete(1)  # sched 0, sched 1, beat 0, done 1: history_length 3
    assert history_lines(run.record.events)[-1] == "sched 2#1 p.long_history"  # type: ignore[union-attr]
    run.heartbeat(0, {"progress": 2})  # the old heartbeat event is removed, a new one appended
    run.complete(2)
    # A heartbeat replaced beside it changes nothing the code counts.
    assert_status(run.record, WorkflowStatus.RUNNING)


# --- 3. signal and update dedupe across continue-as-new ------------------------------


async def _collector(ctx: WorkflowContext, items: Any) -> Any:
    """Takes ``add`` updates; every minute, continues with what it has if it has any."""
    items = list(items)

    def add(item: Any) -> int:
        items.append(item)
        return len(items)

    ctx.on_update("add", add)
    ctx.on_query("items", lambda: items)
    while True:
        await ctx.sleep(60)
        if items:
            ctx.continue_as_new(items)


def test_a_retried_update_is_not_applied_again_after_the_run_continued() -> None:
    run = WorkflowRun(_registry(_collector), "wf", run_id="r1")
    run.start([])
    first = run.send(_update(run, "add", "a", "u1"))
    assert first.reply is not None and first.reply.ok
    continued = run.wake()
    assert continued.replaced is not None  # the run continued with ["a"]
    # The client timed out waiting and sends the same update id again ("safe", the docs
    # of WorkflowClient.update say): it must apply nothing more.
    again = run.send(_update(run, "add", "a", "u1"))
    assert again.ignored == "duplicate-update", history_lines(run.record.events)  # type: ignore[union-attr]


async def _counter(ctx: WorkflowContext, state: Any) -> Any:
    total, taken = state["total"], 0
    while True:
        which = await ctx.first(ctx.wait_signal("add"), ctx.wait_signal("stop"))
        if which.name == "stop":
            return total
        total += await which
        taken += 1
        if taken == 2:
            ctx.continue_as_new({"total": total})


def test_a_retried_signal_is_not_received_again_after_the_run_continued() -> None:
    run = WorkflowRun(_registry(_counter), "wf", run_id="r1")
    run.start({"total": 0})
    run.send(_signal(run, "add", 1, "s1"))
    continued = run.send(_signal(run, "add", 2, "s2"))
    assert continued.replaced is not None
    # The producer resends s2 (same signal_id: "sending again ... is safe").
    again = run.send(_signal(run, "add", 2, "s2"))
    assert again.ignored == "duplicate-signal"
    run.send(_signal(run, "stop", None, "s3"))
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == 3


# --- 4. ctx.patched in a brand-new run whose history starts with signals --------------


def test_a_continued_run_with_a_carried_signal_asks_the_patch_as_a_new_run() -> None:
    async def bursty(ctx: WorkflowContext, state: Any) -> Any:
        if state["run"] == 2:
            on = ctx.patched("v2")  # run 2: new code, nothing recorded yet but a signal
            await ctx.wait_signal("work")
            return on
        await ctx.sleep(10)  # run 1: two signals pile up meanwhile
        await ctx.wait_signal("work")
        ctx.continue_as_new({"run": 2})

    run = WorkflowRun(_registry(bursty), "wf", run_id="r1")
    run.start({"run": 1})
    run.send(_signal(run, "work", 1, "w1"))
    run.send(_signal(run, "work", 2, "w2"))
    transition = run.wake()  # run 1 takes w1 and continues; run 2 gets w2 carried
    assert transition.replaced is not None
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.record is not None and run.record.result is not None
    # docs/evolution.md: "ctx.patched(id) is True for every run that reaches it after the
    # deploy (new runs, ...)". Run 2 is new; it gets False because its carried signal
    # counts as "recorded history the code has not reached".
    assert decode_json(run.record.result) is True


def test_signal_with_start_runs_the_patched_path() -> None:
    async def patched_at_top(ctx: WorkflowContext, _: Any) -> Any:
        on = ctx.patched("v2")
        await ctx.wait_signal("go")
        return on

    registry = _registry(patched_at_top)
    start = StartWorkflow("w", "wf", encode_json(None), 0)
    signal = SignalWorkflow("w", "go", encode_json(1), "s1", 0, start)
    transition = advance(None, signal, 1, registry, run_id="r1")
    assert transition.record is not None
    assert_status(transition.record, WorkflowStatus.COMPLETED)
    assert transition.record.result is not None
    assert decode_json(transition.record.result) is True  # a brand-new run


def test_a_new_run_whose_two_timers_fire_in_one_wake_takes_the_patched_path() -> None:
    # No old code ever ran this workflow: it starts after the deploy. Both timers fire in
    # one WakeUp, so when the code reaches the patch after the first, the second firing
    # is "undelivered recorded history" and the patch is off.
    async def two_timers(ctx: WorkflowContext, _: Any) -> Any:
        first = ctx.sleep(10)
        second = ctx.sleep(10)
        await first
        on = ctx.patched("v2")
        await second
        return on

    run = WorkflowRun(_registry(two_timers), "wf", run_id="r1")
    run.start()
    run.wake()
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) is True


# --- 5. a query answers from a patch decision no transition made --------------------


async def _old_two_signals(ctx: WorkflowContext, _: Any) -> Any:
    state = {"tag": "old"}
    ctx.on_query("tag", lambda: state["tag"])
    await ctx.wait_signal("a")
    await ctx.wait_signal("b")
    return state["tag"]


async def _new_two_signals(ctx: WorkflowContext, _: Any) -> Any:
    state = {"tag": "unset"}
    ctx.on_query("tag", lambda: state["tag"])
    await ctx.wait_signal("a")
    state["tag"] = "new" if ctx.patched("tagging") else "old"
    await ctx.wait_signal("b")
    return state["tag"]


def test_a_query_after_a_deploy_answers_the_state_the_run_will_have() -> None:
    run = WorkflowRun(_registry(_old_two_signals), "wf", run_id="r1")
    run.start()
    run.send(_signal(run, "a", 1, "sa"))  # the old code passed the point, waits on b
    run.registry = _registry(_new_two_signals)  # deploy 1
    assert run.record is not None
    query = QueryWorkflow(run.workflow_id, "q1", "tag", encode_json(None), run.now_ms)
    reply = answer_query(run.record, query, run.now_ms, run.registry)
    assert reply.ok and reply.payload is not None
    answered = decode_json(reply.payload)
    run.send(_signal(run, "b", 2, "sb"))
    assert run.record is not None and run.record.result is not None
    # The query said "new" (it decided the patch past history, and recorded nothing);
    # the run itself decided "old" at the same point: the query saw a state that never was.
    assert answered == decode_json(run.record.result)


# --- 6. the run that continues after a resume keeps its STUCK failure ----------------


def test_a_run_resumed_and_continued_closes_without_the_old_parking_failure() -> None:
    async def broken(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(1)
        raise SystemExit("a BaseException: parks")

    async def fixed(ctx: WorkflowContext, state: Any) -> Any:
        if state == "next":
            await ctx.sleep(1)
            return "done"
        await ctx.sleep(1)
        ctx.continue_as_new("next")

    run = WorkflowRun(_registry(broken), "wf", run_id="r1")
    run.start()
    run.wake()
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    run.registry = _registry(fixed)
    transition = run.resume()
    ended = transition.replaced
    assert ended is not None and ended.status is WorkflowStatus.CONTINUED_AS_NEW
    # The closed run says it continued, yet carries the failure of the parking it left.
    assert ended.failure is None, ended.failure


# --- 7. ctx.now() goes back in a run whose history starts with carried signals ----------


def test_time_does_not_go_back_in_a_run_that_takes_a_carried_signal() -> None:
    async def later(ctx: WorkflowContext, state: Any) -> Any:
        if state == "first":
            await ctx.sleep(100)  # a signal arrives meanwhile; this run never takes it
            ctx.continue_as_new("second")
        began = ctx.now()
        await ctx.wait_signal("work")  # the carried signal, taken at once
        took = ctx.now()
        await ctx.sleep(50)  # fifty seconds from now
        return [began, took]

    run = WorkflowRun(_registry(later), "wf", run_id="r1")
    run.start("first")
    run.send(_signal(run, "work", 1, "w1"))  # at T0 + 2 s
    transition = run.wake()  # T0 + 101 s: run 1 continues, run 2 takes w1 at once
    assert transition.replaced is not None and run.record is not None
    started = run.record.started_at_ms
    timers = [e for e in run.record.events if isinstance(e, TimerStarted)]
    assert len(timers) == 1
    # The timer must not fire before fifty seconds after the run started; it is set from
    # the carried signal's old time (about a hundred seconds earlier) and is already due.
    assert timers[0].fire_at_ms >= started + 50_000, (timers[0], started)


# --- 8. shell: a run closed earlier in the batch, started again into a run that continues


def _shell_registry() -> WorkflowRegistry:
    async def hop(ctx: WorkflowContext, state: Any) -> Any:
        """Continues at once from its first run (a migration of its input, say)."""
        if state is None:
            ctx.continue_as_new("second")
        await ctx.wait_signal("go")
        return state

    async def loopq(ctx: WorkflowContext, state: Any) -> Any:
        """Continues on ``go``; the next run's first step is for participant ``q``."""
        if state == "second":
            await ctx.activity("q.work")
            return "done"
        await ctx.wait_signal("go")
        ctx.continue_as_new("second")

    registry = WorkflowRegistry()
    registry.workflow("t")(_shell_waits)
    registry.workflow("hop")(hop)
    registry.workflow("loopq")(loopq)
    return registry


def test_shell_a_run_closed_in_the_batch_is_written_when_its_id_restarts_into_a_continue() -> None:
    shell = _Shell()
    shell.processor.registry = _shell_registry()
    first = _shell_started(shell)
    batch = Batch(0.0)
    shell.feed(_shell_signal(), batch)  # run 1 completes: staged, not written yet
    assert_status(shell.staged(), WorkflowStatus.COMPLETED)
    shell.feed(_shell_start("R2", IfRunning.FAIL, IfClosed.ALLOW, workflow_type="hop"), batch)
    written = [(r.run_id, r.status) for r in shell.history(batch)]
    # Run 1's COMPLETED record must reach history before the new runs; the new run's own
    # CONTINUED_AS_NEW record takes the place of "previous", and run 1's is overwritten in
    # the staging area by the successor: its completion is never written.
    assert (first.run_id, WorkflowStatus.COMPLETED) in written, written


def test_shell_a_continue_into_a_run_that_cannot_start_parks_the_open_run() -> None:
    # Regression guard for db47b6e: there the ended run was written CONTINUED_AS_NEW and
    # the input dead-lettered as "unknown-workflow" (nothing open remained: the workflow
    # was lost). The working tree's `starts and (...)` condition fixes it; this passes.
    shell = _Shell()
    shell.processor.registry = _shell_registry()
    batch = Batch(0.0)
    shell.feed(_shell_start(None, workflow_type="loopq"), batch)
    shell.commit()
    run = shell.committed()
    batch = Batch(0.0)
    offset = shell.feed(_shell_signal(), batch)
    assert shell.history(batch) == [], "the ended run was written though nothing follows it"
    parked = shell.staged()
    assert_status(parked, WorkflowStatus.STUCK, "MissingTasksTopic")
    assert parked.run_id == run.run_id
    assert _on(batch, TOPICS.dlq) == []
    shell.commit()
    assert shell.held() == [offset]
    shell.listing.names.add(MISSING_TOPIC)
    batch = Batch(0.0)
    shell.feed(ResumeWorkflow(WID, T0), batch)
    [ended] = shell.history(batch)
    assert ended.status is WorkflowStatus.CONTINUED_AS_NEW and ended.run_id == run.run_id
    assert_status(shell.staged(), WorkflowStatus.RUNNING)
    assert [o.topic for o in batch.outputs if o.topic == MISSING_TOPIC] == [MISSING_TOPIC]


# --- 9. a patch id UTF-8 cannot encode reaches the record ------------------------------


async def _odd_patch(ctx: WorkflowContext, _: Any) -> Any:
    ctx.patched("fix-\ud800")  # a lone surrogate (e.g. a name read with surrogateescape)
    await ctx.wait_signal("go")
    return None


def test_an_unencodable_patch_id_parks_the_workflow_instead_of_breaking_the_record() -> None:
    registry = _registry(_odd_patch)
    start = StartWorkflow("w", "wf", encode_json(None), 0)
    transition = advance(None, start, 1, registry, run_id="r1")
    # The engine's rule: every text from workflow code passes safe_text, so every record
    # it returns can be encoded. Signal names are checked that way; patch ids are not.
    assert_encodable(transition.record)


def test_an_unencodable_patch_id_does_not_make_the_engine_raise_under_a_size_limit() -> None:
    registry = _registry(_odd_patch)
    start = StartWorkflow("w", "wf", encode_json(None), 0)
    limits = Limits(max_record_bytes=1_000_000, measure=encoded_size)  # as the shell's
    transition = advance(None, start, 1, registry, limits, run_id="r1")  # must not raise
    assert transition.record is not None


# --- 10. a WakeUp that continues keeps the retry it never sent in the closed run ----------


def test_a_retry_a_continuing_wake_never_sent_is_not_in_the_closed_run() -> None:
    async def racing(ctx: WorkflowContext, state: Any) -> Any:
        if state == "next":
            await ctx.sleep(1_000)
            return None
        await ctx.first(ctx.activity("p.flaky", 1), ctx.sleep(2))
        ctx.continue_as_new("next")

    run = WorkflowRun(_registry(racing), "wf", run_id="r1")
    run.start()
    run.fail(0, "Busy", retryable=True)  # its retry is due with the timer
    transition = run.wake()
    assert transition.replaced is not None and transition.tasks == ()
    # The retry was not sent (it "died with" the run), yet the closed run's history says
    # attempt 2 was scheduled: a reader sees an attempt in flight that never existed.
    assert "sched 0#2 p.flaky" not in history_lines(transition.replaced.events)
