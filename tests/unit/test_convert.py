"""Typed payloads: the converter chain, its codec slot, type hints, and the participant and
client that use them. No broker, no database."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import gc
import logging
import os
import subprocess
import sys
import weakref
import zlib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Generic,
    Literal,
    NewType,
    TypedDict,
    TypeVar,
    cast,
    get_args,
)
from uuid import UUID

import psycopg
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.client import RequestFailedError, WorkflowClient
from orchestrator.convert import (
    DEFAULT_CONVERTER,
    DEFAULT_LINKS,
    UNHANDLED,
    DataConverter,
    PayloadEncodingError,
    ValuePath,
    input_hint,
    return_hint,
)
from orchestrator.errors import ConfigurationError
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityTask,
    CompletePromise,
    Failure,
    InboxBody,
    Payload,
    QueryWorkflow,
    Reply,
    ReplyKind,
    SignalWorkflow,
    StartWorkflow,
    UpdateAccepted,
    UpdateWorkflow,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.replay import advance
from orchestrator.replay.driver import replay
from orchestrator.testing import WorkflowTester
from participants import ActivityContext, Participant
from participants.participant import Outcome

if TYPE_CHECKING:
    from decimal import Context as OnlyForTypeCheckers

REPO = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000_000


class Priority(enum.Enum):
    NORMAL = "normal"
    RUSH = "rush"


class Size(enum.IntEnum):
    SMALL = 1
    LARGE = 2


@dataclasses.dataclass(frozen=True)
class Item:
    sku: str
    quantity: int = 1


@dataclasses.dataclass(frozen=True)
class Order:
    order_id: str
    items: tuple[Item, ...]
    placed_at: dt.datetime
    total: Decimal
    priority: Priority = Priority.NORMAL
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class Reservation:
    reservation_id: UUID
    order_id: str
    skus: frozenset[str]
    ship_on: dt.date
    sizes: dict[str, Size] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Catalogue:
    by_sku: dict[str, Item]
    pages: list[list[Item]]
    best: Item | None = None
    window: tuple[dt.time, dt.time] | None = None
    kind: Literal["retail", "wholesale"] = "retail"


T = TypeVar("T")


@dataclasses.dataclass
class Box(Generic[T]):
    content: T
    spares: list[T]


@dataclasses.dataclass
class Positive:
    amount: int

    def __post_init__(self) -> None:
        if self.amount <= 0:
            raise ValueError(f"amount must be positive, not {self.amount}")


@dataclasses.dataclass
class Derived:
    base: int
    doubled: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.doubled = self.base * 2


@dataclasses.dataclass
class Card:
    kind: Literal["card"]
    number: str


@dataclasses.dataclass
class Transfer:
    kind: Literal["transfer"]
    iban: str


class Customer(pydantic.BaseModel):
    name: str
    email: str = pydantic.Field(alias="emailAddress")
    orders: list[Order] = []


class Shipment(TypedDict):
    carrier: str
    weight: Decimal


OrderId = NewType("OrderId", str)

ORDER = Order(
    order_id="o-1",
    items=(Item("sku-1", 2), Item("sku-2")),
    placed_at=dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC),
    total=Decimal("19.90"),
    priority=Priority.RUSH,
)
ORDER_JSON = {
    "order_id": "o-1",
    "items": [{"sku": "sku-1", "quantity": 2}, {"sku": "sku-2", "quantity": 1}],
    "placed_at": "2024-05-06T07:08:09.123456+00:00",
    "total": "19.90",
    "priority": "rush",
    "note": None,
}
RESERVATION = Reservation(
    UUID("12345678-1234-5678-1234-567812345678"),
    "o-1",
    frozenset({"sku-2", "sku-1", "sku-10"}),
    dt.date(2024, 5, 7),
    {"sku-1": Size.LARGE},
)
RESERVATION_JSON = {
    "reservation_id": "12345678-1234-5678-1234-567812345678",
    "order_id": "o-1",
    "skus": ["sku-1", "sku-10", "sku-2"],
    "ship_on": "2024-05-07",
    "sizes": {"sku-1": 2},
}


def _round_trip(value: Any, hint: Any, converter: DataConverter = DEFAULT_CONVERTER) -> Any:
    return converter.from_payload(converter.to_payload(value), hint)


# --- plain JSON stays byte for byte what it was ------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=25,
)


@given(JSON_VALUES)
def test_plain_json_values_give_the_bytes_encode_json_gives(value: Any) -> None:
    payload = DEFAULT_CONVERTER.to_payload(value)
    assert payload == encode_json(value)
    assert DEFAULT_CONVERTER.from_payload(payload) == decode_json(payload)
    assert DEFAULT_CONVERTER.to_json(value) == decode_json(payload)


def test_plain_json_edge_cases_are_byte_identical() -> None:
    for value in [
        {"b": 1, "a": {"d": [1, 2.5, None, True], "c": "é\ud800"}},
        {1: "one", 2: "two", 10: "ten"},  # json sorts int keys as ints, then writes text
        (1, "tuple", [2]),
        Priority.RUSH.value,
        Size.LARGE,  # an IntEnum is an int to json already
        -0.0,
        10**30,
    ]:
        assert DEFAULT_CONVERTER.to_payload(value) == encode_json(value), value


def test_key_order_does_not_change_the_bytes() -> None:
    forwards = {"a": 1, "b": {"x": 1, "y": 2}}
    backwards = {"b": {"y": 2, "x": 1}, "a": 1}
    assert DEFAULT_CONVERTER.to_payload(forwards) == DEFAULT_CONVERTER.to_payload(backwards)
    assert DEFAULT_CONVERTER.to_payload(ORDER) == DEFAULT_CONVERTER.to_payload(
        dataclasses.replace(ORDER)
    )


def test_sets_are_written_in_the_same_order_whatever_the_hash_seed() -> None:
    probe = (
        "import sys\n"
        "from orchestrator.convert import DEFAULT_CONVERTER\n"
        "tags = {f'tag-{i}' for i in range(40)}\n"
        "print(list(tags))\n"
        "print(DEFAULT_CONVERTER.to_payload({'tags': tags}).data.decode())\n"
    )
    outputs = []
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)},
        )
        outputs.append(done.stdout.splitlines())
    (order_1, bytes_1), (order_2, bytes_2) = outputs
    assert order_1 != order_2, "the seeds should iterate the set differently"
    assert bytes_1 == bytes_2
    tags = sorted(f"tag-{i}" for i in range(40))
    assert bytes_1 == encode_json({"tags": tags}).data.decode()


# --- typed values -------------------------------------------------------------------


def test_dataclasses_encode_as_objects_of_their_fields_and_come_back() -> None:
    assert DEFAULT_CONVERTER.to_payload(ORDER) == encode_json(ORDER_JSON)
    assert DEFAULT_CONVERTER.to_json(ORDER) == ORDER_JSON
    assert _round_trip(ORDER, Order) == ORDER
    assert DEFAULT_CONVERTER.to_payload(RESERVATION) == encode_json(RESERVATION_JSON)
    assert _round_trip(RESERVATION, Reservation) == RESERVATION
    # Without a hint the value is plain JSON.
    assert _round_trip(ORDER, Any) == ORDER_JSON


def test_nested_containers_of_dataclasses_round_trip() -> None:
    catalogue = Catalogue(
        by_sku={"sku-1": Item("sku-1", 3)},
        pages=[[Item("a"), Item("b", 2)], []],
        best=Item("a"),
        window=(dt.time(9, 30), dt.time(17, 0)),
        kind="wholesale",
    )
    assert _round_trip(catalogue, Catalogue) == catalogue
    assert _round_trip([ORDER, ORDER], list[Order]) == [ORDER, ORDER]
    assert _round_trip({"x": ORDER}, dict[str, Order]) == {"x": ORDER}
    assert _round_trip({3: Item("a")}, dict[int, Item]) == {3: Item("a")}
    assert _round_trip({Priority.RUSH: 1}, dict[Priority, int]) == {Priority.RUSH: 1}
    assert _round_trip((ORDER,), tuple[Order, ...]) == (ORDER,)
    assert _round_trip({Item("a"), Item("b")}, set[Item]) == {Item("a"), Item("b")}
    assert _round_trip(Box(Item("a"), [Item("b")]), Box[Item]) == Box(Item("a"), [Item("b")])


def test_optional_fields_defaults_and_unknown_keys() -> None:
    minimal: dict[str, Any] = {"by_sku": {}, "pages": []}
    assert DEFAULT_CONVERTER.from_json(minimal, Catalogue) == Catalogue({}, [])
    # A newer writer's extra field is ignored, so old and new code can run side by side.
    newer = {**ORDER_JSON, "coupon": "SPRING"}
    assert DEFAULT_CONVERTER.from_json(newer, Order) == ORDER
    assert DEFAULT_CONVERTER.from_json(None, Order | None) is None
    assert DEFAULT_CONVERTER.from_json(ORDER_JSON, Order | None) == ORDER
    # init=False fields are written for readers, and computed again on the way back.
    assert DEFAULT_CONVERTER.to_json(Derived(4)) == {"base": 4, "doubled": 8}
    assert DEFAULT_CONVERTER.from_json({"base": 4, "doubled": 99}, Derived) == Derived(4)


def test_scalars_literals_newtypes_annotated_and_typed_dicts() -> None:
    c = DEFAULT_CONVERTER
    assert c.from_json(5, float) == 5.0 and type(c.from_json(5, float)) is float
    assert c.from_json("o-1", OrderId) == "o-1"
    assert c.from_json(2, Annotated[Size, "doc"]) is Size.LARGE
    assert c.from_json("rush", Literal[Priority.RUSH]) is Priority.RUSH
    assert c.from_json(12.5, Decimal) == Decimal("12.5")  # another language's number
    shipment = c.from_json({"carrier": "dhl", "weight": "1.5"}, Shipment)
    assert shipment == {"carrier": "dhl", "weight": Decimal("1.5")}
    naive = dt.datetime(2024, 1, 2, 3, 4)
    assert _round_trip(naive, dt.datetime) == naive
    assert _round_trip([1, "a"], tuple[int, str]) == (1, "a")


def test_unions_take_the_first_member_that_fits() -> None:
    card = {"kind": "card", "number": "4111"}
    transfer = {"kind": "transfer", "iban": "DE00"}
    assert DEFAULT_CONVERTER.from_json(card, Card | Transfer) == Card("card", "4111")
    assert DEFAULT_CONVERTER.from_json(transfer, Card | Transfer) == Transfer("transfer", "DE00")
    assert DEFAULT_CONVERTER.from_json("7", int | str) == "7"
    assert DEFAULT_CONVERTER.from_json(True, int | bool) is True


def test_pydantic_models_round_trip_with_their_aliases() -> None:
    customer = Customer(name="Ann", emailAddress="ann@example.com", orders=[ORDER])
    data = DEFAULT_CONVERTER.to_json(customer)
    assert data["emailAddress"] == "ann@example.com"
    assert _round_trip(customer, Customer) == customer
    assert _round_trip([customer], list[Customer]) == [customer]
    # A model inside a dataclass, and a dataclass inside a model.
    assert _round_trip(Box(customer, []), Box[Customer]) == Box(customer, [])


# --- errors name the type and the place ---------------------------------------------


@pytest.mark.parametrize(
    ("data", "hint", "message"),
    [
        (
            {**ORDER_JSON, "items": [{"sku": "a"}, {"sku": "b"}, {"sku": 5}]},
            Order,
            "Order.items[2].sku: expected str, got int",
        ),
        ({"sku": "a", "quantity": True}, Item, "Item.quantity: expected int, got bool"),
        ({"quantity": 1}, Item, "Item: missing field 'sku' of Item"),
        ([{"sku": 1}], list[Item], "value[0].sku: expected str, got int"),
        ({"x": {"sku": None}}, dict[str, Item], "value.x.sku: expected str, got None"),
        ({"a b": 1}, dict[str, str], "value['a b']: expected str, got int"),
        ({**ORDER_JSON, "priority": "slow"}, Order, "Order.priority: 'slow' is not a value"),
        ({**ORDER_JSON, "placed_at": "soon"}, Order, "Order.placed_at: 'soon' is not a valid"),
        ({**ORDER_JSON, "note": 3}, Order, "Order.note: expected str, got int"),
        ("x", Order, "Order: expected an object for Order, got str"),
        ({"amount": -1}, Positive, "Positive: Positive(...) raised ValueError: amount must"),
        ({"kind": "cash"}, Card | Transfer, "value: matches no member of Card | Transfer"),
        ([1, 2, 3], tuple[int, int], "value: expected 2 items, got 3"),
        ({"name": 5, "emailAddress": "e"}, Customer, "Customer.name: Input should be a valid"),
        ("x", bytes, "value: no converter for type bytes"),
    ],
)
def test_decoding_errors_name_the_place(data: Any, hint: Any, message: str) -> None:
    with pytest.raises(PayloadEncodingError) as caught:
        DEFAULT_CONVERTER.from_json(data, hint)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": [1, {"b": object()}]}, "value.a[1].b: no converter for a value of type object"),
        (Item(cast(str, b"raw")), "Item.sku: no converter for a value of type bytes"),
        ({"x": [float("nan")]}, "value.x[0]: nan cannot be written as JSON"),
        (Box({"k": float("inf")}, []), "Box.content.k: inf cannot be written as JSON"),
        ({1: "a", "b": 2}, "value is not JSON-serialisable"),
    ],
)
def test_encoding_errors_name_the_place(value: Any, message: str) -> None:
    with pytest.raises(PayloadEncodingError) as caught:
        DEFAULT_CONVERTER.to_payload(value)
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_value_that_contains_itself_is_an_encoding_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(PayloadEncodingError, match="contains itself"):
        DEFAULT_CONVERTER.to_payload(loop)


def test_payloads_the_converter_cannot_read() -> None:
    with pytest.raises(PayloadEncodingError, match="'avro/binary' is not supported"):
        DEFAULT_CONVERTER.from_payload(Payload(b"{}", "avro/binary"))
    with pytest.raises(PayloadEncodingError, match="not valid JSON"):
        DEFAULT_CONVERTER.from_payload(Payload(b"{not json"))


# --- the chain is open: a link of one's own -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Money:
    cents: int
    currency: str


class MoneyAsText:
    """A link that writes Money as "EUR 12.34"."""

    def to_json(self, value: Any, path: ValuePath) -> Any:
        if not isinstance(value, Money):
            return UNHANDLED
        return f"{value.currency} {value.cents / 100:.2f}"

    def from_json(self, data: Any, hint: Any, path: ValuePath) -> Any:
        if hint is not Money:
            return UNHANDLED
        if not isinstance(data, str) or " " not in data:
            raise path.error(f"expected 'CUR 0.00', got {data!r}")
        currency, amount = data.split(" ")
        return Money(round(float(amount) * 100), currency)


def test_a_link_ahead_of_the_defaults_takes_its_types_at_any_depth() -> None:
    converter = DataConverter(links=(MoneyAsText(), *DEFAULT_LINKS))
    boxed = Box(Money(1234, "EUR"), [Money(5, "USD")])
    assert converter.to_json(boxed) == {"content": "EUR 12.34", "spares": ["USD 0.05"]}
    assert _round_trip(boxed, Box[Money], converter) == boxed
    with pytest.raises(PayloadEncodingError, match=r"^Box\.spares\[0\]: expected 'CUR 0.00'"):
        converter.from_json({"content": "EUR 1.00", "spares": ["x"]}, Box[Money])
    # The default chain writes the same dataclass by its fields.
    assert DEFAULT_CONVERTER.to_json(Money(5, "USD")) == {"cents": 5, "currency": "USD"}


# --- the codec slot -----------------------------------------------------------------


class Zlib:
    name = "zlib"

    def encode(self, data: bytes) -> bytes:
        return zlib.compress(data)

    def decode(self, data: bytes) -> bytes:
        return zlib.decompress(data)


class Reverse:
    name = "reverse"

    def encode(self, data: bytes) -> bytes:
        return data[::-1]

    def decode(self, data: bytes) -> bytes:
        return data[::-1]


def test_codecs_apply_in_order_and_name_themselves_in_the_encoding() -> None:
    converter = DataConverter(codecs=(Zlib(), Reverse()))
    payload = converter.to_payload(ORDER)
    assert payload.encoding == converter.encoding == "json/plain+zlib+reverse"
    assert payload.data == zlib.compress(encode_json(ORDER_JSON).data)[::-1]
    assert converter.from_payload(payload, Order) == ORDER
    # Payloads written before the codec was configured stay readable.
    assert converter.from_payload(encode_json(ORDER_JSON), Order) == ORDER


def test_a_payload_whose_codec_this_converter_lacks_is_a_clear_error() -> None:
    payload = DataConverter(codecs=(Zlib(),)).to_payload(ORDER)
    with pytest.raises(PayloadEncodingError, match=r"needs codec 'zlib'.*has: none"):
        DEFAULT_CONVERTER.from_payload(payload, Order)
    garbage = Payload(b"not zlib", "json/plain+zlib")
    with pytest.raises(PayloadEncodingError, match="codec 'zlib' could not decode"):
        DataConverter(codecs=(Zlib(),)).from_payload(garbage)


def test_codec_names_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="given twice"):
        DataConverter(codecs=(Zlib(), Zlib()))
    bad = Reverse()
    bad.name = "a+b"
    with pytest.raises(ConfigurationError, match="must be 1-64 letters"):
        DataConverter(codecs=(bad,))


# --- type hints of functions ----------------------------------------------------------


def reserve(order: Order, *, ctx: ActivityContext) -> Reservation:
    raise AssertionError("not called")


async def process(ctx: object, order: Order, *rest: Item) -> list[Reservation]:
    raise AssertionError("not called")


def untyped(value, *, ctx):  # type: ignore[no-untyped-def]
    raise AssertionError("not called")


def annotated(value: Annotated[Order, "the order"]) -> None:
    raise AssertionError("not called")


class Handlers:
    def charge(self, order: Order) -> Money:
        raise AssertionError("not called")


def test_hints_come_from_string_annotations() -> None:
    # This module has `from __future__ import annotations`: every annotation is a string.
    assert isinstance(reserve.__annotations__["order"], str)
    assert (input_hint(reserve, 0), return_hint(reserve)) == (Order, Reservation)
    assert input_hint(process, 1) is Order
    assert return_hint(process) == list[Reservation]
    assert input_hint(process, 2) is Item and input_hint(process, 5) is Item  # *rest
    assert input_hint(annotated, 0) is Order
    assert return_hint(annotated) is type(None)


def test_hints_come_from_evaluated_annotations() -> None:
    def handler(value, *, ctx):  # type: ignore[no-untyped-def]
        raise AssertionError("not called")

    handler.__annotations__ = {"value": list[Order], "return": Reservation | None}
    assert input_hint(handler, 0) == list[Order]
    assert return_hint(handler) == Reservation | None


def test_missing_hints_are_any() -> None:
    assert input_hint(untyped, 0) is Any and return_hint(untyped) is Any
    assert input_hint(reserve, 1) is Any  # ctx is keyword-only
    assert input_hint(len, 0) is Any


def test_wrapped_partial_and_bound_callables_keep_their_hints() -> None:
    @functools.wraps(reserve)
    def logged(*args: Any, **kwargs: Any) -> Any:
        return reserve(*args, **kwargs)

    assert input_hint(logged, 0) is Order and return_hint(logged) is Reservation
    assert input_hint(functools.partial(process, None), 0) is Order
    assert input_hint(Handlers().charge, 0) is Order
    assert return_hint(Handlers().charge) is Money


def test_unresolvable_hints_are_any_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def hidden(value: OnlyForTypeCheckers) -> OnlyForTypeCheckers:
        raise AssertionError("not called")

    with caplog.at_level(logging.WARNING, logger="orchestrator.convert"):
        assert input_hint(hidden, 0) is Any
        assert return_hint(hidden) is Any
        assert input_hint(hidden, 0) is Any  # cached: no second warning
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned
    assert (
        "parameter 'value' of test_unresolvable_hints_are_any_and_logged_once.<locals>.hidden"
        in warned[0]
        and "OnlyForTypeCheckers" in warned[0]
    )


def test_a_class_local_to_a_function_cannot_be_resolved_and_stays_plain_json(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @dataclasses.dataclass
    class Local:
        x: int

    def handler(value: Local) -> None:
        raise AssertionError("not called")

    with caplog.at_level(logging.WARNING, logger="orchestrator.convert"):
        assert input_hint(handler, 0) is Any
    assert "Local" in caplog.text


# --- participants ---------------------------------------------------------------------


class _NoDatabase:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"handler used ctx.db.{name}")


NO_DB = cast(psycopg.Connection[Any], _NoDatabase())


def _task(activity: str, payload: Payload, **extra: Any) -> ActivityTask:
    return ActivityTask(
        workflow_id="order-1",
        workflow_type="order.process",
        activity_id="order-1/3/1",
        seq=3,
        attempt=1,
        participant="inventory",
        activity=activity,
        payload=payload,
        scheduled_at_ms=NOW - 5,
        **extra,
    )


class _Reporter:
    def __init__(self) -> None:
        self.beats: list[Payload | None] = []

    def started(self, started_at_ms: int, deadline: object) -> None:
        pass

    def heartbeat(self, details: Payload | None) -> None:
        self.beats.append(details)


@dataclasses.dataclass(frozen=True)
class Progress:
    done: int


def _inventory(converter: DataConverter = DEFAULT_CONVERTER) -> tuple[Participant, list[Any]]:
    svc = Participant("inventory", converter=converter)
    seen: list[Any] = []

    @svc.activity("reserve")
    def reserve(order: Order, *, ctx: ActivityContext) -> Reservation:
        seen.append(order)
        ctx.heartbeat(Progress(len(order.items)))
        return RESERVATION

    @svc.activity("count")
    async def count(orders: list[Order], *, ctx: ActivityContext) -> int:
        seen.append(orders)
        return sum(len(o.items) for o in orders)

    @svc.activity("echo")
    def echo(value: Any, *, ctx: ActivityContext) -> Any:
        seen.append(value)
        return value

    return svc, seen


def test_a_typed_handler_gets_its_dataclass_and_its_result_is_converted() -> None:
    svc, seen = _inventory()
    reporter = _Reporter()
    task = _task("reserve", encode_json(ORDER_JSON))
    outcome = svc.run_task(task, NO_DB, now_ms=lambda: NOW, reporter=reporter)
    assert seen == [ORDER]
    assert outcome == Outcome.completed(encode_json(RESERVATION_JSON), NOW)
    assert reporter.beats == [encode_json({"done": 2})]
    counted = svc.run_task(_task("count", encode_json([ORDER_JSON])), NO_DB, now_ms=lambda: NOW)
    assert counted == Outcome.completed(encode_json(2), NOW)
    assert seen[-1] == [ORDER]


def test_an_untyped_handler_still_gets_plain_json() -> None:
    svc, seen = _inventory()
    outcome = svc.run_task(_task("echo", encode_json(ORDER_JSON)), NO_DB, now_ms=lambda: NOW)
    assert seen == [ORDER_JSON]
    assert outcome == Outcome.completed(encode_json(ORDER_JSON), NOW)


def test_an_input_that_does_not_fit_the_handler_fails_for_good_without_running_it() -> None:
    svc, seen = _inventory()
    broken = {**ORDER_JSON, "items": [{"sku": 7}]}
    outcome = svc.run_task(_task("reserve", encode_json(broken)), NO_DB, now_ms=lambda: NOW)
    assert seen == []
    assert outcome.failure == Failure(
        "PayloadEncodingError",
        "input of activity inventory.reserve: Order.items[0].sku: expected str, got int",
        False,
    )


def test_a_participant_with_a_codec_reads_and_writes_through_it() -> None:
    converter = DataConverter(codecs=(Zlib(),))
    svc, seen = _inventory(converter)
    reporter = _Reporter()
    task = _task("reserve", converter.to_payload(ORDER))
    outcome = svc.run_task(task, NO_DB, now_ms=lambda: NOW, reporter=reporter)
    assert seen == [ORDER]
    assert outcome.result is not None and outcome.result.encoding == "json/plain+zlib"
    assert converter.from_payload(outcome.result, Reservation) == RESERVATION
    assert reporter.beats == [converter.to_payload(Progress(2))]
    # Without the codec the participant fails the task for good, naming what is missing.
    plain, _ = _inventory()
    refused = plain.run_task(task, NO_DB, now_ms=lambda: NOW)
    assert refused.failure is not None and not refused.failure.retryable
    assert "needs codec 'zlib'" in refused.failure.message


def test_heartbeat_details_reach_the_next_attempt_as_plain_json() -> None:
    svc = Participant("inventory")
    previous: list[Any] = []

    @svc.activity("resume")
    def resume(value: Any, *, ctx: ActivityContext) -> None:
        previous.append(ctx.heartbeat_details)

    task = _task("resume", encode_json(None), heartbeat_details=encode_json({"done": 1}))
    assert svc.run_task(task, NO_DB, now_ms=lambda: NOW).is_completed
    assert previous == [{"done": 1}]


# --- the client -----------------------------------------------------------------------


def _client(
    monkeypatch: pytest.MonkeyPatch,
    converter: DataConverter = DEFAULT_CONVERTER,
    answer: Payload | None = None,
) -> tuple[WorkflowClient, list[InboxBody]]:
    """A client without Kafka: what it would send is kept, requests get ``answer``."""
    client = WorkflowClient.__new__(WorkflowClient)
    client.converter = converter
    sent: list[InboxBody] = []

    def send(body: InboxBody, key: bytes | None, partition: int | None = None) -> None:
        sent.append(body)

    def request(body: InboxBody, workflow_id: str, request_id: str, timeout_s: float) -> Reply:
        sent.append(body)
        ok = answer is not None
        failure = None if ok else Failure("UnknownQuery", "no handler 'total'")
        return Reply(
            request_id,
            ReplyKind.QUERY,
            workflow_id,
            "r1",
            ok,
            "RUNNING",
            NOW,
            False,
            answer,
            failure,
        )

    monkeypatch.setattr(client, "_send", send)
    monkeypatch.setattr(client, "_request", request)
    return client, sent


def test_the_client_converts_what_it_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    client, sent = _client(monkeypatch)
    client.start("order.process", ORDER, workflow_id="o-1")
    client.signal("o-1", "approve", Progress(1), start=("order.process", ORDER))
    client.complete_promise("o-1/r1/p4", RESERVATION)
    start, signal, promise = sent
    assert isinstance(start, StartWorkflow) and start.input == encode_json(ORDER_JSON)
    assert isinstance(signal, SignalWorkflow) and signal.payload == encode_json({"done": 1})
    assert signal.start is not None and signal.start.input == encode_json(ORDER_JSON)
    assert isinstance(promise, CompletePromise)
    assert promise.payload == encode_json(RESERVATION_JSON)
    with pytest.raises(PayloadEncodingError, match=r"^Item\.sku: no converter"):
        client.start("order.process", Item(cast(str, object())))


def test_the_client_decodes_answers_into_the_type_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, sent = _client(monkeypatch, answer=encode_json(ORDER_JSON))
    assert client.query("o-1", "order", Item("a"), result_type=Order) == ORDER
    assert client.update("o-1", "order", result_type=Order) == ORDER
    assert client.query("o-1", "order") == ORDER_JSON
    query, update = sent[0], sent[1]
    assert isinstance(query, QueryWorkflow) and query.args == encode_json(
        {"sku": "a", "quantity": 1}
    )
    assert isinstance(update, UpdateWorkflow) and update.args == encode_json(None)
    refusing, _ = _client(monkeypatch)
    with pytest.raises(RequestFailedError, match="UnknownQuery"):
        refusing.query("o-1", "total", result_type=Order)


def test_the_client_decodes_a_result_into_its_type(monkeypatch: pytest.MonkeyPatch) -> None:
    converter = DataConverter(codecs=(Zlib(),))
    client, _ = _client(monkeypatch, converter)
    record = WorkflowRecord(
        workflow_id="o-1",
        workflow_type="order.process",
        status=WorkflowStatus.COMPLETED,
        input=converter.to_payload(ORDER),
        started_at_ms=NOW,
        updated_at_ms=NOW,
        result=converter.to_payload(RESERVATION),
    )
    typed = client._outcome(record, Reservation)
    assert (typed.status, typed.value) == (WorkflowStatus.COMPLETED, RESERVATION)
    assert client._outcome(record, Any).value == RESERVATION_JSON
    with pytest.raises(PayloadEncodingError, match="Order: missing field"):
        client._outcome(record, Order)


def test_callables_with_unhashable_types_are_read_uncached() -> None:
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, order: Order) -> Item:
            raise AssertionError("not called")

    handler = cast(Callable[..., Any], Unhashable())
    assert input_hint(handler, 0) is Order and return_hint(handler) is Item


# --- BaseExceptions from conversion: the converter lets them through, its users decide ---


class Halt(BaseException):
    """What user code (a validator, a link, a codec) may raise: not an Exception."""


class Picky(pydantic.BaseModel):
    x: int

    @pydantic.field_validator("x")
    @classmethod
    def _not_13(cls, x: int) -> int:
        if x == 13:
            raise Halt("unlucky")
        return x


class HaltingLink:
    def to_json(self, value: Any, path: ValuePath) -> Any:
        if isinstance(value, Item):
            raise Halt("to_json")
        return UNHANDLED

    def from_json(self, data: Any, hint: Any, path: ValuePath) -> Any:
        if hint is Item:
            raise Halt("from_json")
        return UNHANDLED


class HaltingCodec:
    name = "halting"

    def __init__(self, encode: bool = False) -> None:
        self._encode = encode

    def encode(self, data: bytes) -> bytes:
        if self._encode:
            raise Halt("codec encode")
        return data

    def decode(self, data: bytes) -> bytes:
        raise Halt("codec decode")


def test_the_converter_lets_a_base_exception_through_unchanged() -> None:
    # Every Exception becomes a PayloadEncodingError; a BaseException that is not one is
    # left to the caller (the engine, the participant), which knows what it means there.
    linked = DataConverter(links=(HaltingLink(), *DEFAULT_LINKS))
    for call in (
        lambda: linked.to_payload([Item("a")]),
        lambda: linked.to_payload({Priority.RUSH: Item("a")}),  # the walk, not json's default
        lambda: linked.to_json(Item("a")),
        lambda: linked.from_json({"sku": "a"}, Item),
        lambda: linked.from_payload(encode_json([{"sku": "a"}]), list[Item]),
        lambda: DataConverter(codecs=(HaltingCodec(encode=True),)).to_payload(1),
        lambda: DataConverter(codecs=(HaltingCodec(),)).from_payload(
            Payload(b"1", "json/plain+halting")
        ),
        lambda: DEFAULT_CONVERTER.from_payload(encode_json({"x": 13}), Picky),
    ):
        with pytest.raises(Halt):
            call()


async def picky_input(ctx: WorkflowContext, value: Picky) -> int:
    return value.x


async def picky_result(ctx: WorkflowContext, value: Any) -> int:
    result = await ctx.activity("p.a", 1, result_type=Picky)
    return cast(int, result.x)


def test_a_base_exception_from_the_input_hints_validator_does_not_escape_replay() -> None:
    # replay(): "Never raises for anything the workflow code does". A validator on the
    # input's model is workflow code; it must park the workflow (a problem), not raise.
    try:
        result = replay(picky_input, "w", "t", {"x": 13}, (), 0)
    except BaseException as exc:
        pytest.fail(f"replay() raised {type(exc).__name__}: {exc}")
    assert result.problem is not None


def test_a_base_exception_from_a_result_types_validator_does_not_escape_replay() -> None:
    first = replay(picky_result, "w", "t", None, (), 0)
    [scheduled] = first.new_steps
    events = (scheduled, ActivityCompleted(0, 1, encode_json({"x": 13}), 1))
    try:
        result = replay(picky_result, "w", "t", None, events, 0)
    except BaseException as exc:
        pytest.fail(f"replay() raised {type(exc).__name__}: {exc}")
    assert result.problem is not None


def test_advance_does_not_raise_for_a_validator_base_exception() -> None:
    registry = WorkflowRegistry()
    registry.workflow("t")(picky_input)
    start = StartWorkflow("w", "t", encode_json({"x": 13}), NOW)
    try:
        transition = advance(None, start, NOW, registry, run_id="r")
    except BaseException as exc:
        pytest.fail(f"advance() raised {type(exc).__name__}: {exc}")
    assert transition.record is not None
    assert transition.record.status is WorkflowStatus.STUCK


@pytest.mark.parametrize("how", ["validator", "codec"])
def test_a_participant_answers_a_task_whose_input_conversion_raises_a_base_exception(
    how: str,
) -> None:
    # run_task never raises for what the handler does, and its input's validator or the
    # participant's codec is no different: escaping, a BaseException would stop the
    # participant with the offset uncommitted, and the same task would stop it again
    # after every restart. The same bytes meet the same code on every attempt: for good.
    converter = DataConverter(codecs=(HaltingCodec(),)) if how == "codec" else DEFAULT_CONVERTER
    svc = Participant("inventory", converter=converter)

    @svc.activity("reserve")
    def reserve(value: Picky, *, ctx: ActivityContext) -> int:
        raise AssertionError("must not run")

    payload = (
        Payload(b'{"x":1}', "json/plain+halting") if how == "codec" else encode_json({"x": 13})
    )
    try:
        outcome = svc.run_task(_task("reserve", payload), NO_DB, now_ms=lambda: NOW)
    except BaseException as exc:
        pytest.fail(f"run_task raised {type(exc).__name__}: {exc}")
    assert outcome.failure is not None and not outcome.failure.retryable
    assert outcome.failure.error_type == "Halt"
    reason = "codec decode" if how == "codec" else "unlucky"
    assert outcome.failure.message == (
        f"input of activity inventory.reserve: converting it raised Halt: {reason}"
    )


def test_heartbeat_details_a_codec_cannot_read_reach_the_handler_as_none() -> None:
    svc = Participant("inventory", converter=DataConverter(codecs=(HaltingCodec(),)))
    previous: list[Any] = []

    @svc.activity("resume")
    def resume(value: Any, *, ctx: ActivityContext) -> None:
        previous.append(ctx.heartbeat_details)

    details = Payload(b"{}", "json/plain+halting")
    task = _task("resume", encode_json(None), heartbeat_details=details)
    assert svc.run_task(task, NO_DB, now_ms=lambda: NOW).is_completed
    assert previous == [None]


# --- hints are cached per def, holding no function ------------------------------------


@dataclasses.dataclass
class Add:
    n: int


class _State:
    pass


_states: list[weakref.ref[_State]] = []


async def with_update_handler(ctx: WorkflowContext, value: Any) -> None:
    state = _State()
    _states.append(weakref.ref(state))
    total = [0]

    def on_add(item: Add) -> int:  # a closure: a new function object on every replay
        total[0] += item.n
        assert state is not None
        return total[0]

    ctx.on_update("add", on_add)
    await ctx.wait_signal("never")


def test_replays_do_not_keep_each_replays_handler_closures_alive() -> None:
    # Update and query handlers are closures defined in the workflow body: each replay's
    # handler is a new function, and what it captures (the workflow's state, ctx and
    # through it the replayer) must go with its replay, not live on in a hint cache.
    _states.clear()
    events = tuple(UpdateAccepted(f"u{i}", "add", encode_json({"n": i}), i) for i in range(3))
    for _ in range(20):
        result = replay(with_update_handler, "w", "t", None, events, 0)
        assert result.problem is None, result.problem
    gc.collect()
    alive = sum(1 for ref in _states if ref() is not None)
    assert alive == 0, f"{alive} of {len(_states)} replays' workflow state still alive"


async def with_unresolvable_handler_hint(ctx: WorkflowContext, value: Any) -> None:
    def on_add(item: NotDefinedAnywhere) -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    ctx.on_update("add", on_add)
    await ctx.wait_signal("never")


def test_an_unresolvable_handler_hint_is_warned_once_not_on_every_replay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = (UpdateAccepted("u0", "add", encode_json({"n": 1}), 1),)
    with caplog.at_level(logging.WARNING, logger="orchestrator.convert"):
        for _ in range(5):
            replay(with_unresolvable_handler_hint, "w", "t", None, events, 0)
    warned = [r for r in caplog.records if "NotDefinedAnywhere" in r.getMessage()]
    assert len(warned) == 1, f"warned {len(warned)} times"


def test_a_local_class_in_an_evaluated_annotation_is_resolved_for_each_closure() -> None:
    # Without the future import a local class is the annotation itself (set here by hand,
    # as this module has the import): it is resolved, and each closure of the def gets
    # its own class, never the one an earlier closure (an earlier replay) had.
    def define() -> tuple[Callable[..., Any], type[Any]]:
        @dataclasses.dataclass
        class Local:
            x: int

        def handler(value, *, ctx):  # type: ignore[no-untyped-def]
            raise AssertionError("not called")

        handler.__annotations__ = {"value": Local, "return": list[Local]}
        return handler, Local

    (first, first_cls), (second, second_cls) = define(), define()
    assert input_hint(first, 0) is first_cls and input_hint(second, 0) is second_cls
    assert get_args(return_hint(second)) == (second_cls,)
    assert get_args(return_hint(first)) == (first_cls,)
    assert DEFAULT_CONVERTER.from_json({"x": 1}, input_hint(second, 0)) == second_cls(1)


def test_functions_wrapped_by_one_decorator_keep_their_own_hints() -> None:
    def logged(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:  # one code object for both
            return fn(*args, **kwargs)

        return wrapper

    @logged
    def takes_order(order: Order) -> Item:
        raise AssertionError("not called")

    @logged
    def takes_item(item: Item) -> Order:
        raise AssertionError("not called")

    assert (input_hint(takes_order, 0), return_hint(takes_order)) == (Order, Item)
    assert (input_hint(takes_item, 0), return_hint(takes_item)) == (Item, Order)


def test_bound_methods_do_not_keep_their_instance_alive() -> None:
    handlers = Handlers()
    ref = weakref.ref(handlers)
    assert input_hint(handlers.charge, 0) is Order and return_hint(handlers.charge) is Money
    del handlers
    gc.collect()
    assert ref() is None


# --- dict keys and enums: what the converter writes, it reads back ----------------------

UnitId = NewType("UnitId", int)


class Colour(enum.Enum):
    RED = "red"


class Corner(enum.Enum):
    TOP_LEFT = (0, 0)
    BOTTOM_RIGHT = (1, 1)


class Rate(enum.Enum):
    LOW = Decimal("0.5")
    HIGH = Decimal("1.5")


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ({Size.LARGE: 3}, dict[Size, int]),  # json.dumps writes an IntEnum key as "2"
        ({True: 1, False: 0}, dict[bool, int]),
        ({1.5: 1, -2.0: 2}, dict[float, int]),
        ({UnitId(7): "a"}, dict[UnitId, str]),
        ({None: 1}, dict[int | None, int]),
        ({Colour.RED: 1}, dict[Colour, int]),
        ({1: "a", 2: "b"}, dict[Literal[1, 2], str]),
        ({3: "x"}, dict[Annotated[int, "doc"], str]),
    ],
    ids=["IntEnum", "bool", "float", "NewType", "Optional", "Enum", "Literal", "Annotated"],
)
def test_dict_keys_the_converter_writes_are_read_back(value: Any, hint: Any) -> None:
    decoded = DEFAULT_CONVERTER.from_payload(DEFAULT_CONVERTER.to_payload(value), hint)
    assert decoded == value
    assert [type(k) for k in decoded] == [type(k) for k in value]


@pytest.mark.parametrize(
    ("data", "hint", "message"),
    [
        ({"x": 1}, dict[int, int], "value.x: key 'x' is not an int"),
        ({"yes": 1}, dict[bool, int], "value.yes: key 'yes' is not a bool"),
        ({"1,5": 1}, dict[float, int], "value['1,5']: key '1,5' is not a float"),
        ({"7": 1}, dict[Size, int], "value['7']: 7 is not a value of Size"),
        ({"3": 1}, dict[Literal[1, 2], int], "value['3']: expected one of 1, 2, got '3'"),
    ],
)
def test_dict_keys_that_do_not_fit_name_the_key(data: Any, hint: Any, message: str) -> None:
    with pytest.raises(PayloadEncodingError) as caught:
        DEFAULT_CONVERTER.from_json(data, hint)
    assert str(caught.value).startswith(message), str(caught.value)


def test_an_enum_whose_value_json_does_not_keep_round_trips() -> None:
    assert DEFAULT_CONVERTER.to_json(Corner.BOTTOM_RIGHT) == [1, 1]
    assert _round_trip(Corner.BOTTOM_RIGHT, Corner) is Corner.BOTTOM_RIGHT
    assert _round_trip([Rate.HIGH, Rate.LOW], list[Rate]) == [Rate.HIGH, Rate.LOW]
    with pytest.raises(PayloadEncodingError, match=r"\[1, 0\] is not a value of Corner"):
        DEFAULT_CONVERTER.from_json([1, 0], Corner)


def test_dict_keys_that_collide_once_converted_are_an_error_not_a_silent_loss() -> None:
    with pytest.raises(PayloadEncodingError, match="both written as 'red': one entry would be"):
        DEFAULT_CONVERTER.to_payload({Colour.RED: 1, "red": 2})
    with pytest.raises(PayloadEncodingError, match=r"both written as '12\.5'"):
        DEFAULT_CONVERTER.to_json({"12.5": 1, Decimal("12.5"): 2})
    # Plain dicts are as encode_json has them: keys json cannot sort together fail there
    # too, and keys of different types stay apart in the tree to_json gives.
    for plain in ({1: "a", "1": "b"}, {None: 1, "null": 2}):
        with pytest.raises(PayloadEncodingError, match="value is not JSON-serialisable"):
            encode_json(plain)
        with pytest.raises(PayloadEncodingError, match="value is not JSON-serialisable"):
            DEFAULT_CONVERTER.to_payload(plain)
        assert DEFAULT_CONVERTER.to_json(plain) == plain
    mixed = {True: 1, 2: "b", 1.5: None}
    assert DEFAULT_CONVERTER.to_payload(mixed) == encode_json(mixed)


# --- codecs and links whose output is not what the chain expects ---------------------


class TextCodec:
    """Hands back text, as a careless base64 codec does."""

    name = "text"

    def encode(self, data: bytes) -> bytes:
        return cast(bytes, data.decode())

    def decode(self, data: bytes) -> bytes:
        return cast(bytes, data.decode())


class NoneCodec:
    name = "none"

    def encode(self, data: bytes) -> bytes:
        return cast(bytes, None)

    def decode(self, data: bytes) -> bytes:
        return cast(bytes, None)


class BufferCodec:
    """Hands back a bytearray and a memoryview: bytes-like, so fine."""

    name = "buffer"

    def encode(self, data: bytes) -> bytes:
        return cast(bytes, bytearray(data[::-1]))

    def decode(self, data: bytes) -> bytes:
        return cast(bytes, memoryview(data[::-1]))


@pytest.mark.parametrize("codec", [TextCodec(), NoneCodec()], ids=["text", "None"])
def test_a_codec_that_returns_no_bytes_is_a_payload_encoding_error(codec: Any) -> None:
    # A str in Payload.data would break far away: in the Avro encoding of the record.
    converter = DataConverter(codecs=(codec,))
    kind = "str" if isinstance(codec, TextCodec) else "None"
    with pytest.raises(PayloadEncodingError, match=f"codec '{codec.name}' encoded to {kind}, "):
        converter.to_payload({"a": 1})
    encoded = Payload(b"{}", f"json/plain+{codec.name}")
    with pytest.raises(PayloadEncodingError, match=f"codec '{codec.name}' decoded to {kind}, "):
        converter.from_payload(encoded)


def test_a_codec_may_return_any_bytes_like_object() -> None:
    converter = DataConverter(codecs=(BufferCodec(),))
    payload = converter.to_payload(ORDER)
    assert type(payload.data) is bytes
    assert payload.data == encode_json(ORDER_JSON).data[::-1]
    assert converter.from_payload(payload, Order) == ORDER


def test_payload_data_that_is_not_bytes_is_a_payload_encoding_error() -> None:
    with pytest.raises(PayloadEncodingError, match="not valid JSON: TypeError"):
        DEFAULT_CONVERTER.from_payload(Payload(cast(bytes, 5)))


@dataclasses.dataclass(frozen=True)
class Fee:
    amount: Decimal
    currency: str


class FeeAsObject:
    """A link that returns its children as they are (not through path.to_json)."""

    def to_json(self, value: Any, path: ValuePath) -> Any:
        if not isinstance(value, Fee):
            return UNHANDLED
        return {"amount": value.amount, "currency": value.currency, "paid": {Colour.RED}}

    def from_json(self, data: Any, hint: Any, path: ValuePath) -> Any:
        return UNHANDLED


class Stubborn:
    """A link that hands back the value it was given."""

    def to_json(self, value: Any, path: ValuePath) -> Any:
        return value if isinstance(value, Fee) else UNHANDLED

    def from_json(self, data: Any, hint: Any, path: ValuePath) -> Any:
        return UNHANDLED


FEE_JSON = {"amount": "1.50", "currency": "EUR", "paid": ["red"]}


def test_whether_a_link_output_encodes_does_not_depend_on_unrelated_parts_of_the_value() -> None:
    # The fast path (json.dumps asking the links) and the walk (taken when a dict key is
    # not a JSON key, e.g. an enum) give the same JSON for the same link output.
    converter = DataConverter(links=(FeeAsObject(), *DEFAULT_LINKS))
    fee = Fee(Decimal("1.50"), "EUR")
    assert converter.to_payload({"price": fee}) == encode_json({"price": FEE_JSON})
    together = converter.to_payload({"price": fee, Colour.RED: 1})
    assert together == encode_json({"price": FEE_JSON, "red": 1})


def test_to_json_returns_only_json_native_values() -> None:
    converter = DataConverter(links=(FeeAsObject(), *DEFAULT_LINKS))
    assert converter.to_json(Fee(Decimal("1.50"), "EUR")) == FEE_JSON
    assert converter.to_json([Box(Fee(Decimal("2"), "USD"), [])]) == [
        {"content": {**FEE_JSON, "amount": "2", "currency": "USD"}, "spares": []}
    ]


def test_a_link_that_returns_the_value_it_was_given_is_an_error() -> None:
    converter = DataConverter(links=(Stubborn(), *DEFAULT_LINKS))
    with pytest.raises(PayloadEncodingError, match=r"^value\[0\]: Stubborn returned the value"):
        converter.to_payload([Fee(Decimal(1), "EUR")])


# --- the docs' promises elsewhere ------------------------------------------------------


class Price:
    """Not a dataclass: only the registry's own link converts it."""

    def __init__(self, amount: Decimal, currency: str) -> None:
        self.amount, self.currency = amount, currency


