"""Participants fail safe, on the real PostgreSQL and Kafka: no single task stalls or
crashes a participant, and an attempt keeps exactly one outcome whatever goes wrong."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from typing import Any

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql

from orchestrator.admin import ensure_topics
from orchestrator.protocol import (
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    AvroCodec,
    Failure,
    Payload,
    Topics,
    activity_id,
    encode_json,
)
from orchestrator.settings import ParticipantSettings
from participants import ActivityContext, ActivityFailure, Participant
from participants.idempotency import (
    INVALID_ACTIVITY_ID,
    OUTCOME_NOT_STORED,
    Execution,
    InboxUnavailableError,
    ensure_schema,
    execute_task,
    find_outcome,
)
from tests.integration.test_participants import (
    DEADLINE_S,
    _produce,
    _results,
    _running,
    _scalar,
    _wait_committed_to_end,
)

pytestmark = pytest.mark.integration


class Unprocessable(ActivityFailure):
    retryable = False


class Guarded:
    """A participant whose handlers count their calls and write one row each."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.calls: Counter[str] = Counter()
        self.in_handler = threading.Event()
        self.participant = Participant(
            "guarded",
            setup_sql="""
            CREATE TABLE IF NOT EXISTS guarded_rows (
                activity_id text NOT NULL,
                tag int NOT NULL,
                CONSTRAINT guarded_rows_tag_once UNIQUE (tag) DEFERRABLE INITIALLY DEFERRED
            )""",
        )
        for name in (
            "echo",
            "surrogate",
            "slow_then_fail",
            "exits",
            "cancelled",
            "duplicate_tags",
            "commits",
            "rolls_back",
            "serializable",
        ):
            self.participant.activity(name)(getattr(self, name))
        with psycopg.connect(dsn, autocommit=True) as conn:
            ensure_schema(conn, self.participant)

    def _write(self, ctx: ActivityContext, tag: int | None = None) -> None:
        self.calls[ctx.activity] += 1
        ctx.db.execute(
            "INSERT INTO guarded_rows (activity_id, tag) VALUES (%s, %s)",
            (ctx.activity_id, tag if tag is not None else uuid.uuid4().int % 2**31),
        )

    def echo(self, value: Any, *, ctx: ActivityContext) -> Any:
        """Refuse the input, quoting it (JSON '"\\ud800"' decodes to a lone surrogate)."""
        self._write(ctx)
        raise Unprocessable(f"cannot handle {value}")

    def surrogate(self, value: Any, *, ctx: ActivityContext) -> Any:
        self._write(ctx)
        raise ValueError("\ud800")

    def slow_then_fail(self, value: Any, *, ctx: ActivityContext) -> Any:
        self._write(ctx)
        self.in_handler.set()
        time.sleep(0.2)  # the failing attempt holds the task while a duplicate arrives
        raise RuntimeError("gave up after 200 ms")

    def exits(self, value: Any, *, ctx: ActivityContext) -> Any:
        self._write(ctx)
        raise SystemExit(4)

    async def cancelled(self, value: Any, *, ctx: ActivityContext) -> Any:
        self._write(ctx)
        await asyncio.sleep(0)
        raise asyncio.CancelledError

    def duplicate_tags(self, value: Any, *, ctx: ActivityContext) -> Any:
        """Write twice under one tag: the deferred constraint fails only at the end."""
        self._write(ctx, tag=7)
        self._write(ctx, tag=7)
        return {"written": 2}

    def commits(self, value: Any, *, ctx: ActivityContext) -> Any:
        """Ends the inbox's transaction with SQL, which handlers must never do."""
        self._write(ctx)
        ctx.db.execute("COMMIT")
        return "committed behind the inbox's back"

    def rolls_back(self, value: Any, *, ctx: ActivityContext) -> Any:
        self._write(ctx)
        ctx.db.execute("ROLLBACK")
        return "rolled back, then claimed success"

    def serializable(self, value: Any, *, ctx: ActivityContext) -> Any:
        """Changes a session setting that must not leak into the next task."""
        ctx.db.execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        self._write(ctx)
        return "ok"

    def task(
        self, activity: str, payload: Payload | None = None, workflow_id: str = ""
    ) -> ActivityTask:
        wid = workflow_id or f"wf-{uuid.uuid4()}"
        return ActivityTask(
            workflow_id=wid,
            workflow_type="order.process",
            activity_id=activity_id(wid, 1, 1),
            seq=1,
            attempt=1,
            participant="guarded",
            activity=activity,
            payload=payload or encode_json({}),
            scheduled_at_ms=int(time.time() * 1000),
        )

    def execute(self, task: ActivityTask) -> Execution:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return execute_task(conn, self.participant, task)

    def stored(self, task: ActivityTask) -> Any:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return find_outcome(conn, "guarded", task.activity_id)

    def rows(self, task: ActivityTask) -> int:
        return int(
            _scalar(
                self.dsn,
                "SELECT count(*) FROM guarded_rows WHERE activity_id = %s",
                (task.activity_id,),
            )
        )


