"""The converter: values through the links to JSON, JSON to bytes, bytes through codecs.

Rules of this module: it is pure (no I/O, no clock). The same value always gives the same
bytes (keys sorted, compact separators, no NaN, sets sorted), and a plain JSON value gives
exactly the bytes :func:`orchestrator.protocol.payloads.encode_json` gives. Only
:class:`PayloadEncodingError` leaves it, with the place inside the value in its message.
"""

from __future__ import annotations

import collections.abc as cabc
import enum
import json
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from orchestrator.convert.hints import (
    NONE_TYPE,
    field_hints,
    hint_label,
    hint_name,
    qualified_name,
    type_name,
)
from orchestrator.convert.links import (
    DEFAULT_LINKS,
    UNHANDLED,
    Dataclasses,
    PydanticModels,
    StandardTypes,
    ValueConverter,
)
from orchestrator.errors import ConfigurationError
from orchestrator.protocol.failures import describe, safe_text
from orchestrator.protocol.payloads import PayloadEncodingError
from orchestrator.protocol.records import JSON_ENCODING, Payload

_CODEC_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SEQUENCES: Final = frozenset(
    (list, cabc.Sequence, cabc.MutableSequence, cabc.Collection, cabc.Iterable)
)
_SETS: Final = frozenset((set, frozenset, cabc.Set, cabc.MutableSet))
_MAPPINGS: Final = frozenset((dict, cabc.Mapping, cabc.MutableMapping))
_CONTAINERS: Final = _SEQUENCES | _SETS | _MAPPINGS | {tuple}
# Links whose output is JSON-native by construction (they convert what they hold through
# the path): the walk need not check it again. Any other link's output is walked.
_NATIVE_LINKS: Final = frozenset((PydanticModels, Dataclasses, StandardTypes))
# How json.dumps writes the dict keys it accepts that are not text.
_KEY_TEXT: Final = {True: "true", False: "false", None: "null"}


class ValuePath:
    """Where a conversion is inside the value it converts; links recurse through it.

    ``str(path)`` reads like ``Order.items[2].sku``: the root's class (or ``value``),
    then fields, keys and list positions.
    """

    __slots__ = ("_converter", "_parent", "_step")

    def __init__(self, converter: DataConverter, parent: ValuePath | None, step: object) -> None:
        self._converter = converter
        self._parent = parent
        self._step = step

    def __str__(self) -> str:
        parts: list[str] = []
        node: ValuePath | None = self
        while node is not None:
            step = node._step
            if node._parent is None:
                parts.append(str(step))
            elif isinstance(step, str) and step.isidentifier():
                parts.append(f".{step}")
            else:
                parts.append(f"[{step!r}]")
            node = node._parent
        return safe_text("".join(reversed(parts)), 500)

    def to_json(self, value: Any, step: object = None) -> Any:
        """``value``, found at ``step`` below here (a field name, key or index; None:
        here), as a JSON-native value, through the whole chain."""
        at = self if step is None else ValuePath(self._converter, self, step)
        return self._converter._to_json(value, at)

    def from_json(self, data: Any, hint: Any, step: object = None) -> Any:
        """JSON-native ``data``, found at ``step`` below here, as a value of type ``hint``."""
        at = self if step is None else ValuePath(self._converter, self, step)
        return self._converter._from_json(data, hint, at)

    def error(self, message: str) -> PayloadEncodingError:
        """The error to raise about the value here: ``"<path>: <message>"``."""
        return PayloadEncodingError(f"{self}: {message}")


class PayloadCodec(Protocol):
    """Turns the JSON bytes of a payload into other bytes and back (compression,
    encryption). Its ``name`` is written into the payload's encoding
    (``json/plain+<name>``): 1-64 letters, digits, ``.``, ``_`` or ``-``."""

    @property
    def name(self) -> str:
        """The codec's name in payload encodings, e.g. ``"zlib"``."""

    def encode(self, data: bytes) -> bytes:
        """``data`` transformed."""

    def decode(self, data: bytes) -> bytes:
        """The bytes :meth:`encode` was given."""


