"""The participant pipeline on the real Kafka and PostgreSQL: a hung handler does not stall its
participant, deadlines cut attempts off, start reports and heartbeats reach the inbox."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import REGISTRY

from orchestrator.admin import ensure_topics
from orchestrator.protocol import (
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    AvroCodec,
    Topics,
    activity_id,
    decode_json,
    encode_json,
)
from orchestrator.protocol.records import ActivityHeartbeat, ActivityStarted, InboxBody
from orchestrator.settings import ParticipantSettings
from participants import ActivityContext, Participant
from participants.idempotency import ensure_schema, find_outcome
from tests.integration.test_participants import (
    DEADLINE_S,
    _running,
    _scalar,
    _wait_committed_to_end,
    _wait_until,
)

pytestmark = pytest.mark.integration
NAME = "pipe"
RELEASE_S = 120.0  # a "hung" handler gives up after this, so a failed test cannot hang


class Pipe:
    """A participant whose handlers a test controls: some hang until released."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.calls: Counter[str] = Counter()
        self.release = threading.Event()
        self.hanging = threading.Event()
        self.release_beats = threading.Event()
        self.seen_details: list[Any] = []
        self.participant = Participant(
            NAME,
            setup_sql="""
            CREATE TABLE IF NOT EXISTS pipe_rows (
                activity_id text NOT NULL,
                note text NOT NULL)""",
        )
        for name in ("quick", "hang", "hang_async", "late_sync", "beats"):
            self.participant.activity(name)(getattr(self, name))
        with psycopg.connect(dsn, autocommit=True) as conn:
            ensure_schema(conn, self.participant)

    def _write(self, ctx: ActivityContext, note: str) -> None:
        self.calls[ctx.activity] += 1
        ctx.db.execute(
            "INSERT INTO pipe_rows (activity_id, note) VALUES (%s, %s)", (ctx.activity_id, note)
        )

    def quick(self, value: Any, *, ctx: ActivityContext) -> Any:
        self._write(ctx, "quick")
        return {"n": value}

    def hang(self, value: Any, *, ctx: ActivityContext) -> Any:
        """A sync handler that hangs (no deadline) until the test releases it."""
        self._write(ctx, "hang")
        self.hanging.set()
        self.release.wait(RELEASE_S)
        return "released"

    async def hang_async(self, value: Any, *, ctx: ActivityContext) -> Any:
        self._write(ctx, "hang_async")
        await asyncio.Event().wait()  # never set: only the deadline ends it

    def late_sync(self, value: Any, *, ctx: ActivityContext) -> Any:
        """A sync handler that runs past its deadline, until released."""
        self._write(ctx, "late_sync")
        self.hanging.set()
        self.release.wait(RELEASE_S)
        return {"late": True}

    def beats(self, value: Any, *, ctx: ActivityContext) -> Any:
        self.seen_details.append(ctx.heartbeat_details)
        for n in range(1, 6):
            ctx.heartbeat({"n": n})
        # Wait until the test saw the latest details arrive, sent when the window ended.
        self.release_beats.wait(RELEASE_S)
        return "beaten"

    def rows(self, task: ActivityTask) -> int:
        return int(
            _scalar(
                self.dsn,
                "SELECT count(*) FROM pipe_rows WHERE activity_id = %s",
                (task.activity_id,),
            )
        )

    def stored(self, task: ActivityTask) -> Any:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return find_outcome(conn, NAME, task.activity_id)


@pytest.fixture
def pipe(postgres_dsn: str) -> Iterator[Pipe]:
    made = Pipe(postgres_dsn)
    yield made
    made.release.set()  # a failed test must not leave a handler thread waiting
    made.release_beats.set()


@pytest.fixture
def pipe_topics(admin: AdminClient, topics: Topics) -> Topics:
    ensure_topics(admin, topics, partitions=4, participants=[NAME])
    return topics


def _settings(bootstrap: str, topics: Topics, dsn: str, **extra: Any) -> ParticipantSettings:
    return ParticipantSettings(
        kafka_bootstrap=bootstrap,
        topic_prefix=topics.prefix,
        postgres_dsn=dsn,
        concurrency=4,
        metrics_port=0,
        **extra,
    )


