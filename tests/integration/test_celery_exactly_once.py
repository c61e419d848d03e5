"""``ExactlyOnceTask`` against a real PostgreSQL: what its docstring promises.

A task whose class is ``ExactlyOnceTask`` writes through ``self.db``, a psycopg connection
inside the idempotency inbox's transaction: its writes and its outcome commit together, a
redelivered task (same task id) is answered from the stored outcome and does not run
again, a Celery retry stores nothing, and a call no workflow sent runs in a plain
transaction.

The worker is a real Celery worker (solo pool) embedded in this process on kombu's
in-memory transport, as in tests/unit/test_celery_worker.py: the message put on its queue
is exactly what ``protocol.celery.task_message`` writes for a task the real engine sent,
and ``attach``'s publisher writes to a recording producer instead of Kafka. PostgreSQL is
the real one of infra/stack.sh, a fresh database per test.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.exceptions import Ignore
from celery.signals import task_postrun
from celery.worker import state as worker_state
from kombu.utils import json as kombu_json
from prometheus_client import REGISTRY
from pydantic import SecretStr

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.errors import ConfigurationError
from orchestrator.protocol.celery import task_message
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityStarted,
    ActivityStatus,
    ActivityTask,
)
from orchestrator.settings import CelerySettings
from participants import ActivityFailure
from participants.celery import _STARTS_SQL, CeleryOutcomes, ExactlyOnceTask, attach
from participants.participant import wall_clock_ms
from tests.unit.conftest import WorkflowRun, history_lines
from tests.unit.test_celery_worker import _Recorder

pytestmark = pytest.mark.integration

LEDGER_SQL = """
CREATE TABLE IF NOT EXISTS ledger (
    id bigserial PRIMARY KEY,
    activity_id text NOT NULL,
    note text NOT NULL,
    backend_pid integer NOT NULL
)
"""
INBOX = "sagaline_activity_results"
WAIT_S = 15.0


# --- what the task bodies record -------------------------------------------------------


class Probe:
    """What the task bodies did, shared with the test (reset per test)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str | None]] = []  # (task name, task id) per run
        self.entered = threading.Event()  # a blocking body holds its transaction
        self.release = threading.Event()  # ... until the test lets it go on
        self.never = threading.Event()
        self.pids: list[int] = []
        self.seen: list[tuple[int, int]] = []  # (ledger rows, inbox rows) a retry saw
        self.elsewhere: list[str] = []

    def ran(self, task: Any) -> int:
        """Count a run of ``task``'s body; how many runs its task id has had."""
        with self.lock:
            self.calls.append((task.name, task.request.id))
            return sum(1 for _, tid in self.calls if tid == task.request.id)

    def runs(self, task_id: str | None) -> int:
        with self.lock:
            return sum(1 for _, tid in self.calls if tid == task_id)


PROBE = Probe()


def _write(task: Any, note: str) -> int:
    """One business row through ``self.db``; the backend pid that wrote it."""
    db: psycopg.Connection[Any] = task.db
    pid = db.info.backend_pid
    db.execute(
        "INSERT INTO ledger (activity_id, note, backend_pid) VALUES (%s, %s, %s)",
        (str(task.request.id), note, pid),
    )
    return pid


class CardDeclined(ActivityFailure):
    """A business refusal with a constructor of its own (not the message alone)."""

    def __init__(self, card: str, amount: int) -> None:
        super().__init__(f"card {card} declined for {amount}")


def _record(self: Any, key: str) -> dict[str, Any]:
    PROBE.ran(self)
    _write(self, key)
    return {"key": key, "rows": 1}


def _declined(self: Any, key: str) -> None:
    PROBE.ran(self)
    _write(self, key)
    raise CardDeclined(key, 42)


def _boom(self: Any, key: str) -> None:
    PROBE.ran(self)
    _write(self, key)
    raise ValueError(f"boom {key}")


def _retrying(self: Any, key: str) -> str:
    PROBE.ran(self)
    if self.request.retries == 0:
        _write(self, "first try")
        raise self.retry(countdown=0, max_retries=1)
    db: psycopg.Connection[Any] = self.db
    ledger = db.execute("SELECT count(*) FROM ledger").fetchone()
    inbox = db.execute(f"SELECT count(*) FROM {INBOX}").fetchone()
    assert ledger is not None and inbox is not None
    PROBE.seen.append((int(ledger[0]), int(inbox[0])))
    _write(self, "second try")
    return "second"


