"""Participants against the real PostgreSQL and Kafka: the idempotency inbox and the runtime."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, cast

import psycopg
import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client import REGISTRY

from examples.order_saga import services
from orchestrator.admin import ensure_topics
from orchestrator.protocol import (
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    AvroCodec,
    Failure,
    Topics,
    activity_id,
    decode_json,
    encode_json,
)
from orchestrator.settings import ParticipantSettings
from participants import ActivityContext, ActivityFailure, Participant
from participants.idempotency import Execution, ensure_schema, execute_task, find_outcome
from participants.participant import Outcome
from participants.runtime import ResultDeliveryError, run_participant

pytestmark = pytest.mark.integration
DEADLINE_S = 60.0


class Refused(ActivityFailure):
    retryable = False


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _task(
    participant: str, activity: str, value: Any, *, workflow_id: str, seq: int = 1, attempt: int = 1
) -> ActivityTask:
    return ActivityTask(
        workflow_id=workflow_id,
        workflow_type="order.process",
        activity_id=activity_id(workflow_id, seq, attempt),
        seq=seq,
        attempt=attempt,
        participant=participant,
        activity=activity,
        payload=encode_json(value),
        scheduled_at_ms=int(time.time() * 1000),
    )


def _scalar(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
        assert row is not None
        return row[0]


# --- (a) the idempotency inbox ------------------------------------------------------


class Ledger:
    """A participant whose handlers count their calls and write one row each."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.calls: Counter[str] = Counter()
        self.in_handler = threading.Event()
        self.participant = Participant(
            "ledger",
            setup_sql="""
            CREATE TABLE IF NOT EXISTS ledger_entries (
                entry_id bigserial PRIMARY KEY,
                activity_id text NOT NULL,
                amount int NOT NULL)""",
        )
        self.participant.activity("post")(self.post)
        self.participant.activity("refuse")(self.refuse)
        self.participant.activity("flaky")(self.flaky)
        self.participant.activity("post_when_contended")(self.post_when_contended)
        self.participant.activity("post_racing")(self.post_racing)
        self.participant.activity("swallow")(self.swallow)
        with psycopg.connect(dsn, autocommit=True) as conn:
            ensure_schema(conn, self.participant)

    def _write(self, value: Any, ctx: ActivityContext) -> dict[str, Any]:
        self.calls[ctx.activity] += 1
        row = ctx.db.execute(
            "INSERT INTO ledger_entries (activity_id, amount) VALUES (%s, %s) RETURNING entry_id",
            (ctx.activity_id, value["amount"]),
        ).fetchone()
        assert row is not None
        return {"entry_id": row[0]}

    def post(self, value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
        return self._write(value, ctx)

    def refuse(self, value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
        self._write(value, ctx)
        raise Refused(f"amount {value['amount']} refused")

    def flaky(self, value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
        self._write(value, ctx)
        raise ConnectionResetError("upstream reset the connection")

    def swallow(self, value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
        """Write, then hide a database error from the inbox (a handler bug)."""
        result = self._write(value, ctx)
        with suppress(psycopg.errors.DivisionByZero):
            ctx.db.execute("SELECT 1 / 0")
        return result

    def post_when_contended(self, value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
        """Write, then hold the transaction until another session waits for the same task."""
        result = self._write(value, ctx)
        _wait_until(
            lambda: (
                _scalar(
                    self.dsn,
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                )
                > 0
            ),
            "the duplicate delivery to wait for the first one",
            timeout=15,
        )
        return result

    def post_racing(self, value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
        """Write, while a writer that ignores the lock stores this attempt's outcome first."""
        result = self._write(value, ctx)
        with psycopg.connect(self.dsn, autocommit=True) as other:
            other.execute(
                "INSERT INTO sagaline_activity_results (participant, activity_id, status, result) "
                "VALUES ('ledger', %s, 'COMPLETED', %s)",
                (ctx.activity_id, b'{"entry_id":"from-the-other-writer"}'),
            )
        return result

    def rows(self, task: ActivityTask) -> int:
        return int(
            _scalar(
                self.dsn,
                "SELECT count(*) FROM ledger_entries WHERE activity_id = %s",
                (task.activity_id,),
            )
        )

    def execute(self, task: ActivityTask) -> Execution:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return execute_task(conn, self.participant, task)

    def stored(self, task: ActivityTask) -> Outcome | None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return find_outcome(conn, "ledger", task.activity_id)


@pytest.fixture
def ledger(postgres_dsn: str) -> Ledger:
    return Ledger(postgres_dsn)


def _duplicates(activity: str) -> float:
    return (
        REGISTRY.get_sample_value("sagaline_activity_duplicates_total", {"activity": activity})
        or 0.0
    )


def test_a_redelivered_task_returns_the_stored_result_and_changes_nothing(ledger: Ledger) -> None:
    task = _task("ledger", "post", {"amount": 7}, workflow_id=f"wf-{uuid.uuid4()}")
    before = _duplicates("ledger.post")
    first = ledger.execute(task)
    second = ledger.execute(task)
    assert not first.duplicate and second.duplicate
    assert first.outcome.is_completed, first
    assert second.outcome == first.outcome  # same result, same finish time
    assert ledger.stored(task) == first.outcome
    assert ledger.rows(task) == 1 and ledger.calls["post"] == 1
    assert _duplicates("ledger.post") == before + 1
    # Another attempt of the same step is a different activity id: it runs.
    retry = _task("ledger", "post", {"amount": 7}, workflow_id=task.workflow_id, attempt=2)
    assert not ledger.execute(retry).duplicate and ledger.rows(retry) == 1


def test_concurrent_duplicates_run_the_handler_once(ledger: Ledger) -> None:
    task = _task("ledger", "post_when_contended", {"amount": 3}, workflow_id=f"wf-{uuid.uuid4()}")
    start = threading.Barrier(2)
    executions: list[Execution] = []
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            start.wait(timeout=10)
            executions.append(ledger.execute(task))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DEADLINE_S)
    assert not errors, errors
    assert len(executions) == 2
    assert sorted(e.duplicate for e in executions) == [False, True]
    assert executions[0].outcome == executions[1].outcome
    assert ledger.rows(task) == 1 and ledger.calls["post_when_contended"] == 1


def test_a_duplicate_that_commits_first_rolls_back_the_business_write(ledger: Ledger) -> None:
    task = _task("ledger", "post_racing", {"amount": 5}, workflow_id=f"wf-{uuid.uuid4()}")
    execution = ledger.execute(task)
    assert execution.duplicate
    assert execution.outcome.result is not None
    assert decode_json(execution.outcome.result) == {"entry_id": "from-the-other-writer"}
    assert ledger.rows(task) == 0  # our handler's write did not survive


def test_a_final_failure_is_stored_and_returned_without_running_again(ledger: Ledger) -> None:
    task = _task("ledger", "refuse", {"amount": 9}, workflow_id=f"wf-{uuid.uuid4()}")
    first = ledger.execute(task)
    second = ledger.execute(task)
    assert first.outcome.failure == Failure("Refused", "amount 9 refused", False)
    assert (first.duplicate, second.duplicate) == (False, True)
    assert second.outcome == first.outcome
    assert ledger.stored(task) == first.outcome
    assert ledger.calls["refuse"] == 1
    assert ledger.rows(task) == 0  # the write before the raise was rolled back


def test_a_retryable_failure_is_stored_so_an_attempt_keeps_one_outcome(ledger: Ledger) -> None:
    task = _task("ledger", "flaky", {"amount": 1}, workflow_id=f"wf-{uuid.uuid4()}")
    first, again = (ledger.execute(task) for _ in range(2))
    assert not first.duplicate and again.duplicate
    for execution in (first, again):
        assert execution.outcome.failure is not None
        assert execution.outcome.failure.error_type == "ConnectionResetError"
        assert execution.outcome.retryable
    # The redelivery did not run the handler again, so it cannot succeed where the
    # orchestrator already saw this attempt fail and scheduled the next one.
    assert ledger.calls["flaky"] == 1
    assert ledger.stored(task) == first.outcome
    assert ledger.rows(task) == 0


def test_a_handler_that_hides_an_aborted_transaction_fails_retryably(ledger: Ledger) -> None:
    task = _task("ledger", "swallow", {"amount": 2}, workflow_id=f"wf-{uuid.uuid4()}")
    execution = ledger.execute(task)
    assert execution.outcome.failure is not None
    assert execution.outcome.failure.error_type == "AbortedTransaction"
    assert execution.outcome.retryable
    assert ledger.stored(task) == execution.outcome and ledger.rows(task) == 0


def test_schema_setup_is_idempotent_under_concurrency(postgres_dsn: str) -> None:
    errors: list[BaseException] = []

    def setup() -> None:
        try:
            with psycopg.connect(postgres_dsn, autocommit=True) as conn:
                for participant in (services.inventory, services.payment, services.shipping):
                    ensure_schema(conn, participant)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=setup) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DEADLINE_S)
    assert not errors, errors


# --- the example services on a real database -----------------------------------------


class Services:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.workflow_id = f"order-{uuid.uuid4()}"
        self.seq = 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            for participant in (services.inventory, services.payment, services.shipping):
                ensure_schema(conn, participant)

    def run(self, participant: Participant, activity: str, value: Any) -> Outcome:
        self.seq += 1
        task = _task(participant.name, activity, value, workflow_id=self.workflow_id, seq=self.seq)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return execute_task(conn, participant, task).outcome

    def stock(self, sku: str) -> int:
        return int(
            _scalar(self.dsn, "SELECT available FROM inventory_stock WHERE sku = %s", (sku,))
        )


def _value(outcome: Outcome) -> Any:
    assert outcome.result is not None, outcome
    return decode_json(outcome.result)


def test_inventory_reserves_releases_once_and_refuses_short_stock(postgres_dsn: str) -> None:
    svc = Services(postgres_dsn)
    items = [{"sku": "apple", "qty": 2}, {"sku": "pear", "qty": 1}, {"sku": "apple", "qty": 1}]
    reservation = _value(
        svc.run(services.inventory, "reserve", {"order_id": "o-1", "items": items})
    )
    assert reservation["order_id"] == "o-1"
    full = services.DEFAULT_STOCK
    assert (svc.stock("apple"), svc.stock("pear")) == (full - 3, full - 1)
    assert _value(svc.run(services.inventory, "release", reservation))["released"] is True
    assert _value(svc.run(services.inventory, "release", reservation))["released"] is False
    assert (svc.stock("apple"), svc.stock("pear")) == (full, full)
    short = svc.run(
        services.inventory,
        "reserve",
        {
            "order_id": "o-2",
            "items": [{"sku": "apple", "qty": 1}, {"sku": "pear", "qty": full + 1}],
        },
    )
    assert short.failure is not None
    assert (short.failure.error_type, short.failure.retryable) == ("OutOfStock", False)
    assert svc.stock("apple") == full  # apple's decrement was rolled back with the failure
    assert (
        _scalar(postgres_dsn, "SELECT count(*) FROM inventory_reservations WHERE order_id = 'o-2'")
        == 0
    )


def test_payment_and_shipping(postgres_dsn: str) -> None:
    svc = Services(postgres_dsn)
    declined = svc.run(
        services.payment, "charge", {"order_id": "o-1", "amount": 100, "card": "declined"}
    )
    assert declined.failure == Failure("PaymentDeclined", "order o-1: card declined", False)
    charge = _value(
        svc.run(services.payment, "charge", {"order_id": "o-1", "amount": 100, "card": "4242"})
    )
    assert _value(svc.run(services.payment, "refund", charge))["refunded"] is True
    assert _value(svc.run(services.payment, "refund", charge))["refunded"] is True
    assert (
        _scalar(
            postgres_dsn, "SELECT status FROM payments WHERE charge_id = %s", (charge["charge_id"],)
        )
        == "refunded"
    )
    missing = svc.run(services.payment, "refund", {"charge_id": "ch-nope"})
    assert missing.failure is not None and missing.failure.error_type == "ChargeNotFound"
    # A saga that gave up on a charge refunds by order: every charge of it, once.
    late = _value(
        svc.run(services.payment, "charge", {"order_id": "o-2", "amount": 50, "card": "4242"})
    )
    by_order = _value(svc.run(services.payment, "refund", {"order_id": "o-2"}))
    assert by_order == {"order_id": "o-2", "refunded": [late["charge_id"]]}
    assert _value(svc.run(services.payment, "refund", {"order_id": "o-2"}))["refunded"] == []
    nothing = _value(svc.run(services.payment, "refund", {"order_id": "o-never-charged"}))
    assert nothing["refunded"] == []
    shipment = _value(
        svc.run(services.shipping, "schedule", {"order_id": "o-1", "address": "1 Main St"})
    )
    assert (
        _scalar(
            postgres_dsn,
            "SELECT order_id FROM shipments WHERE shipment_id = %s",
            (shipment["shipment_id"],),
        )
        == "o-1"
    )


# --- (b) the runtime on Kafka -------------------------------------------------------


@contextmanager
def _running(participant: Participant, settings: ParticipantSettings) -> Iterator[None]:
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            run_participant(participant, settings, stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, name=f"test-participant-{participant.name}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=DEADLINE_S)
    assert not thread.is_alive(), "run_participant did not return after stop was set"
    assert not errors, f"run_participant raised {errors[0]!r}"


def _partitions(bootstrap: str, topic: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "metadata"})
    try:
        return sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    finally:
        consumer.close()


def _read_all(bootstrap: str, topic: str) -> list[Message]:
    """Every record on ``topic`` up to its current end, as a read_committed reader sees them."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    try:
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in _partitions(bootstrap, topic)
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        records: list[Message] = []

        def caught_up() -> bool:
            for msg in consumer.consume(num_messages=500, timeout=0.2):
                assert msg.error() is None, msg.error()
                records.append(msg)
            positions = consumer.position([TopicPartition(topic, p) for p in ends])
            return all(
                ends[tp.partition] == 0 or tp.offset >= ends[tp.partition] for tp in positions
            )

        _wait_until(caught_up, f"reading {topic} to its end")
        return records
    finally:
        consumer.close()


def _wait_committed_to_end(bootstrap: str, group: str, topic: str, what: str) -> None:
    """Wait until ``group`` has committed every partition of ``topic`` up to its end."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    parts = [TopicPartition(topic, p) for p in _partitions(bootstrap, topic)]

    def committed_to_end() -> bool:
        try:
            committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=5)}
            ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=5)[1] for tp in parts}
        except KafkaException as exc:  # a fresh broker's group coordinator may be loading
            if not exc.args[0].retriable() and exc.args[0].code() != KafkaError.NOT_COORDINATOR:
                raise
            return False
        return all(ends[p] == 0 or committed[p] == ends[p] for p in ends)

    try:
        _wait_until(committed_to_end, what)
    finally:
        consumer.close()


