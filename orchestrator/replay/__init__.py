"""The pure engine: history and one input in, new record and commands out (no I/O).

``engine`` is the entry point (``advance``, ``park``, ``pending_tasks``, ``next_wake``);
``transition`` runs the code after an input within the ``limits``; ``driver`` replays
the code over its history; ``timing`` reads timers, backoffs and timeouts from it;
``guard`` keeps asyncio out of it.
"""

from orchestrator.replay.engine import IGNORED_REASONS, advance, park, pending_tasks
from orchestrator.replay.limits import Limits
from orchestrator.replay.timing import next_wake
from orchestrator.replay.transition import Transition

__all__ = [
    "IGNORED_REASONS",
    "Limits",
    "Transition",
    "advance",
    "next_wake",
    "park",
    "pending_tasks",
]
