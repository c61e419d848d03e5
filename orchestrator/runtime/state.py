"""In-memory workflow state of the partitions one orchestrator owns, with staging.

Changes of the open transaction live in a staged overlay; they become the committed state
only after Kafka confirmed the transaction (KAFKA_EOS rule 1), and are dropped on abort.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from orchestrator.protocol.records import WorkflowRecord


@dataclass(slots=True)
class PartitionState:
    """The committed workflows of one partition."""

    partition: int
    workflows: dict[str, WorkflowRecord] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    quarantined: set[str] = field(default_factory=set)
    history_records: int = 0

    def put(self, record: WorkflowRecord) -> None:
        """Store the committed version of a workflow."""
        self.workflows[record.workflow_id] = record
        self.quarantined.discard(record.workflow_id)
        if record.status.terminal:
            self.running.discard(record.workflow_id)
        else:
            self.running.add(record.workflow_id)

    def delete(self, workflow_id: str) -> None:
        """Forget a workflow (its history key was tombstoned)."""
        self.workflows.pop(workflow_id, None)
        self.running.discard(workflow_id)
        self.quarantined.discard(workflow_id)

    def quarantine(self, workflow_id: str) -> None:
        """Its latest history record is unreadable: hold no state, take no input for it."""
        self.delete(workflow_id)
        self.quarantined.add(workflow_id)


class WorkflowStore:
    """Committed state per owned partition plus the staged changes of the open batch."""

    def __init__(self) -> None:
        self._partitions: dict[int, PartitionState] = {}
        self._staged: dict[str, tuple[int, WorkflowRecord, bytes]] = {}

    def install(self, state: PartitionState) -> None:
        """Take ownership of a restored partition."""
        self._partitions[state.partition] = state

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions we no longer own, staged changes included."""
        gone = set(partitions)
        for partition in gone:
            self._partitions.pop(partition, None)
        self._staged = {k: v for k, v in self._staged.items() if v[0] not in gone}

    def owns(self, partition: int) -> bool:
        """True if the partition is restored and ours."""
        return partition in self._partitions

    def partitions(self) -> Iterator[PartitionState]:
        """The owned partitions."""
        return iter(self._partitions.values())

    def quarantined(self, partition: int, workflow_id: str) -> bool:
        """True if the workflow's history could not be read at restore."""
        return workflow_id in self._partitions[partition].quarantined

    def get(self, partition: int, workflow_id: str) -> WorkflowRecord | None:
        """The latest version of a workflow: staged if changed in this batch, else committed."""
        staged = self._staged.get(workflow_id)
        if staged is not None:
            return staged[1]
        return self._partitions[partition].workflows.get(workflow_id)

    def stage(self, partition: int, record: WorkflowRecord, encoded: bytes) -> None:
        """Hold a changed workflow, and its encoded record, until the transaction commits."""
        self._staged[record.workflow_id] = (partition, record, encoded)

    def staged(self) -> list[tuple[int, WorkflowRecord, bytes]]:
        """Changed workflows of the open batch (one entry per workflow: its last version)."""
        return list(self._staged.values())

    def promote(self) -> None:
        """The transaction committed: staged versions become the committed state."""
        for partition, record, _ in self._staged.values():
            owner = self._partitions.get(partition)
            if owner is not None:
                owner.put(record)
        self._staged.clear()

    def discard_staged(self) -> None:
        """The transaction aborted: forget what it staged."""
        self._staged.clear()
