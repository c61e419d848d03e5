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


@registry.workflow("tally")
async def tally(ctx: WorkflowContext, _: Any) -> Any:
    counts = {"n": 0}
    ctx.on_query("count", lambda: counts["n"])

    def bump(by: int) -> int:
        counts["n"] += by
        return counts["n"]

    def positive(by: Any) -> None:
        if not isinstance(by, int) or by <= 0:
            raise ValueError("bump by a positive int")

    ctx.on_update("bump", bump, validator=positive)
    await ctx.sleep(3600)
    return counts["n"]


def test_queries_and_updates_are_answered_in_virtual_time_in_arrival_order() -> None:
    tester = WorkflowTester(registry)
    tester.update("bump", 2, at=60)
    tester.query("count", at=30)
    tester.update("bump", -1, at=90)
    tester.query("count", at=120)
    tester.query("missing", at=121)
    run = tester.run("tally")
    assert run.status is WorkflowStatus.COMPLETED and run.result == 2
    assert [(a.kind, a.name, a.at, a.ok, a.value) for a in run.answers] == [
        ("query", "count", 30.0, True, 0),
        ("update", "bump", 60.0, True, 2),
        ("update", "bump", 90.0, False, None),
        ("query", "count", 120.0, True, 2),
        ("query", "missing", 121.0, False, None),
    ]
    rejected, missing = run.answers[2].failure, run.answers[4].failure
    assert rejected is not None and rejected.error_type == "UpdateRejected"
    assert missing is not None and missing.error_type == "UnknownQuery"
    assert [a.value for a in run.answers_to("count")] == [0, 2]


def test_a_request_with_an_invalid_name_is_refused_at_once() -> None:
    with pytest.raises(ConfigurationError, match=r"tester\.query"):
        WorkflowTester(registry).query("")
