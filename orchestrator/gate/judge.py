"""The replay gate's verdicts: would the code deployed now replay the recorded workflows
the same way?

``sagaline replay`` runs each recorded workflow's code over its history exactly as an
orchestrator does after every input (``replay.driver.replay``) and reports every workflow
that would diverge, naming the first command that differs, so a CI job or a deploy
pipeline can refuse code that would park running workflows as ``STUCK``, or end them where
the code that ran them went on. Its sources: the
live history topic (the last record of every workflow, read like a restore reads it), a
file written by ``sagaline export`` (an Avro Object Container File of ``WorkflowRecord``
that any Avro tool reads), or a directory of such files.

Rules of this module:
- Judging a record (:func:`check`) is pure: a record and a registry in, a :class:`Verdict`
  out; no Kafka, no clock. Every record gets a verdict; nothing workflow code does and
  nothing a record holds makes it raise.
- A verdict fails the gate only when running the code would change what happens to the
  workflow (``DIVERGES``) or the code cannot run it at all (``BROKEN``). An input no code
  can read, or a record written by a newer version, is reported but is not the code's
  fault; nor is a ``TERMINATED`` workflow the code would not replay (it never runs again).
- A report has one line per workflow listed, whatever its id, type or message hold:
  control characters and line breaks are escaped.
- Only the history topic source talks to Kafka, and imports it when it is used, so the
  file sources need no broker and no Kafka client.
"""

from __future__ import annotations

import enum
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from orchestrator.errors import (
    ConfigurationError,
    HistoryLimitExceededError,
    RecordTooLargeError,
    WorkflowCancelledError,
)
from orchestrator.protocol.failures import (
    MAX_MESSAGE_CHARS,
    MAX_NAME_CHARS,
    describe,
    failure_from_exception,
    safe_text,
)
from orchestrator.protocol.records import HistoryEvent, WorkflowRecord, WorkflowStatus
from orchestrator.replay.driver import NONDETERMINISM, ReplayResult, describe_command, replay
from orchestrator.workflow import WorkflowRegistry

DEFAULT_MAX_LINES: Final = 20
"""Workflows listed per distinct message; the rest are counted."""
PROGRESS_EVERY_S: Final = 2.0
# How much of the error a workflow would now end with its verdict quotes.
_ERROR_CHARS: Final = 200
# A FAILED record with one of these failures may have been closed by the engine at its last
# good state (nothing the code asked for fitted) rather than by its code: its code need not
# finish on replay.
_CLOSED_BY_LIMITS: Final = frozenset(
    (RecordTooLargeError.ERROR_TYPE, HistoryLimitExceededError.ERROR_TYPE)
)
# Records whose code ended them: a replay must end the same way.
_ENDED_BY_CODE: Final = frozenset(
    (
        WorkflowStatus.COMPLETED,
        WorkflowStatus.FAILED,
        WorkflowStatus.COMPENSATED,
        WorkflowStatus.COMPENSATION_FAILED,
        WorkflowStatus.CANCELLED,
        WorkflowStatus.CONTINUED_AS_NEW,
    )
)


class ReplaySourceError(ConfigurationError):
    """A history source cannot be read: a file that is not an export, Kafka out of reach."""


class Kind(enum.Enum):
    """What replaying one workflow showed; the value is how the summary counts it."""

    OK = "ok"
    RESUMES = "would resume"
    DIVERGES = "diverge"
    BROKEN = "broken"
    BAD_INPUT = "with unreadable input"
    TERMINATED = "terminated (would not replay)"
    SKIPPED = "skipped"

    @property
    def fails(self) -> bool:
        """True if this verdict fails the gate."""
        return self in (Kind.DIVERGES, Kind.BROKEN)


