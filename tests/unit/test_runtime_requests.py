"""Starts, updates and queries through the orchestrator shell without a broker: a workflow
that closes and starts again in one batch, TERMINATE_EXISTING over a parked or
unplannable run, inputs held behind a parked workflow, and replies Kafka refused.

Every test drives the real ``InputProcessor`` over one partition with a fake topic
listing, plays the loop's part (commit: promote and forget poison marks; abort: discard
what was staged; a refused record: ``mark_poisoned`` with its ``Ref``) and reads what the
batch would produce. Last, the client's wait for its answer, with a fake producer and reply
reader.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from confluent_kafka import Consumer, TopicPartition

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.client import ReplyTimeoutError, WorkflowClient
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    IfClosed,
    IfRunning,
    InboxBody,
    QueryWorkflow,
    Reply,
    ReplyKind,
    ResumeWorkflow,
    RunRequest,
    SignalWorkflow,
    StartWorkflow,
    UpdateAccepted,
    UpdateWorkflow,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.protocol.topics import Topics
from orchestrator.runtime.inputs import Batch, Input, InputProcessor, Output, Ref
from orchestrator.runtime.state import PartitionState, WorkflowStore
from orchestrator.transport import OFFSET, REASON, TopicDirectory
from tests.unit.conftest import T0, assert_status

WID = "wf"
TOPICS = Topics()
PARTICIPANT_TOPIC = TOPICS.tasks("p")
MISSING_TOPIC = TOPICS.tasks("q")
REFUSED = "MSG_SIZE_TOO_LARGE"


class _Listing:
    """Topic metadata without a broker: the topics in ``names`` exist (the test adds one,
    as an operator creating a topic would)."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def list_topics(self, topic: str | None = None, timeout: float = 0) -> Any:
        found = SimpleNamespace(partitions={0: SimpleNamespace()}, error=None)
        return SimpleNamespace(topics={name: found for name in self.names})


async def _waits(ctx: WorkflowContext, _: Any) -> str:
    """Type ``t``: keeps items an update ``add`` appends (answering how many there are),
    answers the query ``items``, completes with "done" on the signal ``go``."""
    items: list[Any] = []

    def add(item: Any) -> int:
        items.append(item)
        return len(items)

    def explode() -> Any:
        raise SystemExit("a query handler that exits")

    ctx.on_query("items", lambda: list(items))
    ctx.on_query("explode", explode)
    ctx.on_update("add", add)
    await ctx.wait_signal("go")
    return "done"


async def _works(ctx: WorkflowContext, _: Any) -> int:
    """Type ``w``: its first step is for participant ``q``, whose tasks topic the listing
    lacks until a test creates it."""
    await ctx.activity("q.work")
    return 1


def _registry() -> WorkflowRegistry:
    registry = WorkflowRegistry()
    registry.workflow("t")(_waits)
    registry.workflow("w")(_works)
    return registry


