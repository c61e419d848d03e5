"""Stored histories (``tests/unit/histories/*.json``) against the current workflow code.

Each file is one workflow record as the history topic held it, with its payloads shown
as JSON. Replaying it with today's code must reproduce it exactly: this is what
``sagaline replay`` checks before a deploy, and it fails here first when a change to
``examples/order_saga`` would strand workflows already running.

A ``STUCK`` history was parked by a bad deploy (``parked_by`` names the code, kept below,
and the first event it handled). Today's code is the fix: a resume, with no other input,
must move it on (``resume``).

A history with ``"protocol": 2`` was written before durable time (no backoff fields, a
retry sent at once): today's code must replay and continue it, but would write it
differently, so it is not rebuilt from its inputs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from examples.order_saga.workflows import process_order
from orchestrator import ActivityError, WorkflowContext, WorkflowRegistry
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    Failure,
    HistoryEvent,
    ResumeWorkflow,
    StartWorkflow,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.replay import advance, next_wake
from orchestrator.replay.driver import replay
from tests.unit.conftest import completed, failed, history_lines, task_lines

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
CURRENT = [p for p in HISTORIES if json.loads(p.read_text()).get("protocol", 3) >= 3]
CODE = {"order.process": process_order}


async def _renamed_charge(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    """The bad deploy of ``order_process_stuck_renamed_charge.json``."""
    reservation = await ctx.activity(
        "inventory.reserve", {"order_id": order["order_id"], "items": order["items"]}
    )
    try:
        charge = await ctx.activity(
            "billing.charge",
            {"order_id": order["order_id"], "amount": order["total"], "card": order["card"]},
        )
    except ActivityError:
        await ctx.activity("inventory.release", reservation, compensation=True)
        raise
    return dict(charge)


PARKED_BY = {"renamed-charge": _renamed_charge}


def _registry(code: dict[str, Any] | None = None) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    for name, fn in (code or CODE).items():
        registry.workflow(name)(fn)
    return registry


def _stored_record(doc: dict[str, Any], events: tuple[HistoryEvent, ...]) -> WorkflowRecord:
    return WorkflowRecord(
        doc["workflow_id"],
        doc["workflow_type"],
        WorkflowStatus(doc["status"]),
        encode_json(doc["input"]),
        doc["started_at_ms"],
        events[-1].at_ms,
        revision=7,
        events=events,
        failure=_failure(doc["failure"]),
        run_id=doc.get("run_id", ""),
    )


def _failure(doc: dict[str, Any] | None) -> Failure | None:
    return None if doc is None else Failure(doc["error_type"], doc["message"], doc["retryable"])


def _event(doc: dict[str, Any]) -> HistoryEvent:
    """One stored event; fields a protocol 2 history lacks take protocol 2's values."""
    kind = doc["type"]
    if kind == "scheduled":
        return ActivityScheduled(
            doc["seq"],
            doc["attempt"],
            doc["name"],
            encode_json(doc["payload"]),
            doc["at_ms"],
            doc["compensation"],
            doc["max_attempts"],
            tuple(doc["non_retryable"]),
            initial_interval_ms=doc.get("initial_interval_ms", 0),
            backoff_coefficient=doc.get("backoff_coefficient", 2.0),
            maximum_interval_ms=doc.get("maximum_interval_ms", 0),
            schedule_to_close_ms=doc.get("schedule_to_close_ms"),
            start_to_close_ms=doc.get("start_to_close_ms"),
            heartbeat_timeout_ms=doc.get("heartbeat_timeout_ms"),
            backoff_ms=doc.get("backoff_ms", 0),
        )
    if kind == "completed":
        return ActivityCompleted(
            doc["seq"], doc["attempt"], encode_json(doc["result"]), doc["at_ms"]
        )
    assert kind == "failed", f"unknown event type {kind!r}"
    failure = _failure(doc["failure"])
    assert failure is not None
    return ActivityFailed(
        doc["seq"], doc["attempt"], failure, doc["at_ms"], retry_at_ms=doc.get("retry_at_ms")
    )


def _load(path: Path) -> tuple[dict[str, Any], tuple[HistoryEvent, ...]]:
    doc = json.loads(path.read_text())
    return doc, tuple(_event(e) for e in doc["events"])


@pytest.fixture(params=HISTORIES, ids=[p.stem for p in HISTORIES])
def stored(request: pytest.FixtureRequest) -> tuple[dict[str, Any], tuple[HistoryEvent, ...]]:
    return _load(request.param)


def test_there_are_stored_histories_for_every_ending() -> None:
    statuses = {json.loads(p.read_text())["status"] for p in CURRENT}
    assert {"COMPLETED", "COMPENSATED", "RUNNING", "STUCK"} <= statuses, statuses
    assert len(CURRENT) < len(HISTORIES), "no stored history of protocol 2"


def test_todays_code_replays_the_stored_history(
    stored: tuple[dict[str, Any], tuple[HistoryEvent, ...]],
) -> None:
    doc, events = stored
    outcome = replay(
        CODE[doc["workflow_type"]],
        doc["workflow_id"],
        doc["workflow_type"],
        doc["input"],
        events,
        doc["started_at_ms"],
    )
    where = f"workflow {doc['workflow_id']} ({doc['description']})"
    assert outcome.problem is None, f"{where}: {outcome.problem}"
    if doc["status"] == WorkflowStatus.STUCK.value:
        # Today's code is the fix: it goes on where the bad deploy stopped.
        assert [
            s.name if isinstance(s, ActivityScheduled) else "a timer" for s in outcome.new_steps
        ] == [line.split(" ")[1] for line in doc["resume"]["tasks"]], where
        return
    assert outcome.new_steps == [], (
        f"{where}: the code schedules steps the history lacks: {outcome.new_steps}"
    )
    if doc["status"] == WorkflowStatus.RUNNING.value:
        assert not outcome.finished, where
    elif doc["status"] == WorkflowStatus.COMPLETED.value:
        assert outcome.finished and outcome.error is None, f"{where}: {outcome.error!r}"
        assert outcome.value == doc["result"], where
    else:
        assert outcome.finished and outcome.error is not None, where
        assert (type(outcome.error).__name__, str(outcome.error)) == (
            doc["failure"]["error_type"],
            doc["failure"]["message"],
        ), where