def _ignored(self: Any, key: str) -> None:
    PROBE.ran(self)
    _write(self, key)
    raise Ignore()


def _retry_later(self: Any, key: str, countdown: float) -> str:
    PROBE.ran(self)
    if self.request.retries == 0:
        _write(self, f"{key} first try")
        raise self.retry(countdown=countdown, max_retries=1)
    _write(self, f"{key} second try")
    return "second"


def _outer(self: Any, key: str, fail: bool) -> str:
    """A step that calls another exactly-once task directly (a plain function call),
    then writes, then returns or fails."""
    runs = PROBE.ran(self)
    if runs == 1:  # only once, so that a retry loop ends (the test counts the runs)
        self.app.tasks["eo.record"](f"{key} inner")
    _write(self, f"{key} outer")
    if fail:
        raise CardDeclined(key, 7)
    return "outer"


def _savepoint(self: Any, key: str) -> str:
    """A failed inner block rolls back to its savepoint; the rest commits."""
    PROBE.ran(self)
    db: psycopg.Connection[Any] = self.db
    try:
        with db.transaction():
            _write(self, f"{key} inner")
            raise ValueError("inner block fails")
    except ValueError:
        pass
    _write(self, f"{key} outer")
    return "kept"


def _opaque(self: Any, key: str) -> object:
    PROBE.ran(self)
    _write(self, key)
    return object()


def _blocking(self: Any, key: str, touch_db_after: bool) -> dict[str, Any]:
    runs = PROBE.ran(self)
    pid = _write(self, f"{key} run {runs}")
    if runs == 1:
        PROBE.pids.append(pid)
        PROBE.entered.set()
        if not PROBE.release.wait(WAIT_S):
            raise RuntimeError("the test never released the blocked task")
        if touch_db_after:
            self.db.execute("SELECT 1")
    return {"key": key, "runs": runs}


def _late(self: Any, key: str, run_s: float) -> str:
    """Runs ``run_s`` seconds: the scenario (a body outliving its deadline), not a
    synchronisation."""
    PROBE.ran(self)
    _write(self, key)
    until = time.monotonic() + run_s
    while (left := until - time.monotonic()) > 0:
        PROBE.never.wait(left)
    return "late"


def _db_elsewhere(self: Any) -> str:
    """``self.db`` from another thread while this call runs."""
    PROBE.ran(self)
    _write(self, "main thread")
    found: list[str] = []

    def look() -> None:
        try:
            self.db.execute("SELECT 1")
            found.append("no error")
        except RuntimeError as exc:
            found.append(f"RuntimeError: {exc}")

    thread = threading.Thread(target=look)
    thread.start()
    thread.join(WAIT_S)
    PROBE.elsewhere.extend(found)
    return found[0] if found else "the thread did not finish"


TASKS: dict[str, Callable[..., Any]] = {
    "eo.record": _record,
    "eo.declined": _declined,
    "eo.boom": _boom,
    "eo.retrying": _retrying,
    "eo.ignored": _ignored,
    "eo.retry_later": _retry_later,
    "eo.savepoint": _savepoint,
    "eo.outer": _outer,
    "eo.opaque": _opaque,
    "eo.blocking": _blocking,
    "eo.late": _late,
    "eo.db_elsewhere": _db_elsewhere,
}


class _Delivering(_Recorder):
    """The unit tests' recording producer, which also reports each record delivered
    (``CeleryOutcomes`` counts an outcome published on Kafka's delivery report)."""

    def produce(self, topic: str, value: bytes, key: bytes | None = None, **kw: Any) -> None:
        super().produce(topic, value, key)
        report = kw.get("on_delivery")
        if report is not None:
            report(None, None)


# --- the harness ------------------------------------------------------------------------