@dataclass
class _Shell:
    """An ``InputProcessor`` owning partition 0, fed inputs at increasing inbox offsets."""

    listing: _Listing = field(default_factory=lambda: _Listing(PARTICIPANT_TOPIC, TOPICS.replies))
    codec: AvroCodec = field(default_factory=AvroCodec)
    store: WorkflowStore = field(default_factory=WorkflowStore)
    next_offset: int = 0
    now_ms: int = T0

    def __post_init__(self) -> None:
        self.store.install(PartitionState(0))
        self.processor = InputProcessor(
            codec=self.codec,
            store=self.store,
            topics=TOPICS,
            directory=TopicDirectory(self.listing),
            registry=_registry(),
            max_events=1_000,
            max_record_bytes=900_000,
            partition_count=1,
        )

    @property
    def state(self) -> PartitionState:
        return self.store.partition(0)

    def feed(self, body: InboxBody, batch: Batch, *, offset: int | None = None) -> int:
        """Apply ``body`` as the next inbox input, or at ``offset`` (the same input again,
        after an abort); returns its offset."""
        if offset is None:
            offset = self.next_offset
            self.next_offset += 1
        self.now_ms += 1_000
        item = Input(0, offset, WID.encode(), self.codec.encode_inbox(body))
        self.processor.apply_input(item, body, batch, self.now_ms)
        return offset

    def commit(self) -> None:
        """The batch committed: what the loop does after the transaction."""
        written = [wid for _, wid, _, _ in self.store.staged()]
        self.store.promote()
        self.processor.forget_poison({0: self.next_offset}, written)

    def refuse(self, output: Output) -> None:
        """Kafka refused ``output``: the loop blames its ref and aborts the batch."""
        self.processor.mark_poisoned(output.ref, REFUSED)
        self.store.discard_staged()

    def staged(self) -> WorkflowRecord:
        record = self.store.staged_record(WID)
        assert record is not None, "expected a record staged for the workflow, observed none"
        return record

    def committed(self) -> WorkflowRecord:
        data = self.state.open.get(WID)
        assert data is not None, f"expected {WID!r} open, observed {self.state.closed_runs}"
        return self.codec.decode_workflow(data)

    def replies(self, batch: Batch) -> list[Reply]:
        return [self.codec.decode_reply(o.value or b"") for o in _on(batch, TOPICS.replies)]

    def history(self, batch: Batch) -> list[WorkflowRecord]:
        """The history records the batch produces before its staged ones, checked to go to
        this partition under the workflow's key."""
        outputs = _on(batch, TOPICS.history)
        for out in outputs:
            assert out.partition == 0, f"history output without its partition: {out}"
            assert out.key == WID.encode() and out.ref == Ref("workflow", 0, WID)
        return [self.codec.decode_workflow(o.value or b"") for o in outputs]

    def held(self) -> list[int]:
        return [offset for offset, _ in self.store.held(0, WID)]


def _on(batch: Batch, topic: str) -> list[Output]:
    return [o for o in batch.outputs if o.topic == topic]


def _start(
    request_id: str | None,
    if_running: IfRunning | None = None,
    if_closed: IfClosed | None = None,
    workflow_type: str = "t",
) -> StartWorkflow:
    return StartWorkflow(
        WID, workflow_type, encode_json(None), T0, request_id, if_running, if_closed
    )


def _signal(name: str = "go") -> SignalWorkflow:
    return SignalWorkflow(WID, name, encode_json(None), f"s-{name}", T0)


def _update(update_id: str, item: Any = "x") -> UpdateWorkflow:
    return UpdateWorkflow(WID, update_id, "add", encode_json(item), T0)


def _query(request_id: str, name: str = "items") -> QueryWorkflow:
    return QueryWorkflow(WID, request_id, name, encode_json(None), T0)


def _started(
    shell: _Shell,
    request_id: str = "R1",
    if_running: IfRunning | None = None,
    if_closed: IfClosed | None = None,
) -> WorkflowRecord:
    """A workflow of type ``t`` started by ``request_id`` and committed, waiting on ``go``."""
    batch = Batch(0.0)
    shell.feed(_start(request_id, if_running, if_closed), batch)
    shell.commit()
    record = shell.committed()
    assert_status(record, WorkflowStatus.RUNNING)
    assert record.request_id == request_id
    return record


def _one_reply(shell: _Shell, batch: Batch) -> tuple[Reply, Output]:
    outputs = _on(batch, TOPICS.replies)
    assert len(outputs) == 1, f"expected one reply, observed {shell.replies(batch)}"
    return shell.replies(batch)[0], outputs[0]


def _parked_holding(shell: _Shell) -> tuple[WorkflowRecord, int]:
    """Park the running workflow as the loop would when Kafka refuses the record the
    signal ``go`` produced: the signal, which completes the run, waits held beside it.
    Returns the run and the signal's offset."""
    run = _started(shell)
    batch = Batch(0.0)
    signal = shell.feed(_signal(), batch)
    assert_status(shell.staged(), WorkflowStatus.COMPLETED)
    shell.processor.mark_poisoned(Ref("workflow", 0, WID), "TOPIC_AUTHORIZATION_FAILED")
    shell.store.discard_staged()
    batch = Batch(0.0)
    shell.feed(_signal(), batch, offset=signal)
    shell.commit()
    assert_status(shell.committed(), WorkflowStatus.STUCK, "UndeliverableRecord")
    assert shell.state.stuck == {WID} and shell.held() == [signal]
    assert shell.processor.poison == {}, "the parked record was written"
    return run, signal


