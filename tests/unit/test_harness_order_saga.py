"""More of the order saga under ``orchestrator.testing``: its payment deadline, and the
check that ``docs/testing.md`` shows ``test_order_saga_harness.py`` as it is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from examples.order_saga.workflows import registry
from orchestrator.protocol.records import ActivityScheduled
from orchestrator.testing import WorkflowStatus, WorkflowTester
from tests.unit.test_order_saga_harness import ORDER, RESERVATION

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tester() -> WorkflowTester:
    """The documented example's fixture: every participant succeeds at once."""
    tester = WorkflowTester(registry)
    tester.activity("inventory.reserve").returns(RESERVATION)
    tester.activity("payment.charge").returns({"charge_id": "ch-1"})
    tester.activity("shipping.schedule").returns({"shipment_id": "sh-1"})
    tester.activity("inventory.release").returns(lambda value, attempt: {**value, "released": True})
    tester.activity("payment.refund").returns({"refunded": []})
    return tester


def test_the_documented_example_is_the_test_file() -> None:
    doc = (ROOT / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert blocks, "docs/testing.md has no python example"
    source = (Path(__file__).parent / "test_order_saga_harness.py").read_text()
    code = source.split('"""\n\n', 1)[1]  # after the module docstring
    assert blocks[0] == code, (
        "docs/testing.md's first example and tests/unit/test_order_saga_harness.py differ; "
        "copy one to the other"
    )


def test_a_gateway_down_for_good_uses_every_attempt_then_compensates(
    tester: WorkflowTester,
) -> None:
    tester.activity("payment.charge").fails("GatewayTimeout", retryable=True)
    run = tester.run("order.process", ORDER)
    assert run.status is WorkflowStatus.COMPENSATED, run
    assert [(c.attempt, c.sent_at) for c in run.calls_to("payment.charge")] == [
        (1, 0),
        (2, 1),
        (3, 3),
        (4, 7),
        (5, 15),
    ]
    assert run.calls_to("inventory.release")[0].sent_at == 15


def test_a_retry_that_could_not_begin_before_the_deadline_is_not_made(
    tester: WorkflowTester,
) -> None:
    """Rate limited for 90 s, with 60 s for the whole charge: compensate now, not at 60 s."""
    tester.activity("payment.charge").fails("RateLimited", "429", retryable=True, retry_after=90)
    run = tester.run("order.process", ORDER)
    assert run.status is WorkflowStatus.COMPENSATED, run
    assert run.failure is not None and "RateLimited: 429" in run.failure.message
    assert len(run.calls_to("payment.charge")) == 1
    assert run.elapsed == 0


def test_a_slow_charge_within_the_minute_completes(tester: WorkflowTester) -> None:
    tester.activity("payment.charge").fails("GatewayTimeout", retryable=True, after=20).returns(
        {"charge_id": "ch-3"}, after=35
    )
    run = tester.run("order.process", ORDER)
    assert run.status is WorkflowStatus.COMPLETED, run
    # The first attempt fails at 20 s, the second is sent at 21 s and answers at 56 s.
    assert [c.sent_at for c in run.calls_to("payment.charge")] == [0, 21]
    assert run.calls_to("shipping.schedule")[0].sent_at == 56


def test_a_charge_answering_after_the_deadline_is_too_late(tester: WorkflowTester) -> None:
    tester.activity("payment.charge").returns({"charge_id": "ch-late"}, after=61)
    run = tester.run("order.process", ORDER)
    assert run.status is WorkflowStatus.COMPENSATED, run
    assert run.elapsed == 60, "the compensation does not wait for the late answer"
    assert run.calls_to("inventory.release")[0].sent_at == 60
    # The late charge went through at the participant: the refund by order undoes it.
    assert run.calls_to("payment.refund")[0].value == {"order_id": "o-1"}


def test_the_example_charge_has_a_deadline_but_no_start_reports(tester: WorkflowTester) -> None:
    """``schedule_to_close`` alone: participants send no start reports for the charge."""
    run = tester.run("order.process", ORDER)
    (charge,) = [
        e for e in run.history if isinstance(e, ActivityScheduled) and e.name == "payment.charge"
    ]
    assert charge.schedule_to_close_ms == 60_000
    assert charge.start_to_close_ms is None and charge.heartbeat_timeout_ms is None
    assert run.steps == 4, "the start and three answers: no start report, no wake-up"


def test_an_order_without_a_payment_deadline_charges_without_one(tester: WorkflowTester) -> None:
    """The demo's and the benchmark's orders carry none: no timer, no wake-up."""
    order = {k: v for k, v in ORDER.items() if k != "payment_deadline_s"}
    run = tester.run("order.process", order)
    assert run.status is WorkflowStatus.COMPLETED, run
    (charge,) = [
        e for e in run.history if isinstance(e, ActivityScheduled) and e.name == "payment.charge"
    ]
    assert charge.schedule_to_close_ms is None
    assert all(r is None for r in [run.record.wake_at_ms])
