"""Benchmark: the raw floor, order sagas on plain confluent-kafka and psycopg, no sagaline.

The same saga shape as the order saga (start, reserve, charge, schedule, done; every tenth
charge declined, then release, compensated) on the same broker and PostgreSQL, written the
way one would without a framework: a coordinator that is one transactional
read-process-write loop with its state in memory (and each change written to a compacted
state topic, as sagaline writes its history record), and three participants that insert one
row per task in autocommit (idempotent by primary key), produce the result and commit their
offsets once it is acknowledged. What sagaline costs is read against this floor.

Each role runs as its own OS process (this module with ``--role``), so CPU is counted per
process from /proc. The driver creates its own topics and table under a fresh prefix and
removes them at the end. Run on the local stack:

    set -a; . .stack/stack.env; set +a
    python3 -m bench.floor --burst 1000 --rates 20,half --seconds 5 --repeat 3

The coordinator does not restore its state after a restart: this measures the steady
path only, which is what the floor is for.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql

from examples.order_saga.harness import ROOT, percentile
from orchestrator.transport import poll_batch

SERVICES: Final = ("inventory", "payment", "shipping")
# Which participant runs each action: the order saga's activity names.
SERVICE_OF: Final = {
    "reserve": "inventory",
    "release": "inventory",
    "charge": "payment",
    "schedule": "shipping",
}
COMPLETED: Final = "completed"
COMPENSATED: Final = "compensated"
# sagaline's orchestrator defaults: a batch is committed once the inbox is drained, when it
# holds this many inputs, or when it has been open this long.
MAX_BATCH: Final = 2_000
COMMIT_INTERVAL_S: Final = 0.1
IDLE_POLL_S: Final = 0.1
PARTICIPANT_BATCH: Final = 500
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


# --- the saga's steps (pure) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SagaState:
    """Where one saga is: the step it waits on (or its end), and whether its card declines."""

    step: str
    declined: bool

    @property
    def terminal(self) -> bool:
        """True once the saga has completed or been compensated."""
        return self.step in (COMPLETED, COMPENSATED)


@dataclass(frozen=True, slots=True)
class Task:
    """An action for a participant to run for one saga."""

    saga_id: str
    action: str
    declined: bool

    @property
    def service(self) -> str:
        """The participant that runs this action."""
        return SERVICE_OF[self.action]

    @property
    def task_id(self) -> str:
        """Unique per saga and action: each action runs at most once per saga."""
        return f"{self.saga_id}:{self.action}"


@dataclass(frozen=True, slots=True)
class Step:
    """What one input does: the new state (None: nothing changes) and what to send."""

    state: SagaState | None = None
    task: Task | None = None
    done: str | None = None


IGNORED: Final = Step()


def transition(saga_id: str, state: SagaState | None, event: Mapping[str, Any]) -> Step:
    """The coordinator's decision for one inbox input ``event`` of saga ``saga_id``.

    ``event`` is ``{"type": "start", "declined": bool}`` or ``{"type": "result", "action":
    ..., "outcome": "ok" | "declined"}``. An input that does not answer the step the saga
    waits on changes nothing: participants deliver at least once, so a result can come
    again after the saga moved on, and a start can be sent twice.
    """
    kind = event.get("type")
    if kind == "start":
        if state is not None:
            return IGNORED
        declined = bool(event.get("declined", False))
        return Step(SagaState("reserve", declined), Task(saga_id, "reserve", declined))
    if kind != "result" or state is None or event.get("action") != state.step:
        return IGNORED
    outcome = event.get("outcome")
    declined = state.declined
    if state.step == "reserve" and outcome == "ok":
        return Step(SagaState("charge", declined), Task(saga_id, "charge", declined))
    if state.step == "charge" and outcome == "ok":
        return Step(SagaState("schedule", declined), Task(saga_id, "schedule", declined))
    if state.step == "charge" and outcome == "declined":
        # The compensation: give the reservation back.
        return Step(SagaState("release", declined), Task(saga_id, "release", declined))
    if state.step == "schedule" and outcome == "ok":
        return Step(SagaState(COMPLETED, declined), done=COMPLETED)
    if state.step == "release" and outcome == "ok":
        return Step(SagaState(COMPENSATED, declined), done=COMPENSATED)
    return IGNORED


def outcome_of(action: str, declined: bool) -> str:
    """What a participant answers: a declining card's charge is refused, all else is done."""
    return "declined" if action == "charge" and declined else "ok"