def _updates(record: WorkflowRecord) -> list[str]:
    return [e.update_id for e in record.events if isinstance(e, UpdateAccepted)]


# --- a run replaced in the batch that closed it -----------------------------------------


def test_a_run_that_closes_and_starts_again_in_one_batch_writes_both_runs() -> None:
    shell = _Shell()
    first = _started(shell)
    batch = Batch(0.0)
    shell.feed(_signal(), batch)
    assert_status(shell.staged(), WorkflowStatus.COMPLETED)
    shell.feed(_start("R2", IfRunning.FAIL, IfClosed.ALLOW), batch)

    # The closed run goes to history first, with its result; the new run is staged.
    [closed] = shell.history(batch)
    assert_status(closed, WorkflowStatus.COMPLETED)
    assert closed.run_id == first.run_id and closed.request_id == "R1"
    assert decode_json(closed.result or encode_json(None)) == "done"
    fresh = shell.staged()
    assert_status(fresh, WorkflowStatus.RUNNING)
    assert fresh.run_id not in ("", first.run_id) and fresh.request_id == "R2"
    assert fresh.earlier_requests == (RunRequest("R1", first.run_id),)
    [reply] = shell.replies(batch)
    assert reply.request_id == "R2" and reply.ok and reply.created
    assert (reply.run_id, reply.status) == (fresh.run_id, "RUNNING")
    # Each run is counted once.
    assert [(r.run_id, r.status) for _, r, _ in batch.changed] == [
        (first.run_id, WorkflowStatus.COMPLETED),
        (fresh.run_id, WorkflowStatus.RUNNING),
    ]

    shell.commit()
    assert shell.committed().run_id == fresh.run_id
    assert shell.state.closed_runs == {}


def test_terminate_existing_writes_the_terminated_run_before_the_new_one() -> None:
    shell = _Shell()
    first = _started(shell)
    batch = Batch(0.0)
    shell.feed(_start("R2", IfRunning.TERMINATE_EXISTING), batch)

    [ended] = shell.history(batch)
    assert_status(ended, WorkflowStatus.TERMINATED, "Terminated")
    assert ended.run_id == first.run_id and ended.events == first.events
    fresh = shell.staged()
    assert_status(fresh, WorkflowStatus.RUNNING)
    assert fresh.run_id != first.run_id and fresh.request_id == "R2"
    assert fresh.earlier_requests == (RunRequest("R1", first.run_id),)
    [reply] = shell.replies(batch)
    assert reply.ok and reply.created and reply.run_id == fresh.run_id
    shell.commit()
    assert shell.committed() == fresh


# --- replies Kafka refused --------------------------------------------------------------


def test_an_update_whose_reply_was_refused_is_applied_again_with_a_bare_failure() -> None:
    shell = _Shell()
    _started(shell)
    batch = Batch(0.0)
    offset = shell.feed(_update("U1", "a"), batch)
    reply, output = _one_reply(shell, batch)
    assert reply.ok and reply.payload is not None and decode_json(reply.payload) == 1
    assert output.ref == Ref("reply", 0, offset), "a reply is blamed on itself"
    shell.refuse(output)

    batch = Batch(0.0)
    shell.feed(_update("U1", "a"), batch, offset=offset)
    applied = shell.staged()
    assert_status(applied, WorkflowStatus.RUNNING)
    assert _updates(applied) == ["U1"]
    reply, output = _one_reply(shell, batch)
    assert (reply.request_id, reply.kind, reply.workflow_id) == ("U1", ReplyKind.UPDATE, WID)
    assert not reply.ok and reply.payload is None and reply.failure is not None
    assert reply.failure.error_type == "ReplyRefused" and REFUSED in reply.failure.message
    assert output.ref == Ref("reply", 0, offset)
    assert shell.held() == [] and not _on(batch, TOPICS.dlq)
    shell.refuse(output)

    # Refused even bare: no reply at all, the update is still applied.
    batch = Batch(0.0)
    shell.feed(_update("U1", "a"), batch, offset=offset)
    assert shell.replies(batch) == [] and batch.outputs == []
    assert _updates(shell.staged()) == ["U1"]
    shell.commit()
    record = shell.committed()
    assert_status(record, WorkflowStatus.RUNNING)
    assert _updates(record) == ["U1"]
    assert shell.state.stuck == set() and shell.state.held == {}
    assert shell.processor.poison == {}, "the reply's mark goes once its input committed"