def _task(activity: str, value: Any = None, **fields: Any) -> ActivityTask:
    wid = f"{activity}-{uuid.uuid4().hex[:12]}"
    return ActivityTask(
        workflow_id=wid,
        workflow_type="pipe.test",
        activity_id=activity_id(wid, 1, 1),
        seq=1,
        attempt=1,
        participant=NAME,
        activity=activity,
        payload=encode_json(value),
        scheduled_at_ms=int(time.time() * 1000),
        **fields,
    )


def _produce(bootstrap: str, topic: str, tasks: list[tuple[int, ActivityTask]]) -> None:
    """Each task to the given partition, in order."""
    codec = AvroCodec()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    failures: list[str] = []
    for partition, task in tasks:
        producer.produce(
            topic,
            key=task.workflow_id.encode(),
            value=codec.encode_task(task),
            partition=partition,
            on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
        )
    assert producer.flush(30) == 0 and not failures, failures


class Inbox:
    """Follows the inbox topic from its beginning and decodes everything on it."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.codec = AvroCodec()
        self.records: list[tuple[Message, InboxBody]] = []
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"inbox-reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self.consumer.subscribe([topic])

    def read(self) -> list[InboxBody]:
        for msg in self.consumer.consume(num_messages=500, timeout=0.2):
            assert msg.error() is None, msg.error()
            body = self.codec.decode_inbox(msg.value())
            assert msg.key() == (body.workflow_id or "").encode(), "keyed by workflow"
            self.records.append((msg, body))
        return [body for _, body in self.records]

    def wait_for(self, condition: Callable[[list[InboxBody]], bool], what: str) -> None:
        _wait_until(lambda: condition(self.read()), what)

    def of(self, workflow_id: str) -> list[InboxBody]:
        return [body for body in self.read() if body.workflow_id == workflow_id]

    def result(self, task: ActivityTask) -> ActivityResult:
        (result,) = [b for b in self.of(task.workflow_id) if isinstance(b, ActivityResult)]
        return result

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def inbox(kafka_bootstrap: str, pipe_topics: Topics) -> Iterator[Inbox]:
    reader = Inbox(kafka_bootstrap, pipe_topics.inbox)
    yield reader
    reader.close()


def _committed(bootstrap: str, group: str, topic: str, partitions: int = 4) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
    finally:
        consumer.close()


def _answered(inbox: Inbox, tasks: list[ActivityTask]) -> Callable[[list[InboxBody]], bool]:
    wanted = {t.activity_id for t in tasks}

    def done(bodies: list[InboxBody]) -> bool:
        return wanted <= {b.activity_id for b in bodies if isinstance(b, ActivityResult)}

    return done


def _metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- a hung handler ------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["", "2"], ids=["default-in-flight", "max-in-flight-2"])
def test_a_hung_handler_holds_only_its_partitions_commit(
    kafka_bootstrap: str,
    pipe_topics: Topics,
    pipe: Pipe,
    inbox: Inbox,
    monkeypatch: pytest.MonkeyPatch,
    limit: str,
) -> None:
    if limit:
        monkeypatch.setenv("SAGALINE_MAX_IN_FLIGHT", limit)
    else:
        monkeypatch.delenv("SAGALINE_MAX_IN_FLIGHT", raising=False)
    before = [_task("quick", n) for n in range(3)]
    hung = _task("hang")
    after = [_task("quick", n) for n in range(20)]
    elsewhere = [(p, _task("quick", p * 100 + n)) for p in (0, 2, 3) for n in range(5)]
    _produce(
        kafka_bootstrap,
        pipe_topics.tasks(NAME),
        [(1, t) for t in (*before, hung, *after)] + elsewhere,
    )
    quick = before + after + [t for _, t in elsewhere]
    group = f"{pipe_topics.prefix}.participant.{NAME}"
    topic = pipe_topics.tasks(NAME)
    with _running(pipe.participant, _settings(kafka_bootstrap, pipe_topics, pipe.dsn)):
        # Every task after the hung one, on its partition and the others, is answered.
        inbox.wait_for(_answered(inbox, quick), "every quick task's result")
        assert pipe.hanging.is_set() and not inbox.of(hung.workflow_id)
        # Offsets: partition 1 commits up to the hung task (offset 3), the others to the end.
        _wait_until(
            lambda: _committed(kafka_bootstrap, group, topic) == {0: 5, 1: 3, 2: 5, 3: 5},
            "partition 1 committed up to the hung task and the others to their end",
        )
        time_held = time.monotonic()
        pipe.release.set()
        inbox.wait_for(_answered(inbox, [hung]), "the released task's result")
        _wait_committed_to_end(kafka_bootstrap, group, topic, "every task committed")
    print(f"\nreleased task answered {time.monotonic() - time_held:.2f}s after its release")
    assert inbox.result(hung).status is ActivityStatus.COMPLETED
    assert pipe.calls == Counter({"quick": len(quick), "hang": 1})
    results = [b for b in inbox.read() if isinstance(b, ActivityResult)]
    assert len(results) == len(quick) + 1, "one result per task, nothing else published"
    assert len(inbox.read()) == len(results), "no start report or heartbeat was asked for"


# --- deadlines -----------------------------------------------------------------------------


def test_an_async_handler_past_start_to_close_is_cancelled_and_its_writes_rolled_back(
    kafka_bootstrap: str, pipe_topics: Topics, pipe: Pipe, inbox: Inbox
) -> None:
    cut_off = _task("hang_async", start_to_close_ms=400, report_start=True)
    expired = _task("quick", 1, deadline_ms=int(time.time() * 1000) - 1_000)
    label = {"activity": f"{NAME}.hang_async", "timeout": "StartToCloseTimeout"}
    cancelled_before = _metric("sagaline_activity_timeouts_total", {**label, "action": "cancelled"})
    _produce(kafka_bootstrap, pipe_topics.tasks(NAME), [(0, cut_off), (0, expired)])
    with _running(pipe.participant, _settings(kafka_bootstrap, pipe_topics, pipe.dsn)):
        inbox.wait_for(_answered(inbox, [cut_off, expired]), "both timeouts answered")
        _wait_committed_to_end(
            kafka_bootstrap,
            f"{pipe_topics.prefix}.participant.{NAME}",
            pipe_topics.tasks(NAME),
            "both tasks committed",
        )
    result = inbox.result(cut_off)
    assert result.failure is not None, result
    assert (result.failure.error_type, result.failure.retryable) == ("StartToCloseTimeout", True)
    assert pipe.calls["hang_async"] == 1 and pipe.rows(cut_off) == 0, "its write rolled back"
    stored = pipe.stored(cut_off)
    assert stored is not None and stored.failure == result.failure, "a redelivery gets the same"
    started, answered = inbox.of(cut_off.workflow_id)
    assert isinstance(started, ActivityStarted) and answered == result, "start, then result"
    assert started.activity_id == cut_off.activity_id and started.attempt == 1
    assert started.started_at_ms + 400 <= result.finished_at_ms
    assert (
        _metric("sagaline_activity_timeouts_total", {**label, "action": "cancelled"})
        == cancelled_before + 1
    )

    late = inbox.result(expired)
    assert late.failure is not None
    assert (late.failure.error_type, late.failure.retryable) == ("ScheduleToCloseTimeout", True)
    assert pipe.calls["quick"] == 0, "a task past its deadline is not run"
    assert [type(b) for b in inbox.of(expired.workflow_id)] == [ActivityResult], "no start"


def test_a_sync_handler_past_its_deadline_is_written_off_and_its_writes_rolled_back(
    kafka_bootstrap: str, pipe_topics: Topics, pipe: Pipe, inbox: Inbox
) -> None:
    slow = _task("late_sync", start_to_close_ms=300)
    following = [_task("quick", n) for n in range(8)]  # more than the 4 workers
    abandoned = {"participant": NAME}
    abandoned_before = _metric("sagaline_participant_workers_abandoned_total", abandoned)
    late_label = {
        "activity": f"{NAME}.late_sync",
        "timeout": "StartToCloseTimeout",
        "action": "late",
    }
    late_before = _metric("sagaline_activity_timeouts_total", late_label)
    with _running(pipe.participant, _settings(kafka_bootstrap, pipe_topics, pipe.dsn)):
        _produce(kafka_bootstrap, pipe_topics.tasks(NAME), [(2, slow)])
        assert pipe.hanging.wait(DEADLINE_S)
        _wait_until(
            lambda: (
                _metric("sagaline_participant_workers_abandoned_total", abandoned)
                == abandoned_before + 1
            ),
            "the worker past its deadline to be written off",
        )
        _produce(kafka_bootstrap, pipe_topics.tasks(NAME), [(2, t) for t in following])
        inbox.wait_for(_answered(inbox, following), "the tasks behind it")
        assert not inbox.of(slow.workflow_id)
        pipe.release.set()
        inbox.wait_for(_answered(inbox, [slow]), "the late outcome")
        _wait_committed_to_end(
            kafka_bootstrap,
            f"{pipe_topics.prefix}.participant.{NAME}",
            pipe_topics.tasks(NAME),
            "every task committed once the late one ended",
        )
    # The orchestrator has timed the attempt out and retries it under a new id: the late
    # handler's writes must not stand, and its outcome is the timeout.
    result = inbox.result(slow)
    assert result.status is ActivityStatus.FAILED and result.failure is not None
    assert (result.failure.error_type, result.failure.retryable) == ("StartToCloseTimeout", True)
    assert "rolled back" in result.failure.message
    stored = pipe.stored(slow)
    assert stored is not None and not stored.is_completed, "stored, so a redelivery gets it"
    assert pipe.rows(slow) == 0, "the late handler's writes were rolled back"
    assert _metric("sagaline_activity_timeouts_total", late_label) == late_before + 1


# --- start reports and heartbeats ----------------------------------------------------------


def test_start_reports_and_throttled_heartbeats_reach_the_inbox_before_the_result(
    kafka_bootstrap: str, pipe_topics: Topics, pipe: Pipe, inbox: Inbox
) -> None:
    task = _task(
        "beats",
        heartbeat_timeout_ms=3_000,  # a heartbeat per second at most
        heartbeat_details=encode_json({"n": 0}),
        report_start=True,
    )
    plain = _task("quick", 7)
    beats_label = {"activity": f"{NAME}.beats"}
    beats_before = _metric("sagaline_activity_heartbeats_total", beats_label)

    def details(bodies: list[InboxBody]) -> list[Any]:
        return [
            None if b.details is None else decode_json(b.details)
            for b in bodies
            if isinstance(b, ActivityHeartbeat) and b.workflow_id == task.workflow_id
        ]

    with _running(pipe.participant, _settings(kafka_bootstrap, pipe_topics, pipe.dsn)):
        _produce(kafka_bootstrap, pipe_topics.tasks(NAME), [(3, task), (3, plain)])
        # The first heartbeat goes at once; the latest of the others when the window ends.
        inbox.wait_for(lambda bodies: {"n": 5} in details(bodies), "the latest details")
        pipe.release_beats.set()
        inbox.wait_for(_answered(inbox, [task, plain]), "both results")
    records = inbox.of(task.workflow_id)
    kinds = [type(b).__name__ for b in records]
    assert kinds == ["ActivityStarted", "ActivityHeartbeat", "ActivityHeartbeat", "ActivityResult"]
    assert details(records) == [{"n": 1}, {"n": 5}], "throttled, the latest never lost"
    started = records[0]
    assert isinstance(started, ActivityStarted)
    assert (started.activity_id, started.seq, started.attempt) == (task.activity_id, 1, 1)
    for beat in records[1:3]:
        assert isinstance(beat, ActivityHeartbeat)
        assert (beat.activity_id, beat.attempt) == (task.activity_id, 1)
        assert beat.at_ms >= started.started_at_ms
    assert isinstance(records[3], ActivityResult) and records[3].status is ActivityStatus.COMPLETED
    assert pipe.seen_details == [{"n": 0}], "the previous attempt's details reach the handler"
    assert _metric("sagaline_activity_heartbeats_total", beats_label) == beats_before + 2
    assert [type(b) for b in inbox.of(plain.workflow_id)] == [ActivityResult]
