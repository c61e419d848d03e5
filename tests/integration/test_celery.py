"""Celery tasks as workflow steps, end to end: an unmodified ``celery worker`` on the
local Kafka broker (kombu's ``confluentkafka`` transport) runs the tasks a workflow sends
with ``ctx.celery``, and ``participants.celery.attach`` reports their outcomes back."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import (
    ActivityFailed,
    ActivityScheduled,
    AttemptStarted,
    WorkflowStatus,
)
from tests.integration.celery_process import CeleryWorker
from tests.integration.pipeline import Saga
from tests.integration.test_hardening import client_for, status_of, wait_until

APP = "tests.integration.celery_flows:registry"


@pytest.fixture
def celery_worker(saga: Saga, tmp_path: Path) -> Iterator[str]:
    """A real ``celery worker`` (prefork pool, as Celery runs by default) consuming this
    test's queue; yields the queue."""
    queue = f"{saga.topics.prefix}-payments"  # outside sagaline's own topics
    worker = CeleryWorker(
        "tests.integration.celery_shop", [queue], {**os.environ, **saga.env}, tmp_path / "w.log"
    )
    try:
        worker.start()
        yield queue
    finally:
        worker.stop()


def test_a_workflow_runs_celery_tasks_and_retries_a_failing_compensation(
    saga: Saga, celery_worker: str
) -> None:
    saga.orchestrator("a", app=APP)
    client = client_for(saga)
    orders = {
        "paid": {"order_id": "o-paid", "amount": 12, "card": "visa"},
        "declined": {"order_id": "o-declined", "amount": 7, "card": "declined"},
        # The refund fails twice (a provider outage) and is retried by the workflow.
        "flaky-refund": {
            "order_id": "o-flaky",
            "amount": 5,
            "card": "declined",
            "refund_fails": 2,
        },
    }
    for wid, order in orders.items():
        client.start("celery.checkout", {**order, "queue": celery_worker}, workflow_id=wid)
    client.flush()
    wait_until(
        saga,
        lambda: all(status_of(saga, wid) is WorkflowStatus.COMPLETED for wid in orders),
        "the checkouts to complete through the Celery worker",
        90,
    )
    paid = saga.watcher.latest["paid"]
    assert paid.result is not None
    assert decode_json(paid.result) == {"charge_id": "ch-o-paid", "amount": 12}
    declined = saga.watcher.latest["declined"]
    assert declined.result is not None
    assert decode_json(declined.result) == {
        "declined": "CardDeclined",
        "refund": "refunded o-declined",
    }
    steps = [e for e in declined.events if isinstance(e, ActivityScheduled)]
    # One attempt: CardDeclined is not retryable; the refund is a compensation.
    assert [(s.name, s.attempt, s.compensation) for s in steps] == [
        ("celery.shop.tasks.charge_card", 1, False),
        ("celery.shop.tasks.refund", 1, True),
    ]
    flaky = saga.watcher.latest["flaky-refund"]
    assert flaky.result is not None
    assert decode_json(flaky.result)["refund"] == "refunded o-flaky"
    refunds = [
        (e.attempt, e.compensation)
        for e in flaky.events
        if isinstance(e, ActivityScheduled) and e.name == "celery.shop.tasks.refund"
    ]
    assert refunds == [(1, True), (2, True), (3, True)]
    refund_failures = [
        e.failure.error_type
        for e in flaky.events
        if isinstance(e, ActivityFailed) and e.failure.error_type == "RefundUnavailable"
    ]
    assert refund_failures == ["RefundUnavailable", "RefundUnavailable"]
    client.close()


def test_a_hung_task_times_out_by_the_steps_start_to_close_and_is_retried(
    saga: Saga, celery_worker: str
) -> None:
    saga.orchestrator("a", app=APP)
    client = client_for(saga)
    order = {"order_id": "o-slow", "hang_s": 6, "start_to_close_s": 2, "queue": celery_worker}
    client.start("celery.quote", order, workflow_id="slow")
    client.flush()
    wait_until(
        saga,
        lambda: status_of(saga, "slow") is WorkflowStatus.COMPLETED,
        "the quote to complete on its second attempt",
        90,
    )
    record = saga.watcher.latest["slow"]
    assert record.result is not None
    assert decode_json(record.result) == "quote for o-slow (attempt 2)"
    failures = [e.failure.error_type for e in record.events if isinstance(e, ActivityFailed)]
    # The step's own timeout, or Celery's hard time limit (prefork kills the task) first.
    assert failures in (["StartToCloseTimeout"], ["TimeLimitExceeded"]), failures
    assert any(isinstance(e, AttemptStarted) and e.attempt == 1 for e in record.events)
    client.close()


def test_celery_code_starts_a_workflow_with_the_client(saga: Saga, celery_worker: str) -> None:
    saga.orchestrator("a", app=APP)
    order = {"order_id": "o-from-celery", "amount": 3, "card": "visa", "queue": celery_worker}
    # What a Django view does: send a Celery task by name; the task starts the workflow.
    sender = Celery("view", broker=f"confluentkafka://{saga.bootstrap}", set_as_current=False)
    sender.send_task("shop.tasks.place_order", args=[order], queue=celery_worker)
    wait_until(
        saga,
        lambda: status_of(saga, "o-from-celery") is WorkflowStatus.COMPLETED,
        "the workflow a Celery task started to complete",
        90,
    )
    record = saga.watcher.latest["o-from-celery"]
    assert record.request_id == "place:o-from-celery"
    assert record.result is not None
    assert decode_json(record.result) == {"charge_id": "ch-o-from-celery", "amount": 3}
