"""Participant core without a database or broker: registry, names, error mapping, outcomes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from examples.order_saga import services
from orchestrator.errors import ConfigurationError
from orchestrator.protocol import (
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    AvroCodec,
    Failure,
    Payload,
    activity_id,
    decode_json,
    encode_json,
)
from participants import ActivityContext, ActivityFailure, Participant
from participants.participant import (
    UNKNOWN_ACTIVITY,
    WRONG_PARTICIPANT,
    Outcome,
    handler_failure,
)

NOW = 1_700_000_000_123


class _NoDatabase:
    """Stands in for ctx.db where a handler must not touch the database."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"handler used ctx.db.{name}")


NO_DB = cast(psycopg.Connection[Any], _NoDatabase())


def _task(participant: str, activity: str, value: Any, *, attempt: int = 1) -> ActivityTask:
    return ActivityTask(
        workflow_id="order-1",
        workflow_type="order.process",
        activity_id=activity_id("order-1", 3, attempt),
        seq=3,
        attempt=attempt,
        participant=participant,
        activity=activity,
        payload=encode_json(value),
        scheduled_at_ms=NOW - 5,
        compensation=False,
    )


def _run(participant: Participant, task: ActivityTask) -> Outcome:
    return participant.run_task(task, NO_DB, now_ms=lambda: NOW)


class Declined(ActivityFailure):
    retryable = False


class Busy(ActivityFailure):
    retryable = True


# --- names and registry ------------------------------------------------------------


@pytest.mark.parametrize("name", ["payment", "order-svc", "svc_2", "A" * 100])
def test_valid_participant_names(name: str) -> None:
    assert Participant(name).name == name


@pytest.mark.parametrize("name", ["", "pay.ment", "pay ment", "pay/ment", "é", "A" * 101])
def test_invalid_participant_names_are_configuration_errors(name: str) -> None:
    with pytest.raises(ConfigurationError, match="participant name"):
        Participant(name)


@pytest.mark.parametrize("name", ["", ".charge", "char ge", "charge/1", "-x"])
def test_invalid_activity_names_are_configuration_errors(name: str) -> None:
    with pytest.raises(ConfigurationError, match="activity name"):
        Participant("payment").activity(name)


def test_registry_returns_the_function_unchanged_and_rejects_duplicates() -> None:
    payment = Participant("payment", setup_sql="CREATE TABLE IF NOT EXISTS x (id int)")

    def charge(value: Any, *, ctx: ActivityContext) -> Any:
        return value

    assert payment.activity("charge")(charge) is charge
    assert payment.activity("v2.refund")(charge) is charge
    assert payment.activities == ("charge", "v2.refund")
    assert payment.handler("charge") is charge
    assert payment.handler("nope") is None
    assert payment.setup_sql.startswith("CREATE TABLE")
    assert payment.metric_label("charge") == "payment.charge"
    assert payment.metric_label("made-up") == "payment.<unknown>"
    with pytest.raises(ConfigurationError, match=r"payment\.charge is registered twice"):
        payment.activity("charge")


# --- exception -> failure ----------------------------------------------------------


def test_activity_failure_is_final_by_default_and_named_after_its_class() -> None:
    assert handler_failure(ActivityFailure("no")) == Failure("ActivityFailure", "no", False)
    assert handler_failure(Declined("card")) == Failure("Declined", "card", False)
    assert handler_failure(Busy("later")) == Failure("Busy", "later", True)


def test_retryable_can_be_set_per_raise() -> None:
    assert handler_failure(Declined("x", retryable=True)).retryable
    assert not handler_failure(Busy("x", retryable=False)).retryable
    assert Busy.retryable  # the override did not leak into the class


def test_other_exceptions_are_transient() -> None:
    assert handler_failure(KeyError("sku")) == Failure("KeyError", "'sku'", True)
    assert handler_failure(RuntimeError()) == Failure("RuntimeError", "RuntimeError", True)


@given(st.text(max_size=5_000))
def test_failure_messages_are_bounded_and_storable(message: str) -> None:
    failure = handler_failure(ValueError(message))
    assert len(failure.message) <= 2_000
    assert "\x00" not in failure.message
    assert failure.message
    failure.message.encode()  # strict UTF-8: what PostgreSQL and Avro accept


def test_lone_surrogates_and_nul_are_escaped_not_dropped() -> None:
    failure = handler_failure(Declined("card \ud800 of \x00 order"))
    assert failure == Failure("Declined", "card \\ud800 of \\x00 order", False)


