"""Shared pieces of the unit tests: a driver that feeds inputs to the pure engine, and
assertions whose failure message names the workflow and both histories.

The driver plays the orchestrator shell's part with no Kafka: it keeps the record the
shell would keep, applies one input at a time with an explicit clock, and remembers
every task the engine handed out.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from hypothesis import HealthCheck, settings

from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityHeartbeat,
    ActivityResult,
    ActivityScheduled,
    ActivityStarted,
    ActivityStatus,
    ActivityTask,
    AttemptHeartbeat,
    AttemptStarted,
    CancelRequested,
    Failure,
    HistoryEvent,
    InboxBody,
    PatchMarker,
    Payload,
    PromiseCompleted,
    PromiseCreated,
    ResumeWorkflow,
    SignalReceived,
    SignalWorkflow,
    StartWorkflow,
    TimerCancelled,
    TimerFired,
    TimerStarted,
    UpdateAccepted,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.protocol.sizes import workflow_bound
from orchestrator.replay import Limits, Transition, advance, next_wake
from orchestrator.replay.driver import _CLOSE_ATTEMPTS
from orchestrator.replay.timing import dues, scan
from orchestrator.workflow import WorkflowContext, WorkflowRegistry

# Replay is pure and fast; a deadline would only turn a slow CI machine into flakes.
settings.register_profile(
    "sagaline-unit", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("sagaline-unit")

T0 = 1_700_000_000_000
DEFAULT_LIMITS = Limits()
STEP_MS = 1_000
CODEC = AvroCodec()
# Splices every record, however short, so the engine tests check the spliced encoding.
SPLICING = AvroCodec(splice_from=0)


def encoded_size(record: WorkflowRecord) -> int:
    """What the shell's ``Limits.measure`` returns: the encoded record with its key."""
    return len(CODEC.encode_workflow(record)) + len(record.workflow_id.encode())


def assert_encodable(record: WorkflowRecord | None) -> WorkflowRecord:
    """The record encodes with the real codec and decodes to an equal record."""
    assert record is not None, "expected a workflow record, observed none"
    try:
        data = CODEC.encode_workflow(record)
    except Exception as exc:
        message = f"workflow {record.workflow_id!r}: record does not encode: {exc!r}"
        raise AssertionError(message) from exc
    assert workflow_bound(record) >= len(data), (
        f"workflow {record.workflow_id!r}: size bound {workflow_bound(record)} is below the "
        f"encoded size {len(data)}"
    )
    # The compiled and spliced encodings (known events' bytes reused) are byte for byte
    # fastavro's.
    whole = CODEC.encode_workflow_whole(record)
    assert data == whole, f"workflow {record.workflow_id!r}: encoding differs from fastavro's"
    assert SPLICING.encode_workflow(record) == whole, (
        f"workflow {record.workflow_id!r}: spliced encoding differs from fastavro's"
    )
    decoded = CODEC.decode_workflow(data)
    assert decoded == record, (
        f"workflow {record.workflow_id!r}: decoded record differs\n"
        f"  in memory: {record}\n  decoded:   {decoded}"
    )
    return record


