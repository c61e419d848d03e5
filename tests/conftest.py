"""Settings every test runs with, unit and integration alike.

The replay cache's check is on (``SAGALINE_REPLAY_CACHE_CHECK=1``, inherited by the
orchestrator processes the integration tests start): each replay that runs a kept
coroutine on is run again from the start and compared, so every workflow the suite runs
also shows the two ways agree (orchestrator/replay/driver.py, ``ReplayCache``).
"""

from __future__ import annotations

import os

from orchestrator.replay.driver import CHECK_ENV

os.environ.setdefault(CHECK_ENV, "1")
