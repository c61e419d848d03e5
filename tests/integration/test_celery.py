"""Celery tasks as workflow steps, end to end: an unmodified ``celery worker`` on the
local Kafka broker (kombu's ``confluentkafka`` transport) runs the tasks a workflow sends
with ``ctx.celery``, and ``participants.celery.attach`` reports their outcomes back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
from tests.integration.pipeline import Saga
from tests.integration.test_hardening import client_for, status_of, wait_until

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integration.celery_flows:registry"


@pytest.fixture
def celery_worker(saga: Saga, tmp_path: Path) -> Iterator[str]:
    """A real ``celery worker`` (prefork pool, as Celery runs by default) consuming this
    test's queue; yields the queue."""
    queue = f"{saga.topics.prefix}-payments"  # outside sagaline's own topics
    log_path = tmp_path / "celery-worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.integration.celery_shop",
                "worker",
                "-Q",
                queue,
                "--pool",
                "prefork",
                "--concurrency",
                "1",
                "--loglevel",
                "INFO",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "-n",
                f"{queue}@%h",
            ],
            cwd=ROOT,
            env={**os.environ, **saga.env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while b" ready." not in log_path.read_bytes():
            if worker.poll() is not None:
                pytest.fail(f"celery worker exited:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"celery worker not ready in 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)  # polling a log file for a condition, with a deadline
        yield queue
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()


def test_a_workflow_runs_celery_tasks_and_compensates_with_one(
    saga: Saga, celery_worker: str
) -> None:
    saga.orchestrator("a", app=APP)
    client = client_for(saga)
    orders = {
        "paid": {"order_id": "o-paid", "amount": 12, "card": "visa"},
        "declined": {"order_id": "o-declined", "amount": 7, "card": "declined"},
    }
    for wid, order in orders.items():
        client.start("celery.checkout", {**order, "queue": celery_worker}, workflow_id=wid)
    client.flush()
    wait_until(
        saga,
        lambda: all(status_of(saga, wid) is WorkflowStatus.COMPLETED for wid in orders),
        "both checkouts to complete through the Celery worker",
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
