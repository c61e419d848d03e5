"""Celery steps without a broker: ``ctx.celery`` records an ordinary step of the
``celery`` participant, and ``protocol.celery.task_message`` writes the Celery protocol-2
message kombu's ``confluentkafka`` transport reads, as ``app.send_task`` would."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.protocol.celery import (
    ATTEMPT_HEADER,
    SEQ_HEADER,
    WORKFLOW_ID_HEADER,
    task_message,
)
from orchestrator.protocol.payloads import PayloadEncodingError, decode_json, encode_json
from orchestrator.protocol.records import ActivityTask, WorkflowStatus
from orchestrator.testing import WorkflowTester
from participants.celery import _step_of
from tests.unit.conftest import WorkflowRun, assert_status


async def _charges(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    return await ctx.celery(
        "shop.tasks.charge_card",
        order["id"],
        amount=order["amount"],
        queue="payments",
        start_to_close=30,
    )


def _registry(fn: Any = _charges) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow("shop.checkout")(fn)
    return registry


def _task() -> ActivityTask:
    run = WorkflowRun(_registry(), "shop.checkout", run_id="r1")
    run.start({"id": "o-1", "amount": 5})
    (task,) = run.sent
    return task


def test_ctx_celery_records_a_step_of_the_celery_participant() -> None:
    task = _task()
    assert (task.participant, task.activity) == ("celery", "shop.tasks.charge_card")
    assert decode_json(task.payload) == {
        "args": ["o-1"],
        "kwargs": {"amount": 5},
        "queue": "payments",
    }
    assert task.activity_id == "wf-1/r1/0/1" and task.start_to_close_ms == 30_000


def test_the_message_is_what_celery_send_task_writes() -> None:
    task = _task()
    topic, data = task_message(task)
    assert topic == "payments"
    envelope = json.loads(data)
    headers, properties = envelope["headers"], envelope["properties"]
    assert headers["task"] == "shop.tasks.charge_card"
    assert headers["id"] == headers["root_id"] == task.activity_id
    assert headers["timelimit"] == [30.0, None]
    assert (headers[WORKFLOW_ID_HEADER], headers[SEQ_HEADER], headers[ATTEMPT_HEADER]) == (
        "wf-1",
        0,
        1,
    )
    assert envelope["content-type"] == "application/json"
    assert properties["body_encoding"] == "base64"
    assert properties["delivery_info"] == {"exchange": "", "routing_key": "payments"}
    args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
    assert (args, kwargs) == (["o-1"], {"amount": 5})
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert task_message(task) == (topic, data)  # the same bytes every time


@pytest.mark.parametrize(
    "payload",
    [encode_json([1]), encode_json({"args": [], "kwargs": {}}), encode_json({"args": 1})],
)
def test_a_payload_that_is_not_a_celery_call_is_refused(payload: Any) -> None:
    broken = dataclasses.replace(_task(), payload=payload)
    with pytest.raises(PayloadEncodingError, match="Celery step"):
        task_message(broken)


@pytest.mark.parametrize(
    ("task_name", "queue"),
    [("", "payments"), ("shop tasks", "payments"), ("shop.tasks.x", "bad queue"), ("x", "")],
)
def test_an_invalid_task_name_or_queue_parks_the_workflow(task_name: str, queue: str) -> None:
    async def bad(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.celery(task_name, queue=queue)

    run = WorkflowRun(_registry(bad), "shop.checkout", run_id="r1")
    run.start()
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")


def test_the_tester_scripts_a_celery_task_like_any_activity() -> None:
    tester = WorkflowTester(_registry())
    tester.activity("celery.shop.tasks.charge_card").returns({"charge_id": "ch-1"})
    result = tester.run("shop.checkout", {"id": "o-2", "amount": 9})
    assert result.status is WorkflowStatus.COMPLETED
    assert result.result == {"charge_id": "ch-1"}
    assert result.calls[0].value == {"args": ["o-2"], "kwargs": {"amount": 9}, "queue": "payments"}


class _Request:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class _Task:
    def __init__(self, **fields: Any) -> None:
        self.request = _Request(**fields)


def test_the_worker_side_answers_only_tasks_a_workflow_sent() -> None:
    sent = _Task(id="wf-1/r1/0/2", sagaline_workflow_id="wf-1", sagaline_seq=0, sagaline_attempt=2)
    assert _step_of(sent) == ("wf-1", "wf-1/r1/0/2", 0, 2)
    assert _step_of(_Task(id="plain-celery-task")) is None
    assert (
        _step_of(_Task(id="x", sagaline_workflow_id="w", sagaline_seq="0", sagaline_attempt=1))
        is None
    )
    assert _step_of(object()) is None