def _wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@dataclass
class Harness:
    """One attached Celery app with its worker, recorder and database."""

    app: Any
    recorder: _Delivering
    outcomes: CeleryOutcomes
    dsn: str
    queue: str
    finished: list[str] = field(default_factory=list)  # task ids past task_postrun

    def step(
        self,
        task_name: str,
        *args: Any,
        workflow_id: str = "wf-1",
        start_to_close: float | None = None,
    ) -> ActivityTask:
        """The task the real engine sends for ``ctx.celery(task_name, *args)``."""
        _, task = self.workflow(
            task_name, *args, workflow_id=workflow_id, start_to_close=start_to_close
        )
        return task

    def workflow(
        self,
        task_name: str,
        *args: Any,
        workflow_id: str = "wf-1",
        start_to_close: float | None = None,
    ) -> tuple[WorkflowRun, ActivityTask]:
        """A workflow whose one step is ``ctx.celery(task_name, *args)``, driven through
        the real engine (tests/unit/conftest.py), and the task it sent."""
        queue = self.queue

        async def flow(ctx: WorkflowContext, _: Any) -> Any:
            return await ctx.celery(task_name, *args, queue=queue, start_to_close=start_to_close)

        registry = WorkflowRegistry()
        registry.workflow("w")(flow)
        run = WorkflowRun(registry, "w", workflow_id=workflow_id, run_id="r1")
        run.start(None)
        (task,) = run.sent
        return run, task

    def deliver(self, task: ActivityTask) -> None:
        """Put the task's message on the worker's queue, as kombu's Kafka transport hands
        over the record ``task_message`` writes."""
        queue, data = task_message(task)
        assert queue == self.queue
        with self.app.connection() as conn:
            loads: Any = kombu_json.loads  # what kombu's confluentkafka transport does
            envelope: Any = loads(data)
            conn.default_channel._put(queue, envelope)

    def results(self, activity_id: str) -> list[ActivityResult]:
        return [
            b
            for b in self.recorder.bodies()
            if isinstance(b, ActivityResult) and b.activity_id == activity_id
        ]

    def wait_results(self, activity_id: str, count: int) -> list[ActivityResult]:
        _wait_until(
            lambda: len(self.results(activity_id)) >= count,
            f"{count} outcome(s) of {activity_id} (have {len(self.results(activity_id))})",
        )
        return self.results(activity_id)

    def wait_finished(self, task_id: str, count: int = 1) -> None:
        """Until the worker is done with ``count`` runs of ``task_id`` (task_postrun, sent
        after the outcome was published and the transaction ended)."""
        _wait_until(lambda: self.finished.count(task_id) >= count, f"{count} run(s) of {task_id}")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """What another session sees committed."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def ledger(self, activity_id: str | None = None) -> list[str]:
        if activity_id is None:
            return [r[0] for r in self.query("SELECT note FROM ledger ORDER BY id")]
        rows = self.query(
            "SELECT note FROM ledger WHERE activity_id = %s ORDER BY id", (activity_id,)
        )
        return [r[0] for r in rows]

    def inbox(self) -> list[tuple[Any, ...]]:
        """(participant, activity_id, status, error_type, retryable, result) rows."""
        return self.query(
            f"SELECT participant, activity_id, status, error_type, retryable, result "
            f"FROM {INBOX} ORDER BY activity_id"
        )


def _wake() -> None:
    """A plain task that only wakes the worker's loop."""


def _stop_promptly(app: Any) -> None:
    """Ask the embedded worker to stop as ``start_worker`` will, and wake it: its loop
    (kombu's in-memory transport has no async loop) waits up to 2 s for a message between
    looks at the flag, and runs one more such wait after it has seen it."""
    worker_state.should_terminate = 0
    for _ in range(2):
        app.tasks["eo.wake"].delay()


@pytest.fixture
def harness(postgres_dsn: str) -> Iterator[Harness]:
    """A fresh Celery app (``attach``ed to this test's database, its outcomes recorded)
    and a worker (solo pool) on a queue of its own of kombu's in-memory broker."""
    global PROBE  # noqa: PLW0603 - the task bodies are module functions
    PROBE = Probe()
    tag = uuid.uuid4().hex[:10]
    queue = f"eo-{tag}"
    app: Any = Celery(f"eo-{tag}", broker="memory://", set_as_current=False)
    app.conf.task_acks_late = True
    app.conf.worker_hijack_root_logger = False
    app.conf.broker_connection_retry_on_startup = True
    app.conf.task_default_queue = queue
    # The in-memory channel polls its queues once a second by default.
    app.conf.broker_transport_options = {"polling_interval": 0.01}
    recorder = _Delivering()
    settings = CelerySettings(postgres_dsn=SecretStr(postgres_dsn), kafka_bootstrap="127.0.0.1:1")
    outcomes = attach(app, settings, setup_sql=LEDGER_SQL)
    outcomes._producer = recorder  # type: ignore[assignment]
    outcomes._pid = os.getpid()
    for name, fn in TASKS.items():
        app.task(name=name, base=ExactlyOnceTask, bind=True, acks_late=True)(fn)
    app.task(name="eo.wake")(_wake)
    run = Harness(app, recorder, outcomes, postgres_dsn, queue)

    def postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        if sender is not None and getattr(sender, "app", None) is app and task_id:
            run.finished.append(task_id)

    # The integration's sessions are thread-local (the worker's thread, the test's):
    # remember every connection made, to close them before the database is dropped.
    opened: list[psycopg.Connection[Any]] = []
    real_connect = psycopg.connect

    def connect(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        conn = real_connect(*args, **kwargs)
        opened.append(conn)
        return conn

    task_postrun.connect(postrun, weak=False)
    try:
        with (
            pytest.MonkeyPatch.context() as patch,
            start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20),
        ):
            patch.setattr(psycopg, "connect", connect)
            try:
                yield run
            finally:
                PROBE.release.set()  # never leave a body blocking the worker's shutdown
                _stop_promptly(app)
    finally:
        task_postrun.disconnect(postrun)
        for conn in opened:
            conn.close()


