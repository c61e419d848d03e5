"""The one place that names sagaline's topics and their settings."""

from __future__ import annotations

from dataclasses import dataclass


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

    def tasks(self, participant: str) -> str:
        """Activity tasks for one participant service."""
        return f"{self.prefix}.tasks.{participant}"


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
