"""Benchmark: restore time, memory per idle workflow and failover of the orchestrator.

Participants are not started: the workflows are written straight to a fresh history topic
(12 partitions by default) and only orchestrator processes run. Probes (``bench.probe``
starts, which close at once) tell when a partition processes inputs. Sections:

1. restore of 100,000 open order sagas: first start and restarts of the same instance, as
   time until probes close on every partition (minus the same for an empty history) and as
   the restore time the orchestrator logs;
2. the same with 1,000,000 history records, most of them closed workflows;
3. resident memory per idle workflow, open and recently closed;
4. kill -9 of one of two instances under a steady probe flow, and a third instance joining;
5. restore time and memory with 100,000 pending timers (sleeping workflows);
6. firing lag (fire time minus due time, p50 and p99) with 1,000 timers due per second.

Run on the local stack (``bin/bench state``, or ``python -m bench.state --help``). Nothing
here asserts a time: the figures are for docs/performance.md, read with the machine's load
in mind.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

from confluent_kafka.admin import ConfigResource, ResourceType

from examples.order_saga.harness import ROOT
from orchestrator.settings import OrchestratorSettings

from .failover import JoinRun, KillRun, failover
from .history import RecordFactory, Shape, WriteStats, write_history
from .orchestrators import RestoreReport
from .runs import Bench, StartRun, TopicSet, measure_start, start_and_restarts
from .timers import FireWatcher, percentiles, sleepers

KILL_TARGET_S = 5.0
IDLE_TARGET_KIB = 2.0
LAG_TARGET_MS = 50.0


# --- printing --------------------------------------------------------------------------


def spread(values: list[float], unit: str, digits: int = 2) -> str:
    """``median unit (min-max)``, or the single value."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f} {unit}"
    return f"{med:.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def against(value: float, target: float, unit: str) -> str:
    """The target and the ratio of ``value`` to it."""
    verdict = "met" if value <= target else "over"
    return f"target <= {target:g} {unit}: {value / target:.2f}x the target ({verdict})"


def restore_table(
    first: StartRun, again: list[StartRun], empty_first: StartRun, empty_again: list[StartRun]
) -> list[str]:
    """Ready times against the empty history, the logged restore and memory, as a table."""
    columns = ([first], again)
    empties = ([empty_first], empty_again)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cell: Callable[[list[StartRun], list[StartRun]], str]) -> None:
        rows.append(
            (label, [cell(runs, empty) for runs, empty in zip(columns, empties, strict=True)])
        )

    def ready(runs: list[StartRun], empty: list[StartRun]) -> str:
        return spread([r.ready_s for r in runs], "s")

    def difference(runs: list[StartRun], empty: list[StartRun]) -> str:
        ready = statistics.median(r.ready_s for r in runs)
        return f"{ready - statistics.median(r.ready_s for r in empty):.2f} s"

    def logged(runs: list[StartRun], figure: Callable[[RestoreReport], float], unit: str) -> str:
        values = [figure(r.restore) for r in runs if r.restore is not None]
        return spread(values, unit) if values else "no restore line"

    def read(runs: list[StartRun], empty: list[StartRun]) -> str:
        return ", ".join(
            f"{r.restore.records:,}/{r.history_records:,}" if r.restore else "?" for r in runs
        )

    def workflows(runs: list[StartRun], empty: list[StartRun]) -> str:
        last = runs[-1].restore
        if last is None:
            return "?"
        if last.open is None or last.closed is None:
            return f"{last.workflows:,}"
        return f"{last.workflows:,} = {last.open:,} + {last.closed:,}"

    row("ready on every partition", ready)
    row("  same, empty history", lambda runs, empty: ready(empty, runs))
    row("  difference of the medians", difference)
    row("restore time, from its log", lambda runs, _: logged(runs, lambda r: r.seconds, "s"))
    row(
        "restore rate, from its log",
        lambda runs, _: logged(
            runs, lambda r: r.records / r.seconds / 1000 if r.seconds else 0.0, "k records/s"
        ),
    )
    row("records read / on history", read)
    row("workflows = open + closed (last)", workflows)
    row(
        "resident after restore", lambda runs, _: spread([r.rss_kib / 1024 for r in runs], "MiB", 0)
    )
    width = max(len(cells[0]) for _, cells in rows) + 3
    lines = [f"  {'':<34}{'first start':<{width}}restarts of the same instance"]
    lines += [f"  {label:<34}{cells[0]:<{width}}{cells[1]}" for label, cells in rows]
    reports = [r for r in [first, *again] if r.restore is not None]
    if any(r.restore is not None and r.restore.records > r.history_records for r in reports):
        lines.append("  CHECK: a restore read more records than the history topic held")
    styles = {r.restore.style for r in reports if r.restore is not None}
    batches = [r.restore.batches for r in reports if r.restore is not None]
    lines.append(
        f"  (log lines: {', '.join(sorted(styles)) or 'none'}; restore batches per start: "
        f"{', '.join(map(str, batches))})"
    )
    return lines