def test_a_start_whose_reply_was_refused_still_starts_the_run() -> None:
    shell = _Shell()
    batch = Batch(0.0)
    offset = shell.feed(_start("R1"), batch)
    reply, output = _one_reply(shell, batch)
    assert reply.ok and reply.created and output.ref == Ref("reply", 0, offset)
    shell.refuse(output)

    batch = Batch(0.0)
    shell.feed(_start("R1"), batch, offset=offset)
    run = shell.staged()
    assert_status(run, WorkflowStatus.RUNNING)
    assert run.request_id == "R1" and shell.held() == []
    reply, output = _one_reply(shell, batch)
    assert reply.kind is ReplyKind.START and reply.request_id == "R1"
    assert reply.failure is not None and reply.failure.error_type == "ReplyRefused"
    assert not reply.ok
    shell.refuse(output)

    batch = Batch(0.0)
    shell.feed(_start("R1"), batch, offset=offset)
    assert batch.outputs == [], "not even the bare failure"
    assert shell.staged().request_id == "R1"
    shell.commit()
    assert_status(shell.committed(), WorkflowStatus.RUNNING)
    assert shell.committed().request_id == "R1"
    assert shell.state.stuck == set() and shell.state.held == {}


def test_a_query_whose_reply_was_refused_is_answered_bare_then_not_at_all() -> None:
    shell = _Shell()
    run = _started(shell)
    batch = Batch(0.0)
    offset = shell.feed(_query("Q1"), batch)
    reply, output = _one_reply(shell, batch)
    assert reply.ok and reply.payload is not None and decode_json(reply.payload) == []
    assert output.ref == Ref("reply", 0, offset)
    shell.refuse(output)

    batch = Batch(0.0)
    shell.feed(_query("Q1"), batch, offset=offset)
    reply, output = _one_reply(shell, batch)
    assert (reply.request_id, reply.kind) == ("Q1", ReplyKind.QUERY)
    assert reply.failure is not None and reply.failure.error_type == "ReplyRefused"
    assert reply.payload is None
    shell.refuse(output)

    batch = Batch(0.0)
    shell.feed(_query("Q1"), batch, offset=offset)
    assert batch.outputs == []
    assert shell.store.staged() == [] and shell.store.staged_held() == []
    # The workflow was never parked: the next input is applied as ever.
    batch = Batch(0.0)
    shell.feed(_update("U1"), batch)
    [reply] = shell.replies(batch)
    assert reply.ok and reply.run_id == run.run_id
    shell.commit()
    assert_status(shell.committed(), WorkflowStatus.RUNNING)
    assert shell.state.stuck == set()


def test_a_query_handler_that_exits_is_answered_with_a_failure_and_parks_nothing() -> None:
    shell = _Shell()
    run = _started(shell)
    batch = Batch(0.0)
    shell.feed(_query("Q1", "explode"), batch)
    [reply] = shell.replies(batch)
    assert not reply.ok and reply.failure is not None
    assert "BaseException" in reply.failure.message, reply.failure
    assert shell.store.staged() == [] and shell.store.staged_held() == []
    shell.commit()
    assert shell.committed() == run and shell.state.stuck == set()


# --- inputs held behind a parked workflow ------------------------------------------------


