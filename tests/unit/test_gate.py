"""The replay gate without a broker: verdicts on records the pure engine recorded, the
summary, export files (round trips, older schema versions) and the CLI's file sources.

Each test records a history with one version of the code (``WorkflowRun`` drives the
engine as the orchestrator would) and judges it with another, as a deploy would.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import io
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import fastavro
import pydantic
import pytest

from orchestrator import WorkflowCancelledError, WorkflowContext, WorkflowRegistry, gate
from orchestrator.cli import main
from orchestrator.gate import (
    HistorySnapshot,
    Kind,
    Progress,
    ReplaySourceError,
    Verdict,
    avro_files,
    check,
    counts,
    exit_code,
    file_schema,
    gate_codec,
    judge,
    read_records,
    replay_files,
    report,
    write_records,
)
from orchestrator.protocol.codec import WORKFLOW, _inline, _load_dir, _workflow_to_avro
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    JSON_ENCODING,
    CancelWorkflow,
    Failure,
    HistoryEvent,
    ParentRef,
    Payload,
    RunRequest,
    SignalWorkflow,
    StartWorkflow,
    TerminateWorkflow,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.replay import advance
from tests.unit.conftest import T0, WorkflowRun, assert_status, history_lines

ORDER = {"order_id": "o-1", "items": ["tea"]}
TYPE = "shop.order"


class Halt(BaseException):
    """Raised by broken workflow code: a BaseException that is not an Exception."""


async def order_v1(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    reservation = await ctx.activity("inventory.reserve", order)
    charge = await ctx.activity("payment.charge", reservation)
    await ctx.activity("shipping.ship", charge)
    return {"charge": charge}


async def renamed_charge(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    reservation = await ctx.activity("inventory.reserve", order)
    charge = await ctx.activity("billing.charge", reservation)
    await ctx.activity("shipping.ship", charge)
    return {"charge": charge}


async def reserve_skipped(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    charge = await ctx.activity("payment.charge", order)
    await ctx.activity("shipping.ship", charge)
    return {"charge": charge}


async def charge_dropped(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    await ctx.activity("inventory.reserve", order)
    return {"charge": None}


async def halts(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    await ctx.activity("inventory.reserve", order)
    raise Halt("stop")


async def one_more_step(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    result = await order_v1(ctx, order)
    await ctx.activity("audit.log", result)
    return result


async def now_fails(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    await order_v1(ctx, order)
    raise ValueError("no longer accepted")


async def ignores_cancel(ctx: WorkflowContext, order: dict[str, Any]) -> str:
    try:
        await order_v1(ctx, order)
    except WorkflowCancelledError:
        return "carried on"
    return "done"


def _registry(fn: Any) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow(TYPE)(fn)
    return registry


# The registries the CLI tests load by name (several in one module: they must be named).
V1 = _registry(order_v1)
RENAMED = _registry(renamed_charge)


def _running() -> WorkflowRecord:
    """Reserved, and the charge sent: ``sched 0, done 0, sched 1``."""
    run = WorkflowRun(V1, TYPE, workflow_id="order-1", run_id="run-a")
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r-1"})
    assert run.record is not None and run.status is WorkflowStatus.RUNNING
    assert history_lines(run.record.events) == [
        "sched 0#1 inventory.reserve",
        "done 0#1",
        "sched 1#1 payment.charge",
    ]
    return run.record


def _completed() -> WorkflowRecord:
    run = WorkflowRun(V1, TYPE, workflow_id="order-2", run_id="run-b")
    run.start(ORDER)
    for seq, value in enumerate(({"reservation_id": "r-1"}, {"charge_id": "c-1"}, {})):
        run.complete(seq, value)
    assert_status(run.record, WorkflowStatus.COMPLETED)
    assert run.record is not None
    return run.record


def _stuck() -> WorkflowRecord:
    """Parked when a deploy renamed the charge: its result arrived for changed code."""
    run = WorkflowRun(V1, TYPE, workflow_id="order-3", run_id="run-c")
    run.start(ORDER)
    run.complete(0, {"reservation_id": "r-1"})
    run.registry = RENAMED
    run.complete(1, {"charge_id": "c-1"})
    assert_status(run.record, WorkflowStatus.STUCK, "NonDeterminismError")
    assert run.record is not None
    return run.record


def _assert_verdict(verdict: Verdict, kind: Kind, *fragments: str) -> None:
    assert verdict.kind is kind and all(f in verdict.message for f in fragments), (
        f"workflow {verdict.workflow_id}: expected {kind.name} with {fragments}, observed "
        f"{verdict.kind.name}: {verdict.message!r}"
    )


# --- verdicts ---------------------------------------------------------------------------


def test_the_same_code_replays_every_record() -> None:
    for record in (_running(), _completed()):
        verdict = check(record, V1)
        _assert_verdict(verdict, Kind.OK)
        assert (verdict.workflow_id, verdict.run_id, verdict.workflow_type) == (
            record.workflow_id,
            record.run_id,
            TYPE,
        )
        assert (verdict.status, verdict.events) == (record.status, len(record.events))
    assert exit_code([check(_running(), V1)]) == 0


def test_another_activity_at_a_recorded_step_diverges_naming_both() -> None:
    verdict = check(_running(), RENAMED)
    _assert_verdict(
        verdict,
        Kind.DIVERGES,
        "step 1 is activity 'billing.charge' in the code but activity 'payment.charge' in history",
    )
    assert verdict.kind.fails and exit_code([verdict]) == 1
    assert verdict.line() == (
        "DIVERGES order-1 (run run-a, shop.order, RUNNING, 3 events): " + verdict.message
    )


def test_code_that_skips_a_recorded_step_diverges() -> None:
    _assert_verdict(
        check(_running(), _registry(reserve_skipped)),
        Kind.DIVERGES,
        "step 0 is activity 'payment.charge' in the code but activity 'inventory.reserve'",
    )
    _assert_verdict(
        check(_running(), _registry(charge_dropped)),
        Kind.DIVERGES,
        "history holds step 1 ('payment.charge') that the code no longer schedules",
    )


def test_code_that_raises_a_base_exception_is_broken() -> None:
    verdict = check(_running(), _registry(halts))
    _assert_verdict(verdict, Kind.BROKEN, "WorkflowDefinitionError", "Halt")
    assert verdict.kind.fails


def test_a_closed_record_must_end_the_same_way() -> None:
    completed = _completed()
    _assert_verdict(
        check(completed, _registry(one_more_step)),
        Kind.DIVERGES,
        "history says it ended COMPLETED, but the code does not finish: it would schedule "
        "step 3 (activity 'audit.log')",
    )
    _assert_verdict(
        check(completed, _registry(now_fails)),
        Kind.DIVERGES,
        "history says it ended COMPLETED, but the code now fails",
    )
    # Open and terminated records only need to replay: the extra step is just the next one.
    _assert_verdict(check(_running(), _registry(one_more_step)), Kind.OK)
    terminated = dataclasses.replace(completed, status=WorkflowStatus.TERMINATED)
    _assert_verdict(check(terminated, _registry(one_more_step)), Kind.OK)
    # A record the engine closed at its last good state need not finish either.
    by_limits = dataclasses.replace(
        _running(),
        status=WorkflowStatus.FAILED,
        failure=Failure("RecordTooLarge", "closed at its last good state"),
        closed_at_ms=T0,
    )
    _assert_verdict(check(by_limits, V1), Kind.OK)


def test_a_cancelled_record_must_still_be_cancelled() -> None:
    run = WorkflowRun(V1, TYPE, workflow_id="order-4", run_id="run-d")
    run.start(ORDER)
    run.send(CancelWorkflow("order-4", "customer asked", run.now_ms))
    assert_status(run.record, WorkflowStatus.CANCELLED)
    assert run.record is not None
    _assert_verdict(check(run.record, V1), Kind.OK)
    _assert_verdict(
        check(run.record, _registry(ignores_cancel)),
        Kind.DIVERGES,
        "history says it ended CANCELLED, but the code now completes",
    )


def test_stuck_records_report_problems_or_that_they_would_resume() -> None:
    stuck = _stuck()
    _assert_verdict(check(stuck, RENAMED), Kind.DIVERGES, "'billing.charge' in the code")
    fixed = check(stuck, V1)
    _assert_verdict(fixed, Kind.RESUMES, "replays cleanly now", "parked with NonDeterminismError")
    assert not fixed.kind.fails
    assert fixed.line().startswith("RESUMES order-3 (run run-c, shop.order, STUCK, 4 events): ")


def test_an_unknown_type_is_broken() -> None:
    other = WorkflowRegistry()
    other.workflow("shop.refund")(order_v1)
    _assert_verdict(check(_running(), other), Kind.BROKEN, "type 'shop.order' is not registered")


def test_an_unreadable_input_is_reported_but_does_not_fail_the_gate() -> None:
    garbled = dataclasses.replace(_running(), input=Payload(b"{not json", JSON_ENCODING))
    verdict = check(garbled, V1)
    _assert_verdict(verdict, Kind.BAD_INPUT, "its input is not readable JSON")
    assert exit_code([verdict]) == 0
    # The engine closes such a start FAILED; the gate says why, whatever the status.
    run = WorkflowRun(V1, TYPE, workflow_id="order-5")
    run.start(input_payload=Payload(b"\xff", JSON_ENCODING))
    assert_status(run.record, WorkflowStatus.FAILED, "InvalidInput")
    assert run.record is not None
    _assert_verdict(check(run.record, V1), Kind.BAD_INPUT)


def test_a_status_only_newer_code_knows_is_skipped() -> None:
    newer = dataclasses.replace(_running(), status=WorkflowStatus.UNKNOWN)
    _assert_verdict(check(newer, RENAMED), Kind.SKIPPED, "newer version")
    assert exit_code([check(newer, RENAMED)]) == 0


# --- the summary --------------------------------------------------------------------------


def test_the_report_lists_each_workflow_and_groups_identical_differences() -> None:
    running = _running()
    diverging = [
        check(dataclasses.replace(running, workflow_id=f"order-{i:02}"), RENAMED) for i in range(25)
    ]
    broken = check(running, _registry(halts))
    verdicts = [check(running, V1), *diverging, broken]
    text = report(verdicts, max_lines=20)
    lines = text.splitlines()
    assert lines[:20] == [v.line() for v in diverging[:20]], text
    assert lines[20] == "  ... and 5 more with the same difference", text
    assert lines[21] == broken.line(), text
    assert lines[22] == "replayed 27 workflows: 1 ok, 25 diverge, 1 broken", text
    assert len(lines) == 23, text
    assert report([check(running, V1)]) == "replayed 1 workflow: 1 ok, 0 diverge, 0 broken"


def test_the_count_line_names_the_other_kinds_only_when_present() -> None:
    running = _running()
    verdicts = [
        check(_stuck(), V1),
        check(dataclasses.replace(running, input=Payload(b"{", JSON_ENCODING)), V1),
        check(dataclasses.replace(running, status=WorkflowStatus.UNKNOWN), V1),
    ]
    assert counts(verdicts) == (
        "replayed 2 workflows: 0 ok, 0 diverge, 0 broken, 1 would resume, 1 with unreadable "
        "input; 1 skipped (written by a newer version)"
    )


# --- export files -------------------------------------------------------------------------


def _value_of(hint: Any) -> Any:
    """A non-default value of a record field's type, so a field the file drops shows."""
    if hint is type(None):
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return (_value_of(args[0]),)
    if args:  # X | None
        return _value_of(args[0])
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return list(hint)[-1]
    if hint is Payload:
        return encode_json({"ä": [1, 2]})
    if hint is Failure:
        return Failure("Boom", "it broke", retryable=True, effects_committed=True)
    return {bool: True, int: 7, float: 1.5, str: "x-ü"}[hint]


