"""Queries and updates in the pure engine: ``ctx.on_query`` handlers answer from the state
replayed up to now and never change the record; ``ctx.on_update`` handlers are validated,
recorded as ``UpdateAccepted`` and run at that point of the history on every replay.

Inputs go through ``WorkflowRun`` (every new record must survive the Avro round trip);
queries through ``answer_query``, which the shell calls for a ``QueryWorkflow``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import pytest

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.errors import ConfigurationError
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    Failure,
    HistoryEvent,
    Payload,
    QueryWorkflow,
    Reply,
    ReplyKind,
    SignalWorkflow,
    StartWorkflow,
    UpdateAccepted,
    UpdateWorkflow,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.replay import Limits, advance
from orchestrator.replay.driver import Ask, HandlerMisuseError, replay
from orchestrator.replay.engine import answer_query, park
from orchestrator.replay.limits import Tier
from tests.unit.conftest import (
    CODEC,
    T0,
    WorkflowRun,
    assert_status,
    encoded_size,
    event_line,
    task_lines,
)

_IDS = iter(range(1_000_000))
PARKED = Failure("SomethingBroke", "parked for the test")


class CartError(Exception):
    """What a handler of the test workflows raises on purpose."""


async def _cart(ctx: WorkflowContext, value: Any) -> Any:
    """Items from the input, an update ``add`` (strings only), a load step, a signal."""
    items: list[Any] = list(value or [])
    seen: dict[str, int] = {"queries": 0}

    def add(item: Any) -> int:
        if item == "explode":
            raise CartError("cannot add explode")
        items.append(item)
        return len(items)

    def check(item: Any) -> None:
        if not isinstance(item, str) or not item:
            raise ValueError("an item is a non-empty string")

    def touch() -> int:
        # A query that changes the state it replayed: nothing of it may stay.
        seen["queries"] += 1
        items.append("touched")
        return seen["queries"]

    def broken() -> Any:
        raise CartError("the cart is on fire")

    def misuse(kind: str) -> Any:
        if kind == "activity":
            return ctx.activity("store.sneaky")
        if kind == "sleep":
            return ctx.sleep(5)
        if kind == "promise":
            return ctx.promise("sneaky")
        if kind == "wait":
            return ctx.wait_signal("sneaky")
        return "fine"

    async def asynchronous() -> int:
        return 1

    ctx.on_query("items", lambda: list(items))
    ctx.on_query("has", lambda item: item in items)
    ctx.on_query("touch", touch)
    ctx.on_query("broken", broken)
    ctx.on_query("misuse", misuse)
    ctx.on_query("async", asynchronous)
    ctx.on_query("opaque", object)
    ctx.on_update("add", add, validator=check)
    ctx.on_update("misuse", misuse)
    ctx.on_update("async-check", add, validator=asynchronous)
    loaded = await ctx.activity("store.load")
    items.extend(loaded)
    extra = await ctx.wait_signal("extra")
    items.append(extra)
    await ctx.wait_signal("checkout")
    return items


async def _counter(ctx: WorkflowContext, _: Any) -> Any:
    """A count the update ``inc`` raises (by 1 without an argument); returns it once the
    signal ``done`` comes, so the code reads what the updates changed."""
    state = {"count": 0}

    def inc(by: int = 1) -> int:
        state["count"] += by
        return state["count"]

    ctx.on_update("inc", inc)
    ctx.on_query("count", lambda: state["count"])
    await ctx.wait_signal("done")
    return {"count": state["count"]}


async def _counter_without_update(ctx: WorkflowContext, _: Any) -> Any:
    """``_counter`` after a deploy that removed its update handler."""
    state = {"count": 0}
    ctx.on_query("count", lambda: state["count"])
    await ctx.wait_signal("done")
    return {"count": state["count"]}


def _registry(**types: Any) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    for name, fn in types.items():
        registry.workflow(name)(fn)
    return registry


REGISTRY = _registry(cart=_cart, counter=_counter)


def _run(workflow_type: str = "cart", value: Any = None, **kwargs: Any) -> WorkflowRun:
    run = WorkflowRun(REGISTRY, workflow_type, run_id="r1", **kwargs)
    run.start(value)
    assert_status(run.record, WorkflowStatus.RUNNING)
    return run


def _record(run: WorkflowRun) -> WorkflowRecord:
    assert run.record is not None, f"workflow {run.workflow_id} has no record"
    return run.record


def _lines(events: Iterable[HistoryEvent]) -> list[str]:
    """``event_line`` plus ``update <name> <id>`` for accepted updates."""
    return [
        f"update {e.name} {e.update_id}" if isinstance(e, UpdateAccepted) else event_line(e)
        for e in events
    ]


def _query(run: WorkflowRun, name: str, value: Any = None) -> Reply:
    query = QueryWorkflow(run.workflow_id, f"q-{next(_IDS)}", name, encode_json(value), 5)
    reply = answer_query(run.record, query, run.now_ms + 1, run.registry)
    assert reply.kind is ReplyKind.QUERY and reply.request_id == query.request_id
    assert reply.workflow_id == run.workflow_id and reply.at_ms == run.now_ms + 1
    assert not reply.created
    return reply


def _value(reply: Reply) -> Any:
    assert reply.ok and reply.failure is None, f"expected an answer, observed {reply}"
    assert reply.payload is not None
    return decode_json(reply.payload)


def _failure_type(reply: Reply) -> str:
    assert not reply.ok and reply.payload is None, f"expected a failure, observed {reply}"
    assert reply.failure is not None
    return reply.failure.error_type


def _update(
    run: WorkflowRun, name: str, value: Any = None, *, update_id: str | None = None
) -> UpdateWorkflow:
    uid = update_id if update_id is not None else f"u-{next(_IDS)}"
    return UpdateWorkflow(run.workflow_id, uid, name, encode_json(value), run.now_ms)


def _signal(run: WorkflowRun, name: str, value: Any = None) -> SignalWorkflow:
    return SignalWorkflow(run.workflow_id, name, encode_json(value), f"s-{next(_IDS)}", 1)


def _update_reply(run: WorkflowRun, body: UpdateWorkflow) -> Reply:
    transition = run.last
    assert transition is not None and transition.reply is not None, "expected a reply"
    reply = transition.reply
    assert reply.kind is ReplyKind.UPDATE and reply.request_id == body.update_id
    assert reply.workflow_id == run.workflow_id and reply.at_ms == run.now_ms
    return reply


def _refused(run: WorkflowRun, body: UpdateWorkflow, reason: str, error_type: str) -> Reply:
    before = run.record
    transition = run.send(body)
    assert transition.ignored == reason, f"expected {reason!r}, observed {transition.ignored!r}"
    assert transition.record is None and transition.tasks == ()
    assert run.record is before
    reply = _update_reply(run, body)
    assert _failure_type(reply) == error_type, reply
    return reply


def _accepted(run: WorkflowRun, body: UpdateWorkflow) -> Reply:
    before = _record(run)
    transition = run.send(body)
    assert transition.ignored is None, f"update refused: {transition}"
    record = _record(run)
    assert record is transition.record and record.revision == before.revision + 1
    recorded = [e for e in record.events if isinstance(e, UpdateAccepted)]
    assert recorded and recorded[-1] == UpdateAccepted(
        body.update_id, body.name, body.args, run.now_ms
    ), _lines(record.events)
    reply = _update_reply(run, body)
    assert reply.run_id == record.run_id and reply.status == record.status.value
    return reply


# --- queries --------------------------------------------------------------------------


def test_a_query_answers_from_the_state_after_results_and_signals() -> None:
    run = _run(value=["x"])
    assert _value(_query(run, "items")) == ["x"]
    run.complete(0, ["a", "b"])
    assert _value(_query(run, "items")) == ["x", "a", "b"]
    run.send(_signal(run, "extra", "c"))
    reply = _query(run, "items")
    assert _value(reply) == ["x", "a", "b", "c"]
    assert reply.run_id == "r1" and reply.status == "RUNNING"


def test_a_query_is_called_with_its_argument_and_without_one_for_none() -> None:
    run = _run(value=["x"])
    assert _value(_query(run, "has", "x")) is True
    assert _value(_query(run, "has", "y")) is False
    # "items" takes no argument: a value is passed to it (and it fails), None is not.
    assert _failure_type(_query(run, "items", 3)) == "TypeError"
    assert _failure_type(_query(run, "has")) == "TypeError"


def test_an_unknown_query_fails_and_names_the_known_ones() -> None:
    run = _run()
    reply = _query(run, "nope")
    assert _failure_type(reply) == "UnknownQuery"
    assert reply.failure is not None
    message = reply.failure.message
    assert "'nope'" in message
    for known in ("'items'", "'has'", "'touch'", "'broken'", "'misuse'"):
        assert known in message, message
    assert reply.run_id == "r1" and reply.status == "RUNNING"


def test_a_query_handler_that_raises_fails_with_its_exception_class() -> None:
    run = _run()
    reply = _query(run, "broken")
    assert _failure_type(reply) == "CartError"
    assert reply.failure is not None and "on fire" in reply.failure.message
    assert not reply.failure.retryable
    assert_status(run.record, WorkflowStatus.RUNNING)


@pytest.mark.parametrize("kind", ["activity", "sleep", "promise", "wait"])
def test_a_query_handler_may_not_start_anything(kind: str) -> None:
    run = _run()
    before = _record(run)
    reply = _query(run, "misuse", kind)
    assert _failure_type(reply) == HandlerMisuseError.__name__ == "HandlerMisuseError"
    assert issubclass(HandlerMisuseError, ConfigurationError)
    assert run.record is before and before.status is WorkflowStatus.RUNNING
    # The workflow is not parked: the next real input is applied as ever.
    run.complete(0, ["a"])
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert _lines(_record(run).events) == ["sched 0#1 store.load", "done 0#1"]
    assert _value(_query(run, "misuse", "nothing")) == "fine"


def test_an_async_query_handler_is_refused() -> None:
    run = _run()
    reply = _query(run, "async")
    assert _failure_type(reply) == "TypeError"
    assert reply.failure is not None and "async" in reply.failure.message


def test_a_query_answer_that_is_not_json_fails() -> None:
    run = _run()
    assert _failure_type(_query(run, "opaque")) == "PayloadEncodingError"


def test_a_query_argument_that_is_not_json_fails() -> None:
    run = _run()
    query = QueryWorkflow("wf-1", "q-1", "items", Payload(b"{not json"), 5)
    reply = answer_query(run.record, query, T0, REGISTRY)
    assert _failure_type(reply) == "InvalidArgument"


def test_a_query_of_a_missing_workflow_says_not_found() -> None:
    query = QueryWorkflow("nobody", "q-1", "items", encode_json(None), 5)
    reply = answer_query(None, query, T0, REGISTRY)
    assert _failure_type(reply) == "WorkflowNotFound"
    assert (reply.request_id, reply.workflow_id, reply.run_id, reply.status) == (
        "q-1",
        "nobody",
        "",
        "",
    )


def test_a_query_of_a_workflow_whose_type_is_not_registered_fails() -> None:
    run = _run()
    query = QueryWorkflow("wf-1", "q-1", "items", encode_json(None), 5)
    reply = answer_query(run.record, query, T0, WorkflowRegistry())
    assert _failure_type(reply) == "UnknownWorkflowType"


def test_a_query_never_changes_the_record() -> None:
    run = _run(value=["x"])
    run.complete(0, ["a"])
    record = _record(run)
    copy = dataclasses.replace(record)
    before_bytes = CODEC.encode_workflow(record)
    signal = SignalWorkflow("wf-1", "extra", encode_json("c"), "s-fixed", 1)
    expected = advance(record, signal, T0 + 99_000, REGISTRY, run_id="r1")
    # The handler changes the replayed state; each query replays afresh.
    assert _value(_query(run, "touch")) == 1
    assert _value(_query(run, "touch")) == 1
    assert _value(_query(run, "items")) == ["x", "a"]
    for name in ("broken", "misuse", "nope"):
        _failure_type(_query(run, name, "activity"))
    assert record == copy and CODEC.encode_workflow(record) == before_bytes
    assert run.record is record
    # The same record object advances after the queries exactly as it did before them.
    after = advance(record, signal, T0 + 99_000, REGISTRY, run_id="r1")
    assert after == expected and after.record is not None
    assert "touched" not in _value(
        answer_query(
            after.record, QueryWorkflow("wf-1", "q", "items", encode_json(None), 5), 1, REGISTRY
        )
    )


def test_a_parked_workflow_whose_code_replays_still_answers() -> None:
    run = _run(value=["x"])
    run.complete(0, ["a"])
    stuck = park(_record(run), _signal(run, "extra"), PARKED, T0, run_id="")
    assert_status(stuck, WorkflowStatus.STUCK)
    query = QueryWorkflow("wf-1", "q-1", "items", encode_json(None), 5)
    reply = answer_query(stuck, query, T0 + 1, REGISTRY)
    assert _value(reply) == ["x", "a"]
    assert reply.status == "STUCK" and reply.run_id == "r1"


def test_the_driver_answers_an_ask_after_replaying_the_history() -> None:
    run = _run(value=["x"])
    run.complete(0, ["a"])
    record = _record(run)

    def ask(kind: str, name: str, value: Any) -> Any:
        return replay(
            _cart,
            record.workflow_id,
            record.workflow_type,
            ["x"],
            record.events,
            record.started_at_ms,
            run_id=record.run_id,
            ask=Ask(kind, name, value),
        ).answer

    answer = ask("query", "items", None)
    assert answer is not None and answer.value == ["x", "a"] and answer.error is None
    missing = ask("query", "nope", None)
    assert missing is not None and missing.missing and isinstance(missing.error, LookupError)
    rejected = ask("validate", "add", 7)
    assert rejected is not None and isinstance(rejected.error, ValueError)
    assert not rejected.missing
    passed = ask("validate", "add", "ok")
    assert passed is not None and passed.error is None and not passed.missing
    no_validator = ask("validate", "misuse", "activity")  # no validator: accepted
    assert no_validator is not None and no_validator.error is None


# --- updates --------------------------------------------------------------------------


def test_an_update_is_recorded_and_answered_with_the_handlers_value() -> None:
    run = _run(value=["x"])
    reply = _accepted(run, _update(run, "add", "y"))
    assert _value(reply) == 2
    assert reply.run_id == "r1" and reply.status == "RUNNING"
    assert _lines(_record(run).events)[-1].startswith("update add ")
    assert _value(_query(run, "items")) == ["x", "y"]


def test_an_update_runs_at_its_point_of_history_and_the_code_sees_it() -> None:
    run = _run(value=["x"])
    _accepted(run, _update(run, "add", "before-load"))
    run.complete(0, ["a"])
    _accepted(run, _update(run, "add", "before-extra"))
    run.send(_signal(run, "extra", "c"))
    assert _value(_query(run, "items")) == ["x", "before-load", "a", "before-extra", "c"]
    run.send(_signal(run, "checkout"))
    record = _record(run)
    assert_status(record, WorkflowStatus.COMPLETED)
    assert decode_json(record.result or encode_json(None)) == [
        "x",
        "before-load",
        "a",
        "before-extra",
        "c",
    ]


def test_the_code_reads_what_updates_changed_when_it_next_runs() -> None:
    run = _run("counter")
    assert _value(_accepted(run, _update(run, "inc", 5))) == 5
    assert _value(_accepted(run, _update(run, "inc"))) == 6  # no argument: the default
    assert _value(_query(run, "count")) == 6
    run.send(_signal(run, "done"))
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert decode_json(_record(run).result or encode_json(None)) == {"count": 6}


def test_a_rejected_update_records_nothing() -> None:
    run = _run(value=["x"])
    for value in (7, ""):
        reply = _refused(run, _update(run, "add", value), "update-refused", "UpdateRejected")
        assert reply.failure is not None
        assert "ValueError" in reply.failure.message and "non-empty" in reply.failure.message
        assert reply.run_id == "r1" and reply.status == "RUNNING"
    # No value: the validator is called with no argument, and this one needs one.
    reply = _refused(run, _update(run, "add"), "update-refused", "UpdateRejected")
    assert reply.failure is not None and reply.failure.message.startswith("TypeError")
    assert not any(isinstance(e, UpdateAccepted) for e in _record(run).events)
    assert _value(_query(run, "items")) == ["x"]


def test_an_async_validator_rejects_the_update() -> None:
    run = _run()
    reply = _refused(run, _update(run, "async-check", "y"), "update-refused", "UpdateRejected")
    assert reply.failure is not None and "TypeError" in reply.failure.message


def test_an_update_argument_that_is_not_json_is_refused() -> None:
    run = _run()
    body = UpdateWorkflow("wf-1", "u-bad", "add", Payload(b"\xff"), 1)
    _refused(run, body, "update-refused", "InvalidArgument")


def test_an_update_without_a_handler_is_refused_and_names_the_known_ones() -> None:
    run = _run()
    reply = _refused(run, _update(run, "remove", "y"), "update-refused", "UnknownUpdate")
    assert reply.failure is not None
    assert "'remove'" in reply.failure.message and "'add'" in reply.failure.message


def test_a_duplicate_update_id_is_answered_again_without_a_second_event() -> None:
    run = _run(value=["x"])
    first = _update(run, "add", "y", update_id="same")
    assert _value(_accepted(run, first)) == 2
    assert _value(_accepted(run, _update(run, "add", "z"))) == 3
    before = _record(run)
    transition = run.send(dataclasses.replace(first, sent_at_ms=first.sent_at_ms + 1))
    assert transition.ignored == "duplicate-update"
    assert transition.record is None and run.record is before
    reply = _update_reply(run, first)
    # The same answer as the first time: the handler's value at its point of history.
    assert _value(reply) == 2 and reply.status == "RUNNING"
    accepted = [e for e in before.events if isinstance(e, UpdateAccepted)]
    assert [e.update_id for e in accepted].count("same") == 1
    assert _value(_query(run, "items")) == ["x", "y", "z"]


def test_an_update_handler_that_raises_fails_the_update_but_not_the_workflow() -> None:
    run = _run(value=["x"])
    body = _update(run, "add", "explode")
    reply = _accepted(run, body)
    assert _failure_type(reply) == "CartError"
    assert reply.failure is not None and "explode" in reply.failure.message
    assert reply.status == "RUNNING"
    assert_status(run.record, WorkflowStatus.RUNNING)
    # Recorded: a retry gets the same failure again, from a replay.
    again = run.send(body)
    assert again.ignored == "duplicate-update" and again.reply is not None
    assert _failure_type(again.reply) == "CartError"
    # The workflow goes on.
    run.complete(0, ["a"])
    run.send(_signal(run, "extra", "c"))
    run.send(_signal(run, "checkout"))
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert decode_json(_record(run).result or encode_json(None)) == ["x", "a", "c"]


@pytest.mark.parametrize("kind", ["activity", "sleep", "promise", "wait"])
def test_an_update_handler_may_not_start_anything(kind: str) -> None:
    run = _run()
    reply = _accepted(run, _update(run, "misuse", kind))
    assert _failure_type(reply) == "HandlerMisuseError"
    assert_status(run.record, WorkflowStatus.RUNNING)
    # Nothing was scheduled for it, and every later replay meets it again harmlessly.
    assert _lines(_record(run).events)[:1] == ["sched 0#1 store.load"]
    assert len(_record(run).events) == 2
    run.complete(0, ["a"])
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert run.tasks() == []
    run.send(_signal(run, "extra", "c"))
    run.send(_signal(run, "checkout"))
    assert_status(run.record, WorkflowStatus.COMPLETED)


def test_an_update_of_a_closed_workflow_is_refused() -> None:
    run = _run("counter")
    run.send(_signal(run, "done"))
    assert_status(run.record, WorkflowStatus.COMPLETED)
    reply = _refused(run, _update(run, "inc"), "workflow-closed", "WorkflowClosed")
    assert reply.status == "COMPLETED" and reply.run_id == "r1"


def test_an_update_of_a_parked_workflow_is_refused() -> None:
    run = _run("counter")
    run.record = park(_record(run), _update(run, "inc"), PARKED, 1, run_id="")
    reply = _refused(run, _update(run, "inc"), "update-refused", "WorkflowStuck")
    assert reply.status == "STUCK"


def test_an_update_of_a_missing_workflow_is_refused() -> None:
    body = UpdateWorkflow("nobody", "u-1", "inc", encode_json(None), 1)
    transition = advance(None, body, T0, REGISTRY)
    assert transition.ignored == "update-refused" and transition.record is None
    assert transition.reply is not None
    assert _failure_type(transition.reply) == "WorkflowNotFound"
    assert (transition.reply.run_id, transition.reply.status) == ("", "")
    assert transition.reply.kind is ReplyKind.UPDATE and transition.reply.request_id == "u-1"


def test_an_update_of_a_workflow_with_a_status_from_newer_code_is_refused() -> None:
    newer = WorkflowRecord(
        "wf-1", "counter", WorkflowStatus.UNKNOWN, encode_json(None), T0, T0, 3, run_id="r1"
    )
    body = UpdateWorkflow("wf-1", "u-1", "inc", encode_json(None), 1)
    transition = advance(newer, body, T0, REGISTRY)
    assert transition.ignored == "unknown-status" and transition.record is None
    assert transition.reply is not None
    assert _failure_type(transition.reply) == "UnknownStatus"


@pytest.mark.parametrize(
    ("name", "update_id"),
    [("", "u-1"), ("a\x00b", "u-1"), ("n" * 201, "u-1"), ("inc", "")],
    ids=["empty-name", "nul-name", "long-name", "empty-id"],
)
def test_an_update_with_an_invalid_name_or_id_is_refused(name: str, update_id: str) -> None:
    run = _run("counter")
    body = UpdateWorkflow("wf-1", update_id, name, encode_json(None), 1)
    _refused(run, body, "update-refused", "InvalidUpdate")


def test_updates_share_the_quarter_of_history_kept_for_signals() -> None:
    limits = Limits(max_events=8)  # outside events may take 8 // 4 = 2
    run = _run("counter", limits=limits)
    run.send(_signal(run, "other"))
    _accepted(run, _update(run, "inc", 2))
    before = _record(run)
    reply = _refused(run, _update(run, "inc", 3), "update-refused", "UpdateTooLarge")
    assert reply.status == "RUNNING"
    assert run.record is before
    signal = run.send(_signal(run, "another"))
    assert signal.ignored == "signal-refused" and run.record is before
    assert _value(_query(run, "count")) == 2


def test_updates_alone_are_capped_too() -> None:
    run = _run("counter", limits=Limits(max_events=8))
    _accepted(run, _update(run, "inc"))
    _accepted(run, _update(run, "inc"))
    _refused(run, _update(run, "inc"), "update-refused", "UpdateTooLarge")
    assert _value(_query(run, "count")) == 2
    # The cap counts signals and updates together: a signal has no room left either.
    run.send(_signal(run, "done"))
    assert run.last is not None and run.last.ignored == "signal-refused"


def test_an_update_larger_than_a_quarter_of_the_byte_budget_is_refused() -> None:
    limits = Limits(max_record_bytes=8_000, measure=encoded_size)
    run = _run("counter", limits=limits)
    budget = limits.byte_budget(Tier.NORMAL)
    assert budget is not None
    big = "x" * (budget // 4 + 10)  # the record would fit; a quarter of it would not
    assert encoded_size(_record(run)) + len(big) + 200 < budget
    _refused(run, _update(run, "inc", big), "update-refused", "UpdateTooLarge")
    assert _value(_accepted(run, _update(run, "inc", 1))) == 1


def test_an_update_the_code_no_longer_handles_parks_the_workflow_on_replay() -> None:
    run = _run("counter")
    _accepted(run, _update(run, "inc", 4))
    run.registry = _registry(counter=_counter_without_update)  # a deploy
    transition = run.send(_signal(run, "done"))
    record = _record(run)
    assert transition.record is record
    assert_status(record, WorkflowStatus.STUCK, "NonDeterminismError")
    assert record.failure is not None and "'inc'" in record.failure.message
    # A query cannot replay it either, and says why; with the old code it still answers.
    query = QueryWorkflow("wf-1", "q-1", "count", encode_json(None), 5)
    stuck_reply = answer_query(record, query, T0, run.registry)
    assert _failure_type(stuck_reply) == "WorkflowStuck"
    assert stuck_reply.failure is not None and "NonDeterminismError" in stuck_reply.failure.message
    assert _value(answer_query(record, query, T0, REGISTRY)) == 4
    # And it takes no update while parked.
    _refused(run, _update(run, "inc"), "update-refused", "WorkflowStuck")


def test_a_run_made_by_signal_with_start_takes_updates() -> None:
    run = WorkflowRun(REGISTRY, "counter", run_id="r1")
    start = StartWorkflow("wf-1", "counter", encode_json(None), 1)
    run.send(SignalWorkflow("wf-1", "other", encode_json(None), "s-1", 1, start))
    assert_status(run.record, WorkflowStatus.RUNNING)
    assert _value(_accepted(run, _update(run, "inc", 3))) == 3
    assert task_lines(run.sent) == []
    assert _lines(_record(run).events)[0] == "signal other"


async def _cart_without_add(ctx: WorkflowContext, value: Any) -> Any:
    """``_cart`` after a deploy that removed its update handler ``add``."""
    items: list[Any] = list(value or [])
    ctx.on_query("items", lambda: list(items))
    items.extend(await ctx.activity("store.load"))
    items.append(await ctx.wait_signal("extra"))
    await ctx.wait_signal("checkout")
    return items


@pytest.mark.parametrize("deployed", ["handler-removed", "type-unregistered"])
def test_a_retried_update_is_never_answered_ok_when_its_answer_cannot_be_replayed(
    deployed: str,
) -> None:
    run = _run(value=["x"])
    body = _update(run, "add", "explode")
    assert _failure_type(_accepted(run, body)) == "CartError"
    # A deploy before the retry comes; no input has come since, so the record is RUNNING.
    registry = (
        _registry(cart=_cart_without_add) if deployed == "handler-removed" else WorkflowRegistry()
    )
    transition = advance(_record(run), body, run.now_ms + 1, registry)
    assert transition.record is None
    reply = transition.reply
    assert reply is not None and reply.request_id == body.update_id
    # The update failed: a retry must not be told it succeeded (the same failure, or a
    # failure saying the answer cannot be given now).
    assert not reply.ok, f"a failed update was answered as a success: {reply}"


# --- answers are what the handler returned, when it returned ----------------------------


async def _ledger(ctx: WorkflowContext, _: Any) -> Any:
    """Handlers that return the workflow's own mutable state, not a copy: every signal
    ``go`` adds 100 to it afterwards, and a ``finally`` block marks it every time the
    engine closes the coroutine after a replay."""
    state: dict[str, Any] = {"n": 0, "closed": 0}

    def bump(by: int) -> dict[str, Any]:
        state["n"] += by
        return state

    ctx.on_update("bump", bump)
    ctx.on_query("state", lambda: state)
    try:
        while True:
            await ctx.wait_signal("go")
            state["n"] += 100
    finally:
        state["closed"] += 1


class _Exit(BaseException):
    """Neither an Exception nor one of Python's own: what a handler must not raise."""


