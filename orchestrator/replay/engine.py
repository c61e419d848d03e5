"""State transitions of one workflow: (record, input, time) in, (record, tasks) out.

Rules of this module:
- Pure: no Kafka, no clock, no randomness; ``now_ms`` and ``run_id`` are arguments.
- Every input either changes the record (a new revision) or is ignored with a reason.
  Nothing here raises for anything workflow code does; the shell still parks a workflow
  (``park``) if the engine itself fails.
- A record whose status this code does not know was written by newer code: it is never
  overwritten, whatever the input.
- Retries are decided here from the policy recorded with the step, never by code replay,
  so a retry needs no user code at all. A retry after a backoff waits as
  ``ActivityFailed.retry_at_ms`` (the failure is not final, so the code does not run);
  the ``WakeUp`` that comes at that time sends the next attempt.
- ``WakeUp`` (the shell's timer index says ``wake_at_ms`` has come) fires everything due
  at ``now_ms`` in due-time order, in one transition: timers, retries, timeouts of running
  attempts; then the code runs once if any of them settled a command.
- Start reports and heartbeats only update the record; the code does not run.
- Every text that reaches a record from outside (participants, workflow code, the shell)
  goes through ``safe_text`` first, so every record this module returns can be encoded.
- Every record returned has ``wake_at_ms == next_wake(record)`` (``transition.revise``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final, NamedTuple

from orchestrator.protocol.failures import (
    MAX_NAME_CHARS,
    describe,
    failure_from_exception,
    safe_text,
)
from orchestrator.protocol.payloads import PayloadEncodingError, encode_json
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
    CancelWorkflow,
    CompletePromise,
    Failure,
    HistoryEvent,
    IfClosed,
    IfRunning,
    InboxBody,
    Payload,
    PromiseCompleted,
    PromiseCreated,
    QueryWorkflow,
    Reply,
    ReplyKind,
    ResumeWorkflow,
    RunRequest,
    SignalReceived,
    SignalWorkflow,
    StartWorkflow,
    TerminateWorkflow,
    TimerFired,
    UpdateAccepted,
    UpdateWorkflow,
    WakeUp,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
    parse_promise_id,
)
from orchestrator.replay.driver import Ask, HandlerOutcome, replay
from orchestrator.replay.limits import Limits, Tier, reserved_events
from orchestrator.replay.links import link
from orchestrator.replay.timing import (
    LOCAL,
    RETRY,
    TIMEOUTS,
    TIMER,
    StepState,
    dues,
    next_wake,
    report_start,
    scan,
    timeout_failure,
)
from orchestrator.replay.transition import (
    MAX_EARLIER_REQUESTS,
    CodeRun,
    Transition,
    close,
    revise,
    task_for,
)
from orchestrator.workflow import (
    MAX_DURATION_S,
    WorkflowRegistry,
    backoff_ms,
    signal_name_problem,
)

# Why an input changed nothing (Transition.ignored).
DUPLICATE_START: Final = "duplicate-start"
UNKNOWN_WORKFLOW: Final = "unknown-workflow"
WORKFLOW_CLOSED: Final = "workflow-closed"
UNKNOWN_STATUS: Final = "unknown-status"
STALE_ATTEMPT: Final = "stale-attempt"
ACTIVITY_ID_MISMATCH: Final = "activity-id-mismatch"
DUPLICATE_RESULT: Final = "duplicate-result"
NOT_STUCK: Final = "not-stuck"
STILL_STUCK: Final = "still-stuck"
UNKNOWN_INPUT: Final = "unknown-input"
LATE_RESULT: Final = "late-result"
"""A result for an attempt that already timed out (the engine recorded the timeout)."""
NOTHING_DUE: Final = "nothing-due"
"""A WakeUp with nothing due (early, or the record changed since), or for a STUCK record."""
ALREADY_STARTED: Final = "already-started"
"""A start report for an attempt whose start is already recorded."""
OVER_LIMIT: Final = "over-limit"
"""A start report or heartbeat the record has no room for (events or bytes)."""
DUPLICATE_SIGNAL: Final = "duplicate-signal"
"""A signal whose ``signal_id`` the workflow already received (a retried send)."""
DUPLICATE_CANCEL: Final = "duplicate-cancel"
"""A cancel for a workflow already asked to cancel."""
DUPLICATE_COMPLETION: Final = "duplicate-completion"
"""A completion for a promise that is already completed or failed (it completes once)."""
PROMISE_REFUSED: Final = "promise-refused"
"""A completion naming no promise of this run of the workflow, or with both or neither of a
value and a failure. The shell dead-letters it."""
OTHER_RUN: Final = "other-run"
"""A parent's cancel or terminate for a child id whose current run that parent step did not
start (the child closed, and the id was started again since), or that no longer exists."""
START_REFUSED: Final = "start-refused"
"""A start whose request id is longer than ``MAX_REQUEST_ID_CHARS`` (it could not be
recognised when retried, so it is refused rather than risk a second run)."""
DUPLICATE_UPDATE: Final = "duplicate-update"
"""An update whose ``update_id`` the workflow already took (answered again)."""
UPDATE_REFUSED: Final = "update-refused"
"""An update that was not applied: its validator rejected it, no handler takes it, the
workflow is parked, or it does not fit; the caller's reply says which."""
SIGNAL_REFUSED: Final = "signal-refused"
"""A signal the workflow cannot take: its record has no room for it (events or bytes), its
name is invalid, or its start names another workflow. The shell dead-letters it."""

IGNORED_REASONS: Final = (
    DUPLICATE_START,
    UNKNOWN_WORKFLOW,
    WORKFLOW_CLOSED,
    UNKNOWN_STATUS,
    STALE_ATTEMPT,
    ACTIVITY_ID_MISMATCH,
    DUPLICATE_RESULT,
    NOT_STUCK,
    STILL_STUCK,
    UNKNOWN_INPUT,
    LATE_RESULT,
    NOTHING_DUE,
    ALREADY_STARTED,
    OVER_LIMIT,
    DUPLICATE_SIGNAL,
    SIGNAL_REFUSED,
    DUPLICATE_COMPLETION,
    PROMISE_REFUSED,
    DUPLICATE_CANCEL,
    DUPLICATE_UPDATE,
    UPDATE_REFUSED,
    START_REFUSED,
    OTHER_RUN,
)
# Ignore reasons whose input the shell dead-letters instead of counting: nothing else will
# ever take it (a retried send of the same input meets the same answer).
REJECTED_REASONS: Final = frozenset((UNKNOWN_WORKFLOW, SIGNAL_REFUSED, PROMISE_REFUSED))
# A start's request id longer than this is not kept in the record (a UUID is 36).
MAX_REQUEST_ID_CHARS: Final = 200
# A cancel's reason is kept up to this many characters.
MAX_REASON_CHARS: Final = 1_000
# A participant's retry_after_ms beyond this is taken as this (100 years).
MAX_RETRY_AFTER_MS: Final = MAX_DURATION_S * 1000

