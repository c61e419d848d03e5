"""The I/O shell around the pure engine: consumer, producer, transactions and restore."""

from orchestrator.runtime.loop import FatalKafkaError, Orchestrator

__all__ = ["FatalKafkaError", "Orchestrator"]
