"""Benchmark: order sagas through one orchestrator and three participant processes.

Phases, each repeated ``--repeat`` times with fresh orders on the same running pipeline:
a burst (every start published at once: capacity), then fixed start rates (latency under a
known load). Prints the median and the spread of each figure. Run on the local stack:

    bin/bench            # or: python -m bench.saga_pipeline --help

Nothing here asserts a time: the figures are for docs/performance.md, read with the
machine's load in mind.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

from confluent_kafka.admin import AdminClient

from examples.order_saga.harness import (
    ROOT,
    SERVICES,
    HistoryWatcher,
    RunFigures,
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


def _phase(
    client: WorkflowClient, watcher: HistoryWatcher, count: int, rate: float, tag: str
) -> RunFigures:
    orders = make_orders(count, declined_every=10, run_id=f"{tag}-{uuid.uuid4().hex[:6]}")
    sent = publish(client, orders, rate, watcher)
    done = watcher.wait_terminal(list(sent), deadline_s=300)
    if len(done) != len(sent):
        raise SystemExit(f"{tag}: only {len(done)} of {len(sent)} sagas finished")
    return figures(done, sent)


def _line(label: str, runs: list[RunFigures]) -> str:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    rate = [r.per_second for r in runs]
    p50 = [r.p50_ms for r in runs]
    p99 = [r.p99_ms for r in runs]
    return (
        f"{label:<22} {med(rate):8.1f} sagas/s ({min(rate):.0f}-{max(rate):.0f})   "
        f"p50 {med(p50):7.0f} ms ({min(p50):.0f}-{max(p50):.0f})   "
        f"p99 {med(p99):7.0f} ms ({min(p99):.0f}-{max(p99):.0f})"
    )


def main() -> int:
    """Run the phases and print one line of medians per phase."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=1_000, help="sagas per burst")
    parser.add_argument("--rates", default="20,50,200", help="comma-separated starts per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a rate phase")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--keep-topics", action="store_true", help="leave the run's topics on the broker"
    )
    args = parser.parse_args()
    bootstrap = os.environ["SAGALINE_KAFKA_BOOTSTRAP"]
    dsn = os.environ["SAGALINE_POSTGRES_DSN"]
    run_id = time.strftime("%Y%m%d%H%M%S")
    topics = Topics(f"bench.{run_id}")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    ensure_topics(
        admin,
        topics,
        partitions=args.partitions,
        participants=SERVICES,
    )
    log_dir = ROOT / ".stack" / "bench" / run_id
    processes, _ports = start_pipeline(base_env(bootstrap, dsn, topics.prefix), log_dir)
    watcher = HistoryWatcher(bootstrap, topics.history, terminal_only=True)
    client = WorkflowClient(KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=topics.prefix))
    try:
        _phase(client, watcher, 20, 0, "warmup")
        print(
            f"order saga pipeline: 1 orchestrator, 3 participants, {args.partitions} partitions, "
            f"{os.cpu_count()} cores; median (min-max) of {args.repeat} runs"
        )
        bursts = [_phase(client, watcher, args.burst, 0, "burst") for _ in range(args.repeat)]
        print(_line(f"burst of {args.burst}", bursts), flush=True)
        for rate in (float(r) for r in args.rates.split(",") if r):
            count = max(1, int(rate * args.seconds))
            runs = [
                _phase(client, watcher, count, rate, f"rate{rate:.0f}") for _ in range(args.repeat)
            ]
            print(_line(f"{rate:.0f} starts/s", runs), flush=True)
    finally:
        watcher.close()
        for process in processes:
            process.stop()
        if not args.keep_topics:
            _delete_topics(admin, topics.prefix)
    return 0


def _delete_topics(admin: AdminClient, prefix: str) -> None:
    """Delete the run's topics: left behind, a thousand runs' worth of partitions slow the
    broker down, and with it every later figure."""
    try:
        names = [t for t in admin.list_topics(timeout=30).topics if t.startswith(prefix + ".")]
        for name, future in admin.delete_topics(names, operation_timeout=60).items():
            try:
                future.result(120)
            except Exception as exc:  # cleanup only: the figures stand
                print(f"deleting {name} failed: {exc}", file=sys.stderr)
    except Exception as exc:
        print(f"deleting the topics of {prefix} failed: {exc}", file=sys.stderr)


def delete_run_topics(admin: AdminClient, prefix: str) -> None:
    """Delete every topic under ``prefix`` (a run's), reporting failures on stderr."""
    _delete_topics(admin, prefix)


if __name__ == "__main__":
    sys.exit(main())