def event_line(event: HistoryEvent) -> str:
    """One history event in the notation the replay tests compare against.

    ``sched 0#1 inventory.reserve``, ``sched 2#1 inventory.release comp``, ``done 0#1``,
    ``fail 1#1 PaymentDeclined``: step number, ``#`` attempt, then what happened. A
    failure waiting to be retried shows the backoff: ``fail 1#1 Busy retry+1000``.
    Durable time: ``timer 3 +5000`` (fires 5 s after it started), ``fired 3``,
    ``cancel 3``, ``started 0#1``, ``beat 0#1``. Control: ``signal approve``,
    ``promise 2``, ``promised 2`` (``promised 2 failed``), ``cancelled``, ``update add``.
    Evolution: ``patch fraud-check@1`` (on after one command; `` deprecated`` when
    recorded by ``ctx.deprecate_patch``).
    """
    if isinstance(event, ActivityScheduled):
        suffix = " comp" if event.compensation else ""
        return f"sched {event.seq}#{event.attempt} {event.name}{suffix}"
    if isinstance(event, ActivityCompleted):
        return f"done {event.seq}#{event.attempt}"
    if isinstance(event, ActivityFailed):
        retry = "" if event.retry_at_ms is None else f" retry+{event.retry_at_ms - event.at_ms}"
        return f"fail {event.seq}#{event.attempt} {event.failure.error_type}{retry}"
    if isinstance(event, TimerStarted):
        return f"timer {event.seq} +{event.fire_at_ms - event.at_ms}"
    if isinstance(event, TimerFired):
        return f"fired {event.seq}"
    if isinstance(event, TimerCancelled):
        return f"cancel {event.seq}"
    if isinstance(event, AttemptStarted):
        return f"started {event.seq}#{event.attempt}"
    if isinstance(event, SignalReceived):
        return f"signal {event.name}"
    if isinstance(event, CancelRequested):
        return "cancelled"
    if isinstance(event, PromiseCreated):
        return f"promise {event.seq}"
    if isinstance(event, PromiseCompleted):
        return f"promised {event.seq}" + ("" if event.failure is None else " failed")
    if isinstance(event, PatchMarker):
        return f"patch {event.patch_id}@{event.position}" + (
            " deprecated" if event.deprecated else ""
        )
    if isinstance(event, UpdateAccepted):
        return f"update {event.name}"
    assert isinstance(event, AttemptHeartbeat)
    return f"beat {event.seq}#{event.attempt}"


def history_lines(events: Iterable[HistoryEvent]) -> list[str]:
    return [event_line(e) for e in events]


def assert_history(record: WorkflowRecord | None, expected: list[str]) -> None:
    """Fail with the workflow id and the expected and observed event lists."""
    assert record is not None, "expected a workflow record, observed none"
    observed = history_lines(record.events)
    if observed != expected:
        raise AssertionError(
            f"workflow {record.workflow_id}: history differs\n"
            f"  expected: {expected}\n  observed: {observed}"
        )


def assert_status(
    record: WorkflowRecord | None, status: WorkflowStatus, error_type: str | None = None
) -> None:
    """Fail with the workflow id, both statuses and the history when the status differs."""
    assert record is not None, "expected a workflow record, observed none"
    observed_error = None if record.failure is None else record.failure.error_type
    if record.status is not status or (error_type is not None and observed_error != error_type):
        raise AssertionError(
            f"workflow {record.workflow_id}: expected {status.value}"
            f"{f' ({error_type})' if error_type else ''}, observed {record.status.value}"
            f" ({record.failure})\n  history: {history_lines(record.events)}"
        )


def task_lines(tasks: Iterable[ActivityTask]) -> list[str]:
    """Tasks as ``<activity id> <participant>.<activity>`` (plus `` comp``)."""
    return [
        f"{t.activity_id} {t.participant}.{t.activity}{' comp' if t.compensation else ''}"
        for t in tasks
    ]


def completed(
    workflow_id: str,
    seq: int,
    attempt: int,
    value: Any,
    now_ms: int,
    *,
    result: Payload | None = None,
    run_id: str = "",
) -> ActivityResult:
    return ActivityResult(
        workflow_id=workflow_id,
        activity_id=activity_id(workflow_id, seq, attempt, run_id),
        seq=seq,
        attempt=attempt,
        status=ActivityStatus.COMPLETED,
        finished_at_ms=now_ms,
        result=encode_json(value) if result is None else result,
    )


def failed(
    workflow_id: str,
    seq: int,
    attempt: int,
    error_type: str,
    now_ms: int,
    *,
    retryable: bool = False,
    message: str = "it broke",
    run_id: str = "",
    effects_committed: bool = False,
) -> ActivityResult:
    return ActivityResult(
        workflow_id=workflow_id,
        activity_id=activity_id(workflow_id, seq, attempt, run_id),
        seq=seq,
        attempt=attempt,
        status=ActivityStatus.FAILED,
        finished_at_ms=now_ms,
        failure=Failure(error_type, message, retryable, effects_committed),
    )


