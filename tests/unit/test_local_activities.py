"""Local activities without a broker: the registry and context API, the runner's timeout
and failure handling, and workflows run by the WorkflowTester."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from examples.order_saga.harness import make_orders
from examples.order_saga.workflows import registry as orders
from orchestrator import RetryPolicy, WorkflowContext, WorkflowRegistry
from orchestrator.errors import ConfigurationError
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import ActivityStatus, ActivityTask, WorkflowStatus
from orchestrator.runtime.local import NO_DATABASE, LocalRunner, NoDatabaseError, is_local
from orchestrator.testing import WorkflowTester
from participants import ActivityContext, Participant


def _task(activity: str, value: Any = None, **fields: Any) -> ActivityTask:
    return ActivityTask(
        workflow_id="w",
        workflow_type="t",
        activity_id=f"w/r/0/{fields.get('attempt', 1)}",
        seq=0,
        attempt=fields.pop("attempt", 1),
        participant="local",
        activity=activity,
        payload=encode_json(value),
        scheduled_at_ms=0,
        **fields,
    )


def test_the_order_saga_with_local_steps_completes_and_compensates() -> None:
    tester = WorkflowTester(orders)
    good, declined = make_orders(10)[0], make_orders(10)[9]
    run = tester.run("order.local", good)
    assert run.status is WorkflowStatus.COMPLETED
    assert run.result == {
        "charge_id": f"c-{good['order_id']}",
        "shipment_id": f"s-{good['order_id']}",
    }
    assert [c.name for c in run.calls] == ["local.reserve", "local.charge", "local.ship"]
    run = tester.run("order.local", declined)
    assert run.status is WorkflowStatus.COMPENSATED
    assert [(c.name, c.outcome) for c in run.calls] == [
        ("local.reserve", "returns"),
        ("local.charge", "fails"),  # CardDeclined is not retryable: one attempt
        ("local.release", "returns"),
    ]


def test_a_script_replaces_a_local_handler_in_the_tester() -> None:
    tester = WorkflowTester(orders)
    tester.activity("local.charge").fails("Timeout", "the bank is slow", times=2)
    tester.activity("local.charge").returns({"charge_id": "scripted"})
    run = tester.run("order.local", make_orders(1)[0])
    assert run.status is WorkflowStatus.COMPLETED
    assert run.result["charge_id"] == "scripted"


def test_a_failing_local_step_is_retried_on_durable_timers() -> None:
    registry = WorkflowRegistry()
    seen: list[int] = []

    @registry.local_activity("flaky")
    def flaky(value: Any, *, ctx: ActivityContext) -> int:
        seen.append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError("not yet")
        return ctx.attempt

    @registry.workflow("w")
    async def workflow(ctx: WorkflowContext, _: Any) -> int:
        result: int = await ctx.local_activity(
            "flaky", retry=RetryPolicy(max_attempts=3, initial_interval=2)
        )
        return result

    run = WorkflowTester(registry).run("w")
    assert run.status is WorkflowStatus.COMPLETED and run.result == 3
    assert seen == [1, 2, 3]
    # Two backoffs, 2 s then 4 s, on the virtual clock: the loop never slept through them.
    assert run.elapsed == pytest.approx(6.0)


def test_local_activity_names_are_checked_where_given() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("w")
    async def workflow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.local_activity(42)  # type: ignore[arg-type]

    run = WorkflowTester(registry).run("w")
    assert run.status is WorkflowStatus.STUCK
    assert run.failure is not None and "local activity name must be a str" in run.failure.message

    @registry.local_activity("x")
    def x(value: Any, *, ctx: ActivityContext) -> None:
        return None

    with pytest.raises(ConfigurationError, match="registered twice"):
        registry.local_activity("x")
    with pytest.raises(ConfigurationError, match="activity name"):
        registry.local_activity("bad name")


def test_local_is_a_reserved_participant_name() -> None:
    with pytest.raises(ConfigurationError, match="reserved"):
        Participant("local")
    assert WorkflowRegistry().local_activities.name == "local"


def test_ctx_db_of_a_local_activity_says_there_is_none() -> None:
    with pytest.raises(NoDatabaseError, match=r"no ctx\.db"):
        NO_DATABASE.execute("SELECT 1")


def test_the_runner_answers_an_attempt_with_its_outcome() -> None:
    local = Participant.in_orchestrator()

    @local.activity("double")
    def double(value: int, *, ctx: ActivityContext) -> int:
        return value * 2

    @local.activity("bad")
    def bad(value: Any, *, ctx: ActivityContext) -> None:
        raise KeyError("missing")

    runner = LocalRunner(local)
    try:
        result = runner.run(_task("double", 21))
        assert result.status is ActivityStatus.COMPLETED and result.result is not None
        assert decode_json(result.result) == 42
        assert (result.workflow_id, result.activity_id, result.seq) == ("w", "w/r/0/1", 0)
        failed = runner.run(_task("bad"))
        assert failed.status is ActivityStatus.FAILED and failed.failure is not None
        assert failed.failure.error_type == "KeyError" and failed.failure.retryable
        unknown = runner.run(_task("nope"))
        assert unknown.failure is not None and unknown.failure.error_type == "UnknownActivity"
    finally:
        runner.close()


def test_a_hung_local_handler_is_written_off_and_the_next_attempt_runs(tmp_path: Path) -> None:
    local = Participant.in_orchestrator()
    release = tmp_path / "release"

    @local.activity("hang")
    def hang(value: Any, *, ctx: ActivityContext) -> str:
        if ctx.attempt == 1:
            while not release.exists():  # hangs until the test ends
                time.sleep(0.01)
        return "ran"

    runner = LocalRunner(local, timeout_s=0.05)
    try:
        first = runner.run(_task("hang"))
        assert first.failure is not None
        assert first.failure.error_type == "StartToCloseTimeout" and first.failure.retryable
        second = runner.run(_task("hang", attempt=2))
        assert second.status is ActivityStatus.COMPLETED
    finally:
        release.touch()
        runner.close()


def test_is_local() -> None:
    assert is_local(_task("x"))
    remote = _task("x")
    assert not is_local(ActivityTask(**{**_fields(remote), "participant": "payment"}))


def _fields(task: ActivityTask) -> dict[str, Any]:
    return {name: getattr(task, name) for name in task.__dataclass_fields__}


def test_an_inline_local_activity_runs_on_the_callers_thread() -> None:
    registry = WorkflowRegistry()
    threads: list[str] = []

    @registry.local_activity("here", inline=True)
    def here(value: Any, *, ctx: ActivityContext) -> str:
        threads.append(threading.current_thread().name)
        return "here"

    @registry.local_activity("there")
    def there(value: Any, *, ctx: ActivityContext) -> str:
        threads.append(threading.current_thread().name)
        return "there"

    assert registry.inline_local_activities == {"here"}
    runner = LocalRunner(registry.local_activities, inline=registry.inline_local_activities)
    try:
        assert runner.run(_task("here")).status is ActivityStatus.COMPLETED
        assert runner.run(_task("there")).status is ActivityStatus.COMPLETED
    finally:
        runner.close()
    assert threads[0] == threading.current_thread().name
    assert threads[1].startswith("sagaline-local")
    with pytest.raises(ConfigurationError, match="takes a bool"):
        registry.local_activity("again", inline=1)  # type: ignore[arg-type]


def test_a_scripted_local_step_answers_when_its_script_says() -> None:
    tester = WorkflowTester(orders)
    tester.activity("local.ship").returns({"shipment_id": "later"}, after=30)
    run = tester.run("order.local", make_orders(1)[0])
    assert run.status is WorkflowStatus.COMPLETED
    assert run.result["shipment_id"] == "later"
    assert run.elapsed == pytest.approx(30.0)


def test_the_tester_runs_a_local_step_only_while_the_workflow_waits_for_it() -> None:
    registry = WorkflowRegistry()
    ran: list[str] = []

    @registry.local_activity("check", inline=True)
    def check(value: Any, *, ctx: ActivityContext) -> None:
        ran.append("check")
        raise ValueError("refused")

    @registry.local_activity("charge", inline=True)
    def charge(value: Any, *, ctx: ActivityContext) -> None:
        ran.append("charge")

    @registry.workflow("w")
    async def workflow(ctx: WorkflowContext, _: Any) -> Any:
        once = RetryPolicy(max_attempts=1)
        first = ctx.local_activity("check", retry=once)
        second = ctx.local_activity("charge", retry=once)
        await first  # raises: the workflow fails with the second step still unsettled
        return await second

    run = WorkflowTester(registry).run("w")
    assert run.status is WorkflowStatus.FAILED
    # As in the orchestrator: the first outcome closed the run before the second ran.
    assert ran == ["check"]
