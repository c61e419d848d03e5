"""The web UI: a list of workflows with counts by status, one workflow's timeline, and
cancel, signal and resume buttons (``sagaline ui``, or served by ``sagaline projector``).

A standard-library HTTP server, so the UI adds no dependency and works air-gapped: the
page (``static/``) is plain JavaScript that reads a small JSON API from the same server.
Reads go to the visibility tables (:class:`~orchestrator.visibility.store.VisibilityStore`);
actions are inbox records sent by a :class:`~orchestrator.client.WorkflowClient`, exactly
what ``sagaline cancel``, ``signal`` and ``resume`` send.

API (every answer is JSON; failures are ``{"ok": false, "error": "<one line>"}``):

- ``GET /api/workflows?type=&status=&id_prefix=&since=&until=&limit=&before=``: the runs
  that match, newest first, the counts by status of the same filter (status aside) and
  ``next``, the cursor of the next page (``before=``), or null on the last page.
- ``GET /api/workflow?id=<id>&run=<run id>``: one run (the latest by default), every run
  of the id and the run's history events.
- ``POST /api/workflow/cancel?id=<id>`` ``{"reason"}``, ``/signal`` ``{"name", "payload",
  "signal_id"}``, ``/resume`` ``{}``: answer ``{"ok": true, "message"}`` once Kafka has
  confirmed the request.
- ``GET /healthz``: 200 while the server runs, whatever the ``Host``.

``/api/workflows/<id>`` and ``/api/workflows/<id>/<action>`` work too, with the id
percent-encoded whole (``/`` as ``%2F``), except for the ids ``.`` and ``..``, which
browsers and URL libraries remove from paths as dot segments; the query form carries any
id. The server has no authentication of its own: it listens on loopback by default; put it
behind a proxy that authenticates before exposing it. Other sites' pages are kept out:
actions need a JSON body (no cross-site form can send one) and a same-origin
``Sec-Fetch-Site``; only requests whose ``Host`` is a loopback name or one of
``SAGALINE_UI_ALLOWED_HOSTS`` are answered, whatever address the server binds (DNS
rebinding); the page's Content-Security-Policy allows its own script only. docs/ui.md has
the details.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from orchestrator.errors import ConfigurationError
from orchestrator.protocol.records import WorkflowStatus
from orchestrator.visibility.models import STATUSES, EventRow, WorkflowFilter, WorkflowRow

if TYPE_CHECKING:
    from orchestrator.settings import ProjectorSettings

log = logging.getLogger(__name__)

MAX_LIMIT: Final = 500
DEFAULT_LIMIT: Final = 50
# A signal's payload has to fit an inbox record (SAGALINE_MAX_RECORD_BYTES, 900 kB by
# default); a body beyond this is refused before it is read.
MAX_BODY_BYTES: Final = 1_048_576
MAX_TEXT_CHARS: Final = 1_000
# How long an action waits for Kafka to take its request before answering 503.
FLUSH_TIMEOUT_S: Final = 10.0
# How long a request waits for the shared PostgreSQL connection before answering 503: a
# statement stuck on a dead or slow server must not hang every page that polls behind it.
STORE_WAIT_S: Final = 10.0
# API requests served at once; more are answered 503 at once rather than piling up threads
# that each wait on a slow PostgreSQL or Kafka.
MAX_REQUESTS: Final = 16
# Connections held at once (each is a thread while it is open, idle keep-alive included);
# more are answered 503 and closed without a thread.
MAX_CONNECTIONS: Final = 64
# Numbers go to bigint columns: anything outside is a 400 here, not a driver error (500).
INT64_LIMIT: Final = 2**63
MAX_SIGNAL_ID_CHARS: Final = 200

_FILTER_PARAMS: Final = frozenset(("type", "status", "id_prefix", "since", "until", "limit"))
_LIST_PARAMS: Final = _FILTER_PARAMS | {"before"}
_OPEN: Final = frozenset((WorkflowStatus.RUNNING.value, WorkflowStatus.STUCK.value))
_ACTIONS: Final = ("cancel", "signal", "resume")
_STATIC: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
# The page loads only its own script and style, and no other site may frame it (the
# action buttons would otherwise be clickjackable).
_SECURITY_HEADERS: Final = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


class UiRequestError(Exception):
    """A request the UI answers with an HTTP error; ``message`` is one line for the user,
    ``headers`` extra response headers (``Allow`` for a 405)."""

    def __init__(
        self, status: HTTPStatus, message: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)


def bad_request(message: str) -> UiRequestError:
    """A 400 answer with ``message``."""
    return UiRequestError(HTTPStatus.BAD_REQUEST, message)


# --- parsing ----------------------------------------------------------------------------


def parse_time_ms(name: str, text: str) -> int:
    """A filter time as epoch milliseconds: digits are milliseconds already; anything else
    must be ISO 8601 (``2025-01-31T12:00:00Z``; without an offset it is UTC).

    Raises:
        UiRequestError: 400, naming the parameter.
    """
    text = text.strip()
    if text.isdigit() and text.isascii():
        return _int64(name, text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise bad_request(
            f"{name}: {_shown(text)} is not a time (epoch milliseconds, or ISO 8601 such as "
            "2025-01-31T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _int64(name: str, digits: str) -> int:
    """``digits`` (ASCII digits) as an int that fits a bigint column.

    Raises:
        UiRequestError: 400 naming ``name``; checked on the text first, since int() of
            thousands of digits is refused (and slow).
    """
    significant = digits.lstrip("0") or "0"
    if len(significant) > 19 or int(significant) >= INT64_LIMIT:
        raise bad_request(f"{name}: {_shown(digits)} is out of range (at most {INT64_LIMIT - 1})")
    return int(significant)


def parse_statuses(values: Sequence[str]) -> tuple[str, ...]:
    """Statuses from repeated and/or comma-separated ``status`` values, case-insensitive.

    Raises:
        UiRequestError: 400 naming the first unknown status and the known ones.
    """
    found: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip().upper()
            if not name:
                continue
            if name not in STATUSES:
                raise bad_request(
                    f"status: unknown status {_shown(part.strip())} (one of {', '.join(STATUSES)})"
                )
            if name not in found:
                found.append(name)
    return tuple(found)


def _text_param(name: str, text: str) -> str | None:
    if text == "":
        return None
    if "\x00" in text or len(text) > MAX_TEXT_CHARS:
        raise bad_request(f"{name}: must be at most {MAX_TEXT_CHARS} characters without NUL")
    return text


def _single(params: Mapping[str, Sequence[str]], name: str) -> str:
    values = params.get(name, ())
    if len(values) > 1:
        raise bad_request(f"{name}: given {len(values)} times, expected once")
    return values[0] if values else ""


def parse_filter(params: Mapping[str, Sequence[str]]) -> WorkflowFilter:
    """The :class:`WorkflowFilter` a list request's query parameters ask for.

    ``params`` is what :func:`urllib.parse.parse_qs` returns (each name to its values).
    Empty values mean "any". ``limit`` is 1-500 (50 by default); ``before`` is a cursor
    from an earlier answer's ``next``.

    Raises:
        UiRequestError: 400 with one line naming the parameter that is wrong.
    """
    unknown = sorted(set(params) - _LIST_PARAMS)
    if unknown:
        raise bad_request(
            f"unknown parameter {_shown(unknown[0])} (known: {', '.join(sorted(_LIST_PARAMS))})"
        )
    limit_text = _single(params, "limit").strip()
    limit = DEFAULT_LIMIT
    if limit_text:
        if not (limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 4) or not (
            1 <= int(limit_text) <= MAX_LIMIT
        ):
            raise bad_request(f"limit: {_shown(limit_text)} is not a number from 1 to {MAX_LIMIT}")
        limit = int(limit_text)
    since_text, until_text = _single(params, "since"), _single(params, "until")
    since = parse_time_ms("since", since_text) if since_text.strip() else None
    until = parse_time_ms("until", until_text) if until_text.strip() else None
    if since is not None and until is not None and since > until:
        raise bad_request("since is after until: the time range is empty")
    before_text = _single(params, "before")
    return WorkflowFilter(
        workflow_type=_text_param("type", _single(params, "type")),
        statuses=parse_statuses(params.get("status", ())),
        id_prefix=_text_param("id_prefix", _single(params, "id_prefix")),
        started_after_ms=since,
        started_before_ms=until,
        before=decode_cursor(before_text) if before_text else None,
        limit=limit,
    )


def encode_cursor(row: WorkflowRow) -> str:
    """The opaque ``before=`` cursor of the page after ``row`` (URL-safe text)."""
    raw = json.dumps([row.started_at_ms, row.workflow_id, row.run_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[int, str, str]:
    """The ``(started_at_ms, workflow_id, run_id)`` a cursor stands for.

    Raises:
        UiRequestError: 400 when ``text`` is not a cursor this server wrote.
    """
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        started, workflow_id, run_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise bad_request("before: not a page cursor (use the next value of an answer)") from None
    if not (
        type(started) is int
        and -INT64_LIMIT <= started < INT64_LIMIT
        and isinstance(workflow_id, str)
        and isinstance(run_id, str)
    ):
        raise bad_request("before: not a page cursor (use the next value of an answer)")
    return started, workflow_id, run_id


@dataclass(frozen=True, slots=True)
class Route:
    """What a request asks for: ``kind`` is ``static``, ``health``, ``list``, ``describe``
    or ``action``; ``workflow_id`` and ``action`` where they apply; ``query`` its
    parameters."""

    kind: str
    query: Mapping[str, Sequence[str]]
    workflow_id: str | None = None
    action: str | None = None
    static: str | None = None


def route(method: str, target: str) -> Route:
    """Map a request line's method and target (path and query, as sent) to a :class:`Route`.

    ``/api/workflow?id=<id>`` and ``/api/workflow/<action>?id=<id>`` take the id from the
    query (its ``id`` is not in :attr:`Route.query`), which holds any id, ``.`` and ``..``
    included. In ``/api/workflows/<id>`` the target is split on ``/`` before its segments
    are percent-decoded, so an id that holds ``/`` (sent as ``%2F``) stays one segment.

    Raises:
        UiRequestError: 404 for an unknown path, 405 for a method the path does not take,
            400 for an id that is not percent-encoded UTF-8.
    """
    parts = urlsplit(target)
    path = parts.path or "/"
    try:
        query = parse_qs(parts.query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise bad_request("the query string is not percent-encoded UTF-8") from None
    if path in _STATIC or path == "/healthz":
        _allow(method, "GET")
        if path == "/healthz":
            return Route("health", query)
        return Route("static", query, static=path)
    if path in ("/api/workflow", "/api/workflow/") or path.startswith("/api/workflow/"):
        return _query_route(method, path, query)
    segments = path.split("/")
    # "/api/workflows" -> ["", "api", "workflows"]; a trailing slash is the same path.
    if segments[-1] == "" and len(segments) > 3:
        segments = segments[:-1]
    if segments[:3] != ["", "api", "workflows"] or len(segments) > 5:
        raise UiRequestError(HTTPStatus.NOT_FOUND, f"no such page: {_shown(path)}")
    if len(segments) == 3:
        _allow(method, "GET")
        return Route("list", query)
    workflow_id = _decode_segment(segments[3])
    if not workflow_id:
        raise bad_request("the workflow id is empty")
    if len(segments) == 4:
        _allow(method, "GET")
        return Route("describe", query, workflow_id=workflow_id)
    action = segments[4]
    if action not in _ACTIONS:
        raise UiRequestError(
            HTTPStatus.NOT_FOUND,
            f"no action {_shown(action)} (actions: {', '.join(_ACTIONS)})",
        )
    _allow(method, "POST")
    return Route("action", query, workflow_id=workflow_id, action=action)


def _query_route(method: str, path: str, query: Mapping[str, Sequence[str]]) -> Route:
    """The route of ``/api/workflow[/<action>]?id=<id>``."""
    prefix = "/api/workflow/"
    action = path[len(prefix) :].rstrip("/") if path.startswith(prefix) else ""
    if action and action not in _ACTIONS:
        raise UiRequestError(
            HTTPStatus.NOT_FOUND,
            f"no action {_shown(action)} (actions: {', '.join(_ACTIONS)})",
        )
    _allow(method, "POST" if action else "GET")
    workflow_id = _single(query, "id")
    if not workflow_id:
        raise bad_request("id: the workflow id is required (?id=<percent-encoded id>)")
    rest = {name: values for name, values in query.items() if name != "id"}
    if action:
        return Route("action", rest, workflow_id=workflow_id, action=action)
    return Route("describe", rest, workflow_id=workflow_id)


def _split_host(host: str) -> tuple[str, str | None]:
    """A Host header (or an allowed-hosts entry) as its lower-case name, without IPv6
    brackets or a trailing dot, and its port (None without one)."""
    text = host.strip().lower()
    if text.startswith("["):  # "[::1]:9430"
        end = text.find("]")
        if end < 0:
            return text[1:], None
        rest = text[end + 1 :]
        return text[1:end], rest[1:] if rest.startswith(":") else None
    if text.count(":") == 1:  # "example.com:9430"
        name, port = text.split(":")
        return name.rstrip("."), port
    return text.rstrip("."), None  # "example.com", or a bare IPv6 address


def host_allowed(host: str, allowed: Collection[str]) -> bool:
    """True when a request's ``Host`` header names this UI: a loopback name or address
    (any port), or an entry of ``allowed`` (``SAGALINE_UI_ALLOWED_HOSTS``; an entry
    without a port allows any port).

    Checked whatever address the server binds: a page of another site whose name is
    re-pointed at the UI's address (DNS rebinding) sends its own name as ``Host``, and is
    refused, though the browser lets it read the answer as same-origin.
    """
    if loopback_host(host):
        return True
    name, port = _split_host(host)
    if not name:
        return False
    for entry in allowed:
        entry_name, entry_port = _split_host(entry)
        if entry_name == name and entry_port in (None, port):
            return True
    return False


def loopback_host(host: str) -> bool:
    """True when ``host`` (a Host header, with or without its port, or a bind address)
    names this machine's loopback: ``localhost``, 127.0.0.0/8 or ::1."""
    name = host.strip().lower()
    if name.startswith("["):  # "[::1]:9430"
        name = name[1 : name.find("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:  # "127.0.0.1:9430", "localhost:9430"
        name = name.split(":")[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise UiRequestError(
            HTTPStatus.METHOD_NOT_ALLOWED,
            f"{method} is not allowed here (only {allowed})",
            headers=(("Allow", allowed),),
        )


def _decode_segment(segment: str) -> str:
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise bad_request("the workflow id is not percent-encoded UTF-8") from None


def parse_json_body(body: bytes) -> dict[str, Any]:
    """An action's JSON object body; an empty body is ``{}``.

    Raises:
        UiRequestError: 400 when it is not a JSON object.
    """
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise bad_request(f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object")
    return value


def signal_request(body: Mapping[str, Any]) -> tuple[str, Any]:
    """The signal name and payload (any JSON value; null when absent) of a signal action.

    Raises:
        UiRequestError: 400 for a missing or invalid name.
    """
    from orchestrator.workflow import signal_name_problem  # noqa: PLC0415 (engine, lazily)

    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request("name: the signal's name is required")
    problem = signal_name_problem(name)
    if problem is not None:
        raise bad_request(f"name: {problem}")
    return name, body.get("payload")


def signal_id_of(body: Mapping[str, Any]) -> str | None:
    """The ``signal_id`` of a signal action, or None when the body has none (the client
    then makes one). The page sends the same id again when the same signal is resent, so
    the orchestrator applies it once.

    Raises:
        UiRequestError: 400 when it is not printable text of 1-200 characters.
    """
    given = body.get("signal_id")
    if given is None or given == "":
        return None
    if not (isinstance(given, str) and len(given) <= MAX_SIGNAL_ID_CHARS and given.isprintable()):
        raise bad_request(
            f"signal_id: must be printable text of at most {MAX_SIGNAL_ID_CHARS} characters"
        )
    return given


def _reason(body: Mapping[str, Any]) -> str:
    reason = body.get("reason", "")
    if reason is None:
        return ""
    if not isinstance(reason, str) or "\x00" in reason or len(reason) > MAX_TEXT_CHARS:
        raise bad_request(f"reason: must be text of at most {MAX_TEXT_CHARS} characters")
    return reason


def _shown(text: str, limit: int = 80) -> str:
    """``text`` quoted for a one-line message, cut at ``limit`` characters."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return repr(cut)


# --- the application ---------------------------------------------------------------------


class Store(Protocol):
    """What the UI reads: :class:`~orchestrator.visibility.store.VisibilityStore`."""

    def list_workflows(self, flt: WorkflowFilter) -> list[WorkflowRow]: ...
    def count_by_status(self, flt: WorkflowFilter) -> dict[str, int]: ...
    def describe(self, workflow_id: str, run_id: str | None = None) -> WorkflowRow | None: ...
    def runs(self, workflow_id: str) -> list[WorkflowRow]: ...
    def events(self, workflow_id: str, run_id: str) -> list[EventRow]: ...
    def close(self) -> None: ...


class Actions(Protocol):
    """What the UI sends: :class:`~orchestrator.client.WorkflowClient`."""

    def cancel(self, workflow_id: str, reason: str = "") -> None: ...
    def signal(
        self, workflow_id: str, name: str, value: Any = None, *, signal_id: str | None = None
    ) -> str: ...
    def resume(self, workflow_id: str) -> None: ...
    def flush(self, timeout_s: float = 30.0) -> None: ...
    def close(self) -> None: ...


class UiApp:
    """The API's logic, apart from HTTP: each method takes the parsed request and returns
    the JSON answer, or raises :class:`UiRequestError`.

    ``store`` and ``actions`` are made on first use by the factories (so the page is
    served while PostgreSQL or Kafka are down) and shared by the request threads.

    The store is one connection, used by one request at a time: a request waits at most
    ``store_wait_s`` for its turn (one stuck statement must not hang every page behind
    it), then answers 503.

    The client is one Kafka producer, shared: its flush waits for everything queued, by
    any request, and a delivery failure it reports may be an earlier request's (one whose
    own flush timed out). So a flush that times out is answered "not confirmed; it may
    still be delivered", never "failed", and the page resends a signal with the same
    signal id, which the orchestrator applies once.
    """

    def __init__(
        self,
        store: Callable[[], Store],
        actions: Callable[[], Actions],
        *,
        store_wait_s: float = STORE_WAIT_S,
        flush_timeout_s: float = FLUSH_TIMEOUT_S,
    ) -> None:
        self._store_factory = store
        self._actions_factory = actions
        self._store: Store | None = None
        self._actions: Actions | None = None
        self._store_lock = threading.Lock()
        self._actions_lock = threading.Lock()
        self._store_wait_s = store_wait_s
        self._flush_timeout_s = flush_timeout_s

    def _read(self, fn: Callable[[Store], Any]) -> Any:
        # Held across the call, not just the store's creation: the store serialises its
        # calls behind a lock without a timeout, so waiting here, with one, is the only
        # place a request can give up on a stuck connection.
        if not self._store_lock.acquire(timeout=self._store_wait_s):
            raise UiRequestError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"PostgreSQL is slow or unreachable: the visibility tables did not answer "
                f"within {self._store_wait_s:g} s (see the UI server's log); try again",
            )
        try:
            if self._store is None:
                self._store = self._store_factory()
            return fn(self._store)
        finally:
            self._store_lock.release()

    def _send(
        self,
        fn: Callable[[Actions], Any],
        what: str,
        again: str = "check the workflow before sending it again",
    ) -> Any:
        """Queue a request with ``fn`` and wait until Kafka confirms it; ``what`` names it
        and ``again`` says whether resending is safe, in the 503 of a flush that times out
        or fails."""
        from orchestrator.client import StartFailedError  # noqa: PLC0415 (loads Kafka)

        # Send and flush one request at a time: the client keeps one list of delivery
        # errors that a flush takes whole, so a flush running beside another request's
        # could take that request's failure and leave it to answer "sent". Each flush is
        # bounded, so the wait for the lock is too.
        if not self._actions_lock.acquire(timeout=self._flush_timeout_s * 2 + 5):
            raise UiRequestError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"{what} was not sent: other actions are waiting for Kafka; try again",
            )
        try:
            return self._send_locked(fn, what, again, StartFailedError)
        finally:
            self._actions_lock.release()

    def _send_locked(
        self,
        fn: Callable[[Actions], Any],
        what: str,
        again: str,
        failed: type[Exception],
    ) -> Any:
        if self._actions is None:
            self._actions = self._actions_factory()
        actions = self._actions
        result = fn(actions)
        try:
            actions.flush(self._flush_timeout_s)
        except failed as exc:
            if "unacknowledged" in str(exc):
                raise UiRequestError(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    f"{what} was not confirmed within {self._flush_timeout_s:g} s; it may "
                    f"still be delivered (Kafka is slow or unreachable): {again}",
                ) from exc
            raise UiRequestError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"{what} may not have been delivered: Kafka reported a failed delivery "
                f"({exc}), which may be an earlier, unconfirmed request's: "
                f"{again}",
            ) from exc
        return result

    def list_workflows(self, query: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        """``GET /api/workflows``: one page of runs, the counts by status, the next cursor."""
        flt = parse_filter(query)
        # One more row than asked tells whether another page follows.
        probe = WorkflowFilter(
            workflow_type=flt.workflow_type,
            statuses=flt.statuses,
            id_prefix=flt.id_prefix,
            started_after_ms=flt.started_after_ms,
            started_before_ms=flt.started_before_ms,
            before=flt.before,
            limit=flt.limit + 1,
        )

        def read(store: Store) -> tuple[list[WorkflowRow], dict[str, int]]:
            return store.list_workflows(probe), store.count_by_status(flt)

        rows, counted = self._read(read)
        page = rows[: flt.limit]
        counts = {s: 0 for s in STATUSES if s != WorkflowStatus.UNKNOWN.value}
        counts.update(counted)
        return {
            "ok": True,
            "workflows": [_list_row(row) for row in page],
            "counts": counts,
            "total": sum(counts.values()),
            "next": encode_cursor(page[-1]) if len(rows) > flt.limit else None,
            "limit": flt.limit,
        }

    def describe(self, workflow_id: str, query: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        """``GET /api/workflows/<id>``: the run, the id's runs and the run's events."""
        unknown = sorted(set(query) - {"run"})
        if unknown:
            raise bad_request(f"unknown parameter {_shown(unknown[0])} (known: run)")
        run_id = _text_param("run", _single(query, "run"))

        def read(
            store: Store,
        ) -> tuple[WorkflowRow | None, list[WorkflowRow], list[EventRow]]:
            row = store.describe(workflow_id, run_id)
            if row is None:
                return None, [], []
            return row, store.runs(workflow_id), store.events(workflow_id, row.run_id)

        row, runs, events = self._read(read)
        if row is None:
            which = f"run {_shown(run_id)} of workflow" if run_id else "workflow"
            raise UiRequestError(
                HTTPStatus.NOT_FOUND,
                f"no {which} {_shown(workflow_id)} in the visibility tables (the projector "
                "may not have reached it yet)",
            )
        return {
            "ok": True,
            "workflow": row.to_json(),
            "latest_run_id": runs[0].run_id if runs else row.run_id,
            "runs": [
                {
                    "run_id": r.run_id,
                    "status": r.status,
                    "started_at_ms": r.started_at_ms,
                    "closed_at_ms": r.closed_at_ms,
                }
                for r in runs
            ],
            "events": [event.to_json() for event in events],
        }

    def act(self, workflow_id: str, action: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /api/workflows/<id>/<action>``: send a cancel, signal or resume request
        for the workflow's latest run, which has to be open (STUCK, for resume).

        ``run_id`` in the body, when given, has to be that latest run: a page showing an
        older run must not act on a newer one by accident.
        """
        latest = self._read(lambda store: store.describe(workflow_id))
        if latest is None:
            raise UiRequestError(
                HTTPStatus.NOT_FOUND,
                f"no workflow {_shown(workflow_id)} in the visibility tables (the projector "
                "may not have reached it yet)",
            )
        run_id = body.get("run_id")
        if run_id not in (None, "", latest.run_id):
            raise UiRequestError(
                HTTPStatus.CONFLICT,
                f"run {_shown(str(run_id))} is not the latest run of {_shown(workflow_id)} "
                f"(that is {latest.run_id}): {action} acts on the latest run only",
            )
        if latest.status not in _OPEN:
            raise UiRequestError(
                HTTPStatus.CONFLICT,
                f"workflow {_shown(workflow_id)} has closed {latest.status}: a {action} "
                "changes nothing",
            )
        if action == "cancel":
            reason = _reason(body)
            self._send(lambda client: client.cancel(workflow_id, reason), "the cancel")
            message = (
                f"asked workflow {workflow_id} to cancel; its compensations run before it "
                "closes CANCELLED"
            )
            if latest.status == WorkflowStatus.STUCK.value:
                message += " (it is STUCK: the cancel waits until it is resumed)"
        elif action == "signal":
            name, payload = signal_request(body)
            given = signal_id_of(body)
            signal_id = self._send(
                lambda client: client.signal(workflow_id, name, payload, signal_id=given),
                f"the signal {name!r}",
                f"sending it again with signal id {given} is applied once"
                if given
                else "check the workflow before sending it again",
            )
            message = f"sent signal {name!r} to workflow {workflow_id} (signal id {signal_id})"
        else:
            if latest.status != WorkflowStatus.STUCK.value:
                raise UiRequestError(
                    HTTPStatus.CONFLICT,
                    f"workflow {_shown(workflow_id)} is {latest.status}, not STUCK: a resume "
                    "changes nothing",
                )
            self._send(lambda client: client.resume(workflow_id), "the resume")
            message = (
                f"asked the orchestrators to resume workflow {workflow_id} with the code "
                "deployed now (if the cause is not fixed, it stays STUCK)"
            )
        return {"ok": True, "message": message}

    def close(self) -> None:
        """Close the store and the client (flushing what it queued); a store still stuck
        in a call after ``store_wait_s`` is left to the process's exit."""
        if self._store_lock.acquire(timeout=self._store_wait_s):
            try:
                store, self._store = self._store, None
            finally:
                self._store_lock.release()
            _close_quietly(store)
        else:
            log.warning("the web UI's PostgreSQL connection is stuck in a call: not closed")
        with self._actions_lock:
            actions, self._actions = self._actions, None
        _close_quietly(actions)


def _list_row(row: WorkflowRow) -> dict[str, Any]:
    # Inputs and results can be large and the table shows neither: the detail view has them.
    shown = row.to_json()
    shown.pop("input", None)
    shown.pop("result", None)
    return shown


def _close_quietly(thing: Store | Actions | None) -> None:
    if thing is None:
        return
    try:
        thing.close()
    except Exception:  # closing after a failure; the failure was reported already
        log.debug("closing %s failed", type(thing).__name__, exc_info=True)


# --- HTTP -------------------------------------------------------------------------------


def _load_static() -> dict[str, bytes]:
    folder = resources.files("orchestrator.visibility") / "static"
    return {name: (folder / name).read_bytes() for name, _ in set(_STATIC.values())}


def _error_answer(exc: Exception) -> tuple[HTTPStatus, str]:
    """The status and one-line message for an exception an API call raised."""
    if isinstance(exc, UiRequestError):
        return exc.status, exc.message
    # Imported here: the client loads confluent_kafka, psycopg loads libpq.
    from orchestrator.client import StartFailedError  # noqa: PLC0415

    if isinstance(exc, StartFailedError):
        return HTTPStatus.SERVICE_UNAVAILABLE, f"Kafka did not take the request: {exc}"
    if isinstance(exc, ConfigurationError):
        return HTTPStatus.BAD_REQUEST, str(exc)
    import psycopg  # noqa: PLC0415

    if isinstance(exc, psycopg.errors.UndefinedTable):
        return (
            HTTPStatus.SERVICE_UNAVAILABLE,
            "the visibility tables do not exist yet: start the projector (sagaline projector)",
        )
    if isinstance(exc, psycopg.OperationalError):
        # The driver's message may name the host and user: the log has it, the page not.
        return (
            HTTPStatus.SERVICE_UNAVAILABLE,
            "the visibility database is unavailable (see the UI server's log)",
        )
    return HTTPStatus.INTERNAL_SERVER_ERROR, (
        f"the UI server failed: {type(exc).__name__} (see its log)"
    )


class _Handler(BaseHTTPRequestHandler):
    """One request; the server's ``app`` and ``static`` do the work."""

    server: _UiHttpServer
    protocol_version = "HTTP/1.1"
    # A client that stops sending (or keeps an idle connection) frees its thread then;
    # short, because connections are bounded (MAX_CONNECTIONS) and a trickle holds one.
    timeout = 15
    # Whether this request's body has been read (so the connection can serve another).
    _body_read = False

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    # Without these the standard library answers 501 with an HTML page.
    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_OPTIONS(self) -> None:
        self._handle("OPTIONS")

    def _handle(self, method: str) -> None:
        self._body_read = False
        try:
            answer = self._dispatch(method)
        except Exception as exc:
            status, message = _error_answer(exc)
            if status >= HTTPStatus.INTERNAL_SERVER_ERROR:
                log.error("ui %s %s failed: %s", method, self.path, message, exc_info=exc)
            headers = exc.headers if isinstance(exc, UiRequestError) else ()
            self._send_json(status, {"ok": False, "error": message}, headers)
            return
        if answer is not None:
            self._send_json(HTTPStatus.OK, answer)

    def _dispatch(self, method: str) -> dict[str, Any] | None:
        self._check_framing()
        path = urlsplit(self.path).path
        host = self.headers.get("Host", "")
        # /healthz answers any Host: Kubernetes probes send the pod's IP address.
        if path != "/healthz" and not host_allowed(host, self.server.allowed_hosts):
            # A page of another site whose name was re-pointed at this server (DNS
            # rebinding) would otherwise read and act as if it were this page. Checked
            # whatever address is bound: 0.0.0.0 in a container is reached as localhost
            # through a published port or a port-forward.
            raise UiRequestError(
                HTTPStatus.FORBIDDEN,
                f"this UI answers requests for localhost, a loopback address or a name in "
                f"SAGALINE_UI_ALLOWED_HOSTS only, not for host {_shown(host)}",
            )
        found = route(method, self.path)
        if found.kind == "static":
            name, content_type = _STATIC[found.static or "/"]
            self._send(HTTPStatus.OK, self.server.static[name], content_type)
            return None
        if found.kind == "health":
            return {"ok": True}
        # An action's body is read before a slot is taken: a client that sends it slowly
        # holds only its own connection, not one of the few slots every request needs.
        body = self._action_body() if found.kind == "action" else None
        # API requests wait on PostgreSQL or Kafka: past the bound, answer now rather than
        # queue one more thread behind a slow server.
        if not self.server.requests.acquire(blocking=False):
            raise UiRequestError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the UI server is busy: too many requests are waiting on PostgreSQL or Kafka; "
                "try again shortly",
            )
        try:
            return self._api(found, body)
        finally:
            self.server.requests.release()

    def _api(self, found: Route, body: dict[str, Any] | None) -> dict[str, Any]:
        app = self.server.app
        if found.kind == "list":
            return app.list_workflows(found.query)
        workflow_id = found.workflow_id or ""
        if found.kind == "describe":
            return app.describe(workflow_id, found.query)
        return app.act(workflow_id, found.action or "", body or {})

    def _check_framing(self) -> None:
        """Refuse bodies this server cannot delimit: it reads only Content-Length bodies,
        and one misread would take the rest for the next request on the connection."""
        if "Transfer-Encoding" in self.headers:
            raise UiRequestError(
                HTTPStatus.LENGTH_REQUIRED,
                "Transfer-Encoding is not supported: send the body with a Content-Length",
            )
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1 or not all(v.isascii() and v.strip().isdigit() for v in lengths):
            raise bad_request("Content-Length is not one number")

    def _unread_body(self) -> bool:
        """True when the request may have a body this handler did not read."""
        headers = getattr(self, "headers", None)
        if headers is None or self._body_read:
            return False
        if "Transfer-Encoding" in headers:
            return True
        return any(value.strip().lstrip("0") for value in headers.get_all("Content-Length") or [])

    def _action_body(self) -> dict[str, Any]:
        # A JSON content type cannot be sent across sites without a CORS preflight, which
        # this server never grants: another site's page cannot press the buttons.
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise UiRequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "actions take a JSON body (application/json)"
            )
        # Browsers say where a request comes from; only the UI's own page may act.
        fetch_site = self.headers.get("Sec-Fetch-Site", "same-origin").lower()
        if fetch_site not in ("same-origin", "none"):
            raise UiRequestError(HTTPStatus.FORBIDDEN, "actions come from the UI's own page")
        length_text = self.headers.get("Content-Length", "0").strip()  # checked: digits
        if len(length_text.lstrip("0")) > 9 or int(length_text) > MAX_BODY_BYTES:
            raise UiRequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {MAX_BODY_BYTES} bytes"
            )
        body = self.rfile.read(int(length_text))
        self._body_read = True
        return parse_json_body(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer the errors the standard library finds itself (a malformed request line or
        headers, an unknown method) as JSON too, and close: the request was not understood,
        so neither is where the next one starts."""
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        self.close_connection = True
        self._send_json(status, {"ok": False, "error": message or status.phrase})

    def _send_json(
        self,
        status: HTTPStatus,
        answer: Mapping[str, Any],
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        body = json.dumps(answer, separators=(",", ":")).encode()
        self._send(status, body, "application/json; charset=utf-8", headers)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (*_SECURITY_HEADERS, *headers):
            self.send_header(name, value)
        if self.close_connection or self._unread_body():
            # An unread body, whatever the method, would be parsed as the next request.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":  # a HEAD answer has no body
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("ui %s %s", self.address_string(), format % args)


_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class _UiHttpServer(ThreadingHTTPServer):
    """The HTTP server: a thread per connection, at most ``max_connections`` at once, and
    at most ``max_requests`` API requests in progress."""

    daemon_threads = True
    # A restarted UI must get its port back at once, not after TIME_WAIT.
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        app: UiApp,
        static: dict[str, bytes],
        allowed_hosts: Collection[str] = (),
        *,
        max_requests: int = MAX_REQUESTS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.app = app
        self.static = static
        self.allowed_hosts = tuple(allowed_hosts)
        self.requests = threading.BoundedSemaphore(max_requests)
        self._connections = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a thread for the connection, or refuse it when the bound is reached."""
        if not self._connections.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve the connection in its thread, then give its place back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def _refuse(self, request: socket.socket) -> None:
        # Answered from the accepting thread, so never waiting on the client: what it has
        # sent already is drained (closing over unread data would reset the connection,
        # losing the answer), then a fixed 503 and close.
        body = json.dumps(
            {"ok": False, "error": "the UI server has too many connections; try again shortly"}
        ).encode()
        try:
            request.setblocking(False)
            with contextlib.suppress(OSError):  # nothing sent yet
                request.recv(65536)
            request.sendall(_BUSY % (len(body), body))
        except OSError:
            log.debug("refusing a connection failed", exc_info=True)
        finally:
            self.shutdown_request(request)


class UiServer:
    """A running UI: ``port`` it listens on, ``url`` of its page; :meth:`close` stops it."""

    def __init__(self, server: _UiHttpServer, host: str) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="sagaline-ui"
        )
        self._thread.daemon = True
        self.port: int = server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/"

    def _start(self) -> UiServer:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, wait for the serving thread, and close the store and client."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        self._server.app.close()