def registry_with(fn: Any, name: str) -> WorkflowRegistry:
    """A registry holding ``fn`` as workflow type ``name``."""
    registry = WorkflowRegistry()
    registry.workflow(name)(fn)
    return registry


def signal_to(run: WorkflowRun, name: str, value: Any, signal_id: str) -> SignalWorkflow:
    """Signal ``name`` with ``value`` for ``run``'s workflow, sent now."""
    return SignalWorkflow(run.workflow_id, name, encode_json(value), signal_id, run.now_ms)


class WorkflowRun:
    """One workflow driven through :func:`advance`, as the orchestrator shell would.

    Every input moves the clock by ``STEP_MS``; ``wake`` moves it to the record's wake
    time instead, as the shell's timer index would. ``registry`` may be swapped between
    inputs to model a deploy of changed workflow code. ``run_id`` is what the shell would
    give the start (empty: activity ids in the format before run ids). With
    ``check_codec``, every new record must survive the Avro round trip unchanged. Every
    new record must have ``wake_at_ms == next_wake(record)``.
    """

    def __init__(
        self,
        registry: WorkflowRegistry,
        workflow_type: str,
        *,
        workflow_id: str = "wf-1",
        limits: Limits = DEFAULT_LIMITS,
        run_id: str = "",
        check_codec: bool = True,
    ) -> None:
        self.registry = registry
        self.workflow_type = workflow_type
        self.workflow_id = workflow_id
        self.limits = limits
        self.run_id = run_id
        self.check_codec = check_codec
        self.now_ms = T0
        self.record: WorkflowRecord | None = None
        self.last: Transition | None = None
        self.sent: list[ActivityTask] = []
        self.inputs: list[tuple[InboxBody | WakeUp, int]] = []
        self.transitions: list[Transition] = []

    def send(self, body: InboxBody | WakeUp, *, at_ms: int | None = None) -> Transition:
        """Apply ``body`` one step later, or at ``at_ms`` (never earlier than now)."""
        self.now_ms = self.now_ms + STEP_MS if at_ms is None else max(self.now_ms, at_ms)
        self.inputs.append((body, self.now_ms))
        transition = advance(
            self.record, body, self.now_ms, self.registry, self.limits, run_id=self.run_id
        )
        if transition.record is not None:
            if self.check_codec:
                assert_encodable(transition.record)
            assert transition.record.wake_at_ms == next_wake(transition.record), (
                f"workflow {self.workflow_id}: wake_at_ms {transition.record.wake_at_ms} is "
                f"not next_wake {next_wake(transition.record)}; history: "
                f"{history_lines(transition.record.events)}"
            )
            if transition.record.status is WorkflowStatus.RUNNING:
                # next_wake's shortcut agrees with the full list of what comes due.
                due = dues(scan(transition.record.events))
                assert transition.record.wake_at_ms == (due[0].at_ms if due else None)
            self.record = transition.record
            if transition.record.run_id:
                # A run that continued as new: later inputs are the new run's.
                self.run_id = transition.record.run_id
        self.sent.extend(transition.tasks)
        self.transitions.append(transition)
        self.last = transition
        return transition

    def start(self, value: Any = None, *, input_payload: Payload | None = None) -> Transition:
        payload = encode_json(value) if input_payload is None else input_payload
        return self.send(StartWorkflow(self.workflow_id, self.workflow_type, payload, self.now_ms))

    def resume(self) -> Transition:
        return self.send(ResumeWorkflow(self.workflow_id, self.now_ms))

    def wake(self, at_ms: int | None = None) -> Transition:
        """A WakeUp at ``at_ms``, by default at the record's ``wake_at_ms``."""
        assert self.record is not None, f"workflow {self.workflow_id} has no record yet"
        if at_ms is None:
            at_ms = self.record.wake_at_ms
            assert at_ms is not None, (
                f"workflow {self.workflow_id} has nothing to wake for; "
                f"history: {history_lines(self.record.events)}"
            )
        return self.send(WakeUp(self.workflow_id), at_ms=at_ms)

    def fail_and_retry(self, seq: int, error_type: str = "Busy", **kwargs: Any) -> Transition:
        """A retryable failure of step ``seq``, then the WakeUp that sends its retry."""
        self.fail(seq, error_type, retryable=True, **kwargs)
        assert self.record is not None
        failed = self.record.events[-1]
        assert isinstance(failed, ActivityFailed) and failed.retry_at_ms is not None, (
            f"workflow {self.workflow_id}: expected a retry waiting for its backoff; "
            f"history: {history_lines(self.record.events)}"
        )
        return self.wake()

    def started(
        self, seq: int, *, attempt: int | None = None, at_ms: int | None = None
    ) -> Transition:
        attempt = self.attempt_of(seq) if attempt is None else attempt
        return self.send(
            ActivityStarted(
                self.workflow_id,
                activity_id(self.workflow_id, seq, attempt, self.run_id),
                seq,
                attempt,
                self.now_ms + STEP_MS if at_ms is None else at_ms,  # when it is applied
            )
        )

    def heartbeat(self, seq: int, details: Any = None, *, attempt: int | None = None) -> Transition:
        attempt = self.attempt_of(seq) if attempt is None else attempt
        return self.send(
            ActivityHeartbeat(
                self.workflow_id,
                activity_id(self.workflow_id, seq, attempt, self.run_id),
                seq,
                attempt,
                self.now_ms + STEP_MS,
                None if details is None else encode_json(details),
            )
        )

    def attempt_of(self, seq: int) -> int:
        """The latest attempt of step ``seq`` in the current record."""
        assert self.record is not None, f"workflow {self.workflow_id} has no record yet"
        attempts = [
            e.attempt
            for e in self.record.events
            if isinstance(e, ActivityScheduled) and e.seq == seq
        ]
        assert attempts, (
            f"workflow {self.workflow_id}: step {seq} is not scheduled; "
            f"history: {history_lines(self.record.events)}"
        )
        return attempts[-1]

    def complete(self, seq: int, value: Any = None, *, attempt: int | None = None) -> Transition:
        attempt = self.attempt_of(seq) if attempt is None else attempt
        return self.send(
            completed(self.workflow_id, seq, attempt, value, self.now_ms, run_id=self.run_id)
        )

    def fail(
        self,
        seq: int,
        error_type: str = "Boom",
        *,
        retryable: bool = False,
        attempt: int | None = None,
        message: str = "it broke",
        effects_committed: bool = False,
    ) -> Transition:
        attempt = self.attempt_of(seq) if attempt is None else attempt
        return self.send(
            failed(
                self.workflow_id,
                seq,
                attempt,
                error_type,
                self.now_ms,
                retryable=retryable,
                message=message,
                run_id=self.run_id,
                effects_committed=effects_committed,
            )
        )

    @property
    def status(self) -> WorkflowStatus:
        assert self.record is not None, f"workflow {self.workflow_id} has no record yet"
        return self.record.status

    def tasks(self) -> list[str]:
        """The tasks of the last transition, in :func:`task_lines` form."""
        assert self.last is not None
        return task_lines(self.last.tasks)


def unstoppable_flow() -> tuple[
    Callable[[WorkflowContext, Any], Coroutine[Any, Any, Any]], list[int]
]:
    """A flow that swallows GeneratorExit more often than the engine tries to close a
    coroutine (so its first coroutine is kept as unstoppable; one more close stops it),
    and how often it did."""
    swallowed = [0]

    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        while True:
            try:
                await ctx.activity("p.poll")
            except GeneratorExit:
                swallowed[0] += 1
                if swallowed[0] > _CLOSE_ATTEMPTS:
                    raise

    return flow, swallowed
