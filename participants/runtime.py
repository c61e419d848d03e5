"""The participant process: consume tasks, run them through the idempotency inbox, publish results.

Invariant: a task's offset is committed only after its outcome is durable (committed in
PostgreSQL when it must be remembered) and its result (or dead letter) is acknowledged by
Kafka with ``acks=all``. A crash anywhere before the commit makes Kafka redeliver the task,
and the idempotency inbox answers it without repeating its effects: at-least-once delivery
plus the inbox gives exactly-once effects. Rules referenced as "EOS n" are in
shared/KAFKA_EOS.md.

The loop is a pipeline: it keeps polling while worker threads run tasks, and each worker
publishes its task's result as soon as the task is done. At most ``SAGALINE_MAX_IN_FLIGHT``
tasks are in flight (taken, not yet acknowledged); at that bound the loop takes no more until
room is back, pausing the assigned partitions if that lasts (:class:`InFlightGate`). A
partition's committed offset is its lowest offset still in
flight (:mod:`participants.flow`), so a hung handler holds back only its own partition's
commit: the tasks after it run and are answered. A worker whose task is still running past
its deadline (a sync handler cannot be cancelled) is written off and replaced, at most
``SAGALINE_CONCURRENCY`` at a time, so hung handlers do not take the participant's capacity
away; when it ends, its writes are rolled back and the timeout failure is stored and
published instead of its outcome.

A handler's exceptions, and outcomes PostgreSQL refuses, become failed results. Only
connection-level database errors (PostgreSQL down, restarting, failing over) are retried in
place, with backoff until the database answers, because a failed COMMIT may still have
committed.

Replicas of a participant share one consumer group with cooperative-sticky assignment and
static membership (``group.instance.id`` = ``SAGALINE_INSTANCE_ID``): a rebalance moves
only the partitions that change owner, so live replicas keep working while a dead one's
partitions wait out its session (by default the shortest the broker allows) and move.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from psycopg_pool import ConnectionPool
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator import metrics
from orchestrator.errors import FatalKafkaError, RecordDecodeError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.failures import describe, safe_text
from orchestrator.protocol.payloads import PayloadEncodingError
from orchestrator.protocol.records import (
    ActivityHeartbeat,
    ActivityStarted,
    ActivityTask,
    Failure,
    Payload,
)
from orchestrator.settings import ParticipantSettings
from orchestrator.transport import (
    heartbeat_interval_ms,
    poll_batch,
    producer_message_max_bytes,
    session_timeout_ms,
)
from participants.delivery import Outgoing, Publisher, ResultDeliveryError
from participants.flow import InFlightGate, OffsetTracker, Throttle, Ticket
from participants.idempotency import ensure_schema, execute_task, is_connection_level
from participants.participant import (
    LATE_RETURN,
    TIMEOUT_ERROR_TYPES,
    Deadline,
    Participant,
    attempt_deadline,
    wall_clock_ms,
)

__all__ = [
    "ResultDeliveryError",
    "consumer_config",
    "heartbeat_interval_s",
    "max_in_flight",
    "producer_config",
    "run_participant",
]

log = logging.getLogger(__name__)
_CLOSE_FLUSH_S: Final = 10.0
_POLL_WAIT_S: Final = 0.1
_COMMIT_RETRY_S: Final = 1.0
# Commits are not on any workflow's path (results are published as soon as tasks end), so
# one synchronous commit per interval is enough. Every 50 ms cost the broker ~15% more CPU
# in a burst; a crash redelivers at most this long of answered tasks (answered again from
# the idempotency table).
_COMMIT_INTERVAL_S: Final = 0.5
_DB_RETRY_DELAYS_S: Final = (0.1, 0.5, 1.0, 2.0, 5.0)
# How often the loop flushes throttled heartbeats, looks for overdue workers and updates
# the in-flight gauge: not on every round, which under load is every few tasks.
_HOUSEKEEPING_S: Final = 0.05
# A worker still busy this long after its task's deadline is written off. Async handlers
# are cancelled at the deadline and answer within it; this is for the ones that cannot be.
WRITE_OFF_GRACE_MS: Final = 1_000
HEARTBEAT_MIN_INTERVAL_S: Final = 0.25
# A task without a heartbeat timeout still hands its details to the next attempt; nothing
# waits on them, so they are sent at most this often.
DETAILS_ONLY_INTERVAL_S: Final = 10.0
IN_FLIGHT_PER_WORKER: Final = 4


_RUN_ID: Final = re.compile(r"[0-9a-f]{32}")


def _task_context(task: ActivityTask, partition: int, offset: int) -> dict[str, object]:
    """The fields a structured (JSON) log line carries for one task."""
    parts = task.activity_id.rsplit("/", 3)
    # <workflow id>/<run id>/<seq>/<attempt>; ids written before run ids have no run part.
    run_id = parts[1] if len(parts) == 4 and parts[0] and _RUN_ID.fullmatch(parts[1]) else ""
    return {
        "workflow_id": task.workflow_id,
        "run_id": run_id,
        "activity_id": task.activity_id,
        "partition": partition,
        "offset": offset,
    }


class _InFlightSetting(BaseSettings):
    """``SAGALINE_MAX_IN_FLIGHT``, read here until ParticipantSettings carries it."""

    model_config = SettingsConfigDict(env_prefix="SAGALINE_", extra="ignore")

    max_in_flight: int = Field(
        0, ge=0, description="tasks in flight at most; 0: 4 x SAGALINE_CONCURRENCY"
    )


def max_in_flight(settings: ParticipantSettings) -> int:
    """Tasks a participant takes from Kafka before pausing: ``SAGALINE_MAX_IN_FLIGHT``, or
    4 x ``SAGALINE_CONCURRENCY`` when it is 0 or unset.

    Raises:
        pydantic.ValidationError: ``SAGALINE_MAX_IN_FLIGHT`` is not a whole number >= 0.
    """
    configured = getattr(settings, "max_in_flight", None)
    if not isinstance(configured, int):
        configured = _InFlightSetting().max_in_flight
    return configured or IN_FLIGHT_PER_WORKER * settings.concurrency


def heartbeat_interval_s(task: ActivityTask) -> float:
    """Shortest time between two published heartbeats of one attempt: a third of its
    heartbeat timeout (at least 1 s, so at least a third of a second apart);
    ``DETAILS_ONLY_INTERVAL_S`` without a timeout."""
    if task.heartbeat_timeout_ms is None:
        return DETAILS_ONLY_INTERVAL_S
    return max(task.heartbeat_timeout_ms / 3000, HEARTBEAT_MIN_INTERVAL_S)


class _IdleCheck:
    """The pool's health check, paid only by connections that sat idle.

    A connection in steady use has just proved itself; checking it on every checkout would
    cost a round trip per task. One idle for longer than ``IDLE_CHECK_S`` (the server may
    have restarted, a proxy may have dropped it) is pinged before it is handed out, and
    replaced if that fails. A connection that fails in use is retried in place anyway.
    """

    IDLE_CHECK_S: Final = 5.0

    def __init__(self) -> None:
        self._returned: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = (
            weakref.WeakKeyDictionary()
        )

    def used(self, conn: psycopg.Connection[Any]) -> None:
        """Remember that ``conn`` just worked (call before returning it to the pool)."""
        self._returned[conn] = time.monotonic()

    def check(self, conn: psycopg.Connection[Any]) -> None:
        """Pool ``check`` callback: ping a connection that sat idle; raise if it is dead."""
        if time.monotonic() - self._returned.get(conn, 0.0) > self.IDLE_CHECK_S:
            ConnectionPool.check_connection(conn)


def group_id(settings: ParticipantSettings, participant: str) -> str:
    """The consumer group every replica of ``participant`` joins."""
    return f"{settings.topic_prefix}.participant.{participant}"


def consumer_config(
    settings: ParticipantSettings, participant: str, session_ms: int
) -> dict[str, Any]:
    """librdkafka settings of a participant's task consumer."""
    return {
        **settings.kafka_common(),
        "group.id": group_id(settings, participant),
        "client.id": f"sagaline-participant-{participant}",
        # Static membership: a restart under the same id gets its partitions back without
        # a rebalance. Unique per replica within the group; each participant has its own
        # group, so all participants of one process share the process's id.
        "group.instance.id": settings.instance_id,
        # A rebalance moves only partitions that change owner: the others keep being
        # served while a dead replica's session expires (EOS 13, EOS 25).
        "partition.assignment.strategy": "cooperative-sticky",
        # EOS 17: never act on tasks of an orchestrator transaction that aborted.
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": session_ms,
        "heartbeat.interval.ms": heartbeat_interval_ms(session_ms),
    }


