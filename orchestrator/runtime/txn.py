"""The orchestrator's Kafka transaction: begin, produce with attribution, commit, abort.

Rules referenced as "EOS n" are in shared/KAFKA_EOS.md. Every record produced in a
transaction carries a reference to what caused it (an inbox input, a workflow); when a
delivery fails, the failure and that reference are recorded instead of raised (EOS 8), so
after the abort the loop knows which input to treat differently on the retry instead of
failing the same way forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final, TypeVar

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from orchestrator.errors import FatalKafkaError, TransactionAbortableError
from orchestrator.transport import Headers, produce, record_size

log = logging.getLogger(__name__)
T = TypeVar("T")
Ref = Hashable
_RETRIES: Final = 10


@dataclass(frozen=True, slots=True)
class DeliveryFailure:
    """A record Kafka did not take: what caused it, why, where to, and how large it was."""

    ref: Ref
    error: KafkaError
    topic: str
    size: int


class Transaction:
    """The one transactional producer of an orchestrator instance (EOS 3)."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.open = False
        self.started = 0.0
        self._failures: list[DeliveryFailure] = []

    def age(self) -> float:
        """Seconds since the open transaction began (0 when none is open)."""
        return time.monotonic() - self.started if self.open else 0.0

    def begin(self) -> None:
        """Begin a transaction unless one is open."""
        if not self.open:
            self.call(self.producer.begin_transaction)
            self.open = True
            self.started = time.monotonic()

    def produce(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        ref: Ref,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> None:
        """Produce one record in the transaction, remembering ``ref`` if delivery fails.

        Raises:
            RecordRejectedError, TransactionAbortableError, FatalKafkaError: see
                :func:`orchestrator.transport.produce`.
        """
        self.begin()
        produce(
            self.producer,
            topic,
            key=key,
            value=value,
            headers=headers,
            partition=partition,
            on_delivery=self._reporter(ref),
        )

    def _reporter(self, ref: Ref) -> Callable[[KafkaError | None, Message], None]:
        def delivered(error: KafkaError | None, msg: Message) -> None:
            if error is None:
                return
            topic, size = "", 0
            try:
                raw = msg.headers() or []
                pairs = raw.items() if isinstance(raw, dict) else raw
                headers = [(str(k), v if isinstance(v, bytes) else None) for k, v in pairs]
                topic, size = str(msg.topic()), record_size(msg.key(), msg.value(), headers)
            except Exception:  # EOS 8: a delivery callback never raises
                log.warning("cannot size a failed record ref=%s", ref, exc_info=True)
            self._failures.append(DeliveryFailure(ref, error, topic, size))

        return delivered

    def commit(self, offsets: list[TopicPartition], group_metadata: Callable[[], object]) -> None:
        """Send the consumed offsets and commit.

        Raises:
            TransactionAbortableError: abort, rewind and process the batch again.
            FatalKafkaError: fenced or fatal; the process must restart.
        """
        self.begin()
        if offsets:
            metadata = group_metadata()
            # Retries must repeat identical arguments (EOS 4).
            self.call(lambda: self.producer.send_offsets_to_transaction(offsets, metadata, 30))
        self.call(lambda: self.producer.commit_transaction(30))
        self.open = False

    def abort(self) -> None:
        """Abort the open transaction, if any."""
        if self.open:
            self.call(lambda: self.producer.abort_transaction(30), abortable_ok=False)
            self.open = False

    def take_failures(self) -> list[DeliveryFailure]:
        """Delivery failures recorded since the last call."""
        failures, self._failures = self._failures, []
        return failures

    def call(self, fn: Callable[[], T], *, abortable_ok: bool = True) -> T:
        """Run a producer call with the error rules of EOS 4-6."""
        for attempt in range(_RETRIES):
            try:
                return fn()
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.retriable() and attempt < _RETRIES - 1:
                    log.warning("retrying after %s", error)
                    time.sleep(min(0.05 * 2**attempt, 1.0))
                    continue
                if error.txn_requires_abort() and abortable_ok:
                    raise TransactionAbortableError(error.name()) from exc
                raise FatalKafkaError(f"{error.name()}: {error.str()}") from exc
        raise AssertionError("unreachable")