def _every_event_kind() -> list[HistoryEvent]:
    """One event of each kind a history can hold, every field set (new kinds included)."""
    events = []
    for kind in typing.get_args(HistoryEvent):
        hints = typing.get_type_hints(kind)
        values = {f.name: _value_of(hints[f.name]) for f in dataclasses.fields(kind)}
        events.append(kind(**values))
    return events


def _full_record() -> WorkflowRecord:
    return dataclasses.replace(
        _completed(),
        workflow_id="order-ü",
        events=tuple(_every_event_kind()),
        failure=Failure("Boom", "it broke"),
        wake_at_ms=T0 + 5,
        request_id="req-1",
        earlier_requests=(RunRequest("req-0", "run-0"),),
        parent=ParentRef("parent-1", "run-p", 3),
    )


def test_an_export_file_round_trips_every_record(tmp_path: Path) -> None:
    records = [_running(), _completed(), _stuck(), _full_record()]
    assert {type(e) for e in records[-1].events} == set(typing.get_args(HistoryEvent))
    path = tmp_path / "histories.avro"
    codec = gate_codec()
    assert write_records(path, records, codec, metadata={"sagaline.topic": "t"}) == 4
    assert read_records(path, codec) == records
    # Any Avro reader takes it with the schema in its header alone.
    with path.open("rb") as stream:
        plain = fastavro.reader(stream)
        assert plain.metadata["sagaline.topic"] == "t"
        ids = [typing.cast(dict[str, Any], d)["workflow_id"] for d in plain]
    assert ids == [r.workflow_id for r in records]
    assert not list(tmp_path.glob("*.partial"))


