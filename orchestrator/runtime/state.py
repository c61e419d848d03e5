"""In-memory workflow state of the partitions one orchestrator owns, with staging.

Rules of this module:
- What is held is what was committed. An open workflow is kept as the exact bytes of its
  last committed history record (decoded on demand, with a bounded cache of decoded
  records); a closed one only as a marker until retention tombstones it. So memory per
  idle workflow is about its record's size, and a restore does not decode histories.
- Changes of the open transaction live in a staged overlay; they become the committed
  state only after Kafka confirmed the transaction (KAFKA_EOS rule 1), and are dropped on
  abort.
- Each partition keeps an index of when its running workflows next need to wake (a timer,
  a retry's backoff, a timeout), from the records' ``wake_at_ms``; restore rebuilds it from
  the peeked head of each record, and only committed records are in it.
- No Kafka, no clock: the loop passes everything in.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from orchestrator.protocol.records import RunRequest, WorkflowRecord, WorkflowStatus

ClosedHead = tuple[WorkflowStatus, str, str | None, tuple[RunRequest, ...]]
"""A closed workflow's status, run id, its start's request id and earlier runs' starts."""


class Presence(Enum):
    """What a partition knows of a workflow id."""

    ABSENT = "absent"
    OPEN = "open"
    CLOSED = "closed"
    UNWRITABLE = "unwritable"