def producer_config(settings: ParticipantSettings, participant: str) -> dict[str, Any]:
    """librdkafka settings of a participant's result producer."""
    return {
        **settings.kafka_common(),
        "client.id": f"sagaline-participant-{participant}",
        "enable.idempotence": True,
        "acks": "all",
        # Each worker publishes its result as its task ends. Under load, linger lets the
        # results that end together share a produce request (with none, a burst of 2,000
        # order sagas cost the broker 1.34 ms of CPU per saga against 1.12 ms with 2 ms);
        # a result that nothing would join is pushed out at once (send_result(push=True)),
        # so a quiet participant pays no linger. 5 ms measured no better than 2.
        "linger.ms": 2,
        "partitioner": "murmur2_random",  # EOS 15: same partition as a Java producer
        # The size rule is ours (record_size against max_record_bytes); never let the
        # client refuse first with a smaller default.
        "message.max.bytes": producer_message_max_bytes(settings.max_record_bytes),
    }


def _partitions(partitions: list[TopicPartition]) -> str:
    return ",".join(str(tp.partition) for tp in sorted(partitions, key=lambda tp: tp.partition))


@dataclass(frozen=True, slots=True)
class _Job:
    task: ActivityTask
    ticket: Ticket
    partition: int
    offset: int


@dataclass(slots=True)
class _Busy:
    job: _Job
    thread: threading.Thread
    deadline_ms: int | None = None
    written_off: bool = False
    cap_logged: bool = False


