"""Typed payloads on the workflow side (issue 13): the workflow function's input hint,
``ctx.activity(..., result_type=)``, typed results and handler arguments, the registry's
converter with a codec, and what happens when a value does not fit its type.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

from pydantic import BaseModel

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.convert import DataConverter
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import UpdateWorkflow, WorkflowStatus
from orchestrator.testing import WorkflowTester
from tests.unit.conftest import WorkflowRun, assert_status, completed


@dataclasses.dataclass
class Item:
    sku: str
    qty: int = 1


@dataclasses.dataclass
class Order:
    order_id: str
    items: list[Item]


class Reservation(BaseModel):
    reservation_id: str
    skus: list[str]


@dataclasses.dataclass
class Receipt:
    order_id: str
    reservation: str
    lines: int


seen: list[Any] = []


async def typed_order(ctx: WorkflowContext, order: Order) -> Receipt:
    seen.append(order)
    reservation = await ctx.activity("inventory.reserve", order, result_type=Reservation)
    seen.append(reservation)
    return Receipt(order.order_id, reservation.reservation_id, len(order.items))


def _registry(converter: DataConverter | None = None) -> WorkflowRegistry:
    registry = WorkflowRegistry() if converter is None else WorkflowRegistry(converter=converter)
    registry.workflow("typed.order")(typed_order)
    return registry


def test_input_activity_values_and_result_convert_by_their_types() -> None:
    seen.clear()
    run = WorkflowRun(_registry(), "typed.order", run_id="r1")
    run.start({"order_id": "o-1", "items": [{"sku": "a", "qty": 2}, {"sku": "b"}]})
    assert seen == [Order("o-1", [Item("a", 2), Item("b", 1)])]
    # The activity's argument is the dataclass written as JSON, fields sorted.
    task = run.sent[0]
    assert decode_json(task.payload) == {
        "items": [{"qty": 2, "sku": "a"}, {"qty": 1, "sku": "b"}],
        "order_id": "o-1",
    }
    run.complete(0, {"reservation_id": "r-9", "skus": ["a", "b"]})
    assert seen[-1] == Reservation(reservation_id="r-9", skus=["a", "b"])
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.record is not None and run.record.result is not None
    assert decode_json(run.record.result) == {"lines": 2, "order_id": "o-1", "reservation": "r-9"}


def test_plain_values_are_written_byte_for_byte_as_before() -> None:
    async def plain(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
        return await ctx.activity("p.x", {"b": 1, "a": [1.5, None, "é"]})

    registry = WorkflowRegistry()
    registry.workflow("plain")(plain)
    run = WorkflowRun(registry, "plain", run_id="r1")
    run.start({"z": 1})
    assert run.sent[0].payload == encode_json({"b": 1, "a": [1.5, None, "é"]})


def test_an_input_that_does_not_fit_the_type_parks_the_workflow_with_the_place() -> None:
    run = WorkflowRun(_registry(), "typed.order", run_id="r1")
    run.start({"order_id": "o-2", "items": [{"sku": 7}]})
    assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    assert run.record is not None and run.record.failure is not None
    message = run.record.failure.message
    assert "input does not convert" in message and "items[0].sku" in message


def test_a_result_that_does_not_fit_its_type_raises_at_the_await() -> None:
    run = WorkflowRun(_registry(), "typed.order", run_id="r1")
    run.start({"order_id": "o-3", "items": []})
    run.complete(0, {"reservation_id": 5})
    assert_status(run.record, WorkflowStatus.FAILED, "PayloadEncodingError")
    assert run.record is not None and run.record.failure is not None
    assert "Reservation" in run.record.failure.message


class Zlib:
    name = "zlib"

    def encode(self, data: bytes) -> bytes:
        return zlib.compress(data)

    def decode(self, data: bytes) -> bytes:
        return zlib.decompress(data)


def test_the_registry_converter_codec_applies_to_everything_the_code_writes() -> None:
    registry = _registry(DataConverter(codecs=[Zlib()]))
    run = WorkflowRun(registry, "typed.order", run_id="r1")
    converter = registry.converter
    run.start(input_payload=converter.to_payload({"order_id": "o-4", "items": [{"sku": "a"}]}))
    task = run.sent[0]
    assert task.payload.encoding == "json/plain+zlib"
    assert converter.from_payload(task.payload)["order_id"] == "o-4"
    result = converter.to_payload({"reservation_id": "r-1", "skus": ["a"]})
    run.send(completed(run.workflow_id, 0, 1, None, run.now_ms, result=result, run_id="r1"))
    assert run.record is not None and run.record.result is not None
    assert run.record.result.encoding == "json/plain+zlib"
    assert converter.from_payload(run.record.result, Receipt) == Receipt("o-4", "r-1", 1)


def test_update_handlers_take_typed_arguments() -> None:
    async def cart(ctx: WorkflowContext, _: Any) -> list[Item]:
        items: list[Item] = []

        def add(item: Item) -> int:
            items.append(item)
            return len(items)

        ctx.on_update("add", add)
        await ctx.wait_signal("checkout")
        return items

    registry = WorkflowRegistry()
    registry.workflow("cart")(cart)
    run = WorkflowRun(registry, "cart", run_id="r1")
    run.start()
    update = UpdateWorkflow(run.workflow_id, "u1", "add", encode_json({"sku": "x"}), run.now_ms)
    transition = run.send(update)
    assert transition.reply is not None and transition.reply.ok
    assert transition.reply.payload is not None and decode_json(transition.reply.payload) == 1


def test_the_tester_scripts_and_returns_typed_values() -> None:
    tester = WorkflowTester(_registry())
    tester.activity("inventory.reserve").returns(Reservation(reservation_id="r-5", skus=["a"]))
    result = tester.run("typed.order", Order("o-5", [Item("a")]))
    assert result.status is WorkflowStatus.COMPLETED
    assert result.result == Receipt("o-5", "r-5", 1)
    assert result.calls[0].value == {"items": [{"qty": 1, "sku": "a"}], "order_id": "o-5"}


@dataclasses.dataclass
class Approval:
    by: str
    level: int = 1


def test_signals_and_promises_take_their_value_type() -> None:
    async def approved(ctx: WorkflowContext, _: Any) -> Any:
        approval = await ctx.wait_signal("approve", value_type=Approval)
        paid = await ctx.promise("paid", value_type=Item)
        late = await ctx.wait_signal("late", timeout=60, value_type=list[Item])
        return [approval.by, approval.level, paid.sku, [i.qty for i in late]]

    tester = WorkflowTester(_registry_of(approved))
    tester.signal("approve", {"by": "ann"}, at=1)
    tester.complete_promise("paid", {"sku": "tea", "qty": 3}, after=1)
    tester.signal("late", [{"sku": "a"}, {"sku": "b", "qty": 2}], at=3)
    result = tester.run("approved")
    assert result.status is WorkflowStatus.COMPLETED, result
    assert result.result == ["ann", 1, "tea", [1, 2]]


def test_a_signal_that_does_not_fit_raises_at_the_await() -> None:
    async def strict(ctx: WorkflowContext, _: Any) -> Any:
        try:
            await ctx.wait_signal("approve", value_type=Approval)
        except Exception as exc:
            return type(exc).__name__
        return "fit"

    tester = WorkflowTester(_registry_of(strict))
    tester.signal("approve", {"level": 2}, at=1)  # no "by"
    result = tester.run("strict")
    assert result.result == "PayloadEncodingError"


def _registry_of(fn: Any) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow(fn.__name__)(fn)
    return registry
