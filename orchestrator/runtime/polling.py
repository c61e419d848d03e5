"""Batch polling that does not trade latency for batch size."""

from __future__ import annotations

from confluent_kafka import Consumer, Message


def poll_batch(consumer: Consumer, max_messages: int, wait_s: float) -> list[Message]:
    """Wait up to ``wait_s`` for one message, then take whatever else is already fetched.

    ``Consumer.consume(n, timeout)`` waits for ``n`` messages or the whole timeout, so under
    light load every hop would cost the full timeout. Waiting only for the first message
    keeps an idle pipeline's latency at a few milliseconds, while a busy one still gets
    large batches from what piled up during the previous one.
    """
    first = consumer.consume(num_messages=1, timeout=wait_s)
    if not first or max_messages <= 1:
        return list(first)
    return [*first, *consumer.consume(num_messages=max_messages - 1, timeout=0)]