# The order the summary lists kinds in: what fails the gate first.
_ORDER: Final = (
    Kind.DIVERGES,
    Kind.BROKEN,
    Kind.BAD_INPUT,
    Kind.RESUMES,
    Kind.TERMINATED,
    Kind.SKIPPED,
    Kind.OK,
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The gate's verdict on one recorded workflow.

    ``status`` is None for a record that could not be decoded; ``events`` is the number
    of history events replayed.
    """

    workflow_id: str
    run_id: str
    workflow_type: str
    status: WorkflowStatus | None
    kind: Kind
    message: str
    events: int

    def line(self) -> str:
        """``DIVERGES order-17 (run abc, order.process, RUNNING, 12 events): step 3 is ...``;
        always one line (see :func:`one_line`)."""
        parts = [f"run {one_line(self.run_id, MAX_NAME_CHARS)}"] if self.run_id else []
        if self.workflow_type:
            parts.append(one_line(self.workflow_type, MAX_NAME_CHARS))
        if self.status is not None:
            parts.extend(
                (self.status.value, f"{self.events} event{'' if self.events == 1 else 's'}")
            )
        where = f" ({', '.join(parts)})" if parts else ""
        message = one_line(" ".join(self.message.splitlines()))
        return f"{self.kind.name} {one_line(self.workflow_id, MAX_NAME_CHARS)}{where}: {message}"


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    r"""``text`` as :func:`safe_text` makes it, at most ``limit`` characters, with every
    character that could end a line or drive a terminal escaped as Python writes it
    (``\n``, ``\x1b``, ``\u2028``): ids are not validated, and reports are read line by
    line (a CI job greps them)."""
    if not text.isprintable():
        text = "".join(
            repr(char)[1:-1] if unicodedata.category(char) in _LINE_BREAKING else char
            for char in text
        )
    return safe_text(text, limit)


# Control characters (C0, DEL, C1) and the line and paragraph separators: every character
# str.splitlines() splits at is one of them.
_LINE_BREAKING: Final = frozenset(("Cc", "Zl", "Zp"))


Entry = WorkflowRecord | Verdict
"""What a source yields: a record to replay, or the verdict on one it could not decode."""


def check(record: WorkflowRecord, registry: WorkflowRegistry) -> Verdict:
    """Replay ``record`` with the code in ``registry`` and say whether it diverges.

    Open workflows (``RUNNING``, ``STUCK``) must replay without a problem and, as history
    shows them still waiting, without finishing; a ``STUCK`` one that now replays is
    ``RESUMES`` (it may finish on the input it was parked at). Workflows that their code
    ended (``COMPLETED``, ``FAILED``, ``COMPENSATED``, ``COMPENSATION_FAILED``,
    ``CANCELLED``, ``CONTINUED_AS_NEW``) must end the same way. A ``TERMINATED`` one the
    code would not replay is ``TERMINATED``, which does not fail the gate: it never runs
    again. Never raises for anything the workflow code does.

    Example::

        verdict = check(record, registry)
        if verdict.kind.fails:
            print(verdict.line())
    """
    verdict = _check(record, registry)
    if record.status is WorkflowStatus.TERMINATED and verdict.kind.fails:
        would = "diverge" if verdict.kind is Kind.DIVERGES else "not run it"
        return _verdict(
            record, Kind.TERMINATED, f"never runs again; the code would {would}: {verdict.message}"
        )
    return verdict


def _check(record: WorkflowRecord, registry: WorkflowRegistry) -> Verdict:
    if record.status is WorkflowStatus.UNKNOWN:
        return _verdict(
            record,
            Kind.SKIPPED,
            "written by a newer version of sagaline (its status is unknown here); not replayed",
        )
    fn = registry.get(record.workflow_type)
    if fn is None:
        shown = safe_text(record.workflow_type, MAX_NAME_CHARS)
        return _verdict(record, Kind.BROKEN, f"type {shown!r} is not registered")
    try:
        input_value: Any = registry.converter.from_payload(record.input)
    except Exception as exc:  # not JSON, or nested past the recursion limit
        return _verdict(record, Kind.BAD_INPUT, f"its input is not readable JSON ({describe(exc)})")

    def run(events: tuple[HistoryEvent, ...]) -> ReplayResult:
        return replay(
            fn,
            record.workflow_id,
            record.workflow_type,
            input_value,
            events,
            record.started_at_ms,
            run_id=record.run_id,
            converter=registry.converter,
        )

    try:
        return _judge(record, run)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # replay() catches what the code raises: this is a bug
        return _verdict(
            record, Kind.BROKEN, f"the replay itself failed ({describe(exc)}); please report it"
        )


def _judge(
    record: WorkflowRecord, run: Callable[[tuple[HistoryEvent, ...]], ReplayResult]
) -> Verdict:
    result = run(record.events)
    problem = result.problem
    if problem is not None:
        if problem.error_type == NONDETERMINISM:
            return _verdict(record, Kind.DIVERGES, safe_text(problem.message))
        return _verdict(record, Kind.BROKEN, f"{problem.error_type}: {safe_text(problem.message)}")
    status = record.status
    if status is WorkflowStatus.RUNNING and result.finished:
        # The engine closes a workflow the moment its code finishes: history that shows it
        # running was written by code still waiting. This code would end it at its next
        # input (a signal, a timer, a result), whatever that input is.
        return _verdict(
            record,
            Kind.DIVERGES,
            "the code now ends it where history shows it still running (its next input "
            f"would close it): it {_ending(result)[1]}",
        )
    if status is WorkflowStatus.STUCK:
        return _stuck(record, result, run)
    if status not in _ENDED_BY_CODE:
        return _verdict(record, Kind.OK, "")  # RUNNING, TERMINATED: no problem is all we ask
    by_limits = (
        status is WorkflowStatus.FAILED
        and record.failure is not None
        and record.failure.error_type in _CLOSED_BY_LIMITS
    )
    if by_limits:
        return _verdict(record, Kind.OK, "")
    if not result.finished:
        if result.new_steps:
            step = result.new_steps[0]
            now = f"it would schedule step {step.seq} ({describe_command(step)})"
        else:
            now = "it still waits after the last recorded event"
        return _verdict(
            record,
            Kind.DIVERGES,
            f"history says it ended {status.value}, but the code does not finish: {now}",
        )
    ended, told = _ending(result)
    if ended != _ENDING_OF.get(status, "fails"):
        return _verdict(
            record, Kind.DIVERGES, f"history says it ended {status.value}, but the code now {told}"
        )
    return _verdict(record, Kind.OK, "")


def _stuck(
    record: WorkflowRecord,
    result: ReplayResult,
    run: Callable[[tuple[HistoryEvent, ...]], ReplayResult],
) -> Verdict:
    """A parked record that replays: ``RESUMES``, unless the code ends it before the input
    it was parked at.

    A parked record keeps the event of the input it was parked at (the last one) and
    nothing its code did then, so ending on that input is what resuming it does. History
    before it was written by code still waiting: ending there diverges. (A record parked
    by an input that adds no event, a resume, ends with an event older code waited after;
    that case is judged as if it were the parking input's.)
    """
    parked = record.failure
    why = "" if parked is None else f"; parked with {parked.error_type}: {parked.message}"
    if not result.finished:
        return _verdict(record, Kind.RESUMES, safe_text(f"replays cleanly now{why}", 500))
    before = run(record.events[:-1]) if record.events else None
    if before is not None and before.finished and before.problem is None:
        return _verdict(
            record,
            Kind.DIVERGES,
            "the code now ends it before the input it was parked at, where history shows "
            f"it still running: it {_ending(before)[1]}",
        )
    told = _ending(result)[1]
    return _verdict(
        record,
        Kind.RESUMES,
        safe_text(f"replays cleanly now and ends on resume: it {told}{why}", 500),
    )


_ENDING_OF: Final = {
    WorkflowStatus.COMPLETED: "completes",
    WorkflowStatus.CANCELLED: "is cancelled",
    WorkflowStatus.CONTINUED_AS_NEW: "continues as new",
}


def _ending(result: ReplayResult) -> tuple[str, str]:
    """How a finished replay ends, in the words of ``_ENDING_OF`` (as ``transition._finish``
    decides the status), and that told with the error it fails with."""
    if result.continued is not None:
        return "continues as new", "continues as new"
    error = result.error
    if error is None:
        if result.payload is not None:
            return "completes", "completes"
        problem = f"InvalidResult: {result.payload_error}"  # a result that is not JSON
    elif isinstance(error, WorkflowCancelledError):
        return "is cancelled", "is cancelled"
    else:
        failure = failure_from_exception(error, retryable=False)
        problem = f"{failure.error_type}: {failure.message}"
    return "fails", f"fails with {safe_text(problem, _ERROR_CHARS)}"


def _verdict(record: WorkflowRecord, kind: Kind, message: str) -> Verdict:
    return Verdict(
        record.workflow_id,
        record.run_id,
        record.workflow_type,
        record.status,
        kind,
        message,
        len(record.events),
    )


def undecodable(workflow_id: str, reason: str) -> Verdict:
    """The verdict on a record that cannot be decoded (``BROKEN``: no code can replay it)."""
    return Verdict(workflow_id, "", "", None, Kind.BROKEN, f"cannot decode: {reason}", 0)


def newer(workflow_id: str, run_id: str, workflow_type: str, reason: str) -> Verdict:
    """The verdict on a record written by a newer version, which holds what this version's
    schema lacks (``SKIPPED``: not the code's fault)."""
    message = f"written by a newer version of sagaline ({reason}); not replayed"
    return Verdict(workflow_id, run_id, workflow_type, None, Kind.SKIPPED, message, 0)


# --- judging many, and the summary ------------------------------------------------------


class Progress:
    """Progress lines (the CLI writes them to stderr), at most one every ``every_s``."""

    def __init__(
        self,
        write: Callable[[str], None],
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write, self._every_s, self._clock = write, every_s, clock
        self._last = clock()

    def due(self) -> bool:
        """True if a line may be written now."""
        return self._clock() - self._last >= self._every_s

    def say(self, text: str) -> None:
        """Write ``text`` now."""
        self._last = self._clock()
        self._write(text)


def judge(
    entries: Iterable[Entry],
    registry: WorkflowRegistry,
    *,
    total: int | None = None,
    progress: Progress | None = None,
) -> list[Verdict]:
    """The verdicts on ``entries`` in order (a :class:`Verdict` entry stands as it is)."""
    verdicts: list[Verdict] = []
    of = "" if total is None else f"/{total:,}"
    said = -1
    for entry in entries:
        verdicts.append(entry if isinstance(entry, Verdict) else check(entry, registry))
        if progress is not None and progress.due():
            said = len(verdicts)
            progress.say(f"replayed {said:,}{of}")
    if progress is not None and said != len(verdicts):
        progress.say(f"replayed {len(verdicts):,}{of}")
    return verdicts


def exit_code(verdicts: Iterable[Verdict]) -> int:
    """1 if any verdict fails the gate (``DIVERGES``, ``BROKEN``), else 0."""
    return 1 if any(v.kind.fails for v in verdicts) else 0


def report(verdicts: Sequence[Verdict], *, max_lines: int = DEFAULT_MAX_LINES) -> str:
    """One line per workflow that is not OK and a final count line.

    Workflows with the same kind and message are listed together, at most ``max_lines``
    of them, then counted (``... and 480 more with the same difference``): one change of
    code typically makes thousands of workflows diverge the same way.
    """
    groups: dict[tuple[Kind, str], list[Verdict]] = {}
    for verdict in verdicts:
        if verdict.kind is not Kind.OK:
            groups.setdefault((verdict.kind, verdict.message), []).append(verdict)
    # sorted() is stable: groups of one kind and size keep the order they were met in.
    ordered = sorted(groups.items(), key=lambda item: (_ORDER.index(item[0][0]), -len(item[1])))
    shown = max(0, max_lines)
    lines: list[str] = []
    for (kind, _), members in ordered:
        lines.extend(member.line() for member in members[:shown])
        if len(members) > shown:
            same = "difference" if kind is Kind.DIVERGES else "message"
            lines.append(f"  ... and {len(members) - shown:,} more with the same {same}")
    lines.append(counts(verdicts))
    return "\n".join(lines)


def counts(verdicts: Iterable[Verdict]) -> str:
    """``replayed 100 workflows: 97 ok, 3 diverge, 0 broken`` (other kinds when present)."""
    tally = Counter(v.kind for v in verdicts)
    replayed = sum(tally.values()) - tally[Kind.SKIPPED]
    text = f"replayed {replayed:,} workflow{'' if replayed == 1 else 's'}: " + ", ".join(
        f"{tally[kind]:,} {kind.value}" for kind in (Kind.OK, Kind.DIVERGES, Kind.BROKEN)
    )
    for kind in (Kind.RESUMES, Kind.BAD_INPUT, Kind.TERMINATED):
        if tally[kind]:
            text += f", {tally[kind]:,} {kind.value}"
    if tally[Kind.SKIPPED]:
        text += f"; {tally[Kind.SKIPPED]:,} skipped (written by a newer version)"
    return text
