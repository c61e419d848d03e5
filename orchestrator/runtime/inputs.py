"""What one input does to the open transaction: apply, park, hold or dead-letter it.

Rules of this module:
- Every inbox input ends in exactly one of: staged changes (a new record and its tasks),
  an ignored reason, a parked workflow with the input held beside it, or a dead letter.
  Nothing an input or a workflow's code does may raise out of here; only Kafka-level
  failures (an abortable or a fatal transaction) propagate to the loop.
- A workflow's inputs are applied in inbox order: once one is held, the later ones are held
  behind it, until a resume applies them in order.
- Nothing is produced while inputs are processed: tasks and dead letters are collected in
  the batch and produced when it commits (KAFKA_EOS rule 1), so however long a workflow's
  code runs, it never holds a transaction open.
- A record refused by Kafka (synchronously or at delivery) is attributed to what caused it;
  the loop aborts, and on the retry that input is parked (then dead-lettered, if even the
  parked record is refused) instead of failing the same way forever.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from confluent_kafka import Message

from orchestrator import metrics
from orchestrator.errors import (
    FatalKafkaError,
    RecordDecodeError,
)
from orchestrator.protocol.celery import CELERY_PARTICIPANT
from orchestrator.protocol.celery import task_message as celery_message
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.failures import describe, safe_text
from orchestrator.protocol.partitioning import cached_partition_for
from orchestrator.protocol.payloads import PayloadEncodingError
from orchestrator.protocol.records import (
    ActivityHeartbeat,
    ActivityResult,
    ActivityStarted,
    ActivityStatus,
    ActivityTask,
    CancelWorkflow,
    CompletePromise,
    Failure,
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
    TerminateWorkflow,
    UpdateWorkflow,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.protocol.sizes import record_bound
from orchestrator.protocol.topics import Topics, held_key
from orchestrator.replay.engine import (
    REJECTED_REASONS,
    SIGNAL_REFUSED,
    ClosedRun,
    Limits,
    Transition,
    advance,
    answer_query,
    park,
    refusal,
    start_again,
    start_reply,
)
from orchestrator.replay.links import closing_messages
from orchestrator.runtime.local import LocalRun, LocalRunner, run_local_steps
from orchestrator.runtime.state import Presence, WorkflowStore
from orchestrator.transport import (
    TopicDirectory,
    dead_letter_for,
    dead_letter_max_bytes,
    record_size,
)
from orchestrator.workflow import WorkflowRegistry

log = logging.getLogger(__name__)
SOURCE: Final = "orchestrator"
PARK, DEAD_LETTER = 1, 2
# A closed workflow the retention hook kept is asked about again this much later.
_WITHHOLD_MS: Final = 60_000
_MAX_WITHHELD: Final = 100_000
# When a wake found nothing due, look again this much later.
_RECHECK_MS: Final = 1_000


class RetentionHook(Protocol):
    """Decides which closed workflows may be tombstoned now that their retention is over.

    The visibility projector plugs in here to archive workflows before their history
    record disappears; the default releases every one.
    """

    def release(self, partition: int, runs: Mapping[str, str]) -> Collection[str]:
        """The workflow ids among ``runs`` (workflow id -> the run id of its last, closed
        run) that may be deleted from history now."""
        ...


class ReleaseAll:
    """The default retention hook: nothing to archive first."""

    def release(self, partition: int, runs: Mapping[str, str]) -> Collection[str]:
        """Every id may go."""
        return list(runs)


@dataclass(frozen=True, slots=True)
class Ref:
    """What a produced record is attributed to, should Kafka refuse it.

    ``kind`` is ``input`` (an inbox input: ``item`` is its offset), ``dlq`` (the dead
    letter of that input), ``reply`` (the answer to that input), ``workflow`` (a
    workflow's history records: ``item`` is its id) or ``tombstone`` (a retention delete).
    """

    kind: str
    partition: int
    item: int | str


@dataclass(frozen=True, slots=True)
class Output:
    """A task, reply, dead letter or replaced history record to produce when the batch
    commits, and what caused it; ``partition`` None lets the partitioner choose."""

    topic: str
    key: bytes | None
    value: bytes | None
    ref: Ref
    headers: tuple[tuple[str, bytes | None], ...] = ()
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class Input:
    """An inbox input, fresh from the inbox or held under a history key."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    held: bool = False

    @property
    def ref(self) -> Ref:
        """What a record produced for this input is attributed to; a re-drive (no inbox
        offset) is its workflow's."""
        if self.offset < 0:
            return Ref("workflow", self.partition, (self.key or b"").decode())
        return Ref("input", self.partition, self.offset)


@dataclass(slots=True)
class Batch:
    """Inputs consumed since the last commit, and what they produced."""

    opened: float
    inputs: int = 0
    offsets: dict[int, int] = field(default_factory=dict)
    consumed: set[int] = field(default_factory=set)
    changed: list[tuple[bool, WorkflowRecord, int]] = field(default_factory=list)
    dead_letters: int = 0
    ignored: list[str] = field(default_factory=list)
    redrives: list[tuple[int, str]] = field(default_factory=list)
    tombstones: int = 0
    wakes: int = 0
    outputs: list[Output] = field(default_factory=list)


class _Unroutable(Exception):  # noqa: N818 - internal control flow, never escapes
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class InputProcessor:
    """Applies inputs, re-drives, and retention sweeps to the store and the transaction."""

    def __init__(
        self,
        *,
        codec: AvroCodec,
        store: WorkflowStore,
        topics: Topics,
        directory: TopicDirectory,
        registry: WorkflowRegistry,
        max_events: int,
        max_record_bytes: int,
        partition_count: int,
        retention_hook: RetentionHook | None = None,
        local: LocalRunner | None = None,
    ) -> None:
        self.codec = codec
        self.store = store
        self.topics = topics
        self.directory = directory
        self.registry = registry
        self.max_record_bytes = max_record_bytes
        self.partition_count = partition_count
        self.retention_hook: RetentionHook = retention_hook or ReleaseAll()
        self.local = local or LocalRunner(
            registry.local_activities, inline=registry.inline_local_activities
        )
        # Closed workflow id -> when (epoch ms) the retention hook may be asked again.
        self._withheld: dict[str, int] = {}
        self.limits = Limits(
            max_events=max_events,
            max_record_bytes=max_record_bytes,
            measure=self._measure,
            bound=record_bound,
        )
        self.poison: dict[Ref, tuple[int, str]] = {}
        self.redrive_queue: deque[tuple[int, str]] = deque()
        self._encoded: dict[int, tuple[WorkflowRecord, bytes]] = {}

    # --- inbox inputs -----------------------------------------------------------------

    def process(self, msg: Message, batch: Batch, now_ms: int) -> None:
        """Apply one consumed inbox record to the open batch."""
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None and offset is not None
        try:
            body = self.codec.decode_inbox(msg.value())
        except RecordDecodeError as exc:
            self._reject_message(msg, exc.reason, str(exc), batch)
            return
        if isinstance(body, ResumeWorkflow) and body.workflow_id is None:
            queued = self.queue_resume_all(partition)
            log.info("resume of every stuck workflow partition=%d queued=%d", partition, queued)
            return
        wid = body.workflow_id
        assert wid is not None
        key = msg.key()
        if key is not None and partition != cached_partition_for(key, self.partition_count):
            self._reject_message(
                msg,
                "wrong-partition",
                f"workflow {wid!r} arrived on partition {partition}, but Kafka's default "
                f"(murmur2) partitioner puts its key on "
                f"{cached_partition_for(key, self.partition_count)}; produce with murmur2",
                batch,
            )
            return
        if key is None or key.decode(errors="replace") != wid:
            self._reject_message(
                msg,
                "key-mismatch",
                f"record key {key!r} is not the workflow id {wid!r}; inputs must be keyed "
                "by workflow id to reach the owning partition",
                batch,
            )
            return
        if not wid:
            # No workflow can have the empty id: a start would create one no client could
            # address apart from every other mistake of the same kind.
            self._reject_message(
                msg,
                "empty-workflow-id",
                "the workflow id is empty; every input names its workflow by a non-empty id, "
                "which is also its record key",
                batch,
            )
            return
        self.apply_input(Input(partition, offset, key, msg.value() or b""), body, batch, now_ms)

    def apply_input(self, item: Input, body: InboxBody, batch: Batch, now_ms: int) -> None:
        """Route one decoded input for ``body.workflow_id`` (fresh or held)."""
        partition = item.partition
        wid = body.workflow_id
        assert wid is not None
        if isinstance(body, QueryWorkflow):
            self._answer(item, body, batch, now_ms)
            return
        level, why = self._poison_level(item.ref, partition, wid)
        if level >= DEAD_LETTER:
            self._reject_input(item, "undeliverable", why, batch)
            return
        presence = self.store.presence(partition, wid)
        resume = isinstance(body, ResumeWorkflow)
        if isinstance(body, ActivityStarted | ActivityHeartbeat) and self._not_timing(
            partition, wid, presence
        ):
            # Start reports and heartbeats only feed timeouts, which a parked, holding or
            # closed workflow does not run: nothing to keep.
            batch.ignored.append("not-running")
            return
        if presence is Presence.CLOSED:
            if isinstance(body, StartWorkflow) and _may_start_again(body):
                self._apply(item, None, body, batch, now_ms, self._closed_run(partition, wid))
                return
            if isinstance(body, UpdateWorkflow):
                # The engine answers (the workflow closed); it needs no record for that.
                self._apply(item, None, body, batch, now_ms, self._closed_run(partition, wid))
                return
            batch.ignored.append(
                "duplicate-start" if isinstance(body, StartWorkflow) else "workflow-closed"
            )
            return
        if presence is Presence.UNWRITABLE:
            if resume:
                batch.ignored.append("unreadable")
                return
            reason = self.store.partition(partition).unwritable[wid]
            self._hold(item, wid, f"workflow {wid} is not writable here: {reason}", batch)
            return
        if resume:
            # An operator resumes after fixing something (creating a missing topic, raising
            # a topic's size limit): look again, and give a refused workflow another try.
            self.directory.recheck_missing()
            self.poison.pop(Ref("workflow", partition, wid), None)
            self.redrive(partition, wid, batch, now_ms)
            return
        ends_run = False
        if not item.held and self.store.holds_any(partition, wid):
            if not _terminates(body):
                self._hold(item, wid, "an earlier input of the workflow is held", batch)
                return
            # It may end this run, and what the run held would then wait for nothing:
            # applied now, not behind them (they go if the run does end).
            ends_run = True
        current = self._load(partition, wid, presence)
        if current is None and presence is Presence.OPEN:
            self._hold(item, wid, "its history record cannot be decoded here", batch)
            return
        if level >= PARK:
            self._park(item, current, body, Failure("UndeliverableRecord", why), batch, now_ms)
            return
        self._apply(item, current, body, batch, now_ms, ends_run=ends_run)

    # --- timers ---------------------------------------------------------------------

    def _not_timing(self, partition: int, wid: str, presence: Presence) -> bool:
        if presence is not Presence.OPEN or self.store.holds_any(partition, wid):
            return True
        staged = self.store.staged_record(wid)
        if staged is not None:
            return staged.status is not WorkflowStatus.RUNNING
        return wid in self.store.partition(partition).stuck

    def wake(self, partition: int, wid: str, batch: Batch, now_ms: int) -> None:
        """Fire what is due for a running workflow whose wake time has come.

        A workflow that is parked, holds inputs or cannot be written here does not wake
        (its record has no wake time; a resume recomputes it). A wake that finds nothing
        due (the index and the record disagree) is looked at again a second later.
        """
        batch.wakes += 1
        presence = self.store.presence(partition, wid)
        current = None
        if presence is Presence.OPEN and not self.store.holds_any(partition, wid):
            current = self._load(partition, wid, presence)
        if current is None or current.status is not WorkflowStatus.RUNNING:
            if self.store.staged_record(wid) is None:
                # Not a running workflow here: out of the index until its record is
                # written. (A change staged in this batch re-indexes it when it commits,
                # or the wake is due again if the batch aborts.)
                self.store.partition(partition).wake.pop(wid, None)
            return
        item = Input(partition, -1, wid.encode(), b"", held=True)
        level, why = self._poison_level(item.ref, partition, wid)
        if level >= PARK:
            # What this wake wrote was refused by Kafka: park the workflow with the reason,
            # as an inbox input would be, so a resume (after the fix) wakes it again.
            self._park(
                item, current, WakeUp(wid), Failure("UndeliverableRecord", why), batch, now_ms
            )
            return
        ignored = len(batch.ignored)
        self._apply(item, current, WakeUp(wid), batch, now_ms)
        if len(batch.ignored) > ignored and self.store.staged_record(wid) is None:
            log.warning(
                "timer index and record disagree workflow=%s partition=%d wake_at=%s now=%d",
                safe_text(wid, 200),
                partition,
                current.wake_at_ms,
                now_ms,
            )
            self.store.partition(partition).set_wake(wid, now_ms + _RECHECK_MS)

    # --- re-driving -------------------------------------------------------------------

    def queue_resume_all(self, partition: int) -> int:
        """Queue a re-drive of every stuck or holding workflow of ``partition``."""
        state = self.store.partition(partition)
        wanted = sorted((state.stuck | set(state.held)) - set(state.unwritable))
        self.directory.recheck_missing()
        self.redrive_queue.extend((partition, wid) for wid in wanted)
        return len(wanted)

    def redrive(self, partition: int, wid: str, batch: Batch, now_ms: int) -> None:
        """Run a stuck workflow's code again, then apply its held inputs in order."""
        batch.redrives.append((partition, wid))
        presence = self.store.presence(partition, wid)
        if presence is not Presence.OPEN:
            return
        if self._poison_level(Ref("workflow", partition, wid), partition, wid)[0] >= PARK:
            return
        committed = self._load(partition, wid, presence)
        if committed is None:
            return
        current: WorkflowRecord = committed
        if current.status is WorkflowStatus.STUCK:
            resume = Input(partition, -1, wid.encode(), b"", held=True)
            if not self._apply(resume, current, ResumeWorkflow(wid, now_ms), batch, now_ms):
                return
            current = self.store.staged_record(wid) or current
            if current.status is WorkflowStatus.STUCK:
                self._unstage_if_unchanged(wid, committed)
                return
        for offset, value in self.store.held(partition, wid):
            item = Input(partition, offset, wid.encode(), value, held=True)
            try:
                body = self.codec.decode_inbox(value)
            except RecordDecodeError as exc:
                self._reject_input(item, exc.reason, str(exc), batch)
                self.store.stage_release(partition, wid, offset)
                continue
            if current.status.terminal:
                # The run closed while the input waited: a start may begin a new run and
                # an update is told; a duplicate or late result changes nothing.
                level, why = self._poison_level(item.ref, partition, wid)
                if level >= DEAD_LETTER:
                    self._reject_input(item, "undeliverable", why, batch)
                    self.store.stage_release(partition, wid, offset)
                    continue
                if (isinstance(body, StartWorkflow) and _may_start_again(body)) or isinstance(
                    body, UpdateWorkflow
                ):
                    self._apply(item, None, body, batch, now_ms, self._closed_run(partition, wid))
                    current = self.store.staged_record(wid) or current
                self.store.stage_release(partition, wid, offset)
                continue
            level, why = self._poison_level(item.ref, partition, wid)
            if level >= DEAD_LETTER:
                self._reject_input(item, "undeliverable", why, batch)
                self.store.stage_release(partition, wid, offset)
                continue
            if level >= PARK:
                self._park(item, current, body, Failure("UndeliverableRecord", why), batch, now_ms)
                break
            if not self._apply(item, current, body, batch, now_ms):
                break
            self.store.stage_release(partition, wid, offset)
            current = self.store.staged_record(wid) or current
        self._unstage_if_unchanged(wid, committed)

    # --- retention --------------------------------------------------------------------

    def sweep(self, now_ms: int, retention_ms: int, batch: Batch, limit: int) -> None:
        """Tombstone up to ``limit`` closed workflows whose retention is over."""
        for state in self.store.partitions():
            expired: dict[str, str] = {}
            withheld = self._withheld
            for wid, closed_at in state.closed.items():
                if closed_at + retention_ms > now_ms or len(expired) >= limit:
                    break
                if withheld and withheld.get(wid, 0) > now_ms:
                    continue  # the hook kept it a moment ago: ask about later ones first
                if self.store.staged_record(wid) is None:
                    closed_run = state.closed_runs.get(wid)
                    expired[wid] = closed_run[1] if closed_run is not None else ""
            if not expired:
                continue
            try:
                released = list(self.retention_hook.release(state.partition, expired))
            except Exception:
                log.exception("retention hook failed partition=%d", state.partition)
                continue
            kept = expired.keys() - set(released)
            if kept:
                # Workflows the hook keeps (not archived yet, or never archivable) must not
                # fill every sweep's limit and hold back the partition's retention.
                if len(withheld) > _MAX_WITHHELD:
                    withheld.clear()
                withheld.update(dict.fromkeys(kept, now_ms + _WITHHOLD_MS))
            for wid in released:
                if wid not in expired or Ref("tombstone", state.partition, wid) in self.poison:
                    continue
                withheld.pop(wid, None)
                self.store.stage_tombstone(state.partition, wid)
                batch.tombstones += 1

    # --- applying ---------------------------------------------------------------------

    def _apply(
        self,
        item: Input,
        current: WorkflowRecord | None,
        body: InboxBody | WakeUp,
        batch: Batch,
        now_ms: int,
        closed: ClosedRun | None = None,
        *,
        ends_run: bool = False,
    ) -> bool:
        """Advance the workflow with ``body``; False if it had to be parked instead.

        ``closed``: the workflow's last run has closed (``current`` is None); a start may
        begin a new run per its id-reuse policy, an update is answered that it closed.
        ``ends_run``: the run holds inputs and ``body`` may end it; if it does, they are
        dead-lettered, and if it does not, ``body`` is held behind them after all.
        """
        starts = isinstance(body, StartWorkflow) or (
            current is None and isinstance(body, SignalWorkflow) and body.start is not None
        )
        run_id = uuid.uuid4().hex if starts else ""
        try:
            if closed is not None and isinstance(body, StartWorkflow):
                transition = start_again(
                    closed, body, now_ms, self.registry, self.limits, run_id=run_id
                )
            elif closed is not None and isinstance(body, UpdateWorkflow):
                transition = Transition(
                    None, ignored="workflow-closed", reply=_closed_reply(body, closed, now_ms)
                )
            else:
                transition = advance(
                    current, body, now_ms, self.registry, self.limits, run_id=run_id
                )
            local = run_local_steps(
                transition,
                body,
                current,
                now_ms,
                runner=self.local,
                registry=self.registry,
                limits=self.limits,
                between=self._encoded.clear,
            )
            transition = local.transition
        except BaseException as exc:  # the engine itself failed: only this workflow pays
            log.exception(
                "engine failed workflow=%s partition=%d offset=%d",
                safe_text(body.workflow_id, 200),
                item.partition,
                item.offset,
            )
            failure = Failure(
                "EngineError",
                safe_text(f"applying {_describe_input(body, item)} failed: {describe(exc)}"),
            )
            self._encoded.clear()
            return self._park(item, current, body, failure, batch, now_ms)
        ended = (
            transition.replaced is not None
            or bool(local.ended)
            or (
                transition.record is not None
                and transition.record.status is WorkflowStatus.TERMINATED
                and (current is None or current.run_id == transition.record.run_id)
            )
        )
        if ends_run and not ended and transition.ignored is None:
            self._encoded.clear()
            self._hold(
                item, body.workflow_id or "", "an earlier input of the workflow is held", batch
            )
            return True
        if ends_run and ended:
            self._drop_held(item.partition, body.workflow_id or "", batch)
        if transition.reply is not None and transition.ignored is not None and not _child(body):
            self._reply(transition.reply, item, batch)
        if transition.messages and transition.ignored is not None:
            self._send(transition.messages, item, batch)
        if transition.ignored is not None:
            self._encoded.clear()
            if transition.ignored in REJECTED_REASONS and not isinstance(body, ResumeWorkflow):
                self._reject_input(
                    item,
                    transition.ignored,
                    _rejection(transition.ignored, body, item),
                    batch,
                )
            else:
                batch.ignored.append(transition.ignored)
            return True
        # A new run replaces the id's record: the runs it ends go to history first, in
        # order: one closed earlier in this batch and not written yet, then one this
        # transition closed (terminated by the start, or a first run that continued as
        # new at once).
        previous: list[WorkflowRecord] = []
        if closed is not None:
            staged = self.store.staged_record(body.workflow_id or "")
            if staged is not None and staged.status.terminal:
                previous.append(staged)
        if transition.replaced is not None:
            previous.append(transition.replaced)
        try:
            planned = self._plan(transition)
        except _Unroutable as exc:
            # Runs local steps ended are not written: the input is parked as it came, and
            # applied again (its local steps with it) when the workflow is resumed.
            if starts and (previous or closed is not None):
                # The new run cannot start as it is: it is parked, not the run it replaces,
                # and it keeps the starts of the runs before it.
                self._write_previous(previous, item, batch)
                if transition.replaced is not None:
                    # What the ended run owes others (its parent's report, its children's
                    # policies) goes out even though the new run does not start.
                    owed = closing_messages(transition.replaced, now_ms)
                    self._send(tuple(owed), item, batch)
                earlier = () if transition.record is None else transition.record.earlier_requests
                return self._park(item, None, body, exc.failure, batch, now_ms, earlier=earlier)
            # A run that continued as new into a run that cannot start stays as it was,
            # parked: nothing of the transition is written.
            return self._park(item, current, body, exc.failure, batch, now_ms)
        finally:
            # The bytes measured for the engine's size check are the bytes produced.
            self._encoded.clear()
        record, encoded, tasks = planned
        # Runs that local steps ended by continuing as new, in the order they ended.
        previous.extend(local.ended)
        self._write_previous(previous, item, batch)
        if transition.reply is not None and not _child(body):
            self._reply(_after_local(transition.reply, local, record), item, batch)
        # The run the start made, even if local steps continued it as new since.
        first = local.ended[0] if local.ended else record
        if isinstance(body, StartWorkflow) and first.input != body.input:
            # The workflow is recorded as failed without its input, which did not fit; the
            # dead letter keeps the original for whoever wants to start it again.
            self._reject_input(item, "oversized", safe_text(record.failure), batch)
        batch.outputs.extend(Output(topic, key, data, item.ref) for topic, key, data in tasks)
        self.store.stage(item.partition, record, encoded)
        batch.changed.append((starts, record, len(tasks)))
        for task in transition.tasks:
            metrics.child(metrics.ACTIVITIES_SCHEDULED, f"{task.participant}.{task.activity}").inc()
        for label in local.ran:
            metrics.child(metrics.ACTIVITIES_SCHEDULED, label).inc()
        return True

    def _write_previous(self, previous: list[WorkflowRecord], item: Input, batch: Batch) -> None:
        """Write the closing records of the runs a new run replaces, before the new run's."""
        for ended in previous:
            self._write_ended(ended, item, batch)

    def _write_ended(self, previous: WorkflowRecord, item: Input, batch: Batch) -> None:
        try:
            ended = self.codec.encode_workflow(previous)
        except Exception:  # cannot happen for a record this code wrote; say so
            log.exception("cannot encode the ended run of %s", safe_text(previous.workflow_id, 200))
            return
        wid = previous.workflow_id
        batch.outputs.append(
            Output(
                self.topics.history,
                wid.encode(),
                ended,
                Ref("workflow", item.partition, wid),
                partition=item.partition,
            )
        )
        if previous is not self.store.staged_record(wid):
            batch.changed.append((False, previous, 0))

    def _send(self, messages: tuple[InboxBody, ...], item: Input, batch: Batch) -> None:
        """Produce inputs for other workflows that an ignored input still owes them (a
        child's refused start reported to its parent)."""
        for message in messages:
            target = (message.workflow_id or "").encode()
            try:
                data = self.codec.encode_inbox(message)
            except Exception:  # records this code builds always encode; say so if not
                log.exception("cannot encode an input for %s", safe_text(message.workflow_id, 200))
                continue
            batch.outputs.append(Output(self.topics.inbox, target, data, item.ref))

    def _drop_held(self, partition: int, wid: str, batch: Batch) -> None:
        """Dead-letter the inputs a run held: a start is terminating it."""
        for offset, value in self.store.held(partition, wid):
            item = Input(partition, offset, wid.encode(), value, held=True)
            self._reject_input(
                item,
                "run-terminated",
                f"held for workflow {safe_text(wid, 200)!r}, whose run was terminated",
                batch,
            )
            self.store.stage_release(partition, wid, offset)

    def _celery_task(
        self, record: WorkflowRecord, task: ActivityTask, key: bytes
    ) -> tuple[str, bytes, bytes]:
        """The Celery message of ``task`` on its queue's topic (see protocol.celery)."""
        try:
            queue, data = celery_message(task)
        except PayloadEncodingError as exc:
            raise _Unroutable(Failure("InvalidCeleryCall", safe_text(exc))) from None
        if not self.topics.valid(queue):
            raise _Unroutable(
                Failure("InvalidTaskTopic", safe_text(f"{queue!r} is not a valid topic name"))
            )
        if queue.startswith(f"{self.topics.prefix}."):
            raise _Unroutable(
                Failure(
                    "InvalidTaskTopic",
                    safe_text(
                        f"Celery queue {queue!r} is under sagaline's topic prefix "
                        f"{self.topics.prefix!r}: name the queue outside it"
                    ),
                )
            )
        if not self.directory.exists(queue):
            raise _Unroutable(
                Failure(
                    "MissingTasksTopic",
                    f"Celery queue topic {queue} does not exist: start a Celery worker with "
                    f"-Q {queue} (it creates the topic) or create it, then resume the "
                    f"workflow (sagaline resume {safe_text(record.workflow_id, 200)})",
                )
            )
        if len(key) + len(data) > self.max_record_bytes:
            raise _Unroutable(
                Failure(
                    "RecordTooLarge",
                    f"the Celery message for {safe_text(task.activity, 200)} is "
                    f"{len(data)} bytes, above {self.max_record_bytes}",
                )
            )
        return queue, key, data

    def _plan(
        self, transition: Transition
    ) -> tuple[WorkflowRecord, bytes, list[tuple[str, bytes, bytes]]]:
        """Encode, size-check and route everything a transition writes, or refuse it."""
        record = transition.record
        assert record is not None
        key = record.workflow_id.encode()
        encoded = self._checked("the workflow's record", key, lambda: self._encode(record))
        tasks: list[tuple[str, bytes, bytes]] = []
        for task in transition.tasks:
            if task.participant == CELERY_PARTICIPANT:
                tasks.append(self._celery_task(record, task, key))
                continue
            topic = self.topics.tasks(task.participant)
            if not self.topics.valid(topic):
                raise _Unroutable(
                    Failure("InvalidTaskTopic", safe_text(f"{topic!r} is not a valid topic name"))
                )
            if not self.directory.exists(topic):
                raise _Unroutable(
                    Failure(
                        "MissingTasksTopic",
                        f"tasks topic {topic} does not exist: create it (sagaline topics "
                        f"create --participants {task.participant}) and resume the workflow "
                        f"(sagaline resume {safe_text(record.workflow_id, 200)})",
                    )
                )
            data = self._checked(
                f"a task for {topic}", key, functools.partial(self.codec.encode_task, task)
            )
            tasks.append((topic, key, data))
        for message in transition.messages:
            # Another workflow's input (a child's start, a report to a parent): to the
            # inbox, keyed by that workflow's id, so it reaches whoever owns it.
            target = (message.workflow_id or "").encode()
            what = f"an input for workflow {safe_text(message.workflow_id, 200)!r}"
            try:
                data = self._checked(
                    what, target, functools.partial(self.codec.encode_inbox, message)
                )
            except _Unroutable as exc:
                if not isinstance(message, ActivityResult) or message.result is None:
                    raise
                # A child's result too large for its parent's inbox: the parent hears so
                # (its effects committed), rather than the child being parked for ever.
                too_large = dataclasses.replace(
                    message,
                    status=ActivityStatus.FAILED,
                    result=None,
                    failure=Failure(
                        "RecordTooLarge",
                        f"the child's result does not fit an inbox record: {exc.failure.message}",
                        effects_committed=True,
                    ),
                )
                data = self._checked(
                    what, target, functools.partial(self.codec.encode_inbox, too_large)
                )
            tasks.append((self.topics.inbox, target, data))
        return record, encoded, tasks

    def _checked(self, what: str, key: bytes, encode: Callable[[], bytes]) -> bytes:
        """Encode a record to produce, or refuse it if it cannot be encoded or is too large."""
        try:
            data = encode()
        except Exception as exc:
            raise _Unroutable(
                Failure("UnencodableRecord", safe_text(f"{what}: {describe(exc)}"))
            ) from exc
        size = record_size(key, data)
        if size > self.max_record_bytes:
            raise _Unroutable(
                Failure(
                    "RecordTooLarge",
                    f"{what} would be {size} bytes, above max_record_bytes "
                    f"({self.max_record_bytes})",
                )
            )
        return data

    def _park(
        self,
        item: Input,
        current: WorkflowRecord | None,
        body: InboxBody | WakeUp,
        failure: Failure,
        batch: Batch,
        now_ms: int,
        *,
        earlier: tuple[RunRequest, ...] = (),
    ) -> bool:
        """Park the workflow as STUCK with ``failure``, keeping the input; always False.

        ``earlier``: for a new run parked at its start, the starts of the runs it replaces.
        """
        wid = body.workflow_id
        assert wid is not None
        # A signal-with-start for a workflow that does not exist parks as its start would.
        parked_as: InboxBody | WakeUp = body
        if (
            isinstance(body, SignalWorkflow)
            and current is None
            and body.start is not None
            and body.start.workflow_id == wid
        ):
            parked_as = body.start
        if current is None and not isinstance(parked_as, StartWorkflow):
            self._reject_input(item, "unknown-workflow", failure.message, batch)
            return False
        run_id = uuid.uuid4().hex if current is None else ""
        try:
            record = park(current, parked_as, failure, now_ms, run_id=run_id)
            if current is None and earlier:
                record = dataclasses.replace(record, earlier_requests=earlier)
            encoded = self.codec.encode_workflow(record)
        except BaseException as exc:  # cannot even describe the problem: keep the input
            log.exception("cannot park workflow=%s", safe_text(wid, 200))
            self._reject_input(item, "unparkable", f"{failure.message}; {describe(exc)}", batch)
            return False
        if record_size(wid.encode(), encoded) > self.max_record_bytes:
            self._reject_input(item, "unparkable", failure.message, batch)
            return False
        log.warning(
            "workflow parked workflow=%s partition=%d offset=%d error_type=%s error=%s",
            safe_text(wid, 200),
            item.partition,
            item.offset,
            failure.error_type,
            failure.message,
            extra={
                "workflow_id": wid,
                "run_id": record.run_id,
                "partition": item.partition,
                "offset": item.offset,
            },
        )
        metrics.WORKFLOWS_PARKED.labels(failure.error_type).inc()
        self.store.stage(item.partition, record, encoded)
        batch.changed.append((current is None, record, 0))
        if (
            current is None
            and isinstance(parked_as, StartWorkflow)
            and parked_as.request_id
            and parked_as.parent is None
        ):
            # The start made a run, parked at once: say so, with its run id.
            made = start_reply(parked_as, record.run_id, record.status, now_ms, created=True)
            if made is not None:
                self._reply(made, item, batch)
        # A start lives on in the parked record itself; anything else (a signal that came
        # with its start too) waits beside it.
        if (current is not None or parked_as is not body) and not isinstance(body, ResumeWorkflow):
            self._hold(item, wid, failure.message, batch)
        return False

    def _hold(self, item: Input, wid: str, reason: str, batch: Batch) -> None:
        """Keep the input under a history key of its workflow until a resume applies it."""
        if item.held or item.offset < 0:
            return
        key = held_key(wid, item.offset)
        if record_size(key, item.value) > self.max_record_bytes:
            self._reject_input(item, "too-large-to-hold", reason, batch)
            return
        self.store.stage_hold(item.partition, wid, item.offset, item.value)
        metrics.INPUTS_HELD.labels(_reason_code(reason)).inc()
        log.info(
            "input held workflow=%s partition=%d offset=%d reason=%s",
            safe_text(wid, 200),
            item.partition,
            item.offset,
            safe_text(reason, 300),
        )

    def _unstage_if_unchanged(self, wid: str, committed: WorkflowRecord) -> None:
        staged = self.store.staged_record(wid)
        if staged is None:
            return
        same = dataclasses.replace(
            staged, revision=committed.revision, updated_at_ms=committed.updated_at_ms
        )
        if same == committed:
            # A re-drive that parks the workflow again exactly as it was writes nothing.
            self.store.unstage(wid)

    # --- replies ----------------------------------------------------------------------

    def _answer(self, item: Input, query: QueryWorkflow, batch: Batch, now_ms: int) -> None:
        """Answer a query from the workflow's current state (staged changes included):
        nothing is written but the reply, and nothing holds a query back."""
        wid = query.workflow_id
        presence = self.store.presence(item.partition, wid)
        record = self._load(item.partition, wid, presence)
        reply: Reply | None
        try:
            if presence is Presence.CLOSED:
                reply = _closed_reply(query, self._closed_run(item.partition, wid), now_ms)
            elif presence is Presence.UNWRITABLE or (record is None and presence is Presence.OPEN):
                reason = self.store.partition(item.partition).unwritable.get(wid, "")
                failure = Failure(
                    "WorkflowUnreadable",
                    safe_text(f"this orchestrator cannot read the workflow's record: {reason}"),
                )
                reply = refusal(query, failure, now_ms)
            else:
                reply = answer_query(record, query, now_ms, self.registry)
        except BaseException as exc:  # the engine itself failed: the caller hears it
            log.exception("query failed workflow=%s", safe_text(wid, 200))
            failure = Failure("EngineError", safe_text(f"answering the query: {describe(exc)}"))
            reply = refusal(query, failure, now_ms)
        finally:
            self._encoded.clear()
        if reply is not None:
            self._reply(reply, item, batch)

    def _reply(self, reply: Reply, item: Input, batch: Batch) -> None:
        """Produce ``reply`` with the batch (read_committed callers see it once the batch,
        and what it answers for, has committed).

        A reply Kafka refused is attributed to itself, never to its input or workflow: on
        the retry it is replaced by a bare ``ReplyRefused`` failure, and dropped if even
        that is refused (the caller times out); the input is applied as before.
        """
        ref = Ref("reply", item.partition, item.offset)
        refused, why = self.poison.get(ref, (0, ""))
        if refused >= DEAD_LETTER:
            metrics.child(metrics.REPLIES, reply.kind.value.lower(), "refused").inc()
            log.warning("reply dropped, Kafka refused it twice: %s", safe_text(why))
            return
        if refused:
            reply = _failed(reply, "ReplyRefused", f"Kafka refused the answer: {why}")
        topic = self.topics.replies
        if not self.directory.exists(topic):
            metrics.child(metrics.REPLIES, reply.kind.value.lower(), "no-topic").inc()
            log.warning(
                "reply dropped: topic %s does not exist (sagaline topics create); request=%s",
                topic,
                safe_text(reply.request_id, 200),
            )
            return
        key = reply.request_id.encode("utf-8", "surrogatepass")
        try:
            data = self.codec.encode_reply(reply)
        except Exception as exc:
            data = self.codec.encode_reply(_failed(reply, "UnencodableReply", describe(exc)))
        if record_size(key, data) > self.max_record_bytes:
            size = record_size(key, data)
            data = self.codec.encode_reply(
                _failed(
                    reply,
                    "ReplyTooLarge",
                    f"the answer is {size} bytes, above max_record_bytes ({self.max_record_bytes})",
                )
            )
        outcome = "ok" if reply.ok else "failed"
        metrics.child(metrics.REPLIES, reply.kind.value.lower(), outcome).inc()
        batch.outputs.append(Output(topic, key, data, ref))

    def _closed_run(self, partition: int, wid: str) -> ClosedRun:
        """What is known of the closed last run of ``wid`` (staged in this batch or
        committed)."""
        staged = self.store.staged_record(wid)
        if staged is not None:
            return ClosedRun(
                staged.status, staged.run_id, staged.request_id, staged.earlier_requests
            )
        status, run_id, request_id, earlier = self.store.partition(partition).closed_runs.get(
            wid, (WorkflowStatus.UNKNOWN, "", None, ())
        )
        return ClosedRun(status, run_id, request_id, earlier)

    # --- records ----------------------------------------------------------------------

    def _load(self, partition: int, wid: str, presence: Presence) -> WorkflowRecord | None:
        """The latest record of an open workflow, or None (absent, or unreadable now)."""
        if presence is not Presence.OPEN:
            return None
        staged = self.store.staged_record(wid)
        if staged is not None:
            return staged
        cached = self.store.cached(wid)
        if cached is not None:
            return cached
        data = self.store.encoded(partition, wid)
        assert data is not None
        try:
            record = self.codec.decode_workflow(data)
        except RecordDecodeError as exc:
            self.store.partition(partition).mark_unwritable(
                wid, f"its history record cannot be decoded here ({safe_text(exc)})"
            )
            return None
        self.store.remember(wid, record)
        return record

    def _encode(self, record: WorkflowRecord) -> bytes:
        memo = self._encoded.get(id(record))
        if memo is not None and memo[0] is record:
            return memo[1]
        return self.codec.encode_workflow(record)

    def _measure(self, record: WorkflowRecord) -> int:
        """The engine's size check; remembers the bytes so the record is encoded once."""
        data = self.codec.encode_workflow(record)
        self._encoded[id(record)] = (record, data)
        return record_size(record.workflow_id.encode(), data)

    # --- Kafka ------------------------------------------------------------------------

    def mark_poisoned(self, ref: Ref, why: str) -> None:
        """Remember that a record produced for ``ref`` can never be delivered as it was."""
        level = self.poison.get(ref, (0, ""))[0] + 1
        self.poison[ref] = (level, safe_text(why))
        log.warning("record refused ref=%s level=%d why=%s", ref, level, safe_text(why))

    def _poison_level(self, ref: Ref, partition: int, wid: str) -> tuple[int, str]:
        own = self.poison.get(ref, (0, ""))
        workflow = self.poison.get(Ref("workflow", partition, wid), (0, ""))
        return max(own, workflow)

    def forget_poison(self, committed: dict[int, int], written: Iterable[str]) -> None:
        """Drop marks of inputs now behind the committed offsets, and of workflows whose
        record was just written."""
        done = set(written)
        self.poison = {
            ref: mark
            for ref, mark in self.poison.items()
            if not (
                (
                    ref.kind in ("input", "dlq", "reply")
                    and isinstance(ref.item, int)
                    and ref.item < committed.get(ref.partition, -1)
                )
                or (ref.kind == "workflow" and ref.item in done)
            )
        }

    def _reject_message(self, msg: Message, reason: str, error: str, batch: Batch) -> None:
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None and offset is not None
        self._reject_input(
            Input(partition, offset, msg.key(), msg.value() or b""), reason, error, batch
        )

    def _reject_input(self, item: Input, reason: str, error: str, batch: Batch) -> None:
        log.warning(
            "dead letter reason=%s partition=%d offset=%d error=%s",
            reason,
            item.partition,
            item.offset,
            safe_text(error),
            extra={"partition": item.partition, "offset": item.offset},
        )
        ref = Ref("dlq", item.partition, item.offset)
        refused, why = self.poison.get(ref, (0, ""))
        if refused >= DEAD_LETTER:
            raise FatalKafkaError(
                f"the dead-letter topic {self.topics.dlq} refuses even a dead letter without "
                f"key and value ({why}); check that it exists and accepts this producer"
            )
        letter = dead_letter_for(
            topic=self.topics.inbox,
            partition=item.partition,
            offset=item.offset,
            key=item.key,
            value=item.value or None,
            reason=reason,
            error=error,
            source=SOURCE,
            # Refused once already: send only the headers, which point at the original.
            max_record_bytes=dead_letter_max_bytes(self.max_record_bytes) if refused == 0 else 1,
        )
        batch.outputs.append(
            Output(self.topics.dlq, letter.key, letter.value, ref, tuple(letter.headers))
        )
        batch.dead_letters += 1
        metrics.DEAD_LETTERS.labels(SOURCE, reason).inc()


def _after_local(reply: Reply, local: LocalRun, record: WorkflowRecord) -> Reply:
    """A start's reply as the local steps that ran after it left its run: completed, or
    continued as new, in the same transaction."""
    if reply.kind is not ReplyKind.START or not local.ran or not reply.ok:
        return reply
    runs = {r.run_id: r for r in (*local.ended, record)}
    run = runs.get(reply.run_id)
    if run is None or run.status.value == reply.status:
        return reply
    return dataclasses.replace(reply, status=run.status.value)


def _child(body: InboxBody | WakeUp) -> bool:
    """A child's start, made by its parent's orchestrator: its answer goes to the parent
    (as the step's outcome), never to the replies topic."""
    return isinstance(body, StartWorkflow) and body.parent is not None


def _terminates(body: InboxBody) -> bool:
    """Whether ``body`` ends the run outright, so what the run held waits for nothing."""
    return isinstance(body, TerminateWorkflow) or (
        isinstance(body, StartWorkflow) and body.if_running is IfRunning.TERMINATE_EXISTING
    )


def _may_start_again(start: StartWorkflow) -> bool:
    """Whether a start for a closed workflow needs the engine: it asks for an answer or
    may start a new run. (Any other start is ignored, as always.)"""
    return start.request_id is not None or start.if_closed not in (None, IfClosed.REJECT)


def _closed_reply(
    body: QueryWorkflow | UpdateWorkflow, closed: ClosedRun, now_ms: int
) -> Reply | None:
    """The answer to a query or update for a workflow whose last run has closed."""
    if isinstance(body, QueryWorkflow):
        message = "the workflow has closed and its state is not kept in memory: use its result"
    else:
        message = f"the workflow ended {closed.status.value}; updates need it open"
    failure = Failure("WorkflowClosed", message)
    return refusal(body, failure, now_ms, run_id=closed.run_id, status=closed.status)


def _failed(reply: Reply, error_type: str, message: str) -> Reply:
    return dataclasses.replace(
        reply, ok=False, payload=None, failure=Failure(error_type, safe_text(message))
    )


def _rejection(reason: str, body: InboxBody | WakeUp, item: Input) -> str:
    """Why an input the engine refused for good is dead-lettered."""
    if isinstance(body, CompletePromise) and reason != "unknown-workflow":
        return (
            f"completion of {safe_text(body.promise_id, 300)!r} refused: no such promise in "
            "this run of the workflow, or neither or both of a value and a failure"
        )
    if reason == SIGNAL_REFUSED and isinstance(body, SignalWorkflow):
        return (
            f"signal {safe_text(body.name, 200)!r} refused by workflow "
            f"{safe_text(body.workflow_id, 200)!r}: an invalid name, a start for another "
            "workflow id, or no room left in its record (events or bytes)"
        )
    return f"no workflow {body.workflow_id!r} in partition {item.partition}"


def _describe_input(body: InboxBody | WakeUp, item: Input) -> str:
    where = f"inbox partition {item.partition} offset {item.offset}"
    if isinstance(body, WakeUp):
        return "its timers, retries and timeouts that were due"
    if isinstance(body, StartWorkflow):
        return f"the start ({where})"
    if isinstance(body, ActivityResult):
        return f"the result of step {body.seq} attempt {body.attempt} ({where})"
    if isinstance(body, SignalWorkflow):
        return f"signal {safe_text(body.name, 200)!r} ({where})"
    if isinstance(body, CompletePromise):
        return f"the completion of promise {safe_text(body.promise_id, 300)!r} ({where})"
    if isinstance(body, CancelWorkflow):
        return f"a cancel ({where})"
    if isinstance(body, UpdateWorkflow):
        return f"update {safe_text(body.name, 200)!r} ({where})"
    if isinstance(body, TerminateWorkflow):
        return f"a terminate ({where})"
    return "a resume"


def _reason_code(reason: str) -> str:
    """A low-cardinality metric label for why an input is held."""
    if "earlier input" in reason:
        return "behind-held-input"
    if "not writable" in reason:
        return "unwritable-workflow"
    if "cannot be decoded" in reason:
        return "undecodable-record"
    return "parked"