def effect_kind(action: str, outcome: str) -> str:
    """The ``kind`` of an effect row: the action, marked when it was refused."""
    return action if outcome == "ok" else f"{action}-{outcome}"


def expected_effects(declined: bool) -> list[str]:
    """The effect kinds one saga leaves, sorted."""
    if declined:
        return sorted(["reserve", "charge-declined", "release"])
    return sorted(["reserve", "charge", "schedule"])


# --- names ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """The topics and table of one run, all under its own prefix."""

    prefix: str
    table: str

    @property
    def inbox(self) -> str:
        """Starts and participants' results, for the coordinator."""
        return f"{self.prefix}inbox"

    @property
    def state(self) -> str:
        """Compacted, one record per saga: the coordinator's state."""
        return f"{self.prefix}state"

    @property
    def done(self) -> str:
        """One record per finished saga."""
        return f"{self.prefix}done"

    def tasks(self, service: str) -> str:
        """A participant's tasks."""
        return f"{self.prefix}tasks.{service}"

    def all_topics(self) -> list[str]:
        """Every topic of the run."""
        return [self.inbox, self.state, self.done, *(self.tasks(s) for s in SERVICES)]


def _encode(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# --- child processes --------------------------------------------------------------------

_stop = False


def _on_term(_signum: int, _frame: FrameType | None) -> None:
    global _stop  # noqa: PLW0603 - a signal handler has nowhere else to say it
    _stop = True


def _ready(detail: str = "") -> None:
    # The driver waits for this line: the process is connected and subscribed.
    sys.stdout.write(f"ready {detail}\n")
    sys.stdout.flush()


def _fail_on_error(err: KafkaError | None, _msg: Message) -> None:
    if err is not None:
        # A lost record would leave a saga unfinished: end loudly instead.
        raise KafkaException(err)


def run_coordinator(bootstrap: str, names: Names) -> None:
    """The coordinator: one Kafka transaction per batch of inbox inputs, until SIGTERM."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{names.prefix}coordinator",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    # As sagaline's orchestrator producer, minus its error handling.
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"{names.prefix}coordinator",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 1,
            "retry.backoff.ms": 5,
            "retry.backoff.max.ms": 20,
        }
    )
    producer.init_transactions(30)
    consumer.subscribe([names.inbox])
    _ready()
    states: dict[str, SagaState] = {}
    staged: dict[str, SagaState] = {}
    outputs: list[tuple[str, bytes, bytes]] = []
    inputs = 0
    opened = 0.0
    try:
        while not _stop:
            messages = poll_batch(consumer, MAX_BATCH - inputs, 0.0 if inputs else IDLE_POLL_S)
            for msg in messages:
                if msg.error() is not None:
                    continue
                if not inputs:
                    opened = time.monotonic()
                inputs += 1
                key = msg.key() or b""
                saga_id = key.decode()
                state = staged.get(saga_id) or states.get(saga_id)
                step = transition(saga_id, state, json.loads(msg.value() or b"{}"))
                if step.state is None:
                    continue
                staged[saga_id] = step.state
                outputs.append(
                    (names.state, key, _encode({"step": step.state.step, "d": step.state.declined}))
                )
                if step.task is not None:
                    task = step.task
                    value = {"task_id": task.task_id, "action": task.action, "d": task.declined}
                    outputs.append((names.tasks(task.service), key, _encode(value)))
                if step.done is not None:
                    outputs.append((names.done, key, _encode({"outcome": step.done})))
            # Commit once nothing more is waiting, the batch is full or it is old enough.
            if inputs and (
                not messages
                or inputs >= MAX_BATCH
                or time.monotonic() - opened >= COMMIT_INTERVAL_S
            ):
                # Produced at commit, as sagaline does: the transaction is open only as
                # long as producing and committing take.
                producer.begin_transaction()
                for topic, out_key, out_value in outputs:
                    _produce(producer, topic, out_key, out_value)
                producer.send_offsets_to_transaction(
                    consumer.position(consumer.assignment()), consumer.consumer_group_metadata()
                )
                producer.commit_transaction(30)
                states.update(staged)
                staged.clear()
                outputs.clear()
                inputs = 0
    finally:
        consumer.close()


def _produce(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value, on_delivery=_fail_on_error)
            return
        except BufferError:
            producer.poll(0.05)  # the local queue is full: serve deliveries until there is room


def run_participant(bootstrap: str, dsn: str, names: Names, service: str) -> None:
    """A participant: insert a row per task, produce its result, then commit offsets."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{names.prefix}{service}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 1,
        }
    )
    insert = sql.SQL(
        "INSERT INTO {} (task_id, saga_id, kind) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"
    ).format(sql.Identifier(names.table))
    with psycopg.connect(dsn, autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        consumer.subscribe([names.tasks(service)])
        _ready(str(backend[0] if backend else 0))
        try:
            while not _stop:
                messages = poll_batch(consumer, PARTICIPANT_BATCH, IDLE_POLL_S)
                handled = 0
                for msg in messages:
                    if msg.error() is not None:
                        continue
                    key = msg.key() or b""
                    task = json.loads(msg.value() or b"{}")
                    outcome = outcome_of(task["action"], bool(task["d"]))
                    conn.execute(
                        insert,
                        (task["task_id"], key.decode(), effect_kind(task["action"], outcome)),
                    )
                    result = {"type": "result", "action": task["action"], "outcome": outcome}
                    _produce(producer, names.inbox, key, _encode(result))
                    handled += 1
                if handled:
                    # At least once: offsets move only past results the broker has.
                    if producer.flush(30) != 0:
                        raise SystemExit(f"{service}: results not acknowledged in 30 s")
                    consumer.commit(asynchronous=True)
        finally:
            consumer.close()


# --- the driver: CPU, phases, checks ----------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """User plus system CPU of ``pid`` so far, in clock ticks (0 if it cannot be read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # The command name may hold spaces: fields are counted after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


@dataclass
class Child:
    """A role process of this module."""

    name: str
    proc: subprocess.Popen[str]
    pg_backend: int | None = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _start_child(name: str, role_args: list[str], env: Mapping[str, str]) -> Child:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", *role_args],
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "ready":
        proc.kill()
        raise SystemExit(f"floor: {name} did not start (exit {proc.wait()})")
    return Child(name, proc, int(line[1]) if len(line) > 1 else None)


@dataclass(frozen=True)
class PhaseFigures:
    """Throughput, latency and CPU per saga of one batch of sagas."""

    finished: int
    per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Driver:
    """Publishes starts, follows the done topic and counts each process's CPU."""

    bootstrap: str
    dsn: str
    names: Names
    children: list[Child]
    kafka_pid: int | None = None
    done: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    _producer: Producer | None = None
    _consumer: Consumer | None = None

    def __post_init__(self) -> None:
        self._producer = Producer(
            {"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 1}
        )
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"{self.names.prefix}driver",
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self._consumer.subscribe([self.names.done])

    def close(self) -> None:
        """Leave the group and drop the clients."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None

    def _cpu(self) -> dict[str, int]:
        ticks = {child.name: cpu_ticks(child.proc.pid) for child in self.children}
        ticks["driver"] = cpu_ticks(os.getpid())
        backends = [c.pg_backend for c in self.children if c.pg_backend]
        if backends:
            ticks["postgres"] = sum(cpu_ticks(pid) for pid in backends)
        if self.kafka_pid is not None:
            ticks["kafka"] = cpu_ticks(self.kafka_pid)
        return ticks

    def poll(self, timeout_s: float) -> int:
        """Read done records; returns how many."""
        assert self._consumer is not None
        read = 0
        for msg in poll_batch(self._consumer, 5_000, timeout_s):
            if msg.error() is not None:
                continue
            outcome = json.loads(msg.value() or b"{}").get("outcome", "?")
            # The record's create time: taken by the coordinator as it produced it, like
            # the closing record bench.compare reads for sagaline, before the commit.
            stamp = float(msg.timestamp()[1])
            self.done.setdefault((msg.key() or b"").decode(), []).append((outcome, stamp))
            read += 1
        return read

    def _alive(self) -> None:
        for child in self.children:
            if child.proc.poll() is not None:
                raise SystemExit(f"floor: {child.name} exited ({child.proc.returncode})")

    def phase(self, count: int, rate: float, tag: str) -> PhaseFigures:
        """Start ``count`` sagas (``rate`` per second, or all at once), wait for all of them,
        check every outcome and effect; raises SystemExit on any failure."""
        assert self._producer is not None
        run = f"{tag}-{uuid.uuid4().hex[:6]}"
        sagas = {f"{run}-{i:05d}": i % 10 == 9 for i in range(count)}
        before = self._cpu()
        sent_ms: dict[str, float] = {}
        began = time.monotonic()
        for index, (saga_id, declined) in enumerate(sagas.items()):
            if rate > 0:
                # Pacing the load generator, not waiting for the system under test.
                lag = began + index / rate - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
                self.poll(0)
            value = _encode({"type": "start", "declined": declined})
            _produce(self._producer, self.names.inbox, saga_id.encode(), value)
            self._producer.poll(0)
            sent_ms[saga_id] = time.time() * 1000
        self._producer.flush(30)
        deadline = time.monotonic() + 300
        while any(s not in self.done for s in sagas):
            if time.monotonic() > deadline:
                missing = sum(1 for s in sagas if s not in self.done)
                raise SystemExit(f"floor {tag}: {missing} of {count} sagas never finished")
            self.poll(0.2)
            self._alive()
        after = self._cpu()
        # A duplicate done record would come right behind the first: look for it briefly.
        quiet_until = time.monotonic() + 0.5
        while time.monotonic() < quiet_until:
            self.poll(0.1)
        self._check(tag, sagas)
        closes = [self.done[s][0][1] for s in sagas]
        latencies = [self.done[s][0][1] - sent_ms[s] for s in sagas]
        elapsed = (max(closes) - min(sent_ms.values())) / 1000
        cpu = {name: (after[name] - before.get(name, 0)) * 1000 / CLK_TCK / count for name in after}
        return PhaseFigures(
            finished=count,
            per_second=count / elapsed if elapsed > 0 else 0.0,
            p50_ms=percentile(latencies, 50),
            p95_ms=percentile(latencies, 95),
            p99_ms=percentile(latencies, 99),
            cpu_ms=cpu,
        )

    def _check(self, tag: str, sagas: Mapping[str, bool]) -> None:
        problems: list[str] = []
        for saga_id, declined in sagas.items():
            outcomes = [outcome for outcome, _ in self.done.get(saga_id, [])]
            wanted = COMPENSATED if declined else COMPLETED
            if outcomes != [wanted]:
                problems.append(f"{saga_id}: done {outcomes}, expected [{wanted!r}]")
        query = sql.SQL(
            "SELECT saga_id, array_agg(kind ORDER BY kind) FROM {} "
            "WHERE saga_id = ANY(%s) GROUP BY saga_id"
        ).format(sql.Identifier(self.names.table))
        with psycopg.connect(self.dsn) as conn:
            rows = {r[0]: list(r[1]) for r in conn.execute(query, (list(sagas),)).fetchall()}
        for saga_id, declined in sagas.items():
            if rows.get(saga_id, []) != expected_effects(declined):
                problems.append(
                    f"{saga_id}: effects {rows.get(saga_id, [])}, "
                    f"expected {expected_effects(declined)}"
                )
        if problems:
            shown = "\n  ".join(problems[:20])
            raise SystemExit(f"floor {tag}: {len(problems)} problems, first:\n  {shown}")


# --- setup, output, main ----------------------------------------------------------------


def create_topics(admin: AdminClient, names: Names, partitions: int) -> None:
    """Create the run's topics (the state topic compacted) and wait until they exist."""
    topics = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=1,
            config={"cleanup.policy": "compact"} if name == names.state else {},
        )
        for name in names.all_topics()
    ]
    for future in admin.create_topics(topics, request_timeout=30).values():
        future.result(30)