DEFAULT_LIMITS: Final = Limits()


def advance(
    record: WorkflowRecord | None,
    body: InboxBody | WakeUp,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits = DEFAULT_LIMITS,
    *,
    run_id: str = "",
) -> Transition:
    """Apply one inbox input to a workflow.

    Args:
        record: the workflow's current state, or None if it does not exist (yet).
        body: a start request, an activity result, a start report, a heartbeat, a resume
            request, a signal, or a ``WakeUp`` (the shell's timer index: ``record.wake_at_ms`` has
            come; see ``next_wake``).
        now_ms: the orchestrator's clock, recorded in new events; a WakeUp fires what is
            due at it.
        registry: the workflow functions to replay.
        limits: size bounds.
        run_id: the run id a start (or a signal-with-start that starts) gives the new
            record; every activity id of the run carries it. Unused by other inputs.

    Returns:
        The new record and the tasks to send, or ``ignored`` with the reason (one of
        ``IGNORED_REASONS``). A start of a type the registry lacks is kept as a STUCK
        record (resumed once a deploy registers the type). The new record's
        ``wake_at_ms`` says when to feed it the next ``WakeUp`` (None: never).
    """
    return link(record, body, _dispatch(record, body, now_ms, registry, limits, run_id), now_ms)


def _dispatch(
    record: WorkflowRecord | None,
    body: InboxBody | WakeUp,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
    run_id: str,
) -> Transition:
    if record is not None and record.status is WorkflowStatus.UNKNOWN:
        failure = Failure(
            "UnknownStatus", "the workflow's record was written by newer code; upgrade first"
        )
        return Transition(
            None, ignored=UNKNOWN_STATUS, reply=_refusal(body, record, failure, now_ms)
        )
    if isinstance(body, StartWorkflow):
        return _start(record, body, now_ms, registry, limits, run_id)
    if isinstance(body, ActivityResult):
        return _apply_result(record, body, now_ms, registry, limits)
    if isinstance(body, WakeUp):
        return _wake(record, now_ms, registry, limits)
    if isinstance(body, ActivityStarted | ActivityHeartbeat):
        return _apply_report(record, body, now_ms, limits)
    if isinstance(body, ResumeWorkflow):
        return _resume(record, now_ms, registry, limits)
    if isinstance(body, SignalWorkflow):
        return _apply_signal(record, body, now_ms, registry, limits, run_id)
    if isinstance(body, CompletePromise):
        return _apply_completion(record, body, now_ms, registry, limits)
    if isinstance(body, CancelWorkflow):
        return _apply_cancel(record, body, now_ms, registry, limits)
    if isinstance(body, UpdateWorkflow):
        return _apply_update(record, body, now_ms, registry, limits)
    if isinstance(body, TerminateWorkflow):
        return _apply_terminate(record, body, now_ms, limits)
    return Transition(None, ignored=UNKNOWN_INPUT)


def _apply_terminate(
    record: WorkflowRecord | None, terminate: TerminateWorkflow, now_ms: int, limits: Limits
) -> Transition:
    """Close the workflow as TERMINATED now; its code does not run."""
    if terminate.parent is not None and (record is None or record.parent != terminate.parent):
        return Transition(None, ignored=OTHER_RUN)
    if record is None or record.status.terminal:
        return _not_open(record)
    reason = safe_text(terminate.reason, MAX_REASON_CHARS) or "terminated"
    ended = close(record, now_ms, WorkflowStatus.TERMINATED, failure=Failure("Terminated", reason))
    if not limits.fits(ended, Tier.GRACE):
        ended = close(record, now_ms, WorkflowStatus.TERMINATED)
    return Transition(ended)


# --- starts and id reuse -------------------------------------------------------------


class ClosedRun(NamedTuple):
    """What the shell keeps of a workflow's closed last run: enough to apply id reuse and
    to recognise a retried start."""

    status: WorkflowStatus
    run_id: str
    request_id: str | None
    earlier: tuple[RunRequest, ...] = ()


def _start(
    record: WorkflowRecord | None,
    start: StartWorkflow,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
    run_id: str,
) -> Transition:
    """A start for an id that has no run, or whose run is open (``start.if_running``)."""
    if record is not None and record.status.terminal:
        closed = ClosedRun(record.status, record.run_id, record.request_id, record.earlier_requests)
        return _start_again(closed, start, now_ms, registry, limits, run_id)
    current = None if record is None else (record.run_id, record.status)
    known = (
        ()
        if record is None
        else _requests_of(record.request_id, record.run_id, record.earlier_requests)
    )
    answered = _answered_before(start, known, current, now_ms)
    if answered is not None:
        return answered
    if record is None:
        return _new_run(start, now_ms, registry, limits, run_id, ())
    policy = start.if_running or IfRunning.USE_EXISTING
    if policy is IfRunning.TERMINATE_EXISTING:
        why = Failure(
            "Terminated",
            f"terminated by a start with if_running=TERMINATE_EXISTING at {now_ms}",
        )
        ended = close(record, now_ms, WorkflowStatus.TERMINATED, failure=why)
        if not limits.fits(ended, Tier.GRACE):
            ended = close(record, now_ms, WorkflowStatus.TERMINATED)
        fresh = _new_run(start, now_ms, registry, limits, run_id, known)
        return dataclasses.replace(fresh, replaced=ended)
    if policy is IfRunning.FAIL:
        failure = Failure(
            "WorkflowAlreadyRunning",
            f"workflow {safe_text(record.workflow_id, 200)!r} has an open run "
            f"({record.run_id}, {record.status.value}) and the start says if_running=FAIL",
        )
        reply = start_reply(start, record.run_id, record.status, now_ms, failure=failure)
    else:
        reply = start_reply(start, record.run_id, record.status, now_ms)
    return Transition(None, ignored=DUPLICATE_START, reply=reply)


def start_again(
    closed: ClosedRun,
    start: StartWorkflow,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits = DEFAULT_LIMITS,
    *,
    run_id: str,
) -> Transition:
    """A start for an id whose last run has closed, decided by ``start.if_closed`` (None:
    REJECT): a new run (a new record that replaces the closed one) or a refusal.

    A start carrying the request id of the closed run's start, or of one of the earlier
    runs the record remembers, is a retried send: it is answered as the first time
    (``created``) and starts nothing.
    """
    transition = _start_again(closed, start, now_ms, registry, limits, run_id)
    return link(None, start, transition, now_ms)


