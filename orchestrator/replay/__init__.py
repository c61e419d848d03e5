"""The pure engine: history and one input in, new record and commands out (no I/O)."""

from orchestrator.replay.engine import Limits, Transition, advance, pending_tasks

__all__ = ["Limits", "Transition", "advance", "pending_tasks"]