@dataclass(slots=True)
class PartitionState:
    """The committed workflows of one partition.

    Attributes:
        open: encoded records of workflows that take input (RUNNING or STUCK).
        stuck: ids among ``open`` whose status is STUCK.
        stuck_since: the ids of ``stuck`` -> when they were parked (epoch ms: the record's
            last write once it was STUCK), 0 until known: a restore reads only records'
            heads, so restored ones are dated later (``WorkflowStore.date_stuck``).
        closed: closed workflow id -> ``closed_at_ms``, roughly in closing order; kept until
            retention tombstones them, so late duplicates are still recognised.
        unwritable: id -> why this code must not write the workflow (its record cannot be
            read, or has a status newer code wrote); its inputs are held, its record is
            never overwritten.
        held: id -> {inbox offset: original inbox bytes} of inputs kept for a parked
            workflow (history keys from ``protocol.topics.held_key``).
        wake: running workflow id -> when it next needs to wake (epoch ms); ``due`` takes
            them in time order from a heap whose outdated entries are skipped.
        closed_runs: closed workflow id -> (status, run id, request id of its start, the
            starts of earlier runs), what a later start of the same id needs for its
            id-reuse policy and to recognise a retried start.
    """

    partition: int
    open: dict[str, bytes] = field(default_factory=dict)
    stuck: set[str] = field(default_factory=set)
    stuck_since: dict[str, int] = field(default_factory=dict)
    closed: dict[str, int] = field(default_factory=dict)
    unwritable: dict[str, str] = field(default_factory=dict)
    held: dict[str, dict[int, bytes]] = field(default_factory=dict)
    history_records: int = 0
    wake: dict[str, int] = field(default_factory=dict)
    closed_runs: dict[str, ClosedHead] = field(default_factory=dict)
    _timers: list[tuple[int, str]] = field(default_factory=list)
    _firing: dict[str, int] = field(default_factory=dict)

    def put(
        self,
        workflow_id: str,
        encoded: bytes,
        status: WorkflowStatus,
        closed_at: int,
        wake_at: int | None = None,
        run_id: str = "",
        request_id: str | None = None,
        earlier: tuple[RunRequest, ...] = (),
        stuck_at: int = 0,
    ) -> None:
        """Store the committed version of a workflow, given its peeked head.

        ``closed_at``, ``run_id`` and ``request_id`` are used only when ``status`` is
        terminal, ``wake_at`` only when it is RUNNING, ``stuck_at`` (when it was parked;
        0: unknown) only when it is STUCK and was not stuck already.
        """
        self.unwritable.pop(workflow_id, None)
        if status is WorkflowStatus.UNKNOWN:
            self._forget(workflow_id)
            self.closed.pop(workflow_id, None)
            self.closed_runs.pop(workflow_id, None)
            self.unwritable[workflow_id] = (
                "its history record has a status this code does not know (written by newer "
                "code); it is left as it is and its inputs are held until code that knows "
                "it owns the partition"
            )
        elif status.terminal:
            self._forget(workflow_id)
            # A new closing time moves the id to the end: ``closed`` stays in closing order.
            self.closed.pop(workflow_id, None)
            self.closed[workflow_id] = closed_at
            self.closed_runs[workflow_id] = (status, run_id, request_id, earlier)
        else:
            self.closed.pop(workflow_id, None)
            self.closed_runs.pop(workflow_id, None)
            self.open[workflow_id] = encoded
            if status is WorkflowStatus.STUCK:
                # A workflow re-parked for another reason has been stuck all along.
                if not self.stuck_since.get(workflow_id):
                    self.stuck_since[workflow_id] = stuck_at
                self.stuck.add(workflow_id)
            elif workflow_id in self.stuck:
                self.stuck.discard(workflow_id)
                del self.stuck_since[workflow_id]
            if wake_at is None or status is not WorkflowStatus.RUNNING:
                self.wake.pop(workflow_id, None)
            else:
                self.set_wake(workflow_id, wake_at)

    def set_wake(self, workflow_id: str, wake_at: int) -> None:
        """Index ``workflow_id`` to wake at ``wake_at`` (replacing its earlier time)."""
        if self.wake.get(workflow_id) == wake_at:
            return
        self._firing.pop(workflow_id, None)
        self.wake[workflow_id] = wake_at
        heapq.heappush(self._timers, (wake_at, workflow_id))
        if len(self._timers) > 2 * len(self.wake) + 1024:
            # Outdated entries pile up when wake times keep moving (heartbeats): rebuild.
            self._timers = [(at, wid) for wid, at in self.wake.items()]
            heapq.heapify(self._timers)

    def due(self, now_ms: int, limit: int) -> list[str]:
        """Up to ``limit`` workflows whose wake time is at or before ``now_ms``, earliest
        first. They leave the index until ``settle``, so one batch wakes each once."""
        timers = self._timers
        found: list[str] = []
        while timers and len(found) < limit and timers[0][0] <= now_ms:
            at, wid = heapq.heappop(timers)
            if self.wake.get(wid) == at and wid not in self._firing:
                self._firing[wid] = at
                found.append(wid)
        return found

    def settle(self) -> None:
        """The batch committed or aborted: workflows it woke whose wake time did not move
        (the wake was lost with an abort, or changed nothing) go back in the index."""
        for wid, at in self._firing.items():
            if self.wake.get(wid) == at:
                heapq.heappush(self._timers, (at, wid))
        self._firing.clear()

    def next_wake(self) -> int | None:
        """The earliest wake time indexed, or None."""
        timers = self._timers
        while timers and self.wake.get(timers[0][1]) != timers[0][0]:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def delete(self, workflow_id: str) -> None:
        """Forget a workflow (its history key was tombstoned)."""
        self._forget(workflow_id)
        self.closed.pop(workflow_id, None)
        self.closed_runs.pop(workflow_id, None)
        self.unwritable.pop(workflow_id, None)

    def mark_unwritable(self, workflow_id: str, reason: str) -> None:
        """Its record cannot be read here: hold no state, keep its inputs, never write it."""
        self.delete(workflow_id)
        self.unwritable[workflow_id] = reason

    def hold(self, workflow_id: str, offset: int, value: bytes) -> None:
        """Keep an inbox input for a parked workflow."""
        self.held.setdefault(workflow_id, {})[offset] = value

    def release(self, workflow_id: str, offset: int) -> None:
        """A held input was applied (its key tombstoned)."""
        kept = self.held.get(workflow_id)
        if kept is not None:
            kept.pop(offset, None)
            if not kept:
                del self.held[workflow_id]

    def oldest_stuck(self) -> int | None:
        """When the longest-parked STUCK workflow with a known parking time was parked
        (epoch ms), or None when there is none."""
        return min((at for at in self.stuck_since.values() if at), default=None)

    def _forget(self, workflow_id: str) -> None:
        self.open.pop(workflow_id, None)
        if workflow_id in self.stuck:
            self.stuck.discard(workflow_id)
            del self.stuck_since[workflow_id]
        self.wake.pop(workflow_id, None)