@pytest.fixture
def guarded(postgres_dsn: str) -> Guarded:
    return Guarded(postgres_dsn)


def _assert_one_outcome(guarded: Guarded, task: ActivityTask, first: Execution) -> None:
    """A redelivery is answered from the inbox, the handler ran once, nothing was kept."""
    again = guarded.execute(task)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.outcome == first.outcome
    assert guarded.stored(task) == first.outcome
    assert guarded.calls[task.activity] == 1
    assert guarded.rows(task) == 0


# --- text PostgreSQL cannot hold -----------------------------------------------------------


@pytest.mark.parametrize(
    ("activity", "payload", "expected"),
    [
        ("surrogate", encode_json({}), Failure("ValueError", "\\ud800", True)),
        (
            "echo",
            Payload(b'"\\ud800"'),
            Failure("Unprocessable", "cannot handle \\ud800", False),
        ),
    ],
    ids=["exception-message", "json-input-echoed"],
)
def test_a_lone_surrogate_in_a_failure_is_stored_escaped_once(
    guarded: Guarded, activity: str, payload: Payload, expected: Failure
) -> None:
    task = guarded.task(activity, payload)
    first = guarded.execute(task)
    assert first.outcome.failure == expected
    _assert_one_outcome(guarded, task, first)


def test_an_activity_id_that_cannot_key_the_inbox_is_refused_without_running(
    guarded: Guarded,
) -> None:
    for workflow_id in ("wf-\x00-nul", "wf-" + "x" * 3_000):
        execution = guarded.execute(guarded.task("surrogate", workflow_id=workflow_id))
        failure = execution.outcome.failure
        assert failure is not None and not execution.duplicate
        assert (failure.error_type, failure.retryable) == (INVALID_ACTIVITY_ID, False)
        failure.message.encode()
    assert guarded.calls["surrogate"] == 0
    assert _scalar(guarded.dsn, "SELECT count(*) FROM sagaline_activity_results") == 0


# --- what a handler raises ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("activity", "error_type"),
    [("exits", "SystemExit"), ("cancelled", "CancelledError")],
    ids=["sync-SystemExit", "async-CancelledError"],
)
def test_a_base_exception_from_a_handler_is_that_attempts_retryable_failure(
    guarded: Guarded, activity: str, error_type: str
) -> None:
    task = guarded.task(activity)
    first = guarded.execute(task)
    assert first.outcome.failure is not None
    assert (first.outcome.failure.error_type, first.outcome.failure.retryable) == (
        error_type,
        True,
    )
    _assert_one_outcome(guarded, task, first)


