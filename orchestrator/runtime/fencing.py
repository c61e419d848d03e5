"""Ending a dead previous owner's open transaction at once instead of waiting it out.

An orchestrator killed mid-transaction leaves records on history that no reader may
skip: a restore reads up to the high watermark including them (KAFKA_EOS rule 10), so it
waits until the broker aborts them at the transaction timeout. Whoever takes over can end
that wait: initialising a producer with the dead owner's ``transactional.id`` makes the
coordinator abort its open transaction and fences it for good (a zombie that wakes up
fails on its next call and exits).

The previous owner is known because every commit writes the committing transactional id
into the metadata of the inbox offsets it commits; a non-stable offset fetch reads it even
while that owner's last transaction is pending. Only an owner that is not a live member of
the group is fenced, so a healthy instance that merely handed a partition over is never
disturbed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Final

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from orchestrator import metrics
from orchestrator.protocol.failures import safe_text

log = logging.getLogger(__name__)

METADATA_PREFIX: Final = "sagaline-txn="


def offset_metadata(transactional_id: str) -> str:
    """The metadata an orchestrator stores with each inbox offset it commits."""
    return METADATA_PREFIX + transactional_id


def owner_of(metadata: str | None) -> str | None:
    """The transactional id recorded in an offset's metadata, if sagaline wrote it."""
    if metadata and metadata.startswith(METADATA_PREFIX):
        return metadata[len(METADATA_PREFIX) :] or None
    return None


def fence_previous_owners(
    admin: AdminClient,
    *,
    group: str,
    topic: str,
    partitions: Iterable[int],
    own_transactional_id: str,
    transactional_id_of: Any,
    kafka_config: dict[str, Any],
    timeout_s: float,
) -> list[str]:
    """Fence the recorded previous owners of ``partitions`` that are no longer in the group.

    Args:
        admin: an admin client of the cluster.
        group: the orchestrators' consumer group.
        topic: the inbox topic, whose committed offsets carry the owners.
        partitions: the partitions just assigned to us.
        own_transactional_id: ours, never fenced.
        transactional_id_of: maps a live member's ``group.instance.id`` to its
            transactional id.
        kafka_config: librdkafka settings for the fencing producer (bootstrap, security).
        timeout_s: bound for each admin call and each fence.

    Returns:
        The transactional ids fenced. Failures are logged, never raised: without fencing
        the restore still completes, only later (after the transaction timeout).
    """
    wanted = [TopicPartition(topic, p) for p in sorted(set(partitions))]
    if not wanted:
        return []
    try:
        request = [ConsumerGroupTopicPartitions(group, wanted)]
        future = admin.list_consumer_group_offsets(
            request, require_stable=False, request_timeout=timeout_s
        )[group]
        owners = {owner_of(tp.metadata) for tp in future.result(timeout=timeout_s).topic_partitions}
    except (KafkaException, TimeoutError, ValueError) as exc:
        log.warning("cannot read previous owners of partitions: %s", safe_text(exc))
        return []
    owners.discard(None)
    owners.discard(own_transactional_id)
    if not owners:
        log.info("no previous owner to fence partitions=%s", [tp.partition for tp in wanted])
        return []
    try:
        description = admin.describe_consumer_groups([group], request_timeout=timeout_s)[group]
        members = description.result(timeout=timeout_s).members
        live = {transactional_id_of(m.group_instance_id) for m in members if m.group_instance_id}
    except (KafkaException, TimeoutError, ValueError) as exc:
        log.warning("cannot list live orchestrators, fencing nobody: %s", safe_text(exc))
        return []
    log.info("previous owners=%s live=%s", sorted(o for o in owners if o), sorted(live))
    fenced: list[str] = []
    for owner in sorted(o for o in owners - live if o is not None):
        if _fence(owner, kafka_config, timeout_s):
            fenced.append(owner)
    return fenced


def _fence(transactional_id: str, kafka_config: dict[str, Any], timeout_s: float) -> bool:
    started = time.monotonic()
    producer = Producer(
        {
            **kafka_config,
            "transactional.id": transactional_id,
            "client.id": f"sagaline-fence-{transactional_id}",
            "retry.backoff.ms": 5,
            "retry.backoff.max.ms": 50,
        }
    )
    try:
        producer.init_transactions(timeout_s)
    except KafkaException as exc:
        log.warning(
            "fencing previous owner transactional_id=%s failed: %s",
            transactional_id,
            safe_text(exc),
        )
        return False
    finally:
        producer.flush(1)
    metrics.OWNERS_FENCED.inc()
    log.info(
        "fenced previous owner transactional_id=%s seconds=%.3f",
        transactional_id,
        time.monotonic() - started,
    )
    return True
