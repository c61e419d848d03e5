"""Avro binary encoding compiled from a schema.

fastavro's writer walks the schema on every call and settles each union by validating
the value against its branches one after another, which for a record with a few optional
fields and a nested payload costs 8-10 us before a single event is written. Every
transition writes a workflow record (its head and tail, and its new events) and a task
per step, so the codec compiles its schemas once, in two tiers:

- each record type becomes a generated Python function that writes its fields inline
  (optional values and unions of named records included), appending to a ``bytearray``;
- closures built per schema node hold the complete rules (defaults of missing fields,
  unions settled by the value's Python type); the generated code hands them what it does
  not inline.

The bytes are Avro's binary encoding, identical to fastavro's for every datum the codec
writes (unit tests compare the two on every record the tests build, and on generated
data). Values are checked at least as strictly as fastavro checks them: an int out of
range, a string that is not ``str``, a missing field without a default, or a union value
no branch takes raises, and the codec turns that into an unencodable record as it does
for fastavro's errors.

A datum has the shape fastavro takes: records are mappings, unions of several named types
take ``(full name, value)`` tuples, optional values are ``None`` or the value itself.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any, Final, cast

Write = Callable[[bytearray, Any], None]

INT_MIN: Final = -(1 << 31)
INT_MAX: Final = (1 << 31) - 1
LONG_MIN: Final = -(1 << 63)
LONG_MAX: Final = (1 << 63) - 1
_DOUBLE: Final = struct.Struct("<d")
_FLOAT: Final = struct.Struct("<f")
_PRIMITIVES: Final = frozenset(
    ("null", "boolean", "int", "long", "float", "double", "bytes", "string")
)
# Python types a bare (non-tuple) union value may have, per primitive branch; a bool only
# ever matches a boolean branch.
_PYTHON_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "boolean": (bool,),
    "int": (int,),
    "long": (int,),
    "float": (float, int),
    "double": (float, int),
    "bytes": (bytes, bytearray),
    "string": (str,),
}


class UnsupportedSchemaError(ValueError):
    """The schema uses something this writer does not compile (fixed, logical types, or a
    union whose branches cannot be told apart by the value's type)."""


def append_long(out: bytearray, value: int) -> None:
    """Append Avro's encoding of a long: zigzag, then a little-endian base-128 varint."""
    if not LONG_MIN <= value <= LONG_MAX:
        raise ValueError(f"{value} is out of range for an Avro long")
    _varint(out, (value << 1) ^ (value >> 63))


def compile_writer(schema: Any, named: Mapping[str, Any]) -> Write:
    """A writer for ``schema`` (fastavro's parsed form); ``named`` resolves type names
    (``parsed["__named_schemas"]``).

    Records are written by Python source generated for them (each field's write inlined:
    about three times faster than calling a closure per field); unions of several
    non-null branches and records missing a field go through the closures of
    :class:`_Compiler`, which hold the full rules.
    """
    try:
        closures = _Compiler(named)
        closures.build(schema)  # refuses what is unsupported
        return _Generator(named, closures).top(schema)
    except (SyntaxError, RecursionError) as exc:  # nested past what Python compiles
        raise UnsupportedSchemaError(f"schema too deeply nested to compile: {exc}") from exc


class _Generator:
    """Generates one Python function per record type of a schema."""

    def __init__(self, named: Mapping[str, Any], closures: _Compiler) -> None:
        self._named = named
        self._closures = closures
        self._functions: dict[str, str] = {}  # record name -> function name
        self._sources: list[str] = []
        self._namespace: dict[str, Any] = {
            "_varint": _varint,
            "_check_int": _check_int,
            "_refuse": _refuse,
            "_pack_d": _DOUBLE.pack,
            "_pack_f": _FLOAT.pack,
            "_BYTES": (bytes, bytearray),
        }

    def top(self, schema: Any) -> Write:
        """The function writing ``schema``'s values, with those it calls."""
        body = self._write(schema, "v0", 0)
        self._sources.append("\n".join(["def _top(out, v0):", *("    " + ln for ln in body)]))
        exec("\n".join(self._sources), self._namespace)
        return cast(Write, self._namespace["_top"])

    def _constant(self, value: Any) -> str:
        name = f"_c{len(self._namespace)}"
        self._namespace[name] = value
        return name

    def _function(self, schema: Mapping[str, Any]) -> str:
        record_name = str(schema["name"])
        known = self._functions.get(record_name)
        if known is not None:
            return known
        name = f"_w{len(self._functions)}"
        self._functions[record_name] = name  # before the body: a type may contain itself
        slow = self._constant(self._closures.build(schema))
        body: list[str] = []
        for field in schema["fields"]:
            # d[name]: a missing field raises KeyError and takes the closures' path (a
            # mapping that makes up missing keys, a defaultdict, is no datum of the codec).
            body.append(f"v0 = d[{str(field['name'])!r}]")
            body.extend(self._write(field["type"], "v0", 0))
        lines = [f"def {name}(out, d):", "    start = len(out)", "    try:"]
        lines += ["        " + line for line in body or ["pass"]]
        # A missing field: start again with the closures, which know defaults.
        lines += ["    except KeyError:", "        del out[start:]", f"        {slow}(out, d)"]
        self._sources.append("\n".join(lines))
        return name

    def _write(self, schema: Any, var: str, depth: int) -> list[str]:
        """Lines appending the encoding of the value in ``var`` to ``out``."""
        if isinstance(schema, str) and schema not in _PRIMITIVES:
            schema = self._named[schema]
        if isinstance(schema, list):
            return self._union(schema, var, depth)
        kind = schema if isinstance(schema, str) else schema.get("type")
        if kind in ("record", "error"):
            return [f"{self._function(schema)}(out, {var})"]
        if kind == "null":
            return [f"if {var} is not None:", f"    _refuse({var}, 'null')"]
        if kind == "boolean":
            return [
                f"if {var} is True:",
                "    out.append(1)",
                f"elif {var} is False:",
                "    out.append(0)",
                "else:",
                f"    _refuse({var}, 'boolean')",
            ]
        if kind in ("int", "long"):
            low, high = (INT_MIN, INT_MAX) if kind == "int" else (LONG_MIN, LONG_MAX)
            return [
                f"if type({var}) is not int or not {low} <= {var} <= {high}:",
                f"    _check_int({var}, {low}, {high}, {kind!r})",
                f"n = ({var} << 1) ^ ({var} >> 63)",
                "if n < 128:",
                "    out.append(n)",
                "else:",
                "    _varint(out, n)",
            ]
        if kind in ("float", "double"):
            return [f"out += _pack_{kind[0]}({var})"]
        if kind in ("string", "bytes"):
            if kind == "string":
                check = [
                    f"if type({var}) is not str and not isinstance({var}, str):",
                    f"    _refuse({var}, 'string')",
                    f"b = {var}.encode()",
                ]
            else:
                check = [
                    f"if not isinstance({var}, _BYTES):",
                    f"    _refuse({var}, 'bytes')",
                    f"b = {var}",
                ]
            return [
                *check,
                "n = len(b) << 1",
                "if n < 128:",
                "    out.append(n)",
                "else:",
                "    _varint(out, n)",
                "out += b",
            ]
        if kind == "enum":
            codes = self._constant(
                {symbol: _long_bytes(i) for i, symbol in enumerate(schema["symbols"])}
            )
            return [
                f"c = {codes}.get({var})",
                "if c is None:",
                f"    _refuse({var}, {'enum ' + str(schema['name'])!r})",
                "out += c",
            ]
        if kind in ("array", "map"):
            item = f"v{depth + 1}"
            if kind == "array":
                loop = [f"for {item} in {var}:"]
                loop += ["    " + line for line in self._write(schema["items"], item, depth + 1)]
            else:
                key = f"k{depth + 1}"
                loop = [f"for {key}, {item} in {var}.items():"]
                loop += ["    " + line for line in self._write("string", key, depth + 1)]
                loop += ["    " + line for line in self._write(schema["values"], item, depth + 1)]
            return [
                f"if len({var}):",
                f"    _varint(out, len({var}) << 1)",
                *("    " + line for line in loop),
                "out.append(0)",
            ]
        # Anything else went through the closures (which refused what is unsupported).
        return [f"{self._constant(self._closures.build(schema))}(out, {var})"]

    def _union(self, branches: list[Any], var: str, depth: int) -> list[str]:
        closure = self._constant(self._closures.build(branches))
        others = [b for b in branches if b != "null"]
        records = [
            (index, b)
            for index, b in enumerate(branches)
            if _kind(b, self._named) in ("record", "error")
        ]
        if len(others) > 1 and len(records) == len(others):
            # Named records, as (full name, value) tuples: dispatch on the name.
            lines: list[str] = []
            test = "if"
            if "null" in branches:
                null_index = _long_bytes(branches.index("null"))
                lines += [f"if {var} is None:", f"    out += {null_index!r}"]
                test = "elif"
            lines += [f"{test} type({var}) is tuple:", f"    nm = {var}[0]"]
            for position, (index, branch) in enumerate(records):
                resolved = self._named[branch] if isinstance(branch, str) else branch
                test = "if" if position == 0 else "elif"
                lines += [
                    f"    {test} nm == {str(resolved['name'])!r}:",
                    f"        out += {_long_bytes(index)!r}",
                    f"        {self._function(resolved)}(out, {var}[1])",
                ]
            lines += ["    else:", f"        {closure}(out, {var})"]
            lines += ["else:", f"    {closure}(out, {var})"]
            return lines
        if "null" not in branches or len(others) != 1:
            return [f"{closure}(out, {var})"]
        null_index = _long_bytes(branches.index("null"))
        value_index = _long_bytes(branches.index(others[0]))
        # A named branch (a tuple) is read by the closure, and so is a bool the branch is
        # not boolean for (which it refuses, as fastavro does).
        special = f"type({var}) is tuple"
        if _kind(others[0], self._named) != "boolean":
            special += f" or type({var}) is bool"
        return [
            f"if {var} is None:",
            f"    out += {null_index!r}",
            f"elif {special}:",
            f"    {closure}(out, {var})",
            "else:",
            f"    out += {value_index!r}",
            *("    " + line for line in self._write(others[0], var, depth)),
        ]


def _varint(out: bytearray, number: int) -> None:
    """Append a non-negative (already zigzagged) number as a base-128 varint."""
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)


