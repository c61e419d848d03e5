"""The 3-broker cluster of infra/kafka/kafka.sh, for the fault tests that come later.

Starts it in a stack directory of its own, checks that three brokers answer, that a
replicated topic takes transactional writes that a read_committed reader sees, that start
is idempotent, and that stop stops every broker.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KAFKA = str(ROOT / "infra" / "kafka" / "kafka.sh")


def _kafka(stack_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAGALINE_STACK_DIR": str(stack_dir)}
    return subprocess.run(
        [KAFKA, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    stack_dir = tmp_path_factory.mktemp("stack3")
    started = _kafka(stack_dir, "start", "--brokers", "3")
    assert started.returncode == 0, f"3-broker start failed:\n{started.stderr}"
    line = started.stdout.strip().splitlines()[-1]
    assert line.startswith("SAGALINE_KAFKA_BOOTSTRAP="), started.stdout
    try:
        yield stack_dir, line.split("=", 1)[1]
    finally:
        _kafka(stack_dir, "reset", "--brokers", "3")


def test_three_broker_cluster_replicates_transactions_and_stops(
    cluster: tuple[Path, str],
) -> None:
    stack_dir, bootstrap = cluster
    assert len(bootstrap.split(",")) == 3
    assert all(addr.startswith("127.0.0.1:") for addr in bootstrap.split(","))
    admin = AdminClient({"bootstrap.servers": bootstrap})
    assert len(admin.list_topics(timeout=30).brokers) == 3

    topic = f"rf3-{uuid.uuid4().hex[:8]}"
    created = admin.create_topics(
        [
            NewTopic(
                topic, num_partitions=2, replication_factor=3, config={"min.insync.replicas": "2"}
            )
        ]
    )
    created[topic].result(timeout=60)
    producer = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": f"t-{topic}", "acks": "all"}
    )
    producer.init_transactions(60)
    producer.begin_transaction()
    for i in range(10):
        producer.produce(topic, key=str(i).encode(), value=b"committed")
    producer.commit_transaction(60)
    producer.begin_transaction()
    producer.produce(topic, key=b"x", value=b"aborted")
    producer.abort_transaction(60)

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{topic}",
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    seen: list[bytes | None] = []
    try:
        for _ in range(100):
            seen += [m.value() for m in consumer.consume(50, 0.2) if m.error() is None]
            if len(seen) >= 10:
                break
    finally:
        consumer.close()
    assert seen == [b"committed"] * 10

    again = _kafka(stack_dir, "start", "--brokers", "3")
    assert again.returncode == 0 and again.stdout.strip().endswith(bootstrap), again.stderr
    stopped = _kafka(stack_dir, "stop", "--brokers", "3")
    assert stopped.returncode == 0, stopped.stderr
    status = _kafka(stack_dir, "status", "--brokers", "3")
    assert status.returncode != 0, "status reports a stopped cluster as running"
