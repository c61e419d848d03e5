"""The pure engine (`advance`) driven input by input, with no Kafka and an explicit clock."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from examples.order_saga.workflows import process_order
from orchestrator import (
    ActivityError,
    ConfigurationError,
    RetryPolicy,
    UnknownWorkflowTypeError,
    WorkflowContext,
    WorkflowRegistry,
)
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityScheduled,
    ActivityStatus,
    Payload,
    ResumeWorkflow,
    StartWorkflow,
    WorkflowStatus,
)
from orchestrator.replay import Limits, advance, pending_tasks
from tests.unit.conftest import (
    T0,
    WorkflowRun,
    assert_encodable,
    assert_history,
    assert_status,
    completed,
    task_lines,
)

ORDER = {
    "order_id": "o-1",
    "items": [{"sku": "tea", "qty": 2}],
    "total": 4200,
    "card": "tok_visa",
    "address": "1 Main St",
}


@pytest.fixture
def orders() -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow("order.process")(process_order)
    return registry


@pytest.fixture
def order_run(orders: WorkflowRegistry) -> WorkflowRun:
    return WorkflowRun(orders, "order.process", workflow_id="order-1")


# --- the order saga ------------------------------------------------------------------


def test_order_saga_happy_path_completes_with_its_result(order_run: WorkflowRun) -> None:
    run = order_run
    start = run.start(ORDER)
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert run.tasks() == ["order-1/0/1 inventory.reserve"]
    task = start.tasks[0]
    assert (task.workflow_id, task.workflow_type, task.seq, task.attempt) == (
        "order-1",
        "order.process",
        0,
        1,
    )
    assert decode_json(task.payload) == {"order_id": "o-1", "items": ORDER["items"]}
    assert task.scheduled_at_ms == run.now_ms
    assert not task.compensation

    run.complete(0, {"reservation_id": "r-1"})
    assert run.tasks() == ["order-1/1/1 payment.charge"]
    assert run.last is not None
    assert decode_json(run.last.tasks[0].payload) == {
        "order_id": "o-1",
        "amount": 4200,
        "card": "tok_visa",
    }
    run.complete(1, {"charge_id": "ch-1"})
    assert run.tasks() == ["order-1/2/1 shipping.schedule"]
    run.complete(2, {"shipment_id": "sh-1"})

    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.tasks() == []
    assert_history(
        run.record,
        [
            "sched 0#1 inventory.reserve",
            "done 0#1",
            "sched 1#1 payment.charge",
            "done 1#1",
            "sched 2#1 shipping.schedule",
            "done 2#1",
        ],
    )
    record = run.record
    assert record is not None and record.result is not None
    assert decode_json(record.result) == {"charge_id": "ch-1", "shipment_id": "sh-1"}
    assert record.failure is None
    assert record.closed_at_ms == record.updated_at_ms == run.now_ms
    assert record.started_at_ms == T0 + 1_000
    assert record.revision == 4, "one revision per applied input"
    assert decode_json(record.input) == ORDER


@pytest.mark.parametrize(
    ("error_type", "retryable"),
    [
        ("PaymentDeclined", True),  # listed in non_retryable_error_types
        ("CardExpired", False),  # the participant says it is not retryable
    ],
)
def test_declined_payment_releases_the_reservation_and_ends_compensated(
    order_run: WorkflowRun, error_type: str, retryable: bool
) -> None:
    run = order_run
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r-1"})
    run.fail(1, error_type, retryable=retryable, message="insufficient funds")

    assert run.tasks() == ["order-1/2/1 inventory.release comp"]
    assert run.last is not None
    release = run.last.tasks[0]
    assert release.compensation
    assert decode_json(release.payload) == {"reservation_id": "r-1"}
    assert_status(run.record, WorkflowStatus.RUNNING)

    run.complete(2, {"released": True})
    assert_status(run.record, WorkflowStatus.COMPENSATED, "ActivityError")
    assert_history(
        run.record,
        [
            "sched 0#1 inventory.reserve",
            "done 0#1",
            "sched 1#1 payment.charge",
            f"fail 1#1 {error_type}",
            "sched 2#1 inventory.release comp",
            "done 2#1",
        ],
    )
    record = run.record
    assert record is not None
    assert record.failure is not None
    assert "payment.charge" in record.failure.message
    assert error_type in record.failure.message
    assert "after 1 attempt(s)" in record.failure.message
    assert record.result is None
    assert record.closed_at_ms == run.now_ms


def test_retryable_failure_is_retried_with_a_new_activity_id_per_attempt(
    order_run: WorkflowRun,
) -> None:
    run = order_run
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r-1"})
    first = run.sent[-1]
    for attempt in range(1, 5):
        run.fail(1, "GatewayTimeout", retryable=True)
        # The default backoff: 1 s, 2 s, 4 s, 8 s; nothing is sent until the WakeUp.
        backoff = 1000 * 2 ** (attempt - 1)
        assert run.tasks() == [] and run.record is not None
        assert run.record.wake_at_ms == run.now_ms + backoff
        run.wake()
        assert run.tasks() == [f"order-1/1/{attempt + 1} payment.charge"], (
            f"workflow order-1: attempt {attempt} failed; history: {run.record}"
        )
        assert run.last is not None
        retry = run.last.tasks[0]
        assert retry.payload == first.payload
        assert retry.scheduled_at_ms == run.now_ms
        assert_status(run.record, WorkflowStatus.RUNNING)

    run.fail(1, "GatewayTimeout", retryable=True)  # the 5th and last attempt
    assert run.tasks() == ["order-1/2/1 inventory.release comp"]
    run.complete(2, {"released": True})
    assert_status(run.record, WorkflowStatus.COMPENSATED, "ActivityError")
    assert_history(
        run.record,
        [
            "sched 0#1 inventory.reserve",
            "done 0#1",
            "sched 1#1 payment.charge",
            "fail 1#1 GatewayTimeout retry+1000",
            "sched 1#2 payment.charge",
            "fail 1#2 GatewayTimeout retry+2000",
            "sched 1#3 payment.charge",
            "fail 1#3 GatewayTimeout retry+4000",
            "sched 1#4 payment.charge",
            "fail 1#4 GatewayTimeout retry+8000",
            "sched 1#5 payment.charge",
            "fail 1#5 GatewayTimeout",
            "sched 2#1 inventory.release comp",
            "done 2#1",
        ],
    )
    assert run.record is not None and run.record.failure is not None
    assert "after 5 attempt(s)" in run.record.failure.message
    ids = [t.activity_id for t in run.sent]
    assert len(ids) == len(set(ids)), f"activity ids repeat: {ids}"


def test_a_retry_carries_the_policy_recorded_with_the_step(order_run: WorkflowRun) -> None:
    run = order_run
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r-1"})
    run.fail_and_retry(1, "GatewayTimeout")
    assert run.record is not None
    charges = [
        e
        for e in run.record.events
        if isinstance(e, ActivityScheduled) and e.name == "payment.charge"
    ]
    assert [(e.attempt, e.max_attempts, e.non_retryable) for e in charges] == [
        (1, 5, ("PaymentDeclined",)),
        (2, 5, ("PaymentDeclined",)),
    ]
    # A non-retryable type on a later attempt still ends the retries.
    run.fail(1, "PaymentDeclined", retryable=True)
    assert run.tasks() == ["order-1/2/1 inventory.release comp"]


def test_a_retryable_failure_of_a_step_with_one_attempt_is_final() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("t.once")
    async def once(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.once", retry=RetryPolicy(max_attempts=1))

    run = WorkflowRun(registry, "t.once")
    run.start()
    run.fail(0, "Flaky", retryable=True)
    assert_status(run.record, WorkflowStatus.FAILED, "ActivityError")
    assert_history(run.record, ["sched 0#1 p.once", "fail 0#1 Flaky"])


def test_default_policy_makes_three_attempts() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("t.default")
    async def default(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.work")

    run = WorkflowRun(registry, "t.default")
    run.start()
    run.fail_and_retry(0, "Flaky")
    run.fail_and_retry(0, "Flaky")
    run.fail(0, "Flaky", retryable=True)
    assert_status(run.record, WorkflowStatus.FAILED, "ActivityError")
    assert [t.activity_id for t in run.sent] == ["wf-1/0/1", "wf-1/0/2", "wf-1/0/3"]
    # 1 s before the second attempt, 2 s before the third.
    assert run.record is not None
    retries = [e for e in run.record.events if isinstance(e, ActivityScheduled) and e.attempt > 1]
    assert [e.backoff_ms for e in retries] == [1000, 2000]


# --- inputs that change nothing ------------------------------------------------------


def _ignored(run: WorkflowRun, body: StartWorkflow | ActivityResult, reason: str) -> None:
    before = run.record
    transition = run.send(body)
    assert transition.ignored == reason, (
        f"workflow {run.workflow_id}: expected the input to be ignored as {reason!r}, "
        f"observed {transition.ignored!r} with record {transition.record}"
    )
    assert transition.record is None and not transition.changed
    assert transition.tasks == ()
    assert run.record is before


def test_duplicate_start_is_ignored(order_run: WorkflowRun) -> None:
    order_run.start(ORDER)
    _ignored(
        order_run,
        StartWorkflow("order-1", "order.process", encode_json({"x": 1}), 5),
        "duplicate-start",
    )
    # Even a start naming a type that does not exist: the id is taken.
    _ignored(
        order_run, StartWorkflow("order-1", "no.such.type", encode_json(None), 5), "duplicate-start"
    )


def test_duplicate_start_of_a_closed_workflow_is_ignored(order_run: WorkflowRun) -> None:
    run = order_run
    run.start(ORDER)
    for seq, value in enumerate(
        ({"reservation_id": "r"}, {"charge_id": "c"}, {"shipment_id": "s"})
    ):
        run.complete(seq, value)
    assert_status(run.record, WorkflowStatus.COMPLETED)
    _ignored(
        run, StartWorkflow("order-1", "order.process", encode_json(ORDER), 5), "duplicate-start"
    )


def test_duplicate_result_is_ignored(order_run: WorkflowRun) -> None:
    run = order_run
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r-1"})
    _ignored(run, completed("order-1", 0, 1, {"reservation_id": "r-OTHER"}, 9), "duplicate-result")
    run.fail(1, "PaymentDeclined")
    _ignored(run, completed("order-1", 1, 1, {"charge_id": "late"}, 9), "duplicate-result")


def test_result_of_a_superseded_attempt_is_stale(order_run: WorkflowRun) -> None:
    run = order_run
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r-1"})
    run.fail_and_retry(1, "GatewayTimeout")
    _ignored(run, completed("order-1", 1, 1, {"charge_id": "late"}, 9), "stale-attempt")
    # An attempt that was never sent, and a step that does not exist.
    _ignored(run, completed("order-1", 1, 3, {"charge_id": "future"}, 9), "stale-attempt")
    _ignored(run, completed("order-1", 7, 1, {}, 9), "stale-attempt")


def test_result_for_an_unknown_workflow_is_ignored(orders: WorkflowRegistry) -> None:
    transition = advance(None, completed("ghost", 0, 1, {}, 5), T0, orders)
    assert transition.ignored == "unknown-workflow"
    assert transition.record is None and transition.tasks == ()


def test_result_after_close_is_ignored(order_run: WorkflowRun) -> None:
    run = order_run
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r-1"})
    run.fail(1, "PaymentDeclined")
    run.complete(2, {"released": True})
    assert_status(run.record, WorkflowStatus.COMPENSATED)
    _ignored(run, completed("order-1", 2, 1, {"released": True}, 9), "workflow-closed")
    _ignored(run, completed("order-1", 5, 1, {}, 9), "workflow-closed")


def test_result_whose_activity_id_does_not_match_is_ignored(order_run: WorkflowRun) -> None:
    run = order_run
    run.start(ORDER)
    good = completed("order-1", 0, 1, {"reservation_id": "r-1"}, 9)
    _ignored(run, dataclasses.replace(good, activity_id="order-2/0/1"), "activity-id-mismatch")
    _ignored(run, dataclasses.replace(good, activity_id="order-1/0/1/x"), "activity-id-mismatch")
    run.send(good)
    assert run.tasks() == ["order-1/1/1 payment.charge"]


# --- unknown workflow types ----------------------------------------------------------


def test_start_of_an_unknown_workflow_type_is_kept_as_a_stuck_record(
    orders: WorkflowRegistry,
) -> None:
    """A rolling deploy: this instance does not have the type yet. The start is kept."""
    start = StartWorkflow("order-9", "order.refund", encode_json({"order_id": "o-9"}), T0)
    transition = advance(None, start, T0 + 5, orders, run_id="run-9")
    record = assert_encodable(transition.record)
    assert_status(record, WorkflowStatus.STUCK, "UnknownWorkflowType")
    assert transition.tasks == () and transition.ignored is None
    assert record.failure is not None and "'order.refund'" in record.failure.message
    assert (record.workflow_id, record.workflow_type, record.run_id) == (
        "order-9",
        "order.refund",
        "run-9",
    )
    assert decode_json(record.input) == {"order_id": "o-9"}
    assert (record.revision, record.started_at_ms, record.events) == (1, T0 + 5, ())
    assert record.closed_at_ms is None

    refunds = WorkflowRegistry()

    @refunds.workflow("order.refund")
    async def refund(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
        return await ctx.activity("payment.refund", order)

    # The deploy that has the type resumes it from the start, with the kept input.
    resumed = advance(record, ResumeWorkflow("order-9", T0 + 9), T0 + 9, refunds)
    assert_status(resumed.record, WorkflowStatus.RUNNING)
    assert resumed.record is not None and resumed.record.failure is None
    assert task_lines(resumed.tasks) == ["order-9/run-9/0/1 payment.refund"]
    assert decode_json(resumed.tasks[0].payload) == {"order_id": "o-9"}


def test_an_unknown_type_no_longer_raises_but_the_error_class_stays() -> None:
    """Kept for code that catches it; the engine keeps the start instead."""
    assert issubclass(UnknownWorkflowTypeError, Exception)
    assert UnknownWorkflowTypeError.reason == "unknown-workflow-type"


def test_unknown_type_for_an_existing_record_parks_it_stuck(order_run: WorkflowRun) -> None:
    run = order_run
    run.start(ORDER)
    run.registry = WorkflowRegistry()  # a deploy that lost the workflow
    run.complete(0, {"reservation_id": "r-1"})

    assert_status(run.record, WorkflowStatus.STUCK, "UnknownWorkflowType")
    assert run.tasks() == []
    assert_history(run.record, ["sched 0#1 inventory.reserve", "done 0#1"])
    assert run.record is not None and run.record.failure is not None
    assert "'order.process'" in run.record.failure.message
    assert not run.record.status.terminal
    assert run.record.closed_at_ms is None


def test_a_retry_needs_no_workflow_code(order_run: WorkflowRun) -> None:
    run = order_run
    run.start(ORDER)
    run.registry = WorkflowRegistry()
    run.fail(0, "Busy", retryable=True)
    assert run.tasks() == [] and run.record is not None and run.record.wake_at_ms is not None
    run.wake()  # the retry's WakeUp needs no code either
    assert run.tasks() == ["order-1/0/2 inventory.reserve"]
    assert_status(run.record, WorkflowStatus.RUNNING)


# --- limits, failures of the workflow code -------------------------------------------


def test_a_step_past_the_history_limit_fails_at_its_await(orders: WorkflowRegistry) -> None:
    """Shipping does not fit: it is recorded as rejected, and the code sees the failure."""
    run = WorkflowRun(orders, "order.process", workflow_id="order-big", limits=Limits(max_events=4))
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r-1"})
    assert run.tasks() == ["order-big/1/1 payment.charge"]
    run.complete(1, {"charge_id": "ch-1"})  # shipping would be the 5th and 6th event

    # Shipping is outside the order saga's try block: nothing to compensate, FAILED.
    assert_status(run.record, WorkflowStatus.FAILED, "HistoryLimitExceededError")
    assert run.tasks() == []
    assert_history(
        run.record,
        [
            "sched 0#1 inventory.reserve",
            "done 0#1",
            "sched 1#1 payment.charge",
            "done 1#1",
            "sched 2#1 shipping.schedule",
            "fail 2#1 HistoryLimitExceeded",
        ],
    )
    record = run.record
    assert record is not None and record.failure is not None
    assert "order-big" in record.failure.message and "shipping.schedule" in record.failure.message
    rejected = record.events[4]
    assert isinstance(rejected, ActivityScheduled) and rejected.payload.data == b""
    assert record.closed_at_ms == run.now_ms
    assert pending_tasks(record) == ()


def test_retries_do_not_grow_a_history_past_its_limit() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("t.flaky")
    async def flaky(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.flaky", retry=RetryPolicy(max_attempts=10))

    limit = 4
    run = WorkflowRun(registry, "t.flaky", workflow_id="flaky-1", limits=Limits(max_events=limit))
    run.start()
    for _ in range(5):
        if run.status.terminal:
            break
        run.fail(0, "Busy", retryable=True)
        assert run.record is not None
        assert len(run.record.events) <= limit, (
            f"workflow flaky-1 holds {len(run.record.events)} events, above the limit of "
            f"{limit}, with status {run.record.status.value}; history: "
            f"{[str(e) for e in run.record.events]}"
        )


def test_an_exception_in_workflow_code_fails_the_workflow() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("t.raises")
    async def raises(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
        checked = await ctx.activity("fraud.check", order)
        if checked["score"] > 50:
            raise ValueError(f"order {order['id']} looks fraudulent")
        return checked

    run = WorkflowRun(registry, "t.raises")
    run.start({"id": "o-7"})
    run.complete(0, {"score": 99})
    assert_status(run.record, WorkflowStatus.FAILED, "ValueError")
    assert run.record is not None and run.record.failure is not None
    assert run.record.failure.message == "order o-7 looks fraudulent"
    assert run.record.closed_at_ms == run.now_ms
    assert run.tasks() == []


def test_an_exception_before_the_first_step_fails_at_start() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("t.bad-input")
    async def bad_input(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
        return await ctx.activity("p.work", order["missing"])

    run = WorkflowRun(registry, "t.bad-input")
    run.start({})
    assert_status(run.record, WorkflowStatus.FAILED, "KeyError")
    assert_history(run.record, [])
    assert run.record is not None and run.record.revision == 1


# A set is JSON since typed payloads (a sorted list, docs/payloads.md).
@pytest.mark.parametrize("value", [float("nan"), object()], ids=["nan", "object"])
def test_a_result_that_is_not_json_fails_the_workflow(value: Any) -> None:
    registry = WorkflowRegistry()

    @registry.workflow("t.result")
    async def result(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.work")
        return value

    run = WorkflowRun(registry, "t.result")
    run.start()
    run.complete(0, "ok")
    assert_status(run.record, WorkflowStatus.FAILED, "InvalidResult")
    assert_history(run.record, ["sched 0#1 p.work", "done 0#1"])
    assert run.record is not None and run.record.result is None


def test_an_activity_value_that_is_not_json_fails_the_workflow() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("t.value")
    async def value(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.work", {"when": object()})

    run = WorkflowRun(registry, "t.value")
    run.start()
    assert_status(run.record, WorkflowStatus.FAILED, "PayloadEncodingError")
    assert run.tasks() == []
    assert_history(run.record, [])


def test_an_input_that_is_not_json_fails_the_workflow(order_run: WorkflowRun) -> None:
    order_run.start(input_payload=Payload(b"\x02\x04", encoding="avro/binary"))
    assert_status(order_run.record, WorkflowStatus.FAILED, "InvalidInput")
    assert order_run.tasks() == []


def test_a_malformed_activity_name_parks_the_workflow() -> None:
    """A bad name is a bug in the code, not a business failure: STUCK until fixed."""
    registry = WorkflowRegistry()

    @registry.workflow("t.name")
    async def name(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("no-participant")
        except ConfigurationError:
            return "hidden"  # catching the error does not hide the bug

    run = WorkflowRun(registry, "t.name")
    run.start()
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    assert run.record is not None and run.record.failure is not None
    assert "'no-participant'" in run.record.failure.message
    assert run.tasks() == [] and run.record.result is None


def test_success_without_a_result_counts_as_a_final_failure(order_run: WorkflowRun) -> None:
    run = order_run
    run.start(ORDER)
    run.send(ActivityResult("order-1", "order-1/0/1", 0, 1, ActivityStatus.COMPLETED, 9))
    assert_status(run.record, WorkflowStatus.FAILED, "ActivityError")
    assert_history(run.record, ["sched 0#1 inventory.reserve", "fail 0#1 MissingResult"])


def test_failure_without_details_is_recorded_as_unknown(order_run: WorkflowRun) -> None:
    run = order_run
    run.start(ORDER)
    run.send(ActivityResult("order-1", "order-1/0/1", 0, 1, ActivityStatus.FAILED, 9))
    assert_history(run.record, ["sched 0#1 inventory.reserve", "fail 0#1 UnknownError"])
    assert_status(run.record, WorkflowStatus.FAILED, "ActivityError")


def test_an_activity_error_caught_by_the_code_lets_it_complete() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("t.fallback")
    async def fallback(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("primary.send", retry=RetryPolicy(max_attempts=2))
        except ActivityError as err:
            assert (err.activity, err.error_type, err.attempts) == ("primary.send", "Down", 2)
            return await ctx.activity("backup.send")

    run = WorkflowRun(registry, "t.fallback")
    run.start()
    run.fail_and_retry(0, "Down")
    run.fail(0, "Down", retryable=True)
    run.complete(1, "sent")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == "sent"


def test_the_workflow_clock_is_the_time_of_the_replayed_input() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("t.clock")
    async def clock(ctx: WorkflowContext, _: Any) -> Any:
        before = ctx.now()
        await ctx.activity("p.work")
        return [before, ctx.now()]

    run = WorkflowRun(registry, "t.clock")
    run.start()
    started = run.now_ms
    run.complete(0)
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == [started / 1000, run.now_ms / 1000]
    assert run.sent[0].scheduled_at_ms == started


def test_retry_policy_needs_at_least_one_attempt() -> None:
    with pytest.raises(ConfigurationError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_history_and_tasks_agree_when_a_workflow_finishes() -> None:
    """Every attempt the history says was scheduled was handed to a participant."""
    registry = WorkflowRegistry()

    @registry.workflow("t.notify")
    async def notify(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
        ctx.activity("email.send", order)  # fire and forget
        return "accepted"

    run = WorkflowRun(registry, "t.notify")
    run.start({"id": "o-1"})
    assert run.record is not None
    scheduled = [
        f"{run.workflow_id}/{e.seq}/{e.attempt}"
        for e in run.record.events
        if isinstance(e, ActivityScheduled)
    ]
    sent = [t.activity_id for t in run.sent]
    assert scheduled == sent, (
        f"workflow {run.workflow_id} ({run.record.status.value}): history schedules "
        f"{scheduled} but the engine sent {sent}"
    )


# --- ctx.gather ----------------------------------------------------------------------


@pytest.fixture
def fan_out() -> WorkflowRegistry:
    registry = WorkflowRegistry()

    @registry.workflow("stock.check-all")
    async def check_all(ctx: WorkflowContext, skus: list[str]) -> Any:
        handles = [
            ctx.activity("stock.check", sku, retry=RetryPolicy(max_attempts=2)) for sku in skus
        ]
        return await ctx.gather(*handles)

    return registry


def test_gather_schedules_every_branch_at_once_and_returns_in_argument_order(
    fan_out: WorkflowRegistry,
) -> None:
    run = WorkflowRun(fan_out, "stock.check-all")
    run.start(["tea", "jam", "oat"])
    assert run.tasks() == ["wf-1/0/1 stock.check", "wf-1/1/1 stock.check", "wf-1/2/1 stock.check"]
    run.complete(2, "OAT")
    assert run.tasks() == []
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.complete(0, "TEA")
    run.complete(1, "JAM")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == ["TEA", "JAM", "OAT"]
    assert_history(
        run.record,
        [
            "sched 0#1 stock.check",
            "sched 1#1 stock.check",
            "sched 2#1 stock.check",
            "done 2#1",
            "done 0#1",
            "done 1#1",
        ],
    )


def test_gather_raises_only_after_every_branch_settles(fan_out: WorkflowRegistry) -> None:
    run = WorkflowRun(fan_out, "stock.check-all")
    run.start(["tea", "jam", "oat"])
    run.fail(2, "Late")
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.complete(1, "JAM")
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.fail(0, "Early", retryable=True)  # retried: not settled yet
    assert run.tasks() == []
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.wake()
    assert run.tasks() == ["wf-1/0/2 stock.check"]
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.fail(0, "Early", retryable=True)
    # Both 0 and 2 failed; the first in argument order is the one raised.
    assert_status(run.record, WorkflowStatus.FAILED, "ActivityError")
    assert run.record is not None and run.record.failure is not None
    assert "Early" in run.record.failure.message
    assert "after 2 attempt(s)" in run.record.failure.message


def test_gather_of_nothing_returns_an_empty_list(fan_out: WorkflowRegistry) -> None:
    run = WorkflowRun(fan_out, "stock.check-all")
    run.start([])
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == []


# --- pending_tasks -------------------------------------------------------------------


def test_pending_tasks_are_the_latest_unsettled_attempts(fan_out: WorkflowRegistry) -> None:
    run = WorkflowRun(fan_out, "stock.check-all")
    run.start(["tea", "jam", "oat"])
    assert run.record is not None
    assert pending_tasks(run.record) == tuple(run.sent)

    run.complete(1, "JAM")
    run.fail(0, "Busy", retryable=True)
    assert run.record is not None
    # A retry waiting for its backoff is not pending: it is sent at the WakeUp.
    assert task_lines(pending_tasks(run.record)) == ["wf-1/2/1 stock.check"]
    run.wake()
    assert run.record is not None
    assert task_lines(pending_tasks(run.record)) == ["wf-1/0/2 stock.check", "wf-1/2/1 stock.check"]
    retry = run.sent[-1]
    assert pending_tasks(run.record)[0] == retry, "the same task the engine sent"

    run.complete(0, "TEA")
    run.complete(2, "OAT")
    assert run.record is not None
    assert pending_tasks(run.record) == ()


def test_pending_tasks_of_a_fresh_order(order_run: WorkflowRun) -> None:
    order_run.start(ORDER)
    assert order_run.record is not None and order_run.last is not None
    assert pending_tasks(order_run.record) == order_run.last.tasks