def delete_topics(admin: AdminClient, names: Names) -> None:
    """Delete the run's topics; a failure is reported, not raised (cleanup goes on)."""
    for topic, future in admin.delete_topics(names.all_topics(), request_timeout=30).items():
        try:
            future.result(30)
        except KafkaException as exc:
            print(f"floor: could not delete topic {topic}: {exc}", file=sys.stderr)


def delete_groups(admin: AdminClient, names: Names) -> None:
    """Delete the run's consumer groups (empty once its processes stopped), as its topics."""
    groups = [f"{names.prefix}{role}" for role in ("coordinator", "driver", *SERVICES)]
    for group, future in admin.delete_consumer_groups(groups, request_timeout=30).items():
        try:
            future.result(30)
        except KafkaException as exc:
            print(f"floor: could not delete group {group}: {exc}", file=sys.stderr)


def _kafka_pid() -> int | None:
    # The local stack's broker (infra/kafka/kafka.sh writes it); absent elsewhere.
    pidfile = ROOT / ".stack" / "kafka-1" / "node-1" / "kafka.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if cpu_ticks(pid) else None


def broker_pid() -> int | None:
    """The local stack's Kafka broker process (for its CPU), or None when it is not here."""
    return _kafka_pid()


def _spread(values: Sequence[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):.0f}-{max(values):.0f})"


