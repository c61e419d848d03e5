"""The idempotency inbox: each activity attempt takes effect once, however often it arrives.

Rules of this module: a task's business writes and its stored outcome commit in one
PostgreSQL transaction, or neither does. A redelivered task (same participant and activity
id) is answered from the stored outcome and changes nothing. Failures are stored too,
retryable ones included: an attempt has exactly one outcome, so a redelivery can never turn
a reported failure into a success the orchestrator has already given up on (it retries
under a new activity id). Kafka is not known here: a Celery worker or a
test can call :func:`execute_task` with any connection.

One transaction per attempt holds the attempt's advisory lock from the lookup to the stored
outcome; the handler runs inside a savepoint of it, so a failing handler's writes are
undone while the lock is kept, and a concurrent duplicate waiting on the lock finds the
stored failure instead of running the handler again.

Only connection-level errors (:func:`is_connection_level`) leave this module for the
caller to retry; any other error while storing an outcome is stored as a non-retryable
failure with its reason. Every text reaching PostgreSQL goes through ``safe_text``.

As in DBOS, each public function opens its transaction and a ``_..._txn(conn)`` twin does
the work inside it. Connections are expected in autocommit mode, so that
``conn.transaction()`` is the whole transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import psycopg
from psycopg.pq import TransactionStatus

from orchestrator import metrics
from orchestrator.errors import SagalineError
from orchestrator.protocol.failures import MAX_NAME_CHARS, describe, safe_text
from orchestrator.protocol.records import ActivityStatus, ActivityTask, Failure, Payload
from participants.participant import AttemptReporter, Outcome, wall_clock_ms

log = logging.getLogger(__name__)

RESULTS_TABLE = "sagaline_activity_results"
ABORTED_TRANSACTION = "AbortedTransaction"
OUTCOME_NOT_STORED = "OutcomeNotStored"
TRANSACTION_ENDED = "TransactionEnded"
INVALID_ACTIVITY_ID = "InvalidActivityId"
# The primary key's btree refuses entries above ~2.7 kB; stay well below it.
MAX_ACTIVITY_ID_BYTES = 2_000
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
    retry_after_ms bigint,
    PRIMARY KEY (participant, activity_id)
)
"""
# Columns added after the table's first release, created by ensure_schema where missing.
# Checked first: ALTER TABLE would wait for every open attempt (its lock conflicts with
# theirs), a hung handler's included, even when the column exists.
_ADDED_COLUMNS = (("retry_after_ms", "bigint"),)
_HAS_COLUMN_SQL = """
SELECT 1 FROM pg_attribute
WHERE attrelid = to_regclass(%s) AND attname = %s AND NOT attisdropped
"""

_SAVEPOINT = "sagaline_attempt"
_FIND_SQL = f"""
SELECT status, result, error_type, message, retryable, created_at, retry_after_ms
FROM {RESULTS_TABLE} WHERE participant = %s AND activity_id = %s
"""
# Sent as one simple query (client-side binding), so the four cost one round trip.
# RESET ALL first: a handler's SET (isolation level, search_path) must not leak into the
# next task's inbox statements. The lookup must see what the lock's previous holder
# committed, which only READ COMMITTED guarantees (a stricter level would take the
# snapshot before the lock is granted, whatever the database's default is).
_CLAIM_SQL = (
    "RESET ALL; BEGIN ISOLATION LEVEL READ COMMITTED; "
    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0)); "
    + _FIND_SQL.strip()
    + f"; SAVEPOINT {_SAVEPOINT}"
)
_INSERT_SQL = f"""
INSERT INTO {RESULTS_TABLE}
    (participant, activity_id, status, result, error_type, message, retryable, created_at,
     retry_after_ms)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


class InboxOwner(Protocol):
    """Whose rows the inbox keeps: a :class:`~participants.Participant`, or the Celery
    integration (``participants.celery``)."""

    @property
    def name(self) -> str:
        """The inbox rows' ``participant`` key."""
        ...

    @property
    def setup_sql(self) -> str:
        """Business tables' SQL, run by :func:`ensure_schema` (idempotent)."""
        ...


class TaskRunner(InboxOwner, Protocol):
    """What the inbox runs tasks with: a participant, or one Celery task call."""

    def metric_label(self, activity: str) -> str:
        """The ``activity`` label of metrics about ``activity``."""
        ...

    def run_task(
        self,
        task: ActivityTask,
        db: psycopg.Connection[Any],
        *,
        now_ms: Callable[[], int] = ...,
        reporter: AttemptReporter | None = None,
    ) -> Outcome:
        """Run the task's code once with ``db`` inside the inbox's transaction; never
        raises for what that code does."""
        ...


