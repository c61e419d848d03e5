"""Flow control of a participant's pipeline, without Kafka: offsets, in-flight bound, throttle.

Rules of this module: plain data structures and decisions, no clients and no threads of its
own, so every rule is unit-tested with an injected clock. The runtime
(:mod:`participants.runtime`) calls them from its loop thread and its worker threads, so the
classes that both use are thread-safe.

The offset rule: a partition's committed offset is the lowest offset still in flight (taken
from Kafka but not yet answered, i.e. its result not yet acknowledged), or one past the
highest offset taken when none is. A task that never finishes holds its partition's commit
at its own offset, and nothing else: tasks after it run, their results are published, and
their offsets are committed once it is done (or redelivered, after a restart or a
rebalance, to be answered from the idempotency inbox).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

PartitionKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Ticket:
    """One offset taken from Kafka, to hand back to :meth:`OffsetTracker.finish`.

    ``generation`` tells apart a partition's tracking before and after it was revoked: a
    task that finishes after its partition moved away (or moved away and came back) does
    not touch the new owner's tracking.
    """

    key: PartitionKey
    offset: int
    generation: int


@dataclass(slots=True)
class _Partition:
    generation: int
    in_flight: set[int] = field(default_factory=set)
    next_offset: int = -1  # one past the highest offset taken; -1 while none was
    committed: int = -1  # the last offset committed, or the first one taken

    def commit_point(self) -> int:
        return min(self.in_flight) if self.in_flight else self.next_offset


class OffsetTracker:
    """Which offsets of each partition are in flight, and what may be committed.

    Thread-safe: offsets are taken on the loop thread and finished from delivery callbacks,
    which run wherever the producer is polled.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[PartitionKey, _Partition] = {}
        self._generations: dict[PartitionKey, int] = {}
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Offsets taken and not finished yet, over every tracked partition."""
        return self._in_flight

    def take(self, key: PartitionKey, offset: int) -> Ticket:
        """Offset ``offset`` of ``key`` was taken from Kafka and is now in flight."""
        with self._lock:
            part = self._partitions.get(key)
            if part is None:
                # Where the group stood: committing the first offset taken changes nothing.
                part = self._partitions[key] = _Partition(
                    self._generations.get(key, 0), committed=offset
                )
            if offset not in part.in_flight:
                part.in_flight.add(offset)
                self._in_flight += 1
            part.next_offset = max(part.next_offset, offset + 1)
            return Ticket(key, offset, part.generation)

    def finish(self, ticket: Ticket) -> None:
        """The task behind ``ticket`` is answered (its result acknowledged by Kafka)."""
        with self._lock:
            part = self._partitions.get(ticket.key)
            if part is None or part.generation != ticket.generation:
                return  # revoked meanwhile: the partition's new owner answers it again
            if ticket.offset in part.in_flight:
                part.in_flight.remove(ticket.offset)
                self._in_flight -= 1

    def committable(self, only: Iterable[PartitionKey] | None = None) -> dict[PartitionKey, int]:
        """Partitions whose commit point moved past what was last committed, with it."""
        keys = None if only is None else set(only)
        with self._lock:
            out: dict[PartitionKey, int] = {}
            for key, part in self._partitions.items():
                if keys is not None and key not in keys:
                    continue
                point = part.commit_point()
                if point > part.committed:
                    out[key] = point
            return out

    def committed(self, key: PartitionKey, offset: int) -> None:
        """Kafka accepted ``offset`` as ``key``'s committed offset."""
        with self._lock:
            part = self._partitions.get(key)
            if part is not None:
                part.committed = max(part.committed, offset)

    def forget(self, keys: Iterable[PartitionKey]) -> None:
        """Stop tracking ``keys`` (revoked or lost); tasks still running there are ignored."""
        with self._lock:
            for key in keys:
                part = self._partitions.pop(key, None)
                if part is not None:
                    self._in_flight -= len(part.in_flight)
                    self._generations[key] = part.generation + 1

    def lowest_in_flight(self, key: PartitionKey) -> int | None:
        """The offset holding ``key``'s commit, if any is in flight."""
        with self._lock:
            part = self._partitions.get(key)
            return None if part is None or not part.in_flight else min(part.in_flight)


