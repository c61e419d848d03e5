"""Type hints: which type a function's parameter or result, or a dataclass's field, asks for.

Rules of this module: reading a hint never raises. Hints are read when a value is first
converted, never when a user module is imported, and a hint that cannot be resolved (a
name imported only under ``TYPE_CHECKING``, a class local to a function named in a string
annotation) is ``Any``, logged once: its value stays plain JSON rather than failing the
workflow or the task.

The caches hold no user function: handlers defined in a workflow's body are new function
objects on every replay, and what they capture (the workflow's state, its context) must
go with the replay. A plain function's hints are cached by its code object, so every
closure of one ``def`` shares an entry, checked against the closure's annotations.
"""

from __future__ import annotations

import collections.abc as cabc
import functools
import inspect
import logging
import sys
import types
import typing
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Final

from orchestrator.protocol.failures import describe, safe_text

log = logging.getLogger(__name__)

NONE_TYPE: Final = type(None)
# Where list, dict, unions and their abstract kinds live: not worth naming in a path.
_GENERIC_MODULES: Final = frozenset(("builtins", "types", "typing", "collections.abc"))
_MAX_ENTRIES: Final = 4096
_RETURN: Final = -1  # the cache's position of the return hint


def input_hint(fn: Callable[..., Any], position: int) -> Any:
    """The type hint of ``fn``'s positional parameter ``position`` (0-based, after ``self``
    of a bound method), for :meth:`DataConverter.from_payload`.

    Never raises: a missing annotation, a position past the parameters (unless ``*args``
    is annotated) or an annotation that cannot be resolved (logged at WARNING) give
    ``Any``. Works with ``from __future__ import annotations``, decorators that use
    ``functools.wraps``, partials and callable objects; ``Annotated`` is stripped.
    Cached per ``def`` (its code object), without keeping the function alive.

    Example::

        def charge(order: Order, *, ctx: ActivityContext) -> Receipt: ...

        input_hint(charge, 0)  # Order
    """
    if position < 0:
        return Any
    return _cached_hint(fn, position)


def return_hint(fn: Callable[..., Any]) -> Any:
    """The type hint of what ``fn`` returns (what its coroutine returns, for an async
    function); ``Any`` when missing or unresolvable. Never raises; cached as
    :func:`input_hint` is.

    Example::

        async def process(ctx: WorkflowContext, order: Order) -> Receipt: ...

        return_hint(process)  # Receipt
    """
    return _cached_hint(fn, _RETURN)


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
            name: _resolve(
                annotation,
                namespace,
                f"field {name!r} of {cls.__qualname__}",
                (cls.__module__, cls.__qualname__, name),
            )
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


def _resolve(annotation: Any, namespace: dict[str, Any], what: str, once: Hashable) -> Any:
    """``annotation`` resolved in ``namespace``; ``Any`` if it cannot be, with a warning
    about ``what``, given once per ``once`` (a local class or handler is resolved anew on
    every replay; it is not worth a warning each time)."""
    if annotation is inspect.Parameter.empty:
        return Any
    try:
        return typing.get_type_hints(_Annotation(annotation), globalns=namespace)["hint"]
    except Exception as exc:
        if once in _warned:
            return Any
        if len(_warned) >= _MAX_ENTRIES:
            _warned.clear()
        _warned.add(once)
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
    found = getattr(_function_of(fn), "__globals__", None)
    return found if isinstance(found, dict) else {}


def _function_of(fn: Callable[..., Any]) -> Any:
    """The function whose code ``fn`` runs, through decorators, partials, bound methods
    and callable objects (their class's ``__call__``); None if there is none."""
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
    if getattr(target, "__globals__", None) is None and not inspect.isroutine(target):
        try:  # a callable object: its class's __call__
            target = type(target).__call__
        except AttributeError:
            return None
    return target if hasattr(target, "__globals__") else None


def _once_key(fn: Callable[..., Any], what: str) -> Hashable:
    """What a warning about ``what`` of ``fn`` is given once for: the code ``fn`` runs
    (every closure of a ``def`` is one), or the text of the warning."""
    code = getattr(_function_of(fn), "__code__", None)
    return (code, what) if isinstance(code, types.CodeType) else what


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
    return _resolve(param.annotation, _namespace(fn), what, _once_key(fn, f"param {param.name}"))


def _return_hint(fn: Callable[..., Any]) -> Any:
    try:
        annotation = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return Any
    what = f"return value of {_describe(fn)}"
    hint = _resolve(annotation, _namespace(fn), what, _once_key(fn, "return"))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    # A sync function that hands back an awaitable: what the await gives is the result.
    if origin is cabc.Coroutine and len(args) == 3:
        return args[2]
    if origin is cabc.Awaitable and len(args) == 1:
        return args[0]
    return hint


def _read_hint(fn: Callable[..., Any], position: int) -> Any:
    return _return_hint(fn) if position == _RETURN else _input_hint(fn, position)


class _Entry:
    """The hints read from one ``def``, and what besides its code they were read from."""

    __slots__ = ("annotations", "code", "globals", "hints")

    def __init__(self, fn: types.FunctionType) -> None:
        self.code = fn.__code__  # held, so its id is not reused while the entry is kept
        self.globals = fn.__globals__
        self.annotations = fn.__annotations__
        self.hints: dict[int, Any] = {}


# Plain functions' hints, by the id of their code. An entry serves a function with the
# entry's code and globals and equal annotations: the closures of one def share it, and
# a def whose annotations are evaluated anew each time (a class local to the enclosing
# function, without the future import) is read again, never answered from an earlier
# closure. It keeps the annotations of the closure it was read from, not the closure.
_by_code: dict[int, _Entry] = {}
# Other callables (partials, callable objects, decorated functions), weakly.
_by_callable: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()
_warned: set[Hashable] = set()
_MISSING: Final = object()


def _cached_hint(fn: Callable[..., Any], position: int) -> Any:
    if type(fn) is types.FunctionType:
        own = fn.__dict__  # a signature of its own is read through inspect, as others are
        if not own or ("__wrapped__" not in own and "__signature__" not in own):
            code, annotations = fn.__code__, fn.__annotations__
            entry = _by_code.get(id(code))
            if (
                entry is not None
                and entry.code is code
                and entry.globals is fn.__globals__
                and (entry.annotations is annotations or _equal(entry.annotations, annotations))
            ):
                hint = entry.hints.get(position, _MISSING)
                if hint is _MISSING:
                    hint = entry.hints[position] = _read_hint(fn, position)
                return hint
            if len(_by_code) >= _MAX_ENTRIES:
                _by_code.clear()
            entry = _by_code[id(code)] = _Entry(fn)
            hint = entry.hints[position] = _read_hint(fn, position)
            return hint
    elif type(fn) is types.MethodType and type(fn.__func__) is types.FunctionType:
        # A bound method (a new object on each attribute access) reads as its function
        # after self; so an instance made per replay is not kept either.
        return _cached_hint(fn.__func__, position if position == _RETURN else position + 1)
    try:
        hints = _by_callable.get(fn)
        if hints is None:
            hints = _by_callable[fn] = {}
    except TypeError:  # unhashable, or no weak reference to it: not cached
        return _read_hint(fn, position)
    if position not in hints:
        hints[position] = _read_hint(fn, position)
    return hints[position]


def _equal(cached: dict[str, Any], annotations: dict[str, Any]) -> bool:
    try:
        return bool(cached == annotations)
    except Exception:  # an annotation whose == raises: read the hints again
        return False
