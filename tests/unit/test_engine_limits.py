"""Limits go through the workflow (issue 10, item 8).

A step that would take the record past ``max_events`` or ``max_record_bytes`` fails at
its ``await`` with ``HistoryLimitExceededError`` / ``RecordTooLargeError`` (never retried),
so ``Saga`` and ``except ActivityError`` blocks compensate; compensations get a grace
above the limits. Only when even the failure reports do not fit is the workflow closed
``FAILED`` at its last good state.

Most tests measure a record by its steps' and results' payload bytes (``_payload_bytes``),
so the budgets are
easy to read: with ``max_record_bytes=1000`` the record that closes may have 1000, a
compensation may take it to 875 and an ordinary step to 775 (``Limits.byte_budget``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from orchestrator import (
    ActivityError,
    ConfigurationError,
    HistoryLimitExceededError,
    RecordTooLargeError,
    RetryPolicy,
    Saga,
    WorkflowContext,
    WorkflowRegistry,
)
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    Payload,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.replay import Limits
from orchestrator.replay.limits import Tier
from tests.unit.conftest import (
    WorkflowRun,
    assert_encodable,
    assert_history,
    assert_status,
    encoded_size,
    history_lines,
)


def _payload_bytes(record: WorkflowRecord) -> int:
    """Payload bytes of the steps, results and the workflow's result (not its input)."""
    size = 0 if record.result is None else len(record.result.data)
    for event in record.events:
        if isinstance(event, ActivityScheduled):
            size += len(event.payload.data)
        elif isinstance(event, ActivityCompleted):
            size += len(event.result.data)
    return size


class _Counted:
    """A measure that counts its calls."""

    def __init__(self, measure: Callable[[WorkflowRecord], int]) -> None:
        self.measure = measure
        self.calls = 0

    def __call__(self, record: WorkflowRecord) -> int:
        self.calls += 1
        return self.measure(record)


BYTES = Limits(max_record_bytes=1000, measure=_payload_bytes)


def _registry(name: str, fn: Any) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow(name)(fn)
    return registry


def test_the_budgets_leave_room_for_compensations_and_for_the_close() -> None:
    assert [BYTES.byte_budget(t) for t in Tier] == [775, 875, 1000]
    assert [Limits(max_events=100).event_budget(t) for t in (Tier.NORMAL, Tier.GRACE)] == [
        100,
        120,
    ]
    assert Limits(max_events=1_000).event_grace == 100
    assert Limits().byte_budget(Tier.CLOSE) is None


# --- the event limit ---------------------------------------------------------------------


async def _trip(ctx: WorkflowContext, legs: list[str]) -> Any:
    async with Saga(ctx) as saga:
        for leg in legs:
            booking = await ctx.activity(f"{leg}.book", leg)
            saga.add_compensation(f"{leg}.cancel", booking)
    return "booked"


def test_a_step_past_max_events_fails_at_its_await_and_the_saga_compensates() -> None:
    run = WorkflowRun(
        _registry("trip", _trip), "trip", workflow_id="trip-1", limits=Limits(max_events=4)
    )
    run.start(["car", "hotel", "flight"])
    run.complete(0, "C")
    run.complete(1, "H")
    # flight would be events 5 and 6: rejected, and the saga undoes hotel, then car.
    assert run.tasks() == ["trip-1/3/1 hotel.cancel comp"]
    run.complete(3)
    assert run.tasks() == ["trip-1/4/1 car.cancel comp"]
    run.complete(4)
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.COMPENSATED, "HistoryLimitExceededError")
    assert_history(
        record,
        [
            "sched 0#1 car.book",
            "done 0#1",
            "sched 1#1 hotel.book",
            "done 1#1",
            "sched 2#1 flight.book",
            "fail 2#1 HistoryLimitExceeded",
            "sched 3#1 hotel.cancel comp",
            "done 3#1",
            "sched 4#1 car.cancel comp",
            "done 4#1",
        ],
    )
    rejected = record.events[4]
    assert isinstance(rejected, ActivityScheduled) and rejected.payload.data == b""
    failure = record.events[5]
    assert isinstance(failure, ActivityFailed) and not failure.failure.retryable
    assert "flight.book" in failure.failure.message and "max_events 4" in failure.failure.message
    assert len(record.events) <= 4 + Limits(max_events=4).event_grace