def start_ui(
    settings: ProjectorSettings,
    *,
    port: int | None = None,
    store: Callable[[], Store] | None = None,
    actions: Callable[[], Actions] | None = None,
    max_requests: int = MAX_REQUESTS,
    max_connections: int = MAX_CONNECTIONS,
) -> UiServer:
    """Serve the UI on ``settings.ui_host``:``settings.ui_port`` (or ``port``; 0 picks a
    free one) from a daemon thread, and return it running.

    ``store`` and ``actions`` make the reader and the sender (default: a
    :class:`~orchestrator.visibility.store.VisibilityStore` on ``settings.postgres_dsn``
    and a :class:`~orchestrator.client.WorkflowClient` on the settings' Kafka); each is
    made on first use. Requests whose ``Host`` is neither a loopback name nor one of
    ``settings.ui_allowed_hosts`` are refused. ``max_requests`` API requests and
    ``max_connections`` connections are served at once; more are answered 503.

    Raises:
        ConfigurationError: the address cannot be bound (the port is in use, or the host
            is not an address of this machine), or ``settings.ui_port`` is 0 (the UI is
            off) and no ``port`` is given; the message names SAGALINE_UI_PORT.
    """
    host = settings.ui_host
    bind_port = settings.ui_port if port is None else port
    if port is None and bind_port == 0:
        raise ConfigurationError("SAGALINE_UI_PORT is 0, which turns the web UI off: set a port")

    def make_store() -> Store:
        from orchestrator.visibility.store import VisibilityStore  # noqa: PLC0415

        return VisibilityStore(
            settings.postgres_dsn.get_secret_value(),
            connect_timeout_s=settings.db_connect_timeout_s,
        )

    def make_actions() -> Actions:
        from orchestrator.client import WorkflowClient  # noqa: PLC0415 (loads Kafka)

        return WorkflowClient(settings)

    app = UiApp(store or make_store, actions or make_actions)
    try:
        server = _UiHttpServer(
            (host, bind_port),
            app,
            _load_static(),
            settings.ui_allowed_hosts,
            max_requests=max_requests,
            max_connections=max_connections,
        )
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve the web UI on {host}:{bind_port} ({exc.strerror or exc}): set "
            "SAGALINE_UI_PORT to a free port (0: no UI), or SAGALINE_UI_HOST to an address "
            "of this host"
        ) from exc
    return UiServer(server, host)._start()


def serve_forever(settings: ProjectorSettings, stop: threading.Event) -> None:
    """Serve the UI (``sagaline ui``) until ``stop`` is set, then close it.

    Raises:
        ConfigurationError: as :func:`start_ui`.
    """
    server = start_ui(settings)
    log.info("web UI at %s", server.url)
    try:
        stop.wait()
    finally:
        server.close()
