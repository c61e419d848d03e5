"""The Celery steps without a broker: what a hostile review of the first version found.

Each test states what the feature promises (docs/celery.md, the docstrings) or what
Celery's own ``send_task`` / sagaline's native participants do, and checks the Celery path
against it; its docstring describes the failure of the first version that it pins (fixed
since). The worker-side tests run a real Celery worker (solo pool) embedded in this
process on kombu's in-memory transport: the message put on its queue is exactly the
envelope ``protocol.celery.task_message`` writes (as kombu's ``confluentkafka`` transport
hands it over: ``kombu.utils.json.loads`` of the record), and ``attach``'s publisher
writes to a recording producer instead of Kafka.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.exceptions import Reject
from confluent_kafka import KafkaError, KafkaException
from kombu import serialization as kombu_serialization
from kombu.transport import confluentkafka as kombu_kafka
from kombu.utils import json as kombu_json

import participants.celery as celery_side
from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.errors import ConfigurationError
from orchestrator.protocol.celery import task_message
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityStarted,
    ActivityStatus,
    ActivityTask,
    InboxBody,
    StartWorkflow,
)
from orchestrator.protocol.topics import Topics
from orchestrator.runtime.inputs import Batch, Input, InputProcessor
from orchestrator.runtime.state import PartitionState, WorkflowStore
from orchestrator.settings import KafkaSettings
from orchestrator.transport import TopicDirectory
from participants import ActivityFailure, Participant
from participants.celery import CeleryOutcomes, attach
from tests.unit.conftest import T0, WorkflowRun

TOPICS = Topics()
MAX_RECORD_BYTES = 900_000  # OrchestratorSettings / ParticipantSettings default


# --- helpers ------------------------------------------------------------------------


def _task_of(fn: Any, value: Any = None) -> ActivityTask:
    """The first task a workflow running ``fn`` sends (through the real engine)."""
    registry = WorkflowRegistry()
    registry.workflow("w")(fn)
    run = WorkflowRun(registry, "w", run_id="r1")
    run.start(value)
    assert run.sent, f"the workflow sent no task: {run.record}"
    return run.sent[0]


def _body_as_worker_reads(envelope: dict[str, Any]) -> Any:
    """(args, kwargs, embed) as a Celery worker decodes the body: kombu's json."""
    loads: Any = kombu_serialization.loads
    body = loads(
        base64.b64decode(envelope["body"]),
        envelope["content-type"],
        envelope["content-encoding"],
    )
    return body


def _send_task_envelope(name: str, args: list[Any], kwargs: dict[str, Any], queue: str) -> Any:
    """The envelope Celery's own ``send_task`` puts on kombu's confluentkafka transport
    (its Kafka producer and admin client replaced by recorders)."""
    ck = kombu_kafka
    captured: list[Any] = []

    class _Admin:
        def list_topics(self, *a: Any, **k: Any) -> Any:
            return SimpleNamespace(topics={})

        def create_topics(self, **k: Any) -> None:
            return None

    with (
        mock.patch.object(ck.Channel, "_open", lambda self: _Admin()),
        mock.patch.object(
            ck.Channel, "_put", lambda self, q, message, **kw: captured.append(message)
        ),
    ):
        app = Celery("capture", broker="confluentkafka://127.0.0.1:9092", set_as_current=False)
        app.send_task(name, args, kwargs, queue=queue, ignore_result=True)
    (message,) = captured
    return message


