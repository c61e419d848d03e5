"""Local activities: steps a workflow runs inside the orchestrator's own process.

The loop applies an input, and when the transition schedules a step named
``local.<activity>`` the handler registered with ``WorkflowRegistry.local_activity`` runs
right away; its outcome is applied as the participant's result would be, and so on until
the workflow waits on something else. Schedule and outcome go out in the transaction of
the input that reached the step, so the step runs at least once and is recorded exactly
once (docs/architecture.md, "Local activities").

Handlers run on a worker thread so that one that hangs cannot stop the loop: past its
attempt's deadline (plus a short grace) the loop stops waiting, answers the attempt with
a retryable timeout, and writes the thread off. Handlers registered ``inline`` (ones that
only compute) run on the loop's thread, without the hand-over.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, cast

import psycopg

from orchestrator import metrics
from orchestrator.protocol.failures import safe_text
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityTask,
    Failure,
    InboxBody,
    ResumeWorkflow,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.protocol.topics import LOCAL_PARTICIPANT
from orchestrator.replay.engine import Limits, Transition, advance, pending_tasks
from orchestrator.workflow import WorkflowRegistry
from participants.participant import (
    SCHEDULE_TO_CLOSE_TIMEOUT,
    START_TO_CLOSE_TIMEOUT,
    ActivityFailure,
    Outcome,
    Participant,
    attempt_deadline,
    handler_failure,
    wall_clock_ms,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S: Final = 5.0
# The longest the loop waits for one attempt, whatever start_to_close the step asks for.
MAX_TIMEOUT_S: Final = 60.0
# Attempts, and seconds of them, one input may run before the rest wait for the
# workflow's next wake-up (the next batch): other inputs get their turn in between.
MAX_ATTEMPTS_PER_INPUT: Final = 100
MAX_SECONDS_PER_INPUT: Final = 2.0
# Written-off threads of one activity still running past which its attempts are refused
# (answered with a retryable failure without running) rather than given yet another
# thread; other activities keep theirs.
MAX_WRITTEN_OFF: Final = 4
# How long past an attempt's deadline the loop waits for a sync handler to return (its
# outcome is then the timeout failure anyway, see Participant.run_task) before it gives
# the thread up.
_GRACE_S: Final = 0.5


class NoDatabaseError(ActivityFailure):
    """A local activity used ``ctx.db``; the same code fails the same way: not retried."""

    retryable = False


class NoDatabase:
    """``ctx.db`` of a local activity: there is none, and using it says so."""

    def _refuse(self) -> NoReturn:
        raise NoDatabaseError(
            "a local activity has no ctx.db: it runs in the orchestrator, outside any "
            "participant's database transaction; make the step a participant's activity "
            "(ctx.activity) to write with the idempotency inbox"
        )

    def __getattr__(self, name: str) -> NoReturn:
        self._refuse()

    def __enter__(self) -> NoReturn:
        self._refuse()

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return "<no database: local activity>"


NO_DATABASE: Final = cast("psycopg.Connection[Any]", NoDatabase())


def is_local(task: ActivityTask) -> bool:
    """Whether ``task`` is a local activity's attempt, run in the orchestrator."""
    return task.participant == LOCAL_PARTICIPANT


class _Worker:
    """One daemon thread that runs attempts handed to it; written off when one hangs.

    Daemon, so a handler that never returns cannot keep the process from exiting.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Outcome], _Slot]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="sagaline-local", daemon=True)
        self.thread.start()

    def run(self, job: Callable[[], Outcome], timeout_s: float) -> Outcome | None:
        """``job``'s outcome, or None if it did not end within ``timeout_s``."""
        slot = _Slot()
        self._jobs.put((job, slot))
        if not slot.done.wait(timeout_s):
            return None
        assert slot.outcome is not None
        return slot.outcome

    def stop(self) -> None:
        """Let the thread end once it is idle."""
        self._jobs.put((_stop, _Slot()))

    def _work(self) -> None:
        while True:
            job, slot = self._jobs.get()
            if job is _stop:
                return
            try:
                slot.outcome = job()
            except BaseException as exc:  # run_task does not raise; should it, the step fails
                log.exception("local activity runner failed")
                slot.outcome = Outcome.failed(handler_failure(exc), wall_clock_ms())
            slot.done.set()


@dataclass(slots=True)
class _Slot:
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None


def _stop() -> Outcome:
    raise AssertionError("never run")  # a marker: the worker ends when it takes it


