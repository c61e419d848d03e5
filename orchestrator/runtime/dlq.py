"""Dead letters: the original record, untouched, with why it was rejected in headers."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import Message

REASON = "sagaline.dlq.reason"
ERROR = "sagaline.dlq.error"
SOURCE = "sagaline.dlq.source"
TOPIC = "sagaline.dlq.topic"
PARTITION = "sagaline.dlq.partition"
OFFSET = "sagaline.dlq.offset"
TRUNCATED = "sagaline.dlq.value-dropped"
_MAX_ERROR_CHARS = 2_000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record to write to the DLQ topic: original key and value, reason headers."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def dead_letter(msg: Message, *, reason: str, error: str, source: str) -> DeadLetter:
    """Build the dead letter for ``msg``; ``reason`` is a short code operators filter on."""
    headers = [
        (REASON, reason.encode()),
        (ERROR, error[:_MAX_ERROR_CHARS].encode()),
        (SOURCE, source.encode()),
        (TOPIC, str(msg.topic()).encode()),
        (PARTITION, str(msg.partition()).encode()),
        (OFFSET, str(msg.offset()).encode()),
    ]
    return DeadLetter(msg.key(), msg.value(), headers)
