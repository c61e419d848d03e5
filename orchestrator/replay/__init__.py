"""The pure engine: history and one input in, new record and commands out (no I/O).

``engine`` is the entry point (``advance``, ``park``, ``pending_tasks``); ``transition``
runs the code after an input within the ``limits``; ``driver`` replays the code over its
history; ``guard`` keeps asyncio out of it.
"""

from orchestrator.replay.engine import advance, park, pending_tasks
from orchestrator.replay.limits import Limits
from orchestrator.replay.transition import Transition

__all__ = ["Limits", "Transition", "advance", "park", "pending_tasks"]
