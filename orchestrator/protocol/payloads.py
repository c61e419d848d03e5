"""Turning user values into :class:`Payload` and back.

JSON is the default encoding: compact separators and sorted keys, so the same value
always gives the same bytes (replay compares payloads byte for byte).
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.errors import SagalineError
from orchestrator.protocol.records import JSON_ENCODING, Payload


class PayloadEncodingError(SagalineError):
    """A value cannot be encoded, or a payload's encoding is not supported."""


def encode_json(value: Any) -> Payload:
    """Encode a JSON-compatible value deterministically."""
    try:
        data = json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise PayloadEncodingError(f"value is not JSON-serialisable: {exc}") from exc
    return Payload(data=data, encoding=JSON_ENCODING)


def decode_json(payload: Payload) -> Any:
    """Decode a payload written by :func:`encode_json`."""
    if payload.encoding != JSON_ENCODING:
        raise PayloadEncodingError(
            f"payload encoding {payload.encoding!r} is not supported; expected {JSON_ENCODING}"
        )
    try:
        return json.loads(payload.data)
    except ValueError as exc:
        raise PayloadEncodingError(f"payload is not valid JSON: {exc}") from exc
