"""The replay gate's verdicts: would the code deployed now replay the recorded workflows
the same way?

``sagaline replay`` runs each recorded workflow's code over its history exactly as an
orchestrator does after every input (``replay.driver.replay``) and reports every workflow
that would diverge, naming the first command that differs, so a CI job or a deploy
pipeline can refuse code that would park running workflows as ``STUCK``. Its sources: the
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
  fault.
- Only the history topic source talks to Kafka, and imports it when it is used, so the
  file sources need no broker and no Kafka client.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from orchestrator.errors import (
    ConfigurationError,
    HistoryLimitExceededError,
    RecordTooLargeError,
    WorkflowCancelledError,
)
from orchestrator.protocol.failures import MAX_NAME_CHARS, describe, safe_text
from orchestrator.protocol.records import WorkflowRecord, WorkflowStatus
from orchestrator.replay.driver import NONDETERMINISM, ReplayResult, describe_command, replay
from orchestrator.workflow import WorkflowRegistry

if TYPE_CHECKING:
    pass

DEFAULT_MAX_LINES: Final = 20
"""Workflows listed per distinct message; the rest are counted."""
PROGRESS_EVERY_S: Final = 2.0
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
    SKIPPED = "skipped"

    @property
    def fails(self) -> bool:
        """True if this verdict fails the gate."""
        return self in (Kind.DIVERGES, Kind.BROKEN)


# The order the summary lists kinds in: what fails the gate first.
_ORDER: Final = (Kind.DIVERGES, Kind.BROKEN, Kind.BAD_INPUT, Kind.RESUMES, Kind.SKIPPED, Kind.OK)


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
        """``DIVERGES order-17 (run abc, order.process, RUNNING, 12 events): step 3 is ...``."""
        parts = [f"run {self.run_id}"] if self.run_id else []
        if self.workflow_type:
            parts.append(safe_text(self.workflow_type, MAX_NAME_CHARS))
        if self.status is not None:
            parts.extend(
                (self.status.value, f"{self.events} event{'' if self.events == 1 else 's'}")
            )
        where = f" ({', '.join(parts)})" if parts else ""
        label = "RESUMES" if self.kind is Kind.RESUMES else self.kind.name
        message = " ".join(self.message.splitlines())  # one line per workflow, always
        return f"{label} {safe_text(self.workflow_id, MAX_NAME_CHARS)}{where}: {message}"


Entry = WorkflowRecord | Verdict
"""What a source yields: a record to replay, or the verdict on one it could not decode."""


def check(record: WorkflowRecord, registry: WorkflowRegistry) -> Verdict:
    """Replay ``record`` with the code in ``registry`` and say whether it diverges.

    Open workflows (``RUNNING``, ``STUCK``) and ``TERMINATED`` ones must replay without a
    problem; a ``STUCK`` one that now does is ``RESUMES``. Workflows that their code ended
    (``COMPLETED``, ``FAILED``, ``COMPENSATED``, ``COMPENSATION_FAILED``, ``CANCELLED``)
    must also end the same way. Never raises for anything the workflow code does.

    Example::

        verdict = check(record, registry)
        if verdict.kind.fails:
            print(verdict.line())
    """
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
    try:
        result = replay(
            fn,
            record.workflow_id,
            record.workflow_type,
            input_value,
            record.events,
            record.started_at_ms,
            run_id=record.run_id,
            converter=registry.converter,
        )
        return _judge(record, result)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # replay() catches what the code raises: this is a bug
        return _verdict(
            record, Kind.BROKEN, f"the replay itself failed ({describe(exc)}); please report it"
        )


def _judge(record: WorkflowRecord, result: ReplayResult) -> Verdict:
    problem = result.problem
    if problem is not None:
        if problem.error_type == NONDETERMINISM:
            return _verdict(record, Kind.DIVERGES, safe_text(problem.message))
        return _verdict(record, Kind.BROKEN, f"{problem.error_type}: {safe_text(problem.message)}")
    status = record.status
    if status is WorkflowStatus.STUCK:
        parked = record.failure
        why = "" if parked is None else f"; parked with {parked.error_type}: {parked.message}"
        return _verdict(record, Kind.RESUMES, safe_text(f"replays cleanly now{why}", 500))
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
    ended = _ending(result)
    if ended != _ENDING_OF.get(status, "fails"):
        return _verdict(
            record, Kind.DIVERGES, f"history says it ended {status.value}, but the code now {ended}"
        )
    return _verdict(record, Kind.OK, "")


_ENDING_OF: Final = {
    WorkflowStatus.COMPLETED: "completes",
    WorkflowStatus.CANCELLED: "is cancelled",
    WorkflowStatus.CONTINUED_AS_NEW: "continues as new",
}


def _ending(result: ReplayResult) -> str:
    """How a finished replay ends, in the words of ``_ENDING_OF`` (as ``transition._finish``
    decides the status)."""
    if result.continued is not None:
        return "continues as new"
    error = result.error
    if error is None:
        return "completes" if result.payload is not None else "fails"
    return "is cancelled" if isinstance(error, WorkflowCancelledError) else "fails"


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
    for kind in (Kind.RESUMES, Kind.BAD_INPUT):
        if tally[kind]:
            text += f", {tally[kind]:,} {kind.value}"
    if tally[Kind.SKIPPED]:
        text += f"; {tally[Kind.SKIPPED]:,} skipped (written by a newer version)"
    return text
