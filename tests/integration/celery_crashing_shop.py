"""The example shop's worker (examples/celery_shop/tasks.py) with one crash injected, for
the kill -9 tests: after a chosen order's charge has committed, and before its outcome is
published, the worker dies.

``SHOP_CRASH_AFTER_COMMIT=<order id>:<how>`` picks the charge; ``how`` is ``group`` (kill -9
of the worker's whole process group: the machine dies, the message is delivered again) or
``child`` (only the pool's process exits: the main process sees the worker lost).
``SHOP_CRASH_MARKER`` is a file that makes the crash happen once across restarts.

Celery runs a signal's receivers in the order they were connected: this one is connected
before the example's app module is imported, so it runs before ``attach``'s publisher.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from celery.signals import task_success


def _crash(sender: Any = None, **_: Any) -> None:
    spec = os.environ.get("SHOP_CRASH_AFTER_COMMIT", "")
    order_id, _sep, how = spec.rpartition(":")
    if not order_id or getattr(sender, "name", "") != "shop.payments.charge":
        return
    if not sender.request.args or sender.request.args[0] != order_id:
        return
    marker = Path(os.environ["SHOP_CRASH_MARKER"])
    if marker.exists():
        return
    marker.write_text(sender.request.id)
    if how == "group":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os._exit(70)


task_success.connect(_crash, weak=False)

from examples.celery_shop.tasks import app  # noqa: E402  (after the receiver, on purpose)

__all__ = ["app"]
