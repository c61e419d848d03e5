"""Logging of sagaline processes: plain text for people, or one JSON object per line for a
log pipeline (``sagaline --log-format json``, ``SAGALINE_LOG_FORMAT=json``).

A log call passes workflow context through ``extra=``, and the JSON formatter lifts it into
fields a log search can filter on::

    log.warning("dead letter reason=%s", reason, extra={"partition": 3, "offset": 1207})

Today only the visibility projector's skipped-record warnings pass them; other lines carry
the same facts in their message text.

Only what the call passes is written: the formatter never looks at settings, so secrets
stay out of the log as long as callers log settings through ``redacted()``.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from typing import IO, Any, Final

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"
FORMATS: Final = ("text", "json")
# Attributes a log call may set with extra=...; written as fields of their own.
CONTEXT_FIELDS: Final = ("workflow_id", "run_id", "partition", "offset", "activity_id")
ECHOED: Final = "sagaline_echoed"
"""``extra={ECHOED: True}`` marks a record whose text the command line has already printed
on stderr itself (its error line): the handler :func:`configure_logging` installs skips
it, so it is not there twice, while other handlers (a test's, an embedding application's)
still get it."""
# Marks the handler configure_logging installed, so a second call re-formats it instead
# of adding another (main() runs more than once in one process in tests).
_OURS: Final = "_sagaline_handler"


def level_number(name: str | int) -> int:
    """The logging level ``name`` stands for (case-insensitive: ``debug``, ``WARNING``).

    Raises:
        ValueError: ``name`` is no logging level.
    """
    if isinstance(name, int):
        return name
    levels = logging.getLevelNamesMapping()
    found = levels.get(name.strip().upper())
    if found is None:
        raise ValueError(f"{name!r} is not a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``ts`` (UTC, ISO-8601 with milliseconds),
    ``level``, ``logger``, ``message``; the :data:`CONTEXT_FIELDS` a call passed with
    ``extra=``; ``exc_info`` (the formatted traceback) and ``stack_info`` when present.

    Newlines in a message or traceback are escaped by JSON, so a record never spans lines;
    non-ASCII text is escaped too, so even a lone surrogate cannot break the stream.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        for name in CONTEXT_FIELDS:
            if name in record.__dict__:
                entry[name] = _json_value(record.__dict__[name])
        if record.exc_info and not record.exc_text:
            # Formatter.format caches the text the same way; handlers after us reuse it.
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(entry, default=str, allow_nan=False)
        except Exception:
            # NaN/Infinity are not JSON, and a str() that raises must not end the line
            # stream either: every value as safe text.
            return json.dumps({k: _safe_text(v) for k, v in entry.items()}, allow_nan=False)


def _message(record: logging.LogRecord) -> str:
    """The record's message; if its ``%`` arguments do not fit it (or a ``__str__``
    raises), the raw message and the arguments' repr, so the record still is one line."""
    try:
        return record.getMessage()
    except Exception:
        return f"{_safe_text(record.msg)} args={_safe_text(record.args, repr)}"


def _safe_text(value: object, show: Any = str) -> str | int | bool | None:
    """``value`` as JSON-safe text (strings, ints, bools and None stay as they are)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    try:
        return str(show(value))
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _timestamp(created: float) -> str:
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_value(value: object) -> Any:
    """``value`` if JSON writes it as it is, its text otherwise (a bytes key, an enum)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value  # NaN and infinities are not JSON: written as text below
    return _safe_text(value)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of log format ``fmt`` (``text`` or ``json``).

    Raises:
        ValueError: an unknown format.
    """
    chosen = fmt.strip().lower()
    if chosen == "json":
        return JsonFormatter()
    if chosen == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"{fmt!r} is not a log format ({', '.join(FORMATS)})")


def configure_logging(
    level: str | int, fmt: str = "text", *, stream: IO[str] | None = None
) -> None:
    """Send the process's log to ``stream`` (stderr by default) at ``level``, as ``fmt``.

    Like :func:`logging.basicConfig`, it leaves a root logger that something else has
    already configured (a test runner, an application embedding sagaline) alone; a handler
    an earlier call installed is re-levelled and re-formatted instead of doubled.

    Raises:
        ValueError: an unknown level or format (checked before anything changes).
    """
    number = level_number(level)
    chosen = formatter(fmt)
    root = logging.getLogger()
    ours: list[logging.Handler] = [h for h in root.handlers if getattr(h, _OURS, False)]
    if not ours and root.handlers:
        return
    if not ours:
        added = logging.StreamHandler(stream)
        setattr(added, _OURS, True)
        root.addHandler(added)
        ours = [added]
    for handler in ours:
        handler.setFormatter(chosen)
        if _not_echoed not in handler.filters:
            handler.addFilter(_not_echoed)
    root.setLevel(number)


def _not_echoed(record: logging.LogRecord) -> bool:
    """False for a record already printed by the command line (see :data:`ECHOED`)."""
    return not getattr(record, ECHOED, False)