_NOT_EXCEPTIONS: dict[str, BaseException] = {
    "interrupt": KeyboardInterrupt("pressed"),
    "exit": SystemExit(3),
    "custom": _Exit("out"),
}


async def _fragile(ctx: WorkflowContext, _: Any) -> Any:
    """An update ``inc`` and a query ``peek`` that raise the BaseException named by their
    argument (from ``_NOT_EXCEPTIONS``), and otherwise count / read the count."""
    state = {"count": 0}

    def inc(kind: str) -> int:
        if kind in _NOT_EXCEPTIONS:
            raise _NOT_EXCEPTIONS[kind]
        state["count"] += 1
        return state["count"]

    def peek(kind: str) -> int:
        if kind in _NOT_EXCEPTIONS:
            raise _NOT_EXCEPTIONS[kind]
        return state["count"]

    ctx.on_update("inc", inc)
    ctx.on_query("peek", peek)
    await ctx.wait_signal("done")
    return state["count"]


ANSWERS = _registry(ledger=_ledger, fragile=_fragile)


def _answers_run(workflow_type: str) -> WorkflowRun:
    run = WorkflowRun(ANSWERS, workflow_type, run_id="r1")
    run.start(None)
    assert_status(run.record, WorkflowStatus.RUNNING)
    return run