@pytest.mark.parametrize("isolation", ["", "repeatable read", "serializable"])
def test_a_concurrent_duplicate_of_a_failing_attempt_runs_the_handler_once(
    guarded: Guarded, isolation: str
) -> None:
    """Also when the database defaults to a stricter isolation level, under which a lookup
    would otherwise not see what the lock's previous holder committed."""
    if isolation:
        with psycopg.connect(guarded.dsn, autocommit=True) as conn:
            name = conn.info.dbname
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = {}").format(
                    sql.Identifier(name), sql.Literal(isolation)
                )
            )
    task = guarded.task("slow_then_fail")
    executions: list[Execution] = []
    errors: list[BaseException] = []

    def deliver(after_first_started: bool) -> None:
        try:
            if after_first_started:
                # Arrive while the first delivery is inside its 200 ms handler.
                assert guarded.in_handler.wait(timeout=DEADLINE_S)
            executions.append(guarded.execute(task))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(later,)) for later in (False, True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DEADLINE_S)
    assert not errors, errors
    assert guarded.calls["slow_then_fail"] == 1, "the waiting duplicate ran the handler again"
    assert sorted(e.duplicate for e in executions) == [False, True]
    assert executions[0].outcome == executions[1].outcome
    assert executions[0].outcome.failure is not None
    assert executions[0].outcome.failure.error_type == "RuntimeError"
    assert guarded.rows(task) == 0


@pytest.mark.parametrize("activity", ["commits", "rolls_back"])
def test_a_handler_that_ends_the_transaction_is_a_final_failure_whose_effects_may_stand(
    guarded: Guarded, activity: str
) -> None:
    task = guarded.task(activity)
    first = guarded.execute(task)
    failure = first.outcome.failure
    assert failure is not None, first
    assert failure.error_type == "TransactionEnded" and not failure.retryable
    assert failure.effects_committed, "the workflow must be told to compensate"
    again = guarded.execute(task)
    assert again.duplicate and again.outcome == first.outcome, "one outcome per attempt"
    assert guarded.calls[activity] == 1


def test_a_handler_s_session_settings_do_not_leak_into_the_next_task(guarded: Guarded) -> None:
    with psycopg.connect(guarded.dsn, autocommit=True) as conn:
        first = execute_task(conn, guarded.participant, guarded.task("serializable"))
        second = execute_task(conn, guarded.participant, guarded.task("serializable"))
        isolation = conn.execute("SHOW transaction_isolation").fetchone()
    assert first.outcome.is_completed and second.outcome.is_completed
    assert isolation is not None and isolation[0] == "serializable", "the handler's own SET"


# --- outcomes PostgreSQL refuses ---------------------------------------------------------


def test_writes_that_break_a_deferred_constraint_become_a_final_stored_failure(
    guarded: Guarded,
) -> None:
    task = guarded.task("duplicate_tags")
    first = guarded.execute(task)
    failure = first.outcome.failure
    assert failure is not None, first
    assert (failure.error_type, failure.retryable) == (OUTCOME_NOT_STORED, False)
    assert "UniqueViolation" in failure.message and "guarded_rows_tag_once" in failure.message
    guarded.calls["duplicate_tags"] -= 1  # it writes twice per call
    _assert_one_outcome(guarded, task, first)


