"""Whatever workflow code does, the engine returns a record that encodes (issue 10, item 1).

The rule under test: an ordinary ``Exception`` out of the workflow function fails the
workflow; what shows the code is wrong parks it ``STUCK`` with a clear reason; whatever
``finally`` and ``except`` blocks do while the engine closes a suspended coroutine is
ignored. Every case also runs a healthy workflow afterwards through the same engine, as
the next workflow on the same partition would be.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from examples.order_saga.workflows import process_order
from orchestrator import (
    ActivityError,
    ConfigurationError,
    RetryPolicy,
    Saga,
    WorkflowContext,
    WorkflowRegistry,
)
from orchestrator.errors import WorkflowDefinitionError
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import Payload, WorkflowStatus
from orchestrator.replay.driver import _CLOSE_ATTEMPTS, _UNSTOPPABLE, ReplayCache
from tests.unit.conftest import (
    WorkflowRun,
    assert_encodable,
    assert_history,
    assert_status,
    completed,
    unstoppable_flow,
)

Flow = Callable[[WorkflowContext, Any], Coroutine[Any, Any, Any]]
ORDER = {"order_id": "o-1", "items": ["tea"], "total": 100, "card": "tok", "address": "x"}


def _run(
    flow: Flow, value: Any = None, *, run_id: str = "r1", cache: ReplayCache | None = None
) -> WorkflowRun:
    registry = WorkflowRegistry()
    if cache is not None:
        registry.replay_cache = cache
    registry.workflow("t.flow")(flow)
    run = WorkflowRun(registry, "t.flow", workflow_id="bad-1", run_id=run_id)
    run.start(value)
    return run


def _a_healthy_workflow_still_completes() -> None:
    registry = WorkflowRegistry()
    registry.workflow("order.process")(process_order)
    run = WorkflowRun(registry, "order.process", workflow_id="good-1", run_id="g")
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r"})
    run.complete(1, {"charge_id": "c"})
    run.complete(2, {"shipment_id": "s"})
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert asyncio.events._get_running_loop() is None, "the engine left a running loop"


def _stuck(run: WorkflowRun, *fragments: str) -> str:
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    assert record.failure is not None
    for fragment in fragments:
        assert fragment in record.failure.message, (
            f"workflow {run.workflow_id}: {record.failure.message!r} lacks {fragment!r}"
        )
    assert run.tasks() == [] and record.closed_at_ms is None
    _a_healthy_workflow_still_completes()
    return record.failure.message


# --- BaseExceptions that are not Exceptions park the workflow ------------------------


def _raiser(exc: BaseException) -> Flow:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.first")
        raise exc

    return flow


@pytest.mark.parametrize(
    ("exc", "shown"),
    [
        (asyncio.CancelledError(), "CancelledError,"),
        (SystemExit(3), "SystemExit: 3"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
        (GeneratorExit(), "GeneratorExit"),
    ],
    ids=["CancelledError", "SystemExit", "KeyboardInterrupt", "GeneratorExit"],
)
def test_a_base_exception_from_the_code_parks_the_workflow(exc: BaseException, shown: str) -> None:
    run = _run(_raiser(exc))
    run.complete(0, "ok")
    _stuck(run, shown, "not an Exception")
    # The result that arrived is kept, so a fixed deploy can use it.
    assert_history(run.record, ["sched 0#1 p.first", "done 0#1"])


def test_a_bare_except_that_re_raises_a_cancellation_parks_the_workflow() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.activity("p.first")
            raise asyncio.CancelledError
        except:
            raise

    run = _run(flow)
    run.complete(0, "ok")
    _stuck(run, "CancelledError")


def test_catching_the_base_exception_and_returning_completes() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.activity("p.first")
            raise SystemExit(1)
        except BaseException:
            return "recovered"

    run = _run(flow)
    run.complete(0, "ok")
    assert_status(assert_encodable(run.record), WorkflowStatus.COMPLETED)


# --- closing a suspended coroutine -----------------------------------------------------


def test_a_bare_except_swallowing_generator_exit_once_is_closed_again() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            first = await ctx.activity("p.first")
        except:  # noqa: E722 - swallows the GeneratorExit of the close
            first = "swallowed"
        return [first, await ctx.activity("p.second")]

    run = _run(flow)
    assert run.tasks() == ["bad-1/r1/0/1 p.first"]
    assert_status(assert_encodable(run.record), WorkflowStatus.RUNNING)
    run.complete(0, "A")
    assert run.tasks() == ["bad-1/r1/1/1 p.second"]
    run.complete(1, "B")
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.COMPLETED)
    assert record.result is not None and decode_json(record.result) == ["A", "B"]
    _a_healthy_workflow_still_completes()


def test_code_that_does_not_stop_when_closed_parks_the_workflow() -> None:
    flow, swallowed = unstoppable_flow()
    # Without the replay cache, every replay closes the coroutine at its end.
    run = _run(flow, cache=ReplayCache(0))
    _stuck(run, "GeneratorExit", "keeps running")
    assert_history(run.record, [])
    # The engine keeps such a coroutine referenced, so the garbage collector does not
    # run its code in the middle of another replay.
    zombie = _UNSTOPPABLE.pop()
    assert swallowed == [_CLOSE_ATTEMPTS] and zombie.cr_frame is not None  # type: ignore[attr-defined]
    zombie.close()
    assert zombie.cr_frame is None  # type: ignore[attr-defined]


def test_a_kept_coroutine_that_does_not_stop_when_closed_parks_the_workflow_next() -> None:
    flow, swallowed = unstoppable_flow()
    cache = ReplayCache(10, check=False)
    run = _run(flow, cache=cache)
    # Kept waiting, the coroutine is not closed: nothing shows the code is wrong yet.
    assert run.tasks() == ["bad-1/r1/0/1 p.poll"]
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert len(cache) == 1
    # Closed when the cache gives it up (evicted, or its partitions revoked), it keeps
    # running: the run's next replay parks it, as a replay that closed it would have.
    cache.clear()
    assert swallowed == [_CLOSE_ATTEMPTS] and len(cache) == 0
    zombie = _UNSTOPPABLE.pop()
    run.complete(0, "polled")
    _stuck(run, "GeneratorExit", "keeps running")
    zombie.close()


@pytest.mark.parametrize(
    "cleanup",
    ["raise", "base", "asyncio", "bad-name", "await"],
)
def test_whatever_a_finally_block_does_while_closing_is_ignored(cleanup: str) -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("p.work")
        finally:
            if cleanup == "raise":
                raise ValueError("finally raised")
            if cleanup == "base":
                raise SystemExit("finally exited")
            if cleanup == "asyncio":
                await asyncio.sleep(1)
            if cleanup == "bad-name":
                ctx.activity("no-dot")
            if cleanup == "await":
                await ctx.activity("p.cleanup")

    run = _run(flow)
    assert_status(assert_encodable(run.record), WorkflowStatus.RUNNING)
    assert run.tasks() == ["bad-1/r1/0/1 p.work"]
    _a_healthy_workflow_still_completes()


def test_a_finally_that_raises_when_the_code_gets_there_fails_the_workflow() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("p.work")
        finally:
            raise LookupError("cleanup failed")

    run = _run(flow)
    run.complete(0, "done")
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.FAILED, "LookupError")
    assert record.failure is not None and record.failure.message == "cleanup failed"


# --- text that cannot be written as it is ----------------------------------------------


class _StrRaisesError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class _StrNotTextError(Exception):
    def __str__(self) -> Any:
        return 42  # noqa: PLE0307 - the point of the test


@pytest.mark.parametrize("error", [_StrRaisesError, _StrNotTextError])
def test_an_exception_without_printable_text_fails_the_workflow(error: type[Exception]) -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.work")
        raise error()

    run = _run(flow)
    run.complete(0, None)
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.FAILED, error.__name__)
    assert (
        record.failure is not None and record.failure.message == f"<unprintable {error.__name__}>"
    )


def test_a_lone_surrogate_from_json_input_in_an_error_message_is_escaped() -> None:
    async def flow(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
        raise ValueError(f"bad note {order['note']} \x00 end")

    registry = WorkflowRegistry()
    registry.workflow("t.flow")(flow)
    run = WorkflowRun(registry, "t.flow", workflow_id="bad-2")
    # The input arrives as JSON text with a \ud800 escape, as a client may send it.
    run.start(input_payload=Payload(b'{"note": "\\ud800"}'))
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.FAILED, "ValueError")
    assert record.failure is not None
    assert record.failure.message == "bad note \\ud800 \\x00 end"


def test_a_lone_surrogate_in_an_activity_name_parks_the_workflow() -> None:
    async def flow(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
        return await ctx.activity(f"p.{order['note']}")

    run = _run(flow, {"note": "\ud800"})
    message = _stuck(run, "ctx.activity('p.\\ud800')", "activity part")
    assert "\ud800" not in message


def test_a_lone_surrogate_in_a_participant_failure_is_escaped() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.work", retry=RetryPolicy(max_attempts=1))

    run = _run(flow)
    run.fail(0, "Boom\ud800", message="text \ud800 from a participant")
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.FAILED, "ActivityError")
    assert record.failure is not None and "Boom\\ud800" in record.failure.message
    assert "text \\ud800 from a participant" in record.failure.message


def test_a_lone_surrogate_in_a_non_retryable_error_type_parks_the_workflow() -> None:
    async def flow(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
        retry = RetryPolicy(non_retryable_error_types=(order["note"],))
        return await ctx.activity("p.work", retry=retry)

    run = _run(flow, {"note": "Declined\ud800"})
    _stuck(run, "ConfigurationError", "Declined\\ud800")


# --- names and arguments: the code is wrong, park it ---------------------------------


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        (42, "must be a str, got int"),
        (None, "must be a str, got NoneType"),
        ("nodot", "'<participant>.<activity>'"),
        ("two.dots.ok", None),
        ("bad participant.work", "participant part"),
        ("p.", "activity part"),
        ("p" * 101 + ".work", "participant part"),
    ],
)
def test_an_activity_name_is_checked_where_it_is_given(name: Any, fragment: str | None) -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity(name)

    run = _run(flow)
    if fragment is None:
        assert run.tasks() == ["bad-1/r1/0/1 two.dots.ok"]
        return
    _stuck(run, fragment)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda ctx: ctx.activity("p.a", retry=3), "takes a RetryPolicy or None, got int"),
        (lambda ctx: ctx.activity("p.a", compensation="yes"), "compensation=...) takes a bool"),
        (lambda ctx: ctx.gather(ctx.activity("p.a"), "p.b"), "ctx.gather takes handles"),
        (lambda ctx: Saga(ctx, parallel=1), "Saga(parallel=...) takes a bool"),  # type: ignore[arg-type]
        (lambda ctx: Saga(ctx, retry=(3,)), "Saga(retry=...) takes a RetryPolicy"),  # type: ignore[arg-type]
        (lambda ctx: Saga(ctx).add_compensation("undo"), "Saga.add_compensation('undo')"),
    ],
    ids=["retry", "compensation", "gather", "saga-parallel", "saga-retry", "saga-name"],
)
def test_a_context_call_with_invalid_arguments_parks_even_if_caught(
    call: Callable[[WorkflowContext], Any], fragment: str
) -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.first")
        try:
            call(ctx)
        except ConfigurationError:
            return "caught and carried on"
        return "no error"

    run = _run(flow)
    run.complete(0, "ok")
    _stuck(run, fragment)
    assert_history(run.record, ["sched 0#1 p.first", "done 0#1"])


@pytest.mark.parametrize(
    "error",
    [ConfigurationError("bad setting"), WorkflowDefinitionError("bad definition")],
    ids=["ConfigurationError", "WorkflowDefinitionError"],
)
def test_sagalines_own_definition_errors_out_of_the_code_park_it(error: Exception) -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        raise error

    _stuck(_run(flow), type(error).__name__, str(error))


def test_a_workflow_function_that_cannot_be_called_parks_the_workflow() -> None:
    async def one_argument(ctx: WorkflowContext) -> Any:
        return None

    registry = WorkflowRegistry()
    # Registered behind the registry's back, as a wrapper could hide the signature.
    registry._functions["t.flow"] = one_argument  # type: ignore[assignment]
    run = WorkflowRun(registry, "t.flow", workflow_id="bad-3")
    run.start()
    _stuck(run, "calling the workflow function failed", "TypeError")


def test_a_workflow_function_that_returns_no_coroutine_parks_the_workflow() -> None:
    def not_async(ctx: WorkflowContext, _: Any) -> Any:
        return "a value"

    registry = WorkflowRegistry()
    registry._functions["t.flow"] = not_async
    run = WorkflowRun(registry, "t.flow", workflow_id="bad-4")
    run.start()
    _stuck(run, "returned str, not a coroutine")


# --- values that are not JSON ---------------------------------------------------------


def _deep(levels: int) -> Any:
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


def test_a_return_value_nested_past_the_recursion_limit_fails_the_workflow() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return _deep(100_000)

    record = assert_encodable(_run(flow).record)
    assert_status(record, WorkflowStatus.FAILED, "InvalidResult")
    assert record.failure is not None and "nested too deeply" in record.failure.message


def test_an_activity_value_nested_past_the_recursion_limit_fails_at_its_await() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.work", _deep(100_000))

    record = assert_encodable(_run(flow).record)
    assert_status(record, WorkflowStatus.FAILED, "PayloadEncodingError")


def test_an_input_nested_past_the_recursion_limit_fails_the_workflow() -> None:
    async def flow(ctx: WorkflowContext, value: Any) -> Any:
        return value

    registry = WorkflowRegistry()
    registry.workflow("t.flow")(flow)
    run = WorkflowRun(registry, "t.flow", workflow_id="bad-5")
    run.start(input_payload=Payload(b"[" * 200_000 + b"]" * 200_000))
    assert_status(assert_encodable(run.record), WorkflowStatus.FAILED, "InvalidInput")


def test_a_result_payload_that_is_not_json_fails_at_the_await() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("p.work")
        except ActivityError:
            return "not reached: this is not an activity failure"

    run = _run(flow)
    run.send(completed("bad-1", 0, 1, None, run.now_ms, result=Payload(b"\xff"), run_id="r1"))
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.FAILED, "PayloadEncodingError")


def test_a_parked_keeps_running_workflow_stays_parked_on_an_instance_that_never_saw_it() -> None:
    refusing = [True]

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        while True:
            try:
                await ctx.activity("p.poll")
            except GeneratorExit:
                if not refusing[0]:
                    raise

    cache = ReplayCache(10, check=False)
    run = _run(flow, cache=cache)
    cache.clear()  # evicted: it would not stop
    run.complete(0, "polled")
    _stuck(run, "keeps running")
    # A restart, or the partition's new owner: a cache that knows nothing of the refusal.
    # Re-driving replays without the cache, closes the coroutine, and finds it again.
    run.registry.replay_cache = ReplayCache(10, check=False)
    assert run.resume().ignored == "still-stuck"
    assert len(run.registry.replay_cache) == 0
    refusing[0] = False
    while _UNSTOPPABLE:
        _UNSTOPPABLE.pop().close()
