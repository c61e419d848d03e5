"""The compiled Avro writer writes fastavro's bytes, and refuses what fastavro refuses."""

from __future__ import annotations

import array
import io
from typing import Any

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.protocol.avrowrite import (
    LONG_MAX,
    LONG_MIN,
    UnsupportedSchemaError,
    append_long,
    compile_writer,
)
from orchestrator.protocol.codec import (
    HEADER,
    INBOX,
    MAGIC,
    TASK,
    WORKFLOW,
    AvroCodec,
    _parse_dir,
    default_schema_dir,
)
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityHeartbeat,
    ActivityResult,
    ActivityStarted,
    ActivityStatus,
    ActivityTask,
    Failure,
    ResumeWorkflow,
    StartWorkflow,
)

from .test_codec_v3 import _record

PAYLOAD = {
    "type": "record",
    "name": "P",
    "fields": [
        {"name": "encoding", "type": "string", "default": "json/plain"},
        {"name": "data", "type": "bytes"},
    ],
}
EVERYTHING = fastavro.parse_schema(
    {
        "type": "record",
        "name": "Everything",
        "namespace": "t",
        "fields": [
            {"name": "b", "type": "boolean"},
            {"name": "i", "type": "int"},
            {"name": "l", "type": "long"},
            {"name": "f", "type": "float"},
            {"name": "d", "type": "double"},
            {"name": "s", "type": "string"},
            {"name": "y", "type": "bytes"},
            {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}},
            {"name": "a", "type": {"type": "array", "items": "long"}},
            {"name": "m", "type": {"type": "map", "values": "string"}},
            {"name": "p", "type": PAYLOAD},
            {"name": "op", "type": ["null", "t.P"], "default": None},
            {"name": "ol", "type": ["null", "long"]},
            {"name": "ls", "type": ["null", "long", "string", "boolean"]},
            {
                "name": "named",
                "type": {
                    "type": "array",
                    "items": [
                        {"type": "record", "name": "X", "fields": [{"name": "x", "type": "int"}]},
                        {"type": "record", "name": "Y", "fields": [{"name": "y", "type": "t.P"}]},
                    ],
                },
            },
        ],
    }
)
EVERYTHING_NAMED: dict[str, Any] = EVERYTHING["__named_schemas"]  # type: ignore[index,call-overload,assignment]
WRITE = compile_writer(EVERYTHING, EVERYTHING_NAMED)


def _fastavro(schema: Any, datum: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, datum)
    return buf.getvalue()


def _compiled(datum: Any) -> bytes:
    out = bytearray()
    WRITE(out, datum)
    return bytes(out)


longs = st.integers(LONG_MIN, LONG_MAX)
payloads = st.fixed_dictionaries({"encoding": st.text(max_size=8), "data": st.binary(max_size=40)})
everything = st.fixed_dictionaries(
    {
        "b": st.booleans(),
        "i": st.integers(-(1 << 31), (1 << 31) - 1),
        "l": longs,
        "f": st.floats(width=32, allow_nan=False),
        "d": st.floats(allow_nan=False),
        "s": st.text(max_size=20),
        "y": st.binary(max_size=20),
        "e": st.sampled_from(["A", "B", "C"]),
        "a": st.lists(longs, max_size=5),
        "m": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        "p": payloads,
        "op": st.none() | payloads,
        "ol": st.none() | longs,
        "ls": st.none() | longs | st.text(max_size=5) | st.booleans(),
        "named": st.lists(
            st.tuples(st.just("t.X"), st.fixed_dictionaries({"x": st.integers(-5, 5)}))
            | st.tuples(st.just("t.Y"), st.fixed_dictionaries({"y": payloads})),
            max_size=4,
        ),
    }
)


@given(everything)
def test_every_type_encodes_as_fastavro_does(datum: dict[str, Any]) -> None:
    assert _compiled(datum) == _fastavro(EVERYTHING, datum)