class _UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class _FickleFailure(ActivityFailure):
    @property
    def retryable(self) -> bool:  # type: ignore[override]
        raise RuntimeError("cannot decide")


def _raises(exc: BaseException) -> Callable[..., Any]:
    def handler(value: Any, *, ctx: ActivityContext) -> Any:
        raise exc

    return handler


def _raises_async(exc: BaseException) -> Callable[..., Any]:
    async def handler(value: Any, *, ctx: ActivityContext) -> Any:
        await asyncio.sleep(0)
        raise exc

    return handler


@pytest.mark.parametrize(
    ("exc", "error_type", "message"),
    [
        (SystemExit(3), "SystemExit", "3"),
        (KeyboardInterrupt(), "KeyboardInterrupt", "KeyboardInterrupt"),
        (asyncio.CancelledError(), "CancelledError", "CancelledError"),
        (GeneratorExit(), "GeneratorExit", "GeneratorExit"),
        (_UnprintableError(), "_UnprintableError", "<unprintable _UnprintableError>"),
        (ValueError("\ud800"), "ValueError", "\\ud800"),
    ],
)
@pytest.mark.parametrize("wrap", [_raises, _raises_async], ids=["sync", "async"])
def test_whatever_a_handler_raises_is_a_retryable_failure_of_that_task(
    exc: BaseException,
    error_type: str,
    message: str,
    wrap: Callable[[BaseException], Callable[..., Any]],
) -> None:
    svc = Participant("svc")
    svc.activity("boom")(wrap(exc))
    outcome = _run(svc, _task("svc", "boom", {}))
    assert outcome == Outcome.failed(Failure(error_type, message, True), NOW)


def test_an_activity_failure_whose_flag_raises_falls_back_to_final() -> None:
    svc = Participant("svc")
    svc.activity("fickle")(_raises(_FickleFailure("hm")))
    outcome = _run(svc, _task("svc", "fickle", {}))
    assert outcome.failure == Failure("_FickleFailure", "hm", False)


# --- running one task --------------------------------------------------------------


def test_completed_task_returns_the_json_result_and_sees_its_context() -> None:
    seen: list[ActivityContext] = []
    svc = Participant("svc")

    @svc.activity("echo")
    def echo(value: Any, *, ctx: ActivityContext) -> Any:
        seen.append(ctx)
        return {"got": value, "attempt": ctx.attempt}

    outcome = _run(svc, _task("svc", "echo", {"b": [1, 2], "a": None}, attempt=2))
    assert outcome == Outcome.completed(
        encode_json({"got": {"a": None, "b": [1, 2]}, "attempt": 2}), NOW
    )
    ctx = seen[0]
    assert (ctx.activity_id, ctx.workflow_id, ctx.attempt, ctx.seq) == (
        "order-1/3/2",
        "order-1",
        2,
        3,
    )
    assert (ctx.participant, ctx.activity, ctx.compensation) == ("svc", "echo", False)
    assert ctx.workflow_type == "order.process"
    assert ctx.db is NO_DB


def test_async_handlers_run_to_completion() -> None:
    svc = Participant("svc")

    @svc.activity("later")
    async def later(value: Any, *, ctx: ActivityContext) -> Any:
        return value * 2

    assert decode_json(_result(_run(svc, _task("svc", "later", 21)))) == 42


def _result(outcome: Outcome) -> Payload:
    assert outcome.result is not None, outcome
    return outcome.result


def test_handler_failures_map_to_failed_outcomes() -> None:
    svc = Participant("svc")

    @svc.activity("declines")
    def declines(value: Any, *, ctx: ActivityContext) -> Any:
        raise Declined(f"order {value['order_id']} declined")

    @svc.activity("crashes")
    async def crashes(value: Any, *, ctx: ActivityContext) -> Any:
        raise ConnectionError("db went away")

    @svc.activity("unencodable")
    def unencodable(value: Any, *, ctx: ActivityContext) -> Any:
        return {"when": object()}

    declined = _run(svc, _task("svc", "declines", {"order_id": "o-9"}))
    assert declined == Outcome.failed(Failure("Declined", "order o-9 declined", False), NOW)
    assert not declined.retryable and not declined.is_completed
    crashed = _run(svc, _task("svc", "crashes", {}))
    assert crashed.failure == Failure("ConnectionError", "db went away", True)
    assert crashed.retryable
    bad_result = _run(svc, _task("svc", "unencodable", {}))
    assert bad_result.failure is not None
    assert (bad_result.failure.error_type, bad_result.failure.retryable) == (
        "PayloadEncodingError",
        True,
    )


