"""Turning whatever user code raised into text and a :class:`Failure` that can travel.

Rules of this module: nothing here raises. User exceptions can have a ``__str__`` that
raises or returns a non-string, messages can hold lone surrogates (``"\\ud800"`` arrives
from JSON) that UTF-8 cannot encode, and PostgreSQL text cannot hold NUL. Every string
that reaches a record, a header or a database row from user code goes through
:func:`safe_text` first, on the orchestrator and in participants alike.
"""

from __future__ import annotations

from orchestrator.protocol.records import Failure

MAX_MESSAGE_CHARS = 2_000
MAX_NAME_CHARS = 200


def safe_text(value: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``value`` as text that UTF-8, Avro and PostgreSQL all accept, at most ``limit`` chars.

    Lone surrogates become ``\\udXXX`` escapes and NUL becomes ``\\x00``, so the text stays
    readable and nothing is silently dropped; longer text is cut and marked with ``...``.
    """
    if not isinstance(value, str):
        try:
            value = str(value)
        except BaseException:  # a broken __str__ must not escape
            return f"<unprintable {_type_name(value)}>"
        if not isinstance(value, str):
            return f"<unprintable {_type_name(value)}>"
    if not value.isascii():
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    if len(value) > limit:
        value = value[: max(0, limit - 3)] + "..."
    return value


def describe(exc: BaseException) -> str:
    """``Type: message`` for logs and failure messages; never raises."""
    return f"{_type_name(exc)}: {safe_text(exc)}"


def failure_from_exception(
    exc: BaseException, *, retryable: bool, effects_committed: bool = False
) -> Failure:
    """A :class:`Failure` named after ``exc``'s class, with its (safe) message."""
    error_type = _type_name(exc)
    message = safe_text(exc) or error_type
    return Failure(error_type, message, retryable=retryable, effects_committed=effects_committed)


def _type_name(value: object) -> str:
    try:
        name = type(value).__name__
    except BaseException:  # metaclasses can do anything
        return "<unnamed>"
    return safe_text(name, MAX_NAME_CHARS) if isinstance(name, str) else "<unnamed>"