@pytest.mark.parametrize(
    "value", [0, 1, -1, 63, -64, 64, 65, 8191, 8192, 1 << 40, LONG_MIN, LONG_MAX]
)
def test_a_long_is_zigzag_varint(value: int) -> None:
    schema = fastavro.parse_schema(
        {"type": "record", "name": "L", "fields": [{"name": "v", "type": "long"}]}
    )
    out = bytearray()
    append_long(out, value)
    assert bytes(out) == _fastavro(schema, {"v": value})


def test_a_record_without_fields_writes_nothing() -> None:
    schema = fastavro.parse_schema({"type": "record", "name": "Empty", "fields": []})
    out = bytearray()
    compile_writer(schema, {})(out, {})
    assert out == b"" == _fastavro(schema, {})


def test_a_recursive_type_encodes_as_fastavro_does() -> None:
    schema = fastavro.parse_schema(
        {
            "type": "record",
            "name": "Node",
            "fields": [
                {"name": "value", "type": "long"},
                {"name": "next", "type": ["null", "Node"], "default": None},
                {"name": "children", "type": {"type": "array", "items": "Node"}},
            ],
        }
    )
    leaf: dict[str, Any] = {"value": -3, "next": None, "children": []}
    other = {"value": 2, "children": []}  # "next" left out: its default
    tree = {"value": 1, "next": {**leaf, "next": leaf}, "children": [leaf, other]}
    out = bytearray()
    named: dict[str, Any] = schema["__named_schemas"]  # type: ignore[index,call-overload,assignment]
    compile_writer(schema, named)(out, tree)
    assert bytes(out) == _fastavro(schema, tree)


def test_an_optional_enum_encodes_as_fastavro_does_and_refuses_other_symbols() -> None:
    schema = fastavro.parse_schema(
        {
            "type": "record",
            "name": "WithEnum",
            "fields": [
                {
                    "name": "choice",
                    "type": ["null", {"type": "enum", "name": "E3", "symbols": ["A", "B"]}],
                    "default": None,
                }
            ],
        }
    )
    named: dict[str, Any] = schema["__named_schemas"]  # type: ignore[index,call-overload,assignment]
    write = compile_writer(schema, named)
    for datum in ({"choice": None}, {"choice": "A"}, {"choice": "B"}, {}):
        out = bytearray()
        write(out, datum)
        assert bytes(out) == _fastavro(schema, datum)
    with pytest.raises(ValueError):
        write(bytearray(), {"choice": "C"})


def test_missing_fields_take_defaults_and_optional_ones_null() -> None:
    schema = fastavro.parse_schema(
        {
            "type": "record",
            "name": "D",
            "fields": [
                {"name": "n", "type": "long", "default": 7},
                {"name": "o", "type": ["null", "long"]},
                {"name": "s", "type": "string", "default": "x"},
            ],
        }
    )
    out = bytearray()
    compile_writer(schema, {})(out, {})
    assert bytes(out) == _fastavro(schema, {})


def _valid() -> dict[str, Any]:
    return {
        "b": True,
        "i": 1,
        "l": 2,
        "f": 1.5,
        "d": 2.5,
        "s": "s",
        "y": b"y",
        "e": "A",
        "a": [1],
        "m": {"k": "v"},
        "p": {"encoding": "e", "data": b"d"},
        "op": None,
        "ol": None,
        "ls": None,
        "named": [],
    }