def _refuse_rows(dsn: str, when: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            CREATE FUNCTION refuse_outcome() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF {when} THEN
                    RAISE EXCEPTION 'outcome % refused by policy', NEW.activity_id;
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_outcome BEFORE INSERT ON sagaline_activity_results
                FOR EACH ROW EXECUTE FUNCTION refuse_outcome();
            """
        )


def test_an_outcome_row_postgres_refuses_becomes_a_final_failure_under_the_same_lock(
    guarded: Guarded,
) -> None:
    _refuse_rows(guarded.dsn, "NEW.status = 'COMPLETED'")
    guarded.participant.activity("fine")(lambda value, *, ctx: {"ok": True})
    task = guarded.task("fine")
    first = guarded.execute(task)
    assert first.outcome.failure is not None, first
    assert first.outcome.failure.error_type == OUTCOME_NOT_STORED
    assert not first.outcome.failure.retryable
    assert "refused by policy" in first.outcome.failure.message
    again = guarded.execute(task)
    assert again.duplicate and again.outcome == first.outcome


def test_an_inbox_that_refuses_every_row_is_reported_not_retried(guarded: Guarded) -> None:
    _refuse_rows(guarded.dsn, "true")
    task = guarded.task("surrogate")
    with pytest.raises(InboxUnavailableError, match="sagaline_activity_results"):
        guarded.execute(task)
    assert guarded.calls["surrogate"] == 1
    assert guarded.rows(task) == 0


# --- the runtime keeps polling ------------------------------------------------------------


def test_poison_text_is_answered_and_the_participant_keeps_polling(
    kafka_bootstrap: str, admin: AdminClient, topics: Topics, guarded: Guarded
) -> None:
    ensure_topics(admin, topics, partitions=4, participants=["guarded"])
    codec = AvroCodec()
    guarded.participant.activity("fine")(lambda value, *, ctx: {"ok": value})
    tasks = [
        guarded.task("echo", Payload(b'"\\ud800"')),
        guarded.task("surrogate"),
        guarded.task("fine", encode_json(1)),
    ]
    settings = ParticipantSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topics.prefix,
        postgres_dsn=guarded.dsn,
        metrics_port=0,
    )
    with _running(guarded.participant, settings):
        _produce(
            kafka_bootstrap,
            topics.tasks("guarded"),
            [(t.workflow_id.encode(), codec.encode_task(t)) for t in tasks],
        )
        _wait_committed_to_end(
            kafka_bootstrap,
            f"{topics.prefix}.participant.guarded",
            topics.tasks("guarded"),
            "the participant to answer every task, poison text included",
        )
    answered = {r.activity_id: r for _, r in _results(kafka_bootstrap, topics, codec)}
    assert sorted(answered) == sorted(t.activity_id for t in tasks)
    echo, surrogate, fine = (answered[t.activity_id] for t in tasks)
    assert echo.failure == Failure("Unprocessable", "cannot handle \\ud800", False)
    assert surrogate.failure == Failure("ValueError", "\\ud800", True)
    assert fine.status is ActivityStatus.COMPLETED
    assert guarded.calls == Counter({"echo": 1, "surrogate": 1})


def test_a_result_the_broker_refuses_is_answered_by_a_small_failure(
    kafka_bootstrap: str, admin: AdminClient, postgres_dsn: str
) -> None:
    names = Topics(f"t{uuid.uuid4().hex[:10]}")
    # The topic takes less than the participant's own limit allows.
    created = admin.create_topics(
        [NewTopic(names.inbox, num_partitions=4, config={"max.message.bytes": "1500"})]
    )
    created[names.inbox].result(timeout=30)
    ensure_topics(admin, names, partitions=4, participants=["bulky"])
    bulky = Participant("bulky")
    bulky.activity("dump")(lambda value, *, ctx: {"blob": "z" * 5_000})
    wid = f"wf-{uuid.uuid4()}"
    task = ActivityTask(
        workflow_id=wid,
        workflow_type="order.process",
        activity_id=activity_id(wid, 1, 1),
        seq=1,
        attempt=1,
        participant="bulky",
        activity="dump",
        payload=encode_json({}),
        scheduled_at_ms=int(time.time() * 1000),
    )
    codec = AvroCodec()
    _produce(kafka_bootstrap, names.tasks("bulky"), [(wid.encode(), codec.encode_task(task))])
    settings = ParticipantSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=names.prefix,
        postgres_dsn=postgres_dsn,
        metrics_port=0,
    )
    with _running(bulky, settings):
        _wait_committed_to_end(
            kafka_bootstrap,
            f"{names.prefix}.participant.bulky",
            names.tasks("bulky"),
            "the participant to answer the task with a substitute",
        )
    ((_, result),) = _results(kafka_bootstrap, names, codec)
    assert isinstance(result, ActivityResult) and result.status is ActivityStatus.FAILED
    assert result.failure is not None
    assert (
        result.failure.error_type,
        result.failure.retryable,
        result.failure.effects_committed,
    ) == ("ResultRejected", False, True)
    assert "MSG_SIZE_TOO_LARGE" in result.failure.message
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        stored = find_outcome(conn, "bulky", task.activity_id)
    assert stored is not None and stored.is_completed
