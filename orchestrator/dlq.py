"""Reading the dead-letter topic and sending dead letters back (``sagaline dlq``).

Dead letters are written by orchestrators (inbox inputs they cannot apply) and participants
(tasks they cannot decode) with the original key and value and ``sagaline.dlq.*`` headers
(:mod:`orchestrator.transport`). This module reads them with an assign-only consumer
under a throwaway group id that commits nothing, so no process of the deployment notices
it, and re-publishes those it is safe to send again to the topic they came from.

What is safe to send again: an inbox input, whole, whose reason is not a property of its
bytes alone, decoded to see what it is. It is re-published keyed by its workflow id with
the murmur2 partitioner, to the partition the orchestrators read that workflow from.

Not every input is harmless when repeated, so some are refused (:func:`plan_retry`):

- a start, or a signal-with-start, unless the caller says so (``include_starts``): a start
  is deduplicated only while the workflow's record remembers its request id, and the
  record is tombstoned ``SAGALINE_CLOSED_RETENTION_MS`` (7 days) after the run closed
  while the DLQ keeps letters 30 days; a start without a request id under
  ``if_closed=ALLOW`` always makes a new run;
- a cancel or a terminate unless named one by one (``named``): they carry no run id, so
  they end whatever run the id has now, which may be newer than the one they meant;
- an input held for a run that was then terminated (``run-terminated``): sent again it
  would reach whatever run the id has now;
- an ``oversized`` start the orchestrator recorded FAILED without its input: sent again
  it is a duplicate start and changes nothing;
- a ``signal-refused`` or ``promise-refused`` input whose bytes are the reason (an invalid
  signal name or empty signal id, a start for another id; a promise id of another
  workflow, or neither or both of a value and a failure).

Signals (by signal id), updates (by update id) and promise completions are deduplicated by
their workflow, and a late activity result is ignored. A task is never sent again: its
step has been timed out or retried under a new activity id by the orchestrator, so running
it again could repeat effects nobody will undo.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from orchestrator.errors import ConfigurationError, SagalineError
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.records import (
    CancelWorkflow,
    CompletePromise,
    InboxBody,
    SignalWorkflow,
    StartWorkflow,
    TerminateWorkflow,
    parse_promise_id,
)
from orchestrator.protocol.topics import Topics
from orchestrator.settings import KafkaSettings
from orchestrator.transport import (
    ERROR,
    KEY_DROPPED,
    OFFSET,
    PARTITION,
    REASON,
    SOURCE,
    TOPIC,
    VALUE_DROPPED,
    poll_batch,
    producer_message_max_bytes,
    record_size,
)
from orchestrator.workflow import signal_name_problem

RETRY_OF: Final = "sagaline.dlq.retry-of"
"""Header of a re-published record: ``<dlq topic>:<partition>:<offset>`` it came from."""

# Reasons that are a property of the record's bytes: sent again, it is dead-lettered again.
SAME_AGAIN: Final[Mapping[str, str]] = {
    "malformed": "its bytes are not a sagaline record",
    "wrong-record-type": "it is a record of another topic",
    "key-mismatch": "its key is not the workflow id its value names",
    "empty-workflow-id": "its workflow id is empty",
}
# Reasons whose letters are never sent again although their bytes are fine.
NEVER_AGAIN: Final[Mapping[str, str]] = {
    "run-terminated": "it was held for a run that was then terminated: sent again it would "
    "reach whatever run the id has now",
}
KNOWN_REASONS: Final = frozenset(
    {
        # orchestrators (orchestrator.runtime.inputs) and participants (decode errors)
        "malformed",
        "decode-error",
        "unknown-schema",
        "wrong-record-type",
        "oversized",
        "key-mismatch",
        "wrong-partition",
        "empty-workflow-id",
        "unknown-workflow",
        "signal-refused",
        "promise-refused",
        "undeliverable",
        "unparkable",
        "too-large-to-hold",
        "run-terminated",
    }
)
"""Every reason a dead letter can carry (``dlq retry --reason`` checks against them)."""
# The orchestrator's own decode refusal of an oversized record starts so (the codec's
# OversizedRecordError); any other oversized start was recorded FAILED without its input.
_DECODE_OVERSIZED: Final = "record is "
# Decodes a letter to decide: no limit of its own (the letter's size was checked when it
# was written).
_DECODE_LIMIT: Final = 1 << 31
_BATCH: Final = 500


class DeadLetterReadError(SagalineError):
    """Reading a dead-letter topic stopped making progress (a transaction nobody ends)."""


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One record of a dead-letter topic: where it is, its key and value (the original's,
    unless dropped for size) and its ``sagaline.dlq.*`` headers, by name."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: Mapping[str, bytes] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """Header ``name`` as text, None if absent."""
        data = self.headers.get(name)
        return None if data is None else data.decode("utf-8", "backslashreplace")

    @property
    def reason(self) -> str:
        """The reason code (``malformed``, ``unknown-workflow``, ...); ``?`` if absent."""
        return self.header(REASON) or "?"

    @property
    def error(self) -> str | None:
        """What was wrong, as the process that rejected it said."""
        return self.header(ERROR)

    @property
    def source(self) -> str | None:
        """Who rejected it: ``orchestrator`` or ``participant:<name>``."""
        return self.header(SOURCE)

    @property
    def origin(self) -> tuple[str | None, int | None, int | None]:
        """Topic, partition and offset of the original, as far as the headers say."""
        return self.header(TOPIC), _int(self.header(PARTITION)), _int(self.header(OFFSET))

    @property
    def dropped(self) -> bool:
        """True if the original's value or key was too large to be copied here."""
        return self.header(VALUE_DROPPED) == "true" or self.header(KEY_DROPPED) == "true"

    @property
    def key_text(self) -> str | None:
        """The key as text (undecodable bytes escaped), None if it has none."""
        return None if self.key is None else self.key.decode("utf-8", "backslashreplace")

    def to_json(self) -> dict[str, Any]:
        """The dead letter as a JSON-ready dict (without its value's bytes)."""
        topic, partition, offset = self.origin
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "key": self.key_text,
            "value_bytes": None if self.value is None else len(self.value),
            "reason": self.reason,
            "error": self.error,
            "source": self.source,
            "origin": {"topic": topic, "partition": partition, "offset": offset},
            "value_dropped": self.header(VALUE_DROPPED) == "true",
            "key_dropped": self.header(KEY_DROPPED) == "true",
            "headers": {name: self.header(name) for name in sorted(self.headers)},
        }


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class DeadLetterScan:
    """What a read of one dead-letter topic kept (``letters``, in partition and offset
    order) out of how many records it read (``total``)."""

    topic: str
    letters: list[DeadLetterRecord]
    total: int
    left: int = 0
    """Letters that matched but were not kept: past ``keep_first``."""
    marks: Mapping[int, int] = field(default_factory=dict)
    """Per partition, the highest offset this read covered: every matching letter at or
    below it was kept (``--after`` for the next run)."""


