"""A Celery app as a Celery shop has it, for the Celery end-to-end test: plain
``@app.task`` functions on a broker that is the local Kafka (kombu's ``confluentkafka``
transport), and the one line that reports outcomes to workflows (``attach``).

``celery -A tests.integration.celery_shop worker -Q <queue>`` runs it; the environment
gives ``SAGALINE_KAFKA_BOOTSTRAP`` and ``SAGALINE_TOPIC_PREFIX``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from orchestrator.client import WorkflowClient
from orchestrator.protocol.records import IfRunning
from orchestrator.settings import KafkaSettings
from participants import ActivityFailure
from participants.celery import attach

app = Celery("shop", broker=f"confluentkafka://{os.environ['SAGALINE_KAFKA_BOOTSTRAP']}")
app.conf.task_acks_late = True
app.conf.worker_prefetch_multiplier = 1
app.conf.broker_transport_options = {"num_partitions": 1}
outcomes = attach(app)


class CardDeclined(ActivityFailure):
    """The card was refused; charging again cannot help."""

    retryable = False


@app.task(name="shop.tasks.charge_card", acks_late=True)
def charge_card(order_id: str, amount: int = 0, card: str = "visa") -> dict[str, Any]:
    """Charges the card, or raises ``CardDeclined``."""
    if card == "declined":
        raise CardDeclined(f"card declined for {order_id}")
    return {"charge_id": f"ch-{order_id}", "amount": amount}


class RefundUnavailable(ActivityFailure):
    """The payment provider cannot refund right now; a later attempt may."""

    retryable = True


@app.task(name="shop.tasks.refund", bind=True, acks_late=True)
def refund(self: Any, order_id: str, fail_attempts: int = 0) -> str:
    """Refunds whatever was charged for the order; fails the workflow's first
    ``fail_attempts`` attempts (a provider outage)."""
    if getattr(self.request, "sagaline_attempt", 1) <= fail_attempts:
        raise RefundUnavailable(f"refund of {order_id} unavailable, try again")
    return f"refunded {order_id}"


@app.task(name="shop.tasks.slow_quote", bind=True, acks_late=True)
def slow_quote(self: Any, order_id: str, hang_s: float) -> str:
    """Hangs ``hang_s`` seconds on the workflow's first attempt (a stuck dependency), then
    answers at once on the next."""
    if getattr(self.request, "sagaline_attempt", 1) == 1:
        time.sleep(hang_s)
    return f"quote for {order_id} (attempt {self.request.sagaline_attempt})"


_client: WorkflowClient | None = None
_client_pid = 0


def workflows() -> WorkflowClient:
    """This process's workflow client: made on first use in each process (a Kafka client
    does not survive the prefork pool's fork)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client, _client_pid = WorkflowClient(KafkaSettings()), os.getpid()
    return _client


@app.task(name="shop.tasks.place_order", acks_late=True)
def place_order(order: dict[str, Any]) -> str:
    """Starts the checkout workflow for an order from Celery code, as a Django or Flask
    view would; a redelivered task starts nothing twice (the order id is the workflow id
    and the request id)."""
    started = workflows().start_workflow(
        "celery.checkout",
        order,
        workflow_id=order["order_id"],
        request_id=f"place:{order['order_id']}",
        if_running=IfRunning.USE_EXISTING,
    )
    return started.run_id
