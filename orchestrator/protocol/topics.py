"""The one place that names sagaline's topics and their settings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

# A participant's name is part of a topic name and of '<participant>.<activity>': no dots.
PARTICIPANT_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,100}")
ACTIVITY_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
TOPIC_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")
# Steps named '<LOCAL_PARTICIPANT>.<activity>' run inside the orchestrator (local activities):
# no participant service, no tasks topic.
LOCAL_PARTICIPANT: Final = "local"


def activity_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a ``'<participant>.<activity>'`` name, or None if it can.

    The same rules as :class:`participants.Participant` applies when it registers
    activities, so a name that passes here can be served.
    """
    if not isinstance(name, str):
        return f"an activity name must be a str, got {type(name).__name__}"
    participant, sep, activity = name.partition(".")
    if not sep:
        return "it must look like '<participant>.<activity>'"
    if not PARTICIPANT_NAME.fullmatch(participant):
        return (
            "the participant part must be 1-100 letters, digits, '_' or '-' "
            "(it becomes part of a topic name)"
        )
    if not ACTIVITY_NAME.fullmatch(activity):
        return (
            "the activity part must start with a letter, digit or '_' and hold only those, "
            "'.' and '-' (at most 200)"
        )
    return None


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one prefix; every process of a deployment uses the same prefix.

    Example::

        topics = Topics("sagaline")
        topics.tasks("payment")   # 'sagaline.tasks.payment'
    """

    prefix: str = "sagaline"

    @property
    def inbox(self) -> str:
        """Starts and activity results, keyed by workflow id; read by the orchestrators."""
        return f"{self.prefix}.inbox"

    @property
    def history(self) -> str:
        """Compacted: one WorkflowRecord per workflow id; co-partitioned with the inbox."""
        return f"{self.prefix}.history"

    @property
    def dlq(self) -> str:
        """Rejected records: original key and bytes, reason in headers."""
        return f"{self.prefix}.dlq"

    @property
    def replies(self) -> str:
        """Answers to starts that asked for one, queries and updates, keyed by request id."""
        return f"{self.prefix}.replies"

    def tasks(self, participant: str) -> str:
        """Activity tasks for one participant service."""
        return f"{self.prefix}.tasks.{participant}"

    def valid(self, topic: str) -> bool:
        """True if ``topic`` is a name Kafka accepts (legal characters, at most 249)."""
        return TOPIC_NAME.fullmatch(topic) is not None and topic not in (".", "..")


def history_config(*, segment_ms: int = 600_000) -> dict[str, str]:
    """Settings of the history topic: compacted, with a bounded compaction lag.

    The active segment is never compacted, so ``segment.ms`` and ``max.compaction.lag.ms``
    bound how long superseded workflow records linger.
    """
    return {
        "cleanup.policy": "compact",
        "segment.ms": str(segment_ms),
        "max.compaction.lag.ms": str(segment_ms * 6),
        "min.cleanable.dirty.ratio": "0.3",
        "delete.retention.ms": str(24 * 3_600_000),
        "max.message.bytes": str(8 << 20),
    }


def inbox_config() -> dict[str, str]:
    """Settings of the inbox topic: deleted after a week."""
    return {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * 3_600_000)}


def tasks_config() -> dict[str, str]:
    """Settings of a participant's tasks topic."""
    return {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * 3_600_000)}


def dlq_config() -> dict[str, str]:
    """Settings of the dead-letter topic: kept a month for operators."""
    return {"cleanup.policy": "delete", "retention.ms": str(30 * 24 * 3_600_000)}


def replies_config() -> dict[str, str]:
    """Settings of the replies topic: a caller waits seconds for its answer, so a day is
    plenty."""
    return {
        "cleanup.policy": "delete",
        "retention.ms": str(24 * 3_600_000),
        # An answer is at most SAGALINE_MAX_RECORD_BYTES, like a history record.
        "max.message.bytes": str(8 << 20),
    }


# A history key that starts with 0xFF is never a workflow id: no UTF-8 text starts with it.
HELD_PREFIX: Final = b"\xffheld:"
_OFFSET_DIGITS: Final = 20


def held_key(workflow_id: str, inbox_offset: int) -> bytes:
    """The history key under which an inbox input held for a parked workflow is kept.

    ``0xFF 'held:' <inbox offset, 20 digits> ':' <workflow id>``; the value is the input's
    original ``InboxRecord`` bytes. It lives in the workflow's own history partition, is
    written in the transaction that parks the workflow and tombstoned in the one that
    applies it, so compaction drops it once it is no longer needed.
    """
    return HELD_PREFIX + f"{inbox_offset:0{_OFFSET_DIGITS}d}:".encode() + workflow_id.encode()


def parse_held_key(key: bytes) -> tuple[str, int] | None:
    """``(workflow id, inbox offset)`` of a held-input key, or None for a workflow key.

    Raises:
        ValueError: the key has the held prefix but not the held layout.
    """
    if not key.startswith(HELD_PREFIX):
        return None
    start = len(HELD_PREFIX)
    digits = key[start : start + _OFFSET_DIGITS]
    if (
        len(digits) != _OFFSET_DIGITS
        or key[start + _OFFSET_DIGITS : start + _OFFSET_DIGITS + 1] != b":"
    ):
        raise ValueError(f"malformed held-input key {key[:60]!r}")
    return key[start + _OFFSET_DIGITS + 1 :].decode(), int(digits)
