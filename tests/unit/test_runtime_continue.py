"""Continue-as-new through the orchestrator shell without a broker: the closed run goes
to history before the next run, and a next run that cannot start leaves the run as it
was, parked, instead of losing the workflow."""

from __future__ import annotations

from typing import Any

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    ResumeWorkflow,
    SignalWorkflow,
    StartWorkflow,
    WorkflowStatus,
)
from orchestrator.runtime.inputs import Batch
from tests.unit.conftest import T0, assert_status
from tests.unit.test_runtime_requests import MISSING_TOPIC, WID, _Shell


async def _relay(ctx: WorkflowContext, state: Any) -> Any:
    """Waits for ``go``; the first run continues into a run whose first step is for
    participant ``q`` (no tasks topic until a test creates it)."""
    if state == "second":
        return await ctx.activity("q.work")
    await ctx.wait_signal("go")
    ctx.continue_as_new("second")


def _shell() -> _Shell:
    shell = _Shell()
    registry = WorkflowRegistry()
    registry.workflow("relay")(_relay)
    shell.processor.registry = registry
    batch = Batch(0.0)
    shell.feed(StartWorkflow(WID, "relay", encode_json("first"), T0), batch)
    shell.commit()
    return shell


def test_the_closed_run_is_written_before_the_next_one() -> None:
    shell = _shell()
    shell.listing.names.add(MISSING_TOPIC)
    first = shell.committed()
    batch = Batch(0.0)
    shell.feed(SignalWorkflow(WID, "go", encode_json(None), "s1", T0), batch)
    written = shell.history(batch)
    assert [r.status for r in written] == [WorkflowStatus.CONTINUED_AS_NEW]
    assert written[0].run_id == first.run_id
    shell.commit()
    following = shell.committed()
    assert following.run_id != first.run_id and decode_json(following.input) == "second"
    assert_status(following, WorkflowStatus.RUNNING)


def test_a_next_run_that_cannot_start_parks_the_run_that_continued() -> None:
    shell = _shell()
    first = shell.committed()
    batch = Batch(0.0)
    shell.feed(SignalWorkflow(WID, "go", encode_json(None), "s1", T0), batch)
    assert shell.history(batch) == []  # nothing of the transition is written
    parked = shell.staged()
    assert parked.run_id == first.run_id
    assert_status(parked, WorkflowStatus.STUCK, "MissingTasksTopic")
    shell.commit()
    # The operator creates the topic and resumes: the run continues as it would have.
    shell.listing.names.add(MISSING_TOPIC)
    batch = Batch(0.0)
    shell.feed(ResumeWorkflow(WID, T0), batch)
    assert [r.status for r in shell.history(batch)] == [WorkflowStatus.CONTINUED_AS_NEW]
    shell.commit()
    following = shell.committed()
    assert following.run_id != first.run_id
    assert_status(following, WorkflowStatus.RUNNING)