def test_a_file_written_with_an_older_schema_is_read_into_the_current_shape(
    tmp_path: Path,
) -> None:
    archive = Path(__file__).resolve().parents[2] / "schemas" / "avro" / "archive" / "v4"
    parsed = _load_dir(archive)[WORKFLOW]
    old = fastavro.parse_schema(_inline(parsed, parsed["__named_schemas"], set()))
    record = _completed()  # nothing in it that v4 lacks
    path = tmp_path / "v4.avro"
    with path.open("wb") as stream:
        fastavro.writer(stream, old, [_workflow_to_avro(record)])
    assert json.dumps(old) != json.dumps(fastavro.parse_schema(file_schema(gate_codec())))
    assert read_records(path, gate_codec()) == [record]


def test_a_history_that_makes_no_sense_is_a_verdict_not_a_crash(tmp_path: Path) -> None:
    datum = _workflow_to_avro(_running())
    datum["events"] = [("io.sagaline.TimerFired", {"seq": 1, "at_ms": T0})] * 2
    path = tmp_path / "odd.avro"
    with path.open("wb") as stream:
        fastavro.writer(stream, fastavro.parse_schema(file_schema(gate_codec())), [datum])
    [entry] = read_records(path, gate_codec())
    assert isinstance(entry, WorkflowRecord)
    _assert_verdict(check(entry, V1), Kind.DIVERGES, "history settles step 1")