def read_dead_letters(
    settings: KafkaSettings,
    topic: str,
    *,
    reasons: Collection[str] = (),
    keep_last: int | None = None,
    offsets: Collection[tuple[int, int]] = (),
    after: Mapping[int, int] | None = None,
    keep_first: int | None = None,
    timeout_s: float = 30.0,
    stall_s: float = 60.0,
    progress: Callable[[str], None] | None = None,
    client_config: Mapping[str, Any] | None = None,
) -> DeadLetterScan:
    """Read dead-letter topic ``topic`` from its first offsets to its ends (read_committed).

    ``reasons``: keep only dead letters with one of these reasons. ``keep_last``: keep only
    the last that many read (the newest, on the usual one-partition topic). ``offsets``:
    keep only these ``(partition, offset)`` records, reading no further than they lie.
    ``after``: per partition, read only past this offset (a high-water mark an earlier run
    reported). ``keep_first``: keep at most that many (the oldest; the others are counted
    in ``left``, and ``marks`` stop before the first of them). The kept letters come in
    partition and offset order. ``client_config``: librdkafka settings under the
    deployment's (e.g. a quieter ``log_level`` for a command line).

    Raises:
        ConfigurationError: Kafka is out of reach or the topic does not exist.
        DeadLetterReadError: a partition made no progress for ``stall_s``.
    """
    say = progress or (lambda _text: None)
    where = f"Kafka at {settings.kafka_bootstrap} (SAGALINE_KAFKA_BOOTSTRAP)"
    consumer = Consumer(
        {
            **(client_config or {}),
            **settings.kafka_common(),
            "group.id": f"sagaline-dlq-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",  # retention may move a start meanwhile
        }
    )
    try:
        try:
            found = consumer.list_topics(timeout=timeout_s).topics.get(topic)
        except KafkaException as exc:
            raise ConfigurationError(f"cannot reach {where} within {timeout_s:g} s: {exc}") from exc
        if found is None or found.error is not None or not found.partitions:
            raise ConfigurationError(
                f"topic {topic} does not exist at {settings.kafka_bootstrap}; is "
                f"SAGALINE_TOPIC_PREFIX ({settings.topic_prefix!r}) the deployment's?"
            )
        wanted: dict[int, set[int]] = {}
        for partition, offset in offsets:
            wanted.setdefault(partition, set()).add(offset)
        spans: dict[int, tuple[int, int]] = {}
        for partition in sorted(found.partitions):
            if offsets and partition not in wanted:
                continue
            try:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=timeout_s
                )
            except KafkaException as exc:
                raise ConfigurationError(
                    f"cannot list the offsets of {topic} at {where}: {exc}"
                ) from exc
            if partition in wanted:
                low = max(low, min(wanted[partition]))
                high = min(high, max(wanted[partition]) + 1)
            if after and partition in after:
                low = max(low, after[partition] + 1)
            if high > low:
                spans[partition] = (low, high)
        letters, total, left = _read(
            consumer, topic, spans, reasons, keep_last, keep_first, wanted, stall_s, say
        )
    finally:
        consumer.close()
    marks = dict(after or {})
    for partition, (_low, high) in spans.items():
        marks[partition] = max(marks.get(partition, -1), high - 1)
    for partition, (_count, first_left) in left.items():
        marks[partition] = first_left - 1  # the letters from there on are still to do
    return DeadLetterScan(topic, letters, total, sum(n for n, _ in left.values()), marks)


