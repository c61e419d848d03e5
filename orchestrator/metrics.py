"""Every Prometheus metric sagaline exports, defined once.

Each process serves ``/metrics`` with :func:`serve`. Names follow Prometheus conventions:
``sagaline_`` prefix, base units (seconds, bytes), ``_total`` on counters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Final, TypeVar

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from orchestrator.errors import ConfigurationError

M = TypeVar("M", Counter, Gauge, Histogram)
# prometheus_client's labels() validates and locks on every call, a few microseconds that
# the orchestrator's loop would pay per input; so children are kept here (label values come
# from a deploy's names and partitions: few, but bounded anyway). A child removed from its
# metric must leave this cache too (``forget``), or later updates would go to an orphan.
_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}
MAX_CACHED_CHILDREN: Final = 10_000


def child(metric: M, *labels: str) -> M:
    """``metric.labels(*labels)``, looked up once."""
    key = (id(metric), labels)
    found = _CHILDREN.get(key)
    if found is None:
        if len(_CHILDREN) >= MAX_CACHED_CHILDREN:
            _CHILDREN.clear()
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


def forget(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    """Remove ``metric``'s series with ``labels`` (a partition given away), if it exists,
    so it is no longer exported; a later ``child`` or ``labels`` call starts it afresh."""
    _CHILDREN.pop((id(metric), labels), None)
    # prometheus_client before 0.22 raises for a series never set (a partition revoked
    # before its first refresh); the rebalance callback must not die of it.
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# --- orchestrator -------------------------------------------------------------------
WORKFLOWS_STARTED = Counter(
    "sagaline_workflows_started_total", "Workflows started.", ["workflow_type"]
)
WORKFLOWS_CLOSED = Counter(
    "sagaline_workflows_closed_total",
    "Workflow runs that closed, by status (completed, failed, compensated, "
    "compensation_failed, cancelled, terminated; continued_as_new: a run that handed over "
    "to the next run of the same workflow).",
    ["workflow_type", "status"],
)
WORKFLOWS_STUCK = Counter(
    "sagaline_workflows_stuck_total",
    "Workflows parked as stuck (non-determinism or unknown type).",
    ["workflow_type"],
)
WORKFLOW_DURATION = Histogram(
    "sagaline_workflow_duration_seconds",
    "A run's start to its closing status.",
    ["workflow_type", "status"],
    buckets=_LATENCY_BUCKETS,
)
ACTIVITIES_SCHEDULED = Counter(
    "sagaline_activities_scheduled_total", "Activity attempts sent to participants.", ["activity"]
)
INPUTS_IGNORED = Counter(
    "sagaline_inputs_ignored_total",
    "Inbox inputs that changed nothing (duplicates, stale attempts).",
    ["reason"],
)
TXN_COMMIT_SECONDS = Histogram(
    "sagaline_transaction_commit_seconds",
    "send_offsets_to_transaction + commit_transaction.",
    buckets=_LATENCY_BUCKETS,
)
TXN_ABORTS = Counter("sagaline_transaction_aborts_total", "Aborted transactions.", ["reason"])
BATCH_SIZE = Histogram(
    "sagaline_batch_inputs",
    "Inbox inputs per committed transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
)
RESTORE_SECONDS = Histogram(
    "sagaline_restore_duration_seconds",
    "Time to restore the history partitions of one assignment, all read together "
    "(observed once per restore, whatever the number of partitions).",
    buckets=_LATENCY_BUCKETS,
)
RESTORE_RECORDS = Counter(
    "sagaline_restore_records_total", "History records read while restoring.", ["partition"]
)
WORKFLOWS_IN_FLIGHT = Gauge(
    "sagaline_workflows_in_flight", "Open (running or stuck) workflows held.", ["partition"]
)
WORKFLOWS_RETAINED = Gauge(
    "sagaline_workflows_closed_retained",
    "Closed workflows still on history, waiting for their retention to end.",
    ["partition"],
)
WORKFLOWS_TOMBSTONED = Counter(
    "sagaline_workflows_tombstoned_total",
    "Closed workflows deleted from history after their retention.",
)
INPUTS_HELD = Counter(
    "sagaline_inputs_held_total",
    "Inbox inputs kept with a parked or unreadable workflow instead of being applied.",
    ["reason"],
)
WORKFLOWS_PARKED = Counter(
    "sagaline_workflows_parked_total",
    "Inputs that parked their workflow as STUCK because they could not be applied.",
    ["reason"],
)
OWNERS_FENCED = Counter(
    "sagaline_previous_owners_fenced_total",
    "Dead previous owners whose open transaction was aborted at takeover.",
)
BUDGET_COMMITS = Counter(
    "sagaline_transaction_budget_commits_total",
    "Batches committed early because their transaction reached its time budget.",
)
REPLIES = Counter(
    "sagaline_replies_total",
    "Answers sent on the replies topic (starts that asked for one, queries, updates).",
    ["kind", "outcome"],
)
DEAD_LETTERS = Counter(
    "sagaline_dead_letters_total", "Records written to the dead-letter topic.", ["source", "reason"]
)
WAKES = Counter(
    "sagaline_workflow_wakes_total",
    "Workflows woken because a timer, a retry's backoff or an activity timeout fell due.",
)
REPLAYS = Counter(
    "sagaline_replays_total",
    "Replays of workflow code: 'resumed' ran a kept coroutine on from where it waited, "
    "'from_start' replayed the whole history (no coroutine kept, or the kept one did not "
    "fit the history: an abort, a restore, a rebalance, a rewritten heartbeat; see "
    "SAGALINE_REPLAY_CACHE_SIZE).",
    ["how"],
)
WAKE_LAG_SECONDS = Histogram(
    "sagaline_workflow_wake_lag_seconds",
    "How late a workflow was woken: the time it was processed minus the time it was due.",
    buckets=_LATENCY_BUCKETS,
)
PENDING_WAKES = Gauge(
    "sagaline_workflows_waiting_on_time",
    "Running workflows with a timer, a backoff or a timeout pending, per owned partition.",
    ["partition"],
)
# Refreshed every GAUGE_REFRESH_S by the orchestrator's loop, never per input.
GAUGE_REFRESH_S: Final = 2.0
WORKFLOWS_IN_FLIGHT_STUCK = Gauge(
    "sagaline_workflows_in_flight_stuck",
    "Open workflows parked as STUCK now (a part of sagaline_workflows_in_flight), per owned "
    "partition.",
    ["partition"],
)
STUCK_OLDEST_AGE = Gauge(
    "sagaline_workflows_stuck_oldest_age_seconds",
    "How long the longest-parked STUCK workflow of an owned partition has been parked, from "
    "its record's last write (0: none is stuck).",
    ["partition"],
)
INBOX_LAG = Gauge(
    "sagaline_inbox_lag_records",
    "Inbox records of an owned partition not processed yet: the partition's high watermark "
    "minus the offset the orchestrator last committed (transaction markers and records of "
    "open or aborted transactions after it count too).",
    ["partition"],
)
PARTITIONS_OWNED = Gauge(
    "sagaline_partitions_owned",
    "Inbox partitions this orchestrator has restored and processes (not those still "
    "being restored).",
)
INBOX_PARTITIONS = Gauge(
    "sagaline_inbox_partitions",
    "Partitions of the inbox topic: each needs exactly one orchestrator owning it.",
)

# --- participants -------------------------------------------------------------------
ACTIVITY_SECONDS = Histogram(
    "sagaline_activity_duration_seconds",
    "Handler run time, including its database transaction.",
    ["activity", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
ACTIVITY_ATTEMPTS = Counter(
    "sagaline_activity_attempts_total",
    "Activity tasks handled by participants.",
    ["activity", "outcome"],
)
ACTIVITY_DUPLICATES = Counter(
    "sagaline_activity_duplicates_total",
    "Redelivered tasks answered from the idempotency inbox.",
    ["activity"],
)
ACTIVITY_TIMEOUTS = Counter(
    "sagaline_activity_timeouts_total",
    "Attempts that reached their deadline (timeout: StartToCloseTimeout or "
    "ScheduleToCloseTimeout); action: cancelled (an async handler cut off), not_run (the "
    "deadline had passed when the task was picked up), late (a sync handler that finished "
    "after it; its outcome is kept).",
    ["activity", "timeout", "action"],
)
ACTIVITY_HEARTBEATS = Counter(
    "sagaline_activity_heartbeats_total",
    "Heartbeats participants published to the inbox (after throttling).",
    ["activity"],
)
PARTICIPANT_IN_FLIGHT = Gauge(
    "sagaline_participant_tasks_in_flight",
    "Tasks taken from Kafka and not answered yet: queued, running, or waiting for their "
    "result's acknowledgement (bounded by SAGALINE_MAX_IN_FLIGHT).",
    ["participant"],
)
PARTICIPANT_WORKERS_ABANDONED = Counter(
    "sagaline_participant_workers_abandoned_total",
    "Worker threads written off because their task ran past its deadline; each is replaced "
    "by a new thread while fewer than SAGALINE_CONCURRENCY are written off.",
    ["participant"],
)

# --- Celery workers (participants.celery) -------------------------------------------
CELERY_OUTCOMES = Counter(
    "sagaline_celery_outcomes_published_total",
    "Outcomes of workflow steps Celery workers ran, delivered to the workflows' inbox "
    "(counted on Kafka's delivery report); status: completed or failed. Redeliveries "
    "answered from the idempotency table count in sagaline_activity_duplicates_total "
    "(activity celery.<task>).",
    ["task", "status"],
)
CELERY_OUTCOMES_LOST = Counter(
    "sagaline_celery_outcome_publish_failures_total",
    "Outcomes a Celery worker could not deliver to Kafka within its timeout; the step "
    "waits for its own timeout and is retried.",
    ["task"],
)


# --- projector (sagaline projector) ---------------------------------------------------
PROJECTOR_LAG = Gauge(
    "sagaline_projector_lag_records",
    "History records on a partition the projector has not applied yet (high watermark "
    "minus its position; includes transaction markers).",
    ["partition"],
)
PROJECTOR_APPLIED = Counter(
    "sagaline_projector_records_total",
    "History records the projector applied to PostgreSQL, by kind (workflow, tombstone, "
    "skipped: held inputs and records it cannot read).",
    ["kind"],
)
PROJECTOR_LAST_APPLIED = Gauge(
    "sagaline_projector_last_applied_timestamp_seconds",
    "When the projector last committed a batch to PostgreSQL (Unix time).",
)
PROJECTOR_APPLY_FAILURES = Counter(
    "sagaline_projector_apply_failures_total",
    "Batches PostgreSQL could not take (unreachable, timed out); each is retried with "
    "backoff and nothing is committed to Kafka meanwhile.",
)
PROJECTOR_UNREADABLE = Counter(
    "sagaline_projector_unreadable_records_total",
    "History records the projector could not decode (a newer schema, garbage); skipped and logged.",
)


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread; port 0 disables it.

    Returns the port served, or 0 when disabled.

    Raises:
        ConfigurationError: the port cannot be bound (in use: two processes on one host
            with the default, or a host name that does not resolve here).
    """
    if port == 0:
        return 0
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve /metrics on {host}:{port} ({exc.strerror or exc}): set "
            "SAGALINE_METRICS_PORT to a free port (0 disables it), or SAGALINE_METRICS_HOST "
            "to an address of this host"
        ) from exc
    return port
