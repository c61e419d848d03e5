"""The order saga under ``orchestrator.testing``: no broker, no participants, no waiting.

Everything below this docstring is the example in ``docs/testing.md``, word for word
(``test_harness_order_saga.py`` checks that the two stay the same).
"""

from __future__ import annotations

import pytest

from examples.order_saga.workflows import registry
from orchestrator.testing import WorkflowStatus, WorkflowTester

ORDER = {
    "order_id": "o-1",
    "items": [{"sku": "tea", "qty": 2}],
    "total": 1_200,
    "card": "visa-4242",
    "address": "1 Harbour Rd",
    "payment_deadline_s": 60,  # give the charge up a minute after it was first sent
}
RESERVATION = {"reservation_id": "res-1", "order_id": "o-1"}


@pytest.fixture
def tester() -> WorkflowTester:
    """Every participant succeeds at once; each test scripts what it changes."""
    tester = WorkflowTester(registry)
    tester.activity("inventory.reserve").returns(RESERVATION)
    tester.activity("payment.charge").returns({"charge_id": "ch-1"})
    tester.activity("shipping.schedule").returns({"shipment_id": "sh-1"})
    tester.activity("inventory.release").returns(lambda value, attempt: {**value, "released": True})
    tester.activity("payment.refund").returns({"refunded": []})
    return tester


def test_an_order_is_reserved_charged_and_shipped(tester: WorkflowTester) -> None:
    run = tester.run("order.process", ORDER)

    assert run.status is WorkflowStatus.COMPLETED, run
    assert run.result == {"charge_id": "ch-1", "shipment_id": "sh-1"}
    assert [call.name for call in run.calls] == [
        "inventory.reserve",
        "payment.charge",
        "shipping.schedule",
    ]
    (charge,) = run.calls_to("payment.charge")
    assert charge.value == {"order_id": "o-1", "amount": 1_200, "card": "visa-4242"}


def test_a_declined_card_releases_the_reservation(tester: WorkflowTester) -> None:
    tester.activity("payment.charge").fails("PaymentDeclined", "card refused")

    run = tester.run("order.process", ORDER)

    assert run.status is WorkflowStatus.COMPENSATED, run
    assert run.failure is not None
    assert "PaymentDeclined: card refused" in run.failure.message
    assert len(run.calls_to("payment.charge")) == 1  # a refusal is not retried
    (release,) = run.calls_to("inventory.release")
    assert release.compensation and release.value == RESERVATION
    assert run.calls_to("shipping.schedule") == []


def test_a_charge_that_never_answers_is_given_up_after_a_minute(tester: WorkflowTester) -> None:
    tester.activity("payment.charge").hangs()

    run = tester.run("order.process", ORDER)  # takes milliseconds

    assert run.status is WorkflowStatus.COMPENSATED, run
    assert run.failure is not None
    assert "ScheduleToCloseTimeout" in run.failure.message
    # A charge given up on may still have gone through: refund the order, then release.
    (refund,) = run.calls_to("payment.refund")
    assert refund.compensation and refund.value == {"order_id": "o-1"}
    (release,) = run.calls_to("inventory.release")
    assert refund.sent_at == release.sent_at == 60  # virtual seconds after the start
    assert run.elapsed == 60


def test_a_flaky_gateway_is_retried_with_backoff(tester: WorkflowTester) -> None:
    tester.activity("payment.charge").fails(
        "GatewayTimeout", "acquirer did not answer", retryable=True, times=2
    ).returns({"charge_id": "ch-2"})

    run = tester.run("order.process", ORDER)

    assert run.status is WorkflowStatus.COMPLETED, run
    assert run.result == {"charge_id": "ch-2", "shipment_id": "sh-1"}
    # RetryPolicy's default backoff: 1 s before the second attempt, 2 s before the third.
    assert [call.sent_at for call in run.calls_to("payment.charge")] == [0, 1, 3]
