"""Benchmark: the raw floor and sagaline side by side, in one session (issue 16).

The variants run one after the other on the same broker and PostgreSQL, each on fresh
topics: ``floor`` (bench/floor.py: the order saga's shape without sagaline), ``remote``
(the order saga, ``order.process``, through one orchestrator and three participant
processes), ``local`` (``order.local``: the same saga with its steps as local activities
in the one orchestrator process) and ``local2`` (``order.local`` on two orchestrator
processes sharing the partitions, as a deployment scales out). Each runs a warm-up,
``--repeat`` bursts, then ``--repeat`` runs at ``--rate`` starts/s and at half of its own
peak, measuring CPU per process from /proc. sagaline's failover and memory per idle workflow follow
(bench/failover.py, bench/state.py). Every saga's outcome is checked: one that does not
finish or ends wrongly stops the command with a non-zero exit, before any figure is
reported. The medians, their ratios to the floor's and the machine go to the generated
section of docs/performance.md. Run on the local stack:

    bin/bench compare            # or: python3 -m bench.compare --help

Everything a run creates (topics, consumer groups, rows) is deleted at its end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import confluent_kafka
import psycopg
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from examples.order_saga.harness import (
    ORDER_TYPE,
    ROOT,
    SERVICES,
    HistoryWatcher,
    SagalineProcess,
    audit_effects,
    base_env,
    figures,
    make_orders,
    publish,
    start_pipeline,
)
from orchestrator.admin import ensure_topics
from orchestrator.client import WorkflowClient
from orchestrator.protocol.topics import Topics
from orchestrator.settings import KafkaSettings

from . import floor
from .comparison import (
    SAGALINE_VARIANTS,
    VARIANTS,
    Environment,
    Report,
    StateFigures,
    VariantFigures,
    backend_ticks,
    cpu_ms_per_saga,
    floor_variant,
    half_of_peak,
    kafka_version_from_jars,
    outcome_problems,
    parse_variants,
    render_section,
    replace_section,
)
from .failover import Failover
from .history import RecordFactory, Shape
from .orchestrators import BenchError
from .runs import Bench, TopicSet, start_and_restarts
from .saga_pipeline import delete_run_topics

LOCAL_TYPE: Final = "order.local"
WORKFLOW_TYPES: Final = {"remote": ORDER_TYPE, "local": LOCAL_TYPE, "local2": LOCAL_TYPE}
# Orchestrator processes of each sagaline variant (the partitions are shared among them).
ORCHESTRATORS: Final = {"remote": 1, "local": 1, "local2": 2}
DOC: Final = ROOT / "docs" / "performance.md"
WARMUP: Final = 20
WARMUP_DEADLINE_S: Final = 120.0
# The participants' tables and the column naming the order: rows of a run's orders go.
EFFECT_TABLES: Final = (
    ("inventory_reservations", "order_id"),
    ("payments", "order_id"),
    ("shipments", "order_id"),
    ("sagaline_activity_results", "activity_id"),  # '<workflow id>/<run id>/<seq>/<attempt>'
)


def _fail(message: str) -> SystemExit:
    # SystemExit with a text exits 1 and prints it: the one way this command fails.
    return SystemExit(f"bench.compare: {message}")


# --- CPU ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuReading:
    """Clock ticks so far of each measured process, and of each PostgreSQL backend."""

    roles: dict[str, int]
    backends: dict[int, int]


@dataclass(frozen=True)
class CpuMeter:
    """Reads the CPU of a variant's processes, the broker, this client and the backends of
    the processes' PostgreSQL connections (found by their ``application_name`` prefix)."""

    pids: Mapping[str, Sequence[int]]  # by role; two orchestrators count as one role
    dsn: str
    application_prefix: str
    kafka_pid: int | None

    def read(self) -> CpuReading:
        """Ticks of every measured process now."""
        roles = {role: sum(floor.cpu_ticks(p) for p in pids) for role, pids in self.pids.items()}
        roles["client"] = floor.cpu_ticks(os.getpid())
        if self.kafka_pid is not None:
            roles["kafka"] = floor.cpu_ticks(self.kafka_pid)
        return CpuReading(roles, {pid: floor.cpu_ticks(pid) for pid in self.backends()})

    def backends(self) -> list[int]:
        """The PostgreSQL backend pids of the measured processes' connections."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE starts_with(application_name, %s)",
                (self.application_prefix,),
            ).fetchall()
        return [int(row[0]) for row in rows]

    def per_saga(self, before: CpuReading, after: CpuReading, sagas: int) -> dict[str, float]:
        """CPU ms per saga of each role between two readings."""
        cpu = cpu_ms_per_saga(before.roles, after.roles, sagas, floor.CLK_TCK)
        ticks = backend_ticks(before.backends, after.backends)
        cpu["postgres"] = ticks * 1000 / floor.CLK_TCK / sagas
        return cpu


def _role(process: SagalineProcess) -> str:
    # "orchestrator-<instance>" and "participant-<service>", as harness.py names them.
    kind, _, rest = process.name.partition("-")
    return "orchestrator" if kind == "orchestrator" else rest


# --- a sagaline variant ------------------------------------------------------------------


@dataclass
class Pipeline:
    """One sagaline variant's running processes and the clients that load and watch them."""

    variant: str
    tag: str  # every order id of the variant starts with order-<tag>-
    dsn: str
    deadline_s: float
    processes: list[SagalineProcess]
    client: WorkflowClient
    watcher: HistoryWatcher
    meter: CpuMeter
    log_dir: Path

    def phase(
        self, count: int, rate: float, label: str, deadline_s: float = 0.0
    ) -> floor.PhaseFigures:
        """Start ``count`` orders (``rate`` per second, or all at once), wait for every saga,
        check each outcome (and, with participants, their rows).

        Raises:
            SystemExit: a saga did not finish in time, ended wrongly, or a process exited.
        """
        run = f"{self.tag}-{label}-{uuid.uuid4().hex[:6]}"
        orders = make_orders(count, declined_every=10, run_id=run)
        before = self.meter.read()
        sent = publish(
            self.client, orders, rate, self.watcher, workflow_type=WORKFLOW_TYPES[self.variant]
        )
        deadline_s = deadline_s or self.deadline_s
        try:
            done = self.watcher.wait_terminal(list(sent), deadline_s, alive=self.processes)
        except AssertionError as exc:  # a process exited: the harness says which, with its log
            raise _fail(f"{self.variant} {label}: {exc}") from exc
        after = self.meter.read()
        problems = outcome_problems(orders, {wid: r.status for wid, r in done.items()})
        if not problems and self.variant == "remote":
            problems = audit_effects(self.dsn, orders)
        if problems:
            shown = "\n  ".join(problems[:20])
            raise _fail(
                f"{self.variant} {label}: {len(problems)} problems with {count} sagas "
                f"({len(done)} finished within the {deadline_s:g} s deadline); first:\n"
                f"  {shown}\n"
                f"logs in {self.log_dir}"
            )
        run_figures = figures(done, sent, self.watcher.produced_ms)
        return floor.PhaseFigures(
            finished=run_figures.finished,
            per_second=run_figures.per_second,
            p50_ms=run_figures.p50_ms,
            p95_ms=run_figures.p95_ms,
            p99_ms=run_figures.p99_ms,
            cpu_ms=self.meter.per_saga(before, after, count),
        )