def _read(
    consumer: Consumer,
    topic: str,
    spans: dict[int, tuple[int, int]],
    reasons: Collection[str],
    keep_last: int | None,
    keep_first: int | None,
    wanted: dict[int, set[int]],
    stall_s: float,
    say: Callable[[str], None],
) -> tuple[list[DeadLetterRecord], int, dict[int, tuple[int, int]]]:
    kept: deque[DeadLetterRecord] = deque(maxlen=keep_last)
    # Per partition: letters past keep_first (their values are not held), and the first.
    left: dict[int, tuple[int, int]] = {}
    total = 0
    if not spans:
        return [], 0, left
    consumer.assign([TopicPartition(topic, p, low) for p, (low, _high) in sorted(spans.items())])
    pending = set(spans)
    positions: dict[int, int] = {}
    moved = time.monotonic()
    said = time.monotonic()
    while pending:
        for msg in poll_batch(consumer, _BATCH, 0.2):
            error = msg.error()
            if error is not None:
                if error.fatal():
                    raise DeadLetterReadError(f"reading {topic}: {error}")
                continue  # transient: the positions below decide when a partition is done
            letter = _letter(topic, msg)
            if letter.partition not in pending or letter.offset >= spans[letter.partition][1]:
                continue  # past the end this read set itself
            total += 1
            if reasons and letter.reason not in reasons:
                continue
            if wanted and letter.offset not in wanted.get(letter.partition, ()):
                continue
            if keep_first is not None and (len(kept) >= keep_first or letter.partition in left):
                count, first = left.get(letter.partition, (0, letter.offset))
                left[letter.partition] = (count + 1, min(first, letter.offset))
                continue
            kept.append(letter)
        now = time.monotonic()
        for tp in consumer.position([TopicPartition(topic, p) for p in sorted(pending)]):
            if tp.offset > positions.get(tp.partition, -1):
                positions[tp.partition] = tp.offset
                moved = now
            # Transaction markers and aborted records leave gaps: the position, not the
            # last record's offset, says a partition is read to its end.
            if tp.offset >= spans[tp.partition][1]:
                pending.discard(tp.partition)
        if pending and now - moved > stall_s:
            behind = {p: (positions.get(p), spans[p][1]) for p in sorted(pending)}
            raise DeadLetterReadError(
                f"reading {topic} made no progress for {stall_s:g} s (partition: "
                f"(position, end)) {behind}; is a transaction open that nobody ends?"
            )
        if now - said >= 1.0:
            said = now
            say(f"reading {topic}: {total:,} records")
    ordered = sorted(kept, key=lambda d: (d.partition, d.offset))
    return ordered, total, left