class DataConverter:
    """Converts user values to payloads and back: links, then JSON, then codecs.

    Args:
        links: the chain, asked in order for each value that is not plain JSON and for
            each hint that is not ``Any``, a JSON type, a union, a literal or a container.
        codecs: applied in order to the JSON bytes when encoding, in reverse order when
            decoding. None by default: the slot for compression and encryption.

    Raises:
        ConfigurationError: a codec's name is invalid or given twice.

    Example::

        converter = DataConverter()
        payload = converter.to_payload(Order("o-1", [Item("sku-1", 2)]))
        order = converter.from_payload(payload, Order)
    """

    __slots__ = ("_by_name", "_codecs", "_encoding", "_json", "_links")

    def __init__(
        self,
        links: Sequence[ValueConverter] = DEFAULT_LINKS,
        codecs: Sequence[PayloadCodec] = (),
    ) -> None:
        self._links = tuple(links)
        self._codecs = tuple(codecs)
        self._by_name: dict[str, PayloadCodec] = {}
        for codec in self._codecs:
            name = codec.name
            if not isinstance(name, str) or not _CODEC_NAME.fullmatch(name):
                raise ConfigurationError(
                    f"payload codec name {name!r} must be 1-64 letters, digits, '.', '_' or "
                    "'-' (it is written into the encoding of every payload)"
                )
            if name in self._by_name:
                raise ConfigurationError(f"payload codec {name!r} is given twice")
            self._by_name[name] = codec
        self._encoding = JSON_ENCODING + "".join(f"+{c.name}" for c in self._codecs)
        # Writes plain values itself; asks the links, through `default`, for the rest.
        self._json = _encoder(self._default)

    def __repr__(self) -> str:
        links = ", ".join(type(link).__name__ for link in self._links)
        return f"DataConverter(links=[{links}], encoding={self._encoding!r})"

    @property
    def encoding(self) -> str:
        """The encoding of the payloads it writes: ``json/plain``, or e.g. ``json/plain+zlib``."""
        return self._encoding

    def to_payload(self, value: Any) -> Payload:
        """``value`` as a payload: converted by the links, written as deterministic JSON,
        then passed through the codecs.

        Raises:
            PayloadEncodingError: no link converts some part of the value (the message
                names where), or a codec failed. No other exception escapes.
        """
        data = self._dumps(value)
        for codec in self._codecs:
            try:
                encoded = codec.encode(data)
            except Exception as exc:
                raise PayloadEncodingError(
                    f"payload codec {codec.name!r} could not encode: {describe(exc)}"
                ) from exc
            data = _codec_bytes(encoded, codec.name, "encoded")
        return Payload(data=data, encoding=self._encoding)

    def from_payload(self, payload: Payload, hint: Any = Any) -> Any:
        """The value in ``payload``, as type ``hint`` (``Any``: plain JSON).

        Raises:
            PayloadEncodingError: the encoding is not ``json/plain`` or names a codec this
                converter does not have, the bytes are not JSON, or the JSON does not fit
                ``hint`` (the message names where).
        """
        if payload.encoding == JSON_ENCODING and hint is Any:
            # What nearly every replayed result is: plain JSON, no codec, no type.
            try:
                return json.loads(payload.data)
            except (ValueError, TypeError) as exc:
                raise PayloadEncodingError(f"payload is not valid JSON: {describe(exc)}") from exc
            except RecursionError:
                raise PayloadEncodingError("payload JSON is nested too deeply") from None
        base, _, names = payload.encoding.partition("+")
        if base != JSON_ENCODING:
            raise PayloadEncodingError(
                f"payload encoding {safe_text(payload.encoding, 200)!r} is not supported; "
                f"expected {JSON_ENCODING}, optionally followed by '+<codec>' names"
            )
        data = payload.data
        for name in reversed(names.split("+") if names else ()):
            codec = self._by_name.get(name)
            if codec is None:
                have = ", ".join(self._by_name) or "none"
                raise PayloadEncodingError(
                    f"payload encoding {safe_text(payload.encoding, 200)!r} needs codec "
                    f"{safe_text(name, 100)!r}, which this converter does not have (it has: "
                    f"{have}); give this process a DataConverter(codecs=...) with it"
                )
            try:
                decoded = codec.decode(data)
            except Exception as exc:
                raise PayloadEncodingError(
                    f"payload codec {name!r} could not decode: {describe(exc)}"
                ) from exc
            data = _codec_bytes(decoded, name, "decoded")
        try:
            value = json.loads(data)
        except (ValueError, TypeError) as exc:  # TypeError: data that is not bytes or text
            raise PayloadEncodingError(f"payload is not valid JSON: {describe(exc)}") from exc
        except RecursionError:
            raise PayloadEncodingError("payload JSON is nested too deeply") from None
        return self.from_json(value, hint)

    def to_json(self, value: Any) -> Any:
        """``value`` as a JSON-native value: what :meth:`to_payload` writes as JSON.

        Dict keys that are int, float, bool or None are kept as they are: the JSON layer
        sorts them as they are, then writes them as text, as ``json.dumps`` does. What a
        link returns is walked again, so the result holds JSON-native values only.

        Raises:
            PayloadEncodingError: as :meth:`to_payload`, and for dict keys that convert to
                the same text (``{Colour.RED: 1, "red": 2}``): one entry would be lost.
        """
        try:
            return self._to_json(value, ValuePath(self, None, hint_label(type(value))))
        except PayloadEncodingError:
            raise
        except RecursionError:
            raise PayloadEncodingError("value is nested too deeply, or contains itself") from None
        except Exception as exc:  # a user __hash__ or __eq__, say: still a clear error
            raise PayloadEncodingError(f"value cannot be converted: {describe(exc)}") from exc

    def from_json(self, data: Any, hint: Any = Any) -> Any:
        """JSON-native ``data`` as a value of type ``hint`` (``Any``: ``data`` as it is).

        Dict keys are text in JSON: under a key hint of ``int`` (an ``IntEnum``, a
        ``NewType`` over int), ``float`` or ``bool`` they are parsed back, as ``json.dumps``
        wrote them (``"2"``, ``"1.5"``, ``"true"``).

        Raises:
            PayloadEncodingError: ``data`` does not fit ``hint``; the message names where,
                e.g. ``Order.items[2].sku: expected str, got int``.
        """
        if hint is Any:
            return data
        plain = _plain_container(hint)
        if plain is not None and type(data) is plain:
            # dict[str, Any], list[Any], dict, list: JSON as it is, nothing to check inside.
            return data
        try:
            return self._from_json(data, hint, ValuePath(self, None, hint_label(hint)))
        except PayloadEncodingError:
            raise
        except RecursionError:
            raise PayloadEncodingError("value is nested too deeply") from None
        except Exception as exc:  # an exotic hint: still a clear error
            raise PayloadEncodingError(
                f"cannot convert to {hint_name(hint)}: {describe(exc)}"
            ) from exc

    # --- encoding ----------------------------------------------------------------------

    def _dumps(self, value: Any) -> bytes:
        # Fast path: json writes plain values itself (so exactly encode_json's bytes) and
        # asks the links, through `default`, only for what it cannot write. On a failure
        # the walk runs: it names where the value went wrong, or converts the dict keys
        # json refuses (enum members, UUIDs).
        try:
            return _json_bytes(value, self._json)
        except Exception:  # the walk below reports it, with the path
            pass
        tree = self.to_json(value)
        try:
            return _json_bytes(tree)
        except RecursionError:
            raise PayloadEncodingError("value is nested too deeply, or contains itself") from None
        except Exception as exc:  # keys of mixed types cannot be sorted
            raise PayloadEncodingError(f"value is not JSON-serialisable: {describe(exc)}") from exc

    def _default(self, value: Any) -> Any:
        return self._object(value, ValuePath(self, None, hint_label(type(value))))

    def _to_json(self, value: Any, path: ValuePath) -> Any:
        if value is None or isinstance(value, str | int):  # bool is an int
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise path.error(f"{value!r} cannot be written as JSON")
            return value
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for key, item in value.items():
                name = self._key(key, path)
                if name in out:  # only a converted key can meet another: plain keys differ
                    raise self._collision(value, key, name, path)
                out[name] = self._to_json(item, ValuePath(self, path, key))
            return out
        if isinstance(value, list | tuple):
            return [self._to_json(item, ValuePath(self, path, i)) for i, item in enumerate(value)]
        return self._object(value, path)

    def _collision(
        self, record: dict[Any, Any], key: Any, name: Any, path: ValuePath
    ) -> PayloadEncodingError:
        other = next((k for k in record if k is not key and self._key(k, path) == name), "?")
        return path.error(
            f"dict keys {safe_text(repr(other), 100)} and {safe_text(repr(key), 100)} are "
            f"both written as {safe_text(repr(name), 100)}: one entry would be lost"
        )

    def _key(self, key: Any, path: ValuePath) -> Any:
        if key is None or isinstance(key, str | int | float):
            return key
        converted = self._to_json(key, ValuePath(self, path, repr(key)))
        if not isinstance(converted, str):
            raise path.error(f"dict key {safe_text(repr(key), 100)} does not convert to text")
        return converted

    def _object(self, value: Any, path: ValuePath) -> Any:
        """A value json cannot write itself: a set, or what a link converts."""
        if isinstance(value, set | frozenset):
            items = [self._to_json(item, ValuePath(self, path, i)) for i, item in enumerate(value)]
            # Set order follows hashes, which differ between processes: sort for the bytes.
            return sorted(items, key=_json_bytes)
        for link in self._links:
            try:
                out = link.to_json(value, path)
            except (PayloadEncodingError, RecursionError):
                raise
            except Exception as exc:
                raise path.error(f"{type(link).__name__} failed: {describe(exc)}") from exc
            if out is UNHANDLED:
                continue
            if type(link) in _NATIVE_LINKS:
                return out
            if out is value:  # walking it again would ask this link forever
                raise path.error(
                    f"{type(link).__name__} returned the value it was given, not its JSON"
                )
            # Another link may return values it did not convert itself (a Decimal in a
            # dict): walk its output, so it converts the same wherever it is.
            return self._to_json(out, path)
        raise path.error(
            f"no converter for a value of type {qualified_name(type(value))}; use JSON "
            "values, a dataclass or a pydantic model, or add a ValueConverter for it"
        )

    # --- decoding ----------------------------------------------------------------------

    def _from_json(self, data: Any, hint: Any, path: ValuePath) -> Any:
        while isinstance(hint, typing.NewType):
            hint = hint.__supertype__
        if hint is Any or hint is object or isinstance(hint, typing.TypeVar):
            return data
        if hint is None or hint is NONE_TYPE:
            if data is None:
                return None
            raise path.error(f"expected None, got {type_name(data)}")
        if isinstance(hint, str | typing.ForwardRef):
            raise path.error(f"type hint {hint!r} is an unresolved forward reference")
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Annotated:
            return self._from_json(data, args[0], path)
        if origin is typing.Union or origin is types.UnionType:
            return self._union(data, args, path)
        if origin is typing.Literal:
            return _literal(data, args, path)
        if hint in (str, int, float, bool):
            return _scalar(data, hint, path)
        kind = origin if origin is not None else hint
        if kind in _CONTAINERS:
            return self._container(data, kind, args, path)
        if typing.is_typeddict(hint):
            hints = field_hints(hint)
            record = _expect(data, dict, path)
            return {
                k: self._from_json(v, hints.get(k, Any), ValuePath(self, path, k))
                for k, v in record.items()
            }
        for link in self._links:
            try:
                out = link.from_json(data, hint, path)
            except (PayloadEncodingError, RecursionError):
                raise
            except Exception as exc:
                raise path.error(f"{type(link).__name__} failed: {describe(exc)}") from exc
            if out is not UNHANDLED:
                return out
        if isinstance(hint, type) and isinstance(data, hint):
            return data
        raise path.error(
            f"no converter for type {hint_name(hint)}; add a ValueConverter for it to "
            "DataConverter(links=...)"
        )

    def _union(self, data: Any, members: tuple[Any, ...], path: ValuePath) -> Any:
        if data is None and NONE_TYPE in members:
            return None
        candidates = [m for m in members if m is not NONE_TYPE]
        errors: list[str] = []
        # The first member that accepts the data wins (docs/payloads.md, "Unions").
        for member in candidates:
            try:
                return self._from_json(data, member, path)
            except PayloadEncodingError as exc:
                if len(candidates) == 1:
                    raise  # Optional[X]: X's own error says more
                errors.append(f"as {hint_name(member)}, {exc}")
        names = " | ".join(hint_name(m) for m in members)
        raise path.error(f"matches no member of {names}: " + "; ".join(errors[:3]))

    def _container(self, data: Any, kind: Any, args: tuple[Any, ...], path: ValuePath) -> Any:
        if kind in _MAPPINGS:
            key_hint, item_hint = args if len(args) == 2 else (Any, Any)
            record = _expect(data, dict, path)
            if item_hint is Any and (key_hint is str or key_hint is Any):
                return dict(record)  # dict[str, Any]: nothing to convert
            return {
                self._decode_key(k, key_hint, path): self._from_json(
                    v, item_hint, ValuePath(self, path, k)
                )
                for k, v in record.items()
            }
        items = _expect(data, list, path)
        if kind is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise path.error(f"expected {len(args)} items, got {len(items)}")
            return tuple(
                self._from_json(x, h, ValuePath(self, path, i))
                for i, (x, h) in enumerate(zip(items, args, strict=True))
            )
        item_hint = args[0] if args else Any
        if item_hint is Any:
            out = list(items)
        else:
            out = [
                self._from_json(x, item_hint, ValuePath(self, path, i)) for i, x in enumerate(items)
            ]
        if kind is tuple:
            return tuple(out)
        if kind in _SETS:
            try:
                return frozenset(out) if kind is frozenset else set(out)
            except TypeError as exc:  # unhashable items, e.g. a dataclass that is not frozen
                raise path.error(f"set items must be hashable: {describe(exc)}") from None
        return out

    def _decode_key(self, key: str, hint: Any, path: ValuePath) -> Any:
        if hint is str or hint is Any:
            return key
        return self._key_from_text(key, hint, ValuePath(self, path, key))

    def _key_from_text(self, key: str, hint: Any, at: ValuePath) -> Any:
        """A dict key of type ``hint`` from the text JSON keeps it as: json.dumps writes
        int, float, bool and None keys as text (``"2"``, ``"1.5"``, ``"true"``,
        ``"null"``); other keys were converted to text by the links."""
        base = hint
        while True:  # NewType and Annotated keep their base's key text
            if isinstance(base, typing.NewType):
                base = base.__supertype__
            elif typing.get_origin(base) is typing.Annotated:
                base = typing.get_args(base)[0]
            else:
                break
        origin = typing.get_origin(base)
        if origin is typing.Union or origin is types.UnionType:
            members = typing.get_args(base)
            errors: list[str] = []
            for member in members:  # the first member that accepts the key wins
                try:
                    return self._key_from_text(key, member, at)
                except PayloadEncodingError as exc:
                    errors.append(f"as {hint_name(member)}, {exc}")
            names = " | ".join(hint_name(m) for m in members)
            raise at.error(f"key matches no member of {names}: " + "; ".join(errors[:3]))
        if origin is typing.Literal:
            for value in typing.get_args(base):
                plain = value.value if isinstance(value, enum.Enum) else value
                if _key_text(plain) == key:
                    return value
            return self._from_json(key, hint, at)  # the literal's own error
        if base is bool:
            if key in ("true", "false"):
                return key == "true"
            raise at.error(f"key {safe_text(key, 100)!r} is not a bool ('true' or 'false')")
        if base is None or base is NONE_TYPE:
            if key == "null":
                return None
            raise at.error(f"key {safe_text(key, 100)!r} is not None ('null')")
        if isinstance(base, type) and issubclass(base, int | float):
            number: Any
            try:  # an IntEnum or a NewType over int: the int first, then the type
                number = int(key) if issubclass(base, int) else float(key)
            except ValueError:
                kind = "an int" if issubclass(base, int) else "a float"
                raise at.error(f"key {safe_text(key, 100)!r} is not {kind}") from None
            return self._from_json(number, hint, at)
        return self._from_json(key, hint, at)


