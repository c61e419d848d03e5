"""Celery workers as sagaline participants: one line reports the outcome of every task a
workflow started (``ctx.celery``) back to the workflow.

In the Celery app's module (or ``celeryconfig``'s importer)::

    from participants.celery import attach

    attach(app)  # SAGALINE_KAFKA_BOOTSTRAP and SAGALINE_TOPIC_PREFIX from the environment

The task functions are unchanged. A task the orchestrator sent carries headers naming its
workflow step; when it returns, its value (converted by the converter, JSON by default) is
published to the workflow's inbox as the step's result, and when it raises, the exception
as the step's failure (its class name is the error type; ``participants.ActivityFailure``
keeps its ``retryable`` flag). The workflow's retry policy decides what happens next.
Tasks sent any other way are left alone.

The outcome is published and flushed from Celery's ``task_success`` / ``task_failure``
signals, which the worker sends before it acknowledges a task (with ``acks_late``), so a
worker killed before the ack runs the task again and publishes again: the orchestrator
takes the first outcome of an attempt and ignores the rest. Effects are at least once.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Final

from celery.signals import task_failure, task_prerun, task_success, task_unknown
from confluent_kafka import KafkaError, Message, Producer

from orchestrator.convert import DEFAULT_CONVERTER, DataConverter
from orchestrator.protocol.celery import (
    ATTEMPT_HEADER,
    REPORT_START_HEADER,
    SEQ_HEADER,
    WORKFLOW_ID_HEADER,
)
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.failures import safe_text
from orchestrator.protocol.payloads import PayloadEncodingError
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityStarted,
    ActivityStatus,
    Failure,
    InboxBody,
)
from orchestrator.settings import KafkaSettings
from participants.delivery import ResultDeliveryError, result_record
from participants.participant import handler_failure, wall_clock_ms

log = logging.getLogger(__name__)
# How long a worker waits for Kafka to take an outcome before it gives up on it (the step
# then times out and is retried, if it has a timeout).
DELIVERY_TIMEOUT_S: Final = 30.0


class CeleryOutcomes:
    """Publishes the outcomes of the tasks workflows started to their inboxes."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        converter: DataConverter = DEFAULT_CONVERTER,
        codec: AvroCodec | None = None,
        max_record_bytes: int = 900_000,
    ) -> None:
        """``max_record_bytes``: the largest inbox record the orchestrators take (their
        ``SAGALINE_MAX_RECORD_BYTES``); a larger result is reported as ``ResultTooLarge``
        (its effects committed), as native participants do."""
        self.topics = settings.topics
        self.converter = converter
        self.codec = codec or AvroCodec()
        self._config = {
            **settings.kafka_common(),
            "enable.idempotence": True,
            "acks": "all",
            # The inbox is partitioned by workflow id as Kafka's Java client does it.
            "partitioner": "murmur2_random",
            "linger.ms": 0,
        }
        self._producer: Producer | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self.max_record_bytes = max_record_bytes
        self.published = 0

    @property
    def producer(self) -> Producer:
        """This process's producer. ``attach`` runs in the worker's main process, before
        the prefork pool forks its children, and a Kafka client does not survive a fork:
        each process makes its own on first use (once, whatever threads ask at once)."""
        with self._lock:
            if self._producer is None or self._pid != os.getpid():
                self._producer = Producer(self._config)
                self._pid = os.getpid()
            return self._producer

    def starting(self, sender: Any = None, **_: Any) -> None:
        """``task_prerun`` handler: report the start of a step whose start-to-close
        timeout counts from it (best effort, as native participants do)."""
        step = _step_of(sender)
        if step is None or getattr(sender.request, REPORT_START_HEADER, False) is not True:
            return
        workflow_id, activity_id, seq, attempt = step
        started = ActivityStarted(workflow_id, activity_id, seq, attempt, wall_clock_ms())
        self._send(started, workflow_id, activity_id)

    def succeeded(self, sender: Any = None, result: Any = None, **_: Any) -> None:
        """``task_success`` handler: the task returned ``result``."""
        step = _step_of(sender)
        if step is None:
            return
        try:
            payload = self.converter.to_payload(result)
        except PayloadEncodingError as exc:
            # The task ran to its end: whatever it wrote stays written.
            failure = Failure(
                "PayloadEncodingError",
                safe_text(f"task result: {exc}"),
                retryable=False,
                effects_committed=True,
            )
            self._publish(step, ActivityStatus.FAILED, failure=failure)
            return
        self._publish(step, ActivityStatus.COMPLETED, result=payload)

    def failed(self, sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
        """``task_failure`` handler: the task raised ``exception`` (Celery's own retries,
        ``self.retry`` and ``autoretry_for``, happen before this, within one attempt)."""
        step = _step_of(sender)
        if step is None:
            return
        # Celery hands the signal a picklable stand-in of the exception (a wrapper, or
        # the nearest picklable base class); where the task raised, the original is the
        # one being handled, with its own class name and retryable flag.
        raised = sys.exc_info()[1]
        error = raised if raised is not None else exception
        if error is None:
            error = RuntimeError("the task failed")
        self._publish(step, ActivityStatus.FAILED, failure=handler_failure(error))

    def unknown(self, message: Any = None, name: str = "", **_: Any) -> None:
        """``task_unknown`` handler: no task of that name is registered on this worker (a
        misspelt name, workers of another version on the queue); the step fails,
        retryably, as a native participant answers an activity it lacks."""
        step = _step_in(getattr(message, "headers", None))
        if step is None:
            return
        failure = Failure(
            "UnknownTask",
            safe_text(
                f"no task {name!r} is registered on the Celery worker that took it; "
                "deploy the task or fix the name"
            ),
            retryable=True,
        )
        self._publish(step, ActivityStatus.FAILED, failure=failure)

    def _publish(
        self,
        step: tuple[str, str, int, int],
        status: ActivityStatus,
        *,
        result: Any = None,
        failure: Failure | None = None,
    ) -> None:
        workflow_id, activity_id, seq, attempt = step
        outcome = ActivityResult(
            workflow_id=workflow_id,
            activity_id=activity_id,
            seq=seq,
            attempt=attempt,
            status=status,
            finished_at_ms=wall_clock_ms(),
            result=result,
            failure=failure,
        )
        try:
            # Too large for the inbox: a ResultTooLarge failure instead, as participants do.
            record = result_record(outcome, self.topics, self.codec, self.max_record_bytes)
        except ResultDeliveryError:
            log.exception("cannot report the outcome of %s", safe_text(activity_id, 300))
            return
        if self._produce(record.value, workflow_id, activity_id):
            self.published += 1

    def _send(self, body: InboxBody, workflow_id: str, activity_id: str) -> bool:
        return self._produce(self.codec.encode_inbox(body), workflow_id, activity_id)

    def _produce(self, value: bytes | None, workflow_id: str, activity_id: str) -> bool:
        """Produce ``value`` to the inbox and wait for Kafka's delivery report; False if
        it was not delivered (logged: the step's timeout then retries it)."""
        errors: list[KafkaError] = []
        delivered: list[bool] = []

        def report(error: KafkaError | None, _msg: Message) -> None:
            if error is None:
                delivered.append(True)
            else:
                errors.append(error)

        producer = self.producer  # one producer for both calls
        try:
            producer.produce(self.topics.inbox, value, workflow_id.encode(), on_delivery=report)
            producer.flush(DELIVERY_TIMEOUT_S)
        except Exception:  # a full queue, a record Kafka refuses: say so, never crash a task
            log.exception("cannot publish for %s", safe_text(activity_id, 300))
            return False
        if not delivered:
            log.error(
                "a record for %s was not delivered within %.0f s: %s",
                safe_text(activity_id, 300),
                DELIVERY_TIMEOUT_S,
                errors[0] if errors else "no delivery report",
            )
            return False
        return True


def _step_of(task: Any) -> tuple[str, str, int, int] | None:
    """The workflow step a task's request answers (workflow id, activity id, step,
    attempt), or None for a task no workflow sent."""
    request = getattr(task, "request", None)
    return _step(
        getattr(request, WORKFLOW_ID_HEADER, None),
        getattr(request, "id", None),
        getattr(request, SEQ_HEADER, None),
        getattr(request, ATTEMPT_HEADER, None),
    )


def _step_in(headers: Any) -> tuple[str, str, int, int] | None:
    """``_step_of`` for a message's headers (a task the worker could not run)."""
    if not isinstance(headers, dict):
        return None
    return _step(
        headers.get(WORKFLOW_ID_HEADER),
        headers.get("id"),
        headers.get(SEQ_HEADER),
        headers.get(ATTEMPT_HEADER),
    )


def _step(
    workflow_id: Any, task_id: Any, seq: Any, attempt: Any
) -> tuple[str, str, int, int] | None:
    if (
        not isinstance(workflow_id, str)
        or not isinstance(task_id, str)
        or type(seq) is not int
        or type(attempt) is not int
    ):
        return None
    return workflow_id, task_id, seq, attempt


def attach(
    app: Any,
    settings: KafkaSettings | None = None,
    *,
    converter: DataConverter = DEFAULT_CONVERTER,
) -> CeleryOutcomes:
    """Report the outcome of every task a workflow sent to ``app``'s workers; returns the
    publisher (its ``published`` counts outcomes). ``settings``: Kafka bootstrap and topic
    prefix, by default from ``SAGALINE_*`` in the environment."""
    outcomes = CeleryOutcomes(settings or KafkaSettings(), converter=converter)

    def succeeded(sender: Any = None, result: Any = None, **kwargs: Any) -> None:
        if sender is not None and getattr(sender, "app", None) is app:
            outcomes.succeeded(sender, result, **kwargs)

    def failed(sender: Any = None, exception: BaseException | None = None, **kwargs: Any) -> None:
        if sender is not None and getattr(sender, "app", None) is app:
            outcomes.failed(sender, exception, **kwargs)

    def starting(sender: Any = None, **kwargs: Any) -> None:
        if sender is not None and getattr(sender, "app", None) is app:
            outcomes.starting(sender, **kwargs)

    def unknown(sender: Any = None, **kwargs: Any) -> None:
        if getattr(sender, "app", None) is app:
            outcomes.unknown(**kwargs)

    task_unknown.connect(unknown, weak=False)
    task_prerun.connect(starting, weak=False)
    task_success.connect(succeeded, weak=False)
    task_failure.connect(failed, weak=False)
    return outcomes


__all__ = ["DELIVERY_TIMEOUT_S", "CeleryOutcomes", "attach"]
