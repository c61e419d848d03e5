"""Every exception sagaline raises, in one short hierarchy.

``SagalineError`` is the root. Decoding problems (``RecordDecodeError`` and its children)
carry a ``reason`` code that goes into dead-letter headers unchanged, so operators can
filter on it.
"""

from __future__ import annotations


class SagalineError(Exception):
    """Base class of sagaline's own errors."""


class ConfigurationError(SagalineError):
    """A setting, registration or schema file is wrong; fix the deployment."""


class RecordDecodeError(SagalineError):
    """A record on a topic could not be turned into a sagaline value."""

    reason = "decode-error"


class MalformedRecordError(RecordDecodeError):
    """The bytes are not a sagaline Avro record (no wire header, truncated, garbage)."""

    reason = "malformed"


class UnknownSchemaError(RecordDecodeError):
    """The wire header names a schema id this process does not know."""

    reason = "unknown-schema"


class WrongRecordTypeError(RecordDecodeError):
    """The record is valid Avro of a schema that does not belong on this topic."""

    reason = "wrong-record-type"


class OversizedRecordError(RecordDecodeError):
    """The record is larger than the configured limit."""

    reason = "oversized"


class FatalKafkaError(SagalineError):
    """The producer is fenced or Kafka reported a fatal error; the process must restart.

    Nothing uncommitted is kept, so a restart loses nothing.
    """


class RecordRejectedError(SagalineError):
    """Kafka refused one record before queueing it (too large, unknown topic or partition,
    invalid argument). The record is not sent; the transaction, if any, is unaffected.

    ``reason`` is a short code (the Kafka error name) for dead-letter headers and metrics.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TransactionAbortableError(SagalineError):
    """The open transaction can no longer commit (an earlier record failed delivery, or the
    coordinator said so); abort it and process the batch again."""


class ActivityError(SagalineError):
    """An activity failed for good (after its retries); raised inside workflow code.

    Workflow code catches it to compensate::

        try:
            await ctx.activity("payment.charge", total)
        except ActivityError as err:
            await ctx.activity("inventory.release", reservation, compensation=True)
            raise
    """

    effects_committed: bool = False
    """This step's effects committed although it failed: compensate it."""

    def __init__(
        self,
        activity: str,
        error_type: str,
        message: str,
        *,
        attempts: int,
        effects_committed: bool = False,
    ) -> None:
        super().__init__(
            f"activity {activity} failed after {attempts} attempt(s): {error_type}: {message}"
        )
        self.activity = activity
        self.error_type = error_type
        self.message = message
        self.attempts = attempts
        self.effects_committed = effects_committed


class PromiseFailedError(ActivityError):
    """A promise (``ctx.promise``) that whoever completes it failed; raised at its await.

    An :class:`ActivityError`, so ``Saga`` blocks and ``except ActivityError`` compensate
    as they would for a failed step; ``error_type`` and ``message`` are what the failure
    said.
    """

    def __init__(self, promise: str, error_type: str, message: str) -> None:
        super().__init__(promise, error_type, message, attempts=1)
        self.args = (f"promise {promise} failed: {error_type}: {message}",)


class ChildWorkflowError(ActivityError):
    """A child workflow (``ctx.child_workflow``) did not complete; raised at its await.

    ``error_type`` is ``ChildWorkflowFailed`` when the child ran and ended otherwise than
    ``COMPLETED`` (``message`` says how, with the child's own failure),
    ``WorkflowAlreadyRunning`` when its start was refused (a run with its id is open;
    children are started with ``if_closed=ALLOW``), or ``ScheduleToCloseTimeout`` when
    ``execution_timeout`` passed. An :class:`ActivityError`, so ``Saga`` blocks
    compensate. What does not fit raises ``RecordTooLargeError`` instead, as for an
    activity: a child step too large to record (nothing started), or a child's result too
    large to report (``effects_committed``: the child completed, undo it).
    """

    ERROR_TYPE = "ChildWorkflowFailed"

    def __init__(
        self,
        activity: str,
        error_type: str,
        message: str,
        *,
        attempts: int = 1,
        effects_committed: bool = False,
    ) -> None:
        super().__init__(
            activity, error_type, message, attempts=attempts, effects_committed=effects_committed
        )
        self.args = (f"child workflow {activity} failed: {error_type}: {message}",)


class NonDeterminismError(SagalineError):
    """Workflow code asked for a different step than its recorded history holds.

    The workflow is parked as STUCK (never silently diverges); deploy code that matches
    the history, or branch with ``ctx.patched`` once available, to resume it.
    """


class WorkflowTimeoutError(SagalineError):
    """What a workflow awaited with ``.with_timeout(seconds)`` did not settle in time.

    Raised at that ``await`` inside workflow code; an ordinary ``Exception`` (not an
    ``ActivityError``), so an uncaught one fails the workflow and a ``Saga`` compensates.
    The activity that did not finish is *not* cancelled: it may still run and commit its
    effects; its outcome is recorded when it arrives, and the code may still await it.
    """

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(f"{what} did not finish within {seconds:g} s")
        self.what = what
        self.seconds = seconds


class WorkflowCancelledError(SagalineError):
    """The workflow was asked to cancel (``WorkflowClient.cancel``, ``sagaline cancel``, a
    ``CancelWorkflow`` record); raised at the await the code is blocked on.

    An ordinary ``Exception``: ``Saga`` blocks compensate and ``except``/``finally``
    clauses run, their activities for real. If it leaves the workflow function the
    workflow ends ``CANCELLED``; code that catches it and returns ends as it returns.
    Activities in flight are not stopped: their outcomes are recorded when they arrive.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"workflow cancelled: {reason}" if reason else "workflow cancelled")
        self.reason = reason


class ContinueAsNewError(BaseException):
    """Raised by ``ctx.continue_as_new``: it unwinds the workflow function so the run
    closes and the next one starts.

    A ``BaseException``, as ``GeneratorExit`` is, so ``except Exception`` and ``Saga``
    blocks let it through and compensate nothing. Do not catch it; code that catches it
    and goes on awaiting parks the workflow.
    """

    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"workflow {workflow_id!r} continues as a new run")


class UnknownWorkflowTypeError(SagalineError):
    """A start request names a workflow type that no registered function handles."""

    reason = "unknown-workflow-type"


class WorkflowDefinitionError(SagalineError):
    """Workflow code did something the engine cannot run deterministically."""


class RecordTooLargeError(ActivityError):
    """A step, its result or its retry would make the workflow's record too large.

    Raised at the ``await`` of that step, never retried. When the step's *result* was too
    large, ``effects_committed`` is True: the participant's writes committed, so the
    workflow should compensate the step as if it had completed.
    """

    ERROR_TYPE = "RecordTooLarge"


class HistoryLimitExceededError(ActivityError):
    """A step would take the workflow's history past its event limit; raised at its ``await``.

    Never retried. Compensations still get a bounded grace above the limit, so ``Saga`` and
    ``except ActivityError`` blocks can undo the steps before.
    """

    ERROR_TYPE = "HistoryLimitExceeded"