Decision = Literal["pause", "resume"]


class InFlightGate:
    """Bounds the tasks in flight at ``limit``, refilled in chunks; pauses when it lasts.

    Once ``limit`` tasks are in flight the loop takes no more until a quarter of the limit
    (at least one slot) is free again, so that it takes tasks in chunks rather than one per
    answer (each take is a round of the loop competing with the workers for the GIL).
    Meanwhile what the consumer prefetched stays in its queue. Only when the pipeline stays
    full for ``pause_after_s`` (hung handlers, not a burst) are the partitions paused, so
    the loop can go on serving the group's callbacks without taking tasks: a pause drops
    the consumer's prefetched tasks, to be fetched again after the resume, so it is not
    worth it for short waits.
    """

    def __init__(self, limit: int, pause_after_s: float = 0.5) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be at least 1, not {limit}")
        self.limit = limit
        self.resume_at = limit - max(1, limit // 4)
        self.pause_after_s = pause_after_s
        self.paused = False
        self._full_since: float | None = None

    @property
    def full(self) -> bool:
        """The limit was reached and not enough room is back yet (paused or not)."""
        return self._full_since is not None

    def room(self, in_flight: int) -> int:
        """How many more tasks may be taken now."""
        return 0 if self.full else max(0, self.limit - in_flight)

    def decide(self, in_flight: int, now: float) -> Decision | None:
        """``"pause"`` or ``"resume"`` when the consumer must change state, else None."""
        if self._full_since is None:
            if in_flight < self.limit:
                return None
            self._full_since = now
        if in_flight <= self.resume_at:
            self._full_since = None
            if self.paused:
                self.paused = False
                return "resume"
            return None
        if not self.paused and now - self._full_since >= self.pause_after_s:
            self.paused = True
            return "pause"
        return None


T = TypeVar("T")


class Throttle(Generic[T]):
    """At most one item per ``interval_s``; the latest item offered meanwhile is kept and
    sent when the window ends, unless :meth:`close` came first.

    ``send`` runs under the throttle's lock, so once :meth:`close` returns nothing more is
    sent: whatever the closer sends next (an attempt's result) comes after every item.
    Thread-safe.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_sent: float | None = None
        self._pending: list[T] = []  # the latest item offered within the window, if any
        self._closed = False

    @property
    def has_pending(self) -> bool:
        """An item waits for the window to end."""
        return bool(self._pending)

    @property
    def closed(self) -> bool:
        """:meth:`close` was called."""
        return self._closed

    def offer(self, item: T, send: Callable[[T], None]) -> bool:
        """Send ``item`` now if the window allows it, else keep it as the pending item.

        Returns True when it was sent now.
        """
        with self._lock:
            if self._closed:
                return False
            now = self._clock()
            if self._last_sent is None or now - self._last_sent >= self.interval_s:
                self._pending.clear()
                self._last_sent = now
                send(item)
                return True
            self._pending[:] = [item]
            return False

    def due_at(self) -> float | None:
        """When the pending item may be sent (clock time), or None without one."""
        with self._lock:
            if not self._pending or self._last_sent is None:
                return None
            return self._last_sent + self.interval_s

    def flush_due(self, send: Callable[[T], None]) -> bool:
        """Send the pending item if its window ended; True when one was sent."""
        with self._lock:
            if self._closed or not self._pending or self._last_sent is None:
                return False
            now = self._clock()
            if now - self._last_sent < self.interval_s:
                return False
            item = self._pending.pop()
            self._last_sent = now
            send(item)
            return True

    def close(self) -> None:
        """Drop the pending item and refuse every later one; waits for a send under way."""
        with self._lock:
            self._closed = True
            self._pending.clear()
