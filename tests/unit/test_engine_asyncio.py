"""Asyncio in workflow code is caught and named, with no loop, task or warning (item 9).

Each workflow makes one asyncio call on a line marked ``# <- misuse`` and tries to hide
it (``except Exception``, or a bare ``except``). The workflow must be parked ``STUCK``
with a message naming the call and that line; afterwards no event loop may exist (not
the running one, not the policy's), no asyncio future or task may have been made, and a
garbage collection may not warn about a coroutine that was never awaited.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import types
import warnings
from collections.abc import Callable, Coroutine, Generator, Iterator
from typing import Any

import pytest

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.protocol.records import WorkflowStatus
from tests.unit.conftest import WorkflowRun, assert_encodable, assert_history, assert_status

Flow = Callable[[WorkflowContext, Any], Coroutine[Any, Any, Any]]


async def _fetch(value: Any) -> Any:
    """A coroutine a workflow author might hand to asyncio."""
    await asyncio.sleep(0.01)
    return value


async def _helper(ctx: WorkflowContext) -> Any:
    await asyncio.sleep(0)  # <- misuse
    return await ctx.activity("p.after")


@types.coroutine
def _bare_yield() -> Generator[None, None, None]:
    yield


class _Ticker:
    """A third-party awaitable whose ``__await__`` is not a generator."""

    def __await__(self) -> Iterator[str]:
        return iter(["tick"])


async def w_sleep_0(ctx: WorkflowContext, _: Any) -> Any:
    try:
        await asyncio.sleep(0)  # <- misuse
    except Exception:
        return "hidden"


async def w_sleep_1(ctx: WorkflowContext, _: Any) -> Any:
    try:
        await asyncio.sleep(1)  # <- misuse
    except Exception:
        return "hidden"


async def w_gather_coroutines(ctx: WorkflowContext, _: Any) -> Any:
    try:
        return await asyncio.gather(_fetch(1), _fetch(2))  # <- misuse
    except Exception:
        return "hidden"


async def w_gather_handles(ctx: WorkflowContext, _: Any) -> Any:
    try:
        return await asyncio.gather(ctx.activity("p.a"), ctx.activity("p.b"))  # <- misuse
    except:  # noqa: E722 - even a bare except cannot hide it
        return "hidden"


async def w_wait_for(ctx: WorkflowContext, _: Any) -> Any:
    try:
        return await asyncio.wait_for(_fetch(1), timeout=5)  # <- misuse
    except Exception:
        return "hidden"


async def w_wait_for_now(ctx: WorkflowContext, _: Any) -> Any:
    try:
        return await asyncio.wait_for(_fetch(1), timeout=0)  # <- misuse
    except Exception:
        return "hidden"


async def w_event_wait(ctx: WorkflowContext, _: Any) -> Any:
    try:
        return await asyncio.Event().wait()  # <- misuse
    except Exception:
        return "hidden"


async def w_create_task(ctx: WorkflowContext, _: Any) -> Any:
    try:
        task = asyncio.create_task(_fetch(1))  # <- misuse
        return task.result()
    except BaseException:
        return "hidden"


async def w_loop_method(ctx: WorkflowContext, _: Any) -> Any:
    loop = asyncio.get_running_loop()
    try:
        loop.call_soon(print)  # <- misuse
    except BaseException:
        return "hidden"


async def w_run(ctx: WorkflowContext, _: Any) -> Any:
    return asyncio.run(_fetch(1))  # <- misuse


async def w_timeout(ctx: WorkflowContext, _: Any) -> Any:
    async with asyncio.timeout(1):  # <- misuse
        return await ctx.activity("p.a")


async def w_helper(ctx: WorkflowContext, _: Any) -> Any:
    return await _helper(ctx)


async def w_bare_yield(ctx: WorkflowContext, _: Any) -> Any:
    await _bare_yield()  # <- misuse


async def w_foreign(ctx: WorkflowContext, _: Any) -> Any:
    await _Ticker()  # type: ignore[misc]  # <- misuse


CASES: dict[str, tuple[Flow, str, Callable[..., Any]]] = {
    "sleep-0": (w_sleep_0, "asyncio.sleep", w_sleep_0),
    "sleep-1": (w_sleep_1, "asyncio.sleep", w_sleep_1),
    "gather-coroutines": (w_gather_coroutines, "asyncio.gather", w_gather_coroutines),
    "gather-handles": (w_gather_handles, "asyncio.gather", w_gather_handles),
    "wait_for": (w_wait_for, "asyncio.wait_for", w_wait_for),
    "wait_for-0": (w_wait_for_now, "asyncio.wait_for", w_wait_for_now),
    "Event.wait": (w_event_wait, "asyncio.Event.wait", w_event_wait),
    "create_task": (w_create_task, "asyncio.create_task", w_create_task),
    "loop-method": (w_loop_method, "the event loop's call_soon()", w_loop_method),
    "asyncio.run": (w_run, "asyncio.run", w_run),
    "asyncio.timeout": (w_timeout, "asyncio.timeout", w_timeout),
    "in-a-helper": (w_helper, "asyncio.sleep", _helper),
    "bare-yield": (w_bare_yield, "_bare_yield", w_bare_yield),
    "foreign-awaitable": (w_foreign, "builtins.list_iterator", w_foreign),
}


def _misuse_site(fn: Callable[..., Any]) -> str:
    """``file.py:line in qualname`` of the line marked ``# <- misuse`` in ``fn``."""
    code = inspect.unwrap(fn)
    lines, first = inspect.getsourcelines(code)
    offset = next(i for i, line in enumerate(lines) if "# <- misuse" in line)
    return f"test_engine_asyncio.py:{first + offset} in {code.__qualname__}"


