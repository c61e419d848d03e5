"""The demo: 1,000 order sagas through one orchestrator and three participant services,
with the visibility projector serving the web UI beside them.

Run by ``bin/demo`` after the local stack is up; reads SAGALINE_KAFKA_BOOTSTRAP and
SAGALINE_POSTGRES_DSN from the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path

from confluent_kafka.admin import AdminClient

from examples.order_saga.harness import (
    ROOT,
    SERVICES,
    HistoryWatcher,
    SagalineProcess,
    audit_effects,
    base_env,
    expected_status,
    figures,
    free_port,
    make_orders,
    publish,
    start_pipeline,
)
from orchestrator.admin import ensure_topics
from orchestrator.client import WorkflowClient
from orchestrator.protocol.records import WorkflowRecord, WorkflowStatus
from orchestrator.protocol.topics import Topics
from orchestrator.settings import KafkaSettings

UI_PORT = 9430
# How long the summary waits for the projector to have every saga of the run in PostgreSQL.
PROJECTION_WAIT_S = 60.0


def main() -> int:
    """Run the demo; exit 0 only if every saga ended as expected with effects exactly once."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sagas", type=int, default=1_000)
    parser.add_argument(
        "--declined-every",
        type=int,
        default=10,
        help="every N-th order's payment is declined (10 = 10%%)",
    )
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="start this many sagas per second (default 0: all at once)",
    )
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds")
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the processes (and their /metrics) up until Ctrl-C",
    )
    args = parser.parse_args()
    bootstrap = os.environ["SAGALINE_KAFKA_BOOTSTRAP"]
    dsn = os.environ["SAGALINE_POSTGRES_DSN"]
    run_id = time.strftime("%Y%m%d%H%M%S") + uuid.uuid4().hex[:4]
    topics = Topics(f"demo.{run_id}")
    log_dir = ROOT / ".stack" / "demo" / run_id
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap}),
        topics,
        partitions=args.partitions,
        participants=SERVICES,
    )
    print(
        f"topics: {topics.inbox}, {topics.history} (compacted), "
        f"{topics.prefix}.tasks.*, {topics.dlq}; {args.partitions} partitions"
    )

    env = base_env(bootstrap, dsn, topics.prefix)
    processes, ports = start_pipeline(env, log_dir)
    ui = start_projector(env, log_dir, processes, ports)
    print(f"started {len(processes)} processes; logs in {log_dir}")
    print(f"web UI at {ui} (the projector fills it as the sagas run)")
    try:
        return _drive(args, bootstrap, dsn, topics, run_id, processes, ports, log_dir, ui)
    finally:
        for process in processes:
            process.stop()


def start_projector(
    env: dict[str, str],
    log_dir: Path,
    processes: list[SagalineProcess],
    ports: dict[str, int],
) -> str:
    """Start ``sagaline projector`` serving the web UI (on port 9430 when it is free)
    and /metrics; add it to ``processes`` and ``ports``; return the UI's address."""
    ui_port = UI_PORT if _port_free(UI_PORT) else free_port()
    ports["projector"] = free_port()
    projector = SagalineProcess(
        "projector",
        ["projector"],
        {**env, "SAGALINE_UI_PORT": str(ui_port), "SAGALINE_METRICS_PORT": str(ports["projector"])},
        log_dir / "projector.log",
    ).start()
    processes.append(projector)
    return f"http://127.0.0.1:{ui_port}/"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def projected(ui: str, id_prefix: str, expected: int, deadline_s: float) -> int:
    """How many closed runs whose id starts with ``id_prefix`` the UI counts, once that
    is ``expected`` or after ``deadline_s`` (the projector may still be catching up)."""
    url = f"{ui}api/workflows?limit=1&id_prefix={urllib.parse.quote(id_prefix)}"
    end = time.monotonic() + deadline_s
    seen = 0
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                counts = json.load(resp)["counts"]
            seen = sum(n for status, n in counts.items() if status not in ("RUNNING", "STUCK"))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not up yet, or its tables are still being created
        if seen >= expected or time.monotonic() >= end:
            return seen
        time.sleep(0.5)  # polling another process's progress, bounded by the deadline


