"""A static determinism check of workflow code: ``sagaline check MODULE``.

Workflow code is replayed from its history, so anything it asks of the world directly (the
clock, random numbers, uuids, files, the network, threads, asyncio) can differ between the
first run and a replay. This module reads the source of every registered workflow function
(its nested functions and lambdas, such as query and update handlers, and the functions of
its own module it calls, followed transitively) and reports each such call with its file,
line and the ``ctx`` method to use instead.

It is a static check: it resolves names through the module's imports and flags calls by
their qualified name, so it finds ``time.time()``, ``from time import time``, ``import
random as r; r.random()`` and ``datetime.now()`` after ``from datetime import datetime``;
it cannot see through values passed in at run time (a clock handed to the workflow as an
argument) or code in other modules. A line can be exempted with a ``# sagaline: allow``
comment.
"""

from __future__ import annotations

import ast
import inspect
import os
import textwrap
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from orchestrator.workflow import WorkflowRegistry

ALLOW_COMMENT: Final = "# sagaline: allow"

_NOW: Final = "ctx.now() (the time of the input being replayed)"
_SLEEP: Final = "await ctx.sleep(seconds) or ctx.sleep_until(when)"
_RANDOM: Final = "ctx.random() (the same numbers on every replay of the run)"
_UUID: Final = "ctx.uuid4() (the same ids on every replay of the run)"
_IO: Final = "ctx.activity(...): I/O belongs in a participant"
_THREADS: Final = "ctx.gather(...) or ctx.first(...) over steps; no threads in workflow code"
_ASYNCIO: Final = "ctx.gather, ctx.first, ctx.sleep or handle.with_timeout"
_ENV: Final = "the workflow's input, or an activity (the environment changes between deploys)"