def _duplicates(task_name: str) -> float:
    value = REGISTRY.get_sample_value(
        "sagaline_activity_duplicates_total", {"activity": f"celery.{task_name}"}
    )
    return 0.0 if value is None else value


# --- 1. a step commits its writes with its outcome ------------------------------------------


def test_a_step_commits_its_writes_with_its_outcome(harness: Harness) -> None:
    task = harness.step("eo.record", "k1")
    harness.deliver(task)
    (result,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)

    assert result.status is ActivityStatus.COMPLETED, result.failure
    assert result.result is not None
    assert decode_json(result.result) == {"key": "k1", "rows": 1}
    assert (result.workflow_id, result.seq, result.attempt) == (
        task.workflow_id,
        task.seq,
        task.attempt,
    )
    assert harness.ledger(task.activity_id) == ["k1"]
    assert harness.inbox() == [
        ("celery", task.activity_id, "COMPLETED", None, None, result.result.data)
    ]
    assert PROBE.runs(task.activity_id) == 1


def test_a_transaction_block_in_a_step_is_a_savepoint(harness: Harness) -> None:
    """The docstring: ``with self.db.transaction():`` nests a savepoint."""
    task = harness.step("eo.savepoint", "sp")
    harness.deliver(task)
    (result,) = harness.wait_results(task.activity_id, 1)
    assert result.status is ActivityStatus.COMPLETED, result.failure
    assert result.result is not None and decode_json(result.result) == "kept"
    assert harness.ledger() == ["sp outer"]
    assert [row[:3] for row in harness.inbox()] == [("celery", task.activity_id, "COMPLETED")]


# --- 2. a redelivery is answered from the inbox -----------------------------------------------


def test_a_redelivered_step_is_answered_from_the_inbox_without_running(harness: Harness) -> None:
    task = harness.step("eo.record", "k2")
    before = _duplicates("eo.record")
    harness.deliver(task)
    (first,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)

    harness.deliver(task)  # the same message again: the worker died before its ack
    first_again, second = harness.wait_results(task.activity_id, 2)
    harness.wait_finished(task.activity_id, 2)

    assert first_again == first
    assert PROBE.runs(task.activity_id) == 1, "the body ran again for a redelivery"
    assert harness.ledger(task.activity_id) == ["k2"]
    assert len(harness.inbox()) == 1
    assert second.status is first.status is ActivityStatus.COMPLETED
    assert second.result is not None and first.result is not None
    assert second.result.data == first.result.data
    assert (second.result, second.failure) == (first.result, first.failure)
    assert (second.seq, second.attempt) == (first.seq, first.attempt)
    assert _duplicates("eo.record") == before + 1
    assert len(harness.results(task.activity_id)) == 2
    assert harness.outcomes.published == 2


# --- 3. a business failure rolls back and is stored ------------------------------------------


def test_a_business_failure_rolls_back_its_writes_and_is_stored(harness: Harness) -> None:
    task = harness.step("eo.declined", "visa")
    harness.deliver(task)
    (first,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)

    assert first.status is ActivityStatus.FAILED and first.failure is not None
    assert first.failure.error_type == "CardDeclined", first.failure
    assert first.failure.retryable is False
    assert "card visa declined for 42" in first.failure.message
    assert harness.ledger() == [], "the failed task's write was committed"
    assert harness.inbox() == [("celery", task.activity_id, "FAILED", "CardDeclined", False, None)]

    harness.deliver(task)
    _, second = harness.wait_results(task.activity_id, 2)
    harness.wait_finished(task.activity_id, 2)
    assert PROBE.runs(task.activity_id) == 1, "the body ran again for a redelivery"
    assert second.status is ActivityStatus.FAILED
    assert second.failure == first.failure
    assert harness.ledger() == []
    assert len(harness.inbox()) == 1


