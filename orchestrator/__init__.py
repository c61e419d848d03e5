"""sagaline: durable workflows on Apache Kafka.

The public API is what this module exports; everything else is runtime.
"""

from orchestrator.errors import (
    ActivityError,
    ConfigurationError,
    HistoryLimitExceededError,
    NonDeterminismError,
    RecordTooLargeError,
    SagalineError,
    UnknownWorkflowTypeError,
    WorkflowDefinitionError,
)
from orchestrator.saga import Saga
from orchestrator.workflow import (
    ActivityHandle,
    RetryPolicy,
    WorkflowContext,
    WorkflowRegistry,
    default_registry,
    workflow,
)

__all__ = [
    "ActivityError",
    "ActivityHandle",
    "ConfigurationError",
    "HistoryLimitExceededError",
    "NonDeterminismError",
    "RecordTooLargeError",
    "RetryPolicy",
    "Saga",
    "SagalineError",
    "UnknownWorkflowTypeError",
    "WorkflowContext",
    "WorkflowDefinitionError",
    "WorkflowRegistry",
    "default_registry",
    "workflow",
]