class InboxUnavailableError(SagalineError):
    """PostgreSQL refused even a plain failure row: the inbox table itself is unusable
    (dropped, no privileges), not the task. Fix the database; a restart recreates the
    table."""


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


def is_connection_level(exc: BaseException) -> bool:
    """True for database errors that say nothing about the task: retry it as it is.

    ``OperationalError`` covers the connection (class 08, ``AdminShutdown`` and the rest
    of class 57, ``TooManyConnections``), the transaction as a whole (serialization
    failures, deadlocks: class 40, after which it rolled back entirely) and the pool
    (``PoolTimeout``, ``PoolClosed``). ``InterfaceError`` is the client library's view of a
    closed connection. ``ReadOnlySqlTransaction`` means a failover left us on a standby,
    and ``IdleInTransactionSessionTimeout`` means the server closed the session.
    ``ProgramLimitExceeded`` is an ``OperationalError`` too, but the same statement would
    exceed the same limit again, so it is not retried.
    """
    if isinstance(exc, psycopg.errors.ProgramLimitExceeded):
        return False
    return isinstance(
        exc,
        psycopg.OperationalError
        | psycopg.InterfaceError
        | psycopg.errors.ReadOnlySqlTransaction
        | psycopg.errors.IdleInTransactionSessionTimeout,
    )


def _retry_as_is(exc: BaseException, conn: psycopg.Connection[Any]) -> bool:
    # Whatever the error class, a connection that is gone cannot store anything.
    return is_connection_level(exc) or conn.broken or conn.closed


def ensure_schema(conn: psycopg.Connection[Any], participant: InboxOwner) -> None:
    """Create the idempotency table and run the participant's ``setup_sql``, in one transaction.

    Adding a column waits for the table's lock at most ``_ALTER_LOCK_TIMEOUT`` at a time:
    while it waits, every other attempt's lookup would queue behind it (an older replica's
    hung handler can hold the table for as long as it hangs). It tries again a few times,
    then gives up with the reason.
    """
    for attempt in range(1, _ALTER_ATTEMPTS + 1):
        try:
            with conn.transaction():
                _ensure_schema_txn(conn, participant)
            return
        except psycopg.errors.LockNotAvailable as exc:
            if attempt == _ALTER_ATTEMPTS:
                raise RuntimeError(
                    f"participant {participant.name}: could not add a column to "
                    f"{RESULTS_TABLE} within {_ALTER_ATTEMPTS} tries of "
                    f"{_ALTER_LOCK_TIMEOUT}: long-running attempts hold the table (older "
                    "replicas' hung handlers?); stop them or retry the deploy"
                ) from exc
            log.warning(
                "idempotency table busy, adding its columns again participant=%s try=%d",
                participant.name,
                attempt,
            )


_ALTER_LOCK_TIMEOUT = "2s"
_ALTER_ATTEMPTS = 10


def _ensure_schema_txn(conn: psycopg.Connection[Any], participant: InboxOwner) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
    conn.execute(SCHEMA_SQL)
    for column, kind in _ADDED_COLUMNS:
        if conn.execute(_HAS_COLUMN_SQL, (RESULTS_TABLE, column)).fetchone() is None:
            conn.execute(f"SET LOCAL lock_timeout = '{_ALTER_LOCK_TIMEOUT}'")
            conn.execute(f"ALTER TABLE {RESULTS_TABLE} ADD COLUMN IF NOT EXISTS {column} {kind}")
    if participant.setup_sql.strip():
        conn.execute(participant.setup_sql)