def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
        }
    )
    failures: list[str] = []
    for key, value in records:
        producer.produce(
            topic,
            key=key,
            value=value,
            on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
        )
    assert producer.flush(30) == 0 and not failures, failures


def _results(
    bootstrap: str, topics: Topics, codec: AvroCodec
) -> list[tuple[bytes, ActivityResult]]:
    out: list[tuple[bytes, ActivityResult]] = []
    for msg in _read_all(bootstrap, topics.inbox):
        body = codec.decode_inbox(msg.value())
        assert isinstance(body, ActivityResult), body
        assert msg.key() == body.workflow_id.encode()
        out.append((msg.value() or b"", body))
    return out


def test_run_participant_answers_tasks_dedupes_and_dead_letters_garbage(
    kafka_bootstrap: str, admin: AdminClient, topics: Topics, postgres_dsn: str
) -> None:
    codec = AvroCodec()
    run = uuid.uuid4().hex[:8]
    charge = {"amount": 250, "card": "4242"}
    tasks = {
        "ok-1": _task(
            "payment", "charge", {**charge, "order_id": f"{run}-1"}, workflow_id=f"{run}-1"
        ),
        "ok-2": _task(
            "payment", "charge", {**charge, "order_id": f"{run}-2"}, workflow_id=f"{run}-2"
        ),
        "declined": _task(
            "payment",
            "charge",
            {"amount": 5, "card": "declined", "order_id": f"{run}-3"},
            workflow_id=f"{run}-3",
        ),
        "unknown": _task("payment", "teleport", {}, workflow_id=f"{run}-4"),
    }
    encoded = {name: (t.workflow_id.encode(), codec.encode_task(t)) for name, t in tasks.items()}
    _produce(
        kafka_bootstrap,
        topics.tasks("payment"),
        [
            encoded["ok-1"],
            encoded["ok-2"],
            encoded["declined"],
            encoded["unknown"],
            encoded["ok-1"],  # a duplicate delivery of the same task
            (b"bad-key", b"garbage"),
        ],
    )
    settings = ParticipantSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topics.prefix,
        postgres_dsn=postgres_dsn,
        concurrency=4,
        max_batch_records=50,
        metrics_port=0,
    )
    group = f"{topics.prefix}.participant.payment"
    tasks_topic = topics.tasks("payment")
    with _running(services.payment, settings):
        _wait_committed_to_end(
            kafka_bootstrap, group, tasks_topic, "the participant to commit every task offset"
        )

    results = _results(kafka_bootstrap, topics, codec)
    by_activity: dict[str, list[tuple[bytes, ActivityResult]]] = {}
    for raw, result in results:
        by_activity.setdefault(result.activity_id, []).append((raw, result))
    assert sorted(len(v) for v in by_activity.values()) == [1, 1, 1, 2], results
    first, again = by_activity[tasks["ok-1"].activity_id]
    assert first[0] == again[0], "the duplicate delivery must be answered with the same record"
    for name in ("ok-1", "ok-2"):
        (_, result), *_ = by_activity[tasks[name].activity_id]
        assert result.status is ActivityStatus.COMPLETED and result.result is not None
        assert (result.workflow_id, result.seq, result.attempt) == (tasks[name].workflow_id, 1, 1)
        assert decode_json(result.result)["charge_id"].startswith("ch-")
    ((_, declined),) = by_activity[tasks["declined"].activity_id]
    assert declined.failure == Failure("PaymentDeclined", f"order {run}-3: card declined", False)
    ((_, unknown),) = by_activity[tasks["unknown"].activity_id]
    assert unknown.failure is not None
    # Version skew during a deploy: retryable, so the workflow's RetryPolicy decides.
    assert (unknown.failure.error_type, unknown.failure.retryable) == ("UnknownActivity", True)
    rows = dict(_rows_per_order(postgres_dsn, run))
    assert rows == {f"{run}-1": 1, f"{run}-2": 1}, rows

    (letter,) = _read_all(kafka_bootstrap, topics.dlq)
    headers = dict(cast(list[tuple[str, bytes]], letter.headers() or []))
    assert (letter.key(), letter.value()) == (b"bad-key", b"garbage")
    assert headers["sagaline.dlq.reason"] == b"malformed"
    assert headers["sagaline.dlq.source"] == b"participant:payment"
    assert headers["sagaline.dlq.topic"] == tasks_topic.encode()
    assert headers["sagaline.dlq.error"]

    # Crash-like redelivery: rewind the group and run again. Every task is answered from
    # the idempotency inbox with the very same record, and no business row is added.
    parts = [TopicPartition(tasks_topic, p, 0) for p in _partitions(kafka_bootstrap, tasks_topic)]
    _wait_until(
        lambda: _rewound(admin, group, parts),
        "the group to be empty (a closed static member stays until its session expires)",
    )
    with _running(services.payment, settings):
        _wait_committed_to_end(
            kafka_bootstrap,
            group,
            tasks_topic,
            "the restarted participant to commit every task offset",
        )
    replayed = _results(kafka_bootstrap, topics, codec)
    assert len(replayed) == 2 * len(results)
    first_round = Counter(raw for raw, _ in results)
    assert Counter(raw for raw, _ in replayed) == first_round + first_round
    assert dict(_rows_per_order(postgres_dsn, run)) == rows


