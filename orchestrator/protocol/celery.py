"""Celery tasks as workflow steps: the step's payload and the message a Celery worker reads.

A ``ctx.celery(...)`` step is an ordinary activity step of the reserved participant
``celery`` whose activity is the task's registered name; its payload holds the task's
positional and keyword arguments and its queue. The orchestrator turns its task into a
Celery protocol-2 message, in the JSON envelope kombu's ``confluentkafka`` transport
reads, on the Kafka topic named after the queue, inside its transaction: an unmodified
``celery worker -Q <queue>`` on a ``confluentkafka://`` broker runs it. The Celery task id
is the activity id; headers named ``sagaline_*`` tell the worker-side integration
(``participants.celery``) which workflow step the outcome answers.

Pure: no Kafka, no clock. The same task always gives the same bytes.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any, Final

from orchestrator.protocol.payloads import PayloadEncodingError
from orchestrator.protocol.records import JSON_ENCODING, ActivityTask, Payload

CELERY_PARTICIPANT: Final = "celery"
"""The participant name of Celery steps: reserved, no native participant may take it."""
DEFAULT_QUEUE: Final = "celery"
"""Celery's default queue, as ``task_default_queue`` has it."""
ORIGIN: Final = "sagaline"

# Headers the worker-side integration reads (Celery keeps unknown headers on the request).
WORKFLOW_ID_HEADER: Final = "sagaline_workflow_id"
SEQ_HEADER: Final = "sagaline_seq"
ATTEMPT_HEADER: Final = "sagaline_attempt"
REPORT_START_HEADER: Final = "sagaline_report_start"


def call_payload(args: list[Any], kwargs: dict[str, Any], queue: str) -> dict[str, Any]:
    """The JSON value a Celery step records as its payload."""
    return {"args": args, "kwargs": kwargs, "queue": queue}


def read_call(payload: Payload) -> tuple[list[Any], dict[str, Any], str]:
    """The arguments and queue a Celery step recorded.

    Raises:
        PayloadEncodingError: the payload is not what ``call_payload`` writes.
    """
    if payload.encoding != JSON_ENCODING:
        raise PayloadEncodingError(
            f"a Celery step's payload must be {JSON_ENCODING} (Celery workers read JSON), "
            f"got {payload.encoding!r}"
        )
    try:
        call = json.loads(payload.data)
    except ValueError as exc:
        raise PayloadEncodingError(f"a Celery step's payload is not JSON: {exc}") from None
    if (
        not isinstance(call, dict)
        or not isinstance(call.get("args"), list)
        or not isinstance(call.get("kwargs"), dict)
        or not isinstance(call.get("queue"), str)
    ):
        raise PayloadEncodingError(
            "a Celery step's payload must be an object with 'args' (a list), 'kwargs' (an "
            "object) and 'queue' (a string)"
        )
    return call["args"], call["kwargs"], call["queue"]


def task_message(task: ActivityTask) -> tuple[str, bytes]:
    """The topic (the task's queue) and the kombu envelope of the Celery message for
    ``task``, as ``app.send_task(name, args, kwargs, task_id=activity id, queue=...)``
    would send it.

    ``start_to_close_ms`` becomes Celery's hard time limit (the worker kills the task
    after it); the soft limit is left to the task's own settings.

    Raises:
        PayloadEncodingError: the step's payload is not a Celery call.
    """
    args, kwargs, queue = read_call(task.payload)
    limit = None if task.start_to_close_ms is None else task.start_to_close_ms / 1000
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task.activity,
        "id": task.activity_id,
        "shadow": None,
        "eta": None,
        # A task still queued when the step's deadline passed is not run: the workflow
        # gave up on it (and may have compensated).
        "expires": _iso(task.deadline_ms),
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [limit, None],
        "root_id": task.activity_id,
        "parent_id": None,
        "argsrepr": _repr(args),
        "kwargsrepr": _repr(kwargs),
        "origin": ORIGIN,
        "ignore_result": True,  # the outcome goes to the workflow, not a result backend
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        WORKFLOW_ID_HEADER: task.workflow_id,
        SEQ_HEADER: task.seq,
        ATTEMPT_HEADER: task.attempt,
        # The step's start-to-close timeout counts from the worker's start report.
        REPORT_START_HEADER: task.report_start,
    }
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([args, kwargs, embed], separators=(",", ":"), sort_keys=True).encode()
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task.activity_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": task.activity_id,
        },
    }
    return queue, json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()


def _iso(epoch_ms: int | None) -> str | None:
    """``epoch_ms`` as Celery writes ``expires``: ISO 8601, UTC."""
    if epoch_ms is None:
        return None
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat()


def _repr(value: Any) -> str:
    # What Celery shows in its logs and monitors; bounded as Celery's own argsrepr is.
    text = repr(value)
    return text if len(text) <= 1024 else text[:1021] + "..."
