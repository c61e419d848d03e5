"""Patching (issue 13): ``ctx.patched`` and ``ctx.deprecate_patch`` across the three
deploys of a safe change, on the pure engine.

The change: an order workflow that reserved stock and charged the card gets a fraud check
between the two. Deploy 1 wraps it in ``if ctx.patched("fraud-check")``; deploy 2, once no
run that took the old path is open, keeps only the new path behind
``ctx.deprecate_patch``; deploy 3, once no run that recorded the patch is open, drops the
call. Each phase's histories are recorded by driving the engine with that phase's code,
then replayed and continued by the next phase's (and, for a rolling deploy, the previous
phase's) code.
"""

from __future__ import annotations

from typing import Any

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    PatchMarker,
    QueryWorkflow,
    SignalWorkflow,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.replay.driver import NONDETERMINISM, replay
from orchestrator.replay.engine import answer_query
from tests.unit.conftest import WorkflowRun, assert_history, assert_status

PATCH = "fraud-check"


async def _before(ctx: WorkflowContext, order: Any) -> Any:
    """The code before the change."""
    await ctx.activity("inventory.reserve", order)
    charge = await ctx.activity("payment.charge", order)
    return {"charge": charge, "checked": False}


async def _patched(ctx: WorkflowContext, order: Any) -> Any:
    """Deploy 1: the new step behind the patch, the old path kept."""
    await ctx.activity("inventory.reserve", order)
    checked = False
    if ctx.patched(PATCH):
        await ctx.activity("fraud.check", order)
        checked = True
    charge = await ctx.activity("payment.charge", order)
    return {"charge": charge, "checked": checked}


async def _deprecated(ctx: WorkflowContext, order: Any) -> Any:
    """Deploy 2: only the new path; the patch still recorded for rolling deploys."""
    await ctx.activity("inventory.reserve", order)
    ctx.deprecate_patch(PATCH)
    await ctx.activity("fraud.check", order)
    charge = await ctx.activity("payment.charge", order)
    return {"charge": charge, "checked": True}


async def _clean(ctx: WorkflowContext, order: Any) -> Any:
    """Deploy 3: the call is gone."""
    await ctx.activity("inventory.reserve", order)
    await ctx.activity("fraud.check", order)
    charge = await ctx.activity("payment.charge", order)
    return {"charge": charge, "checked": True}


def _registry(fn: Any) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow("order")(fn)
    return registry


def _run(fn: Any, workflow_id: str = "order-1") -> WorkflowRun:
    run = WorkflowRun(_registry(fn), "order", workflow_id=workflow_id, run_id="r1")
    run.start({"order": workflow_id})
    return run


def _deploy(run: WorkflowRun, fn: Any) -> None:
    run.registry = _registry(fn)


def _result(run: WorkflowRun) -> Any:
    assert run.record is not None and run.record.result is not None, run.record
    return decode_json(run.record.result)


def _replays_cleanly(record: WorkflowRecord | None, fn: Any) -> bool:
    assert record is not None
    result = replay(
        fn,
        record.workflow_id,
        record.workflow_type,
        decode_json(record.input),
        record.events,
        record.started_at_ms,
        run_id=record.run_id,
    )
    return result.problem is None


# --- deploy 1: ctx.patched --------------------------------------------------------------


def test_a_new_run_takes_the_new_path_and_records_the_patch() -> None:
    run = _run(_patched)
    run.complete(0)
    assert_history(
        run.record,
        ["sched 0#1 inventory.reserve", "done 0#1", "patch fraud-check@1", "sched 1#1 fraud.check"],
    )
    run.complete(1)
    run.complete(2, "ch-1")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _result(run) == {"charge": "ch-1", "checked": True}


def test_a_run_that_had_not_reached_the_change_takes_the_new_path() -> None:
    run = _run(_before)  # recorded by the old code: waiting on the reservation
    assert_history(run.record, ["sched 0#1 inventory.reserve"])
    _deploy(run, _patched)
    run.complete(0)
    assert_history(
        run.record,
        ["sched 0#1 inventory.reserve", "done 0#1", "patch fraud-check@1", "sched 1#1 fraud.check"],
    )
    run.complete(1)
    run.complete(2, "ch-2")
    assert _result(run) == {"charge": "ch-2", "checked": True}


