"""The pure parts of exactly-once Celery tasks (participants.celery): reading Celery's
request fields, and how one call's return or exception becomes the attempt's outcome."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any, cast

import psycopg
import pytest
from celery.exceptions import Ignore, Reject, Retry

from orchestrator.convert import DEFAULT_CONVERTER
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import ActivityStatus, ActivityTask, Failure, Payload
from orchestrator.settings import KafkaSettings
from participants import ActivityFailure
from participants.celery import (
    FIRST_START_HEADER,
    CeleryOutcomes,
    ExactlyOnceTask,
    StepFailedError,
    _Bypass,
    _Call,
    _epoch_ms,
    _first_start_ms,
    _hard_limit_ms,
    _session_of_current_task,
    _step_from_activity_id,
)
from participants.participant import START_TO_CLOSE_TIMEOUT

NOW_MS = 1_700_000_000_000


def _attempt(start_to_close_ms: int | None = None) -> ActivityTask:
    return ActivityTask(
        workflow_id="w",
        workflow_type="",
        activity_id="w/r/1/1",
        seq=1,
        attempt=1,
        participant="celery",
        activity="shop.charge",
        payload=Payload(b"null"),
        scheduled_at_ms=0,
        start_to_close_ms=start_to_close_ms,
    )


def _call(body: Any) -> _Call:
    return _Call(SimpleNamespace(run=body), (1,), {"b": 2}, DEFAULT_CONVERTER)


DB = cast(psycopg.Connection[Any], object())


def test_expires_reads_celerys_iso_text_and_datetimes() -> None:
    at = datetime(2026, 12, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    assert _epoch_ms(at.isoformat()) == int(at.timestamp() * 1000)
    assert _epoch_ms(at) == int(at.timestamp() * 1000)
    east = at.astimezone(timezone(timedelta(hours=3)))
    assert _epoch_ms(east.isoformat()) == int(at.timestamp() * 1000)


@pytest.mark.parametrize("value", [None, "", "soon", 12, datetime(2026, 1, 1), "2026-01-01T00:00"])
def test_expires_without_a_zone_or_unreadable_is_no_deadline(value: Any) -> None:
    assert _epoch_ms(value) is None


@pytest.mark.parametrize(
    ("timelimit", "expected"),
    [
        ([2.5, None], 2_500),
        ((30, 20), 30_000),
        ([None, 10], None),
        ([0, None], None),
        ([-1, None], None),
        ([True, None], None),
        (None, None),
        ([], None),
        ("30", None),
    ],
)
def test_the_hard_time_limit_is_the_first_of_celerys_pair(timelimit: Any, expected: Any) -> None:
    assert _hard_limit_ms(timelimit) == expected


def test_a_return_is_a_completed_outcome_with_the_value_kept() -> None:
    seen: list[Any] = []

    def body(a: int, b: int) -> dict[str, int]:
        seen.append(_session_of_current_task())
        return {"sum": a + b}

    call = _call(body)
    outcome = call.run_task(_attempt(), DB, now_ms=lambda: NOW_MS)
    assert outcome.status is ActivityStatus.COMPLETED
    assert outcome.result is not None and decode_json(outcome.result) == {"sum": 3}
    assert call.returned == {"sum": 3} and call.raised is None
    assert seen == [DB]  # self.db is the inbox's connection while the body runs


def test_self_db_outside_a_running_task_says_where_it_can_be_used() -> None:
    with pytest.raises(RuntimeError, match="body of an ExactlyOnceTask"):
        _session_of_current_task()
    with pytest.raises(RuntimeError, match="ExactlyOnceTask"):
        _ = ExactlyOnceTask().db


class CardDeclined(ActivityFailure):
    retryable = False


def test_an_exception_is_the_attempts_failure_and_is_kept_to_raise_again() -> None:
    def body(a: int, b: int) -> None:
        raise CardDeclined("no")

    call = _call(body)
    outcome = call.run_task(_attempt(), DB, now_ms=lambda: NOW_MS)
    assert outcome.failure is not None
    assert (outcome.failure.error_type, outcome.failure.retryable) == ("CardDeclined", False)
    assert isinstance(call.raised, CardDeclined)


@pytest.mark.parametrize(
    "control",
    [Retry(), Ignore(), Reject("no", requeue=False), SystemExit(-241), KeyboardInterrupt()],
)
def test_celerys_control_flow_and_process_ends_store_nothing(control: BaseException) -> None:
    def body(a: int, b: int) -> None:
        raise control

    with pytest.raises(_Bypass) as caught:
        _call(body).run_task(_attempt(), DB, now_ms=lambda: NOW_MS)
    assert caught.value.error is control


def test_a_return_after_the_deadline_is_the_timeouts_failure() -> None:
    clock = iter([NOW_MS, NOW_MS + 5_001])
    call = _call(lambda a, b: "late")
    outcome = call.run_task(_attempt(start_to_close_ms=5_000), DB, now_ms=lambda: next(clock))
    assert outcome.failure is not None
    assert outcome.failure.error_type == START_TO_CLOSE_TIMEOUT
    assert outcome.failure.retryable
    assert "rolled back" in outcome.failure.message


def test_a_return_at_the_deadline_is_still_in_time() -> None:
    clock = iter([NOW_MS, NOW_MS + 5_000])
    outcome = _call(lambda a, b: "ok").run_task(
        _attempt(start_to_close_ms=5_000), DB, now_ms=lambda: next(clock)
    )
    assert outcome.status is ActivityStatus.COMPLETED


def test_a_result_the_converter_refuses_fails_for_good_with_writes_rolled_back() -> None:
    call = _call(lambda a, b: object())
    outcome = call.run_task(_attempt(), DB, now_ms=lambda: NOW_MS)
    assert outcome.failure is not None
    assert outcome.failure.error_type == "PayloadEncodingError"
    assert not outcome.failure.retryable
    assert not outcome.failure.effects_committed
    assert call.returned is None


def test_a_stored_failure_raised_again_says_where_it_came_from() -> None:
    error = StepFailedError(Failure("CardDeclined", "no", False), stored_earlier=True)
    assert str(error) == "CardDeclined: no (stored by an earlier delivery)"
    assert error.failure.error_type == "CardDeclined"


@pytest.mark.parametrize(
    ("task_id", "expected"),
    [
        ("order-1/r1/2/3", ("order-1", "order-1/r1/2/3", 2, 3)),
        ("a/b/c/r9/0/1", ("a/b/c", "a/b/c/r9/0/1", 0, 1)),  # ids may hold slashes
        ("5f0c2e6e-0b8f-4a55-a3cb-0c6f1f7bd2a1", None),  # a Celery uuid: not a step
        ("order-1/1/2", None),  # the pre-run-id form carries no run: not a Celery step's
        ("/r1/2/3", None),
        ("w/r1/x/3", None),
        ("w/r1/2/-3", None),
        (None, None),
        (12, None),
    ],
)
def test_a_task_id_names_its_step_only_when_it_is_an_activity_id(
    task_id: Any, expected: Any
) -> None:
    assert _step_from_activity_id(task_id) == expected


def test_a_fork_while_a_thread_holds_the_publishers_lock_leaves_the_child_a_free_one() -> None:
    """A settle thread may hold the lock when the pool forks a replacement process; the
    child would inherit it held for ever."""
    outcomes = CeleryOutcomes(KafkaSettings(kafka_bootstrap="127.0.0.1:1"))
    outcomes._lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if its lock is free
            os._exit(0 if outcomes._lock.acquire(timeout=5) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        outcomes._lock.release()
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_first_start_is_stamped_once_and_read_back_from_a_retried_message() -> None:
    """The start report stamps it and the task's run reads the same value (the first
    version stamped twice, a millisecond apart, and reported the second to a retry)."""
    request = SimpleNamespace(headers=None)
    first = _first_start_ms(request)
    assert _first_start_ms(request) == first
    assert request.headers == {FIRST_START_HEADER: first}
    retried = SimpleNamespace(headers={FIRST_START_HEADER: 123}, **{FIRST_START_HEADER: 123})
    assert _first_start_ms(retried) == 123