def _check_int(value: Any, low: int, high: int, kind: str) -> None:
    if not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{value!r} is not an Avro {kind}")


def _refuse(value: Any, kind: str) -> None:
    raise ValueError(f"{type(value).__name__} value {safe_repr(value)} is not an Avro {kind}")


def safe_repr(value: Any) -> str:
    """A short repr for error messages (never raises)."""
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


class _Compiler:
    def __init__(self, named: Mapping[str, Any]) -> None:
        self._named = named
        # Named types compiled so far: a recursive type refers to itself through a cell.
        self._built: dict[str, list[Write]] = {}

    def build(self, schema: Any) -> Write:
        if isinstance(schema, list):
            return self._union(schema)
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return _primitive(schema)
            return self._reference(schema)
        if not isinstance(schema, dict):
            raise UnsupportedSchemaError(f"not a schema: {schema!r}")
        if "logicalType" in schema:
            raise UnsupportedSchemaError(f"logical type {schema['logicalType']!r}")
        kind = schema.get("type")
        if kind in ("record", "error"):
            return self._record(schema)
        if kind == "enum":
            return _enum(schema)
        if kind == "array":
            return _array(self.build(schema["items"]))
        if kind == "map":
            return _map(self.build(schema["values"]))
        if isinstance(kind, str) and kind in _PRIMITIVES:
            return _primitive(kind)
        raise UnsupportedSchemaError(f"type {kind!r}")

    def _reference(self, name: str) -> Write:
        cell = self._built.get(name)
        if cell is None:
            if name not in self._named:
                raise UnsupportedSchemaError(f"unknown type name {name!r}")
            return self.build(self._named[name])
        if cell:
            return cell[0]

        def write_later(out: bytearray, datum: Any) -> None:  # a type that contains itself
            cell[0](out, datum)

        return write_later

    def _record(self, schema: Mapping[str, Any]) -> Write:
        cell: list[Write] = []
        self._built[str(schema["name"])] = cell
        # fastavro writes null for a missing field whose type allows it, default or not.
        fields: list[tuple[str, Write, bool, Any]] = [
            (
                str(f["name"]),
                self.build(f["type"]),
                "default" in f or _allows_null(f["type"]),
                f.get("default"),
            )
            for f in schema["fields"]
        ]
        record_name = schema["name"]

        def write_record(out: bytearray, datum: Any) -> None:
            for name, write, has_default, default in fields:
                try:
                    value = datum[name]
                except KeyError:
                    if not has_default:
                        raise ValueError(
                            f"{record_name}: no value and no default for {name}"
                        ) from None
                    value = default
                write(out, value)

        cell.append(write_record)
        return write_record

    def _union(self, branches: list[Any]) -> Write:
        names: dict[str, tuple[int, Write]] = {}
        null_index: int | None = None
        by_type: list[tuple[tuple[type, ...], int, Write]] = []
        records: list[tuple[int, Write]] = []
        for index, branch in enumerate(branches):
            kind = _kind(branch, self._named)
            write = self.build(branch)
            names[_branch_name(branch)] = (index, write)
            if kind == "null":
                null_index = index
            elif kind in _PYTHON_TYPES:
                by_type.append((_PYTHON_TYPES[kind], index, write))
            elif kind == "enum":
                by_type.append(((str,), index, write))  # a symbol is a str, as in fastavro
            elif kind in ("record", "error"):
                records.append((index, write))
            else:
                raise UnsupportedSchemaError(f"union {branches!r}: a {kind} branch")
        # A mapping is no primitive's value, so a lone record branch takes it untagged.
        records_alone = records[0] if len(records) == 1 else None
        if len({types for types, _, _ in by_type}) < len(by_type):
            raise UnsupportedSchemaError(f"union {branches!r}: branches of one Python type")
        null_byte = None if null_index is None else _long_bytes(null_index)

        def write_union(out: bytearray, datum: Any) -> None:
            if datum is None:
                if null_byte is None:
                    raise ValueError(f"None is not a value of the union {branches!r}")
                out += null_byte
                return
            if type(datum) is tuple:
                name, value = datum
                found = names.get(name)
                if found is None:
                    raise ValueError(f"union type name {name!r} is not in {branches!r}")
                append_long(out, found[0])
                found[1](out, value)
                return
            for types, index, write in by_type:
                # A bool is an int to Python, but only a boolean branch's value here
                # (fastavro's union check refuses it for numbers too).
                if isinstance(datum, types) and (type(datum) is bool) == (bool in types):
                    append_long(out, index)
                    write(out, datum)
                    return
            if records_alone is not None and isinstance(datum, Mapping):
                append_long(out, records_alone[0])
                records_alone[1](out, datum)
                return
            raise ValueError(
                f"{type(datum).__name__} value is not a value of the union {branches!r} "
                "(name the branch with a (type name, value) tuple)"
            )

        return write_union