def run_sagaline(variant: str, args: argparse.Namespace, run_id: str) -> VariantFigures:
    """Set a variant up on its own topics, run its phases, print each, remove everything."""
    bootstrap = os.environ["SAGALINE_KAFKA_BOOTSTRAP"]
    dsn = os.environ["SAGALINE_POSTGRES_DSN"]
    tag = f"cmp{run_id}{VARIANTS.index(variant)}"
    topics = Topics(f"compare.{run_id}.{variant}")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    ensure_topics(admin, topics, partitions=args.partitions, participants=SERVICES)
    log_dir = ROOT / ".stack" / "bench" / f"compare-{run_id}" / variant
    processes: list[SagalineProcess] = []
    watcher: HistoryWatcher | None = None
    client: WorkflowClient | None = None
    try:
        processes, ports = start_pipeline(
            base_env(bootstrap, dsn, topics.prefix),
            log_dir,
            instance=f"compare-{variant}",
            services=tuple(SERVICES) if variant == "remote" else (),
            application_names=f"{tag}-",
            orchestrators=ORCHESTRATORS[variant],
        )
        watcher = HistoryWatcher(
            bootstrap, topics.history, terminal_only=True, group_id=f"{topics.prefix}.watcher"
        )
        client = WorkflowClient(
            KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=topics.prefix)
        )
        pids: dict[str, list[int]] = {}
        for process in processes:
            if process.proc is not None:
                pids.setdefault(_role(process), []).append(process.proc.pid)
        meter = CpuMeter(pids, dsn, f"{tag}-", floor.broker_pid())
        pipeline = Pipeline(
            variant, tag, dsn, args.deadline, processes, client, watcher, meter, log_dir
        )
        pipeline.phase(WARMUP, 0, "warmup", WARMUP_DEADLINE_S)
        if ORCHESTRATORS[variant] > 1:
            _wait_shared(ports, args.partitions, WARMUP_DEADLINE_S)
        if variant == "remote" and not meter.backends():
            raise _fail(
                f"remote: no PostgreSQL backend has application_name {tag}-*: PGAPPNAME did "
                "not reach the participants' connections, so their PostgreSQL CPU is unknown"
            )
        return _phases(pipeline, args)
    finally:
        if watcher is not None:
            watcher.close()
        if client is not None:
            client.close()
        for process in processes:
            process.stop()
        delete_run_topics(admin, topics.prefix)
        delete_groups(admin, f"{topics.prefix}.")
        delete_rows(dsn, f"order-{tag}-")


