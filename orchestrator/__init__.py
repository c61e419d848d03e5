"""sagaline: durable workflows on Apache Kafka.

The public API is what this module exports; everything else is runtime.
"""

from orchestrator.errors import (
    ActivityError,
    ConfigurationError,
    NonDeterminismError,
    SagalineError,
    UnknownWorkflowTypeError,
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
    "NonDeterminismError",
    "RetryPolicy",
    "Saga",
    "SagalineError",
    "UnknownWorkflowTypeError",
    "WorkflowContext",
    "WorkflowRegistry",
    "default_registry",
    "workflow",
]