def test_an_update_is_answered_with_its_value_when_the_handler_returned() -> None:
    run = _answers_run("ledger")
    body = _update(run, "bump", 1, update_id="U1")
    first = _value(_accepted(run, body))
    assert first["n"] == 1
    run.send(_signal(run, "go"))
    assert _value(_query(run, "state"))["n"] == 101
    # The retried update replays the signal that changed the same object since.
    transition = run.send(dataclasses.replace(body, sent_at_ms=body.sent_at_ms + 1))
    assert transition.ignored == "duplicate-update" and transition.record is None
    assert _value(_update_reply(run, body)) == {"n": 1, "closed": 0}
    # Nor did the coroutine's finally block, which ran after the handler, change it.
    assert first == {"n": 1, "closed": 0}


def test_a_query_is_answered_with_its_value_when_the_handler_returned() -> None:
    run = _answers_run("ledger")
    run.send(_signal(run, "go"))
    assert _value(_query(run, "state")) == {"n": 100, "closed": 0}


@pytest.mark.parametrize("kind", sorted(_NOT_EXCEPTIONS))
def test_an_update_handler_raising_a_base_exception_refuses_the_update(kind: str) -> None:
    run = _answers_run("fragile")
    before = _record(run)
    body = _update(run, "inc", kind)
    reply = _refused(run, body, "update-refused", "WorkflowDefinitionError")
    assert reply.failure is not None and "BaseException" in reply.failure.message
    assert type(_NOT_EXCEPTIONS[kind]).__name__ in reply.failure.message
    assert reply.status == "RUNNING" and run.record is before
    assert not any(isinstance(e, UpdateAccepted) for e in before.events)
    # Nothing of it stays: the same id is a new update later, and the workflow goes on.
    assert _value(_accepted(run, dataclasses.replace(body, args=encode_json("ok")))) == 1
    run.send(_signal(run, "done"))
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert decode_json(_record(run).result or encode_json(None)) == 1


@pytest.mark.parametrize("kind", sorted(_NOT_EXCEPTIONS))
def test_a_query_handler_raising_a_base_exception_gets_a_failure(kind: str) -> None:
    run = _answers_run("fragile")
    before = _record(run)
    reply = _query(run, "peek", kind)
    _failure_type(reply)
    assert reply.failure is not None and "BaseException" in reply.failure.message
    assert reply.status == "RUNNING" and run.record is before
    assert before.status is WorkflowStatus.RUNNING
    assert _value(_query(run, "peek", "fine")) == 0
    assert _value(_accepted(run, _update(run, "inc", "ok"))) == 1