def memory_line(label: str, runs: list[StartRun], empty: list[StartRun], count: int) -> str:
    """RSS, per-workflow figure against the target."""
    base = statistics.median(r.rss_kib for r in empty)
    rss = [r.rss_kib / 1024 for r in runs]
    per = [(r.rss_kib - base) / count for r in runs]
    return (
        f"  {label:<34} {spread(rss, 'MiB', 1):<26} {spread(per, 'KiB/workflow'):<30} "
        f"{against(statistics.median(per), IDLE_TARGET_KIB, 'KiB')}"
    )


def written(stats: WriteStats) -> str:
    """One line about a bulk write."""
    return (
        f"{stats.records:,} records, {stats.bytes / 1e6:.1f} MB, written in {stats.seconds:.1f} s "
        f"({stats.records / stats.seconds / 1000:.0f}k records/s)"
    )


# --- main ------------------------------------------------------------------------------


def _git_state() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _session_timeout(bench: Bench, configured: int) -> str:
    """The session timeout the orchestrators use, and where it comes from."""
    if configured:
        return f"{configured} ms (set)"
    default = OrchestratorSettings.model_fields["session_timeout_ms"].default
    if default:
        return f"{default} ms (runtime default)"
    # The setting's documented meaning of 0: the lowest the broker allows.
    broker = sorted(bench.admin.list_topics(timeout=10).brokers)[0]
    resource = ConfigResource(ResourceType.BROKER, str(broker))
    config = bench.admin.describe_configs([resource], request_timeout=10)[resource].result(10)
    return f"{config['group.min.session.timeout.ms'].value} ms (the broker's minimum, by default)"


def _transaction_timeout(configured: int) -> str:
    if configured:
        return f"{configured} ms (set)"
    default = OrchestratorSettings.model_fields["transaction_timeout_ms"].default
    return f"{default} ms (runtime default)"