def _rewound(admin: AdminClient, group: str, parts: list[TopicPartition]) -> bool:
    """Set ``group``'s offsets to ``parts``; False while a member is still registered."""
    (future,) = admin.alter_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, parts)]
    ).values()
    altered = future.result(timeout=30)
    errors = [tp.error for tp in altered.topic_partitions if tp.error is not None]
    if any(e.code() != KafkaError.UNKNOWN_MEMBER_ID for e in errors):
        raise AssertionError(f"rewinding {group} failed: {errors}")
    return not errors


def _rows_per_order(dsn: str, run: str) -> list[tuple[str, int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [
            (order, int(n))
            for order, n in conn.execute(
                "SELECT order_id, count(*) FROM payments WHERE order_id LIKE %s GROUP BY order_id",
                (f"{run}-%",),
            ).fetchall()
        ]


def test_run_participant_reconnects_after_losing_its_database_connections(
    kafka_bootstrap: str, topics: Topics, postgres_dsn: str
) -> None:
    codec = AvroCodec()
    run = uuid.uuid4().hex[:8]
    tasks = [
        _task(
            "shipping",
            "schedule",
            {"order_id": f"{run}-{i}", "address": "1 Main St"},
            workflow_id=f"{run}-{i}",
        )
        for i in range(2)
    ]
    settings = ParticipantSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topics.prefix,
        postgres_dsn=postgres_dsn,
        concurrency=2,
        metrics_port=0,
    )
    group = f"{topics.prefix}.participant.shipping"
    tasks_topic = topics.tasks("shipping")
    with _running(services.shipping, settings):
        _produce(
            kafka_bootstrap,
            tasks_topic,
            [(tasks[0].workflow_id.encode(), codec.encode_task(tasks[0]))],
        )
        _wait_committed_to_end(kafka_bootstrap, group, tasks_topic, "the first task")
        killed = _scalar(
            postgres_dsn,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        assert killed >= 1, "the participant should hold a pooled connection"
        _produce(
            kafka_bootstrap,
            tasks_topic,
            [(tasks[1].workflow_id.encode(), codec.encode_task(tasks[1]))],
        )
        _wait_committed_to_end(kafka_bootstrap, group, tasks_topic, "the second task")
    results = {r.activity_id: r for _, r in _results(kafka_bootstrap, topics, codec)}
    assert sorted(results) == sorted(t.activity_id for t in tasks)
    for result in results.values():
        assert result.status is ActivityStatus.COMPLETED, result.failure
    assert (
        _scalar(
            postgres_dsn, "SELECT count(*) FROM shipments WHERE order_id LIKE %s", (f"{run}-%",)
        )
        == 2
    )


def test_a_result_refused_even_as_a_failure_stops_the_participant_uncommitted(
    kafka_bootstrap: str, admin: AdminClient, postgres_dsn: str
) -> None:
    names = Topics(f"t{uuid.uuid4().hex[:10]}")
    # An inbox that refuses every record batch: the result's delivery fails at the broker.
    created = admin.create_topics(
        [NewTopic(names.inbox, num_partitions=4, config={"max.message.bytes": "16"})]
    )
    created[names.inbox].result(timeout=30)
    ensure_topics(admin, names, partitions=4, participants=["payment"])
    task = _task(
        "payment",
        "charge",
        {"order_id": "o-1", "amount": 1, "card": "4242"},
        workflow_id=f"wf-{uuid.uuid4()}",
    )
    _produce(
        kafka_bootstrap,
        names.tasks("payment"),
        [(task.workflow_id.encode(), AvroCodec().encode_task(task))],
    )
    settings = ParticipantSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=names.prefix,
        postgres_dsn=postgres_dsn,
        metrics_port=0,
    )
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            run_participant(services.payment, settings, threading.Event())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join(timeout=DEADLINE_S)
    assert not thread.is_alive(), "the participant kept running after a failed delivery"
    assert len(errors) == 1 and isinstance(errors[0], ResultDeliveryError), errors
    # The result was refused, then its small substitute too: the error names the cause.
    assert "MSG_SIZE_TOO_LARGE" in str(errors[0]) and task.activity_id in str(errors[0])
    consumer = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": f"{names.prefix}.participant.payment"}
    )
    try:
        parts = [TopicPartition(names.tasks("payment"), p) for p in range(4)]
        assert all(tp.offset == OFFSET_INVALID for tp in consumer.committed(parts, timeout=10))
    finally:
        consumer.close()
    # The attempt is durable in the inbox, so the redelivery will be answered from it.
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        stored = find_outcome(conn, "payment", task.activity_id)
    assert stored is not None and stored.is_completed


