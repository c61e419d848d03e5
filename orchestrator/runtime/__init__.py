"""The I/O shell around the pure engine: consumer, producer, transactions and restore."""

from orchestrator.errors import FatalKafkaError
from orchestrator.runtime.loop import Orchestrator

__all__ = ["FatalKafkaError", "Orchestrator"]
