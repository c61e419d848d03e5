"""The shop's Celery queues, each a Kafka topic; shared by the Celery config (routing) and
the workflow (``queue=``).

``SHOP_QUEUE_PREFIX`` (default ``shop``) lets several shops, or test runs, share a broker.
A queue must not start with sagaline's own topic prefix and a dot.
"""

from __future__ import annotations

import os
from typing import Final

PREFIX: Final = os.environ.get("SHOP_QUEUE_PREFIX", "shop")
INVENTORY: Final = f"{PREFIX}-inventory"
PAYMENTS: Final = f"{PREFIX}-payments"
SHIPPING: Final = f"{PREFIX}-shipping"
ALL: Final = (INVENTORY, PAYMENTS, SHIPPING)