# --- the history topic's records (what the topic source does after reading) -------------


def test_a_snapshot_selects_open_workflows_and_reports_what_it_cannot_decode() -> None:
    codec = gate_codec()
    running, completed, stuck = _running(), _completed(), _stuck()
    newer = dataclasses.replace(running, workflow_id="order-9", status=WorkflowStatus.UNKNOWN)
    latest = {r.workflow_id: codec.encode_workflow(r) for r in (running, completed, stuck, newer)}
    latest["order-0"] = b"\x07not a framed record"
    latest["order-8"] = b"\x00\x00\x00\x00\x01written by a newer version"
    snapshot = HistorySnapshot("p.history", latest, records=9)
    chosen = snapshot.select(codec, include_closed=False)
    assert chosen == ["order-0", "order-1", "order-3", "order-8", "order-9"]
    assert snapshot.select(codec, include_closed=True) == sorted(latest)
    verdicts = judge(snapshot.entries(codec, chosen), V1, total=len(chosen))
    assert [(v.workflow_id, v.kind) for v in verdicts] == [
        ("order-0", Kind.BROKEN),
        ("order-1", Kind.OK),
        ("order-3", Kind.RESUMES),
        ("order-8", Kind.SKIPPED),
        ("order-9", Kind.SKIPPED),
    ]
    assert verdicts[0].line().startswith("BROKEN order-0: cannot decode: ")
    # An unknown schema id is a newer version's record, as in files: not the code's fault.
    _assert_verdict(verdicts[3], Kind.SKIPPED, "written by a newer version of sagaline")
    assert "UnknownSchemaError" in verdicts[3].message


