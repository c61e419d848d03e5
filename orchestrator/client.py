"""Starting workflows from Python: produce a ``StartWorkflow`` to the inbox.

Any language can do the same: an Avro ``InboxRecord`` in the Confluent wire format,
keyed by the workflow id (UTF-8), on ``<prefix>.inbox``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from orchestrator.errors import SagalineError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import StartWorkflow
from orchestrator.settings import KafkaSettings


class StartFailedError(SagalineError):
    """Kafka did not accept one or more start requests."""


class WorkflowClient:
    """Publishes workflow start requests.

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
            requested_at_ms=int(time.time() * 1000),
        )
        data = self.codec.encode_inbox(record)
        while True:
            try:
                self._producer.produce(
                    self.topics.inbox, key=wid.encode(), value=data, on_delivery=self._delivered
                )
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)
        return wid

    def _delivered(self, error: KafkaError | None, msg: Message) -> None:
        if error is not None:
            self._errors.append(f"{msg.key()!r}: {error}")

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued start is acknowledged by Kafka.

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
            raise StartFailedError(f"{len(errors)} start(s) failed, first: {errors[0]}")