def _letter(topic: str, msg: Message) -> DeadLetterRecord:
    headers: dict[str, bytes] = {}
    raw = msg.headers() or []
    for name, data in raw.items() if isinstance(raw, dict) else raw:
        if data is not None:
            headers[name] = data.encode() if isinstance(data, str) else data
    _kind, stamp = msg.timestamp()
    partition, offset = msg.partition(), msg.offset()
    assert partition is not None and offset is not None  # a consumed record has both
    return DeadLetterRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=stamp if stamp > 0 else None,
        key=msg.key(),
        value=msg.value(),
        headers=headers,
    )


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Whether ``letter`` may be sent again: to ``target``, or refused for ``refusal``."""

    letter: DeadLetterRecord
    target: str | None
    refusal: str | None


def decoding_codec() -> AvroCodec:
    """The codec :func:`plan_retry` decodes letters with: built once per command (it loads
    the schema directory), with no size limit of its own."""
    return AvroCodec(max_record_bytes=_DECODE_LIMIT)


def plan_retry(
    letter: DeadLetterRecord,
    topics: Topics,
    *,
    include_starts: bool = False,
    named: bool = False,
    codec: AvroCodec | None = None,
) -> RetryDecision:
    """Where ``letter`` may be sent again under the deployment ``topics``, or why not.

    Only inbox inputs of this deployment are sent again, whole (value and key kept), and
    only when the reason is not a property of their bytes (see :data:`SAME_AGAIN`) nor
    one of :data:`NEVER_AGAIN`. The value is decoded (with ``codec``) to see what it is:
    one that cannot be decoded is refused; starts and signal-with-starts only with
    ``include_starts``; cancels and terminates only when ``named`` one by one (see the
    module's docstring for why).
    """
    origin, partition, offset = letter.origin
    where = f"{origin}[{partition}]@{offset}"

    def refuse(why: str) -> RetryDecision:
        return RetryDecision(letter, None, why)

    if origin is None:
        return refuse("it does not record the topic it came from")
    if letter.dropped or letter.value is None or letter.key is None:
        return refuse(
            f"it does not hold the original's key and value (too large to copy, or none); "
            f"the original is at {where} while that topic's retention keeps it"
        )
    if origin.startswith(topics.tasks("")):
        return refuse(
            "it is a task: its step was timed out or retried by the orchestrator under a new "
            "activity id, so running it again could repeat effects nobody undoes"
        )
    if origin != topics.inbox:
        return refuse(
            f"it came from {origin}, not this deployment's inbox {topics.inbox} "
            "(is SAGALINE_TOPIC_PREFIX right?); only inbox inputs are sent again"
        )
    same = SAME_AGAIN.get(letter.reason)
    if same is not None:
        return refuse(f"{same} (reason {letter.reason}): it would be dead-lettered again")
    never = NEVER_AGAIN.get(letter.reason)
    if never is not None:
        return refuse(f"{never} (reason {letter.reason})")
    try:
        body = (codec or decoding_codec()).decode_inbox(letter.value)
    except Exception as exc:  # any failure to read it is a refusal, never a crash
        return refuse(f"this sagaline cannot decode it ({type(exc).__name__}: {exc})")
    why = _body_refusal(letter, body, include_starts=include_starts, named=named)
    return refuse(why) if why is not None else RetryDecision(letter, origin, None)


def _body_refusal(
    letter: DeadLetterRecord, body: InboxBody, *, include_starts: bool, named: bool
) -> str | None:
    """Why the decoded input ``body`` of ``letter`` must not be sent again, or None."""
    reason = letter.reason
    recorded = not (letter.error or "").startswith(_DECODE_OVERSIZED)
    if isinstance(body, StartWorkflow) and reason == "oversized" and recorded:
        return (
            "an oversized start the orchestrator recorded FAILED without its input: sent "
            "again it is a duplicate start and changes nothing (start it anew instead)"
        )
    if reason == "signal-refused" and isinstance(body, SignalWorkflow):
        if not body.signal_id or not _valid_signal_name(body.name):
            return "its signal name or signal id is invalid: it would be refused again"
        if body.start is not None and body.start.workflow_id != body.workflow_id:
            return "its start names another workflow id: it would be refused again"
    if reason == "promise-refused" and isinstance(body, CompletePromise):
        parsed = parse_promise_id(body.promise_id)
        if parsed is None or parsed[0] != body.workflow_id:
            return "its promise id names no promise of this workflow: it would be refused again"
        if (body.payload is None) == (body.failure is None):
            return "it has neither or both of a value and a failure: it would be refused again"
    starts = isinstance(body, StartWorkflow) or (
        isinstance(body, SignalWorkflow) and body.start is not None
    )
    if starts and not include_starts:
        what = "a start" if isinstance(body, StartWorkflow) else "a signal-with-start"
        return (
            f"{what}: sent again it may start the workflow again (a request id is forgotten "
            "once the run's record is removed, SAGALINE_CLOSED_RETENTION_MS after it closed; "
            "without one, if_closed=ALLOW makes a new run); check with sagaline describe, "
            "then pass --include-starts"
        )
    if isinstance(body, CancelWorkflow | TerminateWorkflow) and not named:
        what = "a cancel" if isinstance(body, CancelWorkflow) else "a terminate"
        return (
            f"{what} names no run: sent again it ends whatever run the id has now; check "
            "with sagaline describe, then name it with --offset"
        )
    return None


def _valid_signal_name(name: str) -> bool:
    return signal_name_problem(name) is None  # the engine's own rule


UNKNOWN: Final = "unknown (may still be delivered)"
"""The delivery error of a letter not acknowledged when the wait ended: it was purged from
the producer, but one already on the wire may still be written."""


def republish(
    settings: KafkaSettings,
    decisions: Iterable[RetryDecision],
    *,
    timeout_s: float = 30.0,
    on_acked: Callable[[RetryDecision], None] | None = None,
    client_config: Mapping[str, Any] | None = None,
) -> list[tuple[RetryDecision, str | None]]:
    """Send each retryable decision's letter to its target, keyed as it was, with a
    :data:`RETRY_OF` header; wait until Kafka acknowledges them. ``on_acked`` is called
    for each one acknowledged; ``client_config`` as for :func:`read_dead_letters`.

    Those not acknowledged within ``timeout_s`` are purged (the producer must not go on
    sending behind the caller's back) and reported as :data:`UNKNOWN`.

    Returns:
        Each decision sent and its delivery error (None when delivered).
    """
    chosen = [d for d in decisions if d.target is not None]
    if not chosen:
        return []
    largest = max(record_size(d.letter.key, d.letter.value) for d in chosen)
    producer = Producer(
        {
            **(client_config or {}),
            **settings.kafka_common(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # murmur2 on the workflow id: the partition the orchestrators read it from.
            "partitioner": "murmur2_random",
            "message.max.bytes": producer_message_max_bytes(largest),
        }
    )
    errors: dict[int, str | None] = {}
    purging = False

    def delivered(index: int, error: KafkaError | None, _msg: Message) -> None:
        if purging and error is not None:
            errors[index] = UNKNOWN  # purged at the timeout: maybe written, maybe not
            return
        errors[index] = None if error is None else str(error)
        if error is None and on_acked is not None:
            on_acked(chosen[index])

    for index, decision in enumerate(chosen):
        letter = decision.letter
        assert decision.target is not None
        headers: list[tuple[str, str | bytes | None]] = [
            (RETRY_OF, f"{letter.topic}:{letter.partition}:{letter.offset}".encode())
        ]
        while True:
            try:
                producer.produce(
                    decision.target,
                    key=letter.key,
                    value=letter.value,
                    headers=headers,
                    on_delivery=functools.partial(delivered, index),
                )
                break
            except BufferError:  # the local queue is full: let deliveries make room
                producer.poll(0.1)
            except KafkaException as exc:
                errors[index] = str(exc)
                break
        producer.poll(0)
    left = producer.flush(timeout_s)
    if left:
        purging = True
        producer.purge()
        producer.flush(0)  # serves the purged records' delivery reports
    outcome: list[tuple[RetryDecision, str | None]] = []
    for index, decision in enumerate(chosen):
        outcome.append((decision, errors.get(index, UNKNOWN)))
    return outcome