def test_a_run_that_passed_the_change_keeps_the_old_path() -> None:
    run = _run(_before)
    run.complete(0)  # the old code went on to the charge
    assert_history(
        run.record, ["sched 0#1 inventory.reserve", "done 0#1", "sched 1#1 payment.charge"]
    )
    _deploy(run, _patched)
    run.complete(1, "ch-3")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _result(run) == {"charge": "ch-3", "checked": False}
    assert not any(isinstance(e, PatchMarker) for e in run.record.events)  # type: ignore[union-attr]


def test_without_the_patch_the_same_deploy_strands_the_run_that_passed_the_change() -> None:
    # What patching is for: the unpatched new code parks the run the old code moved on.
    run = _run(_before)
    run.complete(0)
    _deploy(run, _clean)
    run.complete(1, "ch-4")
    assert_status(run.record, WorkflowStatus.STUCK, NONDETERMINISM)
    assert run.record is not None and run.record.failure is not None
    assert "step 1 is activity 'fraud.check' in the code" in run.record.failure.message


def test_the_first_answer_holds_for_the_whole_run() -> None:
    seen: list[bool] = []

    async def looping(ctx: WorkflowContext, _: Any) -> Any:
        for _round in range(3):
            seen.append(ctx.patched("loop-change"))
            await ctx.activity("p.step", _round)
        return None

    async def old_loop(ctx: WorkflowContext, _: Any) -> Any:
        for _round in range(3):
            await ctx.activity("p.step", _round)
        return None

    run = _run(old_loop)
    run.complete(0)  # round 1 passed the point with the old code
    _deploy(run, looping)
    seen.clear()
    run.complete(1)
    # Round 3 is past recorded history, but the run already answered "off" in round 1.
    assert seen == [False, False, False]
    assert_history(
        run.record,
        ["sched 0#1 p.step", "done 0#1", "sched 1#1 p.step", "done 1#1", "sched 2#1 p.step"],
    )


def test_a_query_handler_sees_the_patch_but_records_nothing() -> None:
    async def queried(ctx: WorkflowContext, order: Any) -> Any:
        ctx.on_query("checked", lambda: ctx.patched("q-change"))
        await ctx.activity("p.wait", order)
        return None

    run = _run(queried)
    assert run.record is not None
    query = QueryWorkflow(run.workflow_id, "q-1", "checked", encode_json(None), run.now_ms)
    reply = answer_query(run.record, query, run.now_ms, run.registry)
    assert reply.ok and reply.payload is not None
    assert decode_json(reply.payload) is False
    assert not any(isinstance(e, PatchMarker) for e in run.record.events)


def test_an_invalid_patch_id_parks_the_workflow() -> None:
    async def bad(ctx: WorkflowContext, _: Any) -> Any:
        ctx.patched("")
        await ctx.activity("p.x", 1)

    run = _run(bad)
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    assert run.record is not None and run.record.failure is not None
    assert "patch id" in run.record.failure.message


def test_a_patch_asked_at_another_point_than_recorded_is_nondeterminism() -> None:
    async def moved(ctx: WorkflowContext, order: Any) -> Any:
        await ctx.activity("inventory.reserve", order)
        await ctx.activity("fraud.check", order)
        ctx.patched(PATCH)  # now after the check: history has it before
        await ctx.activity("payment.charge", order)

    run = _run(_patched)
    run.complete(0)
    _deploy(run, moved)
    run.complete(1)
    assert_status(run.record, WorkflowStatus.STUCK, NONDETERMINISM)
    assert run.record is not None and run.record.failure is not None
    assert "patch 'fraud-check' went on after step 0" in run.record.failure.message