def _futures() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, asyncio.Future))


@pytest.mark.parametrize("case", list(CASES))
def test_asyncio_in_a_workflow_is_parked_naming_the_call_and_the_line(case: str) -> None:
    flow, call, where = CASES[case]
    registry = WorkflowRegistry()
    registry.workflow("t.asyncio")(flow)
    policy = asyncio.get_event_loop_policy()
    policy_loop = policy._local._loop  # type: ignore[attr-defined]
    futures = _futures()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = WorkflowRun(registry, "t.asyncio", workflow_id=f"aio-{case}")
        run.start()
        gc.collect()

    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    assert record.failure is not None
    message = record.failure.message
    assert call in message, f"workflow aio-{case}: {message!r} does not name {call!r}"
    assert _misuse_site(where) in message, f"workflow aio-{case}: {message!r}"
    assert "await only what ctx hands out" in message
    assert run.tasks() == [] and record.events == ()

    assert asyncio.events._get_running_loop() is None, "a running loop was left behind"
    assert policy._local._loop is policy_loop, "the policy created an event loop"  # type: ignore[attr-defined]
    assert _futures() == futures, "an asyncio future or task was made"
    assert [str(w.message) for w in caught] == [], f"workflow aio-{case} left warnings"


def test_the_message_is_the_same_on_every_replay() -> None:
    """Resuming a still-broken workflow must write nothing: the reason must not vary."""
    registry = WorkflowRegistry()
    registry.workflow("t.asyncio")(w_gather_coroutines)
    run = WorkflowRun(registry, "t.asyncio", workflow_id="aio-again")
    run.start()
    before = run.record
    assert run.resume().ignored == "still-stuck"
    assert run.record is before


def test_asyncio_between_steps_keeps_the_result_that_arrived() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        first = await ctx.activity("p.first")
        await asyncio.sleep(0.5)
        return await ctx.activity("p.second", first)

    registry = WorkflowRegistry()
    registry.workflow("t.asyncio")(flow)
    run = WorkflowRun(registry, "t.asyncio", workflow_id="aio-between")
    run.start()
    assert run.tasks() == ["aio-between/0/1 p.first"]
    run.complete(0, "A")
    assert_status(assert_encodable(run.record), WorkflowStatus.STUCK, "WorkflowDefinitionError")
    assert_history(run.record, ["sched 0#1 p.first", "done 0#1"])
    assert run.tasks() == []


def test_the_engine_restores_a_loop_that_was_running_around_it() -> None:
    """An engine called from inside an event loop leaves that loop running."""
    registry = WorkflowRegistry()
    registry.workflow("t.asyncio")(w_sleep_1)

    async def main() -> WorkflowStatus:
        run = WorkflowRun(registry, "t.asyncio", workflow_id="aio-nested")
        run.start()
        assert asyncio.get_running_loop() is loop
        return run.status

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(main()) is WorkflowStatus.STUCK
    finally:
        loop.close()
