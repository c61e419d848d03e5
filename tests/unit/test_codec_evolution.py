"""Schema evolution: records written with ``schemas/avro/archive/v0`` read by today's codec.

v0 predates ``Failure.retryable``, ``ActivityScheduled.non_retryable``, the task's
``compensation`` and ``deadline_ms`` fields, the ``CANCELLED``/``UNKNOWN`` statuses and
the default of ``Payload.encoding``. Records written with it must decode into the current
types with the defaults filled in, and a workflow restored from one must keep running.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import fastavro
import pytest

from orchestrator.errors import MalformedRecordError
from orchestrator.protocol.codec import (
    INBOX,
    NS,
    SCHEMA_ORDER,
    TASK,
    WORKFLOW,
    AvroCodec,
    _task_to_avro,
    default_schema_dir,
    schema_id,
)
from orchestrator.protocol.payloads import decode_json, encode_json
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
    WorkflowStatus,
)
from orchestrator.replay import advance
from orchestrator.workflow import WorkflowRegistry
from tests.unit.conftest import completed, task_lines

ARCHIVE = default_schema_dir() / "archive"
CODEC = AvroCodec()


def _parse_dir(directory: Path) -> dict[str, Any]:
    """Every schema of one version, parsed the way a writer of that version would."""
    named: dict[str, Any] = {}
    parsed: dict[str, Any] = {}
    for short in SCHEMA_ORDER:
        path = directory / f"{NS}{short}.avsc"
        if not path.exists():  # a schema introduced after this version
            continue
        raw = json.loads(path.read_text())
        parsed[NS + short] = fastavro.parse_schema(raw, named_schemas=named)
    return parsed


# The schemas every version has had; later ones (ResumeWorkflow, in v2) are optional.
ORIGINAL = {
    NS + short for short in ("Payload", "Failure", "StartWorkflow", "ActivityResult", "InboxRecord")
} | {TASK, WORKFLOW}
V0 = _parse_dir(ARCHIVE / "v0")
V1 = _parse_dir(ARCHIVE / "v1")
V2 = _parse_dir(ARCHIVE / "v2")
V3 = _parse_dir(ARCHIVE / "v3")
CURRENT = _parse_dir(default_schema_dir())
PAYLOAD = {"encoding": "json/plain", "data": b'{"total":42}'}


@pytest.mark.parametrize("version", sorted(p.name for p in ARCHIVE.iterdir() if p.is_dir()))
def test_every_archived_version_is_complete_and_parses_on_its_own(version: str) -> None:
    parsed = _parse_dir(ARCHIVE / version)
    assert set(parsed) >= ORIGINAL


@pytest.mark.parametrize(
    ("version", "name"),
    [
        ("v0", INBOX),
        ("v0", TASK),
        ("v0", WORKFLOW),
        ("v1", INBOX),
        ("v1", WORKFLOW),
        ("v2", INBOX),
        ("v2", TASK),
        ("v2", WORKFLOW),
        ("v3", INBOX),
        ("v3", WORKFLOW),
    ],
)
def test_an_old_version_has_its_own_id_which_the_codec_knows(version: str, name: str) -> None:
    """The version differs from today in a field of the record or of a record it refers to."""
    old = schema_id({"v0": V0, "v1": V1, "v2": V2, "v3": V3}[version][name])
    assert old != CODEC.schema_id_of(name), (
        f"{name}: {version} and the current schema share id {old}, so its records would be read "
        "as if written with the current schema"
    )
    # Known: decoding gets past the id lookup and fails only on the empty body.
    with pytest.raises(MalformedRecordError):
        CODEC.decode_raw(struct.pack(">bI", 0, old), name)


def test_a_default_is_not_part_of_the_schema_id() -> None:
    """v0 Payload lacks only a default: same canonical form, same id, same bytes."""
    assert schema_id(V0[NS + "Payload"]) == schema_id(CURRENT[NS + "Payload"])


def test_an_old_start_reads_as_today_start() -> None:
    datum = {
        "body": (
            NS + "StartWorkflow",
            {
                "workflow_id": "order-1",
                "workflow_type": "order.process",
                "input": PAYLOAD,
                "requested_at_ms": 1_700_000_000_000,
            },
        )
    }
    assert CODEC.decode_inbox(CODEC.encode_with(V0[INBOX], datum)) == StartWorkflow(
        "order-1", "order.process", Payload(b'{"total":42}'), 1_700_000_000_000
    )


def test_an_old_failed_result_reads_as_not_retryable() -> None:
    datum = {
        "body": (
            NS + "ActivityResult",
            {
                "workflow_id": "order-1",
                "activity_id": "order-1/1/1",
                "seq": 1,
                "attempt": 1,
                "status": "FAILED",
                "result": None,
                "failure": {"error_type": "PaymentDeclined", "message": "no"},
                "finished_at_ms": 1_700_000_000_900,
            },
        )
    }
    assert CODEC.decode_inbox(CODEC.encode_with(V0[INBOX], datum)) == ActivityResult(
        "order-1",
        "order-1/1/1",
        1,
        1,
        ActivityStatus.FAILED,
        1_700_000_000_900,
        failure=Failure("PaymentDeclined", "no", retryable=False),
    )


def test_an_old_task_reads_without_compensation_or_deadline() -> None:
    datum = {
        "workflow_id": "order-1",
        "workflow_type": "order.process",
        "activity_id": "order-1/0/1",
        "seq": 0,
        "attempt": 1,
        "participant": "inventory",
        "activity": "reserve",
        "payload": PAYLOAD,
        "scheduled_at_ms": 1_700_000_000_000,
    }
    assert CODEC.decode_task(CODEC.encode_with(V0[TASK], datum)) == ActivityTask(
        "order-1",
        "order.process",
        "order-1/0/1",
        0,
        1,
        "inventory",
        "reserve",
        Payload(b'{"total":42}'),
        1_700_000_000_000,
        compensation=False,
        deadline_ms=None,
    )


def _old_order(status: str = "RUNNING") -> dict[str, Any]:
    """An order in v0 shape: reserved, charge failed once and is being retried."""
    return {
        "workflow_id": "order-1",
        "workflow_type": "order.process",
        "status": status,
        "input": {"encoding": "json/plain", "data": b'{"total":42}'},
        "events": [
            (
                NS + "ActivityScheduled",
                {
                    "seq": 0,
                    "attempt": 1,
                    "name": "inventory.reserve",
                    "payload": PAYLOAD,
                    "compensation": False,
                    "max_attempts": 3,
                    "at_ms": 10,
                },
            ),
            (
                NS + "ActivityCompleted",
                {
                    "seq": 0,
                    "attempt": 1,
                    "result": {"encoding": "json/plain", "data": b'"r-1"'},
                    "at_ms": 20,
                },
            ),
            (
                NS + "ActivityScheduled",
                {
                    "seq": 1,
                    "attempt": 1,
                    "name": "payment.charge",
                    "payload": PAYLOAD,
                    "compensation": False,
                    "max_attempts": 2,
                    "at_ms": 20,
                },
            ),
            (
                NS + "ActivityFailed",
                {
                    "seq": 1,
                    "attempt": 1,
                    "failure": {"error_type": "Timeout", "message": "slow"},
                    "at_ms": 30,
                },
            ),
            (
                NS + "ActivityScheduled",
                {
                    "seq": 1,
                    "attempt": 2,
                    "name": "payment.charge",
                    "payload": PAYLOAD,
                    "compensation": False,
                    "max_attempts": 2,
                    "at_ms": 30,
                },
            ),
        ],
        "result": None,
        "failure": None,
        "started_at_ms": 10,
        "updated_at_ms": 30,
        "closed_at_ms": None,
        "revision": 3,
    }


def test_an_old_workflow_record_reads_with_defaults_filled_in() -> None:
    record = CODEC.decode_workflow(CODEC.encode_with(V0[WORKFLOW], _old_order()))
    assert record.status is WorkflowStatus.RUNNING
    assert record.events == (
        ActivityScheduled(
            0,
            1,
            "inventory.reserve",
            Payload(b'{"total":42}'),
            10,
            max_attempts=3,
            non_retryable=(),
        ),
        ActivityCompleted(0, 1, Payload(b'"r-1"'), 20),
        ActivityScheduled(
            1, 1, "payment.charge", Payload(b'{"total":42}'), 20, max_attempts=2, non_retryable=()
        ),
        ActivityFailed(1, 1, Failure("Timeout", "slow", retryable=False), 30),
        ActivityScheduled(
            1, 2, "payment.charge", Payload(b'{"total":42}'), 30, max_attempts=2, non_retryable=()
        ),
    )
    assert (record.revision, record.started_at_ms, record.closed_at_ms) == (3, 10, None)


@pytest.mark.parametrize("status", ["COMPLETED", "COMPENSATION_FAILED", "STUCK"])
def test_every_old_status_reads_as_itself(status: str) -> None:
    record = CODEC.decode_workflow(CODEC.encode_with(V0[WORKFLOW], _old_order(status)))
    assert record.status is WorkflowStatus(status)


def test_a_workflow_restored_from_an_old_record_keeps_running() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("order.process")
    async def order(ctx: Any, value: dict[str, Any]) -> Any:
        reservation = await ctx.activity("inventory.reserve", value)
        charge = await ctx.activity("payment.charge", value)
        return await ctx.activity("shipping.schedule", [reservation, charge])

    record = CODEC.decode_workflow(CODEC.encode_with(V0[WORKFLOW], _old_order()))
    transition = advance(record, completed("order-1", 1, 2, "ch-1", 40), 40, registry)
    assert task_lines(transition.tasks) == ["order-1/2/1 shipping.schedule"]
    assert transition.record is not None
    assert decode_json(transition.tasks[0].payload) == ["r-1", "ch-1"]
    again = CODEC.decode_workflow(CODEC.encode_workflow(transition.record))
    assert again == transition.record
    assert again.revision == 4


def test_an_old_participant_can_read_a_current_task() -> None:
    """Forward compatibility: new task fields have defaults, so v0 readers skip them."""
    task = ActivityTask(
        "order-1",
        "order.process",
        "order-1/2/1",
        2,
        1,
        "inventory",
        "release",
        encode_json("r-1"),
        50,
        compensation=True,
        deadline_ms=90,
    )
    data = CODEC.encode_with(CODEC.writer_schema(TASK), _task_to_avro(task))
    body = io.BytesIO(data[5:])
    old = fastavro.schemaless_reader(body, CODEC.writer_schema(TASK), V0[TASK])
    assert old == {
        "workflow_id": "order-1",
        "workflow_type": "order.process",
        "activity_id": "order-1/2/1",
        "seq": 2,
        "attempt": 1,
        "participant": "inventory",
        "activity": "release",
        "payload": {"encoding": "json/plain", "data": b'"r-1"'},
        "scheduled_at_ms": 50,
    }


def test_v1_tasks_are_v2_tasks() -> None:
    """v2 left ActivityTask alone, so participants of v1 read tasks of v2 orchestrators."""
    assert schema_id(V1[TASK]) == schema_id(V2[TASK])


def _v1_order(status: str, closed_at_ms: int | None) -> dict[str, Any]:
    """The v0 order in v1 shape (same fields; Failure gained ``retryable`` in v1)."""
    order = _old_order(status)
    order["closed_at_ms"] = closed_at_ms
    order["failure"] = (
        None
        if closed_at_ms is None
        else {"error_type": "Timeout", "message": "slow", "retryable": True}
    )
    return order


def test_a_v1_record_reads_with_an_empty_run_id_and_keeps_old_activity_ids() -> None:
    record = CODEC.decode_workflow(CODEC.encode_with(V1[WORKFLOW], _v1_order("RUNNING", None)))
    assert record.run_id == ""
    assert record.events[3] == ActivityFailed(1, 1, Failure("Timeout", "slow", retryable=False), 30)
    registry = WorkflowRegistry()

    @registry.workflow("order.process")
    async def order(ctx: Any, value: dict[str, Any]) -> Any:
        await ctx.activity("inventory.reserve", value)
        await ctx.activity("payment.charge", value)
        return await ctx.activity("shipping.schedule", value)

    transition = advance(record, completed("order-1", 1, 2, "ch-1", 40), 40, registry)
    # In-flight workflows of the old format keep the ids their participants already hold.
    assert task_lines(transition.tasks) == ["order-1/2/1 shipping.schedule"]


@pytest.mark.parametrize(
    ("status", "closed_at_ms"), [("RUNNING", None), ("STUCK", None), ("COMPENSATED", 77)]
)
def test_peek_reads_status_and_closing_time_of_old_and_current_records(
    status: str, closed_at_ms: int | None
) -> None:
    old = CODEC.encode_with(V1[WORKFLOW], _v1_order(status, closed_at_ms))
    assert CODEC.peek_workflow(old)[:3] == (WorkflowStatus(status), closed_at_ms, None)
    current = CODEC.encode_workflow(CODEC.decode_workflow(old))
    assert CODEC.peek_workflow(current)[:3] == (WorkflowStatus(status), closed_at_ms, None)


def test_v1_failures_read_as_without_committed_effects() -> None:
    datum = {
        "body": (
            NS + "ActivityResult",
            {
                "workflow_id": "order-1",
                "activity_id": "order-1/1/1",
                "seq": 1,
                "attempt": 1,
                "status": "FAILED",
                "result": None,
                "failure": {"error_type": "ResultTooLarge", "message": "big", "retryable": False},
                "finished_at_ms": 5,
            },
        )
    }
    body = CODEC.decode_inbox(CODEC.encode_with(V1[INBOX], datum))
    assert isinstance(body, ActivityResult) and body.failure is not None
    assert body.failure.effects_committed is False
