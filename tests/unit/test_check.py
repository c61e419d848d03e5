"""The static determinism check (``sagaline check``): what it flags in workflow code, where,
with which advice, what it leaves alone, and the command's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.check import advice_for, check_registry, format_report
from orchestrator.cli import main
from tests.unit import nondeterministic_workflows as bad

SOURCE = Path(bad.__file__).read_text().splitlines()


def _line_of(text: str) -> int:
    """The 1-based line of the fixture that holds ``text`` (exactly one does)."""
    found = [number for number, line in enumerate(SOURCE, start=1) if text in line]
    assert len(found) == 1, (text, found)
    return found[0]


def test_every_kind_of_call_is_flagged_at_its_line_with_the_ctx_method_to_use() -> None:
    findings = check_registry(bad.registry)
    got = {(f.workflow, f.line, f.call) for f in findings}
    assert got == {
        ("bad.clock", _line_of("return time.time()  # reached"), "time.time()"),
        ("bad.clock", _line_of("datetime.now()"), "datetime.datetime.now()"),
        ("bad.clock", _line_of("monotonic()"), "time.monotonic()"),
        ("bad.clock", _line_of("dt.date.today()"), "datetime.date.today()"),
        ("bad.clock", _line_of("asyncio.sleep(1)"), "asyncio.sleep()"),
        ("bad.random", _line_of("rnd.choice"), "random.choice()"),
        ("bad.random", _line_of("uuid.uuid4()"), "uuid.uuid4()"),
        ("bad.random", _line_of('os.environ["REGION"]'), "os.environ"),
        ("bad.random", _line_of("lambda: rnd.random()"), "random.random()"),
        ("bad.io", _line_of('open("/etc/hostname")'), "open()"),
        ("bad.io", _line_of("threading.Thread("), "threading.Thread()"),
        ("bad.io", _line_of("asyncio.gather("), "asyncio.gather()"),
    }
    advice = {f.call: f.advice for f in findings}
    assert advice["datetime.datetime.now()"].startswith("ctx.now()")
    assert advice["asyncio.sleep()"].startswith("await ctx.sleep(seconds)")
    assert advice["random.choice()"].startswith("ctx.random()")
    assert advice["uuid.uuid4()"].startswith("ctx.uuid4()")
    assert advice["open()"].startswith("ctx.activity(...)")
    assert advice["asyncio.gather()"] == "ctx.gather(...)"
    assert all(f.path.endswith("nondeterministic_workflows.py") for f in findings)
    # file:line:column, the call, the advice
    first = str(findings[0])
    assert f":{findings[0].line}:{findings[0].column + 1}: workflow " in first


def test_helpers_no_workflow_calls_exempt_lines_and_ctx_methods_are_not_flagged() -> None:
    findings = check_registry(bad.registry)
    lines = {f.line for f in findings}
    assert _line_of("# never called by a workflow") not in lines
    assert _line_of("# sagaline: allow") not in lines
    assert not [f for f in findings if f.workflow == "good.exempt"]


def test_a_nested_workflow_function_is_read_from_its_own_lines() -> None:
    registry = WorkflowRegistry()

    def make() -> None:
        @registry.workflow("nested")
        async def nested(ctx: WorkflowContext, _: object) -> object:
            import random  # noqa: PLC0415 - a function-local import is resolved too

            return random.random()

    make()
    (finding,) = check_registry(registry)
    assert finding.call == "random.random()"
    assert "return random.random()" in Path(__file__).read_text().splitlines()[finding.line - 1]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("time.time", "ctx.now()"),
        ("secrets.token_hex", "an activity"),
        ("requests.get", "ctx.activity(...)"),
        ("concurrent.futures.ThreadPoolExecutor", "ctx.gather(...)"),
        ("asyncio.run", "ctx.gather"),
    ],
)
def test_advice_by_qualified_name(name: str, expected: str) -> None:
    advice = advice_for(name)
    assert advice is not None and advice.startswith(expected)


def test_names_that_are_fine_get_no_advice() -> None:
    for name in ("json.dumps", "math.sqrt", "datetime.timedelta", "orchestrator.Saga"):
        assert advice_for(name) is None


def test_the_examples_and_the_test_workflows_are_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "examples.order_saga.workflows", "tests.integration.control:registry"])
    assert code == 0
    assert "no non-deterministic calls found" in capsys.readouterr().out


def test_the_command_exits_1_with_a_line_per_finding(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "tests.unit.nondeterministic_workflows"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "12 call(s) in 3 workflow(s) can make a replay diverge"
    assert len(out) == 13 and all("workflow 'bad." in line for line in out[:-1])
    assert format_report([]) == "no non-deterministic calls found"


def test_the_command_refuses_what_is_not_a_registry() -> None:
    assert main(["check", "json"]) == 2  # defines no WorkflowRegistry
    assert main(["check", "json:dumps"]) == 2
    assert main(["check", "no.such.module"]) == 2
