"""Section 4: kill -9 of one of two orchestrators, and a third one joining, under probes.

Probe starts flow to every partition each 100 ms; a partition "processes" when its probes'
closed records appear on the history topic, and a stall is the longest time between two
consecutive probe closes (their ``closed_at_ms``) on one partition.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from examples.order_saga.harness import SagalineProcess

from .orchestrators import LogCursor, parse_restore, settled_owners, wait_until
from .runs import Bench, TopicSet


class Traffic:
    """A probe start to every partition each ``interval_s``, and the watcher read between."""

    def __init__(self, topics: TopicSet, interval_s: float = 0.1) -> None:
        self.topics = topics
        self.interval_s = interval_s
        self._next = time.monotonic()

    def step(self) -> None:
        """Publish a round if one is due, then read history briefly."""
        now = time.monotonic()
        if now >= self._next:
            for partition in range(self.topics.bench.partitions):
                self.topics.probe(partition)
            self._next = max(self._next + self.interval_s, now)
        self.topics.watcher.poll(max(0.0, min(0.02, self._next - time.monotonic())))


@dataclass(frozen=True, slots=True)
class KillRun:
    """One kill -9 of an instance with another one running."""

    recovery_s: float  # kill to the first probe closed on the last of the victim's partitions
    per_partition_s: tuple[float, ...]
    survivor_gap_s: float  # largest gap on the survivor's own partitions
    dead: int
    live: int
    restore_s: float | None  # the survivor's restores after the kill, from its log
    restore_records: int | None


@dataclass(frozen=True, slots=True)
class JoinRun:
    """One third instance joining two running ones."""

    kept_gap_s: float  # largest gap on partitions whose owner did not change
    moved_gap_s: float
    kept: int
    moved: int


class Failover:
    """Two (then three) orchestrators on one topic set under a steady probe flow."""

    def __init__(self, bench: Bench, topics: TopicSet) -> None:
        self.bench = bench
        self.topics = topics
        self.traffic = Traffic(topics)
        self.procs = {name: bench.process(topics, name) for name in ("bench-a", "bench-b")}
        self.joiner = ("bench-c", bench.process(topics, "bench-c"))

    def everything(self) -> list[SagalineProcess]:
        """Every process this scenario may have started."""
        return [*self.procs.values(), self.joiner[1]]

    def settle(self, members: Iterable[str], *, what: str) -> tuple[dict[int, str], float]:
        """Wait until exactly ``members`` own every partition and each processes probes."""
        wanted = set(members)
        running = [self.procs.get(m) or self.joiner[1] for m in wanted]
        owners = wait_until(
            lambda: settled_owners(
                self.bench.admin,
                self.topics.group,
                self.topics.topics.inbox,
                wanted,
                self.bench.partitions,
            ),
            deadline_s=self.bench.deadline_s,
            what=f"{what}: group {self.topics.group} stable with {sorted(wanted)} owning all",
            step=self.traffic.step,
            processes=running,
            every_s=0.25,
        )
        settled_ms = time.time() * 1000
        self.flowing(settled_ms, running, what=what)
        return owners, settled_ms

    def flowing(self, since_ms: float, running: list[SagalineProcess], *, what: str) -> None:
        """Wait until every partition has closed three probes since ``since_ms``."""
        watcher = self.topics.watcher
        wait_until(
            lambda: (
                True
                if all(watcher.count_after(p, since_ms) >= 3 for p in range(self.bench.partitions))
                else None
            ),
            deadline_s=self.bench.deadline_s,
            what=f"{what}: probes closing on every partition",
            step=self.traffic.step,
            processes=running,
        )

    def kill(self, owners: dict[int, str], victim: str, survivor: str) -> KillRun:
        """kill -9 ``victim``; time until its partitions process probes on ``survivor``."""
        watcher = self.topics.watcher
        dead = sorted(p for p, o in owners.items() if o == victim)
        live = sorted(p for p, o in owners.items() if o != victim)
        alive = [self.procs[survivor]]
        cursor = LogCursor(alive[0].log_path)
        self.procs[victim].kill9()
        # After kill9() returns the victim is dead: a probe closed later is the survivor's.
        kill_ms = time.time() * 1000
        wait_until(
            lambda: True if all(watcher.first_after(p, kill_ms) for p in dead) else None,
            deadline_s=self.bench.deadline_s,
            what=f"{survivor}: probes processed on {victim}'s partitions {dead} after kill -9",
            step=self.traffic.step,
            processes=alive,
        )
        back = {p: watcher.first_after(p, kill_ms) for p in dead}
        per_partition = tuple(
            (c.closed_ms - kill_ms) / 1000 for c in back.values() if c is not None
        )
        back_ms = kill_ms + max(per_partition) * 1000
        self.flowing(back_ms, alive, what=f"after kill -9 of {victim}")
        end_ms = time.time() * 1000
        gap = max((watcher.largest_gap(p, kill_ms, end_ms) for p in live), default=0.0)
        restore = parse_restore(cursor.text())
        return KillRun(
            max(per_partition),
            per_partition,
            gap / 1000,
            len(dead),
            len(live),
            restore.seconds if restore else None,
            restore.records if restore else None,
        )

    def join(self, owners: dict[int, str]) -> tuple[JoinRun, dict[int, str]]:
        """Start the third instance; the gaps on partitions kept and moved; stop it again."""
        watcher = self.topics.watcher
        name, process = self.joiner
        two = set(self.procs)
        join_ms = time.time() * 1000
        process.start()
        after, _ = self.settle(two | {name}, what=f"{name} joining")
        end_ms = time.time() * 1000
        kept = [p for p in range(self.bench.partitions) if owners[p] == after[p]]
        moved = [p for p in range(self.bench.partitions) if owners[p] != after[p]]
        kept_gap = max((watcher.largest_gap(p, join_ms, end_ms) for p in kept), default=0.0)
        moved_gap = max((watcher.largest_gap(p, join_ms, end_ms) for p in moved), default=0.0)
        self.bench.stop(process)
        owners, _ = self.settle(two, what=f"{name} gone")
        return JoinRun(kept_gap / 1000, moved_gap / 1000, len(kept), len(moved)), owners


def failover(bench: Bench, topics: TopicSet) -> tuple[list[KillRun], list[JoinRun]]:
    """``bench.repeat`` kills of instance b (restarted after each), then as many joins of c."""
    scenario = Failover(bench, topics)
    kills: list[KillRun] = []
    joins: list[JoinRun] = []
    try:
        for process in scenario.procs.values():
            process.start()
        owners, _ = scenario.settle(scenario.procs, what="two instances")
        for _ in range(bench.repeat):
            kills.append(scenario.kill(owners, "bench-b", "bench-a"))
            scenario.procs["bench-b"].start()
            owners, _ = scenario.settle(scenario.procs, what="bench-b restarted")
        for _ in range(bench.repeat):
            run, owners = scenario.join(owners)
            joins.append(run)
        return kills, joins
    finally:
        for process in scenario.everything():
            process.stop()
