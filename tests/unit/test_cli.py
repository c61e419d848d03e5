"""The ``sagaline`` command line without a broker: parsing, one-line errors and exit codes,
times, tables and JSON, module paths from the current directory, the JSON log format, and
the pure parts of ``topics check`` and ``dlq retry``."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from confluent_kafka import KafkaError, KafkaException

from orchestrator import cli as cli_module
from orchestrator import gate
from orchestrator.admin import TopicState, expected_topics, participant_names, topic_problems
from orchestrator.cli import (
    cli,
    counts_line,
    describe_fields,
    events_table,
    format_ms,
    main,
    parse_when,
    render_fields,
    render_table,
    workflow_table,
)
from orchestrator.dlq import DeadLetterRecord, plan_retry
from orchestrator.errors import ConfigurationError
from orchestrator.logs import JsonFormatter, configure_logging, formatter, level_number
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import ActivityResult, ActivityStatus
from orchestrator.protocol.topics import Topics, history_config, inbox_config
from orchestrator.visibility import store as store_module
from orchestrator.visibility.models import EventRow, WorkflowFilter, WorkflowRow

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_714_564_800_000  # 2024-05-01T12:00:00Z


def _errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# --- parsing and exit codes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "sagaline: Missing command"),
        (["nope"], "No such command 'nope'"),
        (["start"], "sagaline start: Missing argument 'WORKFLOW_TYPE'"),
        (["start", "t", "--bogus"], "--bogus"),
        (["start", "t", "--if-running", "SOMETIMES"], "'--if-running'"),
        (["topics"], "sagaline topics: Missing command"),
        (["topics", "create", "--partitions", "0"], "'--partitions'"),
        (["topics", "create", "--min-insync-replicas", "2"], "above --replication-factor 1"),
        (["list", "--status", "DONE"], "'DONE' is not a workflow status (RUNNING, COMPLETED"),
        (["list", "--since", "yesterday"], "neither a time ago"),
        (["list", "--since", "1h", "--until", "2h"], "--since must be before --until"),
        (["list", "--limit", "0"], "'--limit'"),
        (["dlq", "retry"], "give --offset P:O (repeatable) or --all"),
        (["dlq", "retry", "--all", "--offset", "0:1"], "give --offset P:O"),
        (["dlq", "retry", "--offset", "zero"], "'zero' is not PARTITION:OFFSET"),
        (["replay", "m", "--file", "a", "--dir", "b"], "exactly one of --topic, --file or --dir"),
        (["replay", "m"], "exactly one of --topic, --file or --dir"),
        (["export", "--out", "x.avro", "stray"], "unexpected argument 'stray'"),
        (["promise", "settle", "p1"], "'settle'"),
        (["--log-level", "loud", "check", "json"], "'loud' is not a logging level"),
        (["--log-format", "xml", "check", "json"], "'--log-format'"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    lines = _errors(capsys)
    assert len(lines) == 1, lines
    assert expected in lines[0]
    assert "--help" in lines[0], "the line says where the help is"


def test_help_exits_0_and_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in (
        "orchestrator",
        "participant",
        "projector",
        "ui",
        "topics",
        "start",
        "result",
        "describe",
        "list",
        "history",
        "signal",
        "cancel",
        "terminate",
        "query",
        "update",
        "promise",
        "resume",
        "dlq",
        "check",
        "replay",
        "export",
    ):
        assert f"\n  {command} " in out, command
    assert main(["topics", "-h"]) == 0
    topics_help = capsys.readouterr().out
    assert all(f"  {c} " in topics_help for c in ("create", "describe", "check"))


def test_the_click_runner_sees_every_option_of_list() -> None:
    result = CliRunner().invoke(cli, ["list", "--help"])
    assert result.exit_code == 0
    for option in ("--type", "--status", "--id-prefix", "--since", "--until", "--limit", "--json"):
        assert option in result.output


def test_the_export_id_list_keeps_its_argparse_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """`export --workflow-id A B --workflow-id C` took every id (argparse nargs='+')."""
    seen: dict[str, Any] = {}

    def fake_export(settings: Any, out: Path, **kwargs: Any) -> tuple[int, list[Any]]:
        seen.update(kwargs)
        return 3, []

    monkeypatch.setattr(gate, "export_history", fake_export)
    argv = ["export", "--out", "x.avro", "--workflow-id", "a", "b", "--workflow-id", "c"]
    assert main(argv) == 0
    assert sorted(seen["workflow_ids"]) == ["a", "b", "c"]


def test_an_invalid_setting_is_one_line_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAGALINE_METRICS_PORT", "-1")
    assert main(["orchestrator", "examples.order_saga.workflows:registry"]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1, errors
    assert errors[0].startswith("sagaline: SAGALINE_METRICS_PORT")


def test_a_configuration_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["orchestrator", "json:dumps"]) == 2
    assert "not a WorkflowRegistry" in capsys.readouterr().err
    assert main(["participant", "no.such.module:thing"]) == 2
    assert "cannot import 'no.such.module'" in capsys.readouterr().err


def test_an_unreachable_postgres_is_one_line_without_the_dsn(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAGALINE_POSTGRES_DSN", "postgresql://ann:s3cr3t-pw@127.0.0.1:1/none")
    monkeypatch.setenv("SAGALINE_DB_CONNECT_TIMEOUT_S", "2")
    assert main(["list", "--status", "running", "--status", "Stuck"]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1, errors
    assert "cannot read the visibility tables (SAGALINE_POSTGRES_DSN)" in errors[0]
    assert "s3cr3t-pw" not in errors[0]


def test_errors_are_printed_at_every_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    """A configuration or fatal error is the command's answer: CRITICAL does not hide it."""
    assert main(["--log-level", "CRITICAL", "orchestrator", "json:dumps"]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("sagaline: json:dumps is a "), errors
    assert errors[0].endswith("not a WorkflowRegistry")


# --- times ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", NOW - 90_000),
        ("15m", NOW - 15 * 60_000),
        ("2h", NOW - 2 * 3_600_000),
        ("3d", NOW - 3 * 86_400_000),
        ("1w", NOW - 7 * 86_400_000),
        (" 2H ", NOW - 2 * 3_600_000),
        ("2024-05-01T11:00:00Z", NOW - 3_600_000),
        ("2024-05-01T13:00:00+02:00", NOW - 3_600_000),
        ("2024-05-01T11:00", NOW - 3_600_000),  # no offset: UTC
        ("2024-05-01", NOW - 12 * 3_600_000),
    ],
)
def test_since_and_until_take_relative_and_iso_times(text: str, expected: int) -> None:
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "15", "15 minutes", "-2h", "2024-13-01"])
def test_other_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="neither a time ago"):
        parse_when(text, NOW)