def _start_again(
    closed: ClosedRun,
    start: StartWorkflow,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
    run_id: str,
) -> Transition:
    known = _requests_of(closed.request_id, closed.run_id, closed.earlier)
    answered = _answered_before(start, known, (closed.run_id, closed.status), now_ms)
    if answered is not None:
        return answered
    policy = start.if_closed or IfClosed.REJECT
    if policy is IfClosed.ALLOW or (
        policy is IfClosed.ALLOW_IF_FAILED and closed.status is not WorkflowStatus.COMPLETED
    ):
        return _new_run(start, now_ms, registry, limits, run_id, known)
    failure = Failure(
        "WorkflowIdReuseRejected",
        f"workflow {safe_text(start.workflow_id, 200)!r} ended {closed.status.value} "
        f"(run {closed.run_id}) and the start says if_closed={policy.value}",
    )
    reply = start_reply(start, closed.run_id, closed.status, now_ms, failure=failure)
    return Transition(None, ignored=DUPLICATE_START, reply=reply)


def _requests_of(
    request_id: str | None, run_id: str, earlier: tuple[RunRequest, ...]
) -> tuple[RunRequest, ...]:
    """The starts a record knows, newest first: its own run's, then earlier runs'."""
    own = () if request_id is None else (RunRequest(request_id, run_id),)
    return (*own, *earlier)[: MAX_EARLIER_REQUESTS + 1]


def _answered_before(
    start: StartWorkflow,
    known: tuple[RunRequest, ...],
    current: tuple[str, WorkflowStatus] | None,
    now_ms: int,
) -> Transition | None:
    """The refusal of a start whose request id cannot be kept, or the first answer again
    for a start whose request id made a run the record knows (a retried send); None for
    a new request."""
    rid = start.request_id
    if rid is None:
        return None
    if not rid or len(rid) > MAX_REQUEST_ID_CHARS:
        failure = Failure(
            "InvalidRequest",
            f"a request id is 1 to {MAX_REQUEST_ID_CHARS} characters, got {len(rid)}: "
            "another could not be recognised when the start is retried",
        )
        run_id, status = current or ("", None)
        reply = start_reply(start, run_id, status, now_ms, failure=failure)
        return Transition(None, ignored=START_REFUSED, reply=reply)
    for earlier in known:
        if earlier.request_id == rid:
            # The same request again: the same answer, nothing changes. The status is
            # the run's own only if it is still the id's latest.
            status = current[1] if current is not None and current[0] == earlier.run_id else None
            reply = start_reply(start, earlier.run_id, status, now_ms, created=True)
            return Transition(None, ignored=DUPLICATE_START, reply=reply)
    return None


def _new_run(
    start: StartWorkflow,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
    run_id: str,
    earlier: tuple[RunRequest, ...],
) -> Transition:
    """A new run for ``start``; ``earlier``: the starts of the runs it replaces."""
    fresh = _fresh(start, now_ms, run_id)
    if earlier:
        fresh = dataclasses.replace(fresh, earlier_requests=earlier[:MAX_EARLIER_REQUESTS])
    transition = CodeRun(fresh, now_ms, registry, limits).transition()
    record = transition.record
    assert record is not None  # a code run always leaves a record
    # The run the start made, even if it continued as new at once (as a retried start
    # is answered from the starts the next run remembers).
    made = fresh.run_id if transition.replaced is not None else record.run_id
    reply = start_reply(start, made, record.status, now_ms, created=True)
    return dataclasses.replace(transition, reply=reply)


def start_reply(
    start: StartWorkflow,
    run_id: str,
    status: WorkflowStatus | None,
    now_ms: int,
    *,
    created: bool = False,
    failure: Failure | None = None,
) -> Reply | None:
    """The answer to ``start`` (None if it asked for none): about run ``run_id``, in
    ``status``; ``created`` if it made that run, ``failure`` if it was refused."""
    if start.request_id is None:
        return None
    return Reply(
        start.request_id,
        ReplyKind.START,
        start.workflow_id,
        run_id,
        failure is None,
        "" if status is None else status.value,
        now_ms,
        created=created,
        failure=failure,
    )


def _refusal(
    body: InboxBody | WakeUp, record: WorkflowRecord | None, failure: Failure, now_ms: int
) -> Reply | None:
    """``refusal`` about ``record``'s run."""
    if record is None:
        return refusal(body, failure, now_ms)
    return refusal(body, failure, now_ms, run_id=record.run_id, status=record.status)


def refusal(
    body: InboxBody | WakeUp,
    failure: Failure,
    now_ms: int,
    *,
    run_id: str = "",
    status: WorkflowStatus | None = None,
) -> Reply | None:
    """The failure reply to a request that asked for one (a start with a request id, a
    query, an update), about run ``run_id`` in ``status``; None for other inputs."""
    if isinstance(body, StartWorkflow) and body.request_id is not None:
        request_id, kind = body.request_id, ReplyKind.START
    elif isinstance(body, UpdateWorkflow):
        request_id, kind = body.update_id, ReplyKind.UPDATE
    elif isinstance(body, QueryWorkflow):
        request_id, kind = body.request_id, ReplyKind.QUERY
    else:
        return None
    return Reply(
        request_id,
        kind,
        body.workflow_id or "",
        run_id,
        False,
        "" if status is None else status.value,
        now_ms,
        failure=failure,
    )


# --- queries and updates -------------------------------------------------------------


def answer_query(
    record: WorkflowRecord | None, query: QueryWorkflow, now_ms: int, registry: WorkflowRegistry
) -> Reply:
    """The answer to ``query``: its handler's value against the workflow's current state,
    replayed from ``record``. Writes nothing; never raises for what the code does."""
    if record is None:
        failure = Failure(
            "WorkflowNotFound",
            f"no open workflow {safe_text(query.workflow_id, 200)!r} (a closed workflow's "
            "state is not kept in memory: use its result)",
        )
        return _answer(query, record, HandlerOutcome(error=None), now_ms, failure)
    outcome = _ask(record, Ask("query", query.name, None), query.args, registry)
    if isinstance(outcome, Failure):
        return _answer(query, record, HandlerOutcome(), now_ms, outcome)
    return _answer(query, record, outcome, now_ms, None)