def test_a_result_too_large_for_kafka_is_published_as_a_failure(
    kafka_bootstrap: str, admin: AdminClient, topics: Topics, postgres_dsn: str
) -> None:
    ensure_topics(admin, topics, partitions=4, participants=["bulky"])
    codec = AvroCodec()
    bulky = Participant("bulky")

    @bulky.activity("dump")
    def dump(value: Any, *, ctx: ActivityContext) -> dict[str, Any]:
        return {"blob": "z" * value["size"]}

    small = _task("bulky", "dump", {"size": 10}, workflow_id=f"small-{uuid.uuid4()}")
    large = _task("bulky", "dump", {"size": 5_000}, workflow_id=f"large-{uuid.uuid4()}")
    _produce(
        kafka_bootstrap,
        topics.tasks("bulky"),
        [(t.workflow_id.encode(), codec.encode_task(t)) for t in (small, large, large)],
    )
    settings = ParticipantSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topics.prefix,
        postgres_dsn=postgres_dsn,
        max_record_bytes=2_048,
        metrics_port=0,
    )
    with _running(bulky, settings):
        _wait_committed_to_end(
            kafka_bootstrap,
            f"{topics.prefix}.participant.bulky",
            topics.tasks("bulky"),
            "the participant to answer the tasks",
        )
    results: dict[str, list[bytes]] = {}
    for raw, body in _results(kafka_bootstrap, topics, codec):
        results.setdefault(body.workflow_id, []).append(raw)
    answered = codec.decode_inbox(results[small.workflow_id][0])
    assert isinstance(answered, ActivityResult) and answered.status is ActivityStatus.COMPLETED
    # Both deliveries of the large task publish the same, small failure.
    assert len(results[large.workflow_id]) == 2
    assert len(set(results[large.workflow_id])) == 1
    failed = codec.decode_inbox(results[large.workflow_id][0])
    assert isinstance(failed, ActivityResult) and failed.status is ActivityStatus.FAILED
    assert failed.failure is not None and failed.failure.error_type == "ResultTooLarge"
    assert not failed.failure.retryable
    # The handler's writes committed: the workflow must be able to compensate them.
    assert failed.failure.effects_committed
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        stored = find_outcome(conn, "bulky", large.activity_id)
    assert stored is not None and stored.is_completed