class _Workers:
    """The threads that run tasks, ``size`` of them, plus replacements for written-off ones.

    A worker still busy ``WRITE_OFF_GRACE_MS`` after its task's deadline is written off:
    a new thread takes its place, and it ends once its task does. At most ``spare`` are
    written off at a time; past that, overdue workers keep their place (logged once each).
    """

    def __init__(self, name: str, size: int, spare: int, run: Callable[[_Job], None]) -> None:
        self._name = name
        self._spare = spare
        self._run = run
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy: dict[int, _Busy] = {}
        self._threads: set[threading.Thread] = set()
        self._written_off = 0
        self._serial = 0
        self._closing = False
        for _ in range(size):
            self._spawn()

    @property
    def written_off(self) -> int:
        """Workers written off and still running their task."""
        return self._written_off

    def _spawn(self) -> None:
        self._serial += 1
        thread = threading.Thread(
            target=self._work, name=f"participant-{self._name}-{self._serial}", daemon=True
        )
        self._threads.add(thread)
        thread.start()

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def set_deadline(self, deadline_ms: int | None) -> None:
        """The deadline of the task the calling worker runs (None: it has none)."""
        with self._lock:
            busy = self._busy.get(threading.get_ident())
            if busy is not None:
                busy.deadline_ms = deadline_ms

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            job = self._jobs.get()
            with self._lock:
                if job is None or self._closing:
                    if job is None:
                        self._threads.discard(me)
                        return
                    continue  # closing: queued tasks stay uncommitted, to be redelivered
                self._busy[threading.get_ident()] = _Busy(job, me)
            try:
                self._run(job)
            except BaseException:  # the runner reports its own errors; never lose a worker
                log.exception("worker error participant=%s", self._name)
            with self._lock:
                busy = self._busy.pop(threading.get_ident())
                if busy.written_off:
                    # A replacement took this thread's place while it was stuck.
                    self._written_off -= 1
                    self._threads.discard(me)
                    return

    def write_off_overdue(self, now_ms: int) -> tuple[list[_Busy], list[_Busy]]:
        """Write off workers past their deadline; returns (written off, not replaceable)."""
        written: list[_Busy] = []
        stuck: list[_Busy] = []
        with self._lock:
            if self._closing:
                return written, stuck
            for busy in self._busy.values():
                if busy.written_off or busy.deadline_ms is None:
                    continue
                if now_ms < busy.deadline_ms + WRITE_OFF_GRACE_MS:
                    continue
                if self._written_off >= self._spare:
                    if not busy.cap_logged:
                        busy.cap_logged = True
                        stuck.append(busy)
                    continue
                busy.written_off = True
                self._written_off += 1
                self._spawn()
                written.append(busy)
        return written, stuck

    def close(self, timeout_s: float) -> int:
        """Drop queued tasks, wait up to ``timeout_s`` for running ones (written-off workers
        are not waited for); returns how many workers are still running a task."""
        with self._lock:
            self._closing = True
            threads = list(self._threads)
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        for _ in threads:
            self._jobs.put(None)
        end = time.monotonic() + timeout_s
        for thread in threads:
            with self._lock:
                abandoned = any(b.thread is thread and b.written_off for b in self._busy.values())
            if not abandoned:
                thread.join(max(0.0, end - time.monotonic()))
        with self._lock:
            return len(self._busy)


