"""Durable time end to end on the real broker: timers across kill -9 and a partition move,
activity timeouts with retries and compensation, heartbeats, backoff in the history."""

from __future__ import annotations

from confluent_kafka.admin import AdminClient

from examples.order_saga.harness import SagalineProcess, make_orders
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    AttemptStarted,
    TimerFired,
    TimerStarted,
    WorkflowRecord,
    WorkflowStatus,
)
from tests.integration.pipeline import Saga
from tests.integration.test_hardening import (
    client_for,
    create_topic,
    ids_on,
    status_of,
    wait_until,
)

APP = "tests.integration.timed:registry"


def start_slow(saga: Saga, instance: str = "slow-1") -> SagalineProcess:
    """The ``slow`` participant of tests/integration/timed.py."""
    process = SagalineProcess(
        f"participant-slow-{instance}",
        ["participant", "tests.integration.timed:slow"],
        {**saga.env, "SAGALINE_INSTANCE_ID": instance, "SAGALINE_SESSION_TIMEOUT_MS": "6000"},
        saga.log_dir / f"participant-slow-{instance}.log",
    ).start()
    saga.processes.append(process)
    return process


def closed(saga: Saga, wid: str) -> WorkflowRecord:
    record = saga.watcher.latest[wid]
    assert record.status.terminal, record
    return record


def attempts(record: WorkflowRecord, seq: int) -> list[ActivityScheduled]:
    return [e for e in record.events if isinstance(e, ActivityScheduled) and e.seq == seq]


def failures(record: WorkflowRecord, seq: int) -> list[ActivityFailed]:
    return [e for e in record.events if isinstance(e, ActivityFailed) and e.seq == seq]


def test_a_sleep_survives_kill_9_and_a_partition_move_and_fires_once(
    saga: Saga, admin: AdminClient
) -> None:
    create_topic(admin, saga.topics.tasks("slow"))
    start_slow(saga)
    first = saga.orchestrator("a", app=APP)
    wids = [w for p in range(4) for w in ids_on(p, "sleeper", 3)]
    client = client_for(saga)
    for wid in wids:
        client.start("timed.sleeper", {"seconds": 8}, workflow_id=wid)
    client.flush()

    def all_sleeping() -> bool:
        return all(
            (r := saga.watcher.latest.get(w)) is not None
            and any(isinstance(e, TimerStarted) for e in r.events)
            for w in wids
        )

    wait_until(saga, all_sleeping, "every workflow to start its timer", 60)
    first.kill9()  # kill -9: the timers live only in the records on the history topic
    saga.processes.remove(first)
    saga.orchestrator("b", app=APP)  # another instance: every partition moves to it
    wait_until(
        saga,
        lambda: all(status_of(saga, w) is WorkflowStatus.COMPLETED for w in wids),
        "every sleeper to wake and complete",
        120,
    )
    for wid in wids:
        record = closed(saga, wid)
        timers = [e for e in record.events if isinstance(e, TimerStarted)]
        fired = [e for e in record.events if isinstance(e, TimerFired)]
        assert len(timers) == 1 and len(fired) == 1, record.events
        assert fired[0].seq == timers[0].seq
        assert fired[0].at_ms >= timers[0].fire_at_ms, "a timer never fires early"
        assert timers[0].fire_at_ms - timers[0].at_ms == 8_000
        # The step after the sleep ran once: one attempt, one outcome.
        assert [e.attempt for e in attempts(record, fired[0].seq + 1)] == [1]
        assert record.wake_at_ms is None
        revisions = saga.watcher.revisions[wid]
        assert revisions == sorted(set(revisions))


