"""``ctx.uuid4()`` and ``ctx.random()`` give the same values on every replay of a run."""

from __future__ import annotations

import uuid
from typing import Any

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import WorkflowStatus
from tests.unit.conftest import WorkflowRun, assert_status


async def _ids(ctx: WorkflowContext, _: Any) -> Any:
    key, draw = ctx.uuid4(), ctx.random()
    await ctx.activity("p.charge", {"idempotency_key": str(key), "draw": draw})
    later = ctx.uuid4()
    await ctx.activity("p.log", str(later))
    return [str(key), draw, str(later)]


def _run(run_id: str) -> WorkflowRun:
    registry = WorkflowRegistry()
    registry.workflow("t")(_ids)
    run = WorkflowRun(registry, "t", run_id=run_id)
    run.start({})
    run.complete(0, "charged")
    run.complete(1, "logged")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    return run


def test_values_are_the_same_on_every_replay_of_a_run() -> None:
    run = _run("r" * 32)
    assert run.record is not None and run.record.result is not None
    key, draw, later = decode_json(run.record.result)
    # The first task was built on the first run of the code, the result on the third.
    first_task, second_task = run.sent
    assert decode_json(first_task.payload) == {"idempotency_key": key, "draw": draw}
    assert decode_json(second_task.payload) == later
    assert uuid.UUID(key).version == 4 and uuid.UUID(later).version == 4
    assert key != later and 0.0 <= draw < 1.0


def test_another_run_gets_other_values_and_the_same_run_the_same() -> None:
    one, same, other = _run("a" * 32), _run("a" * 32), _run("b" * 32)
    assert one.record is not None and same.record is not None and other.record is not None
    assert one.record.result == same.record.result
    assert one.record.result != other.record.result