class PriceAsText:
    def to_json(self, value: Any, path: ValuePath) -> Any:
        if not isinstance(value, Price):
            return UNHANDLED
        return f"{value.currency} {value.amount}"

    def from_json(self, data: Any, hint: Any, path: ValuePath) -> Any:
        if hint is not Price:
            return UNHANDLED
        currency, amount = data.split(" ")
        return Price(Decimal(amount), currency)


async def quoted(ctx: WorkflowContext, value: Any) -> str:
    price = await ctx.activity("billing.quote", value, result_type=Price)
    return f"{price.amount}"


def test_the_tester_scripts_values_with_the_registrys_converter() -> None:
    registry = WorkflowRegistry(converter=DataConverter(links=(PriceAsText(), *DEFAULT_LINKS)))
    registry.workflow("quote")(quoted)
    tester = WorkflowTester(registry)
    try:
        tester.activity("billing.quote").returns(Price(Decimal("2.00"), "EUR"))
    except ConfigurationError as exc:
        pytest.fail(f"refused a value the registry's converter converts: {exc}")
    assert tester.run("quote", None).result == "2.00"
    with pytest.raises(ConfigurationError, match=r"returns\(value\): Price: no converter"):
        WorkflowTester(WorkflowRegistry()).activity("billing.quote").returns(Price(Decimal(1), ""))


def test_json_from_other_writers_may_hold_what_the_converter_never_writes() -> None:
    # Documented (docs/payloads.md, Pitfalls): read as Python's json reads it.
    values = DEFAULT_CONVERTER.from_payload(Payload(b"[NaN,Infinity,1e400]"), list[float])
    assert [str(v) for v in values] == ["nan", "inf", "inf"]
