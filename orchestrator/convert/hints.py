"""Type hints: which type a function's parameter or result, or a dataclass's field, asks for.

Rules of this module: reading a hint never raises. Hints are read when a value is first
converted, never when a user module is imported, and a hint that cannot be resolved (a
name imported only under ``TYPE_CHECKING``, a class local to a function) is ``Any``,
logged once: its value stays plain JSON rather than failing the workflow or the task.
"""

from __future__ import annotations

import collections.abc as cabc
import functools
import inspect
import logging
import sys
import typing
from collections.abc import Callable
from typing import Any, Final

from orchestrator.protocol.failures import describe, safe_text

log = logging.getLogger(__name__)

NONE_TYPE: Final = type(None)
# Where list, dict, unions and their abstract kinds live: not worth naming in a path.
_GENERIC_MODULES: Final = frozenset(("builtins", "types", "typing", "collections.abc"))


def input_hint(fn: Callable[..., Any], position: int) -> Any:
    """The type hint of ``fn``'s positional parameter ``position`` (0-based, after ``self``
    of a bound method), for :meth:`DataConverter.from_payload`.

    Never raises: a missing annotation, a position past the parameters (unless ``*args``
    is annotated) or an annotation that cannot be resolved (logged at WARNING) give
    ``Any``. Works with ``from __future__ import annotations``, decorators that use
    ``functools.wraps``, partials and callable objects; ``Annotated`` is stripped.
    Cached per function.

    Example::

        def charge(order: Order, *, ctx: ActivityContext) -> Receipt: ...

        input_hint(charge, 0)  # Order
    """
    try:
        return _cached_input_hint(fn, position)
    except TypeError:  # an unhashable callable: not cached
        return _input_hint(fn, position)


def return_hint(fn: Callable[..., Any]) -> Any:
    """The type hint of what ``fn`` returns (what its coroutine returns, for an async
    function); ``Any`` when missing or unresolvable. Never raises; cached per function.

    Example::

        async def process(ctx: WorkflowContext, order: Order) -> Receipt: ...

        return_hint(process)  # Receipt
    """
    try:
        return _cached_return_hint(fn)
    except TypeError:
        return _return_hint(fn)


@functools.lru_cache(maxsize=1024)
def field_hints(cls: type[Any]) -> dict[str, Any]:
    """The resolved type hints of a dataclass's or TypedDict's fields, by name."""
    try:
        return typing.get_type_hints(cls)
    except Exception:
        # One unresolvable hint must not cost the others: resolve them one by one.
        module = sys.modules.get(cls.__module__)
        namespace = dict(vars(module)) if module is not None else {}
        return {
            name: _resolve(annotation, namespace, f"field {name!r} of {cls.__qualname__}")
            for base in reversed(cls.__mro__)
            for name, annotation in vars(base).get("__annotations__", {}).items()
        }


def type_name(data: Any) -> str:
    """The Python type of a JSON value, for messages: ``str``, ``dict``, ``None``..."""
    return "None" if data is None else type(data).__name__


def qualified_name(cls: type[Any]) -> str:
    """``module.Class``; just ``Class`` for builtins."""
    module = getattr(cls, "__module__", "")
    name = getattr(cls, "__qualname__", repr(cls))
    return name if module in ("builtins", "") else f"{module}.{name}"


def hint_name(hint: Any) -> str:
    """A hint as a reader writes it: ``Order``, ``list[Order]``, ``None``."""
    if hint is NONE_TYPE:
        return "None"
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return repr(hint).replace("typing.", "")


def hint_label(hint: Any) -> str:
    """The root of error paths: a class's name (``Order``), or ``value``."""
    cls = typing.get_origin(hint) or hint
    if isinstance(cls, type) and cls.__module__ not in _GENERIC_MODULES:
        return cls.__name__
    return "value"


class _Annotation:
    """Holds one annotation, so ``typing.get_type_hints`` resolves it on its own."""

    def __init__(self, annotation: Any) -> None:
        self.__annotations__ = {"hint": annotation}


def _resolve(annotation: Any, namespace: dict[str, Any], what: str) -> Any:
    if annotation is inspect.Parameter.empty:
        return Any
    try:
        return typing.get_type_hints(_Annotation(annotation), globalns=namespace)["hint"]
    except Exception as exc:
        log.warning(
            "type hint cannot be resolved, converting as plain JSON what=%s hint=%s error=%s",
            what,
            safe_text(annotation, 200),
            describe(exc),
        )
        return Any


def _namespace(fn: Callable[..., Any]) -> dict[str, Any]:
    """The globals ``fn``'s annotations were written in (through decorators, partials,
    bound methods and callable objects)."""
    target: Any = fn
    for _ in range(100):  # wrappers of wrappers; a cycle must not hang
        if isinstance(target, functools.partial):
            target = target.func
        elif inspect.ismethod(target):
            target = target.__func__
        elif hasattr(target, "__wrapped__"):
            target = target.__wrapped__
        else:
            break
    found = getattr(target, "__globals__", None)
    if found is None and not inspect.isroutine(target):
        try:  # a callable object: its class's __call__
            found = type(target).__call__.__globals__
        except AttributeError:
            found = None
    return found if isinstance(found, dict) else {}


def _describe(fn: Callable[..., Any]) -> str:
    return safe_text(getattr(fn, "__qualname__", None) or repr(fn), 200)


def _input_hint(fn: Callable[..., Any], position: int) -> Any:
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return Any
    positional = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if 0 <= position < len(positional):
        param = positional[position]
    else:
        rest = [p for p in parameters if p.kind is inspect.Parameter.VAR_POSITIONAL]
        if position < 0 or not rest:
            return Any
        param = rest[0]
    what = f"parameter {param.name!r} of {_describe(fn)}"
    return _resolve(param.annotation, _namespace(fn), what)


def _return_hint(fn: Callable[..., Any]) -> Any:
    try:
        annotation = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return Any
    hint = _resolve(annotation, _namespace(fn), f"return value of {_describe(fn)}")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    # A sync function that hands back an awaitable: what the await gives is the result.
    if origin is cabc.Coroutine and len(args) == 3:
        return args[2]
    if origin is cabc.Awaitable and len(args) == 1:
        return args[0]
    return hint


_cached_input_hint = functools.lru_cache(maxsize=4096)(_input_hint)
_cached_return_hint = functools.lru_cache(maxsize=4096)(_return_hint)
