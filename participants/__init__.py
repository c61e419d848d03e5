"""sagaline participants: services that run workflow activities exactly once in effect.

Define a :class:`Participant`, register activities on it, and run it with
``sagaline participant module:attribute`` (or :func:`participants.runtime.run_participant`).
Handlers may take and return dataclasses and pydantic models; a :class:`DataConverter`
given to the participant changes how values are converted (docs/payloads.md).
"""

from orchestrator.convert import DataConverter
from participants.participant import ActivityContext, ActivityFailure, Participant

__all__ = ["ActivityContext", "ActivityFailure", "DataConverter", "Participant"]