def execute_task(
    conn: psycopg.Connection[Any],
    participant: TaskRunner,
    task: ActivityTask,
    *,
    now_ms: Callable[[], int] = wall_clock_ms,
    reporter: AttemptReporter | None = None,
) -> Execution:
    """Run ``task`` at most once to completion: its writes and its outcome commit together.

    A task whose outcome is stored returns it unchanged (``duplicate=True``); a concurrent
    duplicate waits for the first delivery rather than running the handler alongside it,
    whether the handler succeeds or fails. What the handler raises becomes a failed
    outcome; an outcome PostgreSQL will not store becomes a stored non-retryable
    ``OutcomeNotStored`` failure. A task whose activity id cannot be a key is answered
    with an ``InvalidActivityId`` failure without running the handler (the same answer on
    every delivery, so nothing needs storing).

    Raises:
        psycopg.Error: a connection-level error (:func:`is_connection_level`); whether the
            attempt committed is then unknown: call again on a fresh connection, which
            answers from the inbox if it did.
        InboxUnavailableError: the inbox refused even a plain failure row.

    Args:
        conn: an autocommit connection with no transaction open.
        participant: whose handler runs, and whose inbox rows are read and written.
        task: the attempt to run.
        now_ms: clock for the outcome's finish time and the attempt's deadline.
        reporter: told when the handler starts (not for an outcome found stored) and of
            its heartbeats; see :meth:`Participant.run_task`.
    """
    invalid = _invalid_id(participant, task, now_ms)
    if invalid is not None:
        return Execution(invalid)
    try:
        execution = _execute(conn, participant, task, now_ms, reporter)
    except Exception as exc:
        _end_transaction(conn)
        if _retry_as_is(exc, conn):
            raise
        # The transaction is gone (COMMIT refused, or the handler ended it with SQL):
        # record why, in a fresh one, so the next delivery does not run the handler again.
        execution = _store_refusal(conn, participant, task, exc, now_ms)
    if execution.duplicate:
        metrics.ACTIVITY_DUPLICATES.labels(participant.metric_label(task.activity)).inc()
    return execution


def _invalid_id(
    participant: TaskRunner, task: ActivityTask, now_ms: Callable[[], int]
) -> Outcome | None:
    key = task.activity_id
    try:
        size = len(key.encode())  # strict: a lone surrogate cannot reach PostgreSQL
    except UnicodeEncodeError:
        size = MAX_ACTIVITY_ID_BYTES + 1
    if "\x00" not in key and size <= MAX_ACTIVITY_ID_BYTES:
        return None
    log.error(
        "activity id cannot be stored participant=%s activity_id=%s",
        participant.name,
        safe_text(key, 300),
    )
    return Outcome.failed(
        Failure(
            INVALID_ACTIVITY_ID,
            safe_text(
                f"activity id {safe_text(key, 300)!r} cannot key the idempotency inbox "
                "(it holds NUL or a lone surrogate, or is longer than "
                f"{MAX_ACTIVITY_ID_BYTES} bytes); the handler did not run"
            ),
            False,
        ),
        now_ms(),
    )


def _execute(
    conn: psycopg.Connection[Any],
    participant: TaskRunner,
    task: ActivityTask,
    now_ms: Callable[[], int],
    reporter: AttemptReporter | None = None,
) -> Execution:
    """One attempt in one transaction, in three round trips around the handler's own.

    ``BEGIN; lock; lookup; SAVEPOINT`` go together, then the handler runs, then
    ``SET CONSTRAINTS ALL IMMEDIATE; INSERT outcome; COMMIT`` (or, for a failure,
    ``ROLLBACK TO SAVEPOINT; INSERT failure; COMMIT``) go together. The lock makes a
    concurrent duplicate wait instead of running the handler a second time (its effects
    outside this database could not be rolled back), and it is held until the outcome,
    failures included, is committed. Each statement of a batch takes its own snapshot, so
    the lookup sees what the lock's previous holder committed.
    """
    name, activity_id = participant.name, task.activity_id
    stored = _claim(conn, name, activity_id)
    if stored is not None:
        conn.execute("ROLLBACK")
        return Execution(stored, duplicate=True)
    outcome = _safe(participant.run_task(task, conn, now_ms=now_ms, reporter=reporter))
    if conn.info.transaction_status is TransactionStatus.IDLE:
        # The handler ran COMMIT or ROLLBACK itself: the lock is gone and its writes may
        # have committed without an outcome. Nothing can make that exactly once; say so.
        ended = Outcome.failed(
            Failure(
                TRANSACTION_ENDED,
                f"{name}.{safe_text(task.activity, MAX_NAME_CHARS)} ended the inbox's "
                "transaction itself (COMMIT or ROLLBACK as SQL): its writes may have "
                "committed without an outcome; never end ctx.db's transaction",
                False,
                effects_committed=True,
            ),
            outcome.finished_at_ms,
        )
        return _store_fresh(conn, participant, task, ended)
    if outcome.is_completed and conn.info.transaction_status is TransactionStatus.INERROR:
        # The handler caught a database error and returned: nothing it wrote can commit.
        outcome = Outcome.failed(
            Failure(
                ABORTED_TRANSACTION,
                f"{name}.{safe_text(task.activity, MAX_NAME_CHARS)} returned after a "
                "database error aborted its transaction; let the error propagate, or use "
                "ctx.db.transaction() around statements that may fail",
                True,
            ),
            outcome.finished_at_ms,
        )
    if outcome.is_completed:
        try:
            # Deferred constraints and constraint triggers would otherwise fire at COMMIT,
            # after the savepoint is gone; checked first, a violation is the handler's
            # failure, stored under the lock.
            _store_and_commit(conn, "SET CONSTRAINTS ALL IMMEDIATE", name, activity_id, outcome)
            return Execution(outcome)
        except psycopg.errors.UniqueViolation as exc:
            if not _is_inbox_conflict(exc):
                outcome = _refusal(participant, task, exc, now_ms())
            else:
                return _stored_by_another(conn, name, activity_id)
        except psycopg.Error as exc:
            if _retry_as_is(exc, conn):
                raise
            outcome = _refusal(participant, task, exc, now_ms())
    try:
        _store_and_commit(conn, f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}", name, activity_id, outcome)
    except psycopg.errors.UniqueViolation as exc:
        if not _is_inbox_conflict(exc):
            raise
        return _stored_by_another(conn, name, activity_id)
    return Execution(outcome)


