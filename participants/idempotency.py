"""The idempotency inbox: each activity attempt takes effect once, however often it arrives.

Rules of this module: a task's business writes and its stored outcome commit in one
PostgreSQL transaction, or neither does. A redelivered task (same participant and activity
id) is answered from the stored outcome and changes nothing. Failures are stored too,
retryable ones included: an attempt has exactly one outcome, so a redelivery can never turn
a reported failure into a success the orchestrator has already given up on (it retries
under a new activity id). Kafka is not known here: a Celery worker or a
test can call :func:`execute_task` with any connection.

As in DBOS, each public function opens its transaction and a ``_..._txn(conn)`` twin does
the work inside it. Connections are expected in autocommit mode, so that
``conn.transaction()`` is the whole transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from orchestrator import metrics
from orchestrator.protocol.records import ActivityStatus, ActivityTask, Failure, Payload
from participants.participant import Outcome, Participant, wall_clock_ms

RESULTS_TABLE = "sagaline_activity_results"
ABORTED_TRANSACTION = "AbortedTransaction"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)
# Serialises schema setup across processes: concurrent CREATE TABLE IF NOT EXISTS can
# still collide on the catalog's unique indexes.
_SCHEMA_LOCK = 0x5A6A_0001

SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS {RESULTS_TABLE} (
    participant text NOT NULL,
    activity_id text NOT NULL,
    status text NOT NULL CHECK (status IN ('COMPLETED', 'FAILED')),
    result bytea,
    error_type text,
    message text,
    retryable boolean,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (participant, activity_id)
)
"""

_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
_FIND_SQL = f"""
SELECT status, result, error_type, message, retryable, created_at
FROM {RESULTS_TABLE} WHERE participant = %s AND activity_id = %s
"""
_INSERT_SQL = f"""
INSERT INTO {RESULTS_TABLE}
    (participant, activity_id, status, result, error_type, message, retryable, created_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (participant, activity_id) DO NOTHING
RETURNING 1
"""


@dataclass(frozen=True, slots=True)
class Execution:
    """What handling one task came to.

    Attributes:
        outcome: the attempt's outcome, to publish as its result.
        duplicate: True when the outcome came from the inbox (the handler's effects, if it
            ran at all, were rolled back).
    """

    outcome: Outcome
    duplicate: bool = False


def ensure_schema(conn: psycopg.Connection[Any], participant: Participant) -> None:
    """Create the idempotency table and run the participant's ``setup_sql``, in one transaction."""
    with conn.transaction():
        _ensure_schema_txn(conn, participant)


def _ensure_schema_txn(conn: psycopg.Connection[Any], participant: Participant) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
    conn.execute(SCHEMA_SQL)
    if participant.setup_sql.strip():
        conn.execute(participant.setup_sql)


def execute_task(
    conn: psycopg.Connection[Any],
    participant: Participant,
    task: ActivityTask,
    *,
    now_ms: Callable[[], int] = wall_clock_ms,
) -> Execution:
    """Run ``task`` at most once to completion: its writes and its outcome commit together.

    A task whose outcome is stored returns it unchanged (``duplicate=True``); a concurrent
    duplicate waits for the first delivery rather than running the handler alongside it.
    What the handler raises becomes a failed outcome. Errors of the inbox's own SQL
    (connection lost, a failed COMMIT) propagate, and then whether the attempt committed is
    unknown: call again on a fresh connection, which answers from the inbox if it did.

    Args:
        conn: an autocommit connection with no transaction open.
        participant: whose handler runs, and whose inbox rows are read and written.
        task: the attempt to run.
        now_ms: clock for the outcome's finish time.
    """
    with conn.transaction() as txn:
        execution = _execute_task_txn(conn, participant, task, now_ms)
        if execution.duplicate or not execution.outcome.is_completed:
            # A failed handler's writes, or a concurrent duplicate's, must not commit.
            raise psycopg.Rollback(txn)
    if not execution.duplicate and not execution.outcome.is_completed:
        with conn.transaction():
            execution = _store_failure_txn(
                conn, participant.name, task.activity_id, execution.outcome
            )
    if execution.duplicate:
        metrics.ACTIVITY_DUPLICATES.labels(participant.metric_label(task.activity)).inc()
    return execution