class _Listing:
    """Topic metadata without a broker: the topics in ``names`` exist."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def list_topics(self, topic: str | None = None, timeout: float = 0) -> Any:
        found = SimpleNamespace(partitions={0: SimpleNamespace()}, error=None)
        return SimpleNamespace(topics={name: found for name in self.names})


def _shell_start(fn: Any, *topics: str) -> tuple[WorkflowStore, Batch]:
    """Start a workflow running ``fn`` through the real orchestrator shell
    (``InputProcessor``, as tests/unit/test_runtime_requests.py drives it)."""
    registry = WorkflowRegistry()
    registry.workflow("w")(fn)
    store = WorkflowStore()
    store.install(PartitionState(0))
    codec = AvroCodec()
    processor = InputProcessor(
        codec=codec,
        store=store,
        topics=TOPICS,
        directory=TopicDirectory(_Listing(*topics)),
        registry=registry,
        max_events=1_000,
        max_record_bytes=MAX_RECORD_BYTES,
        partition_count=1,
    )
    batch = Batch(0.0)
    body = StartWorkflow("wf", "w", encode_json(None), T0, None, None, None)
    processor.apply_input(Input(0, 0, b"wf", codec.encode_inbox(body)), body, batch, T0 + 1_000)
    return store, batch


class _Recorder:
    """A producer that records what it is given; it refuses what librdkafka refuses
    locally (a record above ``message.max.bytes``, 1,000,000 by default)."""

    def __init__(self, config: Any = None) -> None:
        self.records: list[tuple[str, bytes, bytes | None]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, **_: Any) -> None:
        if len(value) + len(key or b"") > 1_000_000:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.records.append((topic, value, key))

    def flush(self, timeout: float | None = None) -> int:
        return 0

    def bodies(self) -> list[InboxBody]:
        codec = AvroCodec(max_record_bytes=1 << 30)
        return [codec.decode_inbox(value) for _, value, _ in self.records]


def _outcomes_with(recorder: _Recorder) -> CeleryOutcomes:
    outcomes = CeleryOutcomes(KafkaSettings(kafka_bootstrap="127.0.0.1:1"))
    outcomes._producer = recorder  # type: ignore[assignment]
    outcomes._pid = os.getpid()
    return outcomes


def _sent_task(activity_id: str = "wf-1/r1/0/1") -> Any:
    """What Celery's ``sender`` looks like for a task a workflow sent."""
    request = SimpleNamespace(
        id=activity_id, sagaline_workflow_id="wf-1", sagaline_seq=0, sagaline_attempt=1
    )
    return SimpleNamespace(request=request)


# --- (5) the orchestrator shell --------------------------------------------------------


async def _to_inbox(ctx: WorkflowContext, _: Any) -> Any:
    return await ctx.celery("shop.tasks.charge_card", 1, queue=TOPICS.inbox)


def test_a_celery_queue_cannot_be_one_of_sagalines_own_topics() -> None:
    """``queue`` is any topic name that exists: ``queue='sagaline.inbox'`` (or history,
    dlq, replies, a participant's tasks topic) makes the orchestrator write a Celery JSON
    record, keyed by the workflow id, into its own inbox in its own transaction."""
    _, batch = _shell_start(_to_inbox, TOPICS.inbox, TOPICS.history)
    own = {TOPICS.inbox, TOPICS.history, TOPICS.dlq, TOPICS.replies}
    written = [o.topic for o in batch.outputs if o.topic in own]
    assert written == [], f"a Celery message was written to sagaline's own {written}"


# --- (1) the message ------------------------------------------------------------------


async def _with_deadline(ctx: WorkflowContext, _: Any) -> Any:
    return await ctx.celery("shop.tasks.charge_card", 1, queue="payments", schedule_to_close=60)


def test_the_steps_deadline_becomes_the_messages_expires() -> None:
    """A native participant does not run a task whose schedule-to-close deadline passed
    (participant.py "was not run: its ... had passed when the participant picked it up").
    The Celery message has ``expires: None`` although the task carries ``deadline_ms``:
    a task that waited in the queue past its deadline still runs, after the workflow
    gave up on it and possibly compensated it (a charge after its refund)."""
    task = _task_of(_with_deadline)
    assert task.deadline_ms is not None
    headers = json.loads(task_message(task)[1])["headers"]
    assert headers["expires"] is not None, "the step's deadline is not the task's expiry"


# --- (3) outcomes: lost or misreported ----------------------------------------------------


@pytest.mark.parametrize("size", [950_000, 1_100_000])
def test_a_result_too_large_for_kafka_is_reported_as_a_failure(size: int) -> None:
    """Native participants answer a result above max_record_bytes with a non-retryable
    ResultTooLarge failure with effects_committed (participants/delivery.py
    result_record). The Celery publisher has no size rule: 950 KB goes to the inbox as is
    (above the orchestrator's 900,000: dead-lettered there), 1.1 MB is refused by the
    codec or librdkafka, logged, and nothing is sent. Either way the step never hears,
    and with a timeout it is retried: the task's effects run again."""
    recorder = _Recorder()
    outcomes = _outcomes_with(recorder)
    outcomes.succeeded(_sent_task(), "x" * size)
    results = [b for b in recorder.bodies() if isinstance(b, ActivityResult)]
    assert len(results) == 1, f"{len(results)} outcomes published for a {size}-byte result"
    (result,) = results
    (_, value, key) = recorder.records[0]
    assert len(value) + len(key or b"") <= MAX_RECORD_BYTES
    assert result.status is ActivityStatus.FAILED and result.failure is not None
    assert result.failure.error_type == "ResultTooLarge"
    assert result.failure.effects_committed is True


