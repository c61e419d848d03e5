"""Starting, signalling, querying, updating and resuming workflows from Python.

Every request is an inbox record; any language can do the same: an Avro ``InboxRecord``
in the Confluent wire format, keyed by the workflow id (UTF-8), on ``<prefix>.inbox``
(docs/protocol.md). Requests that want an answer (a start with a request id, a query, an
update) read a ``Reply`` keyed by their request id from ``<prefix>.replies``.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from orchestrator.convert import DEFAULT_CONVERTER, DataConverter
from orchestrator.errors import ConfigurationError, SagalineError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.partitioning import partition_for
from orchestrator.protocol.records import (
    CancelWorkflow,
    CompletePromise,
    Failure,
    IfClosed,
    IfRunning,
    InboxBody,
    Payload,
    QueryWorkflow,
    Reply,
    ReplyKind,
    ResumeWorkflow,
    SignalWorkflow,
    StartWorkflow,
    TerminateWorkflow,
    UpdateWorkflow,
    WorkflowRecord,
    WorkflowStatus,
    parse_promise_id,
)
from orchestrator.settings import KafkaSettings
from orchestrator.transport import produce
from orchestrator.workflow import signal_name_problem


class StartFailedError(SagalineError):
    """Kafka did not accept one or more start, signal, promise or resume requests."""


class ResultTimeoutError(SagalineError):
    """The workflow did not close within the time ``result`` was given."""


class ReplyTimeoutError(SagalineError):
    """No answer came within the time a start, query or update was given (no orchestrator
    owns the workflow's partition, or the replies topic is missing).

    ``request_id`` is the request's id (a start's ``request_id``, an update's
    ``update_id``): sending the request again with it is safe.
    """

    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class RequestFailedError(SagalineError):
    """The orchestrator answered a start, query or update with a failure.

    ``error_type`` names it: the class of what a query or update handler raised, or one of
    the codes docs/protocol.md lists (``WorkflowAlreadyRunning``, ``WorkflowIdReuseRejected``,
    ``WorkflowNotFound``, ``WorkflowClosed``, ``WorkflowStuck``, ``UnknownQuery``,
    ``UnknownUpdate``, ``UpdateRejected``, ...). ``run_id`` and ``status`` describe the run
    concerned ("" when there is none).
    """

    def __init__(self, reply: Reply) -> None:
        failure = reply.failure or Failure("UnknownError", "no failure given")
        super().__init__(f"{failure.error_type}: {failure.message}")
        self.error_type = failure.error_type
        self.message = failure.message
        self.workflow_id = reply.workflow_id
        self.run_id = reply.run_id
        self.status = reply.status


@dataclass(frozen=True)
class Started:
    """The answer to :meth:`WorkflowClient.start_workflow`: the run the id now has, and
    whether this request created it (False: an open run was used, per ``if_running``)."""

    workflow_id: str
    run_id: str
    created: bool
    status: WorkflowStatus


@dataclass(frozen=True)
class WorkflowResult:
    """How a run ended: ``status`` (terminal), its ``value`` when COMPLETED (as the
    ``result_type`` asked for; plain JSON by default), its ``failure`` otherwise, and the
    whole closing ``record``."""

    status: WorkflowStatus
    value: Any
    failure: Failure | None
    record: WorkflowRecord


# The kind of answer each request gets.
_KINDS: Final[dict[type, ReplyKind]] = {
    StartWorkflow: ReplyKind.START,
    QueryWorkflow: ReplyKind.QUERY,
    UpdateWorkflow: ReplyKind.UPDATE,
}

# The first chunk read back from the end of a history partition, then doubled.
_FIRST_CHUNK: Final = 500


class WorkflowClient:
    """Publishes workflow start, signal and resume requests.

    Values (inputs, signal, query, update and promise values) may be dataclasses or
    pydantic models as well as JSON: ``converter`` turns them into payloads, and the
    answers back into the type a ``result_type`` names (docs/payloads.md). ``codec`` is
    the Avro codec of the records around them.

    Example::

        client = WorkflowClient(KafkaSettings())
        client.start("order.process", Order("o-1", items), workflow_id="o-1")
        client.flush()
        receipt = client.result("o-1", result_type=Receipt).value
    """

    def __init__(
        self,
        settings: KafkaSettings,
        codec: AvroCodec | None = None,
        converter: DataConverter = DEFAULT_CONVERTER,
    ) -> None:
        self.topics = settings.topics
        self.codec = codec or AvroCodec()
        self.converter = converter
        self._common = settings.kafka_common()
        self._errors: list[str] = []
        self._replies: Consumer | None = None
        self._reply_partitions: int | None = None
        self._lock = threading.Lock()
        self._producer = Producer(
            {
                **settings.kafka_common(),
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "partitioner": "murmur2_random",
            }
        )

    def start(self, workflow_type: str, value: Any, *, workflow_id: str | None = None) -> str:
        """Queue a start request without waiting for an answer; returns the workflow id.
        Call :meth:`flush` to wait until Kafka has it.

        A start for an id that has a run, open or closed, is ignored by the orchestrator,
        so retrying it is safe. :meth:`start_workflow` waits for the run id and takes
        id-reuse options.

        Raises:
            PayloadEncodingError: ``value`` cannot be converted (the message says where).
            ValueError: ``workflow_id`` is empty.
        """
        wid = _workflow_id(workflow_id)
        record = StartWorkflow(
            workflow_id=wid,
            workflow_type=workflow_type,
            input=self.converter.to_payload(value),
            requested_at_ms=_now_ms(),
        )
        self._send(record, wid.encode())
        return wid

    def start_workflow(
        self,
        workflow_type: str,
        value: Any,
        *,
        workflow_id: str | None = None,
        if_running: IfRunning = IfRunning.FAIL,
        if_closed: IfClosed = IfClosed.REJECT,
        request_id: str | None = None,
        timeout_s: float = 30.0,
    ) -> Started:
        """Start a workflow and wait for the orchestrator's answer.

        Args:
            workflow_type: the registered workflow name.
            value: its input: JSON, a dataclass, a pydantic model (docs/payloads.md).
            workflow_id: the id (default: a new UUID).
            if_running: when the id has an open run: ``FAIL`` (raise), ``USE_EXISTING``
                (return it, ``created`` False) or ``TERMINATE_EXISTING`` (end it as
                TERMINATED, without compensations, and start a new run).
            if_closed: when the id's last run has closed (and is still retained):
                ``REJECT`` (the default: raise), ``ALLOW`` a new run, or
                ``ALLOW_IF_FAILED`` (only if it did not complete).
            request_id: identifies this request (default: a new UUID). Sending the
                same request again, from any process, gets the same answer and starts
                nothing more: pass your own to make retries across processes safe.
            timeout_s: how long to wait for the answer.

        Raises:
            ValueError: ``workflow_id`` is empty.
            RequestFailedError: the policy refused (``WorkflowAlreadyRunning``,
                ``WorkflowIdReuseRejected``).
            ReplyTimeoutError: no answer in time; the start may still be applied, and
                sending it again with the same ``request_id`` (the error's
                ``request_id``) is safe.
        """
        wid = _workflow_id(workflow_id)
        rid = request_id or str(uuid.uuid4())
        payload = self.converter.to_payload(value)
        start = StartWorkflow(wid, workflow_type, payload, _now_ms(), rid, if_running, if_closed)
        reply = self._request(start, wid, rid, timeout_s)
        if not reply.ok:
            raise RequestFailedError(reply)
        return Started(wid, reply.run_id, reply.created, _status(reply.status))

    def query(
        self,
        workflow_id: str,
        name: str,
        value: Any = None,
        *,
        timeout_s: float = 30.0,
        result_type: Any = Any,
    ) -> Any:
        """Ask the open workflow's query handler ``name`` (``ctx.on_query``) and return its
        answer, as ``result_type`` (plain JSON by default). The orchestrator that owns the
        workflow replays its state and calls the handler; nothing is recorded.

        Raises:
            RequestFailedError: no such workflow open, no such handler, or the handler
                raised (``error_type`` is its exception's class).
            ReplyTimeoutError: no answer in time.
            PayloadEncodingError: ``value`` cannot be converted, or the answer does not
                fit ``result_type``.
        """
        rid = str(uuid.uuid4())
        args = self.converter.to_payload(value)
        query = QueryWorkflow(workflow_id, rid, name, args, _now_ms())
        reply = self._request(query, workflow_id, rid, timeout_s)
        return self._answer(reply, result_type)

    def update(
        self,
        workflow_id: str,
        name: str,
        value: Any = None,
        *,
        update_id: str | None = None,
        timeout_s: float = 30.0,
        result_type: Any = Any,
    ) -> Any:
        """Apply update ``name`` (``ctx.on_update``) to a running workflow and return its
        handler's answer once the update is recorded, as ``result_type`` (plain JSON by
        default).

        The handler's validator runs first: if it raises, nothing is recorded and this
        raises ``RequestFailedError`` (``UpdateRejected``). Sending the same ``update_id``
        again applies nothing more and returns the same answer.

        Raises:
            RequestFailedError: rejected, no such handler, the workflow is not running,
                or the handler raised (the update is recorded all the same).
            ReplyTimeoutError: no answer in time; sending again with the same
                ``update_id`` is safe.
            PayloadEncodingError: ``value`` cannot be converted, or the answer does not
                fit ``result_type``.
        """
        uid = update_id or str(uuid.uuid4())
        args = self.converter.to_payload(value)
        update = UpdateWorkflow(workflow_id, uid, name, args, _now_ms())
        reply = self._request(update, workflow_id, uid, timeout_s)
        return self._answer(reply, result_type)

    def _answer(self, reply: Reply, result_type: Any) -> Any:
        if not reply.ok:
            raise RequestFailedError(reply)
        if reply.payload is None:
            return None
        return self.converter.from_payload(reply.payload, result_type)

    def _request(
        self, body: InboxBody, workflow_id: str, request_id: str, timeout_s: float
    ) -> Reply:
        """Send ``body`` and wait for the reply keyed ``request_id``; one request at a
        time per client (the reply reader is shared)."""
        with self._lock:
            return self._request_locked(body, workflow_id, request_id, timeout_s)

    def _request_locked(
        self, body: InboxBody, workflow_id: str, request_id: str, timeout_s: float
    ) -> Reply:
        deadline = time.monotonic() + timeout_s
        consumer = self._replies_consumer()
        key = request_id.encode()
        topic = self._replies_topic(consumer)
        partition = TopicPartition(self.topics.replies, partition_for(key, topic))
        # Read from the end as it is now: the answer comes after the request.
        _, high = consumer.get_watermark_offsets(partition, timeout=max(1.0, timeout_s))
        consumer.assign([TopicPartition(self.topics.replies, partition.partition, high)])
        self._send(body, workflow_id.encode())
        self.flush(max(1.0, deadline - time.monotonic()))
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReplyTimeoutError(
                    f"no answer from the orchestrators within {timeout_s:g} s (is one "
                    f"running, and does {self.topics.replies} exist?); sending it again "
                    f"with request id {request_id!r} is safe",
                    request_id,
                )
            for msg in consumer.consume(100, min(0.5, left)):
                if msg.error() is None and msg.key() == key and msg.value():
                    reply = self.codec.decode_reply(msg.value())
                    if reply.workflow_id == workflow_id and reply.kind is _KINDS[type(body)]:
                        return reply

    def _replies_consumer(self) -> Consumer:
        if self._replies is None:
            self._replies = Consumer(
                {
                    **self._common,
                    "group.id": f"sagaline-replies-{uuid.uuid4().hex}",
                    "isolation.level": "read_committed",
                    "enable.auto.commit": False,
                    "fetch.wait.max.ms": 10,
                }
            )
        return self._replies

    def _replies_topic(self, consumer: Consumer) -> int:
        """The partition count of the replies topic."""
        if self._reply_partitions is None:
            metadata = consumer.list_topics(self.topics.replies, timeout=30)
            topic = metadata.topics.get(self.topics.replies)
            if topic is None or topic.error is not None or not topic.partitions:
                raise ConfigurationError(
                    f"topic {self.topics.replies} does not exist: create it "
                    "(sagaline topics create)"
                )
            self._reply_partitions = len(topic.partitions)
        return self._reply_partitions

    def close(self) -> None:
        """Flush what is queued and close the reply reader (the client is done)."""
        try:
            self.flush()
        finally:
            if self._replies is not None:
                self._replies.close()
                self._replies = None

    def signal(
        self,
        workflow_id: str,
        name: str,
        value: Any = None,
        *,
        signal_id: str | None = None,
        start: tuple[str, Any] | None = None,
    ) -> str:
        """Queue the signal ``name`` with ``value`` for a running workflow; returns
        its signal id. Call :meth:`flush` to wait.

        The workflow takes it with ``ctx.wait_signal(name)``; signals sent before the
        wait are kept, in order. Sending again with the same ``signal_id`` is safe: the
        workflow ignores an id it already received. ``start=(workflow_type, input)`` is
        signal-with-start: a workflow that does not exist yet is started with that input
        first, then receives the signal. A signal for a closed workflow is ignored; one
        for a workflow that does not exist (without ``start``) is dead-lettered.

        Raises:
            ConfigurationError: ``name`` is not 1-200 characters of UTF-8 text without NUL.
            PayloadEncodingError: ``value`` (or the start's input) cannot be converted.
        """
        problem = signal_name_problem(name)
        if problem is not None:
            raise ConfigurationError(f"signal({name!r}): {problem}")
        now = _now_ms()
        begin = None
        if start is not None:
            workflow_type, input_value = start
            begin = StartWorkflow(
                workflow_id, workflow_type, self.converter.to_payload(input_value), now
            )
        sid = signal_id or str(uuid.uuid4())
        payload = self.converter.to_payload(value)
        record = SignalWorkflow(workflow_id, name, payload, sid, now, begin)
        self._send(record, workflow_id.encode())
        return sid

    def cancel(self, workflow_id: str, reason: str = "") -> None:
        """Queue a request to cancel a running workflow: its code sees
        ``WorkflowCancelledError`` at the await it is blocked on, its ``Saga`` blocks
        compensate, and it ends ``CANCELLED`` unless the code handles it. A closed
        workflow is left as it is (``result`` shows how it ended); a second cancel is
        ignored. Call :meth:`flush` to wait."""
        self._send(CancelWorkflow(workflow_id, reason, _now_ms()), workflow_id.encode())

    def terminate(self, workflow_id: str, reason: str = "") -> None:
        """Queue a request to end a workflow now as ``TERMINATED``, for ``reason``: its
        code does not run again (no compensations), inputs it held are dead-lettered, its
        children are handled per their parent close policy. A closed workflow is left as
        it is. Call :meth:`flush` to wait."""
        self._send(TerminateWorkflow(workflow_id, reason, _now_ms()), workflow_id.encode())

    def complete_promise(self, promise_id: str, value: Any = None) -> None:
        """Queue the completion of a workflow's promise (``ctx.promise``) with ``value``:
        the workflow's await returns it. A promise completes once; later
        completions are ignored. Call :meth:`flush` to wait.

        Raises:
            ConfigurationError: ``promise_id`` is not a promise id.
            PayloadEncodingError: ``value`` cannot be converted.
        """
        self._complete(promise_id, self.converter.to_payload(value), None)

    def fail_promise(self, promise_id: str, error_type: str, message: str = "") -> None:
        """Queue the failure of a workflow's promise: its await raises
        ``PromiseFailedError`` with ``error_type`` and ``message``. Call :meth:`flush`."""
        self._complete(promise_id, None, Failure(error_type, message))

    def _complete(self, promise_id: str, value: Payload | None, failure: Failure | None) -> None:
        parsed = parse_promise_id(promise_id)
        if parsed is None:
            raise ConfigurationError(
                f"{promise_id!r} is not a promise id ('<workflow id>/<run id>/p<step>')"
            )
        workflow_id = parsed[0]
        record = CompletePromise(workflow_id, promise_id, _now_ms(), value, failure)
        self._send(record, workflow_id.encode())

    def resume(self, workflow_id: str) -> None:
        """Queue a resume of a STUCK workflow: its code runs again with the code deployed
        now, then the inputs held while it was parked are applied. Resuming a workflow that
        is not stuck changes nothing. Call :meth:`flush` to wait."""
        self._send(ResumeWorkflow(workflow_id, _now_ms()), workflow_id.encode())

    def resume_all_stuck(self) -> int:
        """Queue a resume of every stuck workflow, one request per inbox partition.

        Returns:
            The number of partitions asked.
        """
        topic = self._producer.list_topics(self.topics.inbox, timeout=30).topics.get(
            self.topics.inbox
        )
        if topic is None or topic.error is not None or not topic.partitions:
            raise ConfigurationError(f"topic {self.topics.inbox} does not exist")
        for partition in sorted(topic.partitions):
            self._send(ResumeWorkflow(None, _now_ms()), None, partition)
        return len(topic.partitions)

    def _send(self, body: InboxBody, key: bytes | None, partition: int | None = None) -> None:
        produce(
            self._producer,
            self.topics.inbox,
            key=key,
            value=self.codec.encode_inbox(body),
            partition=partition,
            on_delivery=self._delivered,
        )
        self._producer.poll(0)

    def _delivered(self, error: KafkaError | None, msg: Message) -> None:
        if error is not None:
            self._errors.append(f"{msg.key()!r}: {error}")

    def result(
        self, workflow_id: str, timeout_s: float = 60.0, *, result_type: Any = Any
    ) -> WorkflowResult:
        """Wait until the workflow ``workflow_id`` is closed and return how it ended; the
        value of a COMPLETED run as ``result_type`` (plain JSON by default). A run that
        continued as new did not end the workflow: this waits for the last run.

        Reads only the history partition the id maps to: backwards from its end until
        the workflow's latest record (compaction keeps one per id, so a closed workflow is
        found without reading the rest), then forwards from the end for the record that
        closes it, with ``read_committed``.

        Raises:
            ResultTimeoutError: it did not close within ``timeout_s`` (it may not exist).
            ConfigurationError: the history topic does not exist.
            PayloadEncodingError: the result does not fit ``result_type``.
        """
        deadline = time.monotonic() + timeout_s
        key = workflow_id.encode()
        consumer = Consumer(
            {
                **self._common,
                "group.id": f"sagaline-result-{uuid.uuid4().hex}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
            }
        )
        try:
            metadata = consumer.list_topics(self.topics.history, timeout=30)
            topic = metadata.topics.get(self.topics.history)
            if topic is None or topic.error is not None or not topic.partitions:
                raise ConfigurationError(f"topic {self.topics.history} does not exist")
            partition = partition_for(key, len(topic.partitions))
            low, high = consumer.get_watermark_offsets(
                TopicPartition(self.topics.history, partition), timeout=30
            )
            latest = self._latest_before(consumer, key, partition, low, high, deadline)
            if latest is not None and _ended(latest):
                return self._outcome(latest, result_type)
            found = self._closing_after(consumer, key, partition, high, deadline)
            if found is None:
                raise ResultTimeoutError(
                    f"workflow {workflow_id!r} did not close within {timeout_s:g} s"
                )
            return self._outcome(found, result_type)
        finally:
            consumer.close()

    def _outcome(self, record: WorkflowRecord, result_type: Any) -> WorkflowResult:
        value = None
        if record.status is WorkflowStatus.COMPLETED and record.result is not None:
            value = self.converter.from_payload(record.result, result_type)
        return WorkflowResult(record.status, value, record.failure, record)

    def _latest_before(
        self,
        consumer: Consumer,
        key: bytes,
        partition: int,
        low: int,
        high: int,
        deadline: float,
    ) -> WorkflowRecord | None:
        """The latest record of ``key`` below offset ``high``, read back in growing chunks."""
        end, chunk = high, _FIRST_CHUNK
        while end > low and time.monotonic() < deadline:
            start = max(low, end - chunk)
            found: WorkflowRecord | None = None
            consumer.assign([TopicPartition(self.topics.history, partition, start)])
            position = start
            while position < end and time.monotonic() < deadline:
                for msg in consumer.consume(1000, 0.2):
                    if msg.error() is not None or msg.offset() is None:
                        continue
                    offset = msg.offset() or 0
                    if offset < end and msg.key() == key and msg.value():
                        # Offset order is the order of the id's records (a new run of the
                        # id starts its revisions again).
                        found = self.codec.decode_workflow(msg.value())
                # Control records (transaction markers) take offsets but are not returned.
                position = consumer.position([TopicPartition(self.topics.history, partition)])[
                    0
                ].offset
            if found is not None:
                return found
            end, chunk = start, chunk * 2
        return None

    def _closing_after(
        self, consumer: Consumer, key: bytes, partition: int, start: int, deadline: float
    ) -> WorkflowRecord | None:
        """The first terminal record of ``key`` from offset ``start`` on, until the deadline."""
        consumer.assign([TopicPartition(self.topics.history, partition, start)])
        while time.monotonic() < deadline:
            wait = max(0.0, min(0.5, deadline - time.monotonic()))
            for msg in consumer.consume(1000, wait):
                if msg.error() is not None or msg.key() != key or not msg.value():
                    continue
                record = self.codec.decode_workflow(msg.value())
                if _ended(record):
                    return record
        return None

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued request is acknowledged by Kafka.

        Raises:
            StartFailedError: some start could not be delivered.
        """
        left = self._producer.flush(timeout_s)
        if left:
            raise StartFailedError(
                f"{left} start request(s) still unacknowledged after {timeout_s}s"
            )
        if self._errors:
            errors, self._errors = self._errors, []
            raise StartFailedError(f"{len(errors)} request(s) failed, first: {errors[0]}")


def _status(symbol: str) -> WorkflowStatus:
    try:
        return WorkflowStatus(symbol)
    except ValueError:
        return WorkflowStatus.UNKNOWN


def _ended(record: WorkflowRecord) -> bool:
    """True when ``record`` closes the workflow, not just a run that continued as new."""
    return record.status.terminal and record.status is not WorkflowStatus.CONTINUED_AS_NEW


def _workflow_id(given: str | None) -> str:
    """``given``, or a new UUID for None; an empty id would be dead-lettered."""
    if given is None:
        return str(uuid.uuid4())
    if given == "":
        raise ValueError("workflow_id must not be empty: pass None for a generated id")
    return given


def _now_ms() -> int:
    return int(time.time() * 1000)