def test_unknown_activity_is_retryable_and_logged_at_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Version skew during a deploy: the workflow's RetryPolicy decides, and a later
    # attempt may reach a replica that registers the activity.
    svc = Participant("svc")
    svc.activity("known")(lambda value, *, ctx: value)
    with caplog.at_level(logging.ERROR, logger="participants.participant"):
        outcome = _run(svc, _task("svc", "teleport", {}))
    assert outcome.failure is not None
    assert (outcome.failure.error_type, outcome.failure.retryable) == (UNKNOWN_ACTIVITY, True)
    assert "teleport" in outcome.failure.message and "known" in outcome.failure.message
    garbled = _run(svc, _task("svc", "tele\x00port\ud800", {}))
    assert garbled.failure is not None and garbled.failure.retryable
    garbled.failure.message.encode()
    assert "\x00" not in garbled.failure.message
    assert any(
        "activity=teleport" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records
    )


def test_misrouted_task_and_undecodable_payload_are_final() -> None:
    svc = Participant("svc")
    svc.activity("known")(lambda value, *, ctx: value)
    misrouted = _run(svc, _task("other", "known", {}))
    assert misrouted.failure is not None
    assert (misrouted.failure.error_type, misrouted.failure.retryable) == (WRONG_PARTICIPANT, False)
    task = _task("svc", "known", {})
    garbled = ActivityTask(**{**_fields(task), "payload": Payload(b"{not json")})
    outcome = _run(svc, garbled)
    assert outcome.failure is not None
    assert (outcome.failure.error_type, outcome.failure.retryable) == (
        "PayloadEncodingError",
        False,
    )


def _fields(task: ActivityTask) -> dict[str, Any]:
    return {name: getattr(task, name) for name in task.__slots__}


def test_outcome_answers_its_task_and_survives_the_codec() -> None:
    task = _task("svc", "echo", {})
    codec = AvroCodec()
    for outcome in (
        Outcome.completed(encode_json({"ok": 1}), NOW),
        Outcome.failed(Failure("Declined", "no", False), NOW),
    ):
        result = outcome.result_for(task)
        assert result == ActivityResult(
            workflow_id="order-1",
            activity_id="order-1/3/1",
            seq=3,
            attempt=1,
            status=outcome.status,
            finished_at_ms=NOW,
            result=outcome.result,
            failure=outcome.failure,
        )
        assert codec.decode_inbox(codec.encode_inbox(result)) == result
    assert Outcome.completed(encode_json(1), NOW).status is ActivityStatus.COMPLETED


# --- the example services' validation (no database touched) ------------------------


@pytest.mark.parametrize(
    ("participant", "activity", "value", "error_type"),
    [
        (
            services.payment,
            "charge",
            {"order_id": "o", "amount": 5, "card": "declined"},
            "PaymentDeclined",
        ),
        (
            services.payment,
            "charge",
            {"order_id": "o", "amount": 1.5, "card": "ok"},
            "InvalidRequest",
        ),
        (
            services.payment,
            "charge",
            {"order_id": "o", "amount": True, "card": "ok"},
            "InvalidRequest",
        ),
        (services.inventory, "reserve", {"order_id": "o", "items": []}, "InvalidRequest"),
        (
            services.inventory,
            "reserve",
            {"order_id": "o", "items": [{"sku": "a", "qty": 0}]},
            "InvalidRequest",
        ),
        (services.inventory, "release", ["not", "an", "object"], "InvalidRequest"),
        (services.shipping, "schedule", {"order_id": "o", "address": ""}, "InvalidRequest"),
    ],
)
def test_example_services_refuse_bad_requests_before_writing(
    participant: Participant, activity: str, value: Any, error_type: str
) -> None:
    outcome = _run(participant, _task(participant.name, activity, value))
    assert outcome.failure is not None
    assert (outcome.failure.error_type, outcome.failure.retryable) == (error_type, False)


def test_example_services_register_what_the_order_workflow_calls() -> None:
    assert services.inventory.activities == ("release", "reserve")
    assert services.payment.activities == ("charge", "refund")
    assert services.shipping.activities == ("schedule",)
