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

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Collection
from typing import Any, Final, NoReturn, cast

import psycopg

from orchestrator import metrics
from orchestrator.errors import ConfigurationError
from orchestrator.protocol.failures import safe_text
from orchestrator.protocol.records import ActivityResult, ActivityTask
from orchestrator.protocol.topics import LOCAL_PARTICIPANT
from participants.participant import (
    Outcome,
    Participant,
    attempt_deadline,
    handler_failure,
    wall_clock_ms,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S: Final = 5.0
# How long past an attempt's deadline the loop waits for a sync handler to return (its
# outcome is then the timeout failure anyway, see Participant.run_task) before it gives
# the thread up.
_GRACE_S: Final = 0.5


class NoDatabase:
    """``ctx.db`` of a local activity: there is none, and using it says so."""

    def __getattr__(self, name: str) -> NoReturn:
        raise ConfigurationError(
            "a local activity has no ctx.db: it runs in the orchestrator, outside any "
            "participant's database transaction; make the step a participant's activity "
            "(ctx.activity) to write with the idempotency inbox"
        )

    def __repr__(self) -> str:
        return "<no database: local activity>"


NO_DATABASE: Final = cast("psycopg.Connection[Any]", NoDatabase())


def is_local(task: ActivityTask) -> bool:
    """Whether ``task`` is a local activity's attempt, run in the orchestrator."""
    return task.participant == LOCAL_PARTICIPANT


class LocalRunner:
    """Runs local activities' attempts for the loop, one at a time, on a worker thread.

    ``timeout_s`` bounds an attempt whose step has no ``start_to_close`` of its own;
    activities named in ``inline`` run on the caller's thread instead.
    """

    def __init__(
        self,
        participant: Participant,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        inline: Collection[str] = (),
    ) -> None:
        self.participant = participant
        self.timeout_ms = max(1, round(timeout_s * 1000))
        self.inline = frozenset(inline)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def run(self, task: ActivityTask) -> ActivityResult:
        """Run one attempt and return the result to apply; never raises for what the
        handler does."""
        if task.start_to_close_ms is None:
            task = dataclasses.replace(task, start_to_close_ms=self.timeout_ms)
        started = time.perf_counter()
        outcome = self._outcome(task)
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
            return self.participant.run_task(task, NO_DATABASE)
        pool = self._pool
        if pool is None:
            pool = self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="sagaline-local"
            )
        started_ms = wall_clock_ms()
        future = pool.submit(self.participant.run_task, task, NO_DATABASE)
        assert task.start_to_close_ms is not None
        try:
            return future.result(timeout=task.start_to_close_ms / 1000 + _GRACE_S)
        except concurrent.futures.TimeoutError:
            # A sync handler that does not return: the loop cannot wait for it. The
            # thread is written off (it ends, or not, on its own); the next attempt gets
            # a fresh one.
            pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            metrics.child(metrics.PARTICIPANT_WORKERS_ABANDONED, LOCAL_PARTICIPANT).inc()
            log.error(
                "local activity still running past its deadline, thread written off "
                "activity=%s activity_id=%s workflow=%s",
                safe_text(task.activity, 200),
                safe_text(task.activity_id, 300),
                safe_text(task.workflow_id, 200),
            )
            deadline = attempt_deadline(task, started_ms)
            assert deadline is not None
            return Outcome.failed(deadline.failure(task, ran=True), wall_clock_ms())
        except BaseException as exc:  # run_task does not raise; should it, the step fails
            log.exception("local activity runner failed activity_id=%s", task.activity_id)
            return Outcome.failed(handler_failure(exc), wall_clock_ms())

    def close(self) -> None:
        """Stop the worker thread (without waiting for a handler that hangs)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
