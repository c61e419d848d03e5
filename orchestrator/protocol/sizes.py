"""An upper bound of a workflow record's encoded size, without encoding it.

The engine checks every record it may write against the size limit (``Limits.fits``),
and one transition checks up to three candidate records. Almost every record is far below
the limit, and a bound that is cheap to compute and never below the real size settles
those checks with no encoding at all; only a record whose bound reaches its budget is
encoded to be measured.

The bound follows Avro's binary encoding: a long, int or enum takes at most 10 bytes, a
union's branch index one more (sagaline's unions have fewer than 64 branches), a double 8,
a boolean 1; a string or bytes value its length prefix (at most 5 bytes below 32 GiB) and
its bytes (a str's UTF-8 is at most 4 bytes a character, 1 if it is ASCII); an array its
count, its items and a closing zero. What each record type holds is read from its
dataclass fields once, at import: a field of a type this module does not know is an
error then, so a new field cannot be left out of the bound.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, Final

from orchestrator.protocol.records import (
    Failure,
    HistoryEvent,
    ParentRef,
    Payload,
    RunRequest,
    WorkflowRecord,
)

# A scalar field: a union index (1) and a long (10); covers doubles, booleans and enums.
SCALAR: Final = 11
# A length-prefixed value's prefix and a union index.
PREFIX: Final = 6
# An array's count and its closing zero (and a union index).
ARRAY: Final = 12
# The Confluent wire-format header: magic byte and schema id.
HEADER: Final = 5

_SCALARS: Final = frozenset(
    {
        "int",
        "bool",
        "float",
        "int | None",
        "float | None",
        "bool | None",
        "WorkflowStatus",
        "ParentClosePolicy | None",
    }
)


def text_bound(text: str) -> int:
    """At most the bytes ``text`` takes encoded (UTF-8 and its length prefix)."""
    return PREFIX + (len(text) if text.isascii() else 4 * len(text))


def _payload(value: Payload | None) -> int:
    if value is None:
        return 1
    return PREFIX + len(value.data) + text_bound(value.encoding)


def _failure(value: Failure | None) -> int:
    if value is None:
        return 1
    return 1 + _bound(value)


def _opt_text(value: str | None) -> int:
    return 1 if value is None else 1 + text_bound(value)


def _parent(value: ParentRef | None) -> int:
    return (
        1
        if value is None
        else 1 + text_bound(value.workflow_id) + text_bound(value.run_id) + SCALAR
    )


def _run_requests(value: tuple[RunRequest, ...]) -> int:
    return ARRAY + sum(text_bound(r.request_id) + text_bound(r.run_id) for r in value)


def _texts(value: tuple[str, ...]) -> int:
    return ARRAY + sum(text_bound(t) for t in value)


_VARIABLE: Final[dict[str, Callable[[Any], int]]] = {
    "str": text_bound,
    "str | None": _opt_text,
    "Payload": _payload,
    "Payload | None": _payload,
    "Failure": _failure,
    "Failure | None": _failure,
    "tuple[str, ...]": _texts,
    "tuple[RunRequest, ...]": _run_requests,
    "ParentRef | None": _parent,
}


Plan = tuple[tuple[str, Callable[[Any], int]], ...]


def _plan(cls: type, handled: frozenset[str] = frozenset()) -> tuple[int, Plan]:
    """The bound of ``cls``'s scalar fields, and the measure of each other field; the
    fields named in ``handled`` are left to the caller."""
    fixed = 0
    variable: list[tuple[str, Callable[[Any], int]]] = []
    for item in dataclasses.fields(cls):
        if item.name in handled:
            continue
        kind = str(item.type)
        if kind in _SCALARS:
            fixed += SCALAR
        elif kind in _VARIABLE:
            variable.append((item.name, _VARIABLE[kind]))
        else:
            raise TypeError(
                f"sizes: field {cls.__name__}.{item.name} has type {kind}, which the size "
                "bound does not know; teach orchestrator/protocol/sizes.py its encoding"
            )
    return fixed, tuple(variable)


_FIXED: Final[dict[type, int]] = {}
_PLANS: Final[dict[type, Plan]] = {}
_FIXED[Failure], _PLANS[Failure] = _plan(Failure)
# Every member of the HistoryEvent union: a new event type is bounded (or refused at
# import) without being listed here.
_EVENT_TYPES: Final[tuple[type, ...]] = typing.get_args(HistoryEvent)
for _event_type in _EVENT_TYPES:
    # One more for the event's branch in the events union.
    _fixed, _PLANS[_event_type] = _plan(_event_type)
    _FIXED[_event_type] = 1 + _fixed
_WORKFLOW_FIXED, _WORKFLOW_PLAN = _plan(WorkflowRecord, frozenset({"events"}))


def _bound(value: object) -> int:
    cls = type(value)
    total = _FIXED[cls]
    for name, measure in _PLANS[cls]:
        total += measure(getattr(value, name))
    return total


def event_bound(event: HistoryEvent) -> int:
    """At most the bytes ``event`` takes as an item of a record's events."""
    return _bound(event)


def workflow_bound(record: WorkflowRecord) -> int:
    """At most the bytes ``AvroCodec.encode_workflow(record)`` returns (header included)."""
    total = HEADER + _WORKFLOW_FIXED + ARRAY
    for name, measure in _WORKFLOW_PLAN:
        total += measure(getattr(record, name))
    for event in record.events:
        total += event_bound(event)
    return total


def record_bound(record: WorkflowRecord) -> int:
    """At most what Kafka counts for ``record`` on the history topic: its key (the
    workflow id) and its encoded value."""
    return len(record.workflow_id.encode("utf-8", "surrogatepass")) + workflow_bound(record)