# --- 4. a Celery retry stores nothing ------------------------------------------------------


def test_a_celery_retry_rolls_back_and_stores_nothing(harness: Harness) -> None:
    task = harness.step("eo.retrying", "r")
    harness.deliver(task)
    (result,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id, 2)  # the run that retried, and the retry

    assert PROBE.runs(task.activity_id) == 2
    # What the retried run saw committed when it began: nothing of the first run.
    assert PROBE.seen == [(0, 0)], "the first run's write or an outcome was committed"
    assert result.status is ActivityStatus.COMPLETED, result.failure
    assert result.result is not None and decode_json(result.result) == "second"
    assert harness.ledger() == ["second try"]
    assert [row[:3] for row in harness.inbox()] == [("celery", task.activity_id, "COMPLETED")]
    assert len(harness.results(task.activity_id)) == 1, "the retry published an outcome"
    assert harness.outcomes.published == 1


def test_ignore_rolls_back_and_stores_nothing(harness: Harness) -> None:
    """Celery's ``Ignore`` (like ``Reject``): the writes roll back, nothing is stored
    and nothing is published (the step waits for its timeout, as without sagaline)."""
    task = harness.step("eo.ignored", "i")
    harness.deliver(task)
    harness.wait_finished(task.activity_id)
    assert PROBE.runs(task.activity_id) == 1
    assert harness.ledger() == []
    assert harness.inbox() == []
    assert harness.results(task.activity_id) == []


# --- 5. calls no workflow sent -------------------------------------------------------------


def test_calls_no_workflow_sent_commit_on_return_and_roll_back_on_raise(
    harness: Harness,
) -> None:
    """``.delay()`` (run by the worker, no sagaline headers), ``.apply()`` and a direct
    call (run in the test's thread, on its own connection): a plain transaction, nothing
    stored in the inbox, nothing published."""
    app = harness.app
    record, boom = app.tasks["eo.record"], app.tasks["eo.boom"]

    # .delay(): run by the worker, with no sagaline headers.
    sent_ok = record.delay("delayed")
    sent_boom = boom.delay("delayed boom")
    harness.wait_finished(sent_ok.id)
    harness.wait_finished(sent_boom.id)
    assert harness.ledger(sent_ok.id) == ["delayed"]
    assert harness.ledger(sent_boom.id) == []
    assert PROBE.runs(sent_boom.id) == 1

    # .apply(): run here, eagerly.
    applied = record.apply(args=("applied",))
    assert applied.successful() and applied.result == {"key": "applied", "rows": 1}
    assert harness.ledger(applied.id) == ["applied"]
    applied_boom = boom.apply(args=("applied boom",))
    assert isinstance(applied_boom.result, ValueError)
    assert harness.ledger(applied_boom.id) == []

    # A direct call.
    assert record("direct") == {"key": "direct", "rows": 1}
    with pytest.raises(ValueError, match="boom direct boom"):
        boom("direct boom")
    assert harness.ledger("None") == ["direct"]  # a direct call has no task id

    assert harness.inbox() == [], "a call no workflow sent stored an outcome"
    assert harness.results(sent_ok.id) == [] and harness.results(sent_boom.id) == []
    assert [b for b in harness.recorder.bodies() if isinstance(b, ActivityResult)] == []


