"""Protocol v4 (signals, promises, cancellation, now archived): its records round-trip, v3
records still read, and v4 records are written so that v4 processes read them (a rolling
deploy to v5)."""

from __future__ import annotations

import io
from typing import Any

import fastavro
import pytest

from orchestrator.protocol.codec import (
    INBOX,
    TASK,
    WORKFLOW,
    AvroCodec,
    _workflow_to_avro,
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
V4_DIR = default_schema_dir() / "archive" / "v4"


V3 = parse_archived(V3_DIR)
V4 = parse_archived(V4_DIR)
# The version before the current one: a rolling deploy to the current version has
# processes of this one still running (v4 ones when v5 was current).
PREVIOUS = parse_archived(default_schema_dir() / "archive" / "v5")
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
    # Nothing newer than the previous version's inbox: its orchestrators read them during
    # a rolling deploy.
    assert int.from_bytes(data[1:5], "big") == schema_id(PREVIOUS[INBOX])


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
        (INBOX, lambda: CODEC.encode_inbox(SIGNAL_WITH_START)),
        (INBOX, lambda: CODEC.encode_inbox(CANCEL)),
    ],
    ids=[
        "plain-task",
        "task-with-timeouts",
        "start",
        "resume",
        "started",
        "heartbeat",
        "retry",
        "signal",
        "cancel",
    ],
)
def test_what_uses_nothing_new_is_written_so_previous_processes_read_it(
    name: str, encode: Any
) -> None:
    """A rolling deploy: participants and orchestrators one version behind read the
    tasks and inputs of current ones (v4 ones read v5's, v5 ones read v6's)."""
    data = encode()
    assert int.from_bytes(data[1:5], "big") == schema_id(PREVIOUS[name])
    datum = fastavro.schemaless_reader(io.BytesIO(data[5:]), PREVIOUS[name], PREVIOUS[name])
    assert isinstance(datum, dict)
    # ... and v5 reads it back as it was: encoding the decoded value gives the same bytes.
    if name == TASK:
        assert CODEC.encode_task(CODEC.decode_task(data)) == data
    else:
        assert CODEC.encode_inbox(CODEC.decode_inbox(data)) == data


def test_v3_and_v4_workflow_records_read_into_the_current_version() -> None:
    record = _record()
    datum = _workflow_to_avro(record)
    for old in (V3, V4):
        data = CODEC.encode_with(old[WORKFLOW], datum)
        assert CODEC.decode_workflow(data) == record


def test_a_v3_orchestrator_cannot_read_a_signal_and_says_so() -> None:
    """Signals need v4 orchestrators: upgrade them before sending signals (a v3 process
    fails to decode the record, which its runtime dead-letters)."""
    data = CODEC.encode_inbox(SIGNAL)
    v3_ids = {schema_id(V3[INBOX])}
    assert int.from_bytes(data[1:5], "big") not in v3_ids