def test_times_are_shown_in_utc() -> None:
    assert format_ms(NOW) == "2024-05-01T12:00:00Z"
    assert format_ms(None) is None


# --- tables and JSON -----------------------------------------------------------------------


def test_a_table_aligns_its_columns_and_escapes_control_characters() -> None:
    text = render_table(
        ["id", "n", "note"], [["a", 1, None], ["long-id\x1b[2J", 22, True], ["b", 3, "x" * 80]]
    )
    lines = text.splitlines()
    assert lines[0].split() == ["id", "n", "note"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    starts = {line.index(line.split()[1], len(line.split()[0])) for line in lines[2:]}
    assert len(starts) == 1, f"the second column is not aligned:\n{text}"
    assert "\x1b" not in text and "\\x1b[2J" in text
    assert lines[2].endswith("-") and lines[3].endswith("yes")
    assert lines[4].endswith("...") and len(lines[4].split()[-1]) == 60


def test_fields_are_aligned() -> None:
    assert render_fields([("status", "RUNNING"), ("current step", None)]) == (
        "status        RUNNING\ncurrent step  -"
    )


def _row(**changes: Any) -> WorkflowRow:
    values: dict[str, Any] = {
        "workflow_id": "order-1",
        "run_id": "9f2c0a1b-0000-4000-8000-000000000000",
        "workflow_type": "order.process",
        "status": "RUNNING",
        "started_at_ms": NOW,
        "updated_at_ms": NOW + 1_000,
        "closed_at_ms": None,
        "revision": 3,
        "current_step": "activity payment.charge",
        "attempts": 2,
        "error_type": None,
        "error_message": None,
        "result": None,
        "input": '{"order_id": "order-1"}',
        "parent_workflow_id": None,
        "partition": 1,
        "offset": 17,
    }
    values.update(changes)
    return WorkflowRow(**values)


EVENTS = [
    EventRow(0, "ActivityScheduled", NOW, 0, 1, "payment.charge", {"input": "{}"}),
    EventRow(1, "ActivityFailed", NOW + 500, 0, 1, "payment.charge", {}),
]


def test_the_list_table_and_counts() -> None:
    rows = [_row(), _row(workflow_id="order-2", status="FAILED", current_step=None, error_type="X")]
    text = workflow_table(rows)
    assert "order-1" in text and "9f2c0a1b" in text and "activity payment.charge" in text
    assert "2024-05-01T12:00:00Z" in text and text.splitlines()[3].rstrip().endswith("X")
    assert counts_line({"RUNNING": 1, "FAILED": 1, "STUCK": 0}, 2, 50) == (
        "shown 2; matching by status: FAILED 1, RUNNING 1 (2 in all)"
    )
    assert "raise --limit" in counts_line({"RUNNING": 9}, 2, 2)


def test_describe_and_history_rendering() -> None:
    text = describe_fields(_row(status="FAILED", error_type="PaymentDeclined", error_message="no"))
    assert "error         PaymentDeclined: no" in text
    assert "history at    partition 1 offset 17" in text
    table = events_table(EVENTS)
    assert table.splitlines()[2].split()[:3] == ["0", "2024-05-01T12:00:00Z", "ActivityScheduled"]


class _Store:
    """The visibility store's reading API over two rows (the SQL is tested with PostgreSQL
    in tests/integration/test_cli_ops.py; this checks what the commands print)."""

    closed = False

    def __init__(self, dsn: str, *, connect_timeout_s: float = 10.0) -> None:
        self.rows = [_row(), _row(workflow_id="order-2", status="COMPLETED", result="5")]

    def list_workflows(self, flt: WorkflowFilter) -> list[WorkflowRow]:
        return [r for r in self.rows if not flt.statuses or r.status in flt.statuses]

    def count_by_status(self, flt: WorkflowFilter) -> dict[str, int]:
        return {"RUNNING": 1, "COMPLETED": 1}

    def describe(self, workflow_id: str, run_id: str | None = None) -> WorkflowRow | None:
        return next((r for r in self.rows if r.workflow_id == workflow_id), None)

    def events(self, workflow_id: str, run_id: str) -> list[EventRow]:
        return EVENTS

    def close(self) -> None:
        _Store.closed = True


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "VisibilityStore", _Store)
    _Store.closed = False