def _ask(
    record: WorkflowRecord, ask: Ask, args: Payload, registry: WorkflowRegistry
) -> HandlerOutcome | Failure:
    """Replay ``record`` and put ``ask`` (with ``args`` decoded) to its handlers; a
    Failure when that cannot be done."""
    fn = registry.get(record.workflow_type)
    if fn is None:
        return Failure(
            "UnknownWorkflowType",
            f"workflow type {safe_text(record.workflow_type, MAX_NAME_CHARS)!r} is not "
            "registered in this orchestrator",
        )
    try:
        input_value: Any = registry.converter.from_payload(record.input)
        value: Any = registry.converter.from_payload(args)
    except Exception as exc:  # not JSON, or nested past the recursion limit
        return Failure("InvalidArgument", f"not readable JSON: {describe(exc)}")
    result = replay(
        fn,
        record.workflow_id,
        record.workflow_type,
        input_value,
        record.events,
        record.started_at_ms,
        run_id=record.run_id,
        ask=dataclasses.replace(ask, value=value),
        converter=registry.converter,
    )
    if result.problem is not None or result.answer is None:
        problem = result.problem or Failure("WorkflowStuck", "the code did not replay")
        return Failure(
            "WorkflowStuck",
            f"the workflow's code cannot be replayed: {problem.error_type}: {problem.message}",
        )
    return result.answer


def _answer(
    query: QueryWorkflow,
    record: WorkflowRecord | None,
    outcome: HandlerOutcome,
    now_ms: int,
    failure: Failure | None,
) -> Reply:
    payload, failure = _outcome_payload(outcome, failure, "UnknownQuery")
    return Reply(
        query.request_id,
        ReplyKind.QUERY,
        query.workflow_id,
        "" if record is None else record.run_id,
        failure is None,
        "" if record is None else record.status.value,
        now_ms,
        payload=payload,
        failure=failure,
    )


def _outcome_payload(
    outcome: HandlerOutcome, failure: Failure | None, missing_type: str
) -> tuple[Payload | None, Failure | None]:
    """A handler's outcome as a reply's payload or failure."""
    if failure is not None:
        return None, failure
    if outcome.error is not None:
        if isinstance(outcome.error, LookupError) and outcome.missing:
            return None, Failure(missing_type, safe_text(outcome.error))
        return None, failure_from_exception(outcome.error, retryable=False)
    if outcome.payload is not None:
        return outcome.payload, None
    try:
        return encode_json(outcome.value), None
    except PayloadEncodingError as exc:
        return None, Failure("PayloadEncodingError", safe_text(exc))
    except BaseException as exc:  # user hooks of the value raise anything
        return None, Failure("PayloadEncodingError", f"not JSON-serialisable: {describe(exc)}")


def _apply_update(
    record: WorkflowRecord | None,
    update: UpdateWorkflow,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
) -> Transition:
    """Validate ``update`` against the current state; if it passes, record it and run the
    code (its handler runs where it is recorded); answer the caller either way."""

    def refuse(reason: str, failure: Failure) -> Transition:
        return Transition(None, ignored=reason, reply=_refusal(update, record, failure, now_ms))

    if record is None:
        failure = Failure("WorkflowNotFound", f"no workflow {safe_text(update.workflow_id, 200)!r}")
        return refuse(UPDATE_REFUSED, failure)
    if record.status.terminal:
        failure = Failure(
            "WorkflowClosed", f"the workflow ended {record.status.value}; updates need it open"
        )
        return refuse(WORKFLOW_CLOSED, failure)
    if record.status is not WorkflowStatus.RUNNING:
        failure = Failure(
            "WorkflowStuck",
            "the workflow is parked; resume it (sagaline resume) before updating it",
        )
        return refuse(UPDATE_REFUSED, failure)
    problem = signal_name_problem(update.name)
    if problem is not None or not update.update_id:
        why = problem or "an update needs a non-empty update_id"
        why = why.replace("a signal", "an update").replace("signal", "update")
        return refuse(UPDATE_REFUSED, Failure("InvalidUpdate", why))
    for event in record.events:
        if type(event) is UpdateAccepted and event.update_id == update.update_id:
            return _answer_again(record, event, now_ms, registry)
    if record.earlier_inputs and f"u:{update.update_id}" in record.earlier_inputs:
        failure = Failure(
            "AnswerUnavailable",
            f"update {safe_text(update.update_id, 200)!r} was applied by an earlier run of "
            "the workflow, which continued as new since; it is not applied again, and its "
            "answer is no longer kept",
        )
        return Transition(
            None, ignored=DUPLICATE_UPDATE, reply=_refusal(update, record, failure, now_ms)
        )
    validated = _ask(record, Ask("validate", update.name, None), update.args, registry)
    if isinstance(validated, Failure):
        return refuse(UPDATE_REFUSED, validated)
    if validated.error is not None:
        if validated.missing:
            return refuse(UPDATE_REFUSED, Failure("UnknownUpdate", safe_text(validated.error)))
        rejected = failure_from_exception(validated.error, retryable=False)
        failure = Failure("UpdateRejected", f"{rejected.error_type}: {rejected.message}")
        return refuse(UPDATE_REFUSED, failure)
    accepted = UpdateAccepted(update.update_id, update.name, update.args, now_ms)
    if not _outside_room(record, accepted, now_ms, limits):
        failure = Failure(
            "UpdateTooLarge", "the workflow's record has no room for this update (events or bytes)"
        )
        return refuse(UPDATE_REFUSED, failure)
    run = CodeRun(record, now_ms, registry, limits, outcome=accepted)
    transition = run.transition()
    changed = transition.record
    if run.last_resort or changed is None or changed.status is WorkflowStatus.STUCK:
        # What the update led to cannot be kept as it is: refuse it, change nothing.
        failure = (changed.failure if changed is not None else None) or Failure(
            "UpdateTooLarge", "what the update led to does not fit the workflow's record"
        )
        return refuse(UPDATE_REFUSED, failure)
    outcome = run.updates.get(update.update_id, HandlerOutcome())
    return dataclasses.replace(
        transition, reply=_update_reply(update.update_id, changed, outcome, now_ms)
    )


def _answer_again(
    record: WorkflowRecord, event: UpdateAccepted, now_ms: int, registry: WorkflowRegistry
) -> Transition:
    """A retried update: answer with what its handler did, from a replay; a failure when
    the code deployed now cannot replay it (never a made-up success)."""
    fn = registry.get(record.workflow_type)
    outcome: HandlerOutcome | None = None
    if fn is not None:
        try:
            result = replay(
                fn,
                record.workflow_id,
                record.workflow_type,
                registry.converter.from_payload(record.input),
                record.events,
                record.started_at_ms,
                run_id=record.run_id,
                converter=registry.converter,
            )
            outcome = result.updates.get(event.update_id)
        except Exception:  # the input is not JSON: the start failed, cannot get here
            outcome = None
    if outcome is None:
        failure = Failure(
            "AnswerUnavailable",
            f"update {safe_text(event.update_id, 200)!r} was applied, but the code deployed "
            "now cannot replay it to give its answer again",
        )
        reply = _refusal(_as_update(record, event), record, failure, now_ms)
        return Transition(None, ignored=DUPLICATE_UPDATE, reply=reply)
    reply = _update_reply(event.update_id, record, outcome, now_ms)
    return Transition(None, ignored=DUPLICATE_UPDATE, reply=reply)