# fastavro writes these (an int or long out of range as bytes a strict reader such as
# Java's refuses, 1 as true, an untagged record as the branch with most matching fields);
# this writer refuses them: the codec never writes them, and a wire contract does not
# guess.
FASTAVRO_WRITES = [("i", 1 << 31), ("l", 1 << 63), ("b", 1), ("named", [{"x": 1}])]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("i", 1 << 31),
        ("l", 1 << 63),
        ("l", "12"),
        ("s", b"bytes"),
        ("s", "\ud800"),  # a lone surrogate has no UTF-8 form
        ("y", "text"),
        ("b", 1),
        ("e", "D"),
        ("p", {"encoding": "e"}),  # data has no default
        ("ol", 1.5),
        ("ol", True),  # a bool is no long in a union
        ("y", memoryview(array.array("i", [1, 2]))),  # 2 items, 8 bytes
        ("ls", 2.5),
        ("named", [("t.Z", {"x": 1})]),
        ("named", [{"x": 1}]),  # two record branches: the branch must be named
    ],
)
def test_values_fastavro_refuses_are_refused(field: str, value: Any) -> None:
    datum = {**_valid(), field: value}
    if (field, value) not in FASTAVRO_WRITES:
        with pytest.raises((ValueError, TypeError, UnicodeEncodeError)):
            _fastavro(EVERYTHING, datum)
    with pytest.raises((ValueError, TypeError, UnicodeEncodeError)):
        _compiled(datum)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "fixed", "name": "F", "size": 4},
        {"type": "long", "logicalType": "timestamp-millis"},
        ["null", "int", "long"],
        ["null", "string", {"type": "enum", "name": "E2", "symbols": ["A"]}],
    ],
)
def test_unsupported_schemas_are_refused_when_compiled(schema: Any) -> None:
    with pytest.raises(UnsupportedSchemaError):
        compile_writer(fastavro.parse_schema(schema), {})


def test_a_schema_nested_past_what_python_compiles_is_unsupported() -> None:
    schema: Any = "long"
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    parsed = fastavro.parse_schema(
        {"type": "record", "name": "Deep", "fields": [{"name": "a", "type": schema}]}
    )
    with pytest.raises(UnsupportedSchemaError):
        compile_writer(parsed, {})


def test_every_sagaline_schema_compiles() -> None:
    parsed, _ = _parse_dir(default_schema_dir())
    archive = default_schema_dir() / "archive"
    for version in (p for p in archive.iterdir() if p.is_dir()):
        parsed.update({f"{version.name}:{k}": v for k, v in _parse_dir(version)[0].items()})
    for name, schema in parsed.items():
        assert compile_writer(schema, schema["__named_schemas"]) is not None, name


def test_the_codec_writes_fastavros_bytes_for_every_record_type() -> None:
    codec = AvroCodec()
    payload = encode_json({"k": "ü"})
    failure = Failure("Busy", "try later", retryable=True, retry_after_ms=500)
    inbox: list[Any] = [
        StartWorkflow("w", "t", payload, 1),
        ActivityResult("w", "a", 0, 1, ActivityStatus.COMPLETED, 2, payload),
        ActivityResult("w", "a", 0, 1, ActivityStatus.FAILED, 2, None, failure),
        ResumeWorkflow("w", 3),
        ActivityStarted("w", "a", 0, 1, 4),
        ActivityHeartbeat("w", "a", 0, 1, 5, payload),
        ActivityHeartbeat("w", "a", 0, 1, 5, None),
    ]
    for body in inbox:
        data = codec.encode_inbox(body)
        assert data == _reference(codec, data, codec.decode_raw(data, INBOX)), body
        assert codec.decode_inbox(data) == body
    task = ActivityTask(
        "w",
        "t",
        "a",
        0,
        1,
        "svc",
        "do",
        payload,
        9,
        deadline_ms=20,
        start_to_close_ms=5,
        heartbeat_details=payload,
        report_start=True,
    )
    for t in (task, ActivityTask("w", "t", "a", 0, 1, "svc", "do", payload, 9)):
        data = codec.encode_task(t)
        assert data == _reference(codec, data, codec.decode_raw(data, TASK))
        assert codec.decode_task(data) == t
    record = _record()
    assert codec.encode_workflow(record) == codec.encode_workflow_whole(record)
    assert codec.decode_raw(codec.encode_workflow(record), WORKFLOW)


def _reference(codec: AvroCodec, data: bytes, datum: dict[str, Any]) -> bytes:
    """fastavro's encoding of ``datum`` under the schema id ``data`` carries."""
    _, sid = HEADER.unpack_from(data)
    parsed = codec._by_id[sid].parsed
    return HEADER.pack(MAGIC, sid) + _fastavro(parsed, datum)