def test_a_hung_handler_times_out_is_retried_then_the_saga_compensates(
    saga: Saga, admin: AdminClient
) -> None:
    create_topic(admin, saga.topics.tasks("slow"))
    saga.orchestrator("solo", app=APP)
    saga.start_participants()
    start_slow(saga)
    order = make_orders(1, declined_every=0, run_id="hung")[0]
    wid = order["order_id"]
    quick = [f"quick-{i}" for i in range(10)]
    client = client_for(saga)
    client.start("timed.hung_saga", order, workflow_id=wid)
    client.flush()
    # While both attempts hang, the slow participant keeps answering other tasks.
    wait_until(
        saga,
        lambda: (
            any(isinstance(e, AttemptStarted) for e in saga.watcher.latest[wid].events)
            if wid in saga.watcher.latest
            else False
        ),
        "the hanging attempt to report its start",
        60,
    )
    for i, qid in enumerate(quick):
        client.start("timed.quick", {"n": i}, workflow_id=qid)
    client.flush()
    wait_until(
        saga,
        lambda: all(status_of(saga, q) is WorkflowStatus.COMPLETED for q in quick),
        "quick steps on the participant whose other handler hangs",
        60,
    )
    assert status_of(saga, wid) is WorkflowStatus.RUNNING, "quick ones finish first"
    wait_until(
        saga,
        lambda: status_of(saga, wid) is WorkflowStatus.COMPENSATED,
        "the hung step to time out twice and the reservation to be released",
        90,
    )
    record = closed(saga, wid)
    hang_seq = next(
        e.seq for e in record.events if isinstance(e, ActivityScheduled) and e.name == "slow.hang"
    )
    tries = attempts(record, hang_seq)
    fails = failures(record, hang_seq)
    assert [a.attempt for a in tries] == [1, 2]
    assert [f.failure.error_type for f in fails] == ["StartToCloseTimeout"] * 2
    assert fails[0].retry_at_ms is not None and fails[1].retry_at_ms is None
    assert tries[1].backoff_ms == 500 and tries[1].at_ms >= fails[0].at_ms + 500
    started = {
        e.attempt: e.at_ms
        for e in record.events
        if isinstance(e, AttemptStarted) and e.seq == hang_seq
    }
    assert set(started) == {1, 2}
    for attempt, fail in zip(tries, fails, strict=True):
        # Start-to-close counts from the reported start, not from the scheduling.
        assert fail.at_ms >= started[attempt.attempt] + 2_000
    release = [
        e
        for e in record.events
        if isinstance(e, ActivityScheduled) and e.name == "inventory.release"
    ]
    assert len(release) == 1 and release[0].compensation
    assert any(isinstance(e, ActivityCompleted) and e.seq == release[0].seq for e in record.events)


def test_a_heartbeat_timeout_retries_and_the_next_attempt_resumes_from_the_details(
    saga: Saga, admin: AdminClient
) -> None:
    create_topic(admin, saga.topics.tasks("slow"))
    saga.orchestrator("solo", app=APP)
    start_slow(saga)
    client = client_for(saga)
    client.start("timed.resumable", {"job": 7}, workflow_id="resumable-1")
    client.flush()
    wait_until(
        saga,
        lambda: status_of(saga, "resumable-1") is WorkflowStatus.COMPLETED,
        "the heartbeat timeout and the resumed attempt",
        90,
    )
    record = closed(saga, "resumable-1")
    fails = failures(record, 0)
    assert [f.failure.error_type for f in fails] == ["HeartbeatTimeout"]
    assert record.result is not None
    result = decode_json(record.result)
    assert result["attempt"] == 2
    assert result["resumed_from"]["done"] >= 2, "the last heartbeat's details reached attempt 2"


def test_backoff_and_retry_after_are_visible_in_the_history(saga: Saga, admin: AdminClient) -> None:
    create_topic(admin, saga.topics.tasks("slow"))
    saga.orchestrator("solo", app=APP)
    start_slow(saga)
    client = client_for(saga)
    client.start("timed.flaky", {}, workflow_id="flaky-1")
    client.start("timed.rate_limited", {}, workflow_id="limited-1")
    client.flush()
    wait_until(
        saga,
        lambda: all(
            status_of(saga, w) is WorkflowStatus.COMPLETED for w in ("flaky-1", "limited-1")
        ),
        "both retried steps to complete",
        90,
    )
    record = closed(saga, "flaky-1")
    tries, fails = attempts(record, 0), failures(record, 0)
    assert [a.attempt for a in tries] == [1, 2, 3]
    assert [a.backoff_ms for a in tries] == [0, 1_000, 2_000]
    for retry, fail in zip(tries[1:], fails, strict=True):
        assert fail.retry_at_ms == fail.at_ms + retry.backoff_ms
        assert retry.at_ms >= fail.retry_at_ms, "an attempt is never sent before its backoff"
    record = closed(saga, "limited-1")
    tries, fails = attempts(record, 0), failures(record, 0)
    assert fails[0].failure.error_type == "RateLimited"
    assert fails[0].failure.retry_after_ms == 1_500
    assert tries[1].backoff_ms == 1_500, "the participant's retry-after overrides 0.1 s"