def _claim(conn: psycopg.Connection[Any], participant: str, activity_id: str) -> Outcome | None:
    """Begin, take the attempt's lock, look up its outcome, set the savepoint: one trip."""
    with psycopg.ClientCursor(conn) as cur:
        cur.execute(_CLAIM_SQL, (f"{participant}/{activity_id}", participant, activity_id))
        for _ in range(3):  # past RESET ALL and BEGIN and the lock, to the lookup
            cur.nextset()
        row = cur.fetchone()
    return None if row is None else _outcome_of(row)


def _store_and_commit(
    conn: psycopg.Connection[Any],
    before: str,
    participant: str,
    activity_id: str,
    outcome: Outcome,
) -> None:
    """``before``, store ``outcome`` and commit, in one round trip.

    The outcome row has no ON CONFLICT clause: a row another writer stored first fails the
    INSERT, and with it the COMMIT that follows, rather than committing this attempt's
    writes beside someone else's outcome.
    """
    failure = outcome.failure
    with psycopg.ClientCursor(conn) as cur:
        cur.execute(
            f"{before}; {_INSERT_SQL}; COMMIT",
            (
                participant,
                activity_id,
                outcome.status.value,
                None if outcome.result is None else outcome.result.data,
                None if failure is None else failure.error_type,
                None if failure is None else failure.message,
                None if failure is None else failure.retryable,
                _EPOCH + outcome.finished_at_ms * _MS,
                None if failure is None else failure.retry_after_ms,
            ),
        )


def _is_inbox_conflict(exc: psycopg.errors.UniqueViolation) -> bool:
    return exc.diag.table_name == RESULTS_TABLE


def _stored_by_another(
    conn: psycopg.Connection[Any], participant: str, activity_id: str
) -> Execution:
    """A writer that does not take the lock stored this attempt first: drop ours, use its."""
    conn.execute("ROLLBACK")
    stored = find_outcome(conn, participant, activity_id)
    if stored is None:  # the conflicting row was committed, so a fresh statement sees it
        raise RuntimeError(f"outcome of {participant}/{activity_id} conflicted but is missing")
    return Execution(stored, duplicate=True)


def _end_transaction(conn: psycopg.Connection[Any]) -> None:
    """Roll back whatever transaction an error left open (a broken connection has none)."""
    if conn.closed or conn.broken:
        return
    if conn.info.transaction_status is not TransactionStatus.IDLE:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            log.warning("rollback after an inbox error failed", exc_info=True)


def _refusal(
    participant: TaskRunner, task: ActivityTask, exc: BaseException, finished_at_ms: int
) -> Outcome:
    """The non-retryable failure stored when PostgreSQL refused an attempt's outcome."""
    activity = safe_text(task.activity, MAX_NAME_CHARS)
    log.error(
        "outcome not stored participant=%s activity=%s activity_id=%s error=%s",
        participant.name,
        activity,
        safe_text(task.activity_id),
        describe(exc),
    )
    return Outcome.failed(
        Failure(
            OUTCOME_NOT_STORED,
            safe_text(
                f"PostgreSQL refused the outcome of {participant.name}.{activity} "
                f"({describe(exc)}); the attempt's database writes were rolled back"
            ),
            False,
        ),
        finished_at_ms,
    )