@pytest.mark.usefixtures("store")
def test_list_describe_history_print_tables_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--status", "completed"]) == 0
    out = capsys.readouterr().out
    assert "order-2" in out and "order-1" not in out and "COMPLETED 1, RUNNING 1" in out
    assert _Store.closed, "the store is closed after use"
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [w["workflow_id"] for w in listed["workflows"]] == ["order-1", "order-2"]
    assert listed["counts"] == {"RUNNING": 1, "COMPLETED": 1}
    assert main(["describe", "order-2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"] == "5"
    assert main(["history", "order-1"]) == 0
    assert "ActivityFailed" in capsys.readouterr().out
    assert main(["history", "order-1", "--json"]) == 0
    events = json.loads(capsys.readouterr().out)["events"]
    assert [e["kind"] for e in events] == ["ActivityScheduled", "ActivityFailed"]


@pytest.mark.usefixtures("store")
@pytest.mark.parametrize("command", ["describe", "history"])
def test_an_unknown_id_is_one_line_and_exit_1(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "ghost-1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "sagaline: no workflow ghost-1 in the visibility tables (is `sagaline projector` running?)"
    ]


def test_a_query_answer_is_a_table_or_json(capsys: pytest.CaptureFixture[str]) -> None:
    cli_module._print_answer({"items": ["a"], "phase": "open"}, as_json=False)
    assert capsys.readouterr().out.splitlines() == ['items  ["a"]', 'phase  "open"']
    cli_module._print_answer({"items": ["a"]}, as_json=True)
    assert json.loads(capsys.readouterr().out) == {"items": ["a"]}
    cli_module._print_answer(3, as_json=False)
    assert capsys.readouterr().out == "3\n"


# --- module paths --------------------------------------------------------------------------


def test_module_paths_import_from_the_current_directory(tmp_path: Path) -> None:
    """As an installed `sagaline` script runs: the project directory is not on sys.path
    (the script's own directory is), and there is no PYTHONPATH for it."""
    package = tmp_path / "myshop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "workflows.py").write_text(
        textwrap.dedent(
            """
            import time
            from orchestrator import WorkflowContext, WorkflowRegistry

            registry = WorkflowRegistry()


            @registry.workflow("shop.order")
            async def order(ctx: WorkflowContext, value: object) -> object:
                return time.time()
            """
        )
    )
    probe = (
        "import os, sys\n"
        "sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]\n"
        "from orchestrator.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGALINE_")}
    env["PYTHONPATH"] = str(ROOT)  # sagaline itself, as if installed; not the project
    done = subprocess.run(
        [sys.executable, "-c", probe, "check", "myshop.workflows:registry"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr  # found, and it calls the clock
    assert "time.time" in done.stdout, done.stdout


def test_importing_the_cli_loads_no_projector_ui_or_database() -> None:
    probe = (
        "import sys, orchestrator.cli\n"
        "print(' '.join(m for m in sys.modules if m.startswith(('psycopg', "
        "'orchestrator.visibility', 'confluent_kafka'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.strip() == ""


# --- logs ----------------------------------------------------------------------------------


def _record(message: str, *args: object, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("sagaline.test", logging.WARNING, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_the_json_formatter_writes_one_object_per_line_with_the_context() -> None:
    record = _record(
        "dead letter reason=%s\nsecond line",
        "malformed",
        workflow_id="order-1",
        run_id="r1",
        partition=3,
        offset=1207,
        activity_id="order-1/r1/0/1",
        unrelated="not a field",
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "sagaline.test"
    assert entry["message"] == "dead letter reason=malformed\nsecond line"
    assert entry["ts"].endswith("Z") and entry["ts"][10] == "T"
    assert (entry["workflow_id"], entry["run_id"], entry["partition"], entry["offset"]) == (
        "order-1",
        "r1",
        3,
        1207,
    )
    assert entry["activity_id"] == "order-1/r1/0/1"
    assert "unrelated" not in entry and "exc_info" not in entry


def test_the_json_formatter_keeps_the_traceback_and_odd_values() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = _record("failed", partition=b"\x01", workflow_id="w\ud800")
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert line.isascii(), "a lone surrogate must not break the stream"
    assert "RuntimeError: boom" in entry["exc_info"] and "Traceback" in entry["exc_info"]
    assert entry["partition"] == "b'\\x01'"


def test_log_levels_and_formats_are_checked() -> None:
    assert level_number("debug") == logging.DEBUG
    assert level_number("Warning") == logging.WARNING
    with pytest.raises(ValueError, match="not a logging level"):
        level_number("loud")
    assert isinstance(formatter("JSON"), JsonFormatter)
    with pytest.raises(ValueError, match="not a log format"):
        formatter("xml")


def test_configure_logging_leaves_a_configured_root_alone() -> None:
    """Under pytest the root logger has handlers: nothing is added or re-levelled."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    configure_logging("DEBUG", "json", stream=io.StringIO())
    assert (list(root.handlers), root.level) == before


def test_log_format_json_writes_json_lines_from_the_command() -> None:
    env = {**os.environ, "SAGALINE_LOG_FORMAT": "json"}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "check", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    # The error is the command's answer, one plain line whatever the log format.
    assert done.stderr.splitlines() == ["sagaline: module 'json' defines no WorkflowRegistry"]
    debug = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "--log-level", "DEBUG", "check", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = debug.stderr.splitlines()
    assert lines[0] == "sagaline: module 'json' defines no WorkflowRegistry", debug.stderr
    entries = [json.loads(line) for line in lines[1:]]
    logged = [e for e in entries if e["logger"] == "sagaline"]
    assert logged and logged[-1]["level"] == "DEBUG" and "exc_info" in logged[-1]


# --- topics check --------------------------------------------------------------------------

TOPICS = Topics("shop")
SIZE = {"max.message.bytes": "1048588"}


def _healthy() -> list[TopicState]:
    return [
        TopicState(TOPICS.inbox, 4, 3, {**inbox_config(), **SIZE, "min.insync.replicas": "2"}),
        TopicState(TOPICS.history, 4, 3, {**history_config(), "min.insync.replicas": "2"}),
        TopicState(TOPICS.dlq, 1, 3, {"cleanup.policy": "delete", "min.insync.replicas": "2"}),
        TopicState(TOPICS.replies, 4, 3, {"cleanup.policy": "delete", "min.insync.replicas": "2"}),
        TopicState(TOPICS.tasks("payment"), 4, 3, {"cleanup.policy": "delete", **SIZE}),
    ]


def test_healthy_topics_have_no_problems() -> None:
    problems = topic_problems(
        _healthy(),
        TOPICS,
        participants=["payment"],
        replication_factor=3,
        min_insync_replicas=2,
    )
    assert problems == []


def test_each_problem_is_one_line() -> None:
    states = {s.name: s for s in _healthy()}
    states[TOPICS.history] = TopicState(TOPICS.history, 6, 1, {"cleanup.policy": "delete"})
    states[TOPICS.inbox] = TopicState(
        TOPICS.inbox, 4, 3, {"cleanup.policy": "delete", "min.insync.replicas": "4"}
    )
    states[TOPICS.replies] = TopicState(
        TOPICS.replies, 4, 3, {"cleanup.policy": "delete", "max.message.bytes": "500000"}
    )
    del states[TOPICS.dlq]
    problems = topic_problems(
        states.values(),
        TOPICS,
        participants=["payment", "shipping"],
        replication_factor=3,
        min_insync_replicas=2,
    )
    assert problems == [
        "shop.inbox: min.insync.replicas is 4, above its replication factor 3: no write "
        "with acks=all can succeed",
        "shop.history: cleanup.policy is delete, expected compact (a history that deletes "
        "loses workflows)",
        "shop.history: replication factor 1, below 3",
        "shop.dlq: missing (sagaline topics create makes it)",
        "shop.replies: max.message.bytes is 500000, below 965536 (SAGALINE_MAX_RECORD_BYTES "
        "900000 plus 65536 of batch room): larger records are refused",
        "shop.tasks.shipping: missing (sagaline topics create makes it)",
        "shop.inbox has 4 partitions but shop.history has 6: they must be equal (a workflow "
        "lives in the same partition of both)",
    ]


def test_the_expected_topics_are_those_topics_create_makes() -> None:
    specs = {s.name: s for s in expected_topics(TOPICS, ["payment"])}
    assert set(specs) == {
        "shop.inbox",
        "shop.history",
        "shop.dlq",
        "shop.replies",
        "shop.tasks.payment",
    }
    assert specs["shop.history"].config["cleanup.policy"] == "compact"
    assert "partitions = inbox's" in specs["shop.history"].expectation()
    assert specs["shop.dlq"].partitions == 1


def test_participant_names_are_checked() -> None:
    assert participant_names(" a, b-2 ,,") == ["a", "b-2"]
    with pytest.raises(ConfigurationError, match=r"participant name 'pay\.ment'"):
        participant_names("pay.ment")


# --- dlq retry: what may be sent again -----------------------------------------------------


# An input sent again by `dlq retry` is decoded first: a late activity result, harmless.
RESULT = AvroCodec().encode_inbox(
    ActivityResult("order-1", "order-1/r/1", 1, 1, ActivityStatus.COMPLETED, 0, encode_json(1))
)


def _letter(reason: str, origin: str | None = TOPICS.inbox, **headers: str) -> DeadLetterRecord:
    named = {"sagaline.dlq.reason": reason, **headers}
    if origin is not None:
        named.update(
            {
                "sagaline.dlq.topic": origin,
                "sagaline.dlq.partition": "2",
                "sagaline.dlq.offset": "9",
            }
        )
    return DeadLetterRecord(
        TOPICS.dlq, 0, 5, NOW, b"order-1", RESULT, {k: v.encode() for k, v in named.items()}
    )


@pytest.mark.parametrize(
    "reason",
    ["unknown-workflow", "wrong-partition", "unknown-schema", "oversized", "undeliverable"],
)
def test_inbox_inputs_go_back_to_the_inbox(reason: str) -> None:
    decision = plan_retry(_letter(reason), TOPICS)
    assert (decision.target, decision.refusal) == (TOPICS.inbox, None)


@pytest.mark.parametrize(
    ("letter", "why"),
    [
        (_letter("malformed"), "would be dead-lettered again"),
        (_letter("key-mismatch"), "would be dead-lettered again"),
        (_letter("unknown-workflow", origin=None), "does not record the topic"),
        (_letter("malformed", origin=TOPICS.tasks("payment")), "it is a task"),
        (_letter("unknown-workflow", origin="other.inbox"), "not this deployment's inbox"),
        (
            _letter("oversized", **{"sagaline.dlq.value-dropped": "true"}),
            "the original is at shop.inbox[2]@9",
        ),
    ],
)
def test_what_cannot_be_sent_again_says_why(letter: DeadLetterRecord, why: str) -> None:
    decision = plan_retry(letter, TOPICS)
    assert decision.target is None and decision.refusal is not None and why in decision.refusal


def test_a_dead_letter_as_json() -> None:
    shown = _letter("unknown-workflow", **{"sagaline.dlq.error": "no workflow order-1"}).to_json()
    assert shown["origin"] == {"topic": "shop.inbox", "partition": 2, "offset": 9}
    assert shown["reason"] == "unknown-workflow" and shown["error"] == "no workflow order-1"
    assert shown["key"] == "order-1" and shown["value_bytes"] == len(RESULT)
    json.dumps(shown)


# --- failures of the user's code, of Kafka, of anything ------------------------------------


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("def broken(:\n", "SyntaxError("),
        ("undefined_name\n", "NameError(\"name 'undefined_name' is not defined\")"),
        ("import sys\nsys.exit(0)\n", "SystemExit(0)"),
    ],
    ids=["syntax", "name", "exit-0"],
)
def test_a_module_that_fails_to_import_is_one_line_and_exit_2(
    source: str,
    shown: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`sagaline check` gates a deployment: a module calling sys.exit(0) must not pass it."""
    name = f"broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    for argv in (["check", name], ["check", f"{name}:registry"], ["orchestrator", f"{name}:r"]):
        assert main(argv) == 2, argv
        errors = _errors(capsys)
        assert len(errors) == 1 and f"importing {argv[1]!r} failed: " in errors[0], errors
        assert shown in errors[0]
        sys.modules.pop(name, None)


def test_an_unforeseen_exception_is_one_line_and_exit_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(spec: str) -> Any:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli_module, "load_module", boom)
    assert main(["check", "anything"]) == 3
    assert _errors(capsys) == ["sagaline: RuntimeError: boom second line"]


def test_a_kafka_exception_names_the_bootstrap_variable_and_is_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unreachable() -> Any:
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "connection refused"))

    monkeypatch.setenv("SAGALINE_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setattr(cli_module, "_client", unreachable)
    assert main(["resume", "--all-stuck"]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1, errors
    assert "Kafka at 127.0.0.1:1 (SAGALINE_KAFKA_BOOTSTRAP)" in errors[0]
    assert "connection refused" in errors[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["start", "t", "--timeout", "1"],
        ["result", "w", "--timeout", "1"],
        ["query", "w", "q", "--timeout", "1"],
        ["update", "w", "u", "--timeout", "1"],
    ],
)
def test_commands_with_a_timeout_give_up_on_an_unreachable_kafka_within_it(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAGALINE_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    began = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - began < 15  # the client's own waits are 30 s
    errors = _errors(capsys)
    assert len(errors) == 1, errors
    assert "cannot reach Kafka at 127.0.0.1:1 (SAGALINE_KAFKA_BOOTSTRAP) within 1 s" in errors[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["list", "--since", "99999999999999999w"], "out of range"),
        (["list", "--until", "9999999999999d"], "out of range"),
        (["list", "--limit", str(2**63)], "'--limit'"),
        (["result", "w", "--timeout", "0"], "'--timeout'"),
        (["result", "w", "--timeout", "-1"], "'--timeout'"),
        (["result", "w", "--timeout", "nan"], "'--timeout'"),
        (["topics", "check", "--timeout", "inf"], "'--timeout'"),
        (["cancel", "w", "--wait", "-1"], "'--wait'"),
        (["export", "--out", "x", "--limit", "-3"], "'--limit'"),
        (["start", "t", "--no-wait", "--request-id", "r"], "--no-wait takes no"),
    ],
)
def test_out_of_range_numbers_are_usage_errors(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and expected in lines[0], lines
    assert "--help" in lines[0]


def test_times_out_of_postgresqls_range_are_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_when("99999999999999999w", NOW)
    assert parse_when("0001-01-01", NOW) == cli_module.MIN_MS


# --- the JSON log format keeps one object per line -------------------------------------------


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")

    __repr__ = __str__


@pytest.mark.parametrize(
    ("msg", "args", "extra", "check"),
    [
        ("offset=%d", ("seven",), {}, lambda e: e["message"] == "offset=%d args=('seven',)"),
        ("a %s", (_Unprintable(),), {}, lambda e: e["message"].startswith("a %s args=<unprint")),
        ("lag", (), {"offset": float("nan")}, lambda e: e["offset"] == "nan"),
        ("lag", (), {"partition": float("inf")}, lambda e: e["partition"] == "inf"),
        ("lag", (), {"workflow_id": b"w-1"}, lambda e: e["workflow_id"] == "b'w-1'"),
        (
            "lag",
            (),
            {"run_id": _Unprintable()},
            lambda e: e["run_id"] == "<unprintable _Unprintable>",
        ),
        ("x", (), {"offset": 3}, lambda e: e["offset"] == 3),
    ],
    ids=["bad-args", "raising-str", "nan", "inf", "bytes", "raising-extra", "plain"],
)
def test_a_record_the_json_formatter_cannot_take_as_is_is_still_one_line(
    msg: str, args: tuple[object, ...], extra: dict[str, object], check: Any
) -> None:
    record = logging.LogRecord("sagaline", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert check(entry), entry
