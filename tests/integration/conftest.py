"""Fixtures for tests against the real Kafka broker and PostgreSQL.

The stack is started by ``infra/stack.sh up``, the same script the README uses. If it
cannot start, every integration test fails with the script's output: never a skip.
"""

from __future__ import annotations

import os
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from orchestrator.admin import ensure_topics
from orchestrator.protocol.topics import Topics
from tests.integration.pipeline import Saga

ROOT = Path(__file__).resolve().parents[2]
PARTICIPANTS = ("inventory", "payment", "shipping")


def _read_env(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if k.strip().startswith("SAGALINE_")}


@pytest.fixture(scope="session")
def stack() -> dict[str, str]:
    """Bring up (or reuse) the local Kafka + PostgreSQL; return their SAGALINE_* settings."""
    try:
        done = subprocess.run(
            [str(ROOT / "infra" / "stack.sh"), "up"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"infra/stack.sh up did not finish in {exc.timeout}s", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            "infra/stack.sh up failed; the integration tests need a real Kafka and "
            f"PostgreSQL.\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}",
            pytrace=False,
        )
    env = _read_env(done.stdout)
    for key in ("SAGALINE_KAFKA_BOOTSTRAP", "SAGALINE_POSTGRES_DSN"):
        if key not in env:
            pytest.fail(f"infra/stack.sh up printed no {key}:\n{done.stdout}", pytrace=False)
    return env


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: dict[str, str]) -> str:
    """bootstrap.servers of the local broker."""
    return stack["SAGALINE_KAFKA_BOOTSTRAP"]


@pytest.fixture(scope="session")
def admin(kafka_bootstrap: str) -> AdminClient:
    """An AdminClient on the local broker."""
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def topics(admin: AdminClient) -> Iterator[Topics]:
    """A fresh set of sagaline topics (4 partitions) under a prefix unique to the test,
    deleted afterwards (with any other topic the test made under the prefix, Celery
    queues named "<prefix>-..." included), so a local
    broker does not pile up thousands of partitions over many runs."""
    names = Topics(f"t{uuid.uuid4().hex[:10]}")
    ensure_topics(admin, names, partitions=4, participants=PARTICIPANTS)
    yield names
    try:
        # Celery queues of the test are named "<prefix>-...".
        ours = [
            t
            for t in admin.list_topics(timeout=10).topics
            if t.startswith((names.prefix + ".", names.prefix + "-"))
        ]
        for future in admin.delete_topics(ours, operation_timeout=30).values():
            future.result(60)
    except Exception as exc:  # cleanup only: the test's verdict stands
        warnings.warn(f"deleting the topics of {names.prefix} failed: {exc}", stacklevel=1)


@pytest.fixture
def postgres_dsn(stack: dict[str, str]) -> Iterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    server_dsn = stack["SAGALINE_POSTGRES_DSN"]
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = server_dsn.rpartition("/")
    dsn = f"{base}/{name}"
    yield dsn
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def process_env(kafka_bootstrap: str, topics: Topics, postgres_dsn: str) -> dict[str, str]:
    """Environment for sagaline processes started by a test."""
    env = dict(os.environ)
    env.update(
        {
            "SAGALINE_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "SAGALINE_TOPIC_PREFIX": topics.prefix,
            "SAGALINE_POSTGRES_DSN": postgres_dsn,
            "SAGALINE_METRICS_PORT": "0",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


@pytest.fixture
def saga(
    process_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
    postgres_dsn: str,
    tmp_path: Path,
) -> Iterator[Saga]:
    """Processes and observers of one test's pipeline, stopped afterwards."""
    run = Saga(process_env, topics, kafka_bootstrap, postgres_dsn, tmp_path / "logs")
    yield run
    run.close()
