"""The order saga's participant services: inventory, payment and shipping.

Each is a :class:`participants.Participant` with its own tables. Handlers write through
``ctx.db``, inside the idempotency transaction, so a redelivered task changes nothing.
Run them with ``sagaline participant examples.order_saga.services:inventory`` (and
``:payment``, ``:shipping``).

Ids are random (uuid4) on purpose: a duplicate execution that slipped past the
idempotency inbox would show up as a second row for the same order, which the tests count.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from participants import ActivityContext, ActivityFailure, Participant

DEFAULT_STOCK = 1_000_000
# A slow card network, for fault tests that must catch a batch half done.
PAYMENT_LATENCY_S = int(os.environ.get("ORDER_SAGA_PAYMENT_LATENCY_MS", "0")) / 1000


class InvalidRequest(ActivityFailure):
    """The activity's value is not what the handler accepts; resending it cannot help."""

    retryable = False


class OutOfStock(ActivityFailure):
    """Not enough stock of a SKU to reserve the quantity asked."""

    retryable = False


class PaymentDeclined(ActivityFailure):
    """The card was refused."""

    retryable = False


class ChargeNotFound(ActivityFailure):
    """A refund names a charge that does not exist."""

    retryable = False


def _text(value: dict[str, Any], field: str) -> str:
    found = value.get(field)
    if not isinstance(found, str) or not found:
        raise InvalidRequest(f"{field!r} must be a non-empty string, got {found!r}")
    return found


def _count(value: dict[str, Any], field: str, *, minimum: int) -> int:
    found = value.get(field)
    if isinstance(found, bool) or not isinstance(found, int) or found < minimum:
        raise InvalidRequest(f"{field!r} must be an integer >= {minimum}, got {found!r}")
    return found


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


# --- inventory ----------------------------------------------------------------------

inventory = Participant(
    "inventory",
    setup_sql="""
    CREATE TABLE IF NOT EXISTS inventory_stock (
        sku text PRIMARY KEY,
        available int NOT NULL CHECK (available >= 0)
    );
    CREATE TABLE IF NOT EXISTS inventory_reservations (
        reservation_id text PRIMARY KEY,
        order_id text NOT NULL,
        items jsonb NOT NULL,
        status text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        released_at timestamptz
    );
    CREATE INDEX IF NOT EXISTS inventory_reservations_order ON inventory_reservations (order_id);
    """,
)


def _items(value: dict[str, Any]) -> dict[str, int]:
    """Quantities per SKU, merged, from ``[{"sku": ..., "qty": ...}, ...]``."""
    raw = value.get("items")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest(f"'items' must be a non-empty list, got {raw!r}")
    merged: dict[str, int] = {}
    for entry in raw:
        item = _object(entry, "each item")
        sku = _text(item, "sku")
        merged[sku] = merged.get(sku, 0) + _count(item, "qty", minimum=1)
    return merged


