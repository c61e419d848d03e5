"""Celery workers as sagaline participants: one line reports the outcome of every task a
workflow started (``ctx.celery``) back to the workflow.

In the Celery app's module (or ``celeryconfig``'s importer)::

    from participants.celery import attach

    attach(app)  # SAGALINE_KAFKA_BOOTSTRAP and SAGALINE_TOPIC_PREFIX from the environment

The task functions are unchanged. A task the orchestrator sent carries headers naming its
workflow step; when it returns, its value (converted by the converter, JSON by default) is
published to the workflow's inbox as the step's result, and when it raises, the exception
as the step's failure (its class name is the error type; ``participants.ActivityFailure``
keeps its ``retryable`` flag). The workflow's retry policy decides what happens next.
Tasks sent any other way are left alone.

The outcome is published and flushed from Celery's ``task_success`` / ``task_failure``
signals, which the worker sends before it acknowledges a task (with ``acks_late``), so a
worker killed before the ack runs the task again and publishes again: the orchestrator
takes the first outcome of an attempt and ignores the rest. Such a task's effects are at
least once.

A task whose class is :class:`ExactlyOnceTask` and which writes through ``self.db`` has
its effects exactly once: its writes and its outcome commit in one PostgreSQL transaction
(the idempotency inbox native participants use), so a redelivered task is answered with
the stored outcome and does not run again::

    @app.task(base=ExactlyOnceTask, bind=True, acks_late=True)
    def charge_card(self, order_id, amount):
        self.db.execute("INSERT INTO payments ...", (...))
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import psycopg
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded, WorkerLostError
from celery.signals import (
    task_failure,
    task_prerun,
    task_success,
    task_unknown,
    worker_init,
    worker_shutdown,
)
from confluent_kafka import KafkaError, Message, Producer
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server
from psycopg.pq import TransactionStatus

from orchestrator import metrics
from orchestrator.convert import DEFAULT_CONVERTER, DataConverter
from orchestrator.errors import ConfigurationError
from orchestrator.protocol.celery import (
    ATTEMPT_HEADER,
    CELERY_PARTICIPANT,
    REPORT_START_HEADER,
    SEQ_HEADER,
    WORKFLOW_ID_HEADER,
)
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.failures import describe, safe_text
from orchestrator.protocol.payloads import PayloadEncodingError
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityStarted,
    ActivityStatus,
    ActivityTask,
    Failure,
    InboxBody,
    Payload,
    activity_id,
)
from orchestrator.settings import CelerySettings, KafkaSettings, ParticipantSettings
from participants.delivery import ResultDeliveryError, result_record
from participants.idempotency import (
    MAX_ACTIVITY_ID_BYTES,
    ensure_schema,
    execute_task,
    is_connection_level,
    settle_attempt,
)
from participants.participant import (
    AttemptReporter,
    Outcome,
    attempt_deadline,
    handler_failure,
    wall_clock_ms,
)

log = logging.getLogger(__name__)
# How long a worker waits for Kafka to take an outcome before it gives up on it (the step
# then times out and is retried, if it has a timeout).
DELIVERY_TIMEOUT_S: Final = 30.0


class CeleryOutcomes:
    """Publishes the outcomes of the tasks workflows started to their inboxes."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        converter: DataConverter = DEFAULT_CONVERTER,
        codec: AvroCodec | None = None,
        max_record_bytes: int = 900_000,
    ) -> None:
        """``max_record_bytes``: the largest inbox record the orchestrators take (their
        ``SAGALINE_MAX_RECORD_BYTES``); a larger result is reported as ``ResultTooLarge``
        (its effects committed), as native participants do."""
        self.topics = settings.topics
        self.converter = converter
        self.codec = codec or AvroCodec()
        self._config = {
            **settings.kafka_common(),
            "enable.idempotence": True,
            "acks": "all",
            # The inbox is partitioned by workflow id as Kafka's Java client does it.
            "partitioner": "murmur2_random",
            "linger.ms": 0,
        }
        self._producer: Producer | None = None
        self._pid = 0
        # Producers a forked child inherited: dropping one would tear down its parent's
        # threads' state in the child (a stall, and librdkafka's "was process forked?").
        self._inherited: list[Producer] = []
        # Set by attach: settles the attempt of an exactly-once task that ended outside
        # its body (the pool's process lost, a hard time limit) through the inbox.
        self.settle: (
            Callable[[Any, tuple[str, str, int, int], Failure, float], Outcome | None] | None
        ) = None
        self._settling: set[str] = set()
        self._threads: set[threading.Thread] = set()
        _after_fork_in_child(self._after_fork)
        self._lock = threading.Lock()
        self.max_record_bytes = max_record_bytes
        self.published = 0

    @property
    def producer(self) -> Producer:
        """This process's producer. ``attach`` runs in the worker's main process, before
        the prefork pool forks its children, and a Kafka client does not survive a fork:
        each process makes its own on first use (once, whatever threads ask at once)."""
        with self._lock:
            if self._producer is None or self._pid != os.getpid():
                if self._producer is not None:
                    self._inherited.append(self._producer)
                self._producer = Producer(self._config)
                self._pid = os.getpid()
            return self._producer

    def starting(self, sender: Any = None, **_: Any) -> None:
        """``task_prerun`` handler: report the start of a step whose start-to-close
        timeout counts from it (best effort, as native participants do)."""
        step = _step_of(sender)
        if step is None or getattr(sender.request, REPORT_START_HEADER, False) is not True:
            return
        workflow_id, activity_id, seq, attempt = step
        # The start the workflow counts from is the one the task's deadline counts from.
        first = _first_start_ms(sender.request)
        started = ActivityStarted(workflow_id, activity_id, seq, attempt, first)
        self._send(started, workflow_id, activity_id)

    def succeeded(self, sender: Any = None, result: Any = None, **_: Any) -> None:
        """``task_success`` handler: the task returned ``result``."""
        step = _step_of(sender)
        if step is None:
            return
        if self._publish_stored(sender, step):
            return
        try:
            payload = self.converter.to_payload(result)
        except PayloadEncodingError as exc:
            # The task ran to its end: whatever it wrote stays written.
            failure = Failure(
                "PayloadEncodingError",
                safe_text(f"task result: {exc}"),
                retryable=False,
                effects_committed=True,
            )
            self._publish(
                step,
                ActivityStatus.FAILED,
                failure=failure,
                task=getattr(sender, "name", _UNKNOWN_TASK),
            )
            return
        self._publish(
            step,
            ActivityStatus.COMPLETED,
            result=payload,
            task=getattr(sender, "name", _UNKNOWN_TASK),
        )

    def failed(
        self,
        sender: Any = None,
        exception: BaseException | None = None,
        task_id: Any = None,
        **_: Any,
    ) -> None:
        """``task_failure`` handler: the task raised ``exception`` (Celery's own retries,
        ``self.retry`` and ``autoretry_for``, happen before this, within one attempt), or
        the worker's main process ended it (a pool process lost, a hard time limit)."""
        exactly_once = isinstance(sender, ExactlyOnceTask)
        step = _step_of(sender)
        without_request = step is None
        if step is None and exactly_once:
            # A hard time limit is reported without the task's request: the task id is
            # the activity id, which names the step.
            step = _step_from_activity_id(task_id)
        if step is None:
            return
        if self._publish_stored(sender, step):
            return
        # Celery hands the signal a picklable stand-in of the exception (a wrapper, or
        # the nearest picklable base class); where the task raised, the original is the
        # one being handled, with its own class name and retryable flag.
        raised = sys.exc_info()[1]
        error = raised if raised is not None else exception
        if error is None:
            error = RuntimeError("the task failed")
        failure = handler_failure(error)
        task = getattr(sender, "name", _UNKNOWN_TASK)
        if exactly_once and self.settle is not None:
            # No outcome was stored by this call: the body may still have committed (the
            # pool's process died between COMMIT and the publish), so the inbox decides.
            if (
                without_request
                or isinstance(error, _POOL_ENDINGS)
                or isinstance(exception, _POOL_ENDINGS)
            ):
                # Reported by the worker's main process, which may not have stopped the
                # pool's process yet (a hard time limit kills it after this signal): its
                # transaction still holds the attempt's lock, so wait for it off the loop.
                self._settle_later(sender, step, failure, task)
            else:
                self._settle_now(sender, step, failure, task, patience_s=0.0)
            return
        self._publish(step, ActivityStatus.FAILED, failure=failure, task=task)

    def _settle_now(
        self,
        sender: Any,
        step: tuple[str, str, int, int],
        failure: Failure,
        task: str,
        *,
        patience_s: float,
    ) -> None:
        assert self.settle is not None
        settled = self.settle(sender, step, failure, patience_s)
        if settled is None:
            return  # unknown: the step's own timeout retries it
        self._publish(
            step, settled.status, result=settled.result, failure=settled.failure, task=task
        )

    def _settle_later(
        self, sender: Any, step: tuple[str, str, int, int], failure: Failure, task: str
    ) -> None:
        with self._lock:
            if step[1] in self._settling:
                return  # Celery reports a hard time limit twice
            self._settling.add(step[1])

        def settle() -> None:
            try:
                self._settle_now(sender, step, failure, task, patience_s=_SETTLE_PATIENCE_S)
            finally:
                with self._lock:
                    self._settling.discard(step[1])

        thread = threading.Thread(target=settle, name="sagaline-settle", daemon=True)
        with self._lock:
            self._threads = {t for t in self._threads if t.is_alive()} | {thread}
        thread.start()

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for settles under way (``worker_shutdown``): a settle lost with the process
        leaves its step to its timeout."""
        end = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))

    def _after_fork(self) -> None:
        # A fork copies a lock held by another thread (a settle) as held for ever.
        self._lock = threading.Lock()
        self._settling = set()
        self._threads = set()

    def unknown(self, message: Any = None, name: str = "", **_: Any) -> None:
        """``task_unknown`` handler: no task of that name is registered on this worker (a
        misspelt name, workers of another version on the queue); the step fails,
        retryably, as a native participant answers an activity it lacks."""
        step = _step_in(getattr(message, "headers", None))
        if step is None:
            return
        failure = Failure(
            "UnknownTask",
            safe_text(
                f"no task {name!r} is registered on the Celery worker that took it; "
                "deploy the task or fix the name"
            ),
            retryable=True,
        )
        self._publish(step, ActivityStatus.FAILED, failure=failure, task=_UNKNOWN_TASK)

    def _publish_stored(self, sender: Any, step: tuple[str, str, int, int]) -> bool:
        """Publish the outcome an :class:`ExactlyOnceTask` stored (or found stored) for
        this call, exactly as stored; False when the call stored none."""
        stored = getattr(sender.request, _OUTCOME_ATTR, None)
        if not isinstance(stored, Outcome):
            return False
        self._publish(
            step,
            stored.status,
            result=stored.result,
            failure=stored.failure,
            task=getattr(sender, "name", _UNKNOWN_TASK),
        )
        return True

    def _publish(
        self,
        step: tuple[str, str, int, int],
        status: ActivityStatus,
        *,
        result: Any = None,
        failure: Failure | None = None,
        task: str,
    ) -> None:
        workflow_id, activity_id, seq, attempt = step
        outcome = ActivityResult(
            workflow_id=workflow_id,
            activity_id=activity_id,
            seq=seq,
            attempt=attempt,
            status=status,
            finished_at_ms=wall_clock_ms(),
            result=result,
            failure=failure,
        )
        try:
            # Too large for the inbox: a ResultTooLarge failure instead, as participants do.
            record = result_record(outcome, self.topics, self.codec, self.max_record_bytes)
        except ResultDeliveryError:
            log.exception("cannot report the outcome of %s", safe_text(activity_id, 300))
            metrics.child(metrics.CELERY_OUTCOMES_LOST, task).inc()
            return
        if self._produce(record.value, workflow_id, activity_id):
            self.published += 1
            sent = record.result.status if record.result is not None else outcome.status
            published = sent.value.lower()
            metrics.child(metrics.CELERY_OUTCOMES, task, published).inc()
        else:
            metrics.child(metrics.CELERY_OUTCOMES_LOST, task).inc()

    def _send(self, body: InboxBody, workflow_id: str, activity_id: str) -> bool:
        return self._produce(self.codec.encode_inbox(body), workflow_id, activity_id)

    def _produce(self, value: bytes | None, workflow_id: str, activity_id: str) -> bool:
        """Produce ``value`` to the inbox and wait for Kafka's delivery report; False if
        it was not delivered (logged: the step's timeout then retries it)."""
        errors: list[KafkaError] = []
        delivered: list[bool] = []

        def report(error: KafkaError | None, _msg: Message) -> None:
            if error is None:
                delivered.append(True)
            else:
                errors.append(error)

        producer = self.producer  # one producer for both calls
        try:
            producer.produce(self.topics.inbox, value, workflow_id.encode(), on_delivery=report)
            producer.flush(DELIVERY_TIMEOUT_S)
        except Exception:  # a full queue, a record Kafka refuses: say so, never crash a task
            log.exception("cannot publish for %s", safe_text(activity_id, 300))
            return False
        if not delivered:
            log.error(
                "a record for %s was not delivered within %.0f s: %s",
                safe_text(activity_id, 300),
                DELIVERY_TIMEOUT_S,
                errors[0] if errors else "no delivery report",
            )
            return False
        return True


# --- exactly-once tasks ----------------------------------------------------------------

_OUTCOME_ATTR: Final = "sagaline_outcome"
FIRST_START_HEADER: Final = "sagaline_first_start_ms"
# Failures the worker's main process reports for a task its pool's process did not end.
_POOL_ENDINGS: Final = (TimeLimitExceeded, WorkerLostError)
_UNKNOWN_TASK: Final = "<unknown>"
# Waits between tries while PostgreSQL is unreachable; the task's hard time limit, if it
# has one, ends the waiting.
_DB_RETRY_DELAYS_S: Final = (0.1, 0.5, 1.0, 2.0, 5.0)
_NO_PAYLOAD: Final = Payload(b"null")
# How long settling an attempt waits for a transaction of it that is still open (its
# process just died; PostgreSQL ends it when it notices): longer, and the answer is
# left to the step's timeout.
_SETTLE_LOCK_TIMEOUT_MS: Final = 5_000
STARTS_TABLE: Final = "sagaline_celery_attempt_starts"
_STARTS_SQL: Final = f"""CREATE TABLE IF NOT EXISTS {STARTS_TABLE} (
    activity_id text PRIMARY KEY,
    started_ms bigint NOT NULL
)"""
# The first start of an attempt, whichever delivery of it asks: a message delivered again
# after its worker died counts its start-to-close from the start the workflow counts from.
_RECORD_START_SQL: Final = f"""
INSERT INTO {STARTS_TABLE} (activity_id, started_ms) VALUES (%s, %s)
ON CONFLICT (activity_id) DO UPDATE SET activity_id = EXCLUDED.activity_id
RETURNING started_ms
"""
# How long the worker's main process waits in the background for a pool process it is
# stopping (a hard time limit: SIGTERM, then SIGKILL) to let go of the attempt.
_SETTLE_PATIENCE_S: Final = 60.0


class StepFailedError(Exception):
    """Raised by an :class:`ExactlyOnceTask` whose attempt failed without an exception of
    its own to raise again: an outcome found in the idempotency inbox (a redelivery), or
    one the inbox put in place of the task's (a result past the step's deadline, or one
    PostgreSQL refused). ``failure`` is what the workflow was told."""

    def __init__(self, failure: Failure, *, stored_earlier: bool) -> None:
        when = "stored by an earlier delivery" if stored_earlier else "stored"
        super().__init__(f"{failure.error_type}: {failure.message} ({when})")
        self.failure = failure
        self.stored_earlier = stored_earlier

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery pickles what a task raised (its result, its events).
        return (_step_failed, (self.failure, self.stored_earlier))


def _step_failed(failure: Failure, stored_earlier: bool) -> StepFailedError:
    return StepFailedError(failure, stored_earlier=stored_earlier)


class _Bypass(BaseException):
    """Carries Celery's control-flow exceptions (``Retry``, ``Ignore``, ``Reject``) and
    the ones that end the process (``SystemExit``, ``KeyboardInterrupt``) past the inbox,
    which would store them as the attempt's outcome; the attempt then takes no effect and
    stores nothing."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


_current = threading.local()


def _running_session() -> psycopg.Connection[Any] | None:
    """The connection of the task running on this thread, if one is."""
    stack: list[psycopg.Connection[Any]] = getattr(_current, "stack", [])
    return stack[-1] if stack else None


def _session_of_current_task() -> psycopg.Connection[Any]:
    stack: list[psycopg.Connection[Any]] = getattr(_current, "stack", [])
    if not stack:
        raise RuntimeError(
            "self.db is the running task's transaction: use it in the body of an "
            "ExactlyOnceTask while it runs (not at import, nor from another thread)"
        )
    return stack[-1]


class _Session:
    """Makes ``conn`` the running task's ``db`` for the duration of a ``with`` block."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def __enter__(self) -> psycopg.Connection[Any]:
        if not hasattr(_current, "stack"):
            _current.stack = []
        _current.stack.append(self.conn)
        return self.conn

    def __exit__(self, *_: object) -> None:
        _current.stack.pop()


@dataclass(frozen=True)
class _Schema:
    """The inbox owner whose tables :func:`ensure_schema` creates: Celery steps share the
    reserved participant name, so their rows never meet a native participant's."""

    setup_sql: str = ""
    name: str = CELERY_PARTICIPANT


@dataclass
class _Call:
    """One call of an exactly-once task, run by the idempotency inbox
    (a :class:`participants.idempotency.TaskRunner`)."""

    task: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    converter: DataConverter
    setup_sql: str = ""
    name: str = CELERY_PARTICIPANT
    # When the call began, retries on a fresh connection included: the attempt's
    # deadline counts from it (by default, from when the body starts).
    started_ms: int | None = None
    raised: BaseException | None = None
    returned: Any = None

    def metric_label(self, activity: str) -> str:
        # Task names a worker runs are the ones registered on it: bounded.
        return f"{CELERY_PARTICIPANT}.{activity}"

    def run_task(
        self,
        task: ActivityTask,
        db: psycopg.Connection[Any],
        *,
        now_ms: Callable[[], int] = wall_clock_ms,
        reporter: AttemptReporter | None = None,
    ) -> Outcome:
        self.raised, self.returned = None, None
        now = now_ms()
        deadline = attempt_deadline(task, self.started_ms if self.started_ms is not None else now)
        if deadline is not None and now >= deadline.at_ms:
            # A Celery retry of the attempt, or a delivery after a wait for the database,
            # that comes after the workflow has timed the attempt out: it must not run.
            return Outcome.failed(deadline.failure(task, ran=False), now)
        try:
            with _Session(db):
                returned = self.task.run(*self.args, **self.kwargs)
        except (Retry, Ignore, Reject, SystemExit, KeyboardInterrupt) as control:
            # Celery's own control flow, and the pool ending the process (a hard time
            # limit, a cold shutdown): the attempt stores nothing, as if the process died.
            raise _Bypass(control) from None
        except BaseException as exc:
            # As for native handlers: whatever the task raised is this attempt's failure.
            self.raised = exc
            return Outcome.failed(handler_failure(exc), now_ms())
        finished = now_ms()
        if deadline is not None and finished > deadline.at_ms:
            # The workflow has timed this attempt out and may run another: its writes must
            # not commit now (only the threads and solo pools let a task run this long).
            return Outcome.failed(deadline.failure(task, ran=True, late=True), finished)
        try:
            payload = self.converter.to_payload(returned)
        except (SystemExit, KeyboardInterrupt) as ending:
            raise _Bypass(ending) from None
        except BaseException as exc:
            failure = Failure(
                "PayloadEncodingError",
                safe_text(f"task result: {describe(exc)}; its writes were rolled back"),
                retryable=False,
            )
            return Outcome.failed(failure, finished)
        self.returned = returned
        return Outcome.completed(payload, finished)


class _Sessions:
    """PostgreSQL connections of exactly-once tasks: one per process and thread, made on
    first use (none in a worker whose tasks never ask), the inbox table created once per
    process."""

    def __init__(
        self, settings: CelerySettings, setup_sql: str, *, lock_timeout_ms: int = 0
    ) -> None:
        self._dsn = settings.postgres_dsn
        _after_fork_in_child(self._after_fork)
        # The session's default (RESET ALL in the inbox's statements keeps it).
        self._options = f"-c lock_timeout={lock_timeout_ms}" if lock_timeout_ms else ""
        self._timeout_s = max(2, math.ceil(settings.db_connect_timeout_s))
        self._schema = _Schema(f"{_STARTS_SQL};\n{setup_sql}")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._schema_pid = 0
        # Connections a forked child inherited: its parent's, never to be used or closed
        # here (closing one would end the parent's session too).
        self._inherited: list[psycopg.Connection[Any]] = []

    def get(self) -> psycopg.Connection[Any]:
        """This thread's connection, in autocommit mode."""
        held: tuple[int, psycopg.Connection[Any]] | None = getattr(self._local, "held", None)
        pid = os.getpid()
        if held is not None:
            owner, conn = held
            if owner != pid:
                self._inherited.append(conn)
            elif conn.closed or conn.broken:
                pass
            elif conn.info.transaction_status is TransactionStatus.IDLE:
                return conn
            else:
                # Never carry a transaction left open into the next task's attempt.
                log.warning("a connection was left inside a transaction; replacing it")
                _close(conn)
            self._local.held = None
        conn = self.connect()
        self._local.held = (pid, conn)
        return conn

    def connect(self) -> psycopg.Connection[Any]:
        """A new connection, in autocommit mode, that the caller closes."""
        params: dict[str, Any] = {"connect_timeout": self._timeout_s}
        if self._options:
            params["options"] = self._options
        conn = psycopg.connect(self._dsn.get_secret_value(), autocommit=True, **params)
        try:
            with self._lock:
                if self._schema_pid != os.getpid():
                    ensure_schema(conn, self._schema)
                    self._schema_pid = os.getpid()
        except BaseException:
            _close(conn)
            raise
        return conn

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def drop(self) -> None:
        """Forget this thread's connection (after a connection-level error)."""
        held: tuple[int, psycopg.Connection[Any]] | None = getattr(self._local, "held", None)
        self._local.held = None
        if held is not None and held[0] == os.getpid():
            _close(held[1])


def _close(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.close()
    except psycopg.Error:
        log.debug("closing a failed connection failed", exc_info=True)


@dataclass
class _Integration:
    """What :func:`attach` set up for one Celery app."""

    outcomes: CeleryOutcomes
    sessions: _Sessions
    settling: _Sessions
    converter: DataConverter
    setup_sql: str
    retry_delays_s: tuple[float, ...] = field(default=_DB_RETRY_DELAYS_S)

    def settle(
        self,
        task: Any,
        step: tuple[str, str, int, int],
        failure: Failure,
        patience_s: float = 0.0,
    ) -> Outcome | None:
        """The outcome of an exactly-once attempt that ended outside its body: the one
        its transaction stored, or ``failure``, stored now. None when the inbox cannot
        tell (PostgreSQL unreachable, or the attempt's transaction still open after
        ``patience_s`` and one lock wait): nothing is published and the step's timeout
        retries it."""
        attempt_task = _attempt_task(task, step)
        ended = Outcome.failed(failure, wall_clock_ms())
        give_up_at = time.monotonic() + patience_s
        while True:
            try:
                # Rare (a process lost, a time limit), and maybe on a thread of its own: a
                # connection for this alone.
                with self.settling.connect() as conn:
                    execution = settle_attempt(conn, _Schema(self.setup_sql), attempt_task, ended)
                break
            except psycopg.errors.LockNotAvailable:
                # Its lock wait is over: the attempt's transaction is still open.
                if time.monotonic() < give_up_at:
                    continue
                exc: Exception = TimeoutError(
                    "the attempt's transaction was still open after "
                    f"{patience_s + _SETTLE_LOCK_TIMEOUT_MS / 1000:.0f} s"
                )
            except Exception as error:
                exc = error
            log.error(
                "cannot tell how an attempt ended; its step's timeout retries it task=%s "
                "activity_id=%s error=%s",
                getattr(task, "name", _UNKNOWN_TASK),
                safe_text(step[1], 300),
                describe(exc),
            )
            return None
        if execution.duplicate:
            log.warning(
                "attempt ended outside its task body after its outcome was stored; "
                "publishing the stored outcome task=%s activity_id=%s",
                getattr(task, "name", _UNKNOWN_TASK),
                safe_text(step[1], 300),
            )
        return execution.outcome

    def run_plain(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call no workflow sent (``.delay()``, a direct call): the writes commit when
        the task returns and roll back when it raises; nothing is stored. Called from the
        body of a running task, it joins that task's transaction (as a savepoint)."""
        with ExitStack() as stack:
            conn = self._plain_transaction(stack)
            with _Session(conn):
                if task.request.called_directly:
                    return Task.__call__(task, *args, **kwargs)
                return task.run(*args, **kwargs)

    def _plain_transaction(self, stack: ExitStack) -> psycopg.Connection[Any]:
        """Open the plain call's transaction on ``stack``; a connection found dead when
        it begins (nothing has run yet) is replaced, as often as it takes."""
        running = _running_session()
        if running is not None:
            stack.enter_context(running.transaction())
            return running
        tries = 0
        while True:
            try:
                conn = self.sessions.get()
                stack.enter_context(conn.transaction())
                return conn
            except Exception as exc:
                if not is_connection_level(exc):
                    raise
                self.sessions.drop()
                tries += 1
                log.warning(
                    "database unreachable before a task ran; try=%d error=%s", tries, describe(exc)
                )
                time.sleep(self.retry_delays_s[min(tries, len(self.retry_delays_s)) - 1])

    def run_step(
        self, task: Any, step: tuple[str, str, int, int], args: tuple[Any, ...], kwargs: Any
    ) -> Any:
        """A workflow step: at most once to completion, through the idempotency inbox."""
        request = task.request
        attempt_task = _attempt_task(task, step)
        call = _Call(
            task,
            tuple(args),
            dict(kwargs),
            self.converter,
            self.setup_sql,
            started_ms=_first_start_ms(request),
        )
        tries = 0
        while True:
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = self.sessions.get()
                if attempt_task.start_to_close_ms is not None and call.started_ms is not None:
                    call.started_ms = _recorded_start(conn, step[1], call.started_ms)
                execution = execute_task(conn, call, attempt_task)
                break
            except _Bypass as bypass:
                if conn is not None and not _roll_back(conn):
                    self.sessions.drop()
                raise bypass.error from None
            except Exception as exc:
                # Whether a failed COMMIT committed is unknown: never report a failure
                # for it (the workflow would run another attempt); ask again on a fresh
                # connection, where the inbox's lookup tells.
                if not is_connection_level(exc):
                    raise
                self.sessions.drop()
                tries += 1
                delay = self.retry_delays_s[min(tries, len(self.retry_delays_s)) - 1]
                log.warning(
                    "idempotency inbox unreachable task=%s activity_id=%s try=%d error=%s",
                    task.name,
                    safe_text(step[1], 300),
                    tries,
                    describe(exc),
                )
                time.sleep(delay)  # backing off from an unreachable database
        outcome = execution.outcome
        setattr(request, _OUTCOME_ATTR, outcome)
        if outcome.is_completed:
            if not execution.duplicate:
                return call.returned
            log.info(
                "redelivered task answered from the idempotency inbox task=%s activity_id=%s",
                task.name,
                safe_text(step[1], 300),
            )
            return _stored_value(outcome, self.converter)
        if call.raised is not None and not execution.duplicate:
            raise call.raised
        assert outcome.failure is not None
        raise StepFailedError(outcome.failure, stored_earlier=execution.duplicate)


def _attempt_task(task: Any, step: tuple[str, str, int, int]) -> ActivityTask:
    """The inbox's view of one Celery step attempt: its ids, and its deadlines as the
    message carries them (``expires``, the hard time limit)."""
    workflow_id, attempt_id, seq, attempt = step
    request = task.request
    return ActivityTask(
        workflow_id=workflow_id,
        workflow_type="",
        activity_id=attempt_id,
        seq=seq,
        attempt=attempt,
        participant=CELERY_PARTICIPANT,
        activity=getattr(task, "name", _UNKNOWN_TASK),
        payload=_NO_PAYLOAD,
        scheduled_at_ms=0,
        deadline_ms=_epoch_ms(getattr(request, "expires", None)),
        start_to_close_ms=_hard_limit_ms(getattr(request, "timelimit", None)),
    )


def _recorded_start(conn: psycopg.Connection[Any], attempt_id: str, started_ms: int) -> int:
    """The attempt's first start, recorded now if this is it (one autocommit statement);
    ``started_ms`` for an id the inbox refuses anyway (InvalidActivityId)."""
    try:
        size = len(attempt_id.encode())
    except UnicodeEncodeError:
        return started_ms
    if "\x00" in attempt_id or size > MAX_ACTIVITY_ID_BYTES:
        return started_ms
    row = conn.execute(_RECORD_START_SQL, (attempt_id, started_ms)).fetchone()
    return started_ms if row is None else int(row[0])


def _roll_back(conn: psycopg.Connection[Any]) -> bool:
    """Roll back what an attempt left open; False if the connection cannot be trusted
    any more."""
    if conn.closed or conn.broken:
        return False
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        log.warning("rolling back a task's transaction failed", exc_info=True)
        return False
    return True


def _stored_value(outcome: Outcome, converter: DataConverter) -> Any:
    """The stored result as plain data, for Celery's own bookkeeping (its result is
    ignored: the workflow gets the stored payload itself)."""
    if outcome.result is None:
        return None
    try:
        return converter.from_payload(outcome.result)
    except Exception:
        return None


def _first_start_ms(request: Any) -> int:
    """When the attempt's first run began (epoch ms): the step's start-to-close counts from
    it in the workflow, so a Celery retry of the attempt counts from it too. Written into
    the request's headers, which Celery copies into the retried message."""
    headers = request.headers if isinstance(request.headers, dict) else {}
    # A retried message carries it as a request attribute; this run stamped it in the
    # headers if it began with the start report.
    for found in (getattr(request, FIRST_START_HEADER, None), headers.get(FIRST_START_HEADER)):
        if type(found) is int and found > 0:
            return found
    now = wall_clock_ms()
    headers[FIRST_START_HEADER] = now
    request.headers = headers
    return now


def _epoch_ms(expires: Any) -> int | None:
    """Celery's ``expires`` (an ISO 8601 text or a datetime) in epoch milliseconds."""
    if isinstance(expires, str):
        try:
            expires = datetime.fromisoformat(expires)
        except ValueError:
            return None
    if not isinstance(expires, datetime) or expires.tzinfo is None:
        return None
    return int(expires.timestamp() * 1000)


def _hard_limit_ms(timelimit: Any) -> int | None:
    """The hard time limit of Celery's ``(hard, soft)`` pair, in milliseconds."""
    if not isinstance(timelimit, list | tuple) or not timelimit:
        return None
    hard = timelimit[0]
    if isinstance(hard, bool) or not isinstance(hard, int | float) or hard <= 0:
        return None
    return int(hard * 1000)


_INTEGRATIONS: weakref.WeakKeyDictionary[Any, _Integration] = weakref.WeakKeyDictionary()


def _integration(app: Any) -> _Integration:
    found = _INTEGRATIONS.get(app)
    if found is None:
        raise ConfigurationError(
            f"Celery app {getattr(app, 'main', app)!r} has no sagaline integration: call "
            "participants.celery.attach(app) where the app is made, before its "
            "ExactlyOnceTask tasks run"
        )
    return found


class ExactlyOnceTask(Task):  # type: ignore[misc]  # Celery is untyped
    """Base class of tasks whose effects happen exactly once per workflow attempt.

    ``@app.task(base=ExactlyOnceTask, bind=True, acks_late=True)``; the task writes
    through ``self.db`` (``celery.current_task.db`` in a task without ``bind``), a
    psycopg connection inside a transaction of the idempotency inbox. When the task
    returns, its writes and its outcome commit together; when it raises, its writes roll
    back and the failure is stored. A redelivered task (the worker died before its ack)
    finds the stored outcome and does not run again; the workflow is sent that outcome.

    Celery's ``self.retry`` and ``autoretry_for`` still work: a retry rolls the writes back
    and stores nothing. A call no workflow sent (``.delay()``, a direct call) runs in a
    plain transaction, committed when it returns. Writes outside this database (an HTTP
    call, another database) are not covered: make them idempotent, keyed by
    ``self.request.id`` (the activity id).
    """

    @property
    def db(self) -> psycopg.Connection[Any]:
        """The running call's PostgreSQL connection, inside its transaction: never commit
        or roll it back yourself (``with self.db.transaction():`` nests a savepoint)."""
        return _session_of_current_task()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        integration = _integration(self.app)
        # Called from the body of a running task (itself included): that task's request
        # is still the current one, but this call is a plain one inside its transaction.
        nested = _running_session() is not None
        step = None if nested or self.request.called_directly else _step_of(self)
        if step is None:
            return integration.run_plain(self, args, kwargs)
        return integration.run_step(self, step, args, kwargs)


def _after_fork_in_child(method: Callable[[], None]) -> None:
    """Call the bound ``method`` in every forked child while its object lives (held
    weakly: a fork hook can never be removed)."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        found = ref()
        if found is not None:
            found()

    os.register_at_fork(after_in_child=call)


def _step_of(task: Any) -> tuple[str, str, int, int] | None:
    """The workflow step a task's request answers (workflow id, activity id, step,
    attempt), or None for a task no workflow sent."""
    request = getattr(task, "request", None)
    return _step(
        getattr(request, WORKFLOW_ID_HEADER, None),
        getattr(request, "id", None),
        getattr(request, SEQ_HEADER, None),
        getattr(request, ATTEMPT_HEADER, None),
    )


def _step_from_activity_id(task_id: Any) -> tuple[str, str, int, int] | None:
    """The step a Celery task id names, when it is an activity id
    (``<workflow id>/<run id>/<step>/<attempt>``)."""
    if not isinstance(task_id, str):
        return None
    parts = task_id.rsplit("/", 3)
    if len(parts) != 4 or not parts[2].isdigit() or not parts[3].isdigit():
        return None
    workflow_id, run_id, seq, attempt = parts[0], parts[1], int(parts[2]), int(parts[3])
    if not workflow_id or activity_id(workflow_id, seq, attempt, run_id) != task_id:
        return None
    return workflow_id, task_id, seq, attempt


def _step_in(headers: Any) -> tuple[str, str, int, int] | None:
    """``_step_of`` for a message's headers (a task the worker could not run)."""
    if not isinstance(headers, dict):
        return None
    return _step(
        headers.get(WORKFLOW_ID_HEADER),
        headers.get("id"),
        headers.get(SEQ_HEADER),
        headers.get(ATTEMPT_HEADER),
    )


def _step(
    workflow_id: Any, task_id: Any, seq: Any, attempt: Any
) -> tuple[str, str, int, int] | None:
    if (
        not isinstance(workflow_id, str)
        or not isinstance(task_id, str)
        or type(seq) is not int
        or type(attempt) is not int
    ):
        return None
    return workflow_id, task_id, seq, attempt


def attach(
    app: Any,
    settings: KafkaSettings | None = None,
    *,
    converter: DataConverter = DEFAULT_CONVERTER,
    setup_sql: str = "",
) -> CeleryOutcomes:
    """Report the outcome of every task a workflow sent to ``app``'s workers, and let its
    :class:`ExactlyOnceTask` tasks run; returns the publisher (its ``published`` counts
    outcomes).

    Args:
        app: the Celery app.
        settings: Kafka, PostgreSQL and metrics settings
            (:class:`~orchestrator.settings.CelerySettings`), by default from ``SAGALINE_*``
            in the environment; a plain ``KafkaSettings`` takes the rest from there.
        converter: turns task results into payloads (JSON by default).
        setup_sql: SQL that creates the tasks' tables (idempotent: ``IF NOT EXISTS``),
            run with the inbox table's own when a process first connects.
    """
    config = _celery_settings(settings)
    outcomes = CeleryOutcomes(config, converter=converter, max_record_bytes=config.max_record_bytes)
    integration = _Integration(
        outcomes,
        _Sessions(config, setup_sql),
        _Sessions(config, setup_sql, lock_timeout_ms=_SETTLE_LOCK_TIMEOUT_MS),
        converter,
        setup_sql,
    )
    outcomes.settle = integration.settle
    _INTEGRATIONS[app] = integration

    def succeeded(sender: Any = None, result: Any = None, **kwargs: Any) -> None:
        if sender is not None and getattr(sender, "app", None) is app:
            outcomes.succeeded(sender, result, **kwargs)

    def failed(sender: Any = None, exception: BaseException | None = None, **kwargs: Any) -> None:
        if sender is not None and getattr(sender, "app", None) is app:
            outcomes.failed(sender, exception, **kwargs)

    def starting(sender: Any = None, **kwargs: Any) -> None:
        if sender is not None and getattr(sender, "app", None) is app:
            outcomes.starting(sender, **kwargs)

    def unknown(sender: Any = None, **kwargs: Any) -> None:
        if getattr(sender, "app", None) is app:
            outcomes.unknown(**kwargs)

    def serve_metrics(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            _serve_metrics(config)

    def drain(sender: Any = None, **_: Any) -> None:
        outcomes.drain()

    worker_init.connect(serve_metrics, weak=False)
    worker_shutdown.connect(drain, weak=False)
    task_unknown.connect(unknown, weak=False)
    task_prerun.connect(starting, weak=False)
    task_success.connect(succeeded, weak=False)
    task_failure.connect(failed, weak=False)
    return outcomes


def _celery_settings(settings: KafkaSettings | None) -> CelerySettings:
    if isinstance(settings, CelerySettings):
        return settings
    if settings is None:
        return CelerySettings()
    given: dict[str, Any] = {
        "kafka_bootstrap": settings.kafka_bootstrap,
        "topic_prefix": settings.topic_prefix,
        "kafka_extra": settings.kafka_extra,
    }
    if isinstance(settings, ParticipantSettings):
        given.update(
            postgres_dsn=settings.postgres_dsn,
            db_connect_timeout_s=settings.db_connect_timeout_s,
            max_record_bytes=settings.max_record_bytes,
        )
    return CelerySettings(**given)


def _serve_metrics(config: CelerySettings) -> None:
    """Serve ``/metrics`` from the worker's main process (``worker_init``).

    The prefork pool's processes count in their own memory; with ``PROMETHEUS_MULTIPROC_DIR``
    set (prometheus_client's multiprocess mode, as for gunicorn) the main process serves
    the sum of them all.
    """
    port = config.celery_metrics_port
    if port == 0:
        return
    registry: CollectorRegistry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    try:
        start_http_server(port, addr=config.metrics_host, registry=registry)
    except OSError as exc:
        raise ConfigurationError(
            f"SAGALINE_CELERY_METRICS_PORT={port}: cannot serve /metrics on "
            f"{config.metrics_host}:{port} ({exc.strerror or exc}); choose a free port or 0"
        ) from exc
    log.info("sagaline metrics served on http://%s:%d/metrics", config.metrics_host, port)


__all__ = [
    "DELIVERY_TIMEOUT_S",
    "CeleryOutcomes",
    "ExactlyOnceTask",
    "StepFailedError",
    "attach",
]