def test_the_error_raised_at_the_await_is_an_activity_error() -> None:
    seen: list[Any] = []

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.one")
        try:
            await ctx.activity("p.two")
        except ActivityError as err:
            seen.append((type(err), err.error_type, err.activity, err.effects_committed))
            return "handled"
        return "not reached"

    run = WorkflowRun(_registry("t", flow), "t", limits=Limits(max_events=2))
    run.start()
    run.complete(0)
    assert_status(assert_encodable(run.record), WorkflowStatus.COMPLETED)
    assert seen[-1] == (HistoryLimitExceededError, "HistoryLimitExceeded", "p.two", False)


def test_compensations_use_the_grace_and_no_more() -> None:
    """30 bookings fill max_events=60; the grace of 20 events holds 10 undo steps. When
    no further compensation can be scheduled, the workflow closes FAILED."""
    legs = [f"leg{i}" for i in range(30)]
    limits = Limits(max_events=60)
    run = WorkflowRun(_registry("trip", _trip), "trip", workflow_id="long-trip", limits=limits)
    run.start(legs)
    for seq in range(29):
        run.complete(seq, f"B{seq}")
    run.fail(29, "SoldOut")
    undone = 0
    while run.status is WorkflowStatus.RUNNING:
        assert len(run.tasks()) == 1 and run.tasks()[0].endswith(" comp"), run.tasks()
        run.complete(run.last.tasks[0].seq if run.last else -1)
        undone += 1
    record = assert_encodable(run.record)
    assert undone == limits.event_grace // 2 == 10
    assert_status(record, WorkflowStatus.FAILED, "HistoryLimitExceeded")
    assert record.failure is not None and "last good state" in record.failure.message
    assert len(record.events) == 60 + limits.event_grace
    lines = history_lines(record.events)
    undo = [line for line in lines if line.endswith(" comp")]
    assert undo[0] == "sched 30#1 leg28.cancel comp" and len(undo) == 10
    # The last undo's result is kept; only what the code asked for after it is not.
    assert lines[-1] == "done 39#1"
    assert not any("HistoryLimitExceeded" in line for line in lines)


def test_a_parallel_undo_that_does_not_fit_the_grace_at_all_closes_failed() -> None:
    legs = [f"leg{i}" for i in range(30)]

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        async with Saga(ctx, parallel=True) as saga:
            await ctx.gather(*[ctx.activity(f"{leg}.book") for leg in legs])
            for leg in legs:
                saga.add_compensation(f"{leg}.cancel")
            raise LookupError("no seat")

    run = WorkflowRun(_registry("t", flow), "t", limits=Limits(max_events=60))
    run.start()
    assert len(run.tasks()) == 30
    for seq in range(30):
        run.complete(seq)
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.FAILED, "HistoryLimitExceeded")
    assert len(record.events) == 60 and run.tasks() == []


def test_when_even_the_failure_reports_do_not_fit_the_workflow_closes_at_its_last_good_state() -> (
    None
):
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        while True:  # catches every failure and asks for another step
            try:
                await ctx.activity("p.poll")
            except ActivityError:
                continue

    limits = Limits(max_events=2)
    run = WorkflowRun(_registry("t", flow), "t", limits=limits)
    run.start()
    before = run.record
    assert before is not None
    run.complete(0, "first")
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.FAILED, "HistoryLimitExceeded")
    # The input's result is kept; the ten rejected polls the code asked for are not.
    assert_history(record, ["sched 0#1 p.poll", "done 0#1"])
    assert record.failure is not None and "last good state" in record.failure.message
    assert record.revision == before.revision + 1 and run.tasks() == []