def _store_refusal(
    conn: psycopg.Connection[Any],
    participant: TaskRunner,
    task: ActivityTask,
    exc: Exception,
    now_ms: Callable[[], int],
) -> Execution:
    return _store_fresh(conn, participant, task, _refusal(participant, task, exc, now_ms()), exc)


def settle_attempt(
    conn: psycopg.Connection[Any], owner: InboxOwner, task: ActivityTask, outcome: Outcome
) -> Execution:
    """The outcome of an attempt that ended outside its handler (its process died, a time
    limit ended it): the one stored, if its transaction committed one, else ``outcome``,
    stored now so that every later delivery of the attempt gets it too.

    Waits for the attempt's lock, so a transaction of the attempt still open (its process
    just died) is over first; ``lock_timeout`` on the connection bounds that wait.

    Raises:
        psycopg.Error: a connection-level error (``LockNotAvailable`` included): the
            answer is unknown.
        InboxUnavailableError: the inbox refused the row.
    """
    return _store_fresh(conn, owner, task, outcome)


def _store_fresh(
    conn: psycopg.Connection[Any],
    participant: InboxOwner,
    task: ActivityTask,
    outcome: Outcome,
    cause: BaseException | None = None,
) -> Execution:
    """Store ``outcome`` in a transaction of its own, unless one is stored already."""
    try:
        stored = _claim(conn, participant.name, task.activity_id)
        if stored is not None:
            conn.execute("ROLLBACK")
            return Execution(stored, duplicate=True)
        try:
            _store_and_commit(conn, "SELECT 1", participant.name, task.activity_id, outcome)
        except psycopg.errors.UniqueViolation as conflict:
            if not _is_inbox_conflict(conflict):
                raise
            return _stored_by_another(conn, participant.name, task.activity_id)
        return Execution(outcome)
    except Exception as again:
        _end_transaction(conn)
        if _retry_as_is(again, conn):
            raise
        # This row holds only validated ids and sagaline's own text: no task can make
        # PostgreSQL refuse it, so the inbox itself is unusable.
        raise InboxUnavailableError(
            f"participant {participant.name}: the idempotency inbox ({RESULTS_TABLE}) "
            f"refused a failure row for {safe_text(task.activity_id, 300)}: "
            f"{describe(again)}" + ("" if cause is None else f"; after {describe(cause)}")
        ) from again


def find_outcome(
    conn: psycopg.Connection[Any], participant: str, activity_id: str
) -> Outcome | None:
    """The stored outcome of ``activity_id``, if the inbox has one."""
    with conn.transaction():
        return _find_txn(conn, participant, activity_id)


def _find_txn(conn: psycopg.Connection[Any], participant: str, activity_id: str) -> Outcome | None:
    row = conn.execute(_FIND_SQL, (participant, activity_id)).fetchone()
    return None if row is None else _outcome_of(row)


def _outcome_of(row: tuple[Any, ...]) -> Outcome:
    status, result, error_type, message, retryable, created_at, after_ms = row
    finished_at_ms = (created_at - _EPOCH) // _MS
    if status == ActivityStatus.COMPLETED.value:
        return Outcome.completed(Payload(bytes(result)), finished_at_ms)
    # Not a column: the only stored failure whose effects may have committed is this one.
    committed = error_type == TRANSACTION_ENDED
    failure = Failure(
        error_type,
        message,
        bool(retryable),
        effects_committed=committed,
        retry_after_ms=None if after_ms is None else int(after_ms),
    )
    return Outcome.failed(failure, finished_at_ms)


def _safe(outcome: Outcome) -> Outcome:
    """``outcome`` with text PostgreSQL accepts; what is returned is exactly what is stored,
    so the first delivery and every redelivery publish the same record."""
    failure = outcome.failure
    if failure is None:
        return outcome
    error_type = safe_text(failure.error_type, MAX_NAME_CHARS)
    message = safe_text(failure.message)
    if (error_type, message) == (failure.error_type, failure.message):
        return outcome
    return replace(outcome, failure=replace(failure, error_type=error_type, message=message))
