"""Protocol v4 (signals, promises, cancellation): the new records round-trip, v3 records
read into v4, and what uses nothing v4 added is still written so that v3 processes read it
(a rolling deploy)."""

from __future__ import annotations

import io
from typing import Any

import fastavro
import pytest

from orchestrator.protocol.codec import (
    HEADER,
    INBOX,
    MAGIC,
    TASK,
    WORKFLOW,
    AvroCodec,
    default_schema_dir,
    schema_id,
)
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityStatus,
    CancelRequested,
    CancelWorkflow,
    CompletePromise,
    Failure,
    InboxBody,
    PromiseCompleted,
    PromiseCreated,
    ResumeWorkflow,
    SignalReceived,
    SignalWorkflow,
    StartWorkflow,
    WorkflowRecord,
    WorkflowStatus,
)

from .test_codec_v3 import (
    HEARTBEAT,
    PLAIN_TASK,
    RETRY_AFTER,
    STARTED,
    TASK_V3,
    _record,
    parse_archived,
)

CODEC = AvroCodec()
V3_DIR = default_schema_dir() / "archive" / "v3"


V3 = parse_archived(V3_DIR)
SIGNAL = SignalWorkflow("order-1", "approve", encode_json({"by": "ann"}), "sig-1", 1_800)
SIGNAL_WITH_START = SignalWorkflow(
    "order-2",
    "approve",
    encode_json(None),
    "sig-2",
    1_900,
    StartWorkflow("order-2", "order.approval", encode_json({"total": 5}), 1_900),
)


COMPLETED = CompletePromise("order-1", "order-1/run/p3", 2_000, encode_json({"ok": True}))
FAILED = CompletePromise("order-1", "order-1/run/p3", 2_000, None, Failure("No", "declined"))
CANCEL = CancelWorkflow("order-1", "customer changed plans ü", 2_100)


@pytest.mark.parametrize(
    "body",
    [SIGNAL, SIGNAL_WITH_START, COMPLETED, FAILED, CANCEL],
    ids=["signal", "with-start", "completed", "failed", "cancel"],
)
def test_new_inputs_round_trip_under_the_current_schema(body: InboxBody) -> None:
    data = CODEC.encode_inbox(body)
    assert CODEC.decode_inbox(data) == body
    assert int.from_bytes(data[1:5], "big") == CODEC.schema_id_of(INBOX)


def test_a_record_with_signals_round_trips() -> None:
    base = _record()
    received = (
        SignalReceived("approve", encode_json([1, "ü"]), "sig-1", 99),
        PromiseCreated(9, "callback", 100),
        PromiseCompleted(9, 101, encode_json("paid")),
        PromiseCreated(10, "other", 102),
        PromiseCompleted(10, 103, None, Failure("No", "declined")),
        CancelRequested("customer", 104),
    )
    record = WorkflowRecord(
        base.workflow_id,
        base.workflow_type,
        WorkflowStatus.RUNNING,
        base.input,
        base.started_at_ms,
        base.updated_at_ms,
        revision=base.revision,
        events=(*base.events, *received),
        run_id=base.run_id,
    )
    data = CODEC.encode_workflow(record)
    assert data == CODEC.encode_workflow_whole(record)
    assert CODEC.decode_workflow(data) == record


@pytest.mark.parametrize(
    ("name", "encode"),
    [
        (TASK, lambda: CODEC.encode_task(PLAIN_TASK)),
        (TASK, lambda: CODEC.encode_task(TASK_V3)),
        (INBOX, lambda: CODEC.encode_inbox(StartWorkflow("w", "t", encode_json(1), 3))),
        (INBOX, lambda: CODEC.encode_inbox(ResumeWorkflow(None, 3))),
        (INBOX, lambda: CODEC.encode_inbox(STARTED)),
        (INBOX, lambda: CODEC.encode_inbox(HEARTBEAT)),
        (
            INBOX,
            lambda: CODEC.encode_inbox(
                ActivityResult("w", "w/r/0/1", 0, 1, ActivityStatus.FAILED, 9, failure=RETRY_AFTER)
            ),
        ),
    ],
    ids=["plain-task", "task-with-timeouts", "start", "resume", "started", "heartbeat", "retry"],
)
def test_what_uses_nothing_new_is_written_so_v3_processes_read_it(name: str, encode: Any) -> None:
    """A rolling deploy: v3 participants read the tasks of v4 orchestrators, v3
    orchestrators read everything but signals from v4 clients and participants."""
    data = encode()
    assert int.from_bytes(data[1:5], "big") == schema_id(V3[name])
    v3_datum = fastavro.schemaless_reader(io.BytesIO(data[5:]), V3[name], V3[name])
    assert isinstance(v3_datum, dict)
    # ... and v4 reads it back as it was: encoding the decoded value gives the same bytes.
    if name == TASK:
        assert CODEC.encode_task(CODEC.decode_task(data)) == data
    else:
        assert CODEC.encode_inbox(CODEC.decode_inbox(data)) == data


def test_a_v3_workflow_record_reads_into_v4() -> None:
    """v4 only appended a branch to the events union, so a record without signals has the
    same body in both versions; under the v3 id it reads the same."""
    record = _record()
    body = CODEC.encode_workflow_whole(record)[5:]
    old = HEADER.pack(MAGIC, schema_id(V3[WORKFLOW])) + body
    assert fastavro.schemaless_reader(io.BytesIO(body), V3[WORKFLOW], V3[WORKFLOW])
    assert CODEC.decode_workflow(old) == record


def test_the_previous_version_is_v3() -> None:
    """The predicates that choose the previous version know what v4 added to v3: archiving
    v4 must come with predicates for what v5 adds (codec._task_needs_current and
    _inbox_needs_current)."""
    assert CODEC.previous_schema_id_of(TASK) == schema_id(V3[TASK])
    assert CODEC.previous_schema_id_of(INBOX) == schema_id(V3[INBOX])
    assert CODEC.previous_schema_id_of(WORKFLOW) == schema_id(V3[WORKFLOW])


def test_a_v3_orchestrator_cannot_read_a_signal_and_says_so() -> None:
    """Signals need v4 orchestrators: upgrade them before sending signals (a v3 process
    fails to decode the record, which its runtime dead-letters)."""
    data = CODEC.encode_inbox(SIGNAL)
    v3_ids = {schema_id(V3[INBOX])}
    assert int.from_bytes(data[1:5], "big") not in v3_ids
