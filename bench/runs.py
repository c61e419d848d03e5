"""One benchmark run's topics and orchestrator starts: the pieces every section uses."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka.admin import AdminClient

from examples.order_saga.harness import ROOT, SERVICES, SagalineProcess, base_env, free_port
from orchestrator.admin import ensure_topics
from orchestrator.client import WorkflowClient
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.topics import Topics
from orchestrator.settings import KafkaSettings

from .history import ProbeIds, ProbeWatcher, RecordFactory, Shape, WriteStats, write_history
from .orchestrators import (
    BenchError,
    LogCursor,
    RestoreReport,
    orchestrator,
    parse_restore,
    stable_rss_kib,
    wait_until,
)
from .workflows import PROBE_TYPE


@dataclass
class Bench:
    """The run's settings and shared clients."""

    bootstrap: str
    dsn: str
    partitions: int
    repeat: int
    deadline_s: float
    keep_topics: bool
    settings: dict[str, str]
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    admin: AdminClient = field(init=False)
    codec: AvroCodec = field(default_factory=AvroCodec)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.admin = AdminClient({"bootstrap.servers": self.bootstrap})

    @property
    def log_dir(self) -> Path:
        """Where the orchestrators' logs go."""
        return ROOT / ".stack" / "bench" / f"state-{self.run_id}"

    def process(self, topics: TopicSet, instance: str) -> SagalineProcess:
        """An orchestrator of the bench registry on ``topics``."""
        return orchestrator(
            topics.env,
            self.log_dir / topics.name,
            instance,
            metrics_port=str(free_port()),
            **self.settings,
        )

    def stop(self, process: SagalineProcess) -> None:
        """SIGTERM and wait; a non-zero exit is noted, not fatal to the figures."""
        code = process.stop()
        if code not in (0, None):
            self.notes.append(f"{process.name} exited {code} when stopped: {process.tail(3)}")


class TopicSet:
    """One scenario's fresh topics, the client that starts probes and the probe watcher."""

    def __init__(self, bench: Bench, name: str) -> None:
        self.bench = bench
        self.name = name
        self.topics = Topics(f"bench-state.{bench.run_id}.{name}")
        try:
            ensure_topics(
                bench.admin, self.topics, partitions=bench.partitions, participants=SERVICES
            )
        except Exception as exc:
            raise BenchError(
                f"creating the topics of {self.topics.prefix} failed "
                f"({type(exc).__name__}: {exc}); does the broker's controller answer "
                "(create and delete a topic by hand)?"
            ) from exc
        self.env = base_env(bench.bootstrap, bench.dsn, self.topics.prefix)
        self.client = WorkflowClient(
            KafkaSettings(kafka_bootstrap=bench.bootstrap, topic_prefix=self.topics.prefix)
        )
        self.probes = ProbeIds(name, bench.partitions)
        self.written = 0
        self._watcher: ProbeWatcher | None = None

    @property
    def group(self) -> str:
        """The orchestrators' consumer group."""
        return f"{self.topics.prefix}.orchestrator"

    @property
    def watcher(self) -> ProbeWatcher:
        """Reads probes from the history topic, from where it stood after the bulk write."""
        if self._watcher is None:
            self._watcher = ProbeWatcher(
                self.bench.bootstrap, self.topics.history, self.bench.partitions
            )
        return self._watcher

    def write(
        self, factory: RecordFactory, count: int, shape_of: Callable[[int], Shape]
    ) -> WriteStats:
        """Write ``count`` workflows to the history topic (before anything watches it)."""
        assert self._watcher is None, "write before watching"
        stats = write_history(
            self.bench.bootstrap,
            self.topics.history,
            self.bench.partitions,
            factory.records(count, shape_of, first=self.written),
        )
        self.written += stats.records
        return stats

    def probe(self, partition: int) -> str:
        """Start a probe on ``partition``; returns its workflow id."""
        wid = self.probes.on(partition)
        self.client.start(PROBE_TYPE, {"partition": partition}, workflow_id=wid)
        return wid

    def close(self) -> None:
        """Close the clients and delete the topics (unless kept)."""
        if self._watcher is not None:
            self._watcher.close()
        self.client.flush()
        if self.bench.keep_topics:
            return
        names = [self.topics.inbox, self.topics.history, self.topics.dlq, self.topics.replies]
        names += [self.topics.tasks(p) for p in SERVICES]
        for name, future in self.bench.admin.delete_topics(names, operation_timeout=60).items():
            try:
                future.result(timeout=120)
            except Exception as exc:  # cleanup: say so, keep the figures
                self.bench.notes.append(f"deleting {name}: {type(exc).__name__}: {exc}")


# --- one orchestrator start --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartRun:
    """Figures of one orchestrator start."""

    ready_s: float  # process start to the last probe closed (closed_at_ms)
    restore: RestoreReport | None
    rss_kib: int
    history_records: int  # records on the history topic before the start


def measure_start(bench: Bench, topics: TopicSet, process: SagalineProcess) -> StartRun:
    """Start ``process``, probe every partition, and read its restore and memory figures."""
    watcher = topics.watcher
    watcher.catch_up()
    held = topics.written + watcher.records_seen
    cursor = LogCursor(process.log_path)
    started_ms = time.time() * 1000
    process.start()
    ids = [topics.probe(p) for p in range(bench.partitions)]
    topics.client.flush()
    wait_until(
        lambda: True if all(i in watcher.closed for i in ids) else None,
        deadline_s=bench.deadline_s,
        what=f"{process.name}: a probe closed on each of {bench.partitions} partitions",
        step=lambda: watcher.poll(0.05),
        processes=[process],
    )
    ready_s = (max(watcher.closed[i].closed_ms for i in ids) - started_ms) / 1000
    everything = frozenset(range(bench.partitions))

    def logged() -> RestoreReport | None:
        report = parse_restore(cursor.text())
        return report if report is not None and report.partitions >= everything else None

    try:
        restore: RestoreReport | None = wait_until(
            logged, deadline_s=10, what=f"{process.name}: restore lines for every partition"
        )
    except BenchError:
        restore = parse_restore(cursor.text())
        bench.notes.append(
            f"{process.name}: no restore line for every partition in its log "
            f"(found {sorted(restore.partitions) if restore else 'none'})"
        )
    rss = stable_rss_kib(process)
    return StartRun(ready_s, restore, rss, held)


def start_and_restarts(
    bench: Bench, topics: TopicSet, instance: str
) -> tuple[StartRun, list[StartRun]]:
    """The first start on ``topics``, then ``bench.repeat`` restarts of the same instance."""
    process = bench.process(topics, instance)
    try:
        first = measure_start(bench, topics, process)
        bench.stop(process)
        again = []
        for _ in range(bench.repeat):
            again.append(measure_start(bench, topics, process))
            bench.stop(process)
        return first, again
    finally:
        process.stop()