def _execute_task_txn(
    conn: psycopg.Connection[Any],
    participant: Participant,
    task: ActivityTask,
    now_ms: Callable[[], int],
) -> Execution:
    # The lock makes a concurrent duplicate wait here instead of running the handler a
    # second time (its effects outside this database could not be rolled back); the
    # ON CONFLICT below still guards writers that do not take it.
    conn.execute(_LOCK_SQL, (f"{participant.name}/{task.activity_id}",))
    stored = _find_txn(conn, participant.name, task.activity_id)
    if stored is not None:
        return Execution(stored, duplicate=True)
    outcome = participant.run_task(task, conn, now_ms=now_ms)
    if outcome.is_completed and conn.info.transaction_status is TransactionStatus.INERROR:
        # The handler caught a database error and returned: nothing it wrote can commit.
        outcome = Outcome.failed(
            Failure(
                ABORTED_TRANSACTION,
                f"{participant.name}.{task.activity} returned after a database error aborted "
                "its transaction; let the error propagate, or use ctx.db.transaction() "
                "around statements that may fail",
                True,
            ),
            outcome.finished_at_ms,
        )
    if not outcome.is_completed:
        return Execution(outcome)
    if _insert_txn(conn, participant.name, task.activity_id, outcome):
        return Execution(outcome)
    return Execution(_stored_txn(conn, participant.name, task.activity_id), duplicate=True)


def _store_failure_txn(
    conn: psycopg.Connection[Any], participant: str, activity_id: str, outcome: Outcome
) -> Execution:
    if _insert_txn(conn, participant, activity_id, outcome):
        return Execution(outcome)
    # Between our rollback and this insert, a duplicate delivery completed the attempt.
    return Execution(_stored_txn(conn, participant, activity_id), duplicate=True)


def find_outcome(
    conn: psycopg.Connection[Any], participant: str, activity_id: str
) -> Outcome | None:
    """The stored outcome of ``activity_id``, if the inbox has one."""
    with conn.transaction():
        return _find_txn(conn, participant, activity_id)


def _find_txn(conn: psycopg.Connection[Any], participant: str, activity_id: str) -> Outcome | None:
    row = conn.execute(_FIND_SQL, (participant, activity_id)).fetchone()
    if row is None:
        return None
    status, result, error_type, message, retryable, created_at = row
    finished_at_ms = (created_at - _EPOCH) // _MS
    if status == ActivityStatus.COMPLETED.value:
        return Outcome.completed(Payload(bytes(result)), finished_at_ms)
    return Outcome.failed(Failure(error_type, message, bool(retryable)), finished_at_ms)


def _stored_txn(conn: psycopg.Connection[Any], participant: str, activity_id: str) -> Outcome:
    stored = _find_txn(conn, participant, activity_id)
    if stored is None:  # ON CONFLICT saw a committed row, so a fresh statement sees it too
        raise RuntimeError(f"outcome of {participant}/{activity_id} conflicted but is missing")
    return stored


def _insert_txn(
    conn: psycopg.Connection[Any], participant: str, activity_id: str, outcome: Outcome
) -> bool:
    """Store ``outcome``; False when another transaction stored one first."""
    failure = outcome.failure
    row = conn.execute(
        _INSERT_SQL,
        (
            participant,
            activity_id,
            outcome.status.value,
            None if outcome.result is None else outcome.result.data,
            None if failure is None else failure.error_type,
            None if failure is None else failure.message,
            None if failure is None else failure.retryable,
            _EPOCH + outcome.finished_at_ms * _MS,
        ),
    ).fetchone()
    return row is not None
