"""Protocol v3 (durable time): its records round-trip, and v2 records read into today's
shape. (What processes one version behind read is tested for the current protocol in
``test_codec_v4``.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fastavro

from orchestrator.protocol.codec import (
    NS,
    SCHEMA_ORDER,
    TASK,
    WORKFLOW,
    AvroCodec,
    default_schema_dir,
)
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityHeartbeat,
    ActivityScheduled,
    ActivityStarted,
    ActivityTask,
    AttemptHeartbeat,
    AttemptStarted,
    Failure,
    TimerCancelled,
    TimerFired,
    TimerStarted,
    WorkflowRecord,
    WorkflowStatus,
)

CODEC = AvroCodec()
V2_DIR = default_schema_dir() / "archive" / "v2"


def parse_archived(directory: Path) -> dict[str, Any]:
    """The parsed schemas of one archived version (test_codec_v4 reads v3 with it)."""
    named: dict[str, Any] = {}
    parsed: dict[str, Any] = {}
    for short in SCHEMA_ORDER:
        path = directory / f"{NS}{short}.avsc"
        if path.exists():
            parsed[NS + short] = fastavro.parse_schema(
                json.loads(path.read_text()), named_schemas=named
            )
    return parsed


V2 = parse_archived(V2_DIR)
TASK_V3 = ActivityTask(
    "order-1",
    "order.process",
    "order-1/run/2/3",
    2,
    3,
    "shipping",
    "schedule",
    encode_json({"id": 1}),
    1_000,
    deadline_ms=61_000,
    start_to_close_ms=30_000,
    heartbeat_timeout_ms=5_000,
    heartbeat_details=encode_json({"done": 40}),
    report_start=True,
)
PLAIN_TASK = ActivityTask(
    "order-1", "order.process", "order-1/run/0/1", 0, 1, "payment", "charge", encode_json(1), 5
)
RETRY_AFTER = Failure("RateLimited", "429", retryable=True, retry_after_ms=30_000)
STARTED = ActivityStarted("order-1", "order-1/run/2/3", 2, 3, 1_500)
HEARTBEAT = ActivityHeartbeat("order-1", "order-1/run/2/3", 2, 3, 1_700, encode_json([1, 2]))


def _record() -> WorkflowRecord:
    events = (
        ActivityScheduled(
            0,
            1,
            "payment.charge",
            encode_json(1),
            10,
            max_attempts=5,
            non_retryable=("Declined",),
            initial_interval_ms=1_000,
            backoff_coefficient=1.5,
            maximum_interval_ms=60_000,
            schedule_to_close_ms=600_000,
            start_to_close_ms=30_000,
            heartbeat_timeout_ms=5_000,
        ),
        AttemptStarted(0, 1, 12),
        AttemptHeartbeat(0, 1, 14, encode_json({"page": 3})),
        ActivityFailed(0, 1, RETRY_AFTER, 20, retry_at_ms=30_020),
        ActivityScheduled(0, 2, "payment.charge", encode_json(1), 30_020, backoff_ms=30_000),
        ActivityCompleted(0, 2, encode_json("ok"), 30_100),
        TimerStarted(1, 90_100, 30_100),
        TimerFired(1, 90_103),
        TimerStarted(2, 99_000, 90_103),
        TimerCancelled(2, 90_200),
    )
    return WorkflowRecord(
        "order-1",
        "order.process",
        WorkflowStatus.RUNNING,
        encode_json({"id": 1}),
        10,
        90_200,
        revision=7,
        events=events,
        run_id="run",
        wake_at_ms=123_456,
    )


def test_every_new_history_event_round_trips() -> None:
    record = _record()
    assert CODEC.decode_workflow(CODEC.encode_workflow(record)) == record


def test_peek_reads_the_wake_time_without_decoding_the_history() -> None:
    head = CODEC.peek_workflow(CODEC.encode_workflow(_record()))
    assert head.wake_at_ms == 123_456
    assert tuple(head)[:3] == (WorkflowStatus.RUNNING, None, 123_456)


def test_a_task_with_timeouts_round_trips() -> None:
    data = CODEC.encode_task(TASK_V3)
    assert CODEC.decode_task(data) == TASK_V3


def test_a_v2_record_reads_with_v3_defaults() -> None:
    datum = {
        "workflow_id": "order-1",
        "workflow_type": "order.process",
        "status": "RUNNING",
        "closed_at_ms": None,
        "run_id": "r",
        "input": {"encoding": "json/plain", "data": b"{}"},
        "events": [
            (
                NS + "ActivityScheduled",
                {
                    "seq": 0,
                    "attempt": 1,
                    "name": "payment.charge",
                    "payload": {"encoding": "json/plain", "data": b"1"},
                    "compensation": False,
                    "max_attempts": 3,
                    "non_retryable": [],
                    "at_ms": 5,
                },
            ),
            (
                NS + "ActivityFailed",
                {
                    "seq": 0,
                    "attempt": 1,
                    "failure": {
                        "error_type": "E",
                        "message": "m",
                        "retryable": True,
                        "effects_committed": False,
                    },
                    "at_ms": 6,
                },
            ),
        ],
        "result": None,
        "failure": None,
        "started_at_ms": 1,
        "updated_at_ms": 6,
        "revision": 2,
    }
    record = CODEC.decode_workflow(CODEC.encode_with(V2[WORKFLOW], datum))
    scheduled, failed = record.events
    assert isinstance(scheduled, ActivityScheduled) and isinstance(failed, ActivityFailed)
    # No backoff and no timeouts: a v2 workflow retries at once, as it did.
    assert (scheduled.initial_interval_ms, scheduled.maximum_interval_ms) == (0, 0)
    assert scheduled.backoff_coefficient == 2.0
    assert scheduled.schedule_to_close_ms is None and scheduled.start_to_close_ms is None
    assert scheduled.heartbeat_timeout_ms is None and scheduled.backoff_ms == 0
    assert failed.retry_at_ms is None and failed.failure.retry_after_ms is None
    assert record.wake_at_ms is None
    assert CODEC.peek_workflow(CODEC.encode_with(V2[WORKFLOW], datum)).wake_at_ms is None


def test_a_v2_task_reads_with_no_timeouts() -> None:
    datum = {
        "workflow_id": "w",
        "workflow_type": "t",
        "activity_id": "w/r/0/1",
        "seq": 0,
        "attempt": 1,
        "participant": "payment",
        "activity": "charge",
        "payload": {"encoding": "json/plain", "data": b"1"},
        "compensation": False,
        "scheduled_at_ms": 5,
        "deadline_ms": None,
    }
    task = CODEC.decode_task(CODEC.encode_with(V2[TASK], datum))
    assert task.start_to_close_ms is None and task.heartbeat_timeout_ms is None
    assert task.heartbeat_details is None and task.report_start is False
