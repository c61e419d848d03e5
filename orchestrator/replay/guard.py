"""Keeps asyncio out of workflow code while it replays, and names the call when it tries.

Rules of this module:
- While workflow code runs, a stand-in is this thread's running event loop, so asyncio
  never creates a real loop, task or timer. Every method of the stand-in reports the
  misuse first and raises second, so code that catches exceptions cannot hide it.
- Coroutines that asyncio was handed but will never run are closed before they can warn
  "never awaited" on the orchestrator thread.
- Messages name the call (``asyncio.sleep``) and the workflow line that made it, from the
  frames alone: they must be the same on every replay of the same code, so no addresses.
- Nothing here runs workflow code: only exact coroutine and generator types are inspected
  or closed, and only before they started.
"""

from __future__ import annotations

import asyncio.events
import inspect
import os
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any, Final, NoReturn, cast

from orchestrator.protocol.failures import MAX_NAME_CHARS, safe_text

ADVICE: Final = (
    "a workflow may await only what ctx hands out (ctx.activity, ctx.sleep, ctx.gather, "
    "ctx.first, with_timeout); wait with ctx.sleep, and do asyncio and other I/O inside an "
    "activity"
)
_MAX_DEPTH: Final = 200


class AsyncioMisuse(BaseException):
    """Raised into workflow code at an asyncio call.

    A BaseException, so ``except Exception`` blocks let it through; the replay has
    already been told, so catching it anyway changes nothing.
    """


class LoopGuard:
    """Stands in as the running event loop; every method refuses."""

    __slots__ = ("_report",)

    def __init__(self, report: Callable[[str], None]) -> None:
        self._report = report

    def __getattr__(self, name: str) -> Callable[..., NoReturn]:
        if name.startswith("__"):
            raise AttributeError(name)

        def refuse(*args: Any, **kwargs: Any) -> NoReturn:
            close_unstarted(args)
            close_unstarted(kwargs.values())
            message = describe_call(sys._getframe(1), f"the event loop's {name}()")
            self._report(message)
            raise AsyncioMisuse(message)

        return refuse


class installed:  # noqa: N801 - used as a function: ``with installed(guard):``
    """``guard`` is the running loop of this thread inside the block; then the one before."""

    __slots__ = ("_guard", "_previous")

    def __init__(self, guard: LoopGuard) -> None:
        self._guard = guard
        self._previous: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> None:
        self._previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(cast(Any, self._guard))

    def __exit__(self, *exc_info: object) -> None:
        asyncio.events._set_running_loop(self._previous)


def describe_call(frame: types.FrameType | None, fallback: str) -> str:
    """``asyncio.sleep called at flow.py:12 in process``, from the frame that called the loop.

    The call is the outermost standard-library frame above the loop method; the site is
    the first frame outside the standard library, the workflow's own code.
    """
    library: list[types.FrameType] = []
    while frame is not None and len(library) < _MAX_DEPTH and _is_library(frame):
        library.append(frame)
        frame = frame.f_back
    for held in library:
        close_unstarted(_locals(held))
    call = _frame_call(library[-1]) if library else fallback
    site = f" at {_site(frame)}" if frame is not None else ""
    return f"workflow code called {call}{site}; {ADVICE}"


def describe_await(coro: object, yielded: object) -> str:
    """What a suspended workflow awaited that is not a sagaline step, and where."""
    chain: list[object] = []
    current: object | None = coro
    while current is not None and len(chain) < _MAX_DEPTH:
        chain.append(current)
        current = _awaiting(current)
    site, call = chain[0], None
    for item in chain[1:]:
        if type(item) is types.CoroutineType and not _is_library(item.cr_frame):
            site = item  # a helper coroutine of the workflow's own
            continue
        call = item
        break
    what = "an awaitable" if call is None else _object_call(call)
    frame = _frame_of(site)
    where = f" at {_site(frame)}" if frame is not None else ""
    return (
        f"workflow code awaited {what}{where}, which yielded {_type_name(yielded)} "
        f"instead of a sagaline step; {ADVICE}"
    )


def describe_asyncio_error(exc: BaseException) -> str | None:
    """If ``exc`` is a RuntimeError raised inside asyncio (``asyncio.run`` in a running
    loop, ``asyncio.timeout`` outside a task), the call and site; else None."""
    if not issubclass(type(exc), RuntimeError):
        return None
    frames: list[types.FrameType] = []
    tb = exc.__traceback__
    while tb is not None and len(frames) < _MAX_DEPTH:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    library: list[types.FrameType] = []
    for frame in reversed(frames):
        if not _is_library(frame):
            break
        library.append(frame)
    if not library or not any(_module(f).partition(".")[0] == "asyncio" for f in library):
        return None
    for held in library:
        close_unstarted(_locals(held))
    site_index = len(frames) - len(library) - 1
    where = f" at {_site(frames[site_index])}" if site_index >= 0 else ""
    return (
        f"workflow code called {_frame_call(library[-1])}{where}, which raised "
        f"RuntimeError: {safe_text(exc)}; {ADVICE}"
    )


def close_unstarted(values: Iterable[object]) -> None:
    """Close coroutines (also inside tuples and lists) that never started: no code runs."""
    for value in values:
        if type(value) in (tuple, list):
            close_unstarted(cast(Iterable[object], value))
        elif (
            type(value) is types.CoroutineType
            and inspect.getcoroutinestate(value) == inspect.CORO_CREATED
        ) or (
            type(value) is types.GeneratorType
            and inspect.getgeneratorstate(value) == inspect.GEN_CREATED
        ):
            value.close()


def _awaiting(item: object) -> object | None:
    if type(item) is types.CoroutineType:
        return item.cr_await
    if type(item) is types.GeneratorType:
        return item.gi_yieldfrom
    return None


def _frame_of(item: object) -> types.FrameType | None:
    if type(item) is types.CoroutineType:
        return item.cr_frame
    if type(item) is types.GeneratorType:
        return item.gi_frame
    return None


def _object_call(item: object) -> str:
    frame = _frame_of(item)
    if frame is not None:
        return _frame_call(frame)
    try:
        kind = type(item)
        return _dotted(_text(kind.__module__), _text(kind.__qualname__))
    except BaseException:  # a metaclass can do anything
        return "an awaitable"


def _frame_call(frame: types.FrameType) -> str:
    return _dotted(_module(frame), _text(frame.f_code.co_qualname))


def _dotted(module: str, qualname: str) -> str:
    # asyncio's public names live on the package (asyncio.sleep, not asyncio.tasks.sleep).
    top = module.partition(".")[0]
    return f"{top if top == 'asyncio' else module}.{qualname}"


def _site(frame: types.FrameType) -> str:
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {_text(code.co_qualname)}"


def _is_library(frame: types.FrameType | None) -> bool:
    if frame is None:
        return False
    return _module(frame).partition(".")[0] in sys.stdlib_module_names


def _module(frame: types.FrameType) -> str:
    name = frame.f_globals.get("__name__")
    return name if type(name) is str else "?"


def _locals(frame: types.FrameType) -> Iterable[object]:
    try:
        return tuple(frame.f_locals.values())
    except Exception:  # a frame that cannot show its locals holds nothing we can close
        return ()


def _type_name(value: object) -> str:
    if value is None:
        return "None"
    try:
        return _text(type(value).__qualname__)
    except BaseException:  # a metaclass can do anything
        return "<unnamed type>"


def _text(value: object) -> str:
    return safe_text(value, MAX_NAME_CHARS)