def test_a_result_that_does_not_convert_says_the_tasks_effects_committed() -> None:
    """The task returned: whatever it did is done. Reporting the unconvertible result
    with effects_committed=False tells the workflow the step had no effects, so it is
    not compensated as a completed step would be (errors.py, RecordTooLargeError)."""
    recorder = _Recorder()
    outcomes = _outcomes_with(recorder)
    outcomes.succeeded(_sent_task(), object())
    (result,) = [b for b in recorder.bodies() if isinstance(b, ActivityResult)]
    assert result.status is ActivityStatus.FAILED and result.failure is not None
    assert result.failure.effects_committed is True, result.failure


def test_an_outcome_kafka_never_took_is_not_counted_as_published() -> None:
    """``_send`` treats ``flush() == 0`` as delivered, but flush returns 0 once the queue
    is empty, delivered or failed: no delivery report is checked. Here the record fails
    (message timeout, no broker) and ``published`` still counts it, nothing is logged,
    and the worker acks the task. The same happens for any delivery error (the inbox
    topic missing under a wrong SAGALINE_TOPIC_PREFIX, not authorized, too large for it)."""
    outcomes = CeleryOutcomes(
        KafkaSettings(kafka_bootstrap="127.0.0.1:1", kafka_extra={"message.timeout.ms": 300})
    )
    outcomes.succeeded(_sent_task(), {"ok": 1})
    assert outcomes.published == 0, "an outcome Kafka never acknowledged counted as published"


