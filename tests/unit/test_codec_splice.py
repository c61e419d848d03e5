"""The spliced encoding of workflow records (known events' bytes reused) is byte for byte
what fastavro writes for the whole record. (``conftest.assert_encodable`` also compares the
two on every record the engine tests build.)"""

from __future__ import annotations

import dataclasses
import json

import pytest

from orchestrator.protocol import splice
from orchestrator.protocol.codec import WORKFLOW, AvroCodec, default_schema_dir
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    Failure,
    TimerStarted,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.protocol.splice import SplicingWriter

from .test_codec_v3 import _record


def _steps(count: int) -> tuple[ActivityScheduled | ActivityCompleted, ...]:
    events: list[ActivityScheduled | ActivityCompleted] = []
    for seq in range(count):
        events.append(ActivityScheduled(seq, 1, "svc.do", encode_json({"n": seq, "é": "ü"}), seq))
        events.append(ActivityCompleted(seq, 1, encode_json(seq), seq + 1))
    return tuple(events)


def test_a_record_with_every_event_type_encodes_as_fastavro_does() -> None:
    codec = AvroCodec(splice_from=0)
    record = _record()
    assert codec.encode_workflow(record) == codec.encode_workflow_whole(record)
    # Again, now from the cache, and after the record moved on with the same events.
    assert codec.encode_workflow(record) == codec.encode_workflow_whole(record)
    closed = dataclasses.replace(
        record,
        status=WorkflowStatus.FAILED,
        closed_at_ms=99,
        failure=Failure("Boom", "ünïcode \u2603", retryable=False),
        result=encode_json(None),
        wake_at_ms=None,
        revision=8,
    )
    assert codec.encode_workflow(closed) == codec.encode_workflow_whole(closed)


@pytest.mark.parametrize("steps", [0, 1, 31, 32, 33, 200])
def test_event_counts_across_the_varint_boundaries(steps: int) -> None:
    codec = AvroCodec(splice_from=0)
    record = dataclasses.replace(_record(), events=_steps(steps))
    data = codec.encode_workflow(record)
    assert data == codec.encode_workflow_whole(record)
    assert codec.decode_workflow(data) == record


def test_equal_events_that_are_different_objects_and_a_full_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(splice, "MAX_CACHED_TUPLES", 2)
    codec = AvroCodec(splice_from=0)
    first = dataclasses.replace(_record(), events=_steps(4))
    assert codec.encode_workflow(first) == codec.encode_workflow_whole(first)
    # New event objects with other values under the same sequence numbers.
    other = dataclasses.replace(
        first,
        events=(
            TimerStarted(0, 5, 1),
            ActivityFailed(1, 1, Failure("X", "y"), 2, retry_at_ms=9),
        ),
    )
    assert codec.encode_workflow(other) == codec.encode_workflow_whole(other)
    assert codec.decode_workflow(codec.encode_workflow(other)) == other


def test_a_schema_whose_events_are_not_a_top_level_array_is_not_spliced() -> None:
    raw = json.loads((default_schema_dir() / f"{WORKFLOW}.avsc").read_text())
    raw["fields"] = [f for f in raw["fields"] if f["name"] != "events"]
    assert SplicingWriter.build(raw, {}, lambda e: ("x", {})) is None


def test_short_records_are_encoded_whole_by_default() -> None:
    codec = AvroCodec()
    short = dataclasses.replace(_record(), events=_steps(10)[: splice.MIN_EVENTS - 1])
    codec.encode_workflow(short)
    assert codec._splice is not None and not codec._splice._cache
    long = dataclasses.replace(_record(), events=_steps(10))
    assert codec.encode_workflow(long) == codec.encode_workflow_whole(long)
    assert codec._splice._cache


def test_a_codec_without_splicing_still_encodes_whole_records() -> None:
    codec = AvroCodec(splice_from=0)
    record: WorkflowRecord = _record()
    expected = codec.encode_workflow(record)
    codec._splice = None
    assert codec.encode_workflow(record) == expected


def test_a_growing_workflow_keeps_one_cache_entry() -> None:
    codec = AvroCodec(splice_from=0)
    assert codec._splice is not None
    record = dataclasses.replace(_record(), events=())
    for step in _steps(300):
        record = dataclasses.replace(record, events=(*record.events, step))
        assert codec.encode_workflow(record) == codec.encode_workflow_whole(record)
    entries, size = codec._splice.cached
    assert entries == 1
    # Only the last tuple's items: a few hundred bytes per event, not the sum of every length.
    assert size < len(codec.encode_workflow_whole(record))


def test_the_cache_is_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splice, "MAX_CACHED_BYTES", 2_000)
    codec = AvroCodec(splice_from=0)
    assert codec._splice is not None
    for index in range(50):
        record = dataclasses.replace(_record(), workflow_id=f"wf-{index}", events=_steps(5))
        assert codec.encode_workflow(record) == codec.encode_workflow_whole(record)
        assert codec._splice.cached[1] <= 2_000
