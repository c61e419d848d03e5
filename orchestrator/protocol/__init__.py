"""The wire contract shared by orchestrators, participants and clients."""

from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import decode_json, encode_json
from orchestrator.protocol.records import (
    ActivityCompleted,
    ActivityFailed,
    ActivityResult,
    ActivityScheduled,
    ActivityStatus,
    ActivityTask,
    Failure,
    HistoryEvent,
    InboxBody,
    Payload,
    StartWorkflow,
    WorkflowRecord,
    WorkflowStatus,
    activity_id,
)
from orchestrator.protocol.topics import Topics

__all__ = [
    "ActivityCompleted",
    "ActivityFailed",
    "ActivityResult",
    "ActivityScheduled",
    "ActivityStatus",
    "ActivityTask",
    "AvroCodec",
    "Failure",
    "HistoryEvent",
    "InboxBody",
    "Payload",
    "StartWorkflow",
    "Topics",
    "WorkflowRecord",
    "WorkflowStatus",
    "activity_id",
    "decode_json",
    "encode_json",
]
