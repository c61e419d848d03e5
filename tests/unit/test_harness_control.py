"""The test harness sends signals and completes promises in virtual time."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import (
    ConfigurationError,
    PromiseFailedError,
    WorkflowContext,
    WorkflowRegistry,
)
from orchestrator.testing import WorkflowBlockedError, WorkflowStatus, WorkflowTester

registry = WorkflowRegistry()


@registry.workflow("checkout")
async def checkout(ctx: WorkflowContext, _: Any) -> Any:
    callback = ctx.promise("provider-callback")
    await ctx.activity("payments.start", {"callback_id": callback.id})
    try:
        paid = await callback
    except PromiseFailedError as exc:
        return {"paid": False, "why": exc.error_type}
    approval = await ctx.wait_signal("approve", timeout=3600)
    return {"paid": paid, "approval": approval, "at": ctx.now()}


def _tester() -> WorkflowTester:
    tester = WorkflowTester(registry)
    tester.activity("payments.start").returns(None)
    return tester


def test_a_promise_completed_and_a_signal_sent_in_virtual_time() -> None:
    tester = _tester()
    tester.complete_promise("provider-callback", {"ok": True}, after=60)
    tester.signal("approve", "ann", at=600)
    run = tester.run("checkout", start_at=0)
    assert run.status is WorkflowStatus.COMPLETED, run
    assert run.result == {"paid": {"ok": True}, "approval": "ann", "at": 600.0}
    assert run.calls_to("payments.start")[0].value == {"callback_id": "test-workflow/test-run/p0"}


def test_a_failed_promise_and_a_signal_that_never_comes() -> None:
    tester = _tester()
    tester.fail_promise("provider-callback", "CardDeclined", "no funds")
    assert tester.run("checkout").result == {"paid": False, "why": "CardDeclined"}
    tester = _tester()
    tester.complete_promise("provider-callback", 1)
    run = tester.run("checkout")
    assert run.status is WorkflowStatus.FAILED and run.error_type == "WorkflowTimeoutError"


def test_a_promise_nothing_completes_blocks_with_a_clear_message() -> None:
    with pytest.raises(WorkflowBlockedError, match="promise 'provider-callback'"):
        _tester().run("checkout")


def test_invalid_signal_and_promise_names_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        WorkflowTester(registry).signal("")
    with pytest.raises(ConfigurationError):
        WorkflowTester(registry).complete_promise("x" * 201)
