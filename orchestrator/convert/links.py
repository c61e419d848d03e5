"""The links of the converter chain: what turns a non-JSON value into JSON and back.

Rules of this module: a link owns some types. For a value or a hint that is not its
business it returns :data:`UNHANDLED` and the chain asks the next link; for one that is,
it returns the converted value or raises ``path.error(...)``, and it converts what is
nested inside through the path, so every link applies at every depth. The built-in links
write the stdlib types and dataclasses by rules of their own, not pydantic's, so their
bytes do not change with a pydantic upgrade.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import functools
import json
import typing
import uuid
from typing import TYPE_CHECKING, Any, Final, Protocol

from orchestrator.convert.hints import field_hints, type_name
from orchestrator.protocol.failures import describe, safe_text
from orchestrator.protocol.payloads import PayloadEncodingError

if TYPE_CHECKING:
    from orchestrator.convert.chain import ValuePath

_BaseModel: type[Any] | None
_ValidationError: type[Exception] | None
try:
    import pydantic

    _BaseModel, _ValidationError = pydantic.BaseModel, pydantic.ValidationError
except ImportError:  # pragma: no cover - pydantic-settings brings it; a slim install may not
    _BaseModel = _ValidationError = None


class _Unhandled(enum.Enum):
    UNHANDLED = "UNHANDLED"


UNHANDLED: Final = _Unhandled.UNHANDLED
"""What a :class:`ValueConverter` returns for a value or hint that is not its business."""


class ValueConverter(Protocol):
    """One link of the chain: turns values of some types into JSON-native values and back.

    It returns :data:`UNHANDLED` for what is not its business (the next link is asked),
    converts nested values with ``path.to_json(child, step)`` and
    ``path.from_json(child, hint, step)``, and raises ``path.error(message)`` for a value
    it owns but cannot convert. Other exceptions it raises are reported as its failure.

    Example::

        class Prices:  # the link for a class of your own
            def to_json(self, value: Any, path: ValuePath) -> Any:
                if not isinstance(value, Price):
                    return UNHANDLED
                return {"amount": str(value.amount), "currency": value.currency}

            def from_json(self, data: Any, hint: Any, path: ValuePath) -> Any:
                if hint is not Price:
                    return UNHANDLED
                return Price(Decimal(data["amount"]), data["currency"])

        converter = DataConverter(links=(Prices(), *DEFAULT_LINKS))
    """

    def to_json(self, value: Any, path: ValuePath) -> Any:
        """``value`` as a JSON-native value, or :data:`UNHANDLED`."""

    def from_json(self, data: Any, hint: Any, path: ValuePath) -> Any:
        """A value of type ``hint`` built from JSON-native ``data``, or :data:`UNHANDLED`."""


class PydanticModels:
    """pydantic models: ``model_dump(mode="json", by_alias=True)`` out, ``model_validate``
    in. Does nothing when pydantic is not installed."""

    def to_json(self, value: Any, path: ValuePath) -> Any:
        """A model as the JSON pydantic writes for it; anything else is UNHANDLED."""
        if _BaseModel is None or not isinstance(value, _BaseModel):
            return UNHANDLED
        # by_alias: model_validate reads aliases, so the round trip needs them written.
        return value.model_dump(mode="json", by_alias=True)

    def from_json(self, data: Any, hint: Any, path: ValuePath) -> Any:
        """``hint.model_validate(data)`` for a model class; any other hint is UNHANDLED."""
        if _BaseModel is None or not (isinstance(hint, type) and issubclass(hint, _BaseModel)):
            return UNHANDLED
        model: Any = hint
        try:
            return model.model_validate(data)
        except Exception as exc:
            if _ValidationError is None or not isinstance(exc, _ValidationError):
                raise
            errors: list[dict[str, Any]] = typing.cast(Any, exc).errors()
            problems = [
                f"{path}"
                + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
                + f": {e['msg']}"
                for e in errors[:3]
            ]
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise PayloadEncodingError("; ".join(problems) + more) from None


class Dataclasses:
    """Dataclasses, as an object of their fields by name, at any depth.

    Decoding follows the fields' type hints (of generic dataclasses too). A key the class
    has no field for is ignored, so that a newer writer may add fields during a rolling
    deploy; a missing field takes its default, and is an error without one.
    ``init=False`` fields are written but not read back (``__post_init__`` computes them).
    """

    def to_json(self, value: Any, path: ValuePath) -> Any:
        """A dataclass instance as ``{field: value}``; anything else is UNHANDLED."""
        if not _is_dataclass(value.__class__):
            return UNHANDLED
        return {
            f.name: path.to_json(getattr(value, f.name), f.name) for f in _fields(value.__class__)
        }

    def from_json(self, data: Any, hint: Any, path: ValuePath) -> Any:
        """An instance of the dataclass ``hint``; any other hint is UNHANDLED."""
        cls: Any = typing.get_origin(hint) or hint
        if not _is_dataclass(cls):
            return UNHANDLED
        if not isinstance(data, dict):
            raise path.error(f"expected an object for {cls.__name__}, got {type_name(data)}")
        hints = field_hints(cls)
        params = getattr(cls, "__parameters__", ())
        bound = dict(zip(params, typing.get_args(hint), strict=False)) if cls is not hint else {}
        kwargs: dict[str, Any] = {}
        for f in _fields(cls):
            if not f.init:
                continue
            if f.name in data:
                field_hint = hints.get(f.name, Any)
                if params:
                    field_hint = _substitute(field_hint, bound)
                kwargs[f.name] = path.from_json(data[f.name], field_hint, f.name)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise path.error(f"missing field {f.name!r} of {cls.__name__}")
        try:
            return cls(**kwargs)
        except Exception as exc:  # a __post_init__ that validates
            raise path.error(f"{cls.__name__}(...) raised {describe(exc)}") from exc


class StandardTypes:
    """Enums by value; datetime, date and time as ISO 8601 text; UUID and Decimal as text."""

    def to_json(self, value: Any, path: ValuePath) -> Any:
        """The JSON form of such a value; anything else is UNHANDLED."""
        if isinstance(value, enum.Enum):
            return path.to_json(value.value)
        if isinstance(value, dt.date | dt.time):
            return value.isoformat()
        if isinstance(value, uuid.UUID | decimal.Decimal):
            return str(value)
        return UNHANDLED

    def from_json(self, data: Any, hint: Any, path: ValuePath) -> Any:
        """A value of such a type ``hint``; any other hint is UNHANDLED."""
        if not isinstance(hint, type):
            return UNHANDLED
        if issubclass(hint, enum.Enum):
            try:
                return hint(data)
            except (ValueError, TypeError):  # TypeError: a list or dict is not hashable
                pass
            # A member whose value JSON does not keep (a tuple is written as an array, a
            # Decimal as text): the member whose value is written as this data.
            member = _member_written_as(hint, data, path)
            if member is not None:
                return member
            values = ", ".join(repr(m.value) for m in hint)
            raise path.error(
                f"{safe_text(repr(data), 100)} is not a value of {hint.__name__} ({values})"
            )
        if issubclass(hint, dt.date | dt.time | uuid.UUID | decimal.Decimal):
            return _parse_text(hint, data, path)
        return UNHANDLED


DEFAULT_LINKS: Final[tuple[ValueConverter, ...]] = (
    PydanticModels(),
    Dataclasses(),
    StandardTypes(),
)
"""The chain a :class:`DataConverter` uses unless given another, in this order."""


def _parse_text(hint: type[Any], data: Any, path: ValuePath) -> Any:
    number = isinstance(data, int | float) and not isinstance(data, bool)
    if number and issubclass(hint, decimal.Decimal):
        data = str(data)  # another language may write a decimal as a JSON number
    if not isinstance(data, str):
        raise path.error(f"expected {hint.__name__} as a string, got {type_name(data)}")
    try:
        if issubclass(hint, dt.date | dt.time):
            return hint.fromisoformat(data)
        return hint(data)
    except (ValueError, decimal.InvalidOperation):
        raise path.error(f"{safe_text(repr(data), 100)} is not a valid {hint.__name__}") from None


def _member_written_as(hint: type[enum.Enum], data: Any, path: ValuePath) -> Any:
    """The member of ``hint`` whose value converts to the JSON ``data``, or None."""
    try:
        wanted = _canonical(data)
    except (TypeError, ValueError):
        return None
    for member in hint:
        try:
            if _canonical(path.to_json(member.value)) == wanted:
                return member
        except (PayloadEncodingError, TypeError, ValueError):
            continue  # a value that does not convert is not what was written
    return None


def _canonical(data: Any) -> str:
    # The settings of the JSON layer, so values compare as the bytes they are written as.
    return json.dumps(data, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _substitute(hint: Any, bound: dict[Any, Any]) -> Any:
    """``hint`` with the type variables of a generic dataclass replaced by its arguments."""
    if isinstance(hint, typing.TypeVar):
        return bound.get(hint, Any)
    params = getattr(hint, "__parameters__", ())
    if params and not isinstance(hint, type):
        return hint[tuple(bound.get(p, Any) for p in params)]
    return hint


def _is_dataclass(cls: Any) -> bool:
    # Not dataclasses.is_dataclass itself: its type guard narrows to a type mypy does not
    # see as hashable, which the caches below need.
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


@functools.lru_cache(maxsize=1024)
def _fields(cls: Any) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(cls)