# Qualified names of calls (and of a few attributes) that make replay diverge.
EXACT: Final[dict[str, str]] = {
    "time.time": _NOW,
    "time.time_ns": _NOW,
    "time.monotonic": _NOW,
    "time.monotonic_ns": _NOW,
    "time.perf_counter": _NOW,
    "time.perf_counter_ns": _NOW,
    "time.process_time": _NOW,
    "time.localtime": _NOW,
    "time.gmtime": _NOW,
    "time.ctime": _NOW,
    "datetime.datetime.now": _NOW,
    "datetime.datetime.utcnow": _NOW,
    "datetime.datetime.today": _NOW,
    "datetime.date.today": _NOW,
    "time.sleep": _SLEEP,
    "asyncio.sleep": _SLEEP,
    "asyncio.gather": "ctx.gather(...)",
    "asyncio.wait": "ctx.first(...) or ctx.gather(...)",
    "asyncio.wait_for": "handle.with_timeout(seconds)",
    "asyncio.timeout": "handle.with_timeout(seconds)",
    "asyncio.create_task": "start the step without awaiting it, then ctx.gather or ctx.first",
    "asyncio.ensure_future": "start the step without awaiting it, then ctx.gather or ctx.first",
    "uuid.uuid1": _UUID,
    "uuid.uuid4": _UUID,
    "os.urandom": _RANDOM,
    "os.getenv": _ENV,
    "os.getpid": _ENV,
    "os.system": _IO,
    "os.popen": _IO,
    "os.listdir": _IO,
    "os.remove": _IO,
    "open": _IO,
    "input": _IO,
    "io.open": _IO,
}
# Names flagged when merely read, not only called.
ATTRIBUTES: Final[dict[str, str]] = {"os.environ": _ENV}
# Module prefixes: every call into these modules is flagged.
PREFIXES: Final[tuple[tuple[str, str], ...]] = (
    ("random.", _RANDOM),
    ("numpy.random.", _RANDOM),
    ("secrets.", "an activity (secrets must not be replayed)"),
    ("threading.", _THREADS),
    ("concurrent.futures.", _THREADS),
    ("multiprocessing.", _THREADS),
    ("asyncio.", _ASYNCIO),
    ("socket.", _IO),
    ("subprocess.", _IO),
    ("shutil.", _IO),
    ("urllib.request.", _IO),
    ("http.client.", _IO),
    ("requests.", _IO),
    ("httpx.", _IO),
    ("aiohttp.", _IO),
    ("psycopg.", _IO),
    ("psycopg2.", _IO),
    ("sqlite3.", _IO),
    ("smtplib.", _IO),
    ("confluent_kafka.", _IO),
    ("boto3.", _IO),
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One call in workflow code that can make a replay diverge."""

    path: str
    line: int
    column: int
    workflow: str
    call: str
    advice: str

    def __str__(self) -> str:
        return (
            f"{self.path}:{self.line}:{self.column + 1}: workflow {self.workflow!r} uses "
            f"{self.call}: use {self.advice}"
        )


def advice_for(qualified: str) -> str | None:
    """What to use instead of ``qualified`` (e.g. ``time.time``), or None if it is fine."""
    found = EXACT.get(qualified)
    if found is not None:
        return found
    for prefix, advice in PREFIXES:
        if qualified.startswith(prefix):
            return advice
    return None


def check_registry(registry: WorkflowRegistry) -> list[Finding]:
    """Every finding in the workflows of ``registry``, in file and line order."""
    findings: list[Finding] = []
    for name in sorted(registry.names()):
        fn = registry.get(name)
        if fn is not None:
            findings.extend(check_function(fn, name))
    return sorted(set(findings), key=lambda f: (f.path, f.line, f.column, f.workflow))


def check_function(fn: Callable[..., Any], workflow: str) -> list[Finding]:
    """The findings in ``fn`` (workflow type ``workflow``) and in the functions of its own
    module it calls.

    Raises:
        ValueError: the source of ``fn`` cannot be read (a built-in, a compiled module).
    """
    module = inspect.getmodule(fn)
    if module is None:
        raise ValueError(f"workflow {workflow!r}: cannot tell which module defines it")
    context = _ModuleContext.of(module)
    findings: list[Finding] = []
    seen: set[str] = set()
    pending: list[ast.AST] = []
    node = context.functions.get(fn.__name__)
    if node is None or getattr(fn, "__qualname__", fn.__name__) != fn.__name__:
        node = _parse_function(fn)
    pending.append(node)
    seen.add(fn.__name__)
    while pending:
        current = pending.pop()
        for finding, called in _scan(current, context, workflow):
            if finding is not None:
                findings.append(finding)
            if called is not None and called not in seen:
                seen.add(called)
                pending.append(context.functions[called])
    return findings


class _ModuleContext:
    """What names mean in one module: its imports and its top-level functions."""

    def __init__(
        self,
        path: str,
        lines: list[str],
        aliases: dict[str, str],
        functions: dict[str, ast.AST],
    ) -> None:
        self.path = path
        self.lines = lines
        self.aliases = aliases
        self.functions = functions

    @classmethod
    def of(cls, module: types.ModuleType) -> _ModuleContext:
        try:
            source = inspect.getsource(module)
            path = _shown_path(inspect.getsourcefile(module) or module.__name__)
        except (OSError, TypeError) as exc:
            raise ValueError(f"cannot read the source of {module.__name__}: {exc}") from exc
        tree = ast.parse(source, filename=path)
        aliases = dict(_imports(tree))
        functions: dict[str, ast.AST] = {
            node.name: node
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        return cls(path, source.splitlines(), aliases, functions)


def _shown_path(path: str) -> str:
    """``path`` relative to the current directory when it is below it."""
    relative = os.path.relpath(path) if os.path.isabs(path) else path
    return path if relative.startswith("..") else relative


def _parse_function(fn: Callable[..., Any]) -> ast.AST:
    """The AST of a function that is not at the top of its module, at its real lines."""
    try:
        lines, start = inspect.getsourcelines(fn)
    except (OSError, TypeError) as exc:
        raise ValueError(f"cannot read the source of {fn!r}: {exc}") from exc
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, start - 1)
    return tree


def _imports(tree: ast.AST) -> Iterator[tuple[str, str]]:
    """(local name, qualified name) of every import in ``tree``, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname is not None:
                    yield alias.asname, alias.name
                else:
                    head = alias.name.split(".")[0]
                    yield head, head
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                yield alias.asname or alias.name, f"{node.module}.{alias.name}"


def _scan(
    node: ast.AST, context: _ModuleContext, workflow: str
) -> Iterator[tuple[Finding | None, str | None]]:
    """Findings in ``node``, and the module's own functions it calls."""
    local = dict(context.aliases)
    local.update(_imports(node))
    for child in ast.walk(node):
        if isinstance(child, ast.Attribute) and isinstance(child.ctx, ast.Load):
            # os.environ[...] is a read, not a call.
            read = _qualified(child, local)
            if read in ATTRIBUTES and not _allowed(context, child):
                finding = Finding(
                    context.path, child.lineno, child.col_offset, workflow, read, ATTRIBUTES[read]
                )
                yield finding, None
            continue
        if not isinstance(child, ast.Call):
            continue
        target = child.func
        qualified = _qualified(target, local)
        if qualified is None:
            if (
                isinstance(child, ast.Call)
                and isinstance(target, ast.Name)
                and target.id in context.functions
                and target.id not in local
            ):
                yield None, target.id
            continue
        advice = advice_for(qualified)
        if advice is None or _allowed(context, child):
            continue
        finding = Finding(
            context.path, child.lineno, child.col_offset, workflow, f"{qualified}()", advice
        )
        yield finding, None


def _qualified(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The dotted name an expression refers to through the imports, or None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    base = aliases.get(node.id)
    if base is None:
        if not parts and node.id in ("open", "input") and node.id not in aliases:
            return node.id  # the builtins
        return None
    return ".".join([base, *reversed(parts)])


def _allowed(context: _ModuleContext, node: ast.AST) -> bool:
    line = getattr(node, "lineno", 0)
    return 0 < line <= len(context.lines) and ALLOW_COMMENT in context.lines[line - 1]


def registries_in(module: types.ModuleType) -> list[WorkflowRegistry]:
    """The workflow registries a module defines (its globals that are registries)."""
    return [value for value in vars(module).values() if isinstance(value, WorkflowRegistry)]


def format_report(findings: Iterable[Finding]) -> str:
    """One line per finding, and a summary line."""
    found = list(findings)
    lines = [str(f) for f in found]
    workflows = len({f.workflow for f in found})
    if found:
        lines.append(f"{len(found)} call(s) in {workflows} workflow(s) can make a replay diverge")
    else:
        lines.append("no non-deterministic calls found")
    return "\n".join(lines)


__all__ = [
    "ALLOW_COMMENT",
    "Finding",
    "advice_for",
    "check_function",
    "check_registry",
    "format_report",
    "registries_in",
]