def test_concurrent_first_use_keeps_one_producer_per_process() -> None:
    """``producer`` is created without a lock and read twice per send (produce, then
    flush). Two threads of the threads pool (or the prefork parent's result and timeout
    handler threads) finishing at once on first use each build a producer; a record
    produced on the first is then flushed on the second, and the first, unreferenced, is
    destroyed with the record still queued: the outcome is lost and counted published."""
    made: list[_Slow] = []
    second_started = threading.Event()
    first_has_record = threading.Event()
    outcomes = CeleryOutcomes(KafkaSettings(kafka_bootstrap="127.0.0.1:1"))

    class _Slow(_Recorder):
        def __init__(self, config: Any = None) -> None:
            super().__init__(config)
            self.flushed = False
            made.append(self)
            if len(made) == 1:
                second_started.wait(5)  # the other thread also found no producer
            else:
                second_started.set()
                first_has_record.wait(5)

        def produce(self, topic: str, value: bytes, key: bytes | None = None, **_: Any) -> None:
            super().produce(topic, value, key)
            if self is made[0]:
                first_has_record.set()
                deadline = time.monotonic() + 5
                while outcomes._producer is cast(Any, self) and time.monotonic() < deadline:
                    time.sleep(0.001)

        def flush(self, timeout: float | None = None) -> int:
            self.flushed = True
            return 0

    with mock.patch.object(celery_side, "Producer", _Slow):
        threads = [
            threading.Thread(target=outcomes.succeeded, args=(_sent_task(f"wf-1/r1/0/{n}"), n))
            for n in (1, 2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    unflushed = [p for p in made if p.records and not p.flushed]
    assert len(made) == 1 and not unflushed, (
        f"{len(made)} producers made; {len(unflushed)} hold a record never flushed, "
        f"while published={outcomes.published}"
    )


# --- (2) signal semantics, on a real worker ----------------------------------------------


class Throttled(Exception):  # noqa: N818 - its name is what the test checks
    """An ordinary exception whose constructor does not take the message alone."""

    def __init__(self, service: str, wait_s: int) -> None:
        super().__init__(f"{service} throttled, wait {wait_s}s")


class Busy(ActivityFailure):
    """A retryable business failure, as docs/participants show them, with its own
    constructor."""

    retryable = True

    def __init__(self, service: str, wait_s: int) -> None:
        super().__init__(f"{service} is busy, wait {wait_s}s")


RAN: list[Any] = []  # the arguments review.ok ran with


def _ok(x: Any) -> Any:
    RAN.append(x)
    return {"x": x}


def _reject(x: Any) -> Any:
    raise Reject("not for this worker", requeue=False)


def _replace(self: Any, x: Any) -> Any:
    raise self.replace(self.app.tasks["review.ok"].s(x))


def _throttled(x: Any) -> Any:
    raise Throttled("bank", 5)


def _busy(x: Any) -> Any:
    raise Busy("bank", 5)


@pytest.fixture(scope="module")
def worker() -> Iterator[tuple[Any, _Recorder]]:
    """A Celery worker (solo pool) on kombu's in-memory transport, ``attach``ed, its
    outcomes recorded."""
    app: Any = Celery("review", broker="memory://", set_as_current=False)
    app.conf.task_acks_late = True
    app.conf.worker_hijack_root_logger = False
    app.conf.broker_connection_retry_on_startup = True
    recorder = _Recorder()
    outcomes = attach(app, KafkaSettings(kafka_bootstrap="127.0.0.1:1"))
    outcomes._producer = recorder  # type: ignore[assignment]
    outcomes._pid = os.getpid()
    app.task(name="review.ok")(_ok)
    app.task(name="review.reject")(_reject)
    app.task(name="review.replace", bind=True)(_replace)
    app.task(name="review.throttled")(_throttled)
    app.task(name="review.busy")(_busy)

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=5):
        yield app, recorder


def _run_on(worker: tuple[Any, _Recorder], name: str, seq: int, wait_s: float = 3.0) -> Any:
    """Send the step ``seq`` calling task ``name`` as the orchestrator would; the outcome
    the worker published for it, or None after ``wait_s``."""
    app, recorder = worker
    task = ActivityTask(
        workflow_id="wf-1",
        workflow_type="w",
        activity_id=f"wf-1/r1/{seq}/1",
        seq=seq,
        attempt=1,
        participant="celery",
        activity=name,
        payload=encode_json({"args": [seq], "kwargs": {}, "queue": "celery"}),
        scheduled_at_ms=T0,
        report_start=True,
    )
    queue, data = task_message(task)
    with app.connection() as conn:
        envelope: Any = kombu_json.loads  # what kombu's confluentkafka _get does
        conn.default_channel._put(queue, envelope(data))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for body in recorder.bodies():
            if isinstance(body, ActivityResult) and body.seq == seq:
                return body
        time.sleep(0.05)
    return None


def test_the_embedded_worker_reports_a_plain_success(worker: Any) -> None:
    """Control: the harness works (start report, then the result)."""
    result = _run_on(worker, "review.ok", 1)
    assert result is not None and result.status is ActivityStatus.COMPLETED
    starts = [b for b in worker[1].bodies() if isinstance(b, ActivityStarted) and b.seq == 1]
    assert len(starts) == 1


def test_a_task_the_worker_does_not_know_fails_the_step(worker: Any) -> None:
    """A misspelt task name, or a queue shared with workers of another code version: the
    consumer rejects the message and sends ``task_unknown`` (not ``task_failure``), which
    ``attach`` does not hook. The step never hears: without a timeout the workflow waits
    for ever. A native participant answers the same case with a retryable
    UnknownActivity failure (participant.py _unknown_activity)."""
    result = _run_on(worker, "review.no_such_task", 2)
    assert result is not None, "no outcome for an unregistered task"
    assert result.status is ActivityStatus.FAILED


def test_the_error_type_is_the_exceptions_class_name(worker: Any) -> None:
    """docs/celery.md: "the exception's class name is the error type". Celery passes
    ``task_failure`` the *pickleable* stand-in (trace.py handle_failure ->
    get_pickleable_exception), so an exception whose constructor does not take the
    message alone is reported as UnpickleableExceptionWrapper;
    ``non_retryable_error_types=("Throttled",)`` no longer matches."""
    result = _run_on(worker, "review.throttled", 5)
    assert result is not None and result.failure is not None
    assert result.failure.error_type == "Throttled", result.failure


def test_an_activity_failure_subclass_keeps_its_name_and_retryable_flag(worker: Any) -> None:
    """docs/celery.md: "participants.ActivityFailure keeps its retryable flag". A
    subclass with its own constructor arrives as its nearest pickleable base,
    ActivityFailure: error type 'ActivityFailure' and retryable False (the base's
    default) for a failure its class declares retryable."""
    result = _run_on(worker, "review.busy", 6)
    assert result is not None and result.failure is not None
    assert (result.failure.error_type, result.failure.retryable) == ("Busy", True), result.failure


# --- (4) validation -----------------------------------------------------------------------


def test_the_celery_participant_name_is_reserved() -> None:
    """protocol/celery.py: "reserved, no native participant may take it". Nothing
    enforces it: Participant('celery') is accepted, and every ``ctx.activity('celery.x',
    ...)`` its workflows make is now routed as a Celery message and parks them with
    InvalidCeleryCall."""
    with pytest.raises(ConfigurationError):
        Participant("celery")


# --- (6) docs -------------------------------------------------------------------------------
