"""Typed payloads: user values to :class:`~orchestrator.protocol.records.Payload` and back.

Workflow inputs and results, activity arguments and results, signal, query, update and
promise values can be dataclasses, pydantic models, enums, datetimes, UUIDs, Decimals,
and lists, tuples, sets and dicts of them, besides plain JSON. A converter turns them
into payloads in layers, each replaceable on its own::

    value --links--> JSON-native value --json--> bytes --codecs--> Payload

Encoding follows the value's runtime type; decoding follows a type hint (``Any``: plain
JSON), which the runtime takes from the annotations of workflow and handler functions
(:func:`input_hint`, :func:`return_hint`). Plain JSON values give the same bytes as
before typed payloads. docs/payloads.md tells the whole story.
"""

from orchestrator.convert.chain import DEFAULT_CONVERTER, DataConverter, PayloadCodec, ValuePath
from orchestrator.convert.hints import input_hint, return_hint
from orchestrator.convert.links import (
    DEFAULT_LINKS,
    UNHANDLED,
    Dataclasses,
    PydanticModels,
    StandardTypes,
    ValueConverter,
)
from orchestrator.protocol.payloads import PayloadEncodingError

__all__ = [
    "DEFAULT_CONVERTER",
    "DEFAULT_LINKS",
    "UNHANDLED",
    "DataConverter",
    "Dataclasses",
    "PayloadCodec",
    "PayloadEncodingError",
    "PydanticModels",
    "StandardTypes",
    "ValueConverter",
    "ValuePath",
    "input_hint",
    "return_hint",
]