def test_progress_is_written_at_most_once_per_interval() -> None:
    # The clock is read at the start, before each record's line and when one is written.
    ticks = iter((0.0, 0.5, 2.5, 3.0, 3.5, 4.0))
    written: list[str] = []
    progress = Progress(written.append, every_s=2.0, clock=lambda: next(ticks))
    judge([_running(), _running(), _running()], V1, total=3, progress=progress)
    # Due after the second record; the last line is always written, once.
    assert written == ["replayed 2/3", "replayed 3/3"]


def test_what_is_not_an_export_is_a_source_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.avro"
    text.write_text("not avro")
    with pytest.raises(ReplaySourceError, match="not a readable Avro file"):
        read_records(text, gate_codec())
    with pytest.raises(ReplaySourceError, match="cannot read"):
        read_records(tmp_path / "missing.avro", gate_codec())
    other = tmp_path / "other.avro"
    with other.open("wb") as stream:
        schema = {"type": "record", "name": "Other", "fields": [{"name": "a", "type": "int"}]}
        fastavro.writer(stream, fastavro.parse_schema(schema), [{"a": 1}])
    with pytest.raises(ReplaySourceError, match="holds Other records"):
        read_records(other, gate_codec())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReplaySourceError, match=r"holds no \*\.avro files"):
        avro_files(empty)
    with pytest.raises(ReplaySourceError, match="is not a directory"):
        avro_files(text)


def test_a_directory_is_replayed_file_by_file_in_name_order(tmp_path: Path) -> None:
    codec = gate_codec()
    write_records(tmp_path / "b.avro", [_running()], codec)
    write_records(tmp_path / "a.avro", [_completed()], codec)
    (tmp_path / "readme.txt").write_text("not a history")
    paths = avro_files(tmp_path)
    assert [p.name for p in paths] == ["a.avro", "b.avro"]
    out = io.StringIO()
    assert replay_files(RENAMED, paths, out) == 1
    assert out.getvalue().splitlines() == [
        f"== {tmp_path / 'a.avro'}",
        "DIVERGES order-2 (run run-b, shop.order, COMPLETED, 6 events): step 1 is activity "
        "'billing.charge' in the code but activity 'payment.charge' in history",
        "replayed 1 workflow: 0 ok, 1 diverge, 0 broken",
        f"== {tmp_path / 'b.avro'}",
        "DIVERGES order-1 (run run-a, shop.order, RUNNING, 3 events): step 1 is activity "
        "'billing.charge' in the code but activity 'payment.charge' in history",
        "replayed 1 workflow: 0 ok, 1 diverge, 0 broken",
        "== all 2 files: replayed 2 workflows: 0 ok, 2 diverge, 0 broken",
    ]
    out = io.StringIO()
    assert replay_files(V1, paths, out) == 0
    assert out.getvalue().splitlines()[-1] == (
        "== all 2 files: replayed 2 workflows: 2 ok, 0 diverge, 0 broken"
    )


# --- the command ---------------------------------------------------------------------------