def _drive(
    args: argparse.Namespace,
    bootstrap: str,
    dsn: str,
    topics: Topics,
    run_id: str,
    processes: list[SagalineProcess],
    ports: dict[str, int],
    log_dir: Path,
    ui: str,
) -> int:
    orders = make_orders(args.sagas, declined_every=args.declined_every, run_id=run_id)
    watcher = HistoryWatcher(bootstrap, topics.history)
    client = WorkflowClient(KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=topics.prefix))
    # One saga first, so start-up (group joins, restores) is not counted as saga latency.
    warmup = make_orders(1, declined_every=0, run_id=f"{run_id}-warmup")[0]
    client.start("order.process", warmup, workflow_id=warmup["order_id"])
    client.flush()
    if not watcher.wait_terminal([warmup["order_id"]], 120.0, alive=processes):
        print("the warm-up saga did not finish in 120 s; see the logs", file=sys.stderr)
        return 1
    print("warm-up saga finished; the pipeline is ready")
    sent_ms = publish(client, orders, args.rate, watcher)
    print(f"published {len(orders)} StartWorkflow records to {topics.inbox}")
    ids = list(sent_ms)
    started = time.monotonic()
    last_print = 0.0
    while time.monotonic() - started < args.deadline:
        watcher.poll()
        done = watcher.terminal(ids)
        if time.monotonic() - last_print >= 1.0 or len(done) == len(ids):
            last_print = time.monotonic()
            counts = _counts(done.values())
            print(
                f"  {time.monotonic() - started:6.1f}s  done {len(done):5d}/{len(ids)}  "
                + "  ".join(f"{k} {v}" for k, v in counts.items()),
                flush=True,
            )
        if len(done) == len(ids):
            break
        dead = [p for p in processes if not p.alive()]
        if dead:
            print(f"{dead[0].name} exited:\n{dead[0].tail()}", file=sys.stderr)
            return 1
    done = watcher.terminal(ids)
    watcher.close()
    run = figures(done, sent_ms)
    wrong = [
        o["order_id"]
        for o in orders
        if (r := done.get(o["order_id"])) is not None and r.status != expected_status(o)
    ]
    problems = audit_effects(dsn, orders)
    counts = _counts(done.values())
    print("\n=== sagaline demo summary ===")
    print(f"sagas            {len(ids)} started, {len(done)} finished")
    print("outcome          " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(
        f"throughput       {run.per_second:.1f} sagas/s "
        f"({run.elapsed_s:.1f} s from first start to last close)"
    )
    print(
        f"latency          p50 {run.p50_ms:.0f} ms, p99 {run.p99_ms:.0f} ms "
        "(start published -> saga closed)"
    )
    print(f"expected status  {'all as expected' if not wrong else f'{len(wrong)} wrong'}")
    print(f"effects audit    {'exactly once' if not problems else problems[:5]}")
    print(
        "metrics          "
        + ", ".join(f"{name} http://127.0.0.1:{port}/metrics" for name, port in ports.items())
    )
    print(f"logs             {log_dir}")
    # The warm-up saga's id has the run's prefix too.
    shown = projected(ui, f"order-{run_id}-", len(ids) + 1, PROJECTION_WAIT_S)
    print(
        f"web UI           {ui} (this run: {ui}#/?id_prefix=order-{run_id}-; "
        f"{shown} of {len(ids) + 1} sagas projected as closed)"
    )
    print("orchestrator metrics (excerpt):")
    for line in _scrape(ports["orchestrator"]):
        print(f"  {line}")
    ok = len(done) == len(ids) and not wrong and not problems
    if args.keep_running:
        print("processes keep running; Ctrl-C to stop")
        try:
            while all(p.alive() for p in processes):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0 if ok else 1


def _scrape(port: int) -> list[str]:
    wanted = (
        "sagaline_workflows_started_total{",
        "sagaline_workflows_closed_total{",
        "sagaline_transaction_commit_seconds_count",
        "sagaline_batch_inputs_sum",
        "sagaline_dead_letters_total{",
    )
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError as exc:
        return [f"(scrape failed: {exc})"]
    return [line for line in text.splitlines() if line.startswith(wanted)]


def _counts(records: Iterable[WorkflowRecord]) -> dict[str, int]:
    counts = {
        s.value.lower(): 0
        for s in (WorkflowStatus.COMPLETED, WorkflowStatus.COMPENSATED, WorkflowStatus.FAILED)
    }
    for record in records:
        key = record.status.value.lower()
        counts[key] = counts.get(key, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