def _owned(port: int) -> float | None:
    """An orchestrator's ``sagaline_partitions_owned``, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "sagaline_partitions_owned":
            return sum(sample.value for sample in family.samples)
    return None


def _wait_shared(ports: Mapping[str, int], partitions: int, deadline_s: float) -> None:
    """Wait until every orchestrator owns some of the ``partitions`` and together all, so no
    measured run meets the rebalance that brings the later ones in."""
    orchestrators = [port for name, port in ports.items() if name.startswith("orchestrator")]
    until = time.monotonic() + deadline_s
    owned: list[float | None] = []
    while time.monotonic() < until:
        owned = [_owned(port) for port in orchestrators]
        if all(o for o in owned) and sum(o or 0 for o in owned) == partitions:
            return
        time.sleep(0.2)
    raise _fail(
        f"the {len(orchestrators)} orchestrators did not share the {partitions} partitions "
        f"within {deadline_s:g} s (each owns {owned})"
    )


def _phases(pipeline: Pipeline, args: argparse.Namespace) -> VariantFigures:
    print(
        f"sagaline, {pipeline.variant} steps ({WORKFLOW_TYPES[pipeline.variant]}): "
        f"{len(pipeline.processes)} process(es), {args.partitions} partitions; median (min-max) "
        f"of {args.repeat} runs",
        flush=True,
    )
    label = f"burst of {args.burst}"
    bursts = tuple(pipeline.phase(args.burst, 0, "burst") for _ in range(args.repeat))
    print(floor.line(label, bursts), floor.cpu_line(bursts), sep="\n", flush=True)
    runs: list[tuple[floor.PhaseFigures, ...]] = []
    half = half_of_peak(bursts)
    for rate in (args.rate, half):
        count = max(1, int(rate * args.seconds))
        runs.append(
            tuple(pipeline.phase(count, rate, f"rate{rate:.0f}") for _ in range(args.repeat))
        )
        print(floor.line(f"{rate:.0f} starts/s", runs[-1]), floor.cpu_line(runs[-1]), sep="\n")
    return VariantFigures(burst=bursts, low=runs[0], half_rate=half, half=runs[1])


# --- the floor ---------------------------------------------------------------------------


def run_floor(args: argparse.Namespace) -> VariantFigures:
    """bench.floor with this command's sizes, at the fixed rate and at half its peak."""
    results = floor.run(
        argparse.Namespace(
            burst=args.burst,
            rates=f"{args.rate:g},half",
            seconds=args.seconds,
            repeat=args.repeat,
            partitions=args.partitions,
        )
    )
    try:
        return floor_variant(results, args.burst, args.rate)
    except ValueError as exc:
        raise _fail(f"floor: {exc}") from exc


