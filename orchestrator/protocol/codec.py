"""Avro codec for every sagaline record, in the Confluent wire format.

A value is ``0x00`` (magic byte), a 4-byte big-endian schema id, then the record encoded
with fastavro's schemaless writer. Any Confluent-compatible tool can read it given the
schema. Without a schema registry, a schema's id is derived from the schema itself
(CRC-32 of its parsing canonical form, top bit cleared), so every process that has the
same ``.avsc`` files agrees on the ids with no coordination.

Old versions of a schema live in ``schemas/avro/archive/``; records written with them
are read through Avro schema resolution into the current shape.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import fastavro
import fastavro.schema

from orchestrator.errors import (
    ConfigurationError,
    MalformedRecordError,
    OversizedRecordError,
    UnknownSchemaError,
    WrongRecordTypeError,
)
from orchestrator.protocol.avrowrite import UnsupportedSchemaError, Write, compile_writer
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityHeartbeat,
    ActivityResult,
    ActivityScheduled,
    ActivityStarted,
    ActivityStatus,
    ActivityTask,
    AttemptHeartbeat,
    AttemptStarted,
    CancelRequested,
    CancelWorkflow,
    CompletePromise,
    Failure,
    HistoryEvent,
    IfClosed,
    IfRunning,
    InboxBody,
    ParentClosePolicy,
    ParentRef,
    PatchMarker,
    Payload,
    PromiseCompleted,
    PromiseCreated,
    QueryWorkflow,
    Reply,
    ReplyKind,
    ResumeWorkflow,
    RunRequest,
    SignalReceived,
    SignalWorkflow,
    StartWorkflow,
    TerminateWorkflow,
    TimerCancelled,
    TimerFired,
    TimerStarted,
    UpdateAccepted,
    UpdateWorkflow,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.protocol.splice import MIN_EVENTS, SplicingWriter

MAGIC: Final = 0
# Enum lookups by value and .value itself go through slow enum machinery (Python 3.11);
# every record read or written converts its statuses (an unknown symbol still goes to the
# enum, which raises as before).
_ACTIVITY_STATUSES: Final = {s.value: s for s in ActivityStatus}
_ACTIVITY_SYMBOLS: Final = {s: s.value for s in ActivityStatus}
_WORKFLOW_STATUSES: Final = {s.value: s for s in WorkflowStatus}
_STATUS_SYMBOLS: Final = {s: s.value for s in WorkflowStatus}
HEADER: Final = struct.Struct(">bI")
NS: Final = "io.sagaline."
# Shared types come first: the top-level schemas refer to them by name.
SCHEMA_ORDER: Final = (
    "Payload",
    "Failure",
    "StartWorkflow",
    "ActivityResult",
    "ResumeWorkflow",
    "ActivityStarted",
    "ActivityHeartbeat",
    "SignalWorkflow",
    "CompletePromise",
    "CancelWorkflow",
    "QueryWorkflow",
    "UpdateWorkflow",
    "TerminateWorkflow",
    "InboxRecord",
    "ActivityTask",
    "WorkflowRecord",
    "Reply",
)
INBOX: Final = NS + "InboxRecord"
REPLY: Final = NS + "Reply"
TASK: Final = NS + "ActivityTask"
WORKFLOW: Final = NS + "WorkflowRecord"


def default_schema_dir() -> Path:
    """Where the ``.avsc`` files are: ``$SAGALINE_SCHEMA_DIR`` or the repo's ``schemas/avro``."""
    configured = os.environ.get("SAGALINE_SCHEMA_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "schemas" / "avro"


def schema_id(parsed: Any) -> int:
    """The local id of a parsed schema: CRC-32 of its fully inlined canonical form, 31 bits.

    Every named type is inlined at its first use, at any depth, so changing a shared type
    such as Payload changes the id of every record that contains it.
    """
    named = parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
    canonical = fastavro.schema.to_parsing_canonical_form(_inline(parsed, named, set()))
    return zlib.crc32(canonical.encode()) & 0x7FFFFFFF


def _inline(schema: Any, named: Mapping[str, Any], seen: set[str]) -> Any:
    if isinstance(schema, str):
        if schema in named and schema not in seen:
            return _inline(named[schema], named, seen)
        return schema
    if isinstance(schema, list):
        return [_inline(branch, named, seen) for branch in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if not k.startswith("__")}
    kind = out.get("type")
    if kind in ("record", "error", "enum", "fixed") and "name" in out:
        seen.add(out["name"])
    if kind in ("record", "error"):
        out["fields"] = [{**f, "type": _inline(f["type"], named, seen)} for f in out["fields"]]
    elif kind == "array":
        out["items"] = _inline(out["items"], named, seen)
    elif kind == "map":
        out["values"] = _inline(out["values"], named, seen)
    elif not isinstance(kind, str) or kind not in ("enum", "fixed"):
        out["type"] = _inline(kind, named, seen)
    return out


class WorkflowHead(NamedTuple):
    """What a restore needs of a workflow record, read without decoding its history."""

    status: WorkflowStatus
    closed_at_ms: int | None
    wake_at_ms: int | None
    run_id: str = ""
    request_id: str | None = None
    earlier_requests: tuple[RunRequest, ...] = ()


@dataclass(frozen=True, slots=True)
class _Writer:
    name: str
    schema_id: int
    parsed: Any
    # The schema compiled by avrowrite (None: fastavro writes it).
    write: Write | None = None


def _compiled(parsed: Any) -> Write | None:
    try:
        return compile_writer(parsed, parsed.get("__named_schemas", {}))
    except UnsupportedSchemaError:
        return None


def _load_dir(directory: Path) -> dict[str, Any]:
    """Parse one directory's schemas into fully named, parsed fastavro schemas."""
    return _parse_dir(directory)[0]


def _parse_dir(directory: Path, until: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parsed schemas of one directory and the named types they define, stopping
    before schema ``until`` (a short name) if given."""
    named: dict[str, Any] = {}
    parsed: dict[str, Any] = {}
    for short in SCHEMA_ORDER:
        if short == until:
            break
        path = directory / f"{NS}{short}.avsc"
        if not path.exists():
            continue
        try:
            raw = json.loads(path.read_text())
            parsed[NS + short] = fastavro.parse_schema(raw, named_schemas=named)
        except (ValueError, fastavro.schema.SchemaParseException) as exc:
            raise ConfigurationError(f"cannot parse Avro schema {path}: {exc}") from exc
    return parsed, named


def _splicing_writer(directory: Path) -> SplicingWriter | None:
    """The writer that encodes workflow records without re-encoding known events."""
    _, named = _parse_dir(directory, until="WorkflowRecord")
    raw = json.loads((directory / f"{WORKFLOW}.avsc").read_text())
    try:
        writer = SplicingWriter.build(raw, named, _event_to_avro)
    except (ValueError, fastavro.schema.SchemaParseException):
        return None  # whole records are encoded instead
    if writer is None or (writer.head_fields, writer.tail_fields) != _SPLICED_FIELDS:
        return None
    return writer


# The fields _workflow_head and _workflow_tail fill, in the schema's order.
_SPLICED_FIELDS: Final = (
    (
        "workflow_id",
        "workflow_type",
        "status",
        "closed_at_ms",
        "run_id",
        "wake_at_ms",
        "request_id",
        "earlier_requests",
        "input",
    ),
    ("result", "failure", "started_at_ms", "updated_at_ms", "revision", "parent", "earlier_inputs"),
)


class AvroCodec:
    """Encodes and decodes sagaline records; one instance per process is enough.

    Example::

        codec = AvroCodec()
        data = codec.encode_inbox(StartWorkflow("order-1", "order.process", payload, now))
        assert codec.decode_inbox(data) == StartWorkflow(...)
    """

    def __init__(
        self,
        schema_dir: Path | None = None,
        *,
        max_record_bytes: int = 1 << 20,
        splice_from: int = MIN_EVENTS,
    ) -> None:
        """``splice_from``: workflow records with at least this many events are encoded
        reusing their known events' bytes (``orchestrator.protocol.splice``)."""
        directory = schema_dir or default_schema_dir()
        current = _load_dir(directory)
        missing = [s for s in SCHEMA_ORDER if NS + s not in current]
        if missing:
            raise ConfigurationError(
                f"schema directory {directory} lacks {', '.join(missing)}; "
                "set SAGALINE_SCHEMA_DIR to the repository's schemas/avro"
            )
        self.max_record_bytes = max_record_bytes
        self._current = current
        self._splice = _splicing_writer(directory)
        self._splice_from = splice_from
        self._writers: dict[str, _Writer] = {}
        self._by_id: dict[int, _Writer] = {}
        for name, parsed in current.items():
            writer = _Writer(name, schema_id(parsed), parsed, _compiled(parsed))
            self._writers[name] = writer
            self._by_id[writer.schema_id] = writer
        status_field = next(f for f in current[WORKFLOW]["fields"] if f["name"] == "status")
        # Enum indexes on the wire follow the schema's symbol order, not the Python enum's.
        self._statuses = tuple(
            WorkflowStatus(symbol)
            if symbol in WorkflowStatus.__members__
            else WorkflowStatus.UNKNOWN
            for symbol in status_field["type"]["symbols"]
        )
        # The newest archived version, for records that need nothing newer (see _writer_for).
        self._previous: dict[str, _Writer] = {}
        archive = directory / "archive"
        if archive.is_dir():
            for version_dir in sorted(
                (p for p in archive.iterdir() if p.is_dir()), key=_version_order
            ):
                versions = _load_dir(version_dir)
                for name, parsed in versions.items():
                    old = _Writer(name, schema_id(parsed), parsed, _compiled(parsed))
                    self._by_id.setdefault(old.schema_id, old)
                    self._previous[name] = self._by_id[old.schema_id]

    def schema_id_of(self, name: str) -> int:
        """The id the current version of schema ``name`` (e.g. ``io.sagaline.InboxRecord``) has."""
        return self._writers[name].schema_id

    def previous_schema_id_of(self, name: str) -> int:
        """The id records of ``name`` that use nothing the current version added are
        written with (the newest archived version), so processes one version behind read
        them during a rolling deploy; the current id when nothing is archived."""
        return self._writer_for(name, needs_current=False).schema_id

    def writer_schema(self, name: str) -> Any:
        """The current parsed schema of ``name``, for tools that encode by hand."""
        return self._writers[name].parsed

    def encode_raw(self, name: str, datum: Mapping[str, Any]) -> bytes:
        """Encode an Avro datum (dict form) with the current schema ``name``."""
        return self._encode(self._writers[name], datum)

    def _writer_for(self, name: str, needs_current: bool) -> _Writer:
        """The schema to write ``name`` with: the previous version when the record uses
        nothing the current one added, so processes not yet upgraded in a rolling deploy
        still read it; the current one otherwise."""
        if needs_current:
            return self._writers[name]
        return self._previous.get(name, self._writers[name])

    def _encode(self, writer: _Writer, datum: Mapping[str, Any]) -> bytes:
        if writer.write is not None:
            out = bytearray(HEADER.pack(MAGIC, writer.schema_id))
            writer.write(out, datum)
            return bytes(out)
        buf = io.BytesIO()
        buf.write(HEADER.pack(MAGIC, writer.schema_id))
        fastavro.schemaless_writer(buf, writer.parsed, datum)
        return buf.getvalue()

    def encode_with(self, parsed: Any, datum: Mapping[str, Any]) -> bytes:
        """Encode with an arbitrary parsed schema (tests use it to write old versions)."""
        buf = io.BytesIO()
        buf.write(HEADER.pack(MAGIC, schema_id(parsed)))
        fastavro.schemaless_writer(buf, parsed, datum)
        return buf.getvalue()

    def decode_raw(self, data: bytes | None, expected: str) -> dict[str, Any]:
        """Decode bytes written with any known version of ``expected`` into the current shape.

        Raises:
            MalformedRecordError: not a sagaline Avro record.
            UnknownSchemaError: the schema id is not known here.
            WrongRecordTypeError: a known schema of another record type.
            OversizedRecordError: larger than ``max_record_bytes``.
        """
        if data is None:
            raise MalformedRecordError("record has no value")
        if len(data) > self.max_record_bytes:
            raise OversizedRecordError(
                f"record is {len(data)} bytes, above the limit of {self.max_record_bytes}"
            )
        if len(data) < HEADER.size:
            raise MalformedRecordError(f"record of {len(data)} bytes is shorter than the header")
        magic, sid = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise MalformedRecordError(f"magic byte is {magic}, expected {MAGIC}")
        writer = self._by_id.get(sid)
        if writer is None:
            raise UnknownSchemaError(f"schema id {sid} is unknown to this process")
        if writer.name != expected:
            raise WrongRecordTypeError(f"record is a {writer.name}, expected {expected}")
        reader = self._writers[expected]
        # Records of the previous version differ from the current only by fields added
        # with defaults, which the converters below fill in themselves: reading them with
        # their own schema skips fastavro's resolution, which doubles the cost of every
        # task and inbox record written in the previous version (the common case, see
        # _writer_for).
        resolve = reader is not writer and self._previous.get(expected) is not writer
        body = io.BytesIO(data)
        body.seek(HEADER.size)
        try:
            datum = fastavro.schemaless_reader(
                body,
                writer.parsed,
                reader.parsed if resolve else None,
                return_record_name=True,
                return_record_name_override=True,
            )
        except Exception as exc:  # fastavro raises many types on garbage input
            raise MalformedRecordError(
                f"cannot decode {expected} (schema id {sid}): {type(exc).__name__}: {exc}"
            ) from exc
        if body.tell() != len(data):
            raise MalformedRecordError(
                f"{len(data) - body.tell()} trailing bytes after the {expected} record"
            )
        if not isinstance(datum, dict):
            raise MalformedRecordError(f"{expected} did not decode to a record")
        return datum

    # --- typed helpers -------------------------------------------------------------

    def encode_inbox(self, body: InboxBody) -> bytes:
        """Encode an inbox input (start, result, resume, start report, heartbeat, signal,
        promise completion)."""
        branch: tuple[str, dict[str, Any]]
        if isinstance(body, StartWorkflow):
            branch = (NS + "StartWorkflow", _start_to_avro(body))
        elif isinstance(body, ActivityResult):
            branch = (NS + "ActivityResult", _result_to_avro(body))
        elif isinstance(body, ResumeWorkflow):
            branch = (NS + "ResumeWorkflow", _resume_to_avro(body))
        elif isinstance(body, ActivityStarted):
            branch = (NS + "ActivityStarted", _started_to_avro(body))
        elif isinstance(body, SignalWorkflow):
            branch = (NS + "SignalWorkflow", _signal_to_avro(body))
        elif isinstance(body, CompletePromise):
            branch = (NS + "CompletePromise", _completion_to_avro(body))
        elif isinstance(body, CancelWorkflow):
            cancel: dict[str, Any] = {
                "workflow_id": body.workflow_id,
                "reason": body.reason,
                "requested_at_ms": body.requested_at_ms,
            }
            if body.parent is not None:  # only the current schema has it
                cancel["parent"] = _parent_to_avro(body.parent)
            branch = (NS + "CancelWorkflow", cancel)
        elif isinstance(body, QueryWorkflow):
            branch = (
                NS + "QueryWorkflow",
                {
                    "workflow_id": body.workflow_id,
                    "request_id": body.request_id,
                    "name": body.name,
                    "args": _payload_to_avro(body.args),
                    "sent_at_ms": body.sent_at_ms,
                },
            )
        elif isinstance(body, TerminateWorkflow):
            branch = (
                NS + "TerminateWorkflow",
                {
                    "workflow_id": body.workflow_id,
                    "reason": body.reason,
                    "requested_at_ms": body.requested_at_ms,
                    "parent": _parent_to_avro(body.parent),
                },
            )
        elif isinstance(body, UpdateWorkflow):
            branch = (
                NS + "UpdateWorkflow",
                {
                    "workflow_id": body.workflow_id,
                    "update_id": body.update_id,
                    "name": body.name,
                    "args": _payload_to_avro(body.args),
                    "sent_at_ms": body.sent_at_ms,
                },
            )
        else:
            branch = (NS + "ActivityHeartbeat", _heartbeat_to_avro(body))
        return self._encode(self._writer_for(INBOX, _inbox_needs_current(body)), {"body": branch})

    def decode_inbox(self, data: bytes | None) -> InboxBody:
        """Decode an ``InboxRecord`` value into its body."""
        datum = self.decode_raw(data, INBOX)
        name, body = datum["body"]
        converter = _INBOX_BRANCHES.get(name)
        if converter is None:
            raise WrongRecordTypeError(f"inbox branch {name} is not handled by this version")
        return converter(body)

    def encode_task(self, task: ActivityTask) -> bytes:
        """Encode an ``ActivityTask``."""
        return self._encode(self._writer_for(TASK, _task_needs_current(task)), _task_to_avro(task))

    def encode_reply(self, reply: Reply) -> bytes:
        """Encode a ``Reply`` for the replies topic."""
        return self.encode_raw(REPLY, _reply_to_avro(reply))

    def decode_reply(self, data: bytes | None) -> Reply:
        """Decode a ``Reply`` from the replies topic."""
        return _reply_from_avro(self.decode_raw(data, REPLY))

    def decode_task(self, data: bytes | None) -> ActivityTask:
        """Decode an ``ActivityTask``."""
        return _task_from_avro(self.decode_raw(data, TASK))

    def encode_workflow(self, record: WorkflowRecord) -> bytes:
        """Encode a ``WorkflowRecord`` for the history topic."""
        splice = self._splice
        if splice is None or len(record.events) < self._splice_from:
            return self.encode_raw(WORKFLOW, _workflow_to_avro(record))
        out = bytearray(HEADER.pack(MAGIC, self._writers[WORKFLOW].schema_id))
        splice.write(out, _workflow_head(record), record.events, _workflow_tail(record))
        return bytes(out)

    def encode_workflow_whole(self, record: WorkflowRecord) -> bytes:
        """``encode_workflow`` through fastavro in one piece (the reference the spliced
        and compiled encodings are tested against)."""
        writer = self._writers[WORKFLOW]
        buf = io.BytesIO()
        buf.write(HEADER.pack(MAGIC, writer.schema_id))
        fastavro.schemaless_writer(buf, writer.parsed, _workflow_to_avro(record))
        return buf.getvalue()

    def decode_workflow(self, data: bytes | None) -> WorkflowRecord:
        """Decode a ``WorkflowRecord`` from the history topic."""
        return _workflow_from_avro(self.decode_raw(data, WORKFLOW))

    def peek_workflow(self, data: bytes) -> WorkflowHead:
        """The status, closing time and wake time of an encoded ``WorkflowRecord``, cheaply.

        A record in the current schema is read only up to its sixth field (status,
        ``closed_at_ms``, ``run_id`` and ``wake_at_ms`` come first for this purpose), so a
        restore need not decode whole histories; records of archived versions are decoded
        in full.

        Raises:
            RecordDecodeError: as :meth:`decode_raw` would for these bytes' header.
        """
        if len(data) < HEADER.size:
            raise MalformedRecordError(f"record of {len(data)} bytes is shorter than the header")
        magic, sid = HEADER.unpack_from(data)
        writer = self._by_id.get(sid) if magic == MAGIC else None
        if writer is None or writer is not self._writers[WORKFLOW]:
            record = self.decode_workflow(data)
            return WorkflowHead(
                record.status,
                record.closed_at_ms,
                record.wake_at_ms,
                record.run_id,
                record.request_id,
                record.earlier_requests,
            )
        try:
            pos = HEADER.size
            for _ in range(2):  # workflow_id, workflow_type
                length, pos = _read_long(data, pos)
                pos += length
            index, pos = _read_long(data, pos)
            status = self._statuses[index]
            closed_at_ms, pos = _read_optional_long(data, pos)
            run_id, pos = _read_string(data, pos)
            wake_at_ms, pos = _read_optional_long(data, pos)
            branch, pos = _read_long(data, pos)  # request_id: null or string
            request_id = None
            if branch == 1:
                request_id, pos = _read_string(data, pos)
            earlier: list[RunRequest] = []
            count, pos = _read_long(data, pos)
            while count:
                if count < 0:  # a block with its size in bytes (Avro allows it)
                    _, pos = _read_long(data, pos)
                    count = -count
                for _ in range(count):
                    earlier_request, pos = _read_string(data, pos)
                    earlier_run, pos = _read_string(data, pos)
                    earlier.append(RunRequest(earlier_request, earlier_run))
                count, pos = _read_long(data, pos)
        except (IndexError, UnicodeDecodeError) as exc:
            raise MalformedRecordError("truncated WorkflowRecord head") from exc
        return WorkflowHead(status, closed_at_ms, wake_at_ms, run_id, request_id, tuple(earlier))


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """One zig-zag varint (Avro int or long) at ``pos``; returns it and the next position."""
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise IndexError("varint longer than 10 bytes")


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    length, pos = _read_long(data, pos)
    end = pos + length
    if length < 0 or end > len(data):
        raise IndexError("string past the end of the record")
    return data[pos:end].decode("utf-8"), end


def _version_order(directory: Path) -> tuple[int, str]:
    """``v10`` after ``v9``."""
    digits = directory.name.removeprefix("v")
    return (int(digits), "") if digits.isdigit() else (-1, directory.name)


def _inbox_needs_current(body: InboxBody) -> bool:
    """True when ``body`` uses what protocol v5 added to the inbox (archive/v4 lacks it):
    queries, updates, and starts (alone or a signal's) that ask for a reply or name an
    id-reuse policy."""
    if isinstance(body, StartWorkflow):
        return _start_needs_current(body)
    if isinstance(body, SignalWorkflow):
        return body.start is not None and _start_needs_current(body.start)
    if isinstance(body, CancelWorkflow):
        return body.parent is not None
    return isinstance(body, QueryWorkflow | UpdateWorkflow | TerminateWorkflow)


def _start_needs_current(start: StartWorkflow) -> bool:
    return (
        start.request_id is not None
        or start.if_running is not None
        or start.if_closed is not None
        or start.parent is not None
    )


def _task_needs_current(task: ActivityTask) -> bool:
    """True when ``task`` uses what protocols v4 and v5 added to tasks (archive/v3 lacks
    it): nothing, both left tasks alone."""
    del task
    return False


def _read_optional_long(data: bytes, pos: int) -> tuple[int | None, int]:
    """A ``["null", "long"]`` union at ``pos``; returns it and the next position."""
    branch, pos = _read_long(data, pos)
    if branch == 0:
        return None, pos
    if branch != 1:
        raise IndexError(f"union branch {branch} of a nullable long")
    return _read_long(data, pos)


# --- dict <-> value conversions (explicit: they are on the hot path) ---------------


def _payload_to_avro(p: Payload) -> dict[str, Any]:
    return {"encoding": p.encoding, "data": p.data}


def _payload_from_avro(d: Mapping[str, Any]) -> Payload:
    return Payload(data=d["data"], encoding=d["encoding"])


def _opt_payload(d: Mapping[str, Any] | None) -> Payload | None:
    return None if d is None else _payload_from_avro(d)


def _opt_payload_to_avro(p: Payload | None) -> dict[str, Any] | None:
    return None if p is None else _payload_to_avro(p)


def _failure_to_avro(f: Failure) -> dict[str, Any]:
    return {
        "error_type": f.error_type,
        "message": f.message,
        "retryable": f.retryable,
        "effects_committed": f.effects_committed,
        "retry_after_ms": f.retry_after_ms,
    }


def _failure_from_avro(d: Mapping[str, Any]) -> Failure:
    return Failure(
        error_type=d["error_type"],
        message=d["message"],
        retryable=d["retryable"],
        effects_committed=d["effects_committed"],
        retry_after_ms=d.get("retry_after_ms"),
    )


def _opt_failure(d: Mapping[str, Any] | None) -> Failure | None:
    return None if d is None else _failure_from_avro(d)


def _start_to_avro(s: StartWorkflow) -> dict[str, Any]:
    datum: dict[str, Any] = {
        "workflow_id": s.workflow_id,
        "workflow_type": s.workflow_type,
        "input": _payload_to_avro(s.input),
        "requested_at_ms": s.requested_at_ms,
    }
    if _start_needs_current(s):
        # Only the current schema has these; a plain start is written with the previous.
        datum["request_id"] = s.request_id
        datum["if_running"] = None if s.if_running is None else s.if_running.value
        datum["if_closed"] = None if s.if_closed is None else s.if_closed.value
        datum["parent"] = _parent_to_avro(s.parent)
    return datum


def _start_from_avro(d: Mapping[str, Any]) -> StartWorkflow:
    if_running = d.get("if_running")
    if_closed = d.get("if_closed")
    return StartWorkflow(
        workflow_id=d["workflow_id"],
        workflow_type=d["workflow_type"],
        input=_payload_from_avro(d["input"]),
        requested_at_ms=d["requested_at_ms"],
        request_id=d.get("request_id"),
        if_running=None if if_running is None else IfRunning(if_running),
        if_closed=None if if_closed is None else IfClosed(if_closed),
        parent=_parent_from_avro(d.get("parent")),
    )


def _query_from_avro(d: Mapping[str, Any]) -> QueryWorkflow:
    return QueryWorkflow(
        workflow_id=d["workflow_id"],
        request_id=d["request_id"],
        name=d["name"],
        args=_payload_from_avro(d["args"]),
        sent_at_ms=d["sent_at_ms"],
    )


def _update_from_avro(d: Mapping[str, Any]) -> UpdateWorkflow:
    return UpdateWorkflow(
        workflow_id=d["workflow_id"],
        update_id=d["update_id"],
        name=d["name"],
        args=_payload_from_avro(d["args"]),
        sent_at_ms=d["sent_at_ms"],
    )


def _reply_to_avro(r: Reply) -> dict[str, Any]:
    return {
        "request_id": r.request_id,
        "kind": r.kind.value,
        "workflow_id": r.workflow_id,
        "run_id": r.run_id,
        "ok": r.ok,
        "created": r.created,
        "status": r.status,
        "payload": _opt_payload_to_avro(r.payload),
        "failure": None if r.failure is None else _failure_to_avro(r.failure),
        "at_ms": r.at_ms,
    }


def _reply_from_avro(d: Mapping[str, Any]) -> Reply:
    return Reply(
        request_id=d["request_id"],
        kind=ReplyKind(d["kind"]),
        workflow_id=d["workflow_id"],
        run_id=d["run_id"],
        ok=d["ok"],
        status=d["status"],
        at_ms=d["at_ms"],
        created=d.get("created", False),
        payload=_opt_payload(d.get("payload")),
        failure=_opt_failure(d.get("failure")),
    )


def _result_to_avro(r: ActivityResult) -> dict[str, Any]:
    return {
        "workflow_id": r.workflow_id,
        "activity_id": r.activity_id,
        "seq": r.seq,
        "attempt": r.attempt,
        "status": _ACTIVITY_SYMBOLS[r.status],
        "result": None if r.result is None else _payload_to_avro(r.result),
        "failure": None if r.failure is None else _failure_to_avro(r.failure),
        "finished_at_ms": r.finished_at_ms,
    }


def _result_from_avro(d: Mapping[str, Any]) -> ActivityResult:
    return ActivityResult(
        workflow_id=d["workflow_id"],
        activity_id=d["activity_id"],
        seq=d["seq"],
        attempt=d["attempt"],
        status=_ACTIVITY_STATUSES.get(d["status"]) or ActivityStatus(d["status"]),
        finished_at_ms=d["finished_at_ms"],
        result=_opt_payload(d["result"]),
        failure=_opt_failure(d["failure"]),
    )


def _resume_to_avro(r: ResumeWorkflow) -> dict[str, Any]:
    return {"workflow_id": r.workflow_id, "requested_at_ms": r.requested_at_ms}


def _resume_from_avro(d: Mapping[str, Any]) -> ResumeWorkflow:
    return ResumeWorkflow(workflow_id=d["workflow_id"], requested_at_ms=d["requested_at_ms"])


def _signal_to_avro(s: SignalWorkflow) -> dict[str, Any]:
    return {
        "workflow_id": s.workflow_id,
        "name": s.name,
        "payload": _payload_to_avro(s.payload),
        "signal_id": s.signal_id,
        "sent_at_ms": s.sent_at_ms,
        "start": None if s.start is None else _start_to_avro(s.start),
    }


def _completion_to_avro(c: CompletePromise) -> dict[str, Any]:
    return {
        "workflow_id": c.workflow_id,
        "promise_id": c.promise_id,
        "payload": _opt_payload_to_avro(c.payload),
        "failure": None if c.failure is None else _failure_to_avro(c.failure),
        "completed_at_ms": c.completed_at_ms,
    }


def _completion_from_avro(d: Mapping[str, Any]) -> CompletePromise:
    return CompletePromise(
        workflow_id=d["workflow_id"],
        promise_id=d["promise_id"],
        completed_at_ms=d["completed_at_ms"],
        payload=_opt_payload(d["payload"]),
        failure=_opt_failure(d["failure"]),
    )


def _signal_from_avro(d: Mapping[str, Any]) -> SignalWorkflow:
    start = d.get("start")
    return SignalWorkflow(
        workflow_id=d["workflow_id"],
        name=d["name"],
        payload=_payload_from_avro(d["payload"]),
        signal_id=d["signal_id"],
        sent_at_ms=d["sent_at_ms"],
        start=None if start is None else _start_from_avro(start),
    )


def _started_to_avro(s: ActivityStarted) -> dict[str, Any]:
    return {
        "workflow_id": s.workflow_id,
        "activity_id": s.activity_id,
        "seq": s.seq,
        "attempt": s.attempt,
        "started_at_ms": s.started_at_ms,
    }


def _started_from_avro(d: Mapping[str, Any]) -> ActivityStarted:
    return ActivityStarted(
        workflow_id=d["workflow_id"],
        activity_id=d["activity_id"],
        seq=d["seq"],
        attempt=d["attempt"],
        started_at_ms=d["started_at_ms"],
    )


def _heartbeat_to_avro(h: ActivityHeartbeat) -> dict[str, Any]:
    return {
        "workflow_id": h.workflow_id,
        "activity_id": h.activity_id,
        "seq": h.seq,
        "attempt": h.attempt,
        "details": None if h.details is None else _payload_to_avro(h.details),
        "at_ms": h.at_ms,
    }


def _heartbeat_from_avro(d: Mapping[str, Any]) -> ActivityHeartbeat:
    return ActivityHeartbeat(
        workflow_id=d["workflow_id"],
        activity_id=d["activity_id"],
        seq=d["seq"],
        attempt=d["attempt"],
        at_ms=d["at_ms"],
        details=_opt_payload(d["details"]),
    )


_INBOX_BRANCHES: dict[str, Callable[[Mapping[str, Any]], InboxBody]] = {
    NS + "StartWorkflow": _start_from_avro,
    NS + "ActivityResult": _result_from_avro,
    NS + "ResumeWorkflow": _resume_from_avro,
    NS + "ActivityStarted": _started_from_avro,
    NS + "ActivityHeartbeat": _heartbeat_from_avro,
    NS + "SignalWorkflow": _signal_from_avro,
    NS + "CompletePromise": _completion_from_avro,
    NS + "CancelWorkflow": lambda d: CancelWorkflow(
        d["workflow_id"], d["reason"], d["requested_at_ms"], _parent_from_avro(d.get("parent"))
    ),
    NS + "QueryWorkflow": _query_from_avro,
    NS + "UpdateWorkflow": _update_from_avro,
    NS + "TerminateWorkflow": lambda d: TerminateWorkflow(
        d["workflow_id"], d["reason"], d["requested_at_ms"], _parent_from_avro(d.get("parent"))
    ),
}


def _task_to_avro(t: ActivityTask) -> dict[str, Any]:
    return {
        "workflow_id": t.workflow_id,
        "workflow_type": t.workflow_type,
        "activity_id": t.activity_id,
        "seq": t.seq,
        "attempt": t.attempt,
        "participant": t.participant,
        "activity": t.activity,
        "payload": _payload_to_avro(t.payload),
        "compensation": t.compensation,
        "scheduled_at_ms": t.scheduled_at_ms,
        "deadline_ms": t.deadline_ms,
        "start_to_close_ms": t.start_to_close_ms,
        "heartbeat_timeout_ms": t.heartbeat_timeout_ms,
        "heartbeat_details": _opt_payload_to_avro(t.heartbeat_details),
        "report_start": t.report_start,
    }


def _task_from_avro(d: Mapping[str, Any]) -> ActivityTask:
    return ActivityTask(
        workflow_id=d["workflow_id"],
        workflow_type=d["workflow_type"],
        activity_id=d["activity_id"],
        seq=d["seq"],
        attempt=d["attempt"],
        participant=d["participant"],
        activity=d["activity"],
        payload=_payload_from_avro(d["payload"]),
        compensation=d["compensation"],
        scheduled_at_ms=d["scheduled_at_ms"],
        deadline_ms=d["deadline_ms"],
        start_to_close_ms=d.get("start_to_close_ms"),
        heartbeat_timeout_ms=d.get("heartbeat_timeout_ms"),
        heartbeat_details=_opt_payload(d.get("heartbeat_details")),
        report_start=d.get("report_start", False),
    )


def _event_to_avro(e: HistoryEvent) -> tuple[str, dict[str, Any]]:
    if isinstance(e, ActivityScheduled):
        return (
            NS + "ActivityScheduled",
            {
                "seq": e.seq,
                "attempt": e.attempt,
                "name": e.name,
                "payload": _payload_to_avro(e.payload),
                "compensation": e.compensation,
                "max_attempts": e.max_attempts,
                "non_retryable": list(e.non_retryable),
                "initial_interval_ms": e.initial_interval_ms,
                "backoff_coefficient": e.backoff_coefficient,
                "maximum_interval_ms": e.maximum_interval_ms,
                "schedule_to_close_ms": e.schedule_to_close_ms,
                "start_to_close_ms": e.start_to_close_ms,
                "heartbeat_timeout_ms": e.heartbeat_timeout_ms,
                "backoff_ms": e.backoff_ms,
                "child_workflow_id": e.child_workflow_id,
                "parent_close_policy": None
                if e.parent_close_policy is None
                else e.parent_close_policy.value,
                "at_ms": e.at_ms,
            },
        )
    if isinstance(e, ActivityCompleted):
        return (
            NS + "ActivityCompleted",
            {
                "seq": e.seq,
                "attempt": e.attempt,
                "result": _payload_to_avro(e.result),
                "at_ms": e.at_ms,
            },
        )
    if isinstance(e, ActivityFailed):
        return (
            NS + "ActivityFailed",
            {
                "seq": e.seq,
                "attempt": e.attempt,
                "failure": _failure_to_avro(e.failure),
                "at_ms": e.at_ms,
                "retry_at_ms": e.retry_at_ms,
            },
        )
    if isinstance(e, AttemptStarted):
        return (NS + "AttemptStarted", {"seq": e.seq, "attempt": e.attempt, "at_ms": e.at_ms})
    if isinstance(e, AttemptHeartbeat):
        return (
            NS + "AttemptHeartbeat",
            {
                "seq": e.seq,
                "attempt": e.attempt,
                "details": _opt_payload_to_avro(e.details),
                "at_ms": e.at_ms,
            },
        )
    if isinstance(e, TimerStarted):
        return (
            NS + "TimerStarted",
            {"seq": e.seq, "fire_at_ms": e.fire_at_ms, "at_ms": e.at_ms},
        )
    if isinstance(e, TimerFired):
        return (NS + "TimerFired", {"seq": e.seq, "at_ms": e.at_ms})
    if isinstance(e, CancelRequested):
        return (NS + "CancelRequested", {"reason": e.reason, "at_ms": e.at_ms})
    if isinstance(e, PromiseCreated):
        return (NS + "PromiseCreated", {"seq": e.seq, "name": e.name, "at_ms": e.at_ms})
    if isinstance(e, PromiseCompleted):
        return (
            NS + "PromiseCompleted",
            {
                "seq": e.seq,
                "payload": _opt_payload_to_avro(e.payload),
                "failure": None if e.failure is None else _failure_to_avro(e.failure),
                "at_ms": e.at_ms,
            },
        )
    if isinstance(e, UpdateAccepted):
        return (
            NS + "UpdateAccepted",
            {
                "update_id": e.update_id,
                "name": e.name,
                "args": _payload_to_avro(e.args),
                "at_ms": e.at_ms,
            },
        )
    if isinstance(e, PatchMarker):
        return (
            NS + "PatchMarker",
            {
                "patch_id": e.patch_id,
                "position": e.position,
                "deprecated": e.deprecated,
                "at_ms": e.at_ms,
            },
        )
    if isinstance(e, SignalReceived):
        return (
            NS + "SignalReceived",
            {
                "name": e.name,
                "payload": _payload_to_avro(e.payload),
                "signal_id": e.signal_id,
                "at_ms": e.at_ms,
            },
        )
    return (NS + "TimerCancelled", {"seq": e.seq, "at_ms": e.at_ms})


def _event_from_avro(item: tuple[str, Mapping[str, Any]]) -> HistoryEvent:
    name, d = item
    if name == NS + "ActivityScheduled":
        return ActivityScheduled(
            seq=d["seq"],
            attempt=d["attempt"],
            name=d["name"],
            payload=_payload_from_avro(d["payload"]),
            at_ms=d["at_ms"],
            compensation=d["compensation"],
            max_attempts=d["max_attempts"],
            non_retryable=tuple(d["non_retryable"]),
            initial_interval_ms=d.get("initial_interval_ms", 0),
            backoff_coefficient=d.get("backoff_coefficient", 2.0),
            maximum_interval_ms=d.get("maximum_interval_ms", 0),
            schedule_to_close_ms=d.get("schedule_to_close_ms"),
            start_to_close_ms=d.get("start_to_close_ms"),
            heartbeat_timeout_ms=d.get("heartbeat_timeout_ms"),
            backoff_ms=d.get("backoff_ms", 0),
            child_workflow_id=d.get("child_workflow_id"),
            parent_close_policy=_close_policy(d.get("parent_close_policy")),
        )
    if name == NS + "ActivityCompleted":
        return ActivityCompleted(
            seq=d["seq"],
            attempt=d["attempt"],
            result=_payload_from_avro(d["result"]),
            at_ms=d["at_ms"],
        )
    if name == NS + "ActivityFailed":
        return ActivityFailed(
            seq=d["seq"],
            attempt=d["attempt"],
            failure=_failure_from_avro(d["failure"]),
            at_ms=d["at_ms"],
            retry_at_ms=d.get("retry_at_ms"),
        )
    if name == NS + "AttemptStarted":
        return AttemptStarted(seq=d["seq"], attempt=d["attempt"], at_ms=d["at_ms"])
    if name == NS + "AttemptHeartbeat":
        return AttemptHeartbeat(
            seq=d["seq"], attempt=d["attempt"], at_ms=d["at_ms"], details=_opt_payload(d["details"])
        )
    if name == NS + "TimerStarted":
        return TimerStarted(seq=d["seq"], fire_at_ms=d["fire_at_ms"], at_ms=d["at_ms"])
    if name == NS + "TimerFired":
        return TimerFired(seq=d["seq"], at_ms=d["at_ms"])
    if name == NS + "TimerCancelled":
        return TimerCancelled(seq=d["seq"], at_ms=d["at_ms"])
    if name == NS + "CancelRequested":
        return CancelRequested(reason=d["reason"], at_ms=d["at_ms"])
    if name == NS + "PromiseCreated":
        return PromiseCreated(seq=d["seq"], name=d["name"], at_ms=d["at_ms"])
    if name == NS + "PromiseCompleted":
        return PromiseCompleted(
            seq=d["seq"],
            at_ms=d["at_ms"],
            payload=_opt_payload(d["payload"]),
            failure=_opt_failure(d["failure"]),
        )
    if name == NS + "SignalReceived":
        return SignalReceived(
            name=d["name"],
            payload=_payload_from_avro(d["payload"]),
            signal_id=d["signal_id"],
            at_ms=d["at_ms"],
        )
    if name == NS + "UpdateAccepted":
        return UpdateAccepted(
            update_id=d["update_id"],
            name=d["name"],
            args=_payload_from_avro(d["args"]),
            at_ms=d["at_ms"],
        )
    if name == NS + "PatchMarker":
        return PatchMarker(
            patch_id=d["patch_id"],
            position=d["position"],
            deprecated=d["deprecated"],
            at_ms=d["at_ms"],
        )
    raise WrongRecordTypeError(f"history event {name} is not handled by this version")


def _workflow_to_avro(r: WorkflowRecord) -> dict[str, Any]:
    return {
        **_workflow_head(r),
        "events": [_event_to_avro(e) for e in r.events],
        **_workflow_tail(r),
    }


def _workflow_head(r: WorkflowRecord) -> dict[str, Any]:
    """The fields before ``events``."""
    return {
        "workflow_id": r.workflow_id,
        "workflow_type": r.workflow_type,
        "status": _STATUS_SYMBOLS[r.status],
        "closed_at_ms": r.closed_at_ms,
        "run_id": r.run_id,
        "wake_at_ms": r.wake_at_ms,
        "request_id": r.request_id,
        "earlier_requests": [
            {"request_id": e.request_id, "run_id": e.run_id} for e in r.earlier_requests
        ],
        "input": _payload_to_avro(r.input),
    }


def _workflow_tail(r: WorkflowRecord) -> dict[str, Any]:
    """The fields after ``events``."""
    return {
        "result": None if r.result is None else _payload_to_avro(r.result),
        "failure": None if r.failure is None else _failure_to_avro(r.failure),
        "started_at_ms": r.started_at_ms,
        "updated_at_ms": r.updated_at_ms,
        "revision": r.revision,
        "parent": _parent_to_avro(r.parent),
        "earlier_inputs": list(r.earlier_inputs),
    }


def _parent_to_avro(p: ParentRef | None) -> dict[str, Any] | None:
    return None if p is None else {"workflow_id": p.workflow_id, "run_id": p.run_id, "seq": p.seq}


def _parent_from_avro(d: Mapping[str, Any] | None) -> ParentRef | None:
    return None if d is None else ParentRef(d["workflow_id"], d["run_id"], d["seq"])


def _close_policy(symbol: str | None) -> ParentClosePolicy | None:
    return None if symbol is None else ParentClosePolicy(symbol)


def _workflow_from_avro(d: Mapping[str, Any]) -> WorkflowRecord:
    return WorkflowRecord(
        workflow_id=d["workflow_id"],
        workflow_type=d["workflow_type"],
        status=_WORKFLOW_STATUSES.get(d["status"]) or WorkflowStatus(d["status"]),
        input=_payload_from_avro(d["input"]),
        started_at_ms=d["started_at_ms"],
        updated_at_ms=d["updated_at_ms"],
        revision=d["revision"],
        events=tuple(_event_from_avro(e) for e in d["events"]),
        result=_opt_payload(d["result"]),
        failure=_opt_failure(d["failure"]),
        closed_at_ms=d["closed_at_ms"],
        run_id=d["run_id"],
        wake_at_ms=d.get("wake_at_ms"),
        request_id=d.get("request_id"),
        parent=_parent_from_avro(d.get("parent")),
        earlier_requests=tuple(
            RunRequest(e["request_id"], e["run_id"]) for e in d.get("earlier_requests", ())
        ),
        earlier_inputs=tuple(d.get("earlier_inputs", ())),
    )