@pytest.mark.parametrize("path", CURRENT, ids=[p.stem for p in CURRENT])
def test_the_inputs_of_a_stored_history_rebuild_it(path: Path) -> None:
    """Start, then each recorded outcome as a participant's result at its recorded time,
    and a WakeUp at the time of each retry."""
    doc, events = _load(path)
    wid, registry, run_id = doc["workflow_id"], _registry(), doc.get("run_id", "")
    transition = advance(
        None,
        StartWorkflow(wid, doc["workflow_type"], encode_json(doc["input"]), 0),
        doc["started_at_ms"],
        registry,
        run_id=run_id,
    )
    record = transition.record
    parked_by = doc.get("parked_by")
    for index, event in enumerate(events):
        if parked_by is not None and index == parked_by["from_event"]:
            registry = _registry({doc["workflow_type"]: PARKED_BY[parked_by["code"]]})
        if isinstance(event, ActivityScheduled) and event.attempt > 1:
            body: Any = WakeUp(wid)  # the retry's backoff is over
        elif isinstance(event, ActivityCompleted):
            body = completed(
                wid, event.seq, event.attempt, None, event.at_ms, result=event.result, run_id=run_id
            )
        elif isinstance(event, ActivityFailed):
            body = failed(
                wid,
                event.seq,
                event.attempt,
                event.failure.error_type,
                event.at_ms,
                retryable=event.failure.retryable,
                message=event.failure.message,
                run_id=run_id,
            )
        else:
            continue
        transition = advance(record, body, event.at_ms, registry)
        assert transition.record is not None, f"workflow {wid}: {transition.ignored}"
        record = transition.record

    assert record is not None
    expected = WorkflowRecord(
        workflow_id=wid,
        workflow_type=doc["workflow_type"],
        status=WorkflowStatus(doc["status"]),
        input=encode_json(doc["input"]),
        started_at_ms=doc["started_at_ms"],
        updated_at_ms=record.updated_at_ms,
        revision=record.revision,
        events=events,
        result=None if doc["result"] is None else encode_json(doc["result"]),
        failure=_failure(doc["failure"]),
        closed_at_ms=None if doc["status"] in ("RUNNING", "STUCK") else events[-1].at_ms,
        run_id=run_id,
    )
    # A step still running wakes the workflow at its deadline (payment.charge has one).
    expected = dataclasses.replace(expected, wake_at_ms=next_wake(expected))
    if record != expected:
        raise AssertionError(
            f"workflow {wid}: rebuilt record differs from the stored one\n"
            f"  expected: {history_lines(expected.events)} {expected.status.value} "
            f"{expected.failure}\n"
            f"  observed: {history_lines(record.events)} {record.status.value} "
            f"{record.failure}"
        )
    # One revision for the start, for each outcome, and for each retry's WakeUp.
    assert record.revision == 1 + sum(
        not isinstance(e, ActivityScheduled) or e.attempt > 1 for e in events
    )


def test_a_stored_running_workflow_continues_with_todays_code() -> None:
    for path in HISTORIES:
        doc, events = _load(path)
        if "next" not in doc:
            continue
        wid, step = doc["workflow_id"], doc["next"]["result"]
        body = completed(
            wid,
            step["seq"],
            step["attempt"],
            step["value"],
            events[-1].at_ms + 1,
            run_id=doc.get("run_id", ""),
        )
        transition = advance(_stored_record(doc, events), body, events[-1].at_ms + 1, _registry())
        assert task_lines(transition.tasks) == doc["next"]["tasks"], (
            f"workflow {wid}: history {history_lines(events)}"
        )


def test_a_stored_stuck_workflow_completes_after_a_resume_with_todays_code() -> None:
    """No input but the resume: the README's "deploying code that matches resumes it"."""
    stuck = [path for path in HISTORIES if _load(path)[0]["status"] == "STUCK"]
    assert stuck, "no stored STUCK history"
    for path in stuck:
        doc, events = _load(path)
        wid, expected = doc["workflow_id"], doc["resume"]
        record = _stored_record(doc, events)
        now = events[-1].at_ms + 60_000
        resumed = advance(record, ResumeWorkflow(wid, now), now, _registry())
        where = f"workflow {wid}: history {history_lines(events)}"
        assert resumed.record is not None, f"{where}: {resumed.ignored}"
        assert resumed.record.status is WorkflowStatus.RUNNING, where
        assert resumed.record.failure is None, where
        assert task_lines(resumed.tasks) == expected["tasks"], where
        then = expected["then"]
        body = completed(
            wid, then["seq"], then["attempt"], then["value"], now + 1, run_id=doc["run_id"]
        )
        done = advance(resumed.record, body, now + 1, _registry()).record
        assert done is not None and done.status is WorkflowStatus.COMPLETED, where
        assert done.result == encode_json(expected["result"]), where