@pytest.mark.parametrize("fail", [False, True], ids=["returns", "fails"])
def test_a_direct_call_inside_a_step_joins_the_steps_transaction(
    harness: Harness, fail: bool
) -> None:
    """A direct call is "a call no workflow sent", which "runs in a plain transaction on
    the same connection" (docs/celery.md): inside a running step, on the same thread, the
    integration hands it its connection for the thread, already inside the step's
    transaction, where ``conn.transaction()`` nests a savepoint. Its write then commits
    or rolls back with the step, and the step runs once.

    Instead ``_Sessions.get`` finds that connection inside a transaction, logs "a
    connection was left inside a transaction; replacing it" and closes it: the step's
    transaction is gone, the inner call commits on its own connection, the step's next
    statement fails ("the connection is closed") and ``run_step`` runs the whole body
    again on a fresh connection. The body here calls the inner task on its first run
    only; one that always does would loop for ever, committing the inner write each
    time. When the step fails, the inner write stays committed."""
    task = harness.step("eo.outer", "o", fail)
    harness.deliver(task)
    (result,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)
    runs = PROBE.runs(task.activity_id)
    if fail:
        assert result.status is ActivityStatus.FAILED and result.failure is not None
        assert result.failure.error_type == "CardDeclined", result.failure
        assert harness.ledger() == [], (
            f"a failed step's inner direct call committed (the body ran {runs} times)"
        )
    else:
        assert result.status is ActivityStatus.COMPLETED, result.failure
        assert harness.ledger() == ["o inner", "o outer"]
    assert runs == 1, f"the step's body ran {runs} times; ledger {harness.ledger()}"
    assert [row[:3] for row in harness.inbox()] == [
        ("celery", task.activity_id, result.status.value)
    ]


# --- 6. a result the converter refuses --------------------------------------------------------


def test_a_result_that_cannot_be_encoded_rolls_back_and_fails_for_good(harness: Harness) -> None:
    task = harness.step("eo.opaque", "o")
    harness.deliver(task)
    (result,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)

    assert result.status is ActivityStatus.FAILED and result.failure is not None
    assert result.failure.error_type == "PayloadEncodingError", result.failure
    assert result.failure.retryable is False
    # Rolled back, so the workflow must not think the step's effects happened.
    assert result.failure.effects_committed is False
    assert harness.ledger() == [], "the write of a task whose result was refused committed"
    assert harness.inbox() == [
        ("celery", task.activity_id, "FAILED", "PayloadEncodingError", False, None)
    ]


# --- 7. misuse ---------------------------------------------------------------------------------


def test_self_db_outside_a_running_call_raises(harness: Harness) -> None:
    record = harness.app.tasks["eo.record"]
    with pytest.raises(RuntimeError, match=r"self\.db is the running task's transaction"):
        _ = record.db
    assert record("before") == {"key": "before", "rows": 1}
    with pytest.raises(RuntimeError, match=r"self\.db"):
        _ = record.db  # after the call returned

    # From another thread while a step runs.
    task = harness.step("eo.db_elsewhere")
    harness.deliver(task)
    (result,) = harness.wait_results(task.activity_id, 1)
    assert result.status is ActivityStatus.COMPLETED, result.failure
    assert PROBE.elsewhere and PROBE.elsewhere[0].startswith("RuntimeError: self.db"), (
        PROBE.elsewhere
    )
    assert harness.ledger(task.activity_id) == ["main thread"]


def test_an_exactly_once_task_on_an_app_without_attach_names_attach() -> None:
    app: Any = Celery("bare", broker="memory://", set_as_current=False)
    task = app.task(name="bare.record", base=ExactlyOnceTask, bind=True)(_record)
    with pytest.raises(ConfigurationError, match=r"attach\(app\)"):
        task("k")
    applied = task.apply(args=("k",))
    assert isinstance(applied.result, ConfigurationError), applied.result
    assert "attach" in str(applied.result)


# --- 8. the connection dies mid-task ------------------------------------------------------------


@pytest.mark.parametrize("touch_db_after", [False, True], ids=["returns", "queries"])
def test_a_connection_killed_mid_task_is_retried_on_a_fresh_one(
    harness: Harness, touch_db_after: bool
) -> None:
    """The body holds its transaction open (waits on an event); another session
    terminates its backend; the body then returns ("returns": the COMMIT fails) or runs a
    statement ("queries": the body itself raises a connection error). Whether anything
    committed is unknown to the worker, so the call runs again on a fresh connection,
    where the inbox's lookup finds nothing and the body runs to its outcome once."""
    task = harness.step("eo.blocking", "kill", touch_db_after)
    harness.deliver(task)
    assert PROBE.entered.wait(WAIT_S), "the task never started"
    (pid,) = PROBE.pids
    (killed,) = harness.query("SELECT pg_terminate_backend(%s, 5000)", (pid,))[0]
    assert killed is True
    PROBE.release.set()

    (result,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)
    assert result.status is ActivityStatus.COMPLETED, result.failure
    assert result.result is not None and decode_json(result.result) == {"key": "kill", "runs": 2}
    assert PROBE.runs(task.activity_id) == 2
    assert harness.ledger(task.activity_id) == ["kill run 2"]
    ((writer,),) = harness.query("SELECT backend_pid FROM ledger")
    assert writer != pid
    assert [row[:3] for row in harness.inbox()] == [("celery", task.activity_id, "COMPLETED")]
    assert len(harness.results(task.activity_id)) == 1
    assert harness.outcomes.published == 1


