"""Celery settings of the shop's workers (``app.config_from_object``).

The broker is Kafka, through kombu's ``confluentkafka`` transport. Late acks with one task
in flight per worker process group: kombu acknowledges a Kafka message by committing the
consumer's position, which covers everything the consumer fetched, so a worker killed
mid-task gets that task again only when nothing else was fetched after it.
"""

from __future__ import annotations

import os

from examples.celery_shop import queues

broker_url = f"confluentkafka://{os.environ.get('SAGALINE_KAFKA_BOOTSTRAP', '127.0.0.1:9092')}"
task_acks_late = True
worker_prefetch_multiplier = 1
worker_concurrency = 1
# Outcomes go to the workflows; no result backend.
task_ignore_result = True
task_routes = {
    "shop.inventory.*": {"queue": queues.INVENTORY},
    "shop.payments.*": {"queue": queues.PAYMENTS},
    "shop.shipping.*": {"queue": queues.SHIPPING},
}
broker_transport_options = {
    # More partitions let more worker process groups share a queue.
    "num_partitions": int(os.environ.get("SHOP_QUEUE_PARTITIONS", "1")),
    # One worker polls its queues in turn: a short wait on an empty one keeps the others'
    # tasks from waiting behind it (kombu's default is 5 s). It also bounds the broker
    # check at connection, so it cannot be much shorter.
    "wait_time_seconds": 1,
    "polling_interval": 0.05,
    # A killed worker's partitions move to its replacement after this, not after 45 s.
    "kafka_consumer_config": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
}
