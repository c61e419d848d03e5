"""The pure half of the projector: history records to rows, batches collapsed."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    Failure,
    HistoryEvent,
    Payload,
    PromiseCreated,
    TimerFired,
    TimerStarted,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.protocol.topics import held_key
from orchestrator.visibility.projection import (
    MAX_PAYLOAD_CHARS,
    event_row,
    payload_text,
    project,
    waiting_on,
)
from orchestrator.visibility.projector import collapse


def _json(value: Any) -> Payload:
    return Payload(json.dumps(value).encode())


def _record(
    events: tuple[HistoryEvent, ...],
    status: WorkflowStatus = WorkflowStatus.RUNNING,
    *,
    revision: int = 1,
    **kw: Any,
) -> WorkflowRecord:
    return WorkflowRecord(
        workflow_id="w-1",
        workflow_type="order.process",
        status=status,
        input=_json({"order_id": "w-1"}),
        started_at_ms=1_000,
        updated_at_ms=2_000 + revision,
        revision=revision,
        events=events,
        run_id="r1",
        **kw,
    )


def _scheduled(seq: int, attempt: int = 1, name: str = "payment.charge", **kw: Any) -> Any:
    return ActivityScheduled(seq=seq, attempt=attempt, name=name, payload=_json({}), at_ms=10, **kw)


def test_an_open_run_waits_on_its_latest_pending_step_and_attempt() -> None:
    failed = Failure("Timeout", "late", retryable=True)
    events = (
        _scheduled(0, name="inventory.reserve"),
        ActivityCompleted(seq=0, attempt=1, result=_json({}), at_ms=11),
        _scheduled(1),
        ActivityFailed(seq=1, attempt=1, failure=failed, at_ms=12, retry_at_ms=50),
        _scheduled(1, attempt=2),
    )
    assert waiting_on(_record(events)) == ("activity payment.charge", 2)
    # A retry not yet sent still waits on the step.
    assert waiting_on(_record(events[:4])) == ("activity payment.charge", 1)


def test_timers_promises_compensations_and_closed_runs() -> None:
    timer = (TimerStarted(seq=0, fire_at_ms=99, at_ms=10),)
    assert waiting_on(_record(timer)) == ("timer", 0)
    assert waiting_on(_record((*timer, TimerFired(seq=0, at_ms=99)))) == ("waiting", 0)
    promise = (PromiseCreated(seq=3, name="approval", at_ms=1),)
    assert waiting_on(_record(promise)) == ("promise approval", 0)
    comp = (_scheduled(2, name="inventory.release", compensation=True),)
    assert waiting_on(_record(comp)) == ("compensation inventory.release", 1)
    assert waiting_on(_record(comp, WorkflowStatus.STUCK)) == ("stuck", 1)
    assert waiting_on(_record(comp, WorkflowStatus.COMPENSATED)) == (None, 1)


def test_a_closed_run_becomes_a_row_with_its_error_and_events() -> None:
    failure = Failure("PaymentDeclined", "card declined")
    events = (
        _scheduled(0),
        ActivityFailed(seq=0, attempt=1, failure=failure, at_ms=12),
    )
    record = _record(
        events, WorkflowStatus.COMPENSATED, revision=4, failure=failure, closed_at_ms=3_000
    )
    row, rows = project(record, partition=2, offset=77)
    assert (row.status, row.error_type, row.error_message) == (
        "COMPENSATED",
        "PaymentDeclined",
        "card declined",
    )
    assert (row.partition, row.offset, row.revision, row.current_step) == (2, 77, 4, None)
    assert row.input == '{"order_id": "w-1"}' and row.result is None and not row.archived
    assert [(e.index, e.kind, e.seq, e.attempt) for e in rows] == [
        (0, "ActivityScheduled", 0, 1),
        (1, "ActivityFailed", 0, 1),
    ]
    assert rows[1].detail == {
        "failure": {"error_type": "PaymentDeclined", "message": "card declined", "retryable": False}
    }
    assert rows[0].name == "payment.charge" and "payload" in rows[0].detail
    json.dumps([e.to_json() for e in rows])  # JSON-ready, as the CLI and UI need


def test_payload_text_shows_json_and_cuts_long_or_binary_payloads() -> None:
    assert payload_text(None) is None
    assert payload_text(Payload(b"\x00\x01", "application/octet-stream")) == (
        "<2 bytes application/octet-stream>"
    )
    long = payload_text(Payload(b'"' + b"x" * (MAX_PAYLOAD_CHARS + 10) + b'"'))
    assert long is not None and long.endswith(f"… ({MAX_PAYLOAD_CHARS + 12} bytes)")
    assert event_row(0, TimerFired(seq=1, at_ms=5)).detail == {}


class _Msg:
    def __init__(self, partition: int, offset: int, key: bytes | None, value: bytes | None):
        self._p, self._o, self._k, self._v = partition, offset, key, value

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v


def test_a_batch_keeps_the_last_record_of_each_run_and_skips_what_it_cannot_read() -> None:
    codec = AvroCodec()
    first = codec.encode_workflow(_record((_scheduled(0),), revision=1))
    second = codec.encode_workflow(_record((_scheduled(0),), revision=2))
    batch = collapse(
        codec,
        [
            _Msg(1, 10, b"w-1", first),  # type: ignore[list-item]
            _Msg(1, 11, b"w-1", second),  # type: ignore[list-item]
            _Msg(1, 12, b"w-2", b"garbage"),  # type: ignore[list-item]
            _Msg(1, 13, held_key("w-1", 5), b"held input"),  # type: ignore[list-item]
            _Msg(0, 4, b"w-3", None),  # type: ignore[list-item]
        ],
    )
    assert [row.revision for row, _ in batch.runs.values()] == [2]
    assert batch.tombstones == [("w-3", 4)]
    assert batch.next_offsets == {1: 14, 0: 5}
    assert (batch.workflows, batch.skipped) == (2, 2)