@dataclass(slots=True)
class _Staged:
    partition: int
    record: WorkflowRecord | None  # None: a tombstone
    encoded: bytes | None


class WorkflowStore:
    """Committed state per owned partition plus the staged changes of the open batch."""

    def __init__(self, cache_size: int = 10_000) -> None:
        self._partitions: dict[int, PartitionState] = {}
        self._staged: dict[str, _Staged] = {}
        # (partition, workflow id, inbox offset) -> value to hold, or None to release.
        self._staged_held: dict[tuple[int, str, int], bytes | None] = {}
        self._cache: dict[str, WorkflowRecord] = {}
        self._cache_size = cache_size

    # --- ownership --------------------------------------------------------------------

    def install(self, state: PartitionState) -> None:
        """Take ownership of a restored partition."""
        self._partitions[state.partition] = state

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions we no longer own, staged changes included."""
        gone = set(partitions)
        for partition in gone:
            state = self._partitions.pop(partition, None)
            if state is not None:
                for workflow_id in state.open:
                    self._cache.pop(workflow_id, None)
        self._staged = {k: v for k, v in self._staged.items() if v.partition not in gone}
        self._staged_held = {k: v for k, v in self._staged_held.items() if k[0] not in gone}

    def owns(self, partition: int) -> bool:
        """True if the partition is restored and ours."""
        return partition in self._partitions

    def partition(self, partition: int) -> PartitionState:
        """The committed state of an owned partition."""
        return self._partitions[partition]

    def partitions(self) -> Iterator[PartitionState]:
        """The owned partitions."""
        return iter(self._partitions.values())

    # --- reading ----------------------------------------------------------------------

    def presence(self, partition: int, workflow_id: str) -> Presence:
        """What is known of ``workflow_id``, staged changes included."""
        staged = self._staged.get(workflow_id)
        if staged is not None:
            if staged.record is None:
                return Presence.ABSENT
            return Presence.CLOSED if staged.record.status.terminal else Presence.OPEN
        state = self._partitions[partition]
        if workflow_id in state.open:
            return Presence.OPEN
        if workflow_id in state.closed:
            return Presence.CLOSED
        if workflow_id in state.unwritable:
            return Presence.UNWRITABLE
        return Presence.ABSENT

    def staged_record(self, workflow_id: str) -> WorkflowRecord | None:
        """The record staged in this batch for ``workflow_id``, if any."""
        staged = self._staged.get(workflow_id)
        return None if staged is None else staged.record

    def cached(self, workflow_id: str) -> WorkflowRecord | None:
        """The decoded committed record, if it is in the cache."""
        return self._cache.get(workflow_id)

    def encoded(self, partition: int, workflow_id: str) -> bytes | None:
        """The committed bytes of an open workflow."""
        return self._partitions[partition].open.get(workflow_id)

    def remember(self, workflow_id: str, record: WorkflowRecord) -> None:
        """Cache a decoded committed record (the oldest entry goes when the cache is full)."""
        if self._cache_size <= 0:
            return
        self._cache.pop(workflow_id, None)
        if len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[workflow_id] = record

    def held(self, partition: int, workflow_id: str) -> list[tuple[int, bytes]]:
        """Inputs held for ``workflow_id`` (staged ones included), oldest first."""
        kept = dict(self._partitions[partition].held.get(workflow_id, {}))
        for (p, wid, offset), value in self._staged_held.items():
            if p == partition and wid == workflow_id:
                if value is None:
                    kept.pop(offset, None)
                else:
                    kept[offset] = value
        return sorted(kept.items())

    def holds_any(self, partition: int, workflow_id: str) -> bool:
        """True if inputs are held for ``workflow_id``: later ones must wait behind them."""
        if workflow_id in self._partitions[partition].held:
            return bool(self.held(partition, workflow_id))
        if not self._staged_held:
            return False  # the common case, asked for every input
        return any(
            p == partition and wid == workflow_id and v is not None
            for (p, wid, _), v in self._staged_held.items()
        )

    # --- staging ----------------------------------------------------------------------

    def stage(self, partition: int, record: WorkflowRecord, encoded: bytes) -> None:
        """Hold a changed workflow, and its encoded record, until the transaction commits."""
        self._staged[record.workflow_id] = _Staged(partition, record, encoded)

    def stage_tombstone(self, partition: int, workflow_id: str) -> None:
        """Delete a closed workflow from history when the transaction commits."""
        self._staged[workflow_id] = _Staged(partition, None, None)

    def unstage(self, workflow_id: str) -> None:
        """Drop a staged change that turned out to change nothing."""
        self._staged.pop(workflow_id, None)

    def stage_hold(self, partition: int, workflow_id: str, offset: int, value: bytes) -> None:
        """Keep an input for a parked workflow when the transaction commits."""
        self._staged_held[(partition, workflow_id, offset)] = value

    def stage_release(self, partition: int, workflow_id: str, offset: int) -> None:
        """Tombstone a held input that was applied, when the transaction commits."""
        self._staged_held[(partition, workflow_id, offset)] = None

    def staged(self) -> list[tuple[int, str, WorkflowRecord | None, bytes | None]]:
        """Changed workflows of the open batch: (partition, id, record or None, bytes)."""
        return [(s.partition, wid, s.record, s.encoded) for wid, s in self._staged.items()]

    def staged_held(self) -> list[tuple[int, str, int, bytes | None]]:
        """Held-input writes (value) and releases (None) of the open batch."""
        return [(p, wid, offset, v) for (p, wid, offset), v in self._staged_held.items()]

    def promote(self) -> None:
        """The transaction committed: staged versions become the committed state."""
        self._promote()
        for state in self._partitions.values():
            state.settle()

    def _promote(self) -> None:
        for workflow_id, staged in self._staged.items():
            owner = self._partitions.get(staged.partition)
            if owner is None:
                continue
            record = staged.record
            if record is None:
                owner.delete(workflow_id)
                self._cache.pop(workflow_id, None)
                continue
            assert staged.encoded is not None
            owner.put(
                workflow_id,
                staged.encoded,
                record.status,
                record.closed_at_ms or record.updated_at_ms,
                record.wake_at_ms,
                record.run_id,
                record.request_id,
                record.earlier_requests,
                record.updated_at_ms,
            )
            if record.status.terminal:
                self._cache.pop(workflow_id, None)
            else:
                self.remember(workflow_id, record)
        for (partition, workflow_id, offset), value in self._staged_held.items():
            owner = self._partitions.get(partition)
            if owner is None:
                continue
            if value is None:
                owner.release(workflow_id, offset)
            else:
                owner.hold(workflow_id, offset, value)
        self._staged.clear()
        self._staged_held.clear()

    def discard_staged(self) -> None:
        """The transaction aborted: forget what it staged; what it woke wakes again."""
        self._staged.clear()
        self._staged_held.clear()
        for state in self._partitions.values():
            state.settle()

    def date_stuck(self, partition: int, parked_at: Callable[[bytes], int], limit: int) -> int:
        """Date the STUCK workflows of ``partition`` whose parking time is unknown (those
        a restore read), from the decoded cache or, for at most ``limit`` of them, from
        ``parked_at(committed bytes)``; returns how many stay undated.

        Bounded so that a restore that found many parked workflows costs the loop little
        per call; the re-drive after each restore usually leaves them in the cache.
        """
        state = self._partitions[partition]
        since = state.stuck_since
        undated = [wid for wid, at in since.items() if not at]
        left = 0
        for wid in undated:
            record = self._cache.get(wid)
            # 0 stands for "unknown": a time of 0 (never written) must not be taken for it.
            if record is not None:
                since[wid] = max(1, record.updated_at_ms)
            elif limit > 0:
                limit -= 1
                since[wid] = max(1, parked_at(state.open[wid]))
            else:
                left += 1
        return left

    def next_wake(self) -> int | None:
        """The earliest wake time of any owned partition, or None."""
        times = [t for s in self._partitions.values() if (t := s.next_wake()) is not None]
        return min(times, default=None)

    def staged_count(self) -> int:
        """How many history writes the open batch holds."""
        return len(self._staged) + len(self._staged_held)