class _AttemptReports:
    """One attempt's start report and heartbeats: the :class:`AttemptReporter` the runtime
    hands to the handler's context. Never raises into the handler, except for heartbeat
    details too large to publish."""

    def __init__(
        self,
        loop: _ParticipantLoop,
        task: ActivityTask,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self._task = task
        self._clock = clock
        self._label = loop.participant.metric_label(task.activity)
        self._details = task.heartbeat_details  # kept by heartbeats without details
        self._throttle: Throttle[Outgoing] | None = None
        self._closed = False
        self._lock = threading.Lock()
        self.deadline: Deadline | None = None
        self.ran = False

    def started(self, started_at_ms: int, deadline: Deadline | None) -> None:
        self.ran = True
        self.deadline = deadline
        self._loop.workers.set_deadline(None if deadline is None else deadline.at_ms)
        if not self._task.report_start:
            return
        task = self._task
        report = ActivityStarted(
            task.workflow_id, task.activity_id, task.seq, task.attempt, started_at_ms
        )
        try:
            record = self._loop.publisher.report(report)
        except Exception as exc:
            log.warning(
                "start report not sent participant=%s activity_id=%s error=%s",
                self._loop.name,
                safe_text(task.activity_id, 300),
                describe(exc),
                extra={"workflow_id": task.workflow_id, "activity_id": task.activity_id},
            )
            return
        self._send(record)

    def heartbeat(self, details: Payload | None) -> None:
        task = self._task
        latest = details if details is not None else self._details
        report = ActivityHeartbeat(
            task.workflow_id, task.activity_id, task.seq, task.attempt, wall_clock_ms(), latest
        )
        try:
            record = self._loop.publisher.report(report)
        except PayloadEncodingError:
            raise  # details too large: the handler hears it at its call
        except Exception as exc:
            log.warning(
                "heartbeat not sent participant=%s activity_id=%s error=%s",
                self._loop.name,
                safe_text(task.activity_id, 300),
                describe(exc),
                extra={"workflow_id": task.workflow_id, "activity_id": task.activity_id},
            )
            return
        self._details = latest
        with self._lock:
            if self._closed:
                return  # a thread the handler left behind: the attempt is over
            if self._throttle is None:
                self._throttle = Throttle(heartbeat_interval_s(task), self._clock)
            throttle = self._throttle
        if not throttle.offer(record, self._send_heartbeat) and not throttle.closed:
            self._loop.watch(self)

    def flush_due(self) -> bool:
        """Send a pending heartbeat whose window ended; True while one is still pending."""
        throttle = self._throttle
        if throttle is None:
            return False
        throttle.flush_due(self._send_heartbeat)
        return throttle.has_pending and not throttle.closed

    def close(self) -> None:
        """The attempt is over: nothing more is sent (a pending heartbeat is dropped)."""
        with self._lock:
            self._closed = True
            throttle = self._throttle
        if throttle is not None:
            throttle.close()
            self._loop.unwatch(self)

    def _send_heartbeat(self, record: Outgoing) -> None:
        if self._send(record):
            metrics.ACTIVITY_HEARTBEATS.labels(self._label).inc()

    def _send(self, record: Outgoing) -> bool:
        try:
            self._loop.publisher.send_report(record)
        except ResultDeliveryError as exc:  # the producer failed for good
            self._loop.fail(exc)
            return False
        except Exception as exc:
            log.warning(
                "report not sent participant=%s activity_id=%s error=%s",
                self._loop.name,
                safe_text(self._task.activity_id, 300),
                describe(exc),
            )
            return False
        return True


class _ParticipantLoop:
    """One participant's consumer, producer, worker threads and database connections."""

    def __init__(self, participant: Participant, settings: ParticipantSettings) -> None:
        self.participant = participant
        self.name = participant.name
        self.instance_id = settings.instance_id
        self.task_topic = settings.topics.tasks(participant.name)
        self.group_id = group_id(settings, participant.name)
        self.max_batch = settings.max_batch_records
        self.concurrency = settings.concurrency
        self.db_timeout_s = settings.db_connect_timeout_s
        self.gate = InFlightGate(max_in_flight(settings))
        self.tracker = OffsetTracker()
        self.codec = AvroCodec()
        self.session_ms = session_timeout_ms(
            settings.session_timeout_ms, AdminClient(settings.kafka_common())
        )
        self.consumer = Consumer(consumer_config(settings, participant.name, self.session_ms))
        self.publisher = Publisher(
            Producer(producer_config(settings, participant.name)),
            participant=participant.name,
            topics=settings.topics,
            codec=self.codec,
            max_record_bytes=settings.max_record_bytes,
        )
        # psycopg_pool logs every checkout at INFO: one line per task, twice.
        pool_log = logging.getLogger("psycopg.pool")
        if pool_log.level == logging.NOTSET:
            pool_log.setLevel(logging.WARNING)
        self._idle_check = _IdleCheck()
        self.pool: ConnectionPool[Any] = ConnectionPool(
            settings.postgres_dsn.get_secret_value(),
            # One connection per worker thread: a task never waits for another's. Written-
            # off workers keep theirs (their transaction is still open), so their
            # replacements need room: twice the workers at most.
            min_size=settings.concurrency,
            max_size=2 * settings.concurrency,
            # Autocommit, so that conn.transaction() in the inbox is the whole transaction.
            kwargs={
                "autocommit": True,
                "connect_timeout": max(2, math.ceil(settings.db_connect_timeout_s)),
            },
            # No reset callback: with one, psycopg_pool returns every connection through
            # a worker thread, two thread hops per task.
            check=self._idle_check.check,
            timeout=settings.db_connect_timeout_s,
            name=f"participant-{participant.name}",
            open=False,
        )
        self.workers = _Workers(
            participant.name, self.concurrency, spare=self.concurrency, run=self._handle
        )
        self._watched: set[_AttemptReports] = set()
        self._watched_lock = threading.Lock()
        self._fatal: BaseException | None = None
        self._assigned_while_paused = False
        self._last_commit = 0.0
        self._commit_retry_at = 0.0
        self._housekeeping_at = 0.0
        self._in_flight_gauge = metrics.PARTICIPANT_IN_FLIGHT.labels(self.name)
        self._stop = threading.Event()
        self._closing = threading.Event()

    # --- lifecycle ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self.pool.open(wait=False)
        with self.pool.connection(timeout=self.db_timeout_s) as conn:
            ensure_schema(conn, self.participant)
        self.consumer.subscribe(
            [self.task_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "participant started participant=%s topic=%s group=%s instance=%s session_ms=%d "
            "concurrency=%d max_in_flight=%d activities=%s",
            self.name,
            self.task_topic,
            self.group_id,
            self.instance_id,
            self.session_ms,
            self.concurrency,
            self.gate.limit,
            ",".join(self.participant.activities),
        )
        while not stop.is_set():
            self._tick()
        log.info("participant stopping participant=%s", self.name)

    def close(self, *, commit: bool = True) -> None:
        """Stop the workers (waiting a bounded time for running tasks), publish and commit
        what they finished unless a fatal error ended the loop, release the clients."""
        self._closing.set()  # tasks retrying the database give up; their offsets stay
        running = self.workers.close(_CLOSE_FLUSH_S)
        if running:
            log.warning(
                "participant=%s closing with %d tasks still running; their offsets stay "
                "uncommitted",
                self.name,
                running,
            )
        if commit and self._fatal is None:
            try:
                self.publisher.confirm(self._closing)
                self._commit()
            except Exception as exc:  # only duplicate work is at stake
                log.warning("final commit failed participant=%s error=%s", self.name, exc)
        try:
            # EOS 19. A static member does not leave the group here: its partitions wait
            # for it to come back under the same id, or for its session to expire.
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close failed participant=%s error=%s", self.name, exc)
        remaining = self.publisher.close(_CLOSE_FLUSH_S)
        if remaining:
            log.warning(
                "participant=%s closed with %d unacknowledged records", self.name, remaining
            )
        self.pool.close()

    def fail(self, exc: BaseException) -> None:
        """A worker met an error the participant cannot go on from; the loop raises it."""
        if self._fatal is None:
            self._fatal = exc

    # --- the loop --------------------------------------------------------------------------

    def _tick(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        self.publisher.poll(0)
        self.publisher.handle_failures()
        now = time.monotonic()
        in_flight = self.tracker.in_flight
        if now >= self._housekeeping_at:
            self._housekeeping_at = now + _HOUSEKEEPING_S
            self._flush_heartbeats()
            self._write_off_overdue()
            self._in_flight_gauge.set(in_flight)
        decision = self.gate.decide(in_flight, now)
        if decision == "pause" or (self.gate.paused and self._assigned_while_paused):
            self._pause_all(in_flight)
        elif decision == "resume":
            self._resume_all(in_flight)
        room = self.gate.room(in_flight)
        messages: list[Message] = []
        if room:
            messages = poll_batch(self.consumer, min(self.max_batch, room), _POLL_WAIT_S)
        else:
            # Full: wait for acknowledgements (they make room), not for Kafka.
            self.publisher.poll(_POLL_WAIT_S)
            if self.gate.paused:
                # Serves the group's callbacks; paused partitions return nothing.
                messages = self.consumer.consume(num_messages=1, timeout=0)
        if messages:
            self._dispatch(messages)
        now = time.monotonic()
        if now >= self._commit_retry_at and now - self._last_commit >= _COMMIT_INTERVAL_S:
            self._commit()

    def _dispatch(self, messages: list[Message]) -> None:
        for msg in messages:
            error = msg.error()
            if error is not None:
                self._consumer_error(error)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            ticket = self.tracker.take((topic, partition), offset)
            try:
                task = self.codec.decode_task(msg.value())
            except RecordDecodeError as exc:
                self.publisher.send_dead_letter(
                    msg,
                    reason=exc.reason,
                    error=str(exc),
                    on_acked=functools.partial(self.tracker.finish, ticket),
                )
                log.warning(
                    "dead letter participant=%s reason=%s partition=%d offset=%d",
                    self.name,
                    exc.reason,
                    partition,
                    offset,
                    extra={"partition": partition, "offset": offset},
                )
                continue
            self.workers.submit(_Job(task, ticket, partition, offset))

    def _pause_all(self, in_flight: int) -> None:
        self._assigned_while_paused = False
        assigned = self.consumer.assignment()
        if assigned:
            self.consumer.pause(assigned)
        log.info(
            "tasks in flight at the limit for %.1fs, partitions paused participant=%s "
            "in_flight=%d limit=%d",
            self.gate.pause_after_s,
            self.name,
            in_flight,
            self.gate.limit,
        )

    def _resume_all(self, in_flight: int) -> None:
        assigned = self.consumer.assignment()
        if assigned:
            self.consumer.resume(assigned)
        log.info(
            "partitions resumed participant=%s in_flight=%d limit=%d",
            self.name,
            in_flight,
            self.gate.limit,
        )

    def watch(self, reports: _AttemptReports) -> None:
        """``reports`` holds a throttled heartbeat to send when its window ends."""
        with self._watched_lock:
            self._watched.add(reports)

    def unwatch(self, reports: _AttemptReports) -> None:
        with self._watched_lock:
            self._watched.discard(reports)

    def _flush_heartbeats(self) -> None:
        with self._watched_lock:
            watched = list(self._watched)
        for reports in watched:
            if not reports.flush_due():
                self.unwatch(reports)

    def _write_off_overdue(self) -> None:
        written, stuck = self.workers.write_off_overdue(wall_clock_ms())
        for busy in written:
            metrics.PARTICIPANT_WORKERS_ABANDONED.labels(self.name).inc()
            log.error(
                "worker written off, its task is past its deadline participant=%s "
                "activity=%s activity_id=%s partition=%d offset=%d overdue_ms=%d "
                "written_off=%d; a new worker takes its place, and its outcome is still "
                "stored and published if it ever ends",
                self.name,
                safe_text(busy.job.task.activity, 200),
                safe_text(busy.job.task.activity_id, 300),
                busy.job.partition,
                busy.job.offset,
                wall_clock_ms() - (busy.deadline_ms or 0),
                self.workers.written_off,
                extra=_task_context(busy.job.task, busy.job.partition, busy.job.offset),
            )
        for busy in stuck:
            log.error(
                "worker past its task's deadline not replaced participant=%s activity_id=%s "
                "partition=%d offset=%d: %d workers are written off already (the cap is "
                "SAGALINE_CONCURRENCY); fewer tasks run at once until they end",
                self.name,
                safe_text(busy.job.task.activity_id, 300),
                busy.job.partition,
                busy.job.offset,
                self.workers.written_off,
                extra=_task_context(busy.job.task, busy.job.partition, busy.job.offset),
            )

    # --- group membership ----------------------------------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Cooperative assignment: when this callback does not call incremental_assign(),
        # confluent-kafka does it (checked against the broker), and offsets come from the
        # group, so there is nothing to prepare. At the in-flight limit, the next tick
        # pauses the new partitions too.
        if partitions:
            self._assigned_while_paused = self.gate.paused
            log.info(
                "partitions assigned participant=%s partitions=%s",
                self.name,
                _partitions(partitions),
            )

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Still ours until this returns: commit what Kafka acknowledged for them, so the
        # next owner does not repeat it. Tasks still running there finish and publish
        # their results (the inbox dedupes the new owner's redelivery); their offsets are
        # no longer ours. Must not raise (it would re-raise from poll).
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        try:
            self.publisher.poll(0)  # acknowledgements that arrived meanwhile count
            self._commit(only=revoked)
        except Exception as exc:  # e.g. the consumer closing: only duplicate work is at stake
            log.warning("commit on revoke failed participant=%s error=%s", self.name, exc)
        self.tracker.forget(revoked)
        if partitions:
            log.info(
                "partitions revoked participant=%s partitions=%s",
                self.name,
                _partitions(partitions),
            )

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Already another member's: a commit now could move its offsets. Its owner
        # repeats those tasks and the inbox answers them.
        self.tracker.forget((tp.topic, tp.partition) for tp in partitions)
        log.warning(
            "partitions lost participant=%s partitions=%s", self.name, _partitions(partitions)
        )

    def _consumer_error(self, error: KafkaError) -> None:
        # librdkafka raises one fatal consumer error: a static member fenced by another
        # with the same group.instance.id (FENCED_INSTANCE_ID).
        if error.code() != KafkaError._FATAL and not error.fatal():
            log.warning("consumer error participant=%s error=%s", self.name, error)
            return
        detail = safe_text(error.str(), 500)
        if "fenced" in detail.lower():
            message = (
                f"participant {self.name} stopped: another live process joined group "
                f"{self.group_id} with the same SAGALINE_INSTANCE_ID={self.instance_id}; "
                "give every replica its own SAGALINE_INSTANCE_ID (Kafka: FENCED_INSTANCE_ID)"
            )
        else:
            message = f"participant {self.name} stopped: fatal consumer error ({detail})"
        log.error("%s", message)
        raise FatalKafkaError(message)

    # --- one task, on a worker thread ----------------------------------------------------

    def _handle(self, job: _Job) -> None:
        try:
            self._answer(job)
        except BaseException as exc:
            # InboxUnavailableError, ResultDeliveryError, or a bug: the participant stops
            # with this task's offset uncommitted.
            log.error(
                "participant=%s cannot go on after activity_id=%s: %s",
                self.name,
                safe_text(job.task.activity_id, 300),
                describe(exc),
            )
            self.fail(exc)

    def _answer(self, job: _Job) -> None:
        """Answer one task and publish its result; leaves it in flight if stopping first."""
        task = job.task
        # Until the handler starts (a duplicate may wait for the attempt's lock), the
        # deadline counts from now.
        deadline = attempt_deadline(task, wall_clock_ms())
        self.workers.set_deadline(None if deadline is None else deadline.at_ms)
        reports = _AttemptReports(self, task)
        started = time.perf_counter()
        retries = 0
        try:
            while True:
                try:
                    with self.pool.connection() as conn:
                        execution = execute_task(conn, self.participant, task, reporter=reports)
                        self._idle_check.used(conn)
                    break
                except Exception as exc:
                    # Everything the task causes is an outcome already; what is left is the
                    # database being unreachable. Reporting a failure could be wrong (a
                    # failed COMMIT may have committed, and the orchestrator would retry
                    # under a new activity id), so retry: the inbox's lock and lookup tell
                    # what took effect.
                    if not is_connection_level(exc):
                        raise
                    retries += 1
                    log.warning(
                        "idempotency inbox unreachable participant=%s activity_id=%s retry=%d "
                        "error=%s",
                        self.name,
                        task.activity_id,
                        retries,
                        describe(exc),
                        extra=_task_context(task, job.partition, job.offset),
                    )
                    delay = _DB_RETRY_DELAYS_S[min(retries, len(_DB_RETRY_DELAYS_S)) - 1]
                    if self._halted(delay):
                        # Stopping while the database is unreachable: the offset stays
                        # uncommitted, so the task is delivered again.
                        log.warning(
                            "task abandoned participant=%s activity_id=%s partition=%d offset=%d",
                            self.name,
                            safe_text(task.activity_id, 300),
                            job.partition,
                            job.offset,
                            extra=_task_context(task, job.partition, job.offset),
                        )
                        return
        finally:
            reports.close()  # no heartbeat after this: the result comes last
        elapsed = time.perf_counter() - started
        finished_ms = wall_clock_ms()
        label = self.participant.metric_label(task.activity)
        outcome = execution.outcome.status.value.lower()
        metrics.ACTIVITY_ATTEMPTS.labels(label, outcome).inc()
        metrics.ACTIVITY_SECONDS.labels(label, outcome).observe(elapsed)
        failure = execution.outcome.failure
        late = self._count_timeout(label, execution.duplicate, failure, reports, finished_ms)
        log.info(
            "activity handled participant=%s activity=%s activity_id=%s attempt=%d "
            "partition=%d offset=%d outcome=%s error_type=%s duplicate=%s ms=%.1f%s",
            self.name,
            safe_text(task.activity, 200),
            safe_text(task.activity_id, 300),
            task.attempt,
            job.partition,
            job.offset,
            outcome,
            "" if failure is None else failure.error_type,
            str(execution.duplicate).lower(),
            elapsed * 1000,
            " late=true" if late else "",
        )
        self.publisher.send_result(
            execution.outcome.result_for(task),
            on_acked=functools.partial(self.tracker.finish, job.ticket),
            # Alone (this task is all that is in flight), the result is sent at once; with
            # others running it lingers, to share a request with theirs.
            push=self.tracker.in_flight <= 1,
        )

    @staticmethod
    def _count_timeout(
        label: str,
        duplicate: bool,
        failure: Failure | None,
        reports: _AttemptReports,
        finished_ms: int,
    ) -> bool:
        """Count an attempt that met its deadline; True when a sync handler ended past it."""
        if duplicate:
            return False
        if failure is not None and failure.error_type in TIMEOUT_ERROR_TYPES:
            if LATE_RETURN in failure.message:
                action = "late"
            else:
                action = "cancelled" if reports.ran else "not_run"
            metrics.ACTIVITY_TIMEOUTS.labels(label, failure.error_type, action).inc()
            return False
        deadline = reports.deadline
        if deadline is None or finished_ms <= deadline.at_ms:
            return False
        metrics.ACTIVITY_TIMEOUTS.labels(label, deadline.error_type, "late").inc()
        return True

    def _halted(self, delay_s: float) -> bool:
        """Wait ``delay_s`` unless stopping; True when stopping."""
        deadline = time.monotonic() + delay_s
        while not (self._stop.is_set() or self._closing.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # Two events to watch; a short wait on one keeps the other's latency low.
            self._closing.wait(min(left, 0.1))
        return True

    # --- offsets --------------------------------------------------------------------------

    def _commit(self, only: set[tuple[str, int]] | None = None) -> None:
        """Commit every partition's lowest offset still in flight (or its end), where it
        moved; a failure is retried after ``_COMMIT_RETRY_S``."""
        pending = self.tracker.committable(only)
        if not pending:
            return
        self._last_commit = time.monotonic()
        offsets = [TopicPartition(t, p, o) for (t, p), o in sorted(pending.items())]
        try:
            committed = self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Typically a rebalance under way. Committed by a later attempt, or dropped if
            # the partitions move (then the new owner repeats those tasks and the inbox
            # answers them).
            log.warning("offset commit failed participant=%s error=%s", self.name, exc)
            self._commit_retry_at = time.monotonic() + _COMMIT_RETRY_S
            return
        for tp in committed or ():
            if tp.error is not None:
                log.warning(
                    "offset commit failed participant=%s partition=%d error=%s",
                    self.name,
                    tp.partition,
                    tp.error,
                )
                self._commit_retry_at = time.monotonic() + _COMMIT_RETRY_S
            else:
                self.tracker.committed((tp.topic, tp.partition), tp.offset)


def run_participant(
    participant: Participant, settings: ParticipantSettings, stop: threading.Event
) -> None:
    """Serve ``participant``'s tasks until ``stop`` is set; blocks the calling thread.

    Creates the idempotency table and the participant's tables first. Once ``stop`` is
    set, waits up to 10 s for running tasks, publishes and commits what they finished
    (tasks still running or queued stay uncommitted, to be redelivered), closes the
    consumer and returns.

    Raises:
        ResultDeliveryError: Kafka refused a record that no substitute could answer for,
            or the producer failed for good; the process should exit non-zero (offsets
            were not committed, so nothing is lost).
        FatalKafkaError: the consumer was fenced by another process with the same
            ``SAGALINE_INSTANCE_ID``.
        InboxUnavailableError: the idempotency table refuses writes (dropped, privileges).
        psycopg.Error: the schema could not be created at startup.

    Example::

        stop = threading.Event()
        run_participant(payment, ParticipantSettings(), stop)  # until stop.set()
    """
    loop = _ParticipantLoop(participant, settings)
    clean = False
    try:
        loop.run(stop)
        clean = True
    finally:
        loop.close(commit=clean)