def _allows_null(schema: Any) -> bool:
    return schema == "null" or (isinstance(schema, list) and "null" in schema)


def _kind(schema: Any, named: Mapping[str, Any]) -> str:
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return schema
        return _kind(named[schema], named) if schema in named else schema
    if isinstance(schema, dict):
        kind = schema.get("type")
        return kind if isinstance(kind, str) else "union"
    return "union"


def _branch_name(schema: Any) -> str:
    """The name a ``(name, value)`` tuple uses for a union branch, as fastavro reads it."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        if schema.get("type") in ("record", "error", "enum", "fixed"):
            return str(schema["name"])
        return str(schema.get("type"))
    return "union"


def _long_bytes(value: int) -> bytes:
    out = bytearray()
    append_long(out, value)
    return bytes(out)


def _primitive(kind: str) -> Write:
    if kind == "null":

        def write_null(out: bytearray, datum: Any) -> None:
            if datum is not None:
                raise ValueError(f"{datum!r} is not null")

        return write_null
    if kind == "boolean":

        def write_boolean(out: bytearray, datum: Any) -> None:
            if not isinstance(datum, bool):
                raise ValueError(f"{datum!r} is not a boolean")
            out.append(1 if datum else 0)

        return write_boolean
    if kind in ("int", "long"):
        low, high = (INT_MIN, INT_MAX) if kind == "int" else (LONG_MIN, LONG_MAX)

        def write_integer(out: bytearray, datum: Any) -> None:
            if not isinstance(datum, int) or not low <= datum <= high:
                raise ValueError(f"{datum!r} is not an Avro {kind}")
            _varint(out, (datum << 1) ^ (datum >> 63))

        return write_integer
    if kind in ("float", "double"):
        pack = (_FLOAT if kind == "float" else _DOUBLE).pack

        def write_real(out: bytearray, datum: Any) -> None:
            out += pack(datum)

        return write_real
    if kind == "bytes":

        def write_bytes(out: bytearray, datum: Any) -> None:
            # Not a memoryview: its len() counts items, not bytes (fastavro refuses it too).
            if not isinstance(datum, bytes | bytearray):
                raise ValueError(f"{type(datum).__name__} value is not bytes")
            append_long(out, len(datum))
            out += datum

        return write_bytes

    def write_string(out: bytearray, datum: Any) -> None:
        if not isinstance(datum, str):
            raise ValueError(f"{type(datum).__name__} value is not a string")
        data = datum.encode()
        append_long(out, len(data))
        out += data

    return write_string


def _enum(schema: Mapping[str, Any]) -> Write:
    codes = {symbol: _long_bytes(index) for index, symbol in enumerate(schema["symbols"])}
    name = schema["name"]

    def write_enum(out: bytearray, datum: Any) -> None:
        code = codes.get(datum)
        if code is None:
            raise ValueError(f"{datum!r} is not a symbol of the enum {name}")
        out += code

    return write_enum


def _array(items: Write) -> Write:
    def write_array(out: bytearray, datum: Any) -> None:
        if len(datum):
            append_long(out, len(datum))
            for item in datum:
                items(out, item)
        out.append(0)

    return write_array


def _map(values: Write) -> Write:
    string = _primitive("string")

    def write_map(out: bytearray, datum: Any) -> None:
        if len(datum):
            append_long(out, len(datum))
            for key, value in datum.items():
                string(out, key)
                values(out, value)
        out.append(0)

    return write_map