class LocalRunner:
    """Runs local activities' attempts for the loop, one at a time, on a worker thread.

    ``timeout_s`` bounds an attempt whose step has no ``start_to_close`` of its own
    (and no attempt waits longer than ``MAX_TIMEOUT_S``); activities named in ``inline``
    run on the caller's thread instead. ``now_ms`` is the clock outcomes are stamped
    with (the WorkflowTester's is virtual); the wait for a handler is in real time.
    """

    def __init__(
        self,
        participant: Participant,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        inline: Collection[str] = (),
        now_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.participant = participant
        self._now_ms = now_ms
        self.timeout_ms = max(1, round(min(timeout_s, MAX_TIMEOUT_S) * 1000))
        self.inline = frozenset(inline)
        self._worker: _Worker | None = None
        self._written_off: dict[str, list[threading.Thread]] = {}

    def run(self, task: ActivityTask) -> ActivityResult:
        """Run one attempt and return the result to apply; never raises for what the
        handler does."""
        limit_ms = min(task.start_to_close_ms or self.timeout_ms, round(MAX_TIMEOUT_S * 1000))
        if task.start_to_close_ms != limit_ms:
            task = dataclasses.replace(task, start_to_close_ms=limit_ms)
        started = time.perf_counter()
        outcome = self._outcome(task)
        failure = outcome.failure
        if failure is not None and failure.error_type in _TIMEOUTS:
            # A participant's timeout message speaks of rolled-back writes; a local
            # activity has none, and what it did outside stays done.
            outcome = dataclasses.replace(outcome, failure=_overdue(task, failure.error_type))
        label = self.participant.metric_label(task.activity)
        status = outcome.status.value.lower()
        metrics.child(metrics.ACTIVITY_ATTEMPTS, label, status).inc()
        metrics.child(metrics.ACTIVITY_SECONDS, label, status).observe(
            time.perf_counter() - started
        )
        return outcome.result_for(task)

    def _outcome(self, task: ActivityTask) -> Outcome:
        if task.activity in self.inline:
            # Registered as one that cannot block: the loop's own thread runs it.
            return self.participant.run_task(task, NO_DATABASE, now_ms=self._now_ms)
        hung = [t for t in self._written_off.get(task.activity, ()) if t.is_alive()]
        self._written_off[task.activity] = hung
        if len(hung) >= MAX_WRITTEN_OFF:
            return Outcome.failed(
                handler_failure(
                    RuntimeError(
                        f"{len(hung)} attempts of local activity "
                        f"{safe_text(task.activity, 200)} are still running past their "
                        "deadlines; this attempt was not run"
                    )
                ),
                self._now_ms(),
            )
        if self._worker is None:
            self._worker = _Worker()
        started_ms = self._now_ms()
        # The attempt's own deadline: start-to-close, or schedule-to-close if earlier.
        deadline = attempt_deadline(task, started_ms)
        assert deadline is not None  # run() gave every attempt a start-to-close
        wait_s = max(0.0, (deadline.at_ms - started_ms) / 1000) + _GRACE_S
        outcome = self._worker.run(
            lambda: self.participant.run_task(task, NO_DATABASE, now_ms=self._now_ms), wait_s
        )
        if outcome is not None:
            return outcome
        # A sync handler that does not return: the loop cannot wait for it. Its thread is
        # written off (it ends, or not, on its own); the next attempt gets a fresh one.
        hung.append(self._worker.thread)
        self._worker.stop()
        self._worker = None
        metrics.child(metrics.PARTICIPANT_WORKERS_ABANDONED, LOCAL_PARTICIPANT).inc()
        log.error(
            "local activity still running past its deadline, thread written off "
            "activity=%s activity_id=%s workflow=%s",
            safe_text(task.activity, 200),
            safe_text(task.activity_id, 300),
            safe_text(task.workflow_id, 200),
        )
        return Outcome.failed(_overdue(task, deadline.error_type), self._now_ms())

    def close(self) -> None:
        """Let the worker thread end (a handler that hangs is left to itself)."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


_TIMEOUTS: Final = frozenset((START_TO_CLOSE_TIMEOUT, SCHEDULE_TO_CLOSE_TIMEOUT))


def _overdue(task: ActivityTask, error_type: str) -> Failure:
    """The retryable failure of a local attempt that ran past its deadline."""
    what = (
        "start-to-close timeout"
        if error_type == START_TO_CLOSE_TIMEOUT
        else "schedule-to-close deadline"
    )
    return Failure(
        error_type,
        safe_text(
            f"local activity {safe_text(task.activity, 200)} "
            f"{safe_text(task.activity_id, 300)} ran past its {what}; whatever it did "
            "before is not undone"
        ),
        True,
    )


@dataclass(slots=True)
class LocalRun:
    """What running a transition's local steps made of it: the transition to stage,
    the runs that ended by continuing as new on the way (write them first), and the
    labels of the attempts run (counted as scheduled once the transition is staged)."""

    transition: Transition
    ended: list[WorkflowRecord] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)


def run_local_steps(
    transition: Transition,
    body: InboxBody | WakeUp,
    current: WorkflowRecord | None,
    now_ms: int,
    *,
    runner: LocalRunner,
    registry: WorkflowRegistry,
    limits: Limits,
    between: Callable[[], None] = lambda: None,
) -> LocalRun:
    """Run the local activities ``transition`` schedules and apply their outcomes, until
    the workflow waits on something else; one transition with everything they added.

    Each attempt's outcome is applied as a participant's result would be (a failure
    retries on a durable timer), at the input's time ``now_ms``. A wake-up, a resume of a
    parked workflow, or any input to a workflow that was parked also runs the local steps
    its record left pending. What is left when the code continues as new, or past
    ``MAX_ATTEMPTS_PER_INPUT`` attempts or ``MAX_SECONDS_PER_INPUT``, waits for the
    workflow's next wake-up: a pending local attempt is due at once in ``next_wake``, so
    every record that holds one asks for it, whatever input wrote it. ``between`` runs
    before each attempt (the caller drops what it cached for the previous record).
    """
    record = transition.record if transition.ignored is None else None
    waiting = [] if record is None else [t for t in transition.tasks if is_local(t)]
    if isinstance(body, WakeUp | ResumeWorkflow) or (
        current is not None and current.status is WorkflowStatus.STUCK
    ):
        # A parked workflow whose code failed between a local step's schedule and its
        # outcome, or one left pending below, has nobody else to run it.
        base = record if record is not None else current
        if base is not None and base.status is WorkflowStatus.RUNNING:
            known = {task.activity_id for task in waiting}
            pending = [
                task
                for task in pending_tasks(base)
                if is_local(task) and task.activity_id not in known
            ]
            if pending:
                record = base
                waiting.extend(pending)
    if record is None or not waiting:
        return LocalRun(transition)
    original = transition
    if transition.ignored is not None:
        transition = Transition(record)
    tasks = [task for task in transition.tasks if not is_local(task)]
    messages = list(transition.messages)
    run = LocalRun(transition)
    changed = False
    began = time.monotonic()
    while waiting and record.status is WorkflowStatus.RUNNING:
        if (
            len(run.ran) >= MAX_ATTEMPTS_PER_INPUT
            or time.monotonic() - began >= MAX_SECONDS_PER_INPUT
        ):
            break  # the rest are due at once (next_wake): the next batch runs them
        task = waiting.pop(0)
        between()
        result = runner.run(task)
        run.ran.append(f"{task.participant}.{task.activity}")
        step = advance(record, result, now_ms, registry, limits)
        if step.record is None:
            log.warning(
                "local activity outcome ignored workflow=%s activity_id=%s reason=%s",
                safe_text(task.workflow_id, 200),
                safe_text(task.activity_id, 300),
                step.ignored,
            )
            continue
        record, changed = step.record, True
        messages.extend(step.messages)
        if step.replaced is not None:
            # The code continued as new: the new run's local steps wait for its first
            # wake-up (due at once), so a run that continues after every step cannot
            # hold the loop.
            run.ended.append(step.replaced)
            tasks.extend(t for t in step.tasks if not is_local(t))
            break
        for scheduled in step.tasks:
            (waiting if is_local(scheduled) else tasks).append(scheduled)
    if not changed:
        # Every outcome was ignored: the pending steps stay due (next_wake); no local
        # task may reach _plan, which would look for a tasks topic.
        if original.ignored is not None:
            return LocalRun(original, ran=run.ran)
        return LocalRun(dataclasses.replace(original, tasks=tuple(tasks)), ran=run.ran)
    run.transition = dataclasses.replace(
        transition, record=record, tasks=tuple(tasks), messages=tuple(messages)
    )
    return run