def test_a_retry_that_would_exceed_max_events_is_not_taken() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("p.flaky", retry=RetryPolicy(max_attempts=10))
        except ActivityError as err:
            return [err.error_type, err.attempts]

    run = WorkflowRun(_registry("t", flow), "t", limits=Limits(max_events=6))
    run.start()
    run.fail_and_retry(0)
    run.fail_and_retry(0)
    run.fail(0, "Busy", retryable=True)  # a third retry would need events 7 and 8
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.COMPLETED)
    assert record.result is not None and decode_json(record.result) == ["Busy", 3]
    assert len(record.events) == 6


# --- the size limit ----------------------------------------------------------------------


async def _order(ctx: WorkflowContext, sizes: dict[str, int]) -> Any:
    """A saga whose payload sizes come from its input (the input itself stays small)."""
    async with Saga(ctx) as saga:
        reservation = await ctx.activity("inventory.reserve", "i" * sizes["items"])
        saga.add_compensation("inventory.release", "r" * sizes["release"])
        await ctx.activity("payment.charge", "c" * sizes["card"])
    return reservation


def test_a_step_too_large_for_the_record_fails_at_its_await_and_is_compensated() -> None:
    run = WorkflowRun(_registry("order", _order), "order", workflow_id="o-1", limits=BYTES)
    run.start({"items": 10, "release": 1, "card": 800})
    run.complete(0, "RES")
    # The charge (802 payload bytes) does not fit in 775: rejected; the release runs.
    assert run.tasks() == ["o-1/2/1 inventory.release comp"]
    record = assert_encodable(run.record)
    charge = record.events[2]
    assert isinstance(charge, ActivityScheduled) and charge.payload.data == b""
    failure = record.events[3]
    assert isinstance(failure, ActivityFailed)
    assert failure.failure.error_type == "RecordTooLarge" and not failure.failure.retryable
    assert "payment.charge" in failure.failure.message and "802 bytes" in failure.failure.message
    run.complete(2)
    assert_status(assert_encodable(run.record), WorkflowStatus.COMPENSATED, "RecordTooLargeError")


def test_a_compensation_may_use_the_grace_an_ordinary_step_may_not() -> None:
    run = WorkflowRun(_registry("order", _order), "order", workflow_id="o-2", limits=BYTES)
    # Release: 802 payload bytes, over the ordinary 775 but within the 875 of the grace.
    run.start({"items": 0, "release": 800, "card": 800})
    run.complete(0, "")
    assert run.tasks() == ["o-2/2/1 inventory.release comp"]
    assert run.record is not None and 775 < _payload_bytes(run.record) <= 875


def test_a_result_too_large_to_record_is_a_failure_whose_effects_committed() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("export.run")
        except RecordTooLargeError as err:
            if err.effects_committed:  # the export happened: undo it
                await ctx.activity("export.delete", compensation=True)
            raise

    run = WorkflowRun(_registry("t", flow), "t", workflow_id="big-result", limits=BYTES)
    run.start()
    run.complete(0, "x" * 900)
    record = assert_encodable(run.record)
    assert_history(
        record, ["sched 0#1 export.run", "fail 0#1 RecordTooLarge", "sched 1#1 export.delete comp"]
    )
    failed = record.events[1]
    assert isinstance(failed, ActivityFailed) and failed.failure.effects_committed
    assert "902 bytes" in failed.failure.message and "compensate" in failed.failure.message
    run.complete(1)
    assert_status(assert_encodable(run.record), WorkflowStatus.COMPENSATED, "RecordTooLargeError")


def test_a_participant_failure_whose_effects_committed_is_never_retried() -> None:
    seen: list[bool] = []

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.activity("p.write", retry=RetryPolicy(max_attempts=5))
        except ActivityError as err:
            seen.append(err.effects_committed)
            return "compensated"

    run = WorkflowRun(_registry("t", flow), "t")
    run.start()
    run.fail(0, "ResultTooLarge", retryable=True, effects_committed=True)
    assert_status(assert_encodable(run.record), WorkflowStatus.COMPLETED)
    assert seen[-1] is True
    assert [t.attempt for t in run.sent] == [1]


