"""The web UI's request handling without a database or Kafka: parsing and validating
filters, routes and action bodies, and the HTTP answers over an in-memory store."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import psycopg
import pytest

from orchestrator.errors import ConfigurationError
from orchestrator.settings import ProjectorSettings
from orchestrator.visibility.models import EventRow, WorkflowFilter, WorkflowRow
from orchestrator.visibility.ui import (
    UiRequestError,
    UiServer,
    decode_cursor,
    encode_cursor,
    loopback_host,
    parse_filter,
    parse_json_body,
    parse_time_ms,
    route,
    signal_request,
    start_ui,
)


def _row(workflow_id: str, started: int, status: str = "RUNNING", **more: Any) -> WorkflowRow:
    fields: dict[str, Any] = {
        "workflow_id": workflow_id,
        "run_id": f"run-{workflow_id}",
        "workflow_type": "order.process",
        "status": status,
        "started_at_ms": started,
        "updated_at_ms": started + 5,
        "closed_at_ms": None if status in ("RUNNING", "STUCK") else started + 9,
        "revision": 3,
        "current_step": "activity payment.charge" if status == "RUNNING" else None,
        "attempts": 1,
        "error_type": None,
        "error_message": None,
        "result": None,
        "input": '{"order_id": "x"}',
        "parent_workflow_id": None,
        "partition": 0,
        "offset": started,
    }
    fields.update(more)
    return WorkflowRow(**fields)


class MemoryStore:
    """The store's reading API over a list of rows, filtered as the SQL does."""

    def __init__(self, rows: list[WorkflowRow], events: dict[str, list[EventRow]]) -> None:
        self.rows = rows
        self.event_rows = events
        self.closed = False

    def _matches(self, row: WorkflowRow, flt: WorkflowFilter, *, counting: bool) -> bool:
        key = (row.started_at_ms, row.workflow_id, row.run_id)
        return (
            (flt.workflow_type is None or row.workflow_type == flt.workflow_type)
            and (counting or not flt.statuses or row.status in flt.statuses)
            and (flt.id_prefix is None or row.workflow_id.startswith(flt.id_prefix))
            and (flt.started_after_ms is None or row.started_at_ms >= flt.started_after_ms)
            and (flt.started_before_ms is None or row.started_at_ms < flt.started_before_ms)
            and (counting or flt.before is None or key < flt.before)
        )

    def list_workflows(self, flt: WorkflowFilter) -> list[WorkflowRow]:
        found = [r for r in self.rows if self._matches(r, flt, counting=False)]
        found.sort(key=lambda r: (r.started_at_ms, r.workflow_id, r.run_id), reverse=True)
        return found[: flt.limit]

    def count_by_status(self, flt: WorkflowFilter) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows:
            if self._matches(row, flt, counting=True):
                counts[row.status] = counts.get(row.status, 0) + 1
        return counts

    def describe(self, workflow_id: str, run_id: str | None = None) -> WorkflowRow | None:
        runs = self.runs(workflow_id)
        if run_id is None:
            return runs[0] if runs else None
        return next((r for r in runs if r.run_id == run_id), None)

    def runs(self, workflow_id: str) -> list[WorkflowRow]:
        found = [r for r in self.rows if r.workflow_id == workflow_id]
        return sorted(found, key=lambda r: r.started_at_ms, reverse=True)

    def events(self, workflow_id: str, run_id: str) -> list[EventRow]:
        return self.event_rows.get(run_id, [])

    def close(self) -> None:
        self.closed = True


class BrokenStore(MemoryStore):
    """A store whose database is down."""

    def list_workflows(self, flt: WorkflowFilter) -> list[WorkflowRow]:
        raise psycopg.OperationalError(
            'connection to server at "10.0.0.9", port 5432 failed: password for user "secret"'
        )


