"""sagaline: durable workflows on Apache Kafka.

The public API is what this module exports; everything else is runtime.
"""

from orchestrator.convert import DataConverter
from orchestrator.errors import (
    ActivityError,
    ChildWorkflowError,
    ConfigurationError,
    ContinueAsNewError,
    HistoryLimitExceededError,
    NonDeterminismError,
    PromiseFailedError,
    RecordTooLargeError,
    SagalineError,
    UnknownWorkflowTypeError,
    WorkflowCancelledError,
    WorkflowDefinitionError,
    WorkflowTimeoutError,
)
from orchestrator.protocol.records import IfClosed, IfRunning, ParentClosePolicy
from orchestrator.saga import COMPENSATION_RETRY, Saga
from orchestrator.workflow import (
    DEFAULT_RETRY,
    ActivityHandle,
    PromiseHandle,
    RetryPolicy,
    SignalHandle,
    TimerHandle,
    WorkflowContext,
    WorkflowRegistry,
    default_registry,
    workflow,
)

__all__ = [
    "COMPENSATION_RETRY",
    "DEFAULT_RETRY",
    "ActivityError",
    "ActivityHandle",
    "ChildWorkflowError",
    "ConfigurationError",
    "ContinueAsNewError",
    "DataConverter",
    "HistoryLimitExceededError",
    "IfClosed",
    "IfRunning",
    "NonDeterminismError",
    "ParentClosePolicy",
    "PromiseFailedError",
    "PromiseHandle",
    "RecordTooLargeError",
    "RetryPolicy",
    "Saga",
    "SagalineError",
    "SignalHandle",
    "TimerHandle",
    "UnknownWorkflowTypeError",
    "WorkflowCancelledError",
    "WorkflowContext",
    "WorkflowDefinitionError",
    "WorkflowRegistry",
    "WorkflowTimeoutError",
    "default_registry",
    "workflow",
]