@inventory.activity("reserve")
def reserve(value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
    """Take the order's items out of stock; fails with OutOfStock if any SKU runs short."""
    request = _object(value, "the reserve request")
    order_id = _text(request, "order_id")
    items = _items(request)
    ctx.db.execute(
        "INSERT INTO inventory_stock (sku, available) SELECT sku, %s FROM unnest(%s::text[]) sku "
        "ON CONFLICT (sku) DO NOTHING",
        (DEFAULT_STOCK, sorted(items)),
    )
    for sku in sorted(items):  # one lock order for every transaction: no deadlocks
        row = ctx.db.execute(
            "UPDATE inventory_stock SET available = available - %s "
            "WHERE sku = %s AND available >= %s RETURNING available",
            (items[sku], sku, items[sku]),
        ).fetchone()
        if row is None:
            raise OutOfStock(f"order {order_id}: fewer than {items[sku]} of sku {sku} in stock")
    reservation_id = f"res-{uuid.uuid4()}"
    ctx.db.execute(
        "INSERT INTO inventory_reservations (reservation_id, order_id, items, status) "
        "VALUES (%s, %s, %s::jsonb, 'reserved')",
        (reservation_id, order_id, _json_items(items)),
    )
    return {"reservation_id": reservation_id, "order_id": order_id}


def _json_items(items: dict[str, int]) -> str:
    return json.dumps([{"sku": sku, "qty": qty} for sku, qty in sorted(items.items())])


@inventory.activity("release")
def release(value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
    """Give a reservation's stock back; releasing a released reservation changes nothing."""
    reservation_id = _text(_object(value, "the release request"), "reservation_id")
    row = ctx.db.execute(
        "UPDATE inventory_reservations SET status = 'released', released_at = now() "
        "WHERE reservation_id = %s AND status = 'reserved' RETURNING items",
        (reservation_id,),
    ).fetchone()
    if row is None:
        return {"reservation_id": reservation_id, "released": False}
    for item in sorted(row[0], key=lambda i: i["sku"]):
        ctx.db.execute(
            "UPDATE inventory_stock SET available = available + %s WHERE sku = %s",
            (item["qty"], item["sku"]),
        )
    return {"reservation_id": reservation_id, "released": True}


# --- payment ------------------------------------------------------------------------

payment = Participant(
    "payment",
    setup_sql="""
    CREATE TABLE IF NOT EXISTS payments (
        charge_id text PRIMARY KEY,
        order_id text NOT NULL,
        amount bigint NOT NULL,
        status text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS payments_order ON payments (order_id);
    """,
)


@payment.activity("charge")
def charge(value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
    """Charge the order's total; the card ``"declined"`` is refused with PaymentDeclined."""
    request = _object(value, "the charge request")
    order_id = _text(request, "order_id")
    amount = _count(request, "amount", minimum=0)
    if _text(request, "card") == "declined":
        raise PaymentDeclined(f"order {order_id}: card declined")
    if PAYMENT_LATENCY_S:
        time.sleep(PAYMENT_LATENCY_S)  # stands in for the card network's round trip
    charge_id = f"ch-{uuid.uuid4()}"
    ctx.db.execute(
        "INSERT INTO payments (charge_id, order_id, amount, status) VALUES (%s, %s, %s, 'charged')",
        (charge_id, order_id, amount),
    )
    return {"charge_id": charge_id}


@payment.activity("refund")
def refund(value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
    """Refund a charge (``charge_id``), or every charge of an order (``order_id``: what a
    saga that gave up on a charge sends); refunding twice changes nothing."""
    request = _object(value, "the refund request")
    if "charge_id" not in request:
        order_id = _text(request, "order_id")
        rows = ctx.db.execute(
            "UPDATE payments SET status = 'refunded' WHERE order_id = %s AND status <> "
            "'refunded' RETURNING charge_id",
            (order_id,),
        ).fetchall()
        return {"order_id": order_id, "refunded": sorted(row[0] for row in rows)}
    charge_id = _text(request, "charge_id")
    row = ctx.db.execute(
        "SELECT status FROM payments WHERE charge_id = %s FOR UPDATE", (charge_id,)
    ).fetchone()
    if row is None:
        raise ChargeNotFound(f"charge {charge_id} does not exist")
    if row[0] != "refunded":
        ctx.db.execute("UPDATE payments SET status = 'refunded' WHERE charge_id = %s", (charge_id,))
    return {"charge_id": charge_id, "refunded": True}


# --- shipping -----------------------------------------------------------------------

shipping = Participant(
    "shipping",
    setup_sql="""
    CREATE TABLE IF NOT EXISTS shipments (
        shipment_id text PRIMARY KEY,
        order_id text NOT NULL,
        address text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS shipments_order ON shipments (order_id);
    """,
)


@shipping.activity("schedule")
def schedule(value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
    """Book a shipment of the order to its address."""
    request = _object(value, "the schedule request")
    order_id = _text(request, "order_id")
    address = _text(request, "address")
    shipment_id = f"sh-{uuid.uuid4()}"
    ctx.db.execute(
        "INSERT INTO shipments (shipment_id, order_id, address) VALUES (%s, %s, %s)",
        (shipment_id, order_id, address),
    )
    return {"shipment_id": shipment_id}
