"""Visibility: the history topic projected into PostgreSQL, for listing, searching and
describing workflows (``sagaline projector``, ``sagaline list``, the web UI).

The history topic stays the source of truth; these tables are a read model the projector
rebuilds from it idempotently, plus an archive of closed workflows that outlives the
history records retention tombstones.
"""

from orchestrator.visibility.models import EventRow, WorkflowFilter, WorkflowRow

__all__ = ["EventRow", "WorkflowFilter", "WorkflowRow"]
