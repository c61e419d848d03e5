"""The shop's Celery tasks: inventory, payments and shipping, as ordinary ``@app.task``
functions run by ``celery -A examples.celery_shop.tasks worker``.

Each writes through ``self.db``: with ``base=ExactlyOnceTask`` its writes and its outcome
commit in one PostgreSQL transaction, so a task redelivered after its worker died is
answered from the stored outcome instead of running again. Drop the base class and write
through a connection of your own, and the same task is at least once.

The ``attach(app, ...)`` line is all the integration the workers need; the environment
gives ``SAGALINE_KAFKA_BOOTSTRAP``, ``SAGALINE_TOPIC_PREFIX`` and
``SAGALINE_POSTGRES_DSN``.

Ids are random (uuid4) on purpose: an effect that happened twice shows up as a second row
for the same order, which the tests count.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from celery import Celery

from examples.order_saga.services import inventory, payment, shipping
from participants import ActivityFailure
from participants.celery import ExactlyOnceTask, attach

# The native example's tables (examples/order_saga/services.py), so that one audit checks
# both shops: a reservation, a payment and a shipment per order, exactly once.
SCHEMA = "\n".join(p.setup_sql for p in (inventory, payment, shipping))
STOCK = 1_000_000
# Fault injection for the test suite: the card network's latency, and how long it hangs
# on the first attempt of a charge whose card is "hangs-once".
PAYMENT_LATENCY_S = int(os.environ.get("SHOP_PAYMENT_LATENCY_MS", "0")) / 1000
HANG_S = float(os.environ.get("SHOP_HANG_S", "30"))

app = Celery("shop")
app.config_from_object("examples.celery_shop.celeryconfig")
attach(app, setup_sql=SCHEMA)


class OutOfStock(ActivityFailure):
    """Not enough of a SKU to reserve."""

    retryable = False


class PaymentDeclined(ActivityFailure):
    """The card was refused."""

    retryable = False


@app.task(name="shop.inventory.reserve", base=ExactlyOnceTask, bind=True, acks_late=True)
def reserve(self: ExactlyOnceTask, order_id: str, items: list[dict[str, Any]]) -> dict[str, str]:
    """Take the order's items out of stock."""
    for item in sorted(items, key=lambda i: str(i["sku"])):  # one lock order: no deadlocks
        self.db.execute(
            "INSERT INTO inventory_stock (sku, available) VALUES (%s, %s) "
            "ON CONFLICT (sku) DO NOTHING",
            (item["sku"], STOCK),
        )
        taken = self.db.execute(
            "UPDATE inventory_stock SET available = available - %s "
            "WHERE sku = %s AND available >= %s RETURNING available",
            (item["qty"], item["sku"], item["qty"]),
        ).fetchone()
        if taken is None:
            raise OutOfStock(f"order {order_id}: fewer than {item['qty']} of {item['sku']}")
    reservation_id = f"res-{uuid.uuid4()}"
    self.db.execute(
        "INSERT INTO inventory_reservations (reservation_id, order_id, items, status) "
        "VALUES (%s, %s, %s::jsonb, 'reserved')",
        (reservation_id, order_id, json.dumps(items)),
    )
    return {"reservation_id": reservation_id}


@app.task(name="shop.inventory.release", base=ExactlyOnceTask, bind=True, acks_late=True)
def release(self: ExactlyOnceTask, reservation_id: str) -> bool:
    """Give a reservation's stock back; releasing twice changes nothing."""
    row = self.db.execute(
        "UPDATE inventory_reservations SET status = 'released', released_at = now() "
        "WHERE reservation_id = %s AND status = 'reserved' RETURNING items",
        (reservation_id,),
    ).fetchone()
    if row is None:
        return False
    for item in sorted(row[0], key=lambda i: str(i["sku"])):
        self.db.execute(
            "UPDATE inventory_stock SET available = available + %s WHERE sku = %s",
            (item["qty"], item["sku"]),
        )
    return True


@app.task(name="shop.payments.charge", base=ExactlyOnceTask, bind=True, acks_late=True)
def charge(self: ExactlyOnceTask, order_id: str, amount: int, card: str) -> dict[str, str]:
    """Charge the order; the card ``"declined"`` is refused."""
    if card == "declined":
        raise PaymentDeclined(f"order {order_id}: card declined")
    if card == "hangs-once" and getattr(self.request, "sagaline_attempt", 1) == 1:
        time.sleep(HANG_S)  # the card network hangs; the hard time limit ends it
    if PAYMENT_LATENCY_S:
        time.sleep(PAYMENT_LATENCY_S)  # stands in for the card network's round trip
    charge_id = f"ch-{uuid.uuid4()}"
    self.db.execute(
        "INSERT INTO payments (charge_id, order_id, amount, status) VALUES (%s, %s, %s, 'charged')",
        (charge_id, order_id, amount),
    )
    return {"charge_id": charge_id}


@app.task(name="shop.shipping.schedule", base=ExactlyOnceTask, bind=True, acks_late=True)
def schedule(self: ExactlyOnceTask, order_id: str, address: str) -> dict[str, str]:
    """Book the shipment."""
    shipment_id = f"sh-{uuid.uuid4()}"
    self.db.execute(
        "INSERT INTO shipments (shipment_id, order_id, address) VALUES (%s, %s, %s)",
        (shipment_id, order_id, address),
    )
    return {"shipment_id": shipment_id}