def _as_update(record: WorkflowRecord, event: UpdateAccepted) -> UpdateWorkflow:
    return UpdateWorkflow(record.workflow_id, event.update_id, event.name, event.args, event.at_ms)


def _update_reply(
    update_id: str, record: WorkflowRecord, outcome: HandlerOutcome, now_ms: int
) -> Reply:
    payload, failure = _outcome_payload(outcome, None, "UnknownUpdate")
    return Reply(
        update_id,
        ReplyKind.UPDATE,
        record.workflow_id,
        record.run_id,
        failure is None,
        record.status.value,
        now_ms,
        payload=payload,
        failure=failure,
    )


def _outside_room(
    record: WorkflowRecord, event: SignalReceived | UpdateAccepted, now_ms: int, limits: Limits
) -> bool:
    """Whether ``event`` from outside (a signal, an update) fits: such events may take a
    quarter of the history's events and of its bytes, so a flood nobody waits for leaves
    the steps room."""
    events = (*record.events, event)
    outside = sum(type(e) is SignalReceived or type(e) is UpdateAccepted for e in events)
    budget = limits.byte_budget(Tier.NORMAL)
    return not (
        outside > max(1, limits.max_events // 4)
        or not _room(events, Tier.NORMAL, limits)
        or (budget is not None and sum(_outside_bytes(e) for e in events) > budget // 4)
        or not limits.fits(revise(record, now_ms, events=events), Tier.NORMAL)
    )


def _outside_bytes(event: HistoryEvent) -> int:
    if type(event) is SignalReceived:
        return len(event.payload.data) + len(event.name) + len(event.signal_id)
    if type(event) is UpdateAccepted:
        return len(event.args.data) + len(event.name) + len(event.update_id)
    return 0


def _apply_signal(
    record: WorkflowRecord | None,
    signal: SignalWorkflow,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
    run_id: str,
) -> Transition:
    """Record the signal in the workflow's history and run its code, which may be waiting
    for it; with ``start`` and no workflow, start it first (signal-with-start)."""
    if signal_name_problem(signal.name) is not None or not signal.signal_id:
        return Transition(None, ignored=SIGNAL_REFUSED)
    if record is None:
        start = signal.start
        if start is None:
            return Transition(None, ignored=UNKNOWN_WORKFLOW)
        if start.workflow_id != signal.workflow_id:
            return Transition(None, ignored=SIGNAL_REFUSED)
        base = _fresh(start, now_ms, run_id)
    else:
        if record.status.terminal:
            return Transition(None, ignored=WORKFLOW_CLOSED)
        if any(
            type(e) is SignalReceived and e.signal_id == signal.signal_id for e in record.events
        ) or (record.earlier_inputs and f"s:{signal.signal_id}" in record.earlier_inputs):
            return Transition(None, ignored=DUPLICATE_SIGNAL)
        base = record
    received = SignalReceived(signal.name, signal.payload, signal.signal_id, now_ms)
    # A signal that does not fit is refused, never allowed to close the workflow: the
    # sender made the mistake, not the workflow.
    if not _outside_room(base, received, now_ms, limits):
        return Transition(None, ignored=SIGNAL_REFUSED)
    run = CodeRun(base, now_ms, registry, limits, outcome=received)
    transition = run.transition()
    if run.last_resort:
        return Transition(None, ignored=SIGNAL_REFUSED)  # what it led to did not fit
    return transition


def _apply_cancel(
    record: WorkflowRecord | None,
    cancel: CancelWorkflow,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
) -> Transition:
    """Record the request and run the code, which sees WorkflowCancelledError at its await."""
    if cancel.parent is not None and (record is None or record.parent != cancel.parent):
        return Transition(None, ignored=OTHER_RUN)
    if record is None or record.status.terminal:
        return _not_open(record)
    if any(type(e) is CancelRequested for e in record.events):
        return Transition(None, ignored=DUPLICATE_CANCEL)
    requested = CancelRequested(safe_text(cancel.reason, MAX_REASON_CHARS), now_ms)
    # Compensations run after it: the grace budget, as theirs.
    if not limits.fits(revise(record, now_ms, events=(*record.events, requested)), Tier.GRACE):
        requested = CancelRequested("", now_ms)
    return CodeRun(record, now_ms, registry, limits, outcome=requested).transition()


def _not_open(record: WorkflowRecord | None) -> Transition:
    """An input for a workflow that does not exist, or has closed."""
    return Transition(None, ignored=UNKNOWN_WORKFLOW if record is None else WORKFLOW_CLOSED)


def _apply_completion(
    record: WorkflowRecord | None,
    completion: CompletePromise,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
) -> Transition:
    """Settle the promise ``completion`` names and run the code, which may await it."""
    if record is None or record.status.terminal:
        return _not_open(record)
    parsed = parse_promise_id(completion.promise_id)
    seq = -1
    if parsed is not None and parsed[:2] == (record.workflow_id, record.run_id):
        seq = parsed[2]
    created = [e for e in record.events if type(e) is PromiseCreated and e.seq == seq]
    if not created or (completion.payload is None) == (completion.failure is None):
        return Transition(None, ignored=PROMISE_REFUSED)
    if any(type(e) is PromiseCompleted and e.seq == seq for e in record.events):
        return Transition(None, ignored=DUPLICATE_COMPLETION)
    failure = None if completion.failure is None else _safe_failure(completion.failure)
    done = PromiseCompleted(seq, now_ms, completion.payload, failure)
    # The budget of an ordinary step's result: what compensations need stays theirs.
    if not limits.fits(revise(record, now_ms, events=(*record.events, done)), Tier.NORMAL):
        # The value does not fit: the workflow hears that at its await instead.
        size = 0 if completion.payload is None else len(completion.payload.data)
        message = (
            f"the value completing promise {safe_text(created[0].name, MAX_NAME_CHARS)!r}, "
            f"{size} bytes, does not fit in the workflow's record"
        )
        done = PromiseCompleted(seq, now_ms, None, Failure("RecordTooLarge", message))
    return CodeRun(record, now_ms, registry, limits, outcome=done).transition()


def _fresh(start: StartWorkflow, now_ms: int, run_id: str) -> WorkflowRecord:
    return WorkflowRecord(
        workflow_id=_encodable(start.workflow_id),
        workflow_type=_encodable(start.workflow_type),
        status=WorkflowStatus.RUNNING,
        input=start.input,
        started_at_ms=now_ms,
        updated_at_ms=now_ms,
        revision=0,
        run_id=_encodable(run_id),
        request_id=_kept_request_id(start.request_id),
        parent=start.parent,
    )


def _kept_request_id(request_id: str | None) -> str | None:
    if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
        return None  # refused by _start; a signal's start keeps none
    return _encodable(request_id)


def _resume(
    record: WorkflowRecord | None, now_ms: int, registry: WorkflowRegistry, limits: Limits
) -> Transition:
    if record is None:
        return Transition(None, ignored=UNKNOWN_WORKFLOW)
    if record.status.terminal:
        return Transition(None, ignored=WORKFLOW_CLOSED)
    if record.status is not WorkflowStatus.STUCK:
        return Transition(None, ignored=NOT_STUCK)
    # Not through the replay cache: this replay must close the coroutine at its end, as
    # the one that parked the workflow did, so code that will not stop stays parked on
    # an instance that never saw it refuse (after a restart or a rebalance).
    transition = CodeRun(record, now_ms, registry, limits, cached=False).transition()
    again = transition.record
    if (
        again is not None
        and again.status is WorkflowStatus.STUCK
        and again.failure == record.failure
        and again.events == record.events
    ):
        # Re-driving after every restore must write nothing while the code is unchanged.
        return Transition(None, ignored=STILL_STUCK)
    if again is not None and again.status is WorkflowStatus.RUNNING:
        return dataclasses.replace(transition, record=_heartbeats_from(again, now_ms))
    return transition


def _heartbeats_from(record: WorkflowRecord, now_ms: int) -> WorkflowRecord:
    """``record`` with the heartbeat clock of every running attempt restarted at ``now_ms``.

    While the workflow was parked its heartbeats were not kept (they only feed timeouts,
    which a parked workflow does not run): counting from the last one kept would time a
    live attempt out the moment the workflow resumes, and start a second one beside it.
    """
    refreshed: list[AttemptHeartbeat] = []
    for step in scan(record.events).steps.values():
        latest = step.latest
        if latest.heartbeat_timeout_ms is None or step.outcome is not None or step.started is None:
            continue
        last = step.heartbeat
        same_attempt = last is not None and last.attempt == latest.attempt
        details = last.details if last is not None else None
        if not same_attempt or last is None or last.at_ms < now_ms:
            refreshed.append(AttemptHeartbeat(latest.seq, latest.attempt, now_ms, details))
    if not refreshed:
        return record
    seqs = {beat.seq for beat in refreshed}
    kept = tuple(
        e for e in record.events if not (isinstance(e, AttemptHeartbeat) and e.seq in seqs)
    )
    events = (*kept, *refreshed)
    updated = dataclasses.replace(record, events=events)
    object.__setattr__(updated, "wake_at_ms", next_wake(updated))
    return updated


def _latest_attempt(events: tuple[HistoryEvent, ...], seq: int) -> ActivityScheduled | None:
    for event in reversed(events):
        if isinstance(event, ActivityScheduled) and event.seq == seq:
            return event
    return None


def _outcome_of(
    events: tuple[HistoryEvent, ...], seq: int, attempt: int
) -> ActivityCompleted | ActivityFailed | None:
    for event in reversed(events):
        if (
            isinstance(event, ActivityCompleted | ActivityFailed)
            and event.seq == seq
            and event.attempt == attempt
        ):
            return event
    return None


def _timed_out(outcome: ActivityCompleted | ActivityFailed | None) -> bool:
    return isinstance(outcome, ActivityFailed) and outcome.failure.error_type in TIMEOUTS


def _apply_result(
    record: WorkflowRecord | None,
    result: ActivityResult,
    now_ms: int,
    registry: WorkflowRegistry,
    limits: Limits,
) -> Transition:
    if record is None or record.status.terminal:
        return _not_open(record)
    step = _latest_attempt(record.events, result.seq)
    expected = activity_id(record.workflow_id, result.seq, result.attempt, record.run_id)
    if step is None or step.attempt != result.attempt:
        if (
            step is not None
            and result.activity_id == expected
            and _timed_out(_outcome_of(record.events, result.seq, result.attempt))
        ):
            return Transition(None, ignored=LATE_RESULT)
        return Transition(None, ignored=STALE_ATTEMPT)
    if result.activity_id != expected:
        return Transition(None, ignored=ACTIVITY_ID_MISMATCH)
    recorded = _outcome_of(record.events, result.seq, result.attempt)
    if recorded is not None:
        return Transition(None, ignored=LATE_RESULT if _timed_out(recorded) else DUPLICATE_RESULT)
    outcome = _outcome(result, now_ms)
    if isinstance(outcome, ActivityFailed):
        waiting = _after_failure(record, step, outcome, now_ms, limits)
        if waiting is not None:
            return waiting
        # Not retried (the policy, the deadline or the limits): the failure is final.
    return CodeRun(record, now_ms, registry, limits, outcome=outcome, step=step).transition()


def _outcome(result: ActivityResult, now_ms: int) -> HistoryEvent:
    if result.status is ActivityStatus.COMPLETED:
        if result.result is not None:
            return ActivityCompleted(result.seq, result.attempt, result.result, now_ms)
        failure = Failure("MissingResult", "participant reported success without a result")
    elif result.failure is None:
        failure = Failure("UnknownError", "participant gave no failure")
    else:
        failure = _safe_failure(result.failure)
    return ActivityFailed(result.seq, result.attempt, failure, now_ms)


def _should_retry(step: ActivityScheduled, failure: Failure) -> bool:
    # A failure whose effects committed is never retried: a new attempt would repeat them.
    return (
        failure.retryable
        and not failure.effects_committed
        and step.attempt < step.max_attempts
        and failure.error_type not in step.non_retryable
    )


def _retry_interval(
    events: tuple[HistoryEvent, ...], step: ActivityScheduled, failure: Failure, now_ms: int
) -> int | None:
    """Milliseconds until the next attempt of ``step`` after ``failure``, or None if the
    failure is final: not retryable by the policy, or the next attempt could not begin
    before the step's schedule-to-close deadline."""
    if not _should_retry(step, failure):
        return None
    if failure.retry_after_ms is not None:
        interval = failure.retry_after_ms
    else:
        interval = backoff_ms(
            step.initial_interval_ms,
            step.backoff_coefficient,
            step.maximum_interval_ms,
            step.attempt,
        )
    if step.schedule_to_close_ms is not None:
        first = _first_attempt(events, step)
        if now_ms + interval >= first.at_ms + step.schedule_to_close_ms:
            return None
    return interval


def _first_attempt(events: tuple[HistoryEvent, ...], step: ActivityScheduled) -> ActivityScheduled:
    for event in events:
        if isinstance(event, ActivityScheduled) and event.seq == step.seq:
            return event
    return step


def _next_attempt(step: ActivityScheduled, now_ms: int, waited_ms: int) -> ActivityScheduled:
    """The attempt after ``step``, sent at ``now_ms`` after a backoff of ``waited_ms``."""
    return dataclasses.replace(step, attempt=step.attempt + 1, at_ms=now_ms, backoff_ms=waited_ms)


def _tier(step: ActivityScheduled) -> Tier:
    return Tier.GRACE if step.compensation else Tier.NORMAL


def _room(events: tuple[HistoryEvent, ...], tier: Tier, limits: Limits) -> bool:
    """Whether ``events`` keep what they reserve within the event budget of ``tier``."""
    return reserved_events(events) <= limits.event_budget(tier)


def _after_failure(
    record: WorkflowRecord,
    step: ActivityScheduled,
    failed: ActivityFailed,
    now_ms: int,
    limits: Limits,
) -> Transition | None:
    """The record once ``failed`` is recorded and its retry sent or scheduled; None if
    the failure is final (the policy, the deadline, or no room for the retry)."""
    interval = _retry_interval(record.events, step, failed.failure, now_ms)
    if interval is None:
        return None
    if interval <= 0:
        return _retry(record, step, failed, now_ms, limits)
    pending = dataclasses.replace(failed, retry_at_ms=now_ms + interval)
    events = (*record.events, pending)
    tier = _tier(step)
    if not _room(events, tier, limits):
        return None
    # The retry is measured now, so it still fits when it is sent (unless other steps
    # fill the record meanwhile: then the failure becomes final at the wake-up).
    later = _next_attempt(step, now_ms + interval, interval)
    if not limits.fits(revise(record, now_ms, events=(*events, later)), tier):
        return None
    return Transition(revise(record, now_ms, events=events))


def _retry(
    record: WorkflowRecord,
    step: ActivityScheduled,
    failed: ActivityFailed,
    now_ms: int,
    limits: Limits,
) -> Transition | None:
    retry = _next_attempt(step, now_ms, 0)
    events = (*record.events, failed, retry)
    tier = _tier(step)
    if not _room(events, tier, limits):
        return None
    updated = revise(record, now_ms, events=events)
    if not limits.fits(updated, tier):
        return None
    return Transition(updated, tasks=(task_for(updated, retry),))


# --- durable time ------------------------------------------------------------------


def _wake(
    record: WorkflowRecord | None, now_ms: int, registry: WorkflowRegistry, limits: Limits
) -> Transition:
    """Fire everything due at ``now_ms``, earliest first, then run the code once if a
    command settled (a timer fired, a step failed for good)."""
    if record is None:
        return Transition(None, ignored=UNKNOWN_WORKFLOW)
    if record.status.terminal:
        return Transition(None, ignored=WORKFLOW_CLOSED)
    if record.status is not WorkflowStatus.RUNNING:
        return Transition(None, ignored=NOTHING_DUE)
    state = scan(record.events)
    # A local activity's pending attempt is the runtime's to run (runtime/local.py): the
    # engine has nothing to add for it.
    due = [d for d in dues(state) if d.at_ms <= now_ms and d.kind != LOCAL]
    if not due:
        return Transition(None, ignored=NOTHING_DUE)
    wake = _Wake(record, now_ms, limits)
    for item in due:
        if item.kind == TIMER:
            wake.add(TimerFired(item.seq, now_ms))
            wake.settled = True
        elif item.kind == RETRY:
            wake.retry(state.steps[item.seq])
        else:
            wake.time_out(state.steps[item.seq], item.kind)
    if not wake.settled:
        updated = revise(record, now_ms, events=wake.events)
        return Transition(updated, wake.tasks(updated))
    base = dataclasses.replace(record, events=wake.events)
    ran = CodeRun(base, now_ms, registry, limits, recorded_before=len(record.events)).transition()
    assert ran.record is not None  # a code run always leaves a record
    if ran.replaced is not None:
        # The run continued as new: the retries this wake-up would have sent die with it,
        # unsent, and its closed history does not list them.
        unsent = {(a.seq, a.attempt) for a in wake.sent}
        ended = ran.replaced
        kept = tuple(
            e
            for e in ended.events
            if not (type(e) is ActivityScheduled and (e.seq, e.attempt) in unsent)
        )
        return dataclasses.replace(ran, replaced=dataclasses.replace(ended, events=kept))
    return dataclasses.replace(ran, tasks=(*wake.tasks(ran.record), *ran.tasks))


class _Wake:
    """The events one WakeUp adds, in order, and the attempts it sends."""

    def __init__(self, record: WorkflowRecord, now_ms: int, limits: Limits) -> None:
        self.record = record
        self.now_ms = now_ms
        self.limits = limits
        self.events: tuple[HistoryEvent, ...] = record.events
        self.sent: list[ActivityScheduled] = []
        self.settled = False

    def add(self, *events: HistoryEvent) -> None:
        self.events = (*self.events, *events)

    def fits(self, events: tuple[HistoryEvent, ...], tier: Tier) -> bool:
        return _room(events, tier, self.limits) and self.limits.fits(
            revise(self.record, self.now_ms, events=events), tier
        )

    def retry(self, step: StepState) -> None:
        """Send the attempt a backoff was waiting for; if it no longer fits (other steps
        filled the record meanwhile), the failure becomes final, now."""
        failed = step.outcome
        assert isinstance(failed, ActivityFailed) and failed.retry_at_ms is not None
        attempt = _next_attempt(step.latest, self.now_ms, failed.retry_at_ms - failed.at_ms)
        events = (*self.events, attempt)
        if self.fits(events, _tier(step.latest)):
            self.events = events
            self.sent.append(attempt)
            return
        # Delivered now, so it moves to now in history: replay sees it where the code did.
        final = dataclasses.replace(failed, at_ms=self.now_ms, retry_at_ms=None)
        self.events = (*(e for e in self.events if e is not failed), final)
        self.settled = True

    def time_out(self, step: StepState, kind: str) -> None:
        """Fail the running attempt with its timeout, then decide its retry as for any
        failure."""
        latest = step.latest
        failed = ActivityFailed(
            latest.seq, latest.attempt, timeout_failure(step, kind), self.now_ms
        )
        tier = _tier(latest)
        interval = _retry_interval(self.events, latest, failed.failure, self.now_ms)
        if interval is not None and interval <= 0:
            attempt = _next_attempt(latest, self.now_ms, 0)
            events = (*self.events, failed, attempt)
            if self.fits(events, tier):
                self.events = events
                self.sent.append(attempt)
                return
        elif interval is not None:
            # As for a participant's failure: the retry is measured now, sent when due.
            pending = dataclasses.replace(failed, retry_at_ms=self.now_ms + interval)
            later = _next_attempt(latest, self.now_ms + interval, interval)
            if self.fits((*self.events, pending, later), tier):
                self.add(pending)
                return
        self.add(failed)
        self.settled = True

    def tasks(self, record: WorkflowRecord) -> tuple[ActivityTask, ...]:
        """Tasks for the attempts this wake-up sent that ``record`` still holds."""
        held = {(e.seq, e.attempt) for e in record.events if isinstance(e, ActivityScheduled)}
        state = scan(record.events)
        return tuple(task_for(record, a, state) for a in self.sent if (a.seq, a.attempt) in held)


# --- start reports and heartbeats --------------------------------------------------


def _apply_report(
    record: WorkflowRecord | None,
    report: ActivityStarted | ActivityHeartbeat,
    now_ms: int,
    limits: Limits,
) -> Transition:
    """Record that the latest attempt of a step started, or is alive (its details kept);
    anything else is stale. The code does not run."""
    if record is None:
        return Transition(None, ignored=UNKNOWN_WORKFLOW)
    if record.status.terminal:
        return Transition(None, ignored=WORKFLOW_CLOSED)
    step = _latest_attempt(record.events, report.seq)
    if step is None or step.attempt != report.attempt:
        return Transition(None, ignored=STALE_ATTEMPT)
    expected = activity_id(record.workflow_id, report.seq, report.attempt, record.run_id)
    if report.activity_id != expected:
        return Transition(None, ignored=ACTIVITY_ID_MISMATCH)
    if _outcome_of(record.events, report.seq, report.attempt) is not None:
        return Transition(None, ignored=STALE_ATTEMPT)
    if isinstance(report, ActivityStarted):
        for event in record.events:
            if (
                isinstance(event, AttemptStarted)
                and event.seq == report.seq
                and event.attempt == report.attempt
            ):
                return Transition(None, ignored=ALREADY_STARTED)
        # The participant's clock, but never before the attempt was sent nor after now.
        at_ms = min(max(report.started_at_ms, step.at_ms), now_ms)
        events = (*record.events, AttemptStarted(report.seq, report.attempt, at_ms))
        # A few bytes that timeouts count from: the grace, like the failures they cause.
        return _reported(record, events, now_ms, Tier.GRACE, limits)
    # One heartbeat event per step: the new one replaces the last.
    kept = tuple(
        e for e in record.events if not (isinstance(e, AttemptHeartbeat) and e.seq == report.seq)
    )
    if report_start(step) and not any(
        isinstance(e, AttemptStarted) and e.seq == report.seq and e.attempt == report.attempt
        for e in kept
    ):
        # Its start report was lost (best effort) or dropped: the attempt is running, so
        # its timeouts count from now rather than never.
        kept = (*kept, AttemptStarted(report.seq, report.attempt, max(step.at_ms, now_ms)))
    beat = AttemptHeartbeat(report.seq, report.attempt, now_ms, report.details)
    # A step with a heartbeat timeout reserved its heartbeat event; any other step's
    # heartbeats (details only) must not eat into the grace kept for compensations.
    tier = Tier.GRACE if step.heartbeat_timeout_ms is not None else _tier(step)
    if report.details is not None:
        with_details = _reported(record, (*kept, beat), now_ms, _tier(step), limits)
        if with_details.changed:
            return with_details
        # Too large with its details: keep the heartbeat, drop the details.
        beat = dataclasses.replace(beat, details=None)
    return _reported(record, (*kept, beat), now_ms, tier, limits)


def _reported(
    record: WorkflowRecord,
    events: tuple[HistoryEvent, ...],
    now_ms: int,
    tier: Tier,
    limits: Limits,
) -> Transition:
    # A reserved event always has room; one that was not reserved needs it.
    if reserved_events(events) > max(reserved_events(record.events), limits.event_budget(tier)):
        return Transition(None, ignored=OVER_LIMIT)
    updated = revise(record, now_ms, events=events)
    if not limits.fits(updated, tier):
        return Transition(None, ignored=OVER_LIMIT)
    return Transition(updated)


def park(
    record: WorkflowRecord | None,
    body: InboxBody | WakeUp,
    failure: Failure,
    now_ms: int,
    *,
    run_id: str,
) -> WorkflowRecord:
    """The STUCK record the shell writes when it cannot apply ``body`` to a workflow.

    Args:
        record: the workflow's current state, or None when ``body`` starts it.
        body: the input that could not be applied (the shell keeps it beside the record).
        failure: why; its text is made safe to encode.
        now_ms: the orchestrator's clock.
        run_id: the run id of a record made from a start; unused for an existing record.

    Returns:
        ``record`` (or a new record made from the start, with its input and no events),
        status STUCK with ``failure``, one revision later, ``wake_at_ms`` None (a stuck
        workflow does not wake; its resume recomputes it). Always encodable.

    Raises:
        ValueError: ``record`` is None and ``body`` is not a start: there is no workflow
            to park.
    """
    if record is None:
        if not isinstance(body, StartWorkflow):
            raise ValueError(
                f"cannot park a {type(body).__name__} for a workflow that does not exist"
            )
        record = _fresh(body, now_ms, run_id)
    return revise(record, now_ms, status=WorkflowStatus.STUCK, failure=_safe_failure(failure))


def fail(record: WorkflowRecord, now_ms: int, failure: Failure) -> WorkflowRecord:
    """Close a workflow as FAILED from outside its code (e.g. its record grew too large)."""
    return close(record, now_ms, WorkflowStatus.FAILED, failure=_safe_failure(failure))


def pending_tasks(record: WorkflowRecord) -> tuple[ActivityTask, ...]:
    """Tasks of an open workflow whose latest attempt was sent and has no outcome yet.

    A retry waiting for its backoff is not pending (its attempt is sent at the WakeUp).
    None for a closed workflow, nor for one whose status this code does not know.
    """
    if record.status.terminal or record.status is WorkflowStatus.UNKNOWN:
        return ()
    state = scan(record.events)
    return tuple(task_for(record, s.latest, state) for s in state.steps.values() if s.running)


def _safe_failure(failure: Failure) -> Failure:
    return Failure(
        safe_text(failure.error_type, MAX_NAME_CHARS),
        safe_text(failure.message),
        retryable=failure.retryable is True,
        effects_committed=failure.effects_committed is True,
        retry_after_ms=_retry_after(failure.retry_after_ms),
    )


def _retry_after(value: object) -> int | None:
    """A participant's requested wait: a plain int of 0 to 100 years, else none."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return None
    return min(int.__index__(value), MAX_RETRY_AFTER_MS)


def _encodable(text: str) -> str:
    """``text`` unchanged if UTF-8 can encode it (anything decoded from a record can)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return safe_text(text, len(text) * 7 + 8)
    return text


# The shell imports these from here; they live beside the code that uses them most.
__all__ = [
    "IGNORED_REASONS",
    "ClosedRun",
    "Limits",
    "Transition",
    "advance",
    "answer_query",
    "fail",
    "next_wake",
    "park",
    "pending_tasks",
    "start_again",
]
