"""Protocol v5 (id reuse, queries, updates, replies): its records round-trip, records that
use nothing v5 added are still written so that v4 processes read them, replies written by
any Avro client decode, and what v5 writes into a workflow record is read by v4 code as
the enum default.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import fastavro
import pytest

from orchestrator import IfClosed, IfRunning
from orchestrator.errors import MalformedRecordError, WrongRecordTypeError
from orchestrator.protocol.codec import (
    HEADER,
    INBOX,
    MAGIC,
    REPLY,
    TASK,
    WORKFLOW,
    AvroCodec,
    _workflow_to_avro,
    default_schema_dir,
    schema_id,
)
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityScheduled,
    CancelWorkflow,
    CompletePromise,
    Failure,
    InboxBody,
    Payload,
    QueryWorkflow,
    Reply,
    ReplyKind,
    ResumeWorkflow,
    SignalReceived,
    SignalWorkflow,
    StartWorkflow,
    TimerFired,
    TimerStarted,
    UpdateAccepted,
    UpdateWorkflow,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.protocol.splice import MIN_EVENTS
from tests.unit.conftest import assert_encodable

from .test_codec_v3 import PLAIN_TASK, parse_archived

CODEC = AvroCodec()
V4 = parse_archived(default_schema_dir() / "archive" / "v4")
V5 = parse_archived(default_schema_dir() / "archive" / "v5")
CURRENT = parse_archived(default_schema_dir())


def _read(data: bytes, writer: Any, reader: Any) -> dict[str, Any]:
    """The body of ``data`` as fastavro (any Avro library) reads it."""
    datum = fastavro.schemaless_reader(io.BytesIO(data[HEADER.size :]), writer, reader)
    assert isinstance(datum, dict)
    return datum


def _written_with(data: bytes) -> int:
    magic, sid = HEADER.unpack_from(data)
    assert magic == MAGIC
    return int(sid)


def _start(**options: Any) -> StartWorkflow:
    return StartWorkflow("order-1", "order.process", encode_json({"total": 5}), 1_000, **options)


QUERY = QueryWorkflow("order-1", "req-q-1", "status", encode_json({"verbose": True}), 1_100)
QUERY_NO_ARGS = QueryWorkflow("order-ü", "req-q-2", "ïtems", encode_json(None), 1_101)
UPDATE = UpdateWorkflow("order-1", "upd-1", "add_item", encode_json(["sku-1", 2]), 1_200)
FULL_START = _start(
    request_id="req-1",
    if_running=IfRunning.TERMINATE_EXISTING,
    if_closed=IfClosed.ALLOW_IF_FAILED,
)
SIGNAL_WITH_START = SignalWorkflow(
    "order-1",
    "approve",
    encode_json({"by": "ann"}),
    "sig-1",
    1_300,
    _start(request_id="req-2"),
)


@pytest.mark.parametrize(
    "body",
    [
        QUERY,
        QUERY_NO_ARGS,
        UPDATE,
        FULL_START,
        _start(request_id="req-1"),
        _start(if_running=IfRunning.FAIL),
        _start(if_running=IfRunning.USE_EXISTING),
        _start(if_closed=IfClosed.REJECT),
        _start(if_closed=IfClosed.ALLOW),
        SIGNAL_WITH_START,
        dataclasses.replace(SIGNAL_WITH_START, start=_start(if_closed=IfClosed.ALLOW)),
    ],
    ids=[
        "query",
        "query-no-args",
        "update",
        "start-all-options",
        "start-request-id",
        "start-fail",
        "start-use-existing",
        "start-reject",
        "start-allow",
        "signal-with-start-request-id",
        "signal-with-start-if-closed",
    ],
)
def test_what_v5_added_round_trips_and_is_written_with_the_current_inbox_id(
    body: InboxBody,
) -> None:
    data = CODEC.encode_inbox(body)
    assert CODEC.decode_inbox(data) == body
    assert _written_with(data) == CODEC.schema_id_of(INBOX) == schema_id(CURRENT[INBOX])
    assert _written_with(data) != schema_id(V4[INBOX])
    # fastavro reads it with the current schema: the bytes are plain Avro.
    assert "body" in _read(data, CURRENT[INBOX], None)


@pytest.mark.parametrize(
    "body",
    [
        _start(),
        SignalWorkflow("order-1", "approve", encode_json(1), "sig-1", 1_300),
        dataclasses.replace(SIGNAL_WITH_START, start=_start()),
        CancelWorkflow("order-1", "customer changed plans", 1_400),
        ResumeWorkflow("order-1", 1_500),
        CompletePromise("order-1", "order-1/r1/p3", 1_600, encode_json("paid")),
    ],
    ids=["start", "signal", "signal-with-plain-start", "cancel", "resume", "promise"],
)
def test_what_uses_nothing_new_is_written_with_the_previous_ids(body: InboxBody) -> None:
    # v6 left the inbox as v5 had it, so v5 processes (one version behind) read every
    # input; v4 ones did while v5 was current, when these were written with v4's ids.
    data = CODEC.encode_inbox(body)
    assert _written_with(data) == schema_id(V5[INBOX]) == CODEC.previous_schema_id_of(INBOX)
    assert "body" in _read(data, V5[INBOX], V5[INBOX])
    # ... and so does this one, with none of v5's options.
    decoded = CODEC.decode_inbox(data)
    assert decoded == body
    start = decoded if isinstance(decoded, StartWorkflow) else getattr(decoded, "start", None)
    if start is not None:
        assert (start.request_id, start.if_running, start.if_closed) == (None, None, None)


def test_tasks_are_still_written_with_the_v4_id() -> None:
    data = CODEC.encode_task(PLAIN_TASK)
    assert _written_with(data) == schema_id(V4[TASK])
    assert CODEC.decode_task(data) == PLAIN_TASK


def test_a_v5_start_written_by_another_avro_client_decodes() -> None:
    datum = {
        "body": (
            "io.sagaline.StartWorkflow",
            {
                "workflow_id": "order-9",
                "workflow_type": "order.process",
                "input": {"encoding": "json/plain", "data": b'{"total":1}'},
                "requested_at_ms": 7,
                "request_id": "from-java",
                "if_running": "FAIL",
                "if_closed": "ALLOW",
            },
        )
    }
    data = CODEC.encode_with(CURRENT[INBOX], datum)
    assert CODEC.decode_inbox(data) == StartWorkflow(
        "order-9",
        "order.process",
        Payload(b'{"total":1}'),
        7,
        "from-java",
        IfRunning.FAIL,
        IfClosed.ALLOW,
    )


# --- replies --------------------------------------------------------------------------


REPLIES = [
    Reply(
        "req-q-1", ReplyKind.QUERY, "order-1", "r1", True, "RUNNING", 9, payload=encode_json([1])
    ),
    Reply(
        "upd-1",
        ReplyKind.UPDATE,
        "order-ü",
        "r1",
        False,
        "RUNNING",
        10,
        failure=Failure("UpdateRejected", "ValueError: nö", retryable=True, retry_after_ms=5),
    ),
    Reply("req-1", ReplyKind.START, "order-1", "r2", True, "RUNNING", 11, created=True),
    Reply(
        "req-2",
        ReplyKind.START,
        "order-1",
        "",
        False,
        "",
        12,
        failure=Failure("WorkflowIdReuseRejected", "ended COMPLETED", effects_committed=True),
    ),
    Reply("q", ReplyKind.QUERY, "w", "r", True, "STUCK", 13, payload=Payload(b"\x00\x01", "raw")),
]


@pytest.mark.parametrize(
    "reply", REPLIES, ids=["query", "update-failed", "start", "refused", "raw"]
)
def test_a_reply_round_trips(reply: Reply) -> None:
    data = CODEC.encode_reply(reply)
    assert _written_with(data) == CODEC.schema_id_of(REPLY) == schema_id(CURRENT[REPLY])
    assert CODEC.decode_reply(data) == reply
    # What fastavro writes for the same datum is what the codec wrote.
    datum = _read(data, CURRENT[REPLY], None)
    assert CODEC.encode_with(CURRENT[REPLY], datum) == data


def test_a_reply_written_by_another_avro_client_decodes() -> None:
    """What a non-Python client writes with the .avsc file and any Avro library."""
    datum = {
        "request_id": "req-42",
        "kind": "UPDATE",
        "workflow_id": "order-1",
        "run_id": "run-7",
        "ok": True,
        "created": False,
        "status": "RUNNING",
        "payload": {"encoding": "json/plain", "data": b'{"n":3}'},
        "failure": None,
        "at_ms": 1_700_000_000_123,
    }
    buf = io.BytesIO()
    buf.write(bytes([MAGIC]) + schema_id(CURRENT[REPLY]).to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, CURRENT[REPLY], datum)
    assert CODEC.decode_reply(buf.getvalue()) == Reply(
        "req-42",
        ReplyKind.UPDATE,
        "order-1",
        "run-7",
        True,
        "RUNNING",
        1_700_000_000_123,
        created=False,
        payload=Payload(b'{"n":3}'),
    )
    failed = {
        **datum,
        "kind": "START",
        "ok": False,
        "payload": None,
        "failure": {
            "error_type": "WorkflowAlreadyRunning",
            "message": "open",
            "retryable": False,
            "effects_committed": False,
            "retry_after_ms": None,
        },
    }
    decoded = CODEC.decode_reply(CODEC.encode_with(CURRENT[REPLY], failed))
    assert decoded.kind is ReplyKind.START and not decoded.ok and decoded.payload is None
    assert decoded.failure == Failure("WorkflowAlreadyRunning", "open")


def test_a_reply_is_not_taken_for_another_record_type() -> None:
    data = CODEC.encode_reply(REPLIES[0])
    with pytest.raises(WrongRecordTypeError, match="Reply"):
        CODEC.decode_inbox(data)
    with pytest.raises(WrongRecordTypeError, match="InboxRecord"):
        CODEC.decode_reply(CODEC.encode_inbox(QUERY))


# --- workflow records -----------------------------------------------------------------


def _record(**changes: Any) -> WorkflowRecord:
    base = WorkflowRecord(
        "order-1",
        "order.process",
        WorkflowStatus.RUNNING,
        encode_json({"total": 5}),
        1_000,
        2_000,
        revision=4,
        events=(ActivityScheduled(0, 1, "payment.charge", encode_json(1), 1_000),),
        run_id="run-ü-1",
        wake_at_ms=9_000,
        request_id="req-ü-1",
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    "record",
    [
        _record(),
        _record(request_id=None),
        _record(request_id="r" * 200, run_id=""),
        _record(
            status=WorkflowStatus.TERMINATED,
            closed_at_ms=3_000,
            wake_at_ms=None,
            failure=Failure("Terminated", "by a start"),
        ),
    ],
    ids=["running", "no-request-id", "long-request-id", "terminated"],
)
def test_peek_reads_the_run_and_request_ids_of_a_current_record(record: WorkflowRecord) -> None:
    data = CODEC.encode_workflow(record)
    assert _written_with(data) == CODEC.schema_id_of(WORKFLOW)
    assert CODEC.decode_workflow(data) == record
    head = CODEC.peek_workflow(data)
    assert head == (
        record.status,
        record.closed_at_ms,
        record.wake_at_ms,
        record.run_id,
        record.request_id,
        record.earlier_requests,
    )


def test_peek_reads_an_archived_v4_record_with_no_request_id() -> None:
    record = _record(
        status=WorkflowStatus.COMPENSATED, closed_at_ms=3_000, wake_at_ms=None, request_id=None
    )
    datum = _workflow_to_avro(record)
    datum.pop("request_id")
    data = CODEC.encode_with(V4[WORKFLOW], datum)
    assert _written_with(data) == schema_id(V4[WORKFLOW]) != CODEC.schema_id_of(WORKFLOW)
    head = CODEC.peek_workflow(data)
    assert head.status is WorkflowStatus.COMPENSATED
    assert (head.closed_at_ms, head.wake_at_ms) == (3_000, None)
    assert head.run_id == "run-ü-1" and head.request_id is None
    assert CODEC.decode_workflow(data) == record


def test_peek_of_a_head_cut_inside_the_request_id_is_malformed() -> None:
    data = CODEC.encode_workflow(_record(request_id="REQ-MARKER"))
    at = data.index(b"REQ-MARKER")
    with pytest.raises(MalformedRecordError):
        CODEC.peek_workflow(data[: at + 3])
    garbled = data[:at] + b"\xff" + data[at + 1 :]
    with pytest.raises(MalformedRecordError):
        CODEC.peek_workflow(garbled)


def _long_history() -> WorkflowRecord:
    events = (
        ActivityScheduled(0, 1, "cart.load", encode_json(1), 1_000),
        UpdateAccepted("upd-1", "add_item", encode_json({"sku": "é-1"}), 1_050),
        ActivityCompleted(0, 1, encode_json(["a"]), 1_100),
        SignalReceived("approve", encode_json(None), "sig-1", 1_150),
        UpdateAccepted("upd-2", "ïtem", encode_json(None), 1_200),
        TimerStarted(1, 9_000, 1_200),
        UpdateAccepted("upd-3", "add_item", Payload(b"x" * 3_000), 1_250),
        TimerFired(1, 9_000),
        ActivityScheduled(2, 1, "cart.checkout", encode_json(2), 9_000),
        UpdateAccepted("u" * 200, "n" * 200, encode_json("\u2603" * 100), 9_100),
    )
    assert len(events) >= MIN_EVENTS
    return _record(events=events, wake_at_ms=None, revision=12)


def test_update_accepted_events_round_trip_and_splice_as_fastavro_writes() -> None:
    record = _long_history()
    codec = AvroCodec()  # splices records of MIN_EVENTS or more events
    data = codec.encode_workflow(record)
    assert data == codec.encode_workflow_whole(record)
    decoded = codec.decode_workflow(data)
    assert decoded == record
    assert [e for e in decoded.events if isinstance(e, UpdateAccepted)] == [
        e for e in record.events if isinstance(e, UpdateAccepted)
    ]
    # Again with the events cached, and after the record moved on with one more update.
    assert codec.encode_workflow(record) == data
    later = dataclasses.replace(
        record,
        events=(*record.events, UpdateAccepted("upd-5", "add_item", encode_json(5), 9_200)),
        revision=13,
    )
    assert codec.encode_workflow(later) == codec.encode_workflow_whole(later)
    assert codec.decode_workflow(codec.encode_workflow(later)) == later
    assert_encodable(later)  # the size bound covers it; spliced from the first event too


def test_a_terminated_record_reads_as_unknown_with_the_v4_schema() -> None:
    """v4 code that meets a run v5 terminated sees the enum's default, UNKNOWN, and so
    leaves the record alone (a status written by newer code)."""
    record = _record(status=WorkflowStatus.TERMINATED, closed_at_ms=3_000, wake_at_ms=None)
    data = CODEC.encode_workflow(record)
    v4_symbols = next(f for f in V4[WORKFLOW]["fields"] if f["name"] == "status")["type"]
    assert "TERMINATED" not in v4_symbols["symbols"]
    assert "UNKNOWN" in v4_symbols["symbols"]
    datum = _read(data, CODEC.writer_schema(WORKFLOW), V4[WORKFLOW])
    assert datum["status"] == "UNKNOWN"
    assert "request_id" not in datum
    assert (datum["run_id"], datum["closed_at_ms"]) == ("run-ü-1", 3_000)
    # Every status v4 knows is read as itself.
    completed = CODEC.encode_workflow(dataclasses.replace(record, status=WorkflowStatus.COMPLETED))
    datum = _read(completed, CODEC.writer_schema(WORKFLOW), V4[WORKFLOW])
    assert datum["status"] == "COMPLETED"
