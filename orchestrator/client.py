"""Starting, signalling and resuming workflows from Python: produce inbox records.

Any language can do the same: an Avro ``InboxRecord`` in the Confluent wire format,
keyed by the workflow id (UTF-8), on ``<prefix>.inbox``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from orchestrator.errors import ConfigurationError, SagalineError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    CompletePromise,
    Failure,
    InboxBody,
    ResumeWorkflow,
    SignalWorkflow,
    StartWorkflow,
    parse_promise_id,
)
from orchestrator.settings import KafkaSettings
from orchestrator.transport import produce
from orchestrator.workflow import signal_name_problem


class StartFailedError(SagalineError):
    """Kafka did not accept one or more start, signal, promise or resume requests."""


class WorkflowClient:
    """Publishes workflow start, signal and resume requests.

    Example::

        client = WorkflowClient(KafkaSettings())
        client.start("order.process", {"order_id": "o-1", ...}, workflow_id="o-1")
        client.flush()
    """

    def __init__(self, settings: KafkaSettings, codec: AvroCodec | None = None) -> None:
        self.topics = settings.topics
        self.codec = codec or AvroCodec()
        self._errors: list[str] = []
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
        """Queue a start request; returns the workflow id. Call :meth:`flush` to wait.

        A start for an id that already exists is ignored by the orchestrator, so
        retrying a start with the same id is safe.
        """
        wid = workflow_id or str(uuid.uuid4())
        record = StartWorkflow(
            workflow_id=wid,
            workflow_type=workflow_type,
            input=encode_json(value),
            requested_at_ms=_now_ms(),
        )
        self._send(record, wid.encode())
        return wid

    def signal(
        self,
        workflow_id: str,
        name: str,
        value: Any = None,
        *,
        signal_id: str | None = None,
        start: tuple[str, Any] | None = None,
    ) -> str:
        """Queue the signal ``name`` with ``value`` (JSON) for a running workflow; returns
        its signal id. Call :meth:`flush` to wait.

        The workflow takes it with ``ctx.wait_signal(name)``; signals sent before the
        wait are kept, in order. Sending again with the same ``signal_id`` is safe: the
        workflow ignores an id it already received. ``start=(workflow_type, input)`` is
        signal-with-start: a workflow that does not exist yet is started with that input
        first, then receives the signal. A signal for a closed workflow is ignored; one
        for a workflow that does not exist (without ``start``) is dead-lettered.

        Raises:
            ConfigurationError: ``name`` is not 1-200 characters of UTF-8 text without NUL.
            PayloadEncodingError: ``value`` (or the start's input) is not JSON-encodable.
        """
        problem = signal_name_problem(name)
        if problem is not None:
            raise ConfigurationError(f"signal({name!r}): {problem}")
        now = _now_ms()
        begin = None
        if start is not None:
            workflow_type, input_value = start
            begin = StartWorkflow(workflow_id, workflow_type, encode_json(input_value), now)
        sid = signal_id or str(uuid.uuid4())
        record = SignalWorkflow(workflow_id, name, encode_json(value), sid, now, begin)
        self._send(record, workflow_id.encode())
        return sid

    def complete_promise(self, promise_id: str, value: Any = None) -> None:
        """Queue the completion of a workflow's promise (``ctx.promise``) with ``value``
        (JSON): the workflow's await returns it. A promise completes once; later
        completions are ignored. Call :meth:`flush` to wait.

        Raises:
            ConfigurationError: ``promise_id`` is not a promise id.
            PayloadEncodingError: ``value`` is not JSON-encodable.
        """
        self._complete(promise_id, encode_json(value), None)

    def fail_promise(self, promise_id: str, error_type: str, message: str = "") -> None:
        """Queue the failure of a workflow's promise: its await raises
        ``PromiseFailedError`` with ``error_type`` and ``message``. Call :meth:`flush`."""
        self._complete(promise_id, None, Failure(error_type, message))

    def _complete(self, promise_id: str, value: Any, failure: Failure | None) -> None:
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


def _now_ms() -> int:
    return int(time.time() * 1000)