def _kill_idle_worker_session(harness: Harness) -> int:
    """Run a step, then end the worker's (now idle) PostgreSQL session from another one,
    as a PostgreSQL restart, a failover or ``idle_session_timeout`` would; psycopg
    cannot know until it next talks to the server. Returns the killed backend's pid."""
    task = harness.step("eo.record", "before the kill", workflow_id="wf-before")
    harness.deliver(task)
    harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)
    ((pid,),) = harness.query("SELECT backend_pid FROM ledger")
    ((killed,),) = harness.query("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    assert killed is True
    return int(pid)


def test_a_step_after_the_workers_idle_session_died_runs_once(harness: Harness) -> None:
    killed = _kill_idle_worker_session(harness)
    task = harness.step("eo.record", "after the kill", workflow_id="wf-after")
    harness.deliver(task)
    (result,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)
    assert result.status is ActivityStatus.COMPLETED, result.failure
    assert PROBE.runs(task.activity_id) == 1
    assert harness.ledger(task.activity_id) == ["after the kill"]
    ((writer,),) = harness.query(
        "SELECT backend_pid FROM ledger WHERE activity_id = %s", (task.activity_id,)
    )
    assert writer != killed


def test_a_plain_call_after_the_workers_idle_session_died_runs(harness: Harness) -> None:
    """A ``.delay()`` call is handed the connection the integration keeps for the
    worker's thread without a look at whether it still works: its BEGIN fails with
    AdminShutdown, before the body ran, and the call fails (and is acked: lost), where a
    step on the same dead connection is retried on a fresh one. Nothing had run, so
    nothing forbids running it on a fresh connection."""
    _kill_idle_worker_session(harness)
    sent = harness.app.tasks["eo.record"].delay("plain after the kill")
    harness.wait_finished(sent.id)
    assert PROBE.runs(sent.id) == 1, (
        "a call no workflow sent failed on the dead connection the integration kept, "
        "before its body ran"
    )
    assert harness.ledger(sent.id) == ["plain after the kill"]


# --- 9. a sync task returning past its deadline --------------------------------------------------


def test_a_task_returning_after_its_start_to_close_timeout_rolls_back(harness: Harness) -> None:
    """The solo pool does not enforce the message's hard time limit (the step's
    start-to-close timeout): the body returns after it, when the workflow has timed the
    attempt out and may run another. Its writes must not commit."""
    # The attempt's time counts from the worker's start report: its first connection and
    # schema set-up included, which can take a good part of a second on a loaded machine.
    task = harness.step("eo.late", "slow", 3.0, start_to_close=1.5)
    assert task.start_to_close_ms == 1500 and task.deadline_ms is None
    headers = json.loads(task_message(task)[1])["headers"]
    assert headers["timelimit"] == [1.5, None]
    harness.deliver(task)
    (result,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)

    assert PROBE.runs(task.activity_id) == 1
    assert result.status is ActivityStatus.FAILED and result.failure is not None
    assert result.failure.error_type == "StartToCloseTimeout", result.failure
    assert result.failure.retryable is True
    assert "(1500 ms)" in result.failure.message and "rolled back" in result.failure.message
    assert harness.ledger() == [], "a task that returned past its deadline committed"
    assert harness.inbox() == [
        ("celery", task.activity_id, "FAILED", "StartToCloseTimeout", True, None)
    ]
    starts = [b for b in harness.recorder.bodies() if isinstance(b, ActivityStarted)]
    assert [s.activity_id for s in starts] == [task.activity_id]


def test_a_task_returning_after_its_schedule_to_close_deadline_rolls_back(
    harness: Harness,
) -> None:
    """The same for the step's schedule-to-close deadline (the message's ``expires``),
    which had not passed when the worker took the message."""
    # Far enough ahead for the worker to take the message before it expires.
    task = replace(harness.step("eo.late", "slow", 1.2), deadline_ms=wall_clock_ms() + 800)
    assert json.loads(task_message(task)[1])["headers"]["expires"] is not None
    harness.deliver(task)
    (result,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)

    assert PROBE.runs(task.activity_id) == 1, "the worker did not run the task"
    assert result.status is ActivityStatus.FAILED and result.failure is not None
    assert result.failure.error_type == "ScheduleToCloseTimeout", result.failure
    assert result.failure.retryable is True
    assert harness.ledger() == [], "a task that returned past its deadline committed"
    assert harness.inbox() == [
        ("celery", task.activity_id, "FAILED", "ScheduleToCloseTimeout", True, None)
    ]


def test_a_celery_retry_due_after_the_steps_start_to_close_timeout_does_not_run(
    harness: Harness,
) -> None:
    """docs/celery.md: Celery's retries work "inside one workflow attempt", and every
    retry counts against the step's start_to_close. The workflow counts the timeout from
    the attempt's first start report (a second one, from the retried run, is ignored as
    ALREADY_STARTED); the first version counted it from the start of each run, so a run
    retried with a countdown longer than the timeout started after the workflow had timed
    the attempt out (and sent the next attempt) and still committed its writes and a
    COMPLETED outcome. The first start now travels with the retried message."""
    run, task = harness.workflow("eo.retry_later", "r", 2.5, start_to_close=1.5)
    harness.deliver(task)
    (result,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id, 2)

    assert PROBE.runs(task.activity_id) == 1  # the retried run never reached the body
    starts = [b for b in harness.recorder.bodies() if isinstance(b, ActivityStarted)]
    assert len(starts) == 2
    # The retried run reports the attempt's first start, which its deadline counts from.
    assert starts[1].started_at_ms == starts[0].started_at_ms
    # The workflow's side, through the real engine, fed what the worker published: the
    # second start report is ignored, the timeout fires 1.5 s after the first, the next
    # attempt is sent, and the retried run's outcome comes too late to count.
    assert run.send(starts[0]).ignored is None
    assert run.send(starts[1]).ignored == "already-started"
    run.wake()
    while not any(sent.attempt == 2 for sent in run.sent):
        run.wake()
    assert run.record is not None
    assert "fail 0#1 StartToCloseTimeout" in " ".join(history_lines(run.record.events))
    assert run.send(result).ignored == "late-result"
    assert result.status is ActivityStatus.FAILED and result.failure is not None, (
        "a run retried past the attempt's 1.5 s start-to-close timeout committed "
        f"{harness.ledger()} and published {result.status.value}"
    )
    assert result.failure.error_type == "StartToCloseTimeout", result.failure
    assert "was not run" in result.failure.message
    assert harness.ledger() == []


def test_a_delivery_after_the_attempts_first_start_plus_its_timeout_does_not_run(
    harness: Harness,
) -> None:
    """A message delivered again after its worker died (kill -9 mid-task) carries no
    trace of the first run; the workflow counts the step's start-to-close from that first
    start and has moved on by now. The first start is recorded in PostgreSQL, so the late
    delivery is refused instead of running beside the next attempt."""
    task = harness.step("eo.record", "k-late", start_to_close=0.5)
    with psycopg.connect(harness.dsn, autocommit=True) as conn:
        conn.execute(_STARTS_SQL)  # as the worker makes it on its first connection
        conn.execute(
            "INSERT INTO sagaline_celery_attempt_starts (activity_id, started_ms) VALUES (%s, %s)",
            (task.activity_id, int(time.time() * 1000) - 2_000),  # the killed first run
        )
    harness.deliver(task)
    (result,) = harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)

    assert PROBE.runs(task.activity_id) == 0
    assert result.failure is not None and result.failure.error_type == "StartToCloseTimeout"
    assert "was not run" in result.failure.message
    assert harness.ledger() == []


def test_the_first_delivery_records_its_start_once(harness: Harness) -> None:
    task = harness.step("eo.record", "k-start", start_to_close=30)
    harness.deliver(task)
    harness.wait_results(task.activity_id, 1)
    harness.wait_finished(task.activity_id)
    harness.deliver(task)  # a redelivery: answered from the inbox, its start unchanged
    harness.wait_results(task.activity_id, 2)
    harness.wait_finished(task.activity_id, 2)

    starts = harness.query(
        "SELECT started_ms FROM sagaline_celery_attempt_starts WHERE activity_id = %s",
        (task.activity_id,),
    )
    assert len(starts) == 1
    assert abs(starts[0][0] - time.time() * 1000) < 60_000
    assert len(harness.ledger()) == 1