def _encoder(default: Callable[[Any], Any] | None) -> json.JSONEncoder:
    # encode_json's settings exactly: the bytes of plain values depend on them. The one
    # json.dumps would build on each call, built once (it keeps no state between calls).
    return json.JSONEncoder(separators=(",", ":"), sort_keys=True, allow_nan=False, default=default)


_PLAIN_JSON: Final = _encoder(None)


def _json_bytes(value: Any, encoder: json.JSONEncoder = _PLAIN_JSON) -> bytes:
    return encoder.encode(value).encode()


def _codec_bytes(data: Any, name: str, done: str) -> bytes:
    """What a codec returned, as bytes; anything that is not a buffer is its error."""
    if type(data) is bytes:
        return data
    try:
        with memoryview(data) as view:  # bytearray, memoryview, any buffer
            return view.tobytes()
    except Exception:
        raise PayloadEncodingError(
            f"payload codec {name!r} {done} to {type_name(data)}, not bytes"
        ) from None


def _key_text(key: Any) -> str | None:
    """The text json.dumps writes for a dict key; None for a key it does not take."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool):
        return _KEY_TEXT[key]
    if isinstance(key, int | float):
        return (int.__repr__ if isinstance(key, int) else float.__repr__)(key)
    return None


def _scalar(data: Any, hint: type[Any], path: ValuePath) -> Any:
    # bool is an int in Python but not in JSON: true is no answer to an int hint.
    if isinstance(data, hint) and (hint is bool or not isinstance(data, bool)):
        return data
    if hint is float and isinstance(data, int) and not isinstance(data, bool):
        try:
            return float(data)  # JSON has one kind of number: 5 is a fine float
        except OverflowError:
            raise path.error("integer too large for a float") from None
    raise path.error(f"expected {hint.__name__}, got {type_name(data)}")


def _literal(data: Any, values: tuple[Any, ...], path: ValuePath) -> Any:
    for value in values:
        plain = value.value if isinstance(value, enum.Enum) else value
        if plain == data and type(plain) is type(data):
            return value
    allowed = ", ".join(repr(v.value if isinstance(v, enum.Enum) else v) for v in values)
    raise path.error(f"expected one of {allowed}, got {safe_text(repr(data), 100)}")


def _expect(data: Any, kind: type[Any], path: ValuePath) -> Any:
    if not isinstance(data, kind):
        what = "an object" if kind is dict else "a list"
        raise path.error(f"expected {what}, got {type_name(data)}")
    return data


DEFAULT_CONVERTER: Final = DataConverter()
"""The converter used where none is given: the default links, no codec."""


_PLAIN_CONTAINERS: Final[dict[Any, type | None]] = {}


def _plain_container(hint: Any) -> type | None:
    """``dict`` or ``list`` when ``hint`` is one of them holding anything (``dict``,
    ``dict[str, Any]``, ``list``, ``list[Any]``); else None. Cached per hint, as the
    workflow's input hint is asked on every replay."""
    try:
        return _PLAIN_CONTAINERS[hint]
    except KeyError:
        pass
    except TypeError:  # an unhashable hint
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    kind: type | None = None
    if hint is dict or (origin is dict and args in ((str, Any), (Any, Any))):
        kind = dict
    elif hint is list or (origin is list and args == (Any,)):
        kind = list
    if len(_PLAIN_CONTAINERS) < 4096:
        _PLAIN_CONTAINERS[hint] = kind
    return kind