def test_held_starts_and_updates_are_applied_in_order_after_the_run_closes() -> None:
    """Held behind the parked workflow: the signal that completes it, an update, a start
    that may begin a new run, an update for that new run. The resume applies them as if
    they had never waited."""
    shell = _Shell()
    first, signal = _parked_holding(shell)
    batch = Batch(0.0)
    early = shell.feed(_update("U0", "early"), batch)
    start = shell.feed(_start("R2", None, IfClosed.ALLOW), batch)
    late = shell.feed(_update("U1", "late"), batch)
    assert batch.outputs == [], "everything waits behind the signal"
    shell.commit()
    assert shell.held() == [signal, early, start, late]

    batch = Batch(0.0)
    assert shell.processor.queue_resume_all(0) == 1
    partition, wid = shell.processor.redrive_queue.popleft()
    shell.processor.redrive(partition, wid, batch, shell.now_ms)

    [closed] = shell.history(batch)
    assert_status(closed, WorkflowStatus.COMPLETED)
    assert closed.run_id == first.run_id
    assert decode_json(closed.result or encode_json(None)) == "done"
    fresh = shell.staged()
    assert_status(fresh, WorkflowStatus.RUNNING)
    assert fresh.run_id != first.run_id and fresh.request_id == "R2"
    assert _updates(fresh) == ["U1"]
    replies = {r.request_id: r for r in shell.replies(batch)}
    assert sorted(replies) == ["R2", "U0", "U1"], "nothing held is dropped unanswered"
    refused = replies["U0"]
    assert not refused.ok and refused.failure is not None
    assert refused.failure.error_type == "WorkflowClosed"
    assert (refused.run_id, refused.status) == (first.run_id, "COMPLETED")
    started = replies["R2"]
    assert started.ok and started.created and started.run_id == fresh.run_id
    updated = replies["U1"]
    assert updated.ok and updated.run_id == fresh.run_id
    assert updated.payload is not None and decode_json(updated.payload) == 1

    shell.commit()
    assert shell.state.held == {} and shell.state.stuck == set()
    assert shell.committed().run_id == fresh.run_id


def test_terminate_existing_ends_a_parked_run_and_dead_letters_what_it_held() -> None:
    shell = _Shell()
    first, signal = _parked_holding(shell)
    batch = Batch(0.0)
    update = shell.feed(_update("U0"), batch)
    shell.commit()
    assert shell.held() == [signal, update]

    batch = Batch(0.0)
    shell.feed(_start("R2", IfRunning.TERMINATE_EXISTING), batch)
    letters = _on(batch, TOPICS.dlq)
    assert [dict(o.headers)[OFFSET] for o in letters] == [b"%d" % signal, b"%d" % update]
    assert {dict(o.headers)[REASON] for o in letters} == {b"run-terminated"}
    [ended] = shell.history(batch)
    assert_status(ended, WorkflowStatus.TERMINATED, "Terminated")
    assert ended.run_id == first.run_id
    fresh = shell.staged()
    assert_status(fresh, WorkflowStatus.RUNNING)
    assert fresh.request_id == "R2" and fresh.run_id != first.run_id
    assert fresh.earlier_requests == (RunRequest("R1", first.run_id),)
    [reply] = shell.replies(batch)
    assert reply.ok and reply.created and reply.run_id == fresh.run_id

    shell.commit()
    assert shell.state.held == {} and shell.state.stuck == set()
    assert shell.committed() == fresh


def test_a_held_start_whose_new_run_kafka_keeps_refusing_is_not_retried_forever() -> None:
    shell = _Shell()
    shell.listing.names.add(MISSING_TOPIC)
    _, signal = _parked_holding(shell)
    batch = Batch(0.0)
    start = shell.feed(_start("R2", None, IfClosed.ALLOW, workflow_type="w"), batch)
    shell.commit()
    assert shell.held() == [signal, start]
    for _ in range(2):  # the new run's task is refused, as an inbox input's would be
        batch = Batch(0.0)
        shell.processor.redrive(0, WID, batch, shell.now_ms)
        [task] = _on(batch, MISSING_TOPIC)
        assert task.ref == Ref("input", 0, start)
        shell.refuse(task)

    batch = Batch(0.0)
    shell.processor.redrive(0, WID, batch, shell.now_ms)
    assert _on(batch, MISSING_TOPIC) == [], "the refused task is produced a third time"
    letters = [dict(o.headers)[OFFSET] for o in _on(batch, TOPICS.dlq)]
    parked = shell.store.staged_record(WID)
    assert letters == [str(start).encode()] or (
        parked is not None and parked.status is WorkflowStatus.STUCK
    )