def test_a_signal_wait_after_the_patch_point_decides_by_recorded_commands() -> None:
    # No command after the point: the run takes the new path even though the old code
    # passed it (waiting on the second signal), since nothing it recorded depends on it
    # and the state between is rebuilt by every replay.
    async def old(ctx: WorkflowContext, _: Any) -> Any:
        first = await ctx.wait_signal("go")
        second = await ctx.wait_signal("go")
        return [first, second, "old"]

    async def new(ctx: WorkflowContext, _: Any) -> Any:
        first = await ctx.wait_signal("go")
        tag = "new" if ctx.patched("tag") else "old"
        second = await ctx.wait_signal("go")
        return [first, second, tag]

    run = _run(old)
    run.send(SignalWorkflow(run.workflow_id, "go", encode_json(1), "s1", run.now_ms))
    _deploy(run, new)
    run.send(SignalWorkflow(run.workflow_id, "go", encode_json(2), "s2", run.now_ms))
    assert _result(run) == [1, 2, "new"]


def test_a_patch_stays_off_where_an_outcome_recorded_before_the_input_is_pending() -> None:
    # The old code took s1 and s2 in earlier inputs and waits on "late"; the patch sits
    # between the two signals, so the old code passed it with s2 still to come then:
    # the new code must see the point as passed (off), or it would diverge.
    async def old(ctx: WorkflowContext, _: Any) -> Any:
        first = await ctx.wait_signal("go")
        await ctx.activity("p.after_first", first)
        second = await ctx.wait_signal("go")
        await ctx.activity("p.after_second", second)
        return await ctx.wait_signal("late")

    async def new(ctx: WorkflowContext, _: Any) -> Any:
        first = await ctx.wait_signal("go")
        if ctx.patched("extra"):
            await ctx.activity("p.extra", first)
        await ctx.activity("p.after_first", first)
        second = await ctx.wait_signal("go")
        await ctx.activity("p.after_second", second)
        return await ctx.wait_signal("late")

    run = _run(old)
    run.send(SignalWorkflow(run.workflow_id, "go", encode_json(1), "s1", run.now_ms))
    run.complete(0)
    run.send(SignalWorkflow(run.workflow_id, "go", encode_json(2), "s2", run.now_ms))
    _deploy(run, new)
    run.complete(1)
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert not any(isinstance(e, PatchMarker) for e in run.record.events)  # type: ignore[union-attr]


# --- deploy 2: ctx.deprecate_patch --------------------------------------------------------


def test_runs_of_deploy_one_finish_under_deploy_two() -> None:
    run = _run(_patched)
    run.complete(0)
    run.complete(1)  # past the check, waiting on the charge
    _deploy(run, _deprecated)
    run.complete(2, "ch-5")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert _result(run) == {"charge": "ch-5", "checked": True}


def test_deploy_two_records_a_deprecated_patch_that_deploy_one_code_replays() -> None:
    # A rolling deploy: a run started by deploy 2 may next be handled by deploy 1's code.
    run = _run(_deprecated)
    run.complete(0)
    assert_history(
        run.record,
        [
            "sched 0#1 inventory.reserve",
            "done 0#1",
            "patch fraud-check@1 deprecated",
            "sched 1#1 fraud.check",
        ],
    )
    assert _replays_cleanly(run.record, _patched)
    _deploy(run, _patched)
    run.complete(1)
    run.complete(2, "ch-6")
    assert _result(run) == {"charge": "ch-6", "checked": True}


def test_deploy_two_too_early_strands_runs_that_took_the_old_path() -> None:
    # Why deploy 2 waits until no run that took the old path is open (the gate says).
    run = _run(_before)
    run.complete(0)
    _deploy(run, _patched)  # the run keeps the old path under deploy 1
    assert _replays_cleanly(run.record, _patched)
    assert not _replays_cleanly(run.record, _deprecated)


# --- deploy 3: the call removed -------------------------------------------------------------


def test_deploy_three_replays_histories_that_recorded_the_patch() -> None:
    for fn in (_patched, _deprecated):
        run = _run(fn, workflow_id=f"order-{fn.__name__}")
        run.complete(0)
        run.complete(1)
        _deploy(run, _clean)
        run.complete(2, "ch-7")
        assert_status(run.record, WorkflowStatus.COMPLETED)
        assert _result(run) == {"charge": "ch-7", "checked": True}


def test_rolling_back_to_the_code_before_the_change_is_caught() -> None:
    run = _run(_patched)
    run.complete(0)
    assert not _replays_cleanly(run.record, _before)
    _deploy(run, _before)
    run.complete(1)
    assert_status(run.record, WorkflowStatus.STUCK, NONDETERMINISM)