def line(label: str, runs: Sequence[PhaseFigures]) -> str:
    """One line of medians (min-max) over ``runs``, as bench/saga_pipeline.py prints them."""
    return (
        f"{label:<22} {_spread([r.per_second for r in runs], '8.1f')} sagas/s   "
        f"p50 {_spread([r.p50_ms for r in runs], '7.0f')} ms   "
        f"p95 {_spread([r.p95_ms for r in runs], '7.0f')} ms   "
        f"p99 {_spread([r.p99_ms for r in runs], '7.0f')} ms"
    )


def cpu_line(runs: Sequence[PhaseFigures]) -> str:
    """CPU ms per saga of each process: median (min-max) over ``runs``."""
    parts = []
    for name in runs[0].cpu_ms:
        values = [r.cpu_ms.get(name, 0.0) for r in runs]
        parts.append(
            f"{name} {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
        )
    total = [sum(r.cpu_ms.values()) for r in runs]
    parts.append(f"total {statistics.median(total):.2f}")
    return "  cpu ms/saga: " + ", ".join(parts)


def run(args: argparse.Namespace) -> dict[str, list[PhaseFigures]]:
    """Set up, run every phase ``args.repeat`` times, print each, clean up; returns the
    figures by phase label."""
    bootstrap = os.environ["SAGALINE_KAFKA_BOOTSTRAP"]
    dsn = os.environ["SAGALINE_POSTGRES_DSN"]
    run_id = f"{time.strftime('%Y%m%d%H%M%S')}{uuid.uuid4().hex[:4]}"
    names = Names(f"floor.{run_id}.", f"floor_effects_{run_id}")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    results: dict[str, list[PhaseFigures]] = {}
    children: list[Child] = []
    driver: Driver | None = None
    create_topics(admin, names, args.partitions)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (task_id text PRIMARY KEY, saga_id text NOT NULL, "
                    "kind text NOT NULL)"
                ).format(sql.Identifier(names.table))
            )
        common = ["--prefix", names.prefix, "--table", names.table]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        children.append(_start_child("coordinator", ["--role", "coordinator", *common], env))
        for service in SERVICES:
            children.append(_start_child(service, ["--role", service, *common], env))
        driver = Driver(bootstrap, dsn, names, children, kafka_pid=_kafka_pid())
        driver.phase(20, 0, "warmup")
        print(
            f"raw floor: 1 coordinator, 3 participants, {args.partitions} partitions, "
            f"{os.cpu_count()} cores; median (min-max) of {args.repeat} runs",
            flush=True,
        )
        label = f"burst of {args.burst}"
        results[label] = [driver.phase(args.burst, 0, "burst") for _ in range(args.repeat)]
        print(line(label, results[label]), flush=True)
        print(cpu_line(results[label]), flush=True)
        peak = statistics.median(r.per_second for r in results[label])
        for token in (t.strip() for t in args.rates.split(",") if t.strip()):
            # "half": half of the burst's median throughput, the second load.
            rate = peak / 2 if token == "half" else float(token)
            count = max(1, int(rate * args.seconds))
            label = f"{rate:.0f} starts/s"
            results[label] = [
                driver.phase(count, rate, f"rate{rate:.0f}") for _ in range(args.repeat)
            ]
            print(line(label, results[label]), flush=True)
            print(cpu_line(results[label]), flush=True)
    finally:
        if driver is not None:
            driver.close()
        for child in children:
            child.stop()
        delete_topics(admin, names)
        delete_groups(admin, names)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(names.table)))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the floor (or, with ``--role``, one of its processes)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=1_000, help="sagas per burst")
    parser.add_argument(
        "--rates", default="20", help="comma-separated starts per second; 'half' = half of peak"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a rate phase")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--role", choices=["coordinator", *SERVICES], help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--table", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role is None:
        run(args)
        return 0
    signal.signal(signal.SIGTERM, _on_term)
    names = Names(args.prefix, args.table)
    bootstrap = os.environ["SAGALINE_KAFKA_BOOTSTRAP"]
    if args.role == "coordinator":
        run_coordinator(bootstrap, names)
    else:
        run_participant(bootstrap, os.environ["SAGALINE_POSTGRES_DSN"], names, args.role)
    return 0


if __name__ == "__main__":
    sys.exit(main())
