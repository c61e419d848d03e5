"""Child workflows end to end on the real broker: a child started on whichever partition
its id maps to, its result as the parent's input, its failure driving the parent's
compensation, and the parent close policies (terminate, request-cancel, abandon) when the
parent is cancelled or terminated."""

from __future__ import annotations

import uuid

import pytest

from orchestrator.protocol.partitioning import partition_for
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityScheduled,
    WorkflowStatus,
)
from tests.integration.pipeline import Saga
from tests.integration.test_hardening import (
    PARTITIONS,
    client_for,
    ids_on,
    status_of,
    wait_until,
)

APP = "tests.integration.control:registry"


def test_a_child_failure_compensates_the_parent_and_a_result_completes_it(saga: Saga) -> None:
    saga.start_participants()
    saga.orchestrator("a", app=APP)
    client = client_for(saga)
    declined, paid = _away("kid-declined"), _away("kid-paid")
    for wid, card in ((declined, "declined"), (paid, "visa")):
        order = {"order_id": wid, "items": [{"sku": "sku-kid", "qty": 1}], "card": card}
        client.start("control.order_with_child", {**order, "amount": 5}, workflow_id=wid)
    client.flush()

    def settled() -> bool:
        return status_of(saga, declined) is WorkflowStatus.COMPENSATED and (
            status_of(saga, paid) is WorkflowStatus.COMPLETED
        )

    wait_until(saga, settled, "the parents to compensate and to complete", 90)
    child = saga.watcher.latest[f"{declined}-charge"]
    assert child.status is WorkflowStatus.FAILED and child.parent is not None
    assert child.parent.workflow_id == declined
    parent = saga.watcher.latest[declined]
    assert parent.failure is not None and parent.failure.error_type == "ChildWorkflowError"
    assert "PaymentDeclined" in parent.failure.message
    reservation = next(
        decode_json(e.result) for e in parent.events if isinstance(e, ActivityCompleted)
    )
    released = [
        decode_json(e.payload)
        for e in parent.events
        if isinstance(e, ActivityScheduled) and e.compensation
    ]
    assert released == [reservation]
    winner = saga.watcher.latest[paid]
    assert saga.watcher.latest[f"{paid}-charge"].status is WorkflowStatus.COMPLETED
    assert winner.result is not None and "charge_id" in decode_json(winner.result)
    child_step = next(e for e in winner.events if isinstance(e, ActivityScheduled) and e.seq == 1)
    assert child_step.child_workflow_id == f"{paid}-charge"


@pytest.mark.parametrize(
    ("policy", "end", "child_status"),
    [
        ("TERMINATE", "terminate", WorkflowStatus.TERMINATED),
        ("REQUEST_CANCEL", "terminate", WorkflowStatus.CANCELLED),
        # A cancel is passed on whatever the policy but ABANDON, so compensations run.
        ("TERMINATE", "cancel", WorkflowStatus.CANCELLED),
        ("ABANDON", "cancel", WorkflowStatus.RUNNING),
    ],
)
def test_the_parent_close_policy_decides_what_happens_to_a_running_child(
    saga: Saga, policy: str, end: str, child_status: WorkflowStatus
) -> None:
    saga.orchestrator("a", app=APP)
    client = client_for(saga)
    wid = f"parent-{uuid.uuid4().hex[:8]}"
    child_id = f"{wid}-child"
    client.start("control.parent", {"child_id": child_id, "policy": policy}, workflow_id=wid)
    client.flush()
    wait_until(
        saga,
        lambda: status_of(saga, child_id) is WorkflowStatus.RUNNING,
        "the child to start and sleep",
        60,
    )
    assert client.query(child_id, "state") == {"items": [], "phase": "sleeping"}
    if end == "cancel":
        client.cancel(wid, "stop")
    else:
        client.terminate(wid, "stop")
    client.flush()
    parent_end = WorkflowStatus.CANCELLED if end == "cancel" else WorkflowStatus.TERMINATED
    wait_until(saga, lambda: status_of(saga, wid) is parent_end, f"the parent to end {end}", 60)
    if child_status is WorkflowStatus.RUNNING:
        # Abandoned: still running and answering, long after the parent ended.
        assert client.query(child_id, "state", timeout_s=30)["phase"] == "sleeping"
        assert status_of(saga, child_id) is WorkflowStatus.RUNNING
    else:
        wait_until(
            saga,
            lambda: status_of(saga, child_id) is child_status,
            f"the child to end {child_status.value}",
            60,
        )
    client.close()


def _away(prefix: str) -> str:
    """A workflow id whose child (``<id>-charge``) maps to another partition than its own,
    so the child's start crosses partitions in the parent's transaction."""
    for wid in ids_on(0, prefix, 50):
        if partition_for(f"{wid}-charge".encode(), PARTITIONS) != 0:
            return wid
    raise AssertionError("no id with a child on another partition among 50")
