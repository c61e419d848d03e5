"""sagaline participants: services that run workflow activities exactly once in effect.

Define a :class:`Participant`, register activities on it, and run it with
``sagaline participant module:attribute`` (or :func:`participants.runtime.run_participant`).
"""

from participants.participant import ActivityContext, ActivityFailure, Participant

__all__ = ["ActivityContext", "ActivityFailure", "Participant"]