# --- a new run that cannot be planned -------------------------------------------------


def test_terminate_existing_parks_the_new_run_when_its_tasks_topic_is_missing() -> None:
    shell = _Shell()
    first = _started(shell)
    batch = Batch(0.0)
    shell.feed(_start("R2", IfRunning.TERMINATE_EXISTING, workflow_type="w"), batch)

    [ended] = shell.history(batch)
    assert_status(ended, WorkflowStatus.TERMINATED, "Terminated")
    assert ended.run_id == first.run_id and ended.workflow_type == "t"
    parked = shell.staged()
    assert_status(parked, WorkflowStatus.STUCK, "MissingTasksTopic")
    assert parked.workflow_type == "w" and parked.request_id == "R2"
    assert parked.run_id not in ("", first.run_id)
    assert _on(batch, MISSING_TOPIC) == []
    [reply] = shell.replies(batch)
    assert reply.ok and reply.created
    assert (reply.run_id, reply.status) == (parked.run_id, "STUCK")
    shell.commit()
    assert shell.state.stuck == {WID} and shell.state.held == {}

    # The topic is created and the workflow resumed: the new run goes on.
    shell.listing.names.add(MISSING_TOPIC)
    batch = Batch(0.0)
    shell.feed(ResumeWorkflow(WID, T0), batch)
    resumed = shell.staged()
    assert_status(resumed, WorkflowStatus.RUNNING)
    assert resumed.run_id == parked.run_id and resumed.workflow_type == "w"
    assert [o.topic for o in batch.outputs] == [MISSING_TOPIC]


@pytest.mark.parametrize("replaced", ["terminated", "closed"])
def test_a_parked_new_run_still_recognises_the_start_of_the_run_it_replaced(
    replaced: str,
) -> None:
    shell = _Shell()
    if replaced == "terminated":
        # Two callers race with TERMINATE_EXISTING; R1's caller timed out and retries.
        original = _start("R1", IfRunning.TERMINATE_EXISTING)
        first = _started(shell, "R1", IfRunning.TERMINATE_EXISTING)
        replacing = _start("R2", IfRunning.TERMINATE_EXISTING, workflow_type="w")
    else:
        original = _start("R1", None, IfClosed.ALLOW)
        first = _started(shell, "R1", None, IfClosed.ALLOW)
        batch = Batch(0.0)
        shell.feed(_signal(), batch)
        shell.commit()
        replacing = _start("R2", None, IfClosed.ALLOW, workflow_type="w")
    batch = Batch(0.0)
    shell.feed(replacing, batch)
    shell.commit()
    parked = shell.committed()
    assert_status(parked, WorkflowStatus.STUCK, "MissingTasksTopic")

    batch = Batch(0.0)
    shell.feed(original, batch)
    assert shell.history(batch) == [], "the retried start ended the parked run"
    [reply] = shell.replies(batch)
    assert reply.ok and reply.created
    assert (reply.run_id, reply.status) == (first.run_id, "")
    assert parked.earlier_requests == (RunRequest("R1", first.run_id),)


