"""The ``Saga`` helper under the engine: compensation order, parallel undo, final status."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import Saga, WorkflowContext, WorkflowRegistry
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import ActivityScheduled, WorkflowStatus
from orchestrator.saga import COMPENSATION_RETRY
from tests.unit.conftest import WorkflowRun, assert_history, assert_status

BOOKED = [
    "sched 0#1 cars.reserve",
    "done 0#1",
    "sched 1#1 hotels.reserve",
    "done 1#1",
    "sched 2#1 flights.reserve",
    "done 2#1",
    "sched 3#1 payment.charge",
]


@pytest.fixture
def trips() -> WorkflowRegistry:
    registry = WorkflowRegistry()

    async def book(ctx: WorkflowContext, trip: dict[str, Any], parallel: bool) -> Any:
        async with Saga(ctx, parallel=parallel) as saga:
            car = await ctx.activity("cars.reserve", trip["car"])
            saga.add_compensation("cars.cancel", car)
            hotel = await ctx.activity("hotels.reserve", trip["hotel"])
            saga.add_compensation("hotels.cancel", hotel)
            flight = await ctx.activity("flights.reserve", trip["flight"])
            saga.add_compensation("flights.cancel", flight)
            if trip.get("explode"):
                raise LookupError("no seat map")
            await ctx.activity("payment.charge", trip["total"])
        return {"car": car, "hotel": hotel, "flight": flight}

    @registry.workflow("trip.sequential")
    async def sequential(ctx: WorkflowContext, trip: dict[str, Any]) -> Any:
        return await book(ctx, trip, parallel=False)

    @registry.workflow("trip.parallel")
    async def parallel(ctx: WorkflowContext, trip: dict[str, Any]) -> Any:
        return await book(ctx, trip, parallel=True)

    return registry


TRIP = {"car": "c", "hotel": "h", "flight": "f", "total": 900}


def _booked(registry: WorkflowRegistry, kind: str, **trip: Any) -> WorkflowRun:
    run = WorkflowRun(registry, f"trip.{kind}", workflow_id=f"trip-{kind}")
    run.start({**TRIP, **trip})
    run.complete(0, "car-1")
    run.complete(1, "hotel-1")
    run.complete(2, "flight-1")
    return run


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_a_saga_that_succeeds_runs_no_compensation(trips: WorkflowRegistry, kind: str) -> None:
    run = _booked(trips, kind)
    run.complete(3, "paid")
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert_history(run.record, [*BOOKED, "done 3#1"])
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == {
        "car": "car-1",
        "hotel": "hotel-1",
        "flight": "flight-1",
    }


def test_sequential_compensation_runs_newest_first_one_at_a_time(trips: WorkflowRegistry) -> None:
    run = _booked(trips, "sequential")
    run.fail(3, "CardDeclined")
    assert run.tasks() == ["trip-sequential/4/1 flights.cancel comp"]
    assert run.last is not None
    assert decode_json(run.last.tasks[0].payload) == "flight-1"
    run.complete(4)
    assert run.tasks() == ["trip-sequential/5/1 hotels.cancel comp"]
    run.complete(5)
    assert run.tasks() == ["trip-sequential/6/1 cars.cancel comp"]
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.complete(6)

    assert_status(run.record, WorkflowStatus.COMPENSATED, "ActivityError")
    assert_history(
        run.record,
        [
            *BOOKED,
            "fail 3#1 CardDeclined",
            "sched 4#1 flights.cancel comp",
            "done 4#1",
            "sched 5#1 hotels.cancel comp",
            "done 5#1",
            "sched 6#1 cars.cancel comp",
            "done 6#1",
        ],
    )
    assert run.record is not None and run.record.failure is not None
    assert "payment.charge" in run.record.failure.message


def test_parallel_compensation_sends_every_undo_at_once(trips: WorkflowRegistry) -> None:
    run = _booked(trips, "parallel")
    run.fail(3, "CardDeclined")
    assert run.tasks() == [
        "trip-parallel/4/1 flights.cancel comp",
        "trip-parallel/5/1 hotels.cancel comp",
        "trip-parallel/6/1 cars.cancel comp",
    ]
    run.complete(6)
    run.complete(4)
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.complete(5)
    assert_status(run.record, WorkflowStatus.COMPENSATED, "ActivityError")
    assert_history(
        run.record,
        [
            *BOOKED,
            "fail 3#1 CardDeclined",
            "sched 4#1 flights.cancel comp",
            "sched 5#1 hotels.cancel comp",
            "sched 6#1 cars.cancel comp",
            "done 6#1",
            "done 4#1",
            "done 5#1",
        ],
    )


def test_compensations_use_the_saga_retry_policy(trips: WorkflowRegistry) -> None:
    run = _booked(trips, "sequential")
    run.fail(3, "CardDeclined")
    assert run.record is not None
    undo = [e for e in run.record.events if isinstance(e, ActivityScheduled) and e.compensation]
    assert [(e.name, e.max_attempts) for e in undo] == [
        ("flights.cancel", COMPENSATION_RETRY.max_attempts)
    ]


def test_any_exception_in_the_block_runs_the_compensations(trips: WorkflowRegistry) -> None:
    run = _booked(trips, "sequential", explode=True)
    assert run.tasks() == ["trip-sequential/3/1 flights.cancel comp"]
    run.complete(3)
    run.complete(4)
    run.complete(5)
    assert_status(run.record, WorkflowStatus.COMPENSATED, "LookupError")
    assert run.record is not None and run.record.failure is not None
    assert run.record.failure.message == "no seat map"


def test_a_compensation_that_fails_for_good_ends_compensation_failed(
    trips: WorkflowRegistry,
) -> None:
    run = _booked(trips, "sequential")
    run.fail(3, "CardDeclined")
    waited = 0
    for attempt in range(1, COMPENSATION_RETRY.max_attempts):
        run.fail(4, "AirlineDown", retryable=True)
        # Patient: 1 s, 2 s, 4 s ... doubling up to 10 minutes between attempts.
        backoff = 1000 * min(2 ** (attempt - 1), 600)
        assert run.tasks() == [] and run.record is not None
        assert run.record.wake_at_ms == run.now_ms + backoff
        waited += backoff
        run.wake()
        assert run.tasks() == [f"trip-sequential/4/{attempt + 1} flights.cancel comp"]
    assert waited == 12_423_000, "about 3.5 hours of retries"
    run.fail(4, "AirlineDown", retryable=True)
    # The older steps are still undone, newest first, before the saga gives up.
    assert run.tasks() == ["trip-sequential/5/1 hotels.cancel comp"]
    run.complete(5)
    assert run.tasks() == ["trip-sequential/6/1 cars.cancel comp"]
    run.complete(6)
    assert_status(run.record, WorkflowStatus.COMPENSATION_FAILED)
    assert run.record is not None and run.record.closed_at_ms == run.now_ms


def test_a_parallel_compensation_that_fails_ends_compensation_failed_after_the_rest(
    trips: WorkflowRegistry,
) -> None:
    run = _booked(trips, "parallel")
    run.fail(3, "CardDeclined")
    run.fail(5, "HotelGone")  # not retryable: final at once
    assert_status(run.record, WorkflowStatus.RUNNING)
    run.complete(4)
    run.complete(6)
    assert_status(run.record, WorkflowStatus.COMPENSATION_FAILED, "ActivityError")
    assert run.record is not None and run.record.failure is not None
    assert "hotels.cancel" in run.record.failure.message


def test_a_failure_before_any_registration_has_nothing_to_compensate(
    trips: WorkflowRegistry,
) -> None:
    run = WorkflowRun(trips, "trip.sequential", workflow_id="trip-0")
    run.start(TRIP)
    run.fail(0, "NoCars")
    assert_status(run.record, WorkflowStatus.FAILED, "ActivityError")
    assert_history(run.record, ["sched 0#1 cars.reserve", "fail 0#1 NoCars"])
