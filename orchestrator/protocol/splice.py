"""Encoding a workflow record without re-encoding the history it already had.

Every transition writes the workflow's whole record, and most of a record is its events,
which never change once written: a transition appends to the tuple of events it was given.
Avro's binary form has no framing around a record's fields, so the encoding of a record is
the encodings of its fields one after another, and an array is a count, its items, and a
zero. This writer therefore encodes the fields before the events and those after them on
each call, and for the events reuses the encoded items of the longest earlier tuple that
the new one extends (the same event objects, in a bounded cache), encoding only the new
events. The pieces are written by ``avrowrite``'s compiled writers.

The bytes are the same as fastavro's for the whole record (a unit test compares them on
every history the tests build); the schema is checked when the writer is built, and a
schema whose events are not a top-level array of a union makes ``build`` return None, so
the codec falls back to encoding whole records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import fastavro

from orchestrator.protocol.avrowrite import Write, append_long, compile_writer
from orchestrator.protocol.records import HistoryEvent

# Event tuples whose encoding is kept, and their bytes; past either the cache starts again
# (an entry is replaced when a tuple extending it is encoded, so there is about one per
# workflow that moved recently; a dropped entry only costs one encoding in full).
MAX_CACHED_TUPLES: Final = 8_192
MAX_CACHED_BYTES: Final = 64 << 20
# How many events back from the end a transition's new events are looked for.
LOOKBACK: Final = 16
# Below this many events a record is encoded in one piece: looking up and keeping the
# cache entry costs more than re-encoding a short history (measured per transition of a
# growing history, building the record included: 22 against 27 us at 2 events, 25 against
# 27 at 4, 30 against 27 at 8, 69 against 28 at 40).
MIN_EVENTS: Final = 8

EventToAvro = Callable[[HistoryEvent], tuple[str, dict[str, Any]]]


class SplicingWriter:
    """Writes ``WorkflowRecord`` bodies (no header) as fastavro would, reusing the
    encoded bytes of events it has already written."""

    def __init__(
        self,
        head: Write,
        event: Write,
        tail: Write,
        head_fields: tuple[str, ...],
        tail_fields: tuple[str, ...],
        event_to_avro: EventToAvro,
    ) -> None:
        self._head = head
        self._event = event
        self._tail = tail
        self.head_fields = head_fields
        self.tail_fields = tail_fields
        self._event_to_avro = event_to_avro
        # id(last event) -> (events, their encoded items); the tuple is held, so the ids of
        # its events are not reused while the entry lives.
        self._cache: dict[int, tuple[tuple[HistoryEvent, ...], bytes]] = {}
        self._cached_bytes = 0

    @classmethod
    def build(
        cls, raw_schema: Mapping[str, Any], named: Mapping[str, Any], event_to_avro: EventToAvro
    ) -> SplicingWriter | None:
        """A writer for the record schema ``raw_schema`` (its JSON form) whose named
        dependencies (defined in other files) are ``named``; None if its events are not a
        top-level array of a union."""
        fields = list(raw_schema.get("fields", ()))
        names = [f.get("name") for f in fields]
        if "events" not in names:
            return None
        index = names.index("events")
        array = fields[index].get("type")
        if not isinstance(array, dict) or array.get("type") != "array":
            return None
        if not isinstance(array.get("items"), list):
            return None
        name = str(raw_schema.get("name", ""))
        namespace = raw_schema.get("namespace") or name.rpartition(".")[0] or None

        def record(part_name: str, part: list[Any]) -> dict[str, Any]:
            # The same namespace as the whole record, so types defined inline get the same
            # full names (the codec names union branches by them).
            schema: dict[str, Any] = {"type": "record", "name": part_name, "fields": part}
            if namespace is not None:
                schema["namespace"] = namespace
            return schema

        # Each piece is parsed with the named types defined before it in document order,
        # as in the whole schema. A record of one field encodes as that field, so the
        # events' union is wrapped in one to keep its namespace.
        known = dict(named)
        head = fastavro.parse_schema(record("SplicedHead", fields[:index]), named_schemas=known)
        events: Any = fastavro.parse_schema(
            record("SplicedEvents", [{"name": "events", "type": array}]),
            named_schemas=known,
        )
        tail = fastavro.parse_schema(
            record("SplicedTail", fields[index + 1 :]), named_schemas=known
        )
        union = events["fields"][0]["type"]["items"]
        return cls(
            compile_writer(head, known),
            compile_writer(union, known),
            compile_writer(tail, known),
            tuple(str(n) for n in names[:index]),
            tuple(str(n) for n in names[index + 1 :]),
            event_to_avro,
        )

    def write(
        self,
        out: bytearray,
        head: Mapping[str, Any],
        events: tuple[HistoryEvent, ...],
        tail: Mapping[str, Any],
    ) -> None:
        """Append the record's encoding to ``out``."""
        self._head(out, head)
        if events:
            append_long(out, len(events))
            out += self._items(events)
        out.append(0)
        self._tail(out, tail)

    def _items(self, events: tuple[HistoryEvent, ...]) -> bytes:
        """The encoded items of ``events`` (no count, no closing zero)."""
        count = len(events)
        known, data = 0, b""
        for end in range(count, max(0, count - LOOKBACK), -1):
            entry = self._cache.get(id(events[end - 1]))
            if entry is None:
                continue
            prefix, items = entry
            if len(prefix) == end and (
                prefix is events or all(a is b for a, b in zip(prefix, events, strict=False))
            ):
                known, data = end, items
                break
        if known == count:
            return data
        data += self._encode_items(events[known:])
        if known:
            # Superseded by the longer tuple: a workflow keeps one entry, not one per length.
            self._drop(id(events[known - 1]))
        self._drop(id(events[-1]))
        if len(data) > MAX_CACHED_BYTES:
            return data
        if (
            len(self._cache) >= MAX_CACHED_TUPLES
            or self._cached_bytes + len(data) > MAX_CACHED_BYTES
        ):
            self._cache.clear()
            self._cached_bytes = 0
        self._cache[id(events[-1])] = (events, data)
        self._cached_bytes += len(data)
        return data

    def _drop(self, key: int) -> None:
        entry = self._cache.pop(key, None)
        if entry is not None:
            self._cached_bytes -= len(entry[1])

    @property
    def cached(self) -> tuple[int, int]:
        """Entries and bytes the cache holds (for tests and metrics)."""
        return len(self._cache), self._cached_bytes

    def _encode_items(self, events: tuple[HistoryEvent, ...]) -> bytes:
        out = bytearray()
        to_avro, write = self._event_to_avro, self._event
        for event in events:
            write(out, to_avro(event))
        return bytes(out)