def test_sagaline_replay_file_exits_by_the_verdicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "open.avro"
    write_records(path, [_running(), _stuck()], gate_codec())
    assert main(["replay", f"{__name__}:V1", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.endswith("replayed 2 workflows: 1 ok, 0 diverge, 0 broken, 1 would resume\n")
    assert main(["replay", f"{__name__}:RENAMED", "--file", str(path), "--max-lines", "0"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "  ... and 2 more with the same difference",
        "replayed 2 workflows: 0 ok, 2 diverge, 0 broken",
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["replay", __name__, "--dir", "."], "defines several (RENAMED, V1) WorkflowRegistry"),
        (["replay", "json", "--dir", "."], "defines no WorkflowRegistry"),
        (["replay", f"{__name__}:TYPE", "--dir", "."], "not a WorkflowRegistry"),
        (["replay", f"{__name__}:V1", "--file", "/nonexistent.avro"], "cannot read"),
        (["replay", f"{__name__}:V1", "--file", "x.avro", "--all"], "--all applies to --topic"),
    ],
)
def test_configuration_errors_exit_2(
    argv: list[str], expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(argv) == 2
    assert expected in caplog.text


def test_the_file_sources_load_no_kafka_client() -> None:
    probe = (
        "import sys, orchestrator.gate, orchestrator.cli\n"
        "print(' '.join(m for m in sys.modules if m.startswith(('confluent_kafka', "
        "'orchestrator.runtime'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "", f"importing the gate loaded {done.stdout.split()}"


def test_a_module_that_fails_to_import_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "gate_broken_workflows.py").write_text("raise RuntimeError('half deployed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["replay", "gate_broken_workflows", "--dir", str(tmp_path)]) == 2
    assert "importing 'gate_broken_workflows' failed: RuntimeError('half deployed')" in (
        caplog.text
    )


def test_a_run_that_continued_as_new_must_continue_again_on_replay() -> None:
    async def looping(ctx: WorkflowContext, state: Any) -> Any:
        await ctx.sleep(1)
        ctx.continue_as_new(state)

    async def finishing(ctx: WorkflowContext, state: Any) -> Any:
        await ctx.sleep(1)
        return state

    registry = WorkflowRegistry()
    registry.workflow("loop")(looping)
    first = advance(None, StartWorkflow("w", "loop", encode_json(1), 0), 1, registry, run_id="r1")
    assert first.record is not None
    woke = advance(first.record, WakeUp("w"), 1_001, registry)
    ended = woke.replaced
    assert ended is not None and ended.status is WorkflowStatus.CONTINUED_AS_NEW
    assert check(ended, registry).kind is Kind.OK
    changed = WorkflowRegistry()
    changed.workflow("loop")(finishing)
    verdict = check(ended, changed)
    assert verdict.kind is Kind.DIVERGES
    assert "ended CONTINUED_AS_NEW, but the code now completes" in verdict.message


# --- open workflows the code would end ----------------------------------------------------

HELD = "shop.held"


async def held_v1(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    reservation = await ctx.activity("inventory.reserve", order)
    await ctx.wait_signal("release")
    return await ctx.activity("payment.charge", reservation)


@dataclasses.dataclass
class Reservation:
    reservation_id: str


async def held_typed(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    # The deploy adds a result type; the results recorded by v1 do not fit it.
    reservation = await ctx.activity("inventory.reserve", order, result_type=Reservation)
    await ctx.wait_signal("release")
    return await ctx.activity("payment.charge", reservation)


async def held_renamed(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    reservation = await ctx.activity("inventory.reserve", order)
    await ctx.wait_signal("release")
    return await ctx.activity("billing.charge", reservation)


async def held_halts(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    await ctx.activity("inventory.reserve", order)
    await ctx.wait_signal("release")
    raise Halt("half deployed")


async def held_released(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    reservation = await ctx.activity("inventory.reserve", order)
    await ctx.wait_signal("release")
    return reservation


async def held_loops(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    await ctx.activity("inventory.reserve", order)
    ctx.continue_as_new(order)


def _held_registry(fn: Any) -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow(HELD)(fn)
    return registry


def _held(registry: WorkflowRegistry | None = None) -> WorkflowRun:
    """Reserved (v1's result, without ``reservation_id``), waiting for the release."""
    run = WorkflowRun(
        registry or _held_registry(held_v1), HELD, workflow_id="order-7", run_id="run-7"
    )
    run.start(ORDER)
    run.complete(0, {"id": "r-1"})
    assert run.status is WorkflowStatus.RUNNING
    return run


def _release(run: WorkflowRun) -> None:
    run.send(SignalWorkflow("order-7", "release", encode_json(None), "s-1", run.now_ms))


def test_an_open_workflow_the_new_code_would_end_on_its_recorded_history_diverges() -> None:
    record = _held().record
    assert record is not None
    verdict = check(record, _held_registry(held_typed))
    # What the deploy does to it: at its next input (the release signal), the engine
    # replays the new code, the await raises PayloadEncodingError and the workflow closes
    # FAILED, where v1 would have charged the card.
    run = _held()
    run.registry = _held_registry(held_typed)
    _release(run)
    assert_status(run.record, WorkflowStatus.FAILED, "PayloadEncodingError")
    _assert_verdict(
        verdict,
        Kind.DIVERGES,
        "the code now ends it where history shows it still running (its next input would "
        "close it): it fails with PayloadEncodingError: Reservation: missing field "
        "'reservation_id'",
    )
    assert exit_code([verdict]) == 1
    _assert_verdict(
        check(record, _held_registry(held_loops)),
        Kind.DIVERGES,
        "still running (its next input would close it): it continues as new",
    )
    # Code that waits where v1 waited, or goes on past history, is the next step.
    _assert_verdict(check(record, _held_registry(held_released)), Kind.OK)


def _parked(parking: Any) -> WorkflowRun:
    """Parked by a deploy of ``parking`` when the release arrived (held_halts), or when
    the charge's result arrived (held_renamed)."""
    run = _held()
    if parking is held_halts:
        run.registry = _held_registry(held_halts)
        _release(run)
        assert_status(run.record, WorkflowStatus.STUCK, "WorkflowDefinitionError")
    else:
        _release(run)
        run.registry = _held_registry(parking)
        run.complete(1, {"charge_id": "c-1"})
        assert_status(run.record, WorkflowStatus.STUCK, "NonDeterminismError")
    return run


def test_a_stuck_workflow_may_end_on_the_input_it_was_parked_at_but_not_before() -> None:
    # Parked at the release: history holds the signal, which no code has run past yet.
    at_release = _parked(held_halts).record
    assert at_release is not None
    _assert_verdict(check(at_release, _held_registry(held_v1)), Kind.RESUMES)
    _assert_verdict(
        check(at_release, _held_registry(held_released)),
        Kind.RESUMES,
        "replays cleanly now and ends on resume: it completes; parked with WorkflowDefinitionError",
    )
    # Ending at the reservation, which v1 waited after, is what no resume should do.
    _assert_verdict(
        check(at_release, _held_registry(held_typed)),
        Kind.DIVERGES,
        "the code now ends it before the input it was parked at, where history shows it "
        "still running: it fails with PayloadEncodingError",
    )
    # Parked at the charge's result: a rollback resumes it and it completes.
    at_charge = _parked(held_renamed).record
    assert at_charge is not None
    _assert_verdict(
        check(at_charge, _held_registry(held_v1)),
        Kind.RESUMES,
        "replays cleanly now and ends on resume: it completes; parked with NonDeterminismError",
    )


# --- terminated workflows -----------------------------------------------------------------


def test_a_workflow_terminated_because_it_was_stuck_does_not_fail_the_gate() -> None:
    # The usual way out of STUCK (terminate it, as evolution.md advises) must not leave a
    # record that fails `replay --topic --all` for the closed retention: no code runs a
    # TERMINATED workflow again.
    run = _parked(held_renamed)
    run.send(TerminateWorkflow("order-7", "operator gave up on it", run.now_ms))
    assert_status(run.record, WorkflowStatus.TERMINATED)
    assert run.record is not None
    verdict = check(run.record, _held_registry(held_renamed))
    _assert_verdict(
        verdict,
        Kind.TERMINATED,
        "never runs again; the code would diverge: step 1 is activity 'billing.charge'",
    )
    assert not verdict.kind.fails and exit_code([verdict]) == 0
    assert verdict.line().startswith("TERMINATED order-7 (run run-7, shop.held, TERMINATED, ")
    gone = check(run.record, _registry(order_v1))  # its type is no longer registered
    _assert_verdict(gone, Kind.TERMINATED, "the code would not run it: type 'shop.held'")
    assert counts([verdict, gone, check(run.record, _held_registry(held_v1))]) == (
        "replayed 3 workflows: 1 ok, 0 diverge, 0 broken, 2 terminated (would not replay)"
    )


# --- one line per workflow ----------------------------------------------------------------


@pytest.mark.parametrize("odd", ["\n", "\r", "\x0b", "\x1c", "\x85", "\u2028", "\x1b[2K"])
def test_the_report_has_one_line_per_workflow_whatever_its_id(odd: str) -> None:
    # Ids are not validated (a client may start "a\nb"): the report escapes them, as it
    # does types, run ids and messages, so a CI job reading it line by line sees one
    # line per workflow.
    record = _held().record
    assert record is not None
    weird = dataclasses.replace(
        record,
        workflow_id=f"order-1{odd}replayed 0 workflows",
        run_id=f"run{odd}7",
        workflow_type=f"shop{odd}held",
    )
    registry = WorkflowRegistry()
    registry.workflow(weird.workflow_type)(held_typed)
    verdict = check(weird, registry)
    assert verdict.kind is Kind.DIVERGES
    lines = report([verdict]).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"DIVERGES order-1{odd.encode('unicode_escape').decode()}")
    assert "\x1b" not in lines[0]


# --- export files written by a newer version ----------------------------------------------


def _newer_schema(**branch: Any) -> dict[str, Any]:
    """The current file schema with one more history event kind, as a newer version's."""
    newer = copy.deepcopy(file_schema(gate_codec()))
    events = next(f for f in newer["fields"] if f["name"] == "events")
    events["type"]["items"].append(
        {"type": "record", "name": "io.sagaline.FutureEvent", "fields": [branch]}
    )
    return newer


def test_an_export_with_one_record_of_a_newer_event_kind_is_judged_record_by_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _held().record
    assert first is not None
    second = dataclasses.replace(first, workflow_id="order-8")
    datums = [_workflow_to_avro(r) for r in (first, second)]
    datums[1]["events"] = [*datums[1]["events"], ("io.sagaline.FutureEvent", {"seq": 9})]
    path = tmp_path / "newer.avro"
    with path.open("wb") as out:
        newer = _newer_schema(name="seq", type="long")
        fastavro.writer(out, fastavro.parse_schema(newer), datums)
    entries = read_records(path, gate_codec())
    assert entries[0] == first
    skipped = entries[1]
    assert isinstance(skipped, Verdict)
    _assert_verdict(
        skipped,
        Kind.SKIPPED,
        "written by a newer version of sagaline (it holds io.sagaline.FutureEvent, unknown "
        "here); not replayed",
    )
    assert skipped.line().startswith("SKIPPED order-8 (run run-7, shop.held): ")
    registry_path = f"{__name__}:V1"  # any registry: neither record is shop.order's
    assert main(["replay", registry_path, "--file", str(path)]) == 1  # shop.held: BROKEN
    assert capsys.readouterr().out.endswith(
        "replayed 1 workflow: 0 ok, 0 diverge, 1 broken; 1 skipped (written by a newer version)\n"
    )


# --- the commands' exit codes ---------------------------------------------------------------


def test_sagaline_export_exits_3_when_it_crashes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Exit 1 says "some records could not be decoded": a KafkaException from the consumer
    # mid-read or a fastavro error from the writer must not say that.
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("broker connection lost mid-read")

    monkeypatch.setattr(gate, "export_history", broken)
    assert main(["export", "--out", str(tmp_path / "x.avro")]) == 3
    assert "export failed" in caplog.text
    assert "broker connection lost mid-read" in caplog.text


@pytest.mark.parametrize("raised", ["SystemExit(0)", "SystemExit(1)", "GeneratorExit()"])
def test_a_module_that_exits_while_imported_is_a_configuration_error(
    raised: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # sys.exit(0) at import must not end the gate with exit 0 (a pass).
    name = f"gate_exiting_{raised[:4].lower()}_{raised[-2]}"
    (tmp_path / f"{name}.py").write_text(f"raise {raised}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in (name, f"{name}:registry"):
        sys.modules.pop(name, None)
        assert main(["replay", spec, "--dir", str(tmp_path)]) == 2
        assert f"importing {spec!r} failed: {raised}" in caplog.text


# --- conversions that raise a BaseException -------------------------------------------------


class Picky(pydantic.BaseModel):
    x: int

    @pydantic.field_validator("x")
    @classmethod
    def _not_13(cls, x: int) -> int:
        if x == 13:
            raise Halt("unlucky")
        return x


async def picky(ctx: WorkflowContext, value: Picky) -> int:
    await ctx.sleep(1)
    return value.x


def test_a_validator_base_exception_is_a_definition_problem_not_a_gate_bug() -> None:
    # The input's validator raising a BaseException is a problem of the workflow's code
    # (replay() parks it), not a failure of the replay that sagaline should be told of.
    run = WorkflowRun(_held_registry(held_v1), HELD, workflow_id="order-9", run_id="run-9")
    run.start({"x": 13})
    assert run.record is not None
    verdict = check(run.record, _held_registry(picky))
    assert verdict.kind is Kind.BROKEN
    assert "please report it" not in verdict.message, verdict.message