@pytest.mark.parametrize("request_id", ["R1", "", "r" * 201], ids=["retried", "empty", "too-long"])
def test_a_terminate_existing_start_that_changes_nothing_keeps_what_the_run_held(
    request_id: str,
) -> None:
    shell = _Shell()
    first, signal = _parked_holding(shell)
    batch = Batch(0.0)
    shell.feed(_start(request_id, IfRunning.TERMINATE_EXISTING), batch)
    assert batch.ignored in (["duplicate-start"], ["start-refused"])
    assert shell.store.staged_record(WID) is None and shell.history(batch) == []
    [reply] = shell.replies(batch)
    assert reply.run_id == first.run_id
    assert _on(batch, TOPICS.dlq) == [], "the run was not terminated"
    shell.commit()
    assert shell.held() == [signal] and shell.state.stuck == {WID}


def test_a_run_started_again_in_its_closing_batch_parks_only_the_new_run() -> None:
    shell = _Shell()
    first = _started(shell)
    batch = Batch(0.0)
    shell.feed(_signal(), batch)
    shell.feed(_start("R2", IfRunning.FAIL, IfClosed.ALLOW, workflow_type="w"), batch)

    [closed] = shell.history(batch)
    assert_status(closed, WorkflowStatus.COMPLETED)
    assert closed.run_id == first.run_id
    assert decode_json(closed.result or encode_json(None)) == "done"
    parked = shell.staged()
    assert_status(parked, WorkflowStatus.STUCK, "MissingTasksTopic")
    assert parked.workflow_type == "w" and parked.run_id != first.run_id
    [reply] = shell.replies(batch)
    assert reply.created and reply.run_id == parked.run_id
    shell.commit()
    assert shell.state.stuck == {WID} and shell.state.held == {}


# --- the client's wait for its answer -----------------------------------------------


class _Message:
    def __init__(self, key: bytes, value: bytes) -> None:
        self._key, self._value = key, value

    def error(self) -> None:
        return None

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value


class _Replies:
    """The client's reply reader without a broker: hands out ``messages`` once."""

    def __init__(self, messages: list[_Message]) -> None:
        self.messages = messages

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float) -> tuple[int, int]:
        return 0, 0

    def assign(self, partitions: list[TopicPartition]) -> None:
        pass

    def consume(self, count: int, timeout: float) -> list[_Message]:
        messages, self.messages = self.messages, []
        if not messages:
            time.sleep(min(timeout, 0.01))
        return messages


class _Producer:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None:
        self.sent.append(kwargs["value"])

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


def _client(messages: list[_Message]) -> tuple[WorkflowClient, _Producer]:
    """A client whose producer and reply reader are fakes (its constructor would connect)."""
    client = WorkflowClient.__new__(WorkflowClient)
    producer = _Producer()
    client.topics = TOPICS
    client.codec = AvroCodec()
    client._errors = []
    client._replies = cast("Consumer", _Replies(messages))
    client._reply_partitions = 1
    client._lock = threading.Lock()
    client._producer = cast(Any, producer)
    return client, producer


def test_the_client_takes_only_the_answer_of_its_own_kind_and_workflow() -> None:
    codec = AvroCodec()

    def answer(kind: ReplyKind, workflow_id: str, run_id: str) -> _Message:
        reply = Reply("U1", kind, workflow_id, run_id, True, "RUNNING", T0)
        return _Message(b"U1", codec.encode_reply(reply))

    client, producer = _client(
        [
            answer(ReplyKind.START, WID, "start"),  # a start that reused the id as request id
            answer(ReplyKind.UPDATE, "other", "elsewhere"),
            answer(ReplyKind.UPDATE, WID, "mine"),
        ]
    )
    update = UpdateWorkflow(WID, "U1", "add", encode_json(1), T0)
    reply = client._request(update, WID, "U1", 5.0)
    assert (reply.kind, reply.workflow_id, reply.run_id) == (ReplyKind.UPDATE, WID, "mine")
    assert [codec.decode_inbox(v) for v in producer.sent] == [update]


def test_a_client_that_hears_nothing_says_which_request_id_to_send_again() -> None:
    client, _ = _client([])
    query = QueryWorkflow(WID, "Q-7", "items", encode_json(None), T0)
    with pytest.raises(ReplyTimeoutError) as raised:
        client._request(query, WID, "Q-7", 0.05)
    assert raised.value.request_id == "Q-7"
    assert "'Q-7'" in str(raised.value)