class Sections:
    """The benchmark's sections; each runs on fresh topics and prints its figures."""

    def __init__(self, bench: Bench, args: argparse.Namespace) -> None:
        self.bench = bench
        self.args = args
        self.n: int = args.workflows
        self.empty: tuple[StartRun, list[StartRun]] | None = None
        self.opened: tuple[StartRun, list[StartRun]] | None = None

    def _factory(self) -> RecordFactory:
        # Started ten minutes ago: the closed ones are recently closed, far inside any
        # retention, so nothing is due for tombstoning at restore.
        return RecordFactory(self.bench.codec, int(time.time() * 1000) - 600_000)

    def _empties(self) -> tuple[StartRun, list[StartRun]]:
        assert self.empty is not None, "the empty history runs first"
        return self.empty

    def empty_history(self, topics: TopicSet) -> None:
        """Starts on an empty history: the baseline subtracted from every restore."""
        self.empty = start_and_restarts(self.bench, topics, "bench-a")

    def restore(self, topics: TopicSet) -> None:
        """Section 1: restore of open workflows."""
        factory = self._factory()
        stats = topics.write(factory, self.n, lambda i: Shape.OPEN)
        print(
            f"\n1. Restore of {self.n:,} open order sagas (RUNNING, waiting on payment.charge, "
            f"{factory.size(Shape.OPEN)} B each): {written(stats)}",
            flush=True,
        )
        self.opened = start_and_restarts(self.bench, topics, "bench-a")
        print("\n".join(restore_table(*self.opened, *self._empties())))
        print("      [issue 10, old code: a restart restored 100k in 3.9 s (28k records/s)]")

    def million(self, topics: TopicSet) -> None:
        """Section 2: restore of a history holding a million records, most of them closed."""
        total: int = self.args.million
        open_count = min(self.n, total)
        factory = self._factory()

        def shape(i: int) -> Shape:
            if i < open_count:
                return Shape.OPEN
            return Shape.COMPENSATED if i % 10 == 9 else Shape.COMPLETED

        closed = total - open_count
        compensated = sum(1 for i in range(open_count, total) if i % 10 == 9)
        print(
            f"\n2. Restore with {total:,} history records, one per workflow: {open_count:,} open "
            f"+ {closed:,} closed ({closed - compensated:,} COMPLETED "
            f"{factory.size(Shape.COMPLETED)} B, {compensated:,} COMPENSATED "
            f"{factory.size(Shape.COMPENSATED)} B, closed_at_ms ~10 min ago); all in the "
            "uncompacted active segment",
            flush=True,
        )
        stats = topics.write(factory, total, shape)
        print(f"  {written(stats)}", flush=True)
        first, again = start_and_restarts(self.bench, topics, "bench-a")
        print("\n".join(restore_table(first, again, *self._empties())))

    def memory(self, topics: TopicSet) -> None:
        """Section 3: resident memory per idle open and recently closed workflow."""
        assert self.opened is not None, "section 1 runs first"
        n = self.n
        factory = self._factory()
        stats = topics.write(
            factory, n, lambda i: Shape.COMPENSATED if i % 10 == 9 else Shape.COMPLETED
        )
        first, again = start_and_restarts(self.bench, topics, "bench-a")
        empty = self._empties()[1]
        print(
            "\n3. Resident memory per idle workflow: VmRSS after restore and the probes, once 3 "
            "readings 0.5 s apart agree within 256 KiB, minus the empty history's; restarts"
        )
        print(f"  {'empty history':<34} {spread([r.rss_kib / 1024 for r in empty], 'MiB', 1)}")
        print(memory_line(f"{n:,} open workflows", self.opened[1], empty, n))
        print("      [issue 10, old code: 1.5 KiB per idle open workflow]")
        print(memory_line(f"{n:,} recently closed workflows", again, empty, n))
        print("      [issue 10, old code: 3.6 KiB once completed]")
        print(
            f"  restore of the {n:,} closed workflows (90% COMPLETED, 10% COMPENSATED; "
            f"{written(stats)}):"
        )
        print("\n".join(restore_table(first, again, *self._empties())))

    def failover(self, topics: TopicSet) -> None:
        """Section 4: kill -9 and a third instance joining."""
        stats = topics.write(self._factory(), self.n, lambda i: Shape.OPEN)
        print(
            f"\n4. Failover with {self.n:,} open workflows: instances bench-a and bench-b, a "
            f"probe start to every partition each 100 ms; session timeout "
            f"{_session_timeout(self.bench, self.args.session_timeout_ms)}, transaction "
            f"timeout {_transaction_timeout(self.args.transaction_timeout_ms)}; "
            f"{written(stats)}",
            flush=True,
        )
        kills, joins = failover(self.bench, topics)
        print("\n".join(failover_lines(kills, joins)))

    def timers(self, topics: TopicSet) -> None:
        """Section 5: restore and memory with pending timers."""
        n = self.n
        now = int(time.time() * 1000)
        # Due in a day: nothing fires while the section runs.
        fire_times = (now + 86_400_000 + i for i in range(n))
        stats = write_history(
            self.bench.bootstrap,
            topics.topics.history,
            self.bench.partitions,
            sleepers(self.bench.codec, f"{topics.name}", fire_times, now - 600_000),
        )
        topics.written += stats.records
        print(
            f"\n5. Restore of {n:,} sleeping workflows (one pending durable timer each, due in a "
            f"day; {stats.bytes // max(1, stats.records)} B per record): {written(stats)}",
            flush=True,
        )
        first, again = start_and_restarts(self.bench, topics, "bench-a")
        print("\n".join(restore_table(first, again, *self._empties())))
        print(memory_line(f"{n:,} pending timers", again, self._empties()[1], n))

    def lag(self, topics: TopicSet) -> None:
        """Section 6: firing lag at a steady rate of due timers."""
        rate: int = self.args.timer_rate
        seconds: int = self.args.timer_seconds
        count = rate * seconds
        lead_ms = 20_000  # writing, starting and restoring come first
        first_due = int(time.time() * 1000) + lead_ms
        fire_times = (first_due + i * 1000 // rate for i in range(count))
        stats = write_history(
            self.bench.bootstrap,
            topics.topics.history,
            self.bench.partitions,
            sleepers(self.bench.codec, topics.name, fire_times, first_due - lead_ms),
        )
        topics.written += stats.records
        print(
            f"\n6. Firing lag: {count:,} sleeping workflows whose timers fall due at {rate:,}/s "
            f"for {seconds} s, each firing a transition that closes its workflow; "
            f"{written(stats)}",
            flush=True,
        )
        watcher = FireWatcher(self.bench.bootstrap, topics.topics.history, self.bench.partitions)
        process = self.bench.process(topics, "bench-a")
        try:
            started = measure_start(self.bench, topics, process)
            spare_s = (first_due - time.time() * 1000) / 1000
            if spare_s < 0:
                self.bench.notes.append(
                    f"section 6: the orchestrator was ready {-spare_s:.1f} s after the first "
                    "timer was due; its lag includes the start"
                )
            end = time.monotonic() + lead_ms / 1000 + seconds + self.bench.deadline_s
            while len(watcher.done) < count and time.monotonic() < end:
                watcher.poll(0.2)
        finally:
            self.bench.stop(process)
            watcher.close()
        if len(watcher.done) < count:
            raise RuntimeError(f"only {len(watcher.done):,} of {count:,} timers fired")
        print(
            f"  ready {started.ready_s:.2f} s after the start, {spare_s:.1f} s before the first "
            "timer was due"
        )
        for label, lags in (
            ("TimerFired.at_ms - due", watcher.fired_lag_ms),
            ("committed record read - due", watcher.seen_lag_ms),
        ):
            p50, p99, top = percentiles(lags)
            print(
                f"  {label:<30} p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   max {top:7.1f} ms   "
                f"{against(p99, LAG_TARGET_MS, 'ms (p99)')}"
            )


def failover_lines(kills: list[KillRun], joins: list[JoinRun]) -> list[str]:
    """Section 4's figures."""
    recovery = [k.recovery_s for k in kills]
    per = [s for k in kills for s in k.per_partition_s]
    lines = [
        f"  kill -9 to processing again on a survivor  {spread(recovery, 's'):<26} "
        f"{against(statistics.median(recovery), KILL_TARGET_S, 's')}",
        f"      (per kill: the last of the victim's {kills[0].dead} partitions to close a probe "
        f"after the kill; over all partitions and kills {min(per):.2f}-{max(per):.2f} s)",
    ]
    restores = [k.restore_s for k in kills if k.restore_s is not None]
    if restores:
        records = [k.restore_records or 0 for k in kills]
        lines.append(
            f"      of which the survivor's restore, from its log: {spread(restores, 's')}, "
            f"{min(records):,}-{max(records):,} records"
        )
    lines += [
        "      [issue 10, old code: 11.8 s, 8.8 s of it the session timeout]",
        f"  survivor's own {kills[0].live} partitions, largest gap  "
        f"{spread([k.survivor_gap_s for k in kills], 's')}   (they should not stall)",
        f"  third instance joining two running ones: largest gap on the {joins[0].kept} "
        f"partitions they keep  {spread([j.kept_gap_s for j in joins], 's')}",
        f"      on the {joins[0].moved} partitions that moved "
        f"{spread([j.moved_gap_s for j in joins], 's')}; "
        "[issue 10, old code: both running ones stalled 11-12 s]",
    ]
    return lines


SECTIONS = ("restore", "million", "memory", "failover", "timers", "lag")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=(
            "comma-separated sections: restore (1), million (2), memory (3), failover (4), "
            "timers (5), lag (6)"
        ),
    )
    parser.add_argument("--timer-rate", type=int, default=1_000, help="timers due per second")
    parser.add_argument("--timer-seconds", type=int, default=20, help="seconds of due timers")
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--workflows", type=int, default=100_000, help="open (and closed) count")
    parser.add_argument("--million", type=int, default=1_000_000, help="records of section 2")
    parser.add_argument("--repeat", type=int, default=3, help="restarts, kills and joins")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds per wait")
    parser.add_argument("--session-timeout-ms", type=int, default=0, help="0: runtime default")
    parser.add_argument("--transaction-timeout-ms", type=int, default=0, help="0: default")
    parser.add_argument("--keep-topics", action="store_true", help="do not delete topics")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the sections asked for and print their figures; 1 if any failed."""
    parser = _parser()
    args = parser.parse_args(argv)
    wanted = {s for s in args.only.split(",") if s}
    if wanted - set(SECTIONS):
        parser.error(f"unknown sections {sorted(wanted - set(SECTIONS))}")
    settings: dict[str, str] = {}
    if args.session_timeout_ms:
        settings["session_timeout_ms"] = str(args.session_timeout_ms)
    if args.transaction_timeout_ms:
        settings["transaction_timeout_ms"] = str(args.transaction_timeout_ms)
    bench = Bench(
        bootstrap=os.environ["SAGALINE_KAFKA_BOOTSTRAP"],
        dsn=os.environ.get("SAGALINE_POSTGRES_DSN", ""),
        partitions=args.partitions,
        repeat=args.repeat,
        deadline_s=args.deadline,
        keep_topics=args.keep_topics,
        settings=settings,
    )
    # SIGTERM unwinds like Ctrl-C, so every orchestrator started is stopped in a finally.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sections = Sections(bench, args)
    # (topic set, what it runs, the topic sets it needs); memory needs section 1's runs.
    plan: list[tuple[str, Callable[[TopicSet], None], set[str]]] = []
    if wanted & {"restore", "million", "memory", "timers"}:
        plan.append(("empty", sections.empty_history, set()))
    if wanted & {"restore", "memory"}:
        plan.append(("open", sections.restore, {"empty"}))
    if "million" in wanted:
        plan.append(("million", sections.million, {"empty"}))
    if "memory" in wanted:
        plan.append(("closed", sections.memory, {"empty", "open"}))
    if "failover" in wanted:
        plan.append(("failover", sections.failover, set()))
    if "timers" in wanted:
        plan.append(("timers", sections.timers, {"empty"}))
    if "lag" in wanted:
        plan.append(("lag", sections.lag, set()))
    began = time.monotonic()
    print(
        f"orchestrator state benchmark: one orchestrator process per instance, participants "
        f"stopped, {args.partitions} partitions, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.2f}, code {_git_state()}; restarts, kills and joins: median "
        f"(min-max) of {args.repeat}; logs in {bench.log_dir}",
        flush=True,
    )
    done: set[str] = set()
    failed = 0
    for name, run, needs in plan:
        if needs - done:
            print(f"  skipped {name}: needs {sorted(needs - done)}, which failed", flush=True)
            failed += 1
            continue
        topics: TopicSet | None = None
        try:
            topics = TopicSet(bench, name)
            run(topics)
            done.add(name)
        except Exception as exc:
            failed += 1
            print(f"  FAILED ({name}): {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(file=sys.stderr)
        finally:
            if topics is not None:
                topics.close()
    for note in bench.notes:
        print(f"  note: {note}")
    print(
        f"\nbench.state took {time.monotonic() - began:.0f} s; load at the end "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