def test_a_retry_that_would_make_the_record_too_large_is_not_taken() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.activity("p.send", "m" * 300, retry=RetryPolicy(max_attempts=5))

    run = WorkflowRun(_registry("t", flow), "t", limits=BYTES)
    run.start()
    run.fail_and_retry(0)  # attempt 2: 604 bytes, fits 775
    assert run.tasks() == ["wf-1/0/2 p.send"]
    run.fail(0, "Busy", retryable=True)  # attempt 3 would be 906 bytes: final
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.FAILED, "ActivityError")
    assert record.failure is not None and "after 2 attempt(s): Busy" in record.failure.message


def test_a_return_value_too_large_closes_the_workflow_failed() -> None:
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.activity("p.work")
        return "v" * 2000

    run = WorkflowRun(_registry("t", flow), "t", limits=BYTES)
    run.start()
    run.complete(0)
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.FAILED, "RecordTooLarge")
    assert record.result is None
    assert record.failure is not None and "2002 bytes" in record.failure.message
    assert_history(record, ["sched 0#1 p.work", "done 0#1"])


def test_an_input_too_large_for_any_record_closes_the_start_failed_without_it() -> None:
    async def flow(ctx: WorkflowContext, value: Any) -> Any:
        return await ctx.activity("p.work")

    limits = Limits(max_record_bytes=2_000, measure=encoded_size)
    run = WorkflowRun(_registry("t", flow), "t", limits=limits)
    run.start("i" * 5000)
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.FAILED, "RecordTooLarge")
    assert record.input == Payload(b"") and record.events == () and run.tasks() == []


def test_with_the_real_codec_every_record_stays_under_max_record_bytes() -> None:
    limit = 2_000
    limits = Limits(max_record_bytes=limit, measure=encoded_size)
    run = WorkflowRun(_registry("order", _order), "order", workflow_id="o-3", limits=limits)
    run.start({"items": 100, "release": 100, "card": 1_500})
    run.complete(0, "R" * 200)
    assert run.tasks() == ["o-3/2/1 inventory.release comp"]
    run.complete(2)
    record = assert_encodable(run.record)
    assert_status(record, WorkflowStatus.COMPENSATED, "RecordTooLargeError")
    for transition in run.transitions:
        if transition.record is not None:
            assert encoded_size(transition.record) <= limit


# --- how often the size is measured --------------------------------------------------


def test_measure_is_called_once_per_transition_unless_a_limit_is_hit() -> None:
    counted = _Counted(encoded_size)
    limits = Limits(max_record_bytes=100_000, measure=counted)
    run = WorkflowRun(
        _registry("order", _order), "order", workflow_id="o-4", limits=limits, check_codec=False
    )
    run.start({"items": 1, "release": 1, "card": 1})
    run.complete(0, "RES")
    run.fail_and_retry(1)  # the failure (with its retry measured), then the WakeUp
    run.complete(1, "CHARGED")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert counted.calls == len(run.transitions) == 5


def test_limits_are_validated_where_they_are_given() -> None:
    with pytest.raises(ConfigurationError, match="max_events"):
        Limits(max_events=0)
    with pytest.raises(ConfigurationError, match="max_events"):
        Limits(max_events=True)
    with pytest.raises(ConfigurationError, match="max_record_bytes"):
        Limits(max_record_bytes=-1, measure=len)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="measure"):
        Limits(max_record_bytes=1_000)


async def _stubborn(ctx: WorkflowContext, value: Any) -> None:
    """Catches every RecordTooLargeError and schedules the same oversized step again."""
    while True:
        try:
            await ctx.activity("blob.put", "x" * 5_000)
        except RecordTooLargeError:
            continue


def test_code_that_keeps_scheduling_what_cannot_fit_is_stopped_within_one_input() -> None:
    measure = _Counted(_payload_bytes)
    limits = Limits(max_record_bytes=1000, measure=measure)
    run = WorkflowRun(
        _registry("stubborn", _stubborn), "stubborn", workflow_id="s-1", limits=limits
    )
    run.start(None)
    # Each round replays and measures; a cap keeps one input from holding the loop.
    assert measure.calls < 200, measure.calls
    assert_status(assert_encodable(run.record), WorkflowStatus.FAILED, "RecordTooLarge")
