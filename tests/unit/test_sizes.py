"""The size bound is never below the encoded size, and spares the measure when it is
within budget."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    AttemptHeartbeat,
    AttemptStarted,
    Failure,
    Payload,
    TimerCancelled,
    TimerFired,
    TimerStarted,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.protocol.sizes import _plan, record_bound, workflow_bound
from orchestrator.replay.limits import Limits, Tier

CODEC = AvroCodec()
BIG = (1 << 63) - 1
TEXTS = ("", "a" * 300, "é" * 50, "\U0001f600" * 40, "mixed ascii and ü")


def _events(text: str, number: int) -> tuple[ActivityScheduled | ActivityFailed, ...]:
    # Avro ints (sequence numbers, attempts) hold 32 bits; longs take ``number`` as it is.
    n = max(-(1 << 31), min(number, (1 << 31) - 1))
    return (
        ActivityScheduled(
            n,
            n,
            f"svc.{text}",
            Payload(text.encode(), text or "json/plain"),
            -number,
            compensation=True,
            max_attempts=n,
            non_retryable=(text, text, "x"),
            initial_interval_ms=number,
            backoff_coefficient=1e300,
            maximum_interval_ms=number,
            schedule_to_close_ms=number,
            start_to_close_ms=number,
            heartbeat_timeout_ms=number,
            backoff_ms=number,
        ),
        AttemptStarted(n, n, number),
        AttemptHeartbeat(n, n, number, Payload(text.encode(), text)),
        AttemptHeartbeat(n, n, number, None),
        ActivityFailed(
            n,
            n,
            Failure(text, text * 3, True, True, retry_after_ms=number),
            number,
            retry_at_ms=number,
        ),
        ActivityCompleted(n, n, Payload(b"\x00" * 200), number),
        TimerStarted(n, number, number),
        TimerFired(n, number),
        TimerCancelled(n, number),
    )  # type: ignore[return-value]


def _record(text: str, number: int, events: int) -> WorkflowRecord:
    history = tuple(e for _ in range(events) for e in _events(text, number))
    return WorkflowRecord(
        workflow_id=f"wf-{text}",
        workflow_type=f"type-{text}",
        status=WorkflowStatus.COMPENSATION_FAILED,
        input=Payload(text.encode() * 3, text or "json/plain"),
        started_at_ms=number,
        updated_at_ms=number,
        revision=number,
        events=history,
        result=Payload(text.encode()),
        failure=Failure(text, text, True, True, retry_after_ms=number),
        closed_at_ms=number,
        run_id=text,
        wake_at_ms=number,
    )


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("number", [0, 1, 63, 64, BIG, -BIG])
@pytest.mark.parametrize("events", [0, 1, 8])
def test_the_bound_is_never_below_the_encoded_size(text: str, number: int, events: int) -> None:
    record = _record(text, number, events)
    data = CODEC.encode_workflow(record)
    assert workflow_bound(record) >= len(data)
    assert record_bound(record) >= len(data) + len(record.workflow_id.encode())


def test_the_bound_of_a_plain_saga_record_is_within_a_few_times_its_size() -> None:
    # Loose is safe, but too loose would send records near the limit to the measure.
    step = ActivityScheduled(0, 1, "payment.charge", encode_json({"amount": 10}), 1)
    record = WorkflowRecord(
        "order-1",
        "order.process",
        WorkflowStatus.RUNNING,
        encode_json({"order_id": "order-1", "items": [1, 2, 3]}),
        1,
        2,
        revision=2,
        events=(step, ActivityCompleted(0, 1, encode_json({"ok": True}), 3)),
    )
    assert workflow_bound(record) <= 4 * len(CODEC.encode_workflow(record))


def test_a_field_of_an_unknown_type_is_refused_at_import() -> None:
    @dataclasses.dataclass
    class Newer:
        seq: int
        tags: list[int]

    with pytest.raises(TypeError, match=r"Newer\.tags"):
        _plan(Newer)


def _counting_limits(bound: int) -> tuple[Limits, list[int]]:
    calls: list[int] = []

    def measure(record: WorkflowRecord) -> int:
        calls.append(1)
        return 100

    return Limits(max_record_bytes=10_000, measure=measure, bound=lambda r: bound), calls


def test_a_record_whose_bound_is_within_budget_is_not_measured() -> None:
    limits, calls = _counting_limits(bound=200)
    assert limits.fits(_record("", 1, 0), Tier.NORMAL)
    assert calls == []


def test_a_record_whose_bound_is_over_budget_is_measured() -> None:
    limits, calls = _counting_limits(bound=1_000_000)
    assert limits.fits(_record("", 1, 0), Tier.NORMAL)
    assert calls == [1]