class SentRequests:
    """Records what the UI asked the client to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.flushes = 0

    def cancel(self, workflow_id: str, reason: str = "") -> None:
        self.sent.append(("cancel", workflow_id, reason))

    def signal(self, workflow_id: str, name: str, value: Any = None) -> str:
        self.sent.append(("signal", workflow_id, name, value))
        return "sig-1"

    def resume(self, workflow_id: str) -> None:
        self.sent.append(("resume", workflow_id))

    def flush(self, timeout_s: float = 30.0) -> None:
        self.flushes += 1

    def close(self) -> None:
        pass


# --- parsing ---------------------------------------------------------------------------


def test_an_empty_query_is_the_default_filter() -> None:
    assert parse_filter({}) == WorkflowFilter(limit=50)
    assert parse_filter({"type": [""], "status": [""], "limit": [""]}) == WorkflowFilter()


def test_filter_values_are_parsed() -> None:
    flt = parse_filter(
        {
            "type": ["order.process"],
            "status": ["running,Stuck", "COMPLETED", "running"],
            "id_prefix": ["order-"],
            "since": ["1700000000000"],
            "until": ["2023-11-14T22:13:21Z"],
            "limit": ["7"],
        }
    )
    assert flt == WorkflowFilter(
        workflow_type="order.process",
        statuses=("RUNNING", "STUCK", "COMPLETED"),
        id_prefix="order-",
        started_after_ms=1_700_000_000_000,
        started_before_ms=1_700_000_001_000,
        limit=7,
    )


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ({"status": ["RUNING"]}, "status: unknown status 'RUNING'"),
        ({"limit": ["0"]}, "limit: '0' is not a number from 1 to 500"),
        ({"limit": ["501"]}, "limit"),
        ({"limit": ["ten"]}, "limit"),
        ({"since": ["yesterday"]}, "since: 'yesterday' is not a time"),
        ({"until": ["2025-13-01"]}, "until"),
        ({"since": ["2000"], "until": ["1000"]}, "since is after until"),
        ({"statuses": ["RUNNING"]}, "unknown parameter 'statuses'"),
        ({"type": ["a", "b"]}, "type: given 2 times"),
        ({"type": ["a\x00b"]}, "type: must be at most"),
        ({"id_prefix": ["x" * 1001]}, "id_prefix"),
        ({"before": ["not-a-cursor"]}, "before: not a page cursor"),
    ],
)
def test_a_bad_filter_value_is_a_400_with_one_line(query: dict[str, list[str]], names: str) -> None:
    with pytest.raises(UiRequestError) as caught:
        parse_filter(query)
    assert caught.value.status is HTTPStatus.BAD_REQUEST
    assert names in caught.value.message
    assert "\n" not in caught.value.message


def test_times_are_milliseconds_or_iso_8601_and_naive_means_utc() -> None:
    assert parse_time_ms("since", " 42 ") == 42
    assert parse_time_ms("since", "1970-01-01T00:00:01") == 1_000
    assert parse_time_ms("since", "1970-01-01T01:00:01+01:00") == 1_000
    with pytest.raises(UiRequestError, match="since"):
        parse_time_ms("since", "-5")


def test_a_cursor_round_trips_and_resists_tampering() -> None:
    row = _row("a/b ü?&", 123)
    assert decode_cursor(encode_cursor(row)) == (123, "a/b ü?&", "run-a/b ü?&")
    assert parse_filter({"before": [encode_cursor(row)]}).before == (
        123,
        "a/b ü?&",
        "run-a/b ü?&",
    )
    for forged in ("WzEsMl0", "eyJhIjoxfQ", "WyIxIiwiYSIsImIiXQ", "!!!"):
        with pytest.raises(UiRequestError, match="before"):
            decode_cursor(forged)


def test_routes() -> None:
    assert route("GET", "/").kind == "static"
    assert route("GET", "/static/app.js").static == "/static/app.js"
    assert route("GET", "/healthz").kind == "health"
    listed = route("GET", "/api/workflows?status=RUNNING&type=")
    assert listed.kind == "list"
    assert listed.query == {"status": ["RUNNING"], "type": [""]}
    assert route("GET", "/api/workflows/").kind == "list"
    one = route("GET", "/api/workflows/order%2F1%3Fx%20y?run=r1")
    assert (one.kind, one.workflow_id, one.query) == ("describe", "order/1?x y", {"run": ["r1"]})
    act = route("POST", "/api/workflows/%C3%BC%2F2/signal")
    assert (act.kind, act.workflow_id, act.action) == ("action", "ü/2", "signal")


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "/nope", HTTPStatus.NOT_FOUND),
        ("GET", "/api/workflows/a/b/c", HTTPStatus.NOT_FOUND),
        ("POST", "/api/workflows/a/explode", HTTPStatus.NOT_FOUND),
        ("POST", "/api/workflows", HTTPStatus.METHOD_NOT_ALLOWED),
        ("GET", "/api/workflows/a/cancel", HTTPStatus.METHOD_NOT_ALLOWED),
        ("DELETE", "/api/workflows/a", HTTPStatus.METHOD_NOT_ALLOWED),
        ("POST", "/", HTTPStatus.METHOD_NOT_ALLOWED),
        ("GET", "/api/workflows/%FF", HTTPStatus.BAD_REQUEST),
        ("GET", "/api/workflows?type=%FF", HTTPStatus.BAD_REQUEST),
    ],
)
def test_bad_routes(method: str, target: str, status: HTTPStatus) -> None:
    with pytest.raises(UiRequestError) as caught:
        route(method, target)
    assert caught.value.status is status


def test_action_bodies() -> None:
    assert parse_json_body(b"") == {}
    assert parse_json_body(b' {"reason": "r"} ') == {"reason": "r"}
    assert signal_request({"name": "approve", "payload": {"by": "ann"}}) == (
        "approve",
        {"by": "ann"},
    )
    assert signal_request({"name": "go"}) == ("go", None)
    for body in (b"[1]", b"{", b"null"):
        with pytest.raises(UiRequestError, match="body"):
            parse_json_body(body)
    for bad in ({}, {"name": ""}, {"name": 3}, {"name": "a\x00"}, {"name": "x" * 201}):
        with pytest.raises(UiRequestError, match="name"):
            signal_request(bad)


def test_loopback_hosts() -> None:
    for host in ("127.0.0.1", "127.0.0.1:9430", "localhost:1", "LOCALHOST", "[::1]:9430", "::1"):
        assert loopback_host(host), host
    for host in ("evil.example:9430", "10.0.0.1", "0.0.0.0", "[::]:1", "", "127.0.0.1.nip.io"):
        assert not loopback_host(host), host


# --- over HTTP ---------------------------------------------------------------------------


ROWS = [
    _row("order-1", 1_000, "COMPLETED", result='{"charge_id": "c1"}'),
    _row("order-2", 2_000, "COMPENSATED", error_type="PaymentDeclined", error_message="no"),
    _row("order/3", 3_000, "RUNNING"),
    _row("stuck-4", 4_000, "STUCK", error_type="UnknownWorkflowType", error_message="why"),
    _row("other-5", 5_000, "RUNNING", workflow_type="control.approval"),
]
EVENTS = {
    "run-order-2": [
        EventRow(0, "ActivityScheduled", 2_001, 0, 1, "inventory.reserve", {"payload": "{}"}),
        EventRow(1, "ActivityCompleted", 2_002, 0, 1, None, {"result": "{}"}),
    ]
}


@pytest.fixture
def sent() -> SentRequests:
    return SentRequests()


@pytest.fixture
def ui(sent: SentRequests) -> Iterator[UiServer]:
    made: list[MemoryStore] = []

    def make_store() -> MemoryStore:
        made.append(MemoryStore(list(ROWS), EVENTS))
        return made[-1]

    server = start_ui(ProjectorSettings(), port=0, store=make_store, actions=lambda: sent)
    yield server
    server.close()
    # Made once, on first use, shared by the request threads, closed with the server.
    assert len(made) <= 1
    assert all(store.closed for store in made)


def _call(
    server: UiServer,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        sent_headers = {"Content-Type": "application/json"} if data is not None else {}
        sent_headers.update(headers or {})
        conn.request(method, path, body=data, headers=sent_headers)
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        conn.close()


def _json(server: UiServer, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    status, _, data = _call(server, method, path, body, **kw)
    return status, json.loads(data)


def test_the_page_and_its_files_are_served_with_a_strict_policy(ui: UiServer) -> None:
    status, headers, body = _call(ui, "GET", "/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b'<script src="/static/app.js"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    for path, kind in (("/static/app.js", "text/javascript"), ("/static/app.css", "text/css")):
        status, headers, body = _call(ui, "GET", path)
        assert (status, headers["Content-Type"].split(";")[0]) == (200, kind)
        assert body
    assert _json(ui, "GET", "/healthz") == (200, {"ok": True})
    assert ui.url == f"http://127.0.0.1:{ui.port}/"


def test_the_list_pages_through_with_counts(ui: UiServer) -> None:
    status, answer = _json(ui, "GET", "/api/workflows?limit=2")
    assert status == 200
    assert [w["workflow_id"] for w in answer["workflows"]] == ["other-5", "stuck-4"]
    assert "input" not in answer["workflows"][0]
    assert answer["counts"]["RUNNING"] == 2
    assert answer["counts"]["FAILED"] == 0
    assert answer["total"] == 5
    status, answer = _json(ui, "GET", f"/api/workflows?limit=2&before={answer['next']}")
    assert [w["workflow_id"] for w in answer["workflows"]] == ["order/3", "order-2"]
    status, answer = _json(ui, "GET", f"/api/workflows?limit=2&before={answer['next']}")
    assert [w["workflow_id"] for w in answer["workflows"]] == ["order-1"]
    assert answer["next"] is None


def test_the_status_filter_narrows_the_rows_not_the_counts(ui: UiServer) -> None:
    _, answer = _json(ui, "GET", "/api/workflows?status=RUNNING&type=order.process")
    assert [w["workflow_id"] for w in answer["workflows"]] == ["order/3"]
    assert answer["counts"]["COMPLETED"] == 1
    assert answer["total"] == 4


def test_a_bad_filter_is_a_400_json_answer(ui: UiServer) -> None:
    status, answer = _json(ui, "GET", "/api/workflows?status=NOPE")
    assert status == 400
    assert answer["ok"] is False
    assert answer["error"].startswith("status: unknown status 'NOPE'")


def test_one_workflow_with_its_runs_and_events(ui: UiServer) -> None:
    status, answer = _json(ui, "GET", "/api/workflows/order-2")
    assert status == 200
    assert answer["workflow"]["status"] == "COMPENSATED"
    assert answer["latest_run_id"] == "run-order-2"
    assert [r["run_id"] for r in answer["runs"]] == ["run-order-2"]
    assert [e["kind"] for e in answer["events"]] == ["ActivityScheduled", "ActivityCompleted"]
    status, answer = _json(ui, "GET", "/api/workflows/order%2F3")
    assert (status, answer["workflow"]["workflow_id"]) == (200, "order/3")
    status, answer = _json(ui, "GET", "/api/workflows/order-2?run=other")
    assert status == 404
    assert "projector" in answer["error"]
    status, answer = _json(ui, "GET", "/api/workflows/nobody")
    assert status == 404


def test_actions_send_requests_for_open_workflows(ui: UiServer, sent: SentRequests) -> None:
    status, answer = _json(ui, "POST", "/api/workflows/order%2F3/cancel", {"reason": "by hand"})
    assert (status, answer["ok"]) == (200, True)
    assert "cancel" in answer["message"]
    status, answer = _json(
        ui, "POST", "/api/workflows/order%2F3/signal", {"name": "approve", "payload": [1, "x"]}
    )
    assert (status, answer["ok"]) == (200, True)
    assert "sig-1" in answer["message"]
    status, answer = _json(ui, "POST", "/api/workflows/stuck-4/resume", {})
    assert (status, answer["ok"]) == (200, True)
    assert sent.sent == [
        ("cancel", "order/3", "by hand"),
        ("signal", "order/3", "approve", [1, "x"]),
        ("resume", "stuck-4"),
    ]
    assert sent.flushes == 3


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/api/workflows/order-1/cancel", {}, 409, "has closed COMPLETED"),
        ("/api/workflows/order%2F3/resume", {}, 409, "not STUCK"),
        ("/api/workflows/order%2F3/signal", {"name": ""}, 400, "name"),
        ("/api/workflows/order%2F3/cancel", {"reason": 5}, 400, "reason"),
        ("/api/workflows/order%2F3/cancel", {"run_id": "older"}, 409, "not the latest run"),
        ("/api/workflows/ghost/cancel", {}, 404, "no workflow 'ghost'"),
    ],
)
def test_actions_that_would_change_nothing_are_refused(
    ui: UiServer, sent: SentRequests, path: str, body: Any, status: int, says: str
) -> None:
    answered, answer = _json(ui, "POST", path, body)
    assert answered == status
    assert says in answer["error"]
    assert sent.sent == []


def test_actions_need_json_from_the_ui_s_own_page(ui: UiServer, sent: SentRequests) -> None:
    status, answer = _json(
        ui,
        "POST",
        "/api/workflows/order%2F3/cancel",
        {},
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 415
    status, answer = _json(
        ui, "POST", "/api/workflows/order%2F3/cancel", {}, headers={"Sec-Fetch-Site": "same-site"}
    )
    assert status == 403
    assert "own page" in answer["error"]
    assert sent.sent == []


def test_requests_naming_another_host_are_refused_on_loopback(ui: UiServer) -> None:
    status, answer = _json(ui, "GET", "/api/workflows", headers={"Host": "evil.example:80"})
    assert status == 403
    assert "loopback" in answer["error"]
    status, _ = _json(ui, "GET", "/api/workflows", headers={"Host": f"localhost:{ui.port}"})
    assert status == 200


def test_a_database_failure_is_a_503_that_shows_no_connection_details() -> None:
    store = BrokenStore([], {})
    server = start_ui(ProjectorSettings(), port=0, store=lambda: store, actions=SentRequests)
    try:
        status, answer = _json(server, "GET", "/api/workflows")
    finally:
        server.close()
    assert status == 503
    assert answer["error"] == "the visibility database is unavailable (see the UI server's log)"


def test_a_port_in_use_is_a_configuration_error_naming_the_variable() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ProjectorSettings(ui_port=port)
        with pytest.raises(ConfigurationError, match="SAGALINE_UI_PORT"):
            start_ui(settings)
    with pytest.raises(ConfigurationError, match="SAGALINE_UI_PORT is 0"):
        start_ui(settings.model_copy(update={"ui_port": 0}))
