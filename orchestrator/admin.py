"""Creating and checking sagaline's topics with explicit settings."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from orchestrator.errors import ConfigurationError
from orchestrator.protocol.topics import (
    Topics,
    dlq_config,
    history_config,
    inbox_config,
    replies_config,
    tasks_config,
)

log = logging.getLogger(__name__)


def ensure_topics(
    admin: AdminClient,
    topics: Topics,
    *,
    partitions: int,
    participants: Iterable[str],
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the inbox, history, DLQ, replies and task topics that do not exist yet.

    Inbox and history must have the same partition count (they are co-partitioned); an
    existing pair that disagrees is a deployment error, reported rather than repaired.

    Returns:
        The names of the topics created.
    """
    wanted = {
        topics.inbox: (partitions, inbox_config()),
        topics.history: (partitions, history_config()),
        topics.dlq: (1, dlq_config()),
        topics.replies: (partitions, replies_config()),
    }
    for participant in participants:
        wanted[topics.tasks(participant)] = (partitions, tasks_config())
    existing = admin.list_topics(timeout=timeout_s).topics
    new = [
        NewTopic(name, num_partitions=count, replication_factor=replication_factor, config=config)
        for name, (count, config) in wanted.items()
        if name not in existing
    ]
    created: list[str] = []
    if new:
        for name, future in admin.create_topics(new, operation_timeout=timeout_s).items():
            try:
                future.result(timeout=timeout_s)
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        log.info("created topics %s", ",".join(created))
    check_copartitioned(admin, topics, timeout_s=timeout_s)
    return created


def check_copartitioned(admin: AdminClient, topics: Topics, *, timeout_s: float = 30.0) -> int:
    """Return the partition count shared by inbox and history, or raise if they differ."""
    deadline = time.monotonic() + timeout_s
    while True:
        # Metadata of just-created topics reaches the broker's cache a moment later.
        metadata = admin.list_topics(timeout=timeout_s).topics
        missing = [
            t
            for t in (topics.inbox, topics.history)
            if t not in metadata or metadata[t].error is not None
        ]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if missing:
        raise ConfigurationError(
            f"topics {', '.join(missing)} do not exist; run `sagaline topics create`"
        )
    inbox = len(metadata[topics.inbox].partitions)
    history = len(metadata[topics.history].partitions)
    if inbox != history:
        raise ConfigurationError(
            f"{topics.inbox} has {inbox} partitions but {topics.history} has {history}; "
            "they must be equal because a workflow lives in the same partition of both"
        )
    return inbox
