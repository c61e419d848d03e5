"""The Avro codec: round trips, the Confluent wire header, and hostile bytes."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import (
    ConfigurationError,
    MalformedRecordError,
    OversizedRecordError,
    RecordDecodeError,
    UnknownSchemaError,
    WrongRecordTypeError,
)
from orchestrator.protocol.codec import INBOX, TASK, WORKFLOW, AvroCodec, default_schema_dir
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityResult,
    ActivityScheduled,
    ActivityStatus,
    ActivityTask,
    Failure,
    Payload,
    StartWorkflow,
    WorkflowRecord,
    WorkflowStatus,
)

CODEC = AvroCodec()

# --- strategies over the value space each schema allows ------------------------------

ints = st.integers(-(2**31), 2**31 - 1)
longs = st.integers(-(2**63), 2**63 - 1)
texts = st.text(max_size=30)
payloads = st.builds(Payload, data=st.binary(max_size=64), encoding=texts)
failures = st.builds(Failure, error_type=texts, message=texts, retryable=st.booleans())
starts = st.builds(
    StartWorkflow, workflow_id=texts, workflow_type=texts, input=payloads, requested_at_ms=longs
)
results = st.builds(
    ActivityResult,
    workflow_id=texts,
    activity_id=texts,
    seq=ints,
    attempt=ints,
    status=st.sampled_from(ActivityStatus),
    finished_at_ms=longs,
    result=st.none() | payloads,
    failure=st.none() | failures,
)
tasks = st.builds(
    ActivityTask,
    workflow_id=texts,
    workflow_type=texts,
    activity_id=texts,
    seq=ints,
    attempt=ints,
    participant=texts,
    activity=texts,
    payload=payloads,
    scheduled_at_ms=longs,
    compensation=st.booleans(),
    deadline_ms=st.none() | longs,
)
events = st.one_of(
    st.builds(
        ActivityScheduled,
        seq=ints,
        attempt=ints,
        name=texts,
        payload=payloads,
        at_ms=longs,
        compensation=st.booleans(),
        max_attempts=ints,
        non_retryable=st.lists(texts, max_size=3).map(tuple),
    ),
    st.builds(ActivityCompleted, seq=ints, attempt=ints, result=payloads, at_ms=longs),
    st.builds(ActivityFailed, seq=ints, attempt=ints, failure=failures, at_ms=longs),
)
workflows = st.builds(
    WorkflowRecord,
    workflow_id=texts,
    workflow_type=texts,
    status=st.sampled_from(WorkflowStatus),
    input=payloads,
    started_at_ms=longs,
    updated_at_ms=longs,
    revision=longs,
    events=st.lists(events, max_size=8).map(tuple),
    result=st.none() | payloads,
    failure=st.none() | failures,
    closed_at_ms=st.none() | longs,
)

# --- one readable example of each record ---------------------------------------------

START = StartWorkflow("order-1", "order.process", encode_json({"total": 42}), 1_700_000_000_000)
DONE = ActivityResult(
    "order-1",
    "order-1/0/1",
    0,
    1,
    ActivityStatus.COMPLETED,
    1_700_000_000_500,
    result=encode_json({"reservation_id": "r-1"}),
)
FAILED = ActivityResult(
    "order-1",
    "order-1/1/3",
    1,
    3,
    ActivityStatus.FAILED,
    1_700_000_000_900,
    failure=Failure("PaymentDeclined", "no", True),
)
TASK_VALUE = ActivityTask(
    "order-1",
    "order.process",
    "order-1/2/1",
    2,
    1,
    "inventory",
    "release",
    encode_json({"reservation_id": "r-1"}),
    1_700_000_001_000,
    compensation=True,
    deadline_ms=1_700_000_031_000,
)
RECORD = WorkflowRecord(
    workflow_id="order-1",
    workflow_type="order.process",
    status=WorkflowStatus.COMPENSATED,
    input=encode_json({"total": 42}),
    started_at_ms=1_700_000_000_000,
    updated_at_ms=1_700_000_002_000,
    revision=5,
    events=(
        ActivityScheduled(
            0, 1, "inventory.reserve", encode_json([1]), 1_700_000_000_000, max_attempts=3
        ),
        ActivityCompleted(0, 1, encode_json({"reservation_id": "r-1"}), 1_700_000_000_500),
        ActivityScheduled(
            1,
            1,
            "payment.charge",
            encode_json(42),
            1_700_000_000_500,
            max_attempts=5,
            non_retryable=("PaymentDeclined", "Fraud"),
        ),
        ActivityFailed(1, 1, Failure("PaymentDeclined", "no", False), 1_700_000_000_900),
        ActivityScheduled(
            2,
            1,
            "inventory.release",
            encode_json("r-1"),
            1_700_000_000_900,
            compensation=True,
            max_attempts=10,
        ),
        ActivityCompleted(2, 1, Payload(b"\x00\xff", encoding="avro/binary"), 1_700_000_002_000),
    ),
    failure=Failure("ActivityError", "activity payment.charge failed"),
    closed_at_ms=1_700_000_002_000,
)


@pytest.mark.parametrize("body", [START, DONE, FAILED], ids=["start", "completed", "failed"])
def test_inbox_records_round_trip(body: StartWorkflow | ActivityResult) -> None:
    assert CODEC.decode_inbox(CODEC.encode_inbox(body)) == body


def test_tasks_round_trip() -> None:
    assert CODEC.decode_task(CODEC.encode_task(TASK_VALUE)) == TASK_VALUE
    bare = ActivityTask("w", "t", "w/0/1", 0, 1, "p", "a", encode_json(None), 0)
    assert CODEC.decode_task(CODEC.encode_task(bare)) == bare


def test_workflow_records_with_every_event_kind_round_trip() -> None:
    assert {type(e) for e in RECORD.events} == {
        ActivityScheduled,
        ActivityCompleted,
        ActivityFailed,
    }
    assert CODEC.decode_workflow(CODEC.encode_workflow(RECORD)) == RECORD
    running = WorkflowRecord("w", "t", WorkflowStatus.RUNNING, encode_json(None), 1, 1)
    assert CODEC.decode_workflow(CODEC.encode_workflow(running)) == running


@given(st.one_of(starts, results))
def test_any_inbox_body_round_trips(body: StartWorkflow | ActivityResult) -> None:
    assert CODEC.decode_inbox(CODEC.encode_inbox(body)) == body


@given(tasks)
def test_any_task_round_trips(task: ActivityTask) -> None:
    assert CODEC.decode_task(CODEC.encode_task(task)) == task


@given(workflows)
def test_any_workflow_record_round_trips(record: WorkflowRecord) -> None:
    assert CODEC.decode_workflow(CODEC.encode_workflow(record)) == record


# --- the wire header -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        (INBOX, CODEC.encode_inbox(START)),
        (TASK, CODEC.encode_task(TASK_VALUE)),
        (WORKFLOW, CODEC.encode_workflow(RECORD)),
    ],
    ids=["inbox", "task", "workflow"],
)
def test_every_record_starts_with_the_confluent_header(name: str, data: bytes) -> None:
    magic, sid = struct.unpack(">bI", data[:5])
    assert magic == 0
    # Tasks and inputs that use nothing the current protocol added go out under the
    # previous version's id (its processes read them); history records always under the
    # current one.
    expected = CODEC.schema_id_of(name) if name == WORKFLOW else CODEC.previous_schema_id_of(name)
    assert sid == expected
    assert 0 < sid < 2**31, "ids stay positive for tools that read them as a signed int"


def test_schema_ids_are_stable_across_codec_instances() -> None:
    other = AvroCodec(default_schema_dir())
    ids = {name: CODEC.schema_id_of(name) for name in (INBOX, TASK, WORKFLOW)}
    assert ids == {name: other.schema_id_of(name) for name in ids}
    assert len(set(ids.values())) == 3
    assert other.encode_task(TASK_VALUE) == CODEC.encode_task(TASK_VALUE)


# The current schemas' ids. A change here means records already on the topics were written
# under an id this code no longer produces: copy the previous .avsc files into a new
# schemas/avro/archive/vN/ directory (so they stay readable), then update these numbers.
# The shared records are listed too: a change to Payload or Failure alters the bytes of
# every record that embeds them.
CURRENT_IDS = {
    "io.sagaline.Payload": 1398388956,
    "io.sagaline.Failure": 1373981322,
    "io.sagaline.StartWorkflow": 390327226,
    "io.sagaline.ActivityResult": 152494264,
    "io.sagaline.ResumeWorkflow": 1756269513,
    "io.sagaline.QueryWorkflow": 1731478754,
    "io.sagaline.UpdateWorkflow": 24085150,
    "io.sagaline.Reply": 1661753455,
    "io.sagaline.TerminateWorkflow": 1034556011,
    INBOX: 435445526,
    TASK: 2066444304,
    WORKFLOW: 1721366363,
}


def test_schema_changes_are_deliberate() -> None:
    observed = {name: CODEC.schema_id_of(name) for name in CURRENT_IDS}
    assert observed == CURRENT_IDS, (
        "a schema in schemas/avro changed; archive the old version before updating "
        f"CURRENT_IDS: expected {CURRENT_IDS}, observed {observed}"
    )


def test_encode_raw_matches_the_typed_encoder() -> None:
    datum = {
        "body": (
            "io.sagaline.StartWorkflow",
            {
                "workflow_id": "order-1",
                "workflow_type": "order.process",
                "input": {"encoding": "json/plain", "data": b'{"total":42}'},
                "requested_at_ms": 1_700_000_000_000,
            },
        )
    }
    current = CODEC.encode_raw(INBOX, datum)
    assert CODEC.encode_with(CODEC.writer_schema(INBOX), datum) == current
    # The typed encoder writes a plain start with the previous version, which for the
    # inbox is the current one (v6 left the inbox as v5 had it).
    typed = CODEC.encode_inbox(START)
    assert CODEC.previous_schema_id_of(INBOX) == CODEC.schema_id_of(INBOX)
    assert typed == current
    assert CODEC.decode_inbox(typed) == CODEC.decode_inbox(current) == START


# --- what a decoder refuses ----------------------------------------------------------

VALID = CODEC.encode_task(TASK_VALUE)


@pytest.mark.parametrize(
    "data",
    [
        None,
        b"",
        b"\x00",
        b"\x00\x00\x00\x00",
        b"\x01" + VALID[1:],
        b"\xff" + VALID[1:],
        VALID[:5],
        VALID[:-1],
        VALID + b"\x00",
        VALID[:5] + b"\xff" * 40,
    ],
    ids=[
        "none",
        "empty",
        "magic-only",
        "short-header",
        "magic-1",
        "magic-ff",
        "header-only",
        "truncated",
        "trailing-byte",
        "garbage-body",
    ],
)
def test_malformed_bytes_are_refused(data: bytes | None) -> None:
    with pytest.raises(MalformedRecordError) as info:
        CODEC.decode_task(data)
    assert info.value.reason == "malformed"


def test_every_truncation_of_a_record_is_refused() -> None:
    data = CODEC.encode_workflow(RECORD)
    for size in range(len(data)):
        with pytest.raises(MalformedRecordError):
            CODEC.decode_workflow(data[:size])


def test_an_unknown_schema_id_is_refused() -> None:
    known = {CODEC.schema_id_of(n) for n in (INBOX, TASK, WORKFLOW)}
    sid = next(i for i in range(1, 100) if i not in known)
    with pytest.raises(UnknownSchemaError, match=f"schema id {sid}") as info:
        CODEC.decode_inbox(struct.pack(">bI", 0, sid) + VALID[5:])
    assert info.value.reason == "unknown-schema"


@pytest.mark.parametrize(
    ("data", "decode"),
    [
        (CODEC.encode_task(TASK_VALUE), CODEC.decode_workflow),
        (CODEC.encode_inbox(START), CODEC.decode_task),
        (CODEC.encode_workflow(RECORD), CODEC.decode_inbox),
    ],
    ids=["task-as-workflow", "inbox-as-task", "workflow-as-inbox"],
)
def test_a_record_of_another_type_is_refused(data: bytes, decode: Any) -> None:
    with pytest.raises(WrongRecordTypeError, match=r"expected io\.sagaline") as info:
        decode(data)
    assert info.value.reason == "wrong-record-type"


def test_a_record_above_the_size_limit_is_refused() -> None:
    data = CODEC.encode_task(TASK_VALUE)
    exact = AvroCodec(max_record_bytes=len(data))
    assert exact.decode_task(data) == TASK_VALUE
    small = AvroCodec(max_record_bytes=len(data) - 1)
    with pytest.raises(OversizedRecordError, match=str(len(data))) as info:
        small.decode_task(data)
    assert info.value.reason == "oversized"


def test_decode_errors_share_one_base_with_distinct_reasons() -> None:
    kinds = (MalformedRecordError, UnknownSchemaError, WrongRecordTypeError, OversizedRecordError)
    assert all(issubclass(kind, RecordDecodeError) for kind in kinds)
    assert len({kind.reason for kind in kinds} | {RecordDecodeError.reason}) == 5


KNOWN_IDS = sorted({CODEC.schema_id_of(n) for n in (INBOX, TASK, WORKFLOW)})
DECODERS = [CODEC.decode_inbox, CODEC.decode_task, CODEC.decode_workflow]


def _decodes_or_refuses(decode: Any, data: bytes) -> None:
    with contextlib.suppress(RecordDecodeError):
        decode(data)


@given(st.binary(max_size=200), st.sampled_from(DECODERS))
def test_random_bytes_never_escape_as_another_exception(data: bytes, decode: Any) -> None:
    _decodes_or_refuses(decode, data)


@given(st.sampled_from(KNOWN_IDS), st.binary(max_size=200), st.sampled_from(DECODERS))
def test_a_valid_header_over_random_bytes_never_escapes(sid: int, body: bytes, decode: Any) -> None:
    _decodes_or_refuses(decode, struct.pack(">bI", 0, sid) + body)


ENCODED = [
    CODEC.encode_inbox(START),
    CODEC.encode_inbox(FAILED),
    CODEC.encode_task(TASK_VALUE),
    CODEC.encode_workflow(RECORD),
]


@given(
    st.sampled_from(ENCODED),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.sampled_from(DECODERS),
)
def test_corrupted_records_never_escape(
    data: bytes, flips: list[tuple[int, int]], decode: Any
) -> None:
    corrupted = bytearray(data)
    for position, value in flips:
        corrupted[5 + position % (len(data) - 5)] = value
    _decodes_or_refuses(decode, bytes(corrupted))


# --- loading the schema files --------------------------------------------------------


def test_a_schema_directory_missing_files_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "io.sagaline.Payload.avsc").write_text(
        (default_schema_dir() / "io.sagaline.Payload.avsc").read_text()
    )
    with pytest.raises(ConfigurationError, match="WorkflowRecord"):
        AvroCodec(tmp_path)


def test_an_unparsable_schema_file_is_a_configuration_error(tmp_path: Path) -> None:
    for source in default_schema_dir().glob("*.avsc"):
        (tmp_path / source.name).write_text(source.read_text())
    (tmp_path / "io.sagaline.Failure.avsc").write_text('{"type": "record", "name": ')
    with pytest.raises(ConfigurationError, match=r"io\.sagaline\.Failure\.avsc"):
        AvroCodec(tmp_path)


def test_the_schema_directory_can_be_set_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGALINE_SCHEMA_DIR", str(tmp_path))
    assert default_schema_dir() == tmp_path
    with pytest.raises(ConfigurationError, match="SAGALINE_SCHEMA_DIR"):
        AvroCodec()