# --- sagaline's failover and memory ------------------------------------------------------


@contextlib.contextmanager
def _topic_set(bench: Bench, name: str) -> Iterator[TopicSet]:
    topics = TopicSet(bench, name)
    try:
        yield topics
    finally:
        topics.close()


def _factory(bench: Bench) -> RecordFactory:
    # Started ten minutes ago, as bench/state.py writes them: nothing is due for retention.
    return RecordFactory(bench.codec, int(time.time() * 1000) - 600_000)


def _memory(bench: Bench, count: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """KiB per idle open and per recently closed workflow, per restart (bench/state.py's
    section 3 at ``count`` workflows)."""
    with _topic_set(bench, "empty") as topics:
        _, empty = start_and_restarts(bench, topics, "bench-a")
    base = statistics.median(r.rss_kib for r in empty)
    per: list[tuple[float, ...]] = []
    shapes = (
        lambda i: Shape.OPEN,
        lambda i: Shape.COMPENSATED if i % 10 == 9 else Shape.COMPLETED,
    )
    for name, shape in zip(("open", "closed"), shapes, strict=True):
        with _topic_set(bench, name) as topics:
            topics.write(_factory(bench), count, shape)
            _, again = start_and_restarts(bench, topics, "bench-a")
        per.append(tuple((r.rss_kib - base) / count for r in again))
    return per[0], per[1]


def _failover(bench: Bench, count: int) -> tuple[float, ...]:
    """Seconds from kill -9 of one of two orchestrators until its partitions flow again, per
    kill (bench/failover.py's kills, without its joins)."""
    recoveries: list[float] = []
    with _topic_set(bench, "failover") as topics:
        topics.write(_factory(bench), count, lambda i: Shape.OPEN)
        scenario = Failover(bench, topics)
        try:
            for process in scenario.procs.values():
                process.start()
            owners, _ = scenario.settle(scenario.procs, what="two instances")
            for kill in range(bench.repeat):
                recoveries.append(scenario.kill(owners, "bench-b", "bench-a").recovery_s)
                if kill < bench.repeat - 1:
                    scenario.procs["bench-b"].start()
                    owners, _ = scenario.settle(scenario.procs, what="bench-b restarted")
        finally:
            for process in scenario.everything():
                process.stop()
    return tuple(recoveries)


def run_state(args: argparse.Namespace, run_id: str) -> StateFigures:
    """sagaline's failover and memory per idle workflow, orchestrators only."""
    bench = Bench(
        bootstrap=os.environ["SAGALINE_KAFKA_BOOTSTRAP"],
        dsn=os.environ["SAGALINE_POSTGRES_DSN"],
        partitions=args.state_partitions,
        repeat=args.repeat,
        deadline_s=args.deadline,
        keep_topics=False,
        settings={},
        run_id=f"compare{run_id}",
    )
    print(
        f"sagaline failover and memory: orchestrators only, {args.state_partitions} "
        f"partitions; logs in {bench.log_dir}",
        flush=True,
    )
    try:
        open_kib, closed_kib = _memory(bench, args.memory_workflows)
        print(
            f"  memory per idle open workflow {_kib(open_kib)}, "
            f"per recently closed workflow {_kib(closed_kib)} ({args.memory_workflows:,})",
            flush=True,
        )
        failover = _failover(bench, args.failover_workflows)
        print(f"  kill -9 until flowing again: {', '.join(f'{s:.2f} s' for s in failover)}")
        return StateFigures(
            partitions=args.state_partitions,
            failover_workflows=args.failover_workflows,
            failover_s=failover,
            memory_workflows=args.memory_workflows,
            open_kib=open_kib,
            closed_kib=closed_kib,
        )
    except (BenchError, RuntimeError, TimeoutError) as exc:
        raise _fail(f"sagaline failover and memory: {type(exc).__name__}: {exc}") from exc
    finally:
        delete_groups(bench.admin, f"bench-state.{bench.run_id}.")
        for note in bench.notes:
            print(f"  note: {note}", flush=True)


def _kib(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " KiB"


# --- cleanup -----------------------------------------------------------------------------


def delete_groups(admin: AdminClient, prefix: str, deadline_s: float = 60.0) -> None:
    """Delete the consumer groups whose ids start with ``prefix``; failures are reported.

    sagaline's consumers are static members: closing leaves them in the group until their
    session times out, and a group with members cannot be deleted, so a non-empty group is
    tried again until ``deadline_s``.
    """
    end = time.monotonic() + deadline_s
    try:
        listed = admin.list_consumer_groups(request_timeout=30).result(30)
        left = [g.group_id for g in listed.valid if g.group_id.startswith(prefix)]
        while left:
            busy: list[str] = []
            for group, future in admin.delete_consumer_groups(left, request_timeout=30).items():
                try:
                    future.result(30)
                except KafkaException as exc:
                    code = exc.args[0].code() if exc.args else None
                    if code == KafkaError.NON_EMPTY_GROUP and time.monotonic() < end:
                        busy.append(group)
                    elif code != KafkaError.GROUP_ID_NOT_FOUND:
                        print(f"deleting group {group} failed: {exc}", file=sys.stderr)
            left = busy
            if left:
                time.sleep(1.0)  # pacing retries while the members' sessions time out
    except Exception as exc:  # cleanup only: the figures stand
        print(f"deleting the groups {prefix}* failed: {exc}", file=sys.stderr)


def delete_rows(dsn: str, order_prefix: str) -> None:
    """Delete the participants' rows of a run's orders (ids starting ``order_prefix``)."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table, column in EFFECT_TABLES:
                if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,):
                    continue  # no participant of this kind ever ran against this database
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE starts_with({}, %s)").format(
                        sql.Identifier(table), sql.Identifier(column)
                    ),
                    (order_prefix,),
                )
    except psycopg.Error as exc:
        print(f"deleting the rows of {order_prefix}* failed: {exc}", file=sys.stderr)


# --- where and with what -----------------------------------------------------------------


def _git(*args: str) -> str:
    # --no-optional-locks: reading the tree's state must not rewrite its index.
    return subprocess.run(
        ["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def _class_path_jars(pid: int | None) -> list[str]:
    """File names on the broker's class path (the local stack's jar directory otherwise)."""
    entries = [str(ROOT / ".stack" / "kafka-lib" / "*")]
    if pid is not None:
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            for flag, value in itertools.pairwise(argv):
                if flag in ("-cp", "-classpath", "--class-path"):
                    entries = value.split(":")
    names: list[str] = []
    for entry in entries:
        if entry.endswith("*"):
            names += [jar.name for jar in Path(entry[:-1]).glob("*.jar")]
        else:
            names.append(Path(entry).name)
    return names


def _memory_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _version_text(value: object) -> str:
    # Typed (text, number), but confluent-kafka 2.16's version() returns the text alone.
    return str(value[0]) if isinstance(value, tuple) else str(value)


def gather_environment(argv: Sequence[str], dsn: str) -> Environment:
    """The machine, its load now, the versions of everything measured, the command line."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    try:
        commit = _git("rev-parse", "--short=12", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    load = os.getloadavg()
    return Environment(
        date=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        cores=os.cpu_count() or 0,
        memory_gib=_memory_gib(),
        load=(load[0], load[1], load[2]),
        kafka=kafka_version_from_jars(_class_path_jars(floor.broker_pid())) or "unknown",
        postgres=str(row[0]) if row else "unknown",
        confluent_kafka=_version_text(confluent_kafka.version()),
        librdkafka=_version_text(confluent_kafka.libversion()),
        python=platform.python_version(),
        commit=commit,
        dirty=dirty,
        command=shlex.join(["python3", "-m", "bench.compare", *argv]),
    )


# --- main --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each phase")
    parser.add_argument("--burst", type=int, default=1_000, help="starts published at once")
    parser.add_argument("--rate", type=float, default=20.0, help="the fixed starts per second")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of a rate run")
    parser.add_argument("--partitions", type=int, default=4, help="of each variant's topics")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds per wait")
    parser.add_argument(
        "--state-partitions", type=int, default=12, help="of the failover and memory topics"
    )
    parser.add_argument("--failover-workflows", type=int, default=1_000)
    parser.add_argument("--memory-workflows", type=int, default=20_000)
    parser.add_argument(
        "--no-state", action="store_true", help="skip sagaline's failover and memory figures"
    )
    parser.add_argument(
        "--no-write", action="store_true", help=f"print only; leave {DOC.relative_to(ROOT)}"
    )
    return parser


def _require_local_type() -> None:
    # Checked before anything runs: an unknown type would park every start STUCK, and the
    # run would only say so after its deadline.
    from examples.order_saga.workflows import registry  # noqa: PLC0415 - only for local

    if registry.get(LOCAL_TYPE) is None:
        raise _fail(
            f"the local variant starts {LOCAL_TYPE!r}, which examples.order_saga.workflows "
            "does not register; add it there or leave local out of --variants"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the variants asked for, print their figures and rewrite the doc's section."""
    given = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(given)
    try:
        variants = parse_variants(args.variants)
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeat < 1 or args.burst < 1 or args.rate <= 0 or args.seconds <= 0:
        parser.error("--repeat, --burst, --rate and --seconds must be positive")
    if {"local", "local2"} & set(variants):
        _require_local_type()
    # SIGTERM unwinds like Ctrl-C, so every process started is stopped and every topic
    # deleted in the finally blocks.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    dsn = os.environ["SAGALINE_POSTGRES_DSN"]
    environment = gather_environment(given, dsn)
    run_id = f"{time.strftime('%Y%m%d%H%M%S')}{uuid.uuid4().hex[:4]}"
    began = time.monotonic()
    measured: dict[str, VariantFigures] = {}
    for variant in variants:
        measured[variant] = (
            run_floor(args) if variant == "floor" else run_sagaline(variant, args, run_id)
        )
        print(flush=True)
    state = None
    if not args.no_state and any(v in SAGALINE_VARIANTS for v in variants):
        state = run_state(args, run_id)
    report = Report(
        environment=environment,
        repeat=args.repeat,
        burst=args.burst,
        low_rate=args.rate,
        seconds=args.seconds,
        partitions=args.partitions,
        variants=measured,
        state=state,
        load_end=os.getloadavg(),
    )
    section = render_section(report)
    print(f"\n{section}")
    if not args.no_write:
        try:
            DOC.write_text(replace_section(DOC.read_text(), section))
        except ValueError as exc:
            raise _fail(f"{DOC}: {exc}") from exc
        print(f"{DOC.relative_to(ROOT)}: generated section rewritten")
    print(f"bench.compare took {time.monotonic() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
