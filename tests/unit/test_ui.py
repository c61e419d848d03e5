"""The web UI's request handling without a database or Kafka: parsing and validating
filters, routes and action bodies, and the HTTP answers over an in-memory store."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import psycopg
import pytest

from orchestrator.client import WorkflowClient
from orchestrator.errors import ConfigurationError
from orchestrator.settings import KafkaSettings, ProjectorSettings
from orchestrator.visibility.models import EventRow, WorkflowFilter, WorkflowRow
from orchestrator.visibility.ui import (
    UiApp,
    UiRequestError,
    UiServer,
    decode_cursor,
    encode_cursor,
    host_allowed,
    loopback_host,
    parse_filter,
    parse_json_body,
    parse_time_ms,
    route,
    signal_id_of,
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


class BlockedStore(MemoryStore):
    """A store whose list call hangs (a statement stuck on a dead connection) until the
    test lets it go; ``entered`` is set once a call is inside."""

    def __init__(self) -> None:
        super().__init__([], {})
        self.entered = threading.Event()
        self.release = threading.Event()

    def list_workflows(self, flt: WorkflowFilter) -> list[WorkflowRow]:
        self.entered.set()
        assert self.release.wait(30), "the test never released the store"
        return []


class SentRequests:
    """Records what the UI asked the client to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.flushes = 0

    def cancel(self, workflow_id: str, reason: str = "") -> None:
        self.sent.append(("cancel", workflow_id, reason))

    def signal(
        self, workflow_id: str, name: str, value: Any = None, *, signal_id: str | None = None
    ) -> str:
        self.sent.append(("signal", workflow_id, name, value, signal_id))
        return signal_id or "sig-1"

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
        # Past a bigint: refused here, not a driver error (500) at the database.
        ({"since": ["99999999999999999999"]}, "since: '99999999999999999999' is out of range"),
        ({"until": ["9223372036854775808"]}, "until: '9223372036854775808' is out of range"),
        ({"since": ["1" * 5000]}, "since: "),
        ({"limit": ["1" * 5000]}, "limit: "),
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
    huge = json.dumps([2**63, "a", "b"]).encode()
    past_bigint = base64.urlsafe_b64encode(huge).decode().rstrip("=")
    assert parse_time_ms("since", "0009223372036854775807") == 2**63 - 1
    for forged in ("WzEsMl0", "eyJhIjoxfQ", "WyIxIiwiYSIsImIiXQ", "!!!", past_bigint):
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
    # The query form carries the ids "." and "..", which no path can (dot segments).
    dots = route("GET", "/api/workflow?id=..&run=r1")
    assert (dots.kind, dots.workflow_id, dots.query) == ("describe", "..", {"run": ["r1"]})
    act = route("POST", "/api/workflow/cancel/?id=%2E")
    assert (act.kind, act.workflow_id, act.action, act.query) == ("action", ".", "cancel", {})


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
        ("GET", "/api/workflow", HTTPStatus.BAD_REQUEST),
        ("GET", "/api/workflow?id=a&id=b", HTTPStatus.BAD_REQUEST),
        ("POST", "/api/workflow/explode?id=a", HTTPStatus.NOT_FOUND),
        ("GET", "/api/workflow/cancel?id=a", HTTPStatus.METHOD_NOT_ALLOWED),
        ("POST", "/api/workflow?id=a", HTTPStatus.METHOD_NOT_ALLOWED),
        ("HEAD", "/", HTTPStatus.METHOD_NOT_ALLOWED),
        ("OPTIONS", "/api/workflow/cancel?id=a", HTTPStatus.METHOD_NOT_ALLOWED),
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
    assert signal_id_of({}) is None
    assert signal_id_of({"signal_id": ""}) is None
    assert signal_id_of({"signal_id": "3f2c-ü"}) == "3f2c-ü"
    for bad_id in (5, "a\nb", "x" * 201, ["x"]):
        with pytest.raises(UiRequestError, match="signal_id"):
            signal_id_of({"signal_id": bad_id})


def test_loopback_hosts() -> None:
    for host in ("127.0.0.1", "127.0.0.1:9430", "localhost:1", "LOCALHOST", "[::1]:9430", "::1"):
        assert loopback_host(host), host
    for host in ("evil.example:9430", "10.0.0.1", "0.0.0.0", "[::]:1", "", "127.0.0.1.nip.io"):
        assert not loopback_host(host), host


def test_allowed_hosts_are_loopback_and_the_configured_names() -> None:
    allowed = ["ui.example.com", "proxy.internal:8443", "[fd00::1]", "10.0.0.7"]
    for host in (
        "localhost:9430",
        "[::1]:1",
        "UI.Example.com",
        "ui.example.com.:443",
        "proxy.internal:8443",
        "[fd00::1]:9430",
        "10.0.0.7:9430",
    ):
        assert host_allowed(host, allowed), host
    for host in (
        "",
        "evil.example",
        "ui.example.com.evil.example",
        "proxy.internal",
        "proxy.internal:80",
        "0.0.0.0:9430",
        "10.0.0.8",
    ):
        assert not host_allowed(host, allowed), host
    assert not host_allowed("ui.example.com", [])


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
        ("signal", "order/3", "approve", [1, "x"], None),
        ("resume", "stuck-4"),
    ]
    assert sent.flushes == 3


def test_a_resent_signal_keeps_the_page_s_signal_id(ui: UiServer, sent: SentRequests) -> None:
    """The page makes the id when its form opens: sending the form again (after a 503 that
    it was not confirmed) passes the same id, which the orchestrator applies once."""
    body = {"name": "approve", "payload": None, "signal_id": "5b0e7c4e-page"}
    for _ in range(2):
        status, answer = _json(ui, "POST", "/api/workflow/signal?id=order%2F3", body)
        assert (status, answer["ok"]) == (200, True)
        assert "(signal id 5b0e7c4e-page)" in answer["message"]
    assert sent.sent == [("signal", "order/3", "approve", None, "5b0e7c4e-page")] * 2
    status, answer = _json(
        ui, "POST", "/api/workflow/signal?id=order%2F3", {**body, "signal_id": "a\tb"}
    )
    assert status == 400
    assert answer["error"].startswith("signal_id:")
    assert len(sent.sent) == 2


def test_the_ids_dot_and_dot_dot_are_read_and_acted_on(sent: SentRequests) -> None:
    rows = [_row(".", 1_000), _row("..", 2_000, "STUCK")]
    server = start_ui(
        ProjectorSettings(),
        port=0,
        store=lambda: MemoryStore(rows, {}),
        actions=lambda: sent,
    )
    try:
        for workflow_id in (".", ".."):
            status, answer = _json(server, "GET", f"/api/workflow?id={workflow_id}")
            assert (status, answer["workflow"]["workflow_id"]) == (200, workflow_id)
        status, answer = _json(server, "POST", "/api/workflow/cancel?id=.", {"reason": "dots"})
        assert (status, answer["ok"]) == (200, True)
        status, answer = _json(server, "POST", "/api/workflow/resume?id=..", {})
        assert (status, answer["ok"]) == (200, True)
    finally:
        server.close()
    assert sent.sent == [("cancel", ".", "dots"), ("resume", "..")]


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


def test_the_host_is_checked_when_bound_to_every_address(sent: SentRequests) -> None:
    """In a container the UI binds 0.0.0.0 and is reached as localhost through a published
    port or a port-forward: a rebinding page (its own name as Host) is still refused."""
    settings = ProjectorSettings(ui_host="0.0.0.0", ui_allowed_hosts=["ui.example.com"])
    server = start_ui(
        settings, port=0, store=lambda: MemoryStore(list(ROWS), EVENTS), actions=lambda: sent
    )
    try:
        for method, path in (("GET", "/api/workflows"), ("GET", "/"), ("GET", "/static/app.js")):
            status, _, data = _call(server, method, path, headers={"Host": "evil.example:9430"})
            assert status == 403, path
            assert "SAGALINE_UI_ALLOWED_HOSTS" in json.loads(data)["error"]
        status, _ = _json(
            server,
            "POST",
            "/api/workflows/order%2F3/cancel",
            {},
            headers={"Host": "evil.example:9430"},
        )
        assert status == 403
        assert sent.sent == []
        for host in (f"localhost:{server.port}", "127.0.0.1", "ui.example.com"):
            status, _ = _json(server, "GET", "/api/workflows", headers={"Host": host})
            assert status == 200, host
        # Probes use the pod's address: /healthz answers any Host.
        assert _json(server, "GET", "/healthz", headers={"Host": "10.1.2.3:9430"}) == (
            200,
            {"ok": True},
        )
    finally:
        server.close()


def _raw(server: UiServer, request: bytes) -> tuple[bytes, bool]:
    """Send ``request`` as is; the whole answer up to the server's close (or one answer,
    when it keeps the connection) and whether it closed the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(request)
        answer = http.client.HTTPResponse(conn)
        answer.begin()
        data = answer.read()
        head = f"HTTP/1.1 {answer.status}\r\n".encode() + bytes(answer.headers)
        closed = answer.will_close
        if closed:
            assert conn.recv(1) == b"", "the server kept sending after Connection: close"
    return head + data, closed


def test_a_chunked_body_is_refused_and_the_connection_closed(
    ui: UiServer, sent: SentRequests
) -> None:
    """A chunked body would otherwise be read as length 0, and its chunks parsed as the
    next request on the connection."""
    smuggled = b"GET /api/workflows HTTP/1.1\r\nHost: localhost\r\n\r\n"
    body = b'{"reason": "x"}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    answer, closed = _raw(
        ui,
        b"POST /api/workflows/order%2F3/cancel HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
        + smuggled,
    )
    assert answer.startswith(b"HTTP/1.1 411")
    assert b"Transfer-Encoding is not supported" in answer
    assert closed
    assert sent.sent == []


def test_an_unread_body_closes_the_connection_whatever_the_method(ui: UiServer) -> None:
    smuggled = b"GET /api/workflows HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answer, closed = _raw(
        ui,
        b"GET /api/workflows HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
        % len(smuggled)
        + smuggled,
    )
    assert answer.startswith(b"HTTP/1.1 200")
    assert closed
    # Without a body the connection stays open for the next request.
    _, closed = _raw(ui, b"GET /api/workflows HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert not closed
    answer, closed = _raw(
        ui, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1, 1\r\n\r\nx"
    )
    assert (answer[:12], closed) == (b"HTTP/1.1 400", True)


def test_head_options_and_unknown_methods_get_json_errors(ui: UiServer) -> None:
    status, headers, data = _call(ui, "HEAD", "/api/workflows")
    assert (status, headers["Allow"], data) == (405, "GET", b"")
    assert headers["Content-Type"].startswith("application/json")
    status, headers, data = _call(ui, "OPTIONS", "/api/workflow/cancel?id=a")
    assert (status, headers["Allow"]) == (405, "POST")
    assert json.loads(data)["ok"] is False
    status, headers, data = _call(ui, "BREW", "/")
    assert status == 501
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(data)["ok"] is False


def test_a_stuck_database_call_answers_503_instead_of_hanging_every_request() -> None:
    store = BlockedStore()
    app = UiApp(lambda: store, SentRequests, store_wait_s=0.2)
    first = threading.Thread(target=app.list_workflows, args=({},))
    first.start()
    try:
        assert store.entered.wait(10)
        with pytest.raises(UiRequestError) as caught:
            app.describe("order-1", {})
        assert caught.value.status is HTTPStatus.SERVICE_UNAVAILABLE
        assert "PostgreSQL is slow or unreachable" in caught.value.message
    finally:
        store.release.set()
        first.join(10)
    assert app.list_workflows({})["ok"] is True


def test_requests_over_the_bound_are_answered_503_at_once() -> None:
    store = BlockedStore()
    server = start_ui(
        ProjectorSettings(), port=0, store=lambda: store, actions=SentRequests, max_requests=1
    )
    first = threading.Thread(target=_call, args=(server, "GET", "/api/workflows"))
    first.start()
    try:
        assert store.entered.wait(10)
        status, answer = _json(server, "GET", "/api/workflow?id=order-1")
        assert status == 503
        assert "busy" in answer["error"]
        # The page and the probe are still served.
        assert _json(server, "GET", "/healthz") == (200, {"ok": True})
        assert _call(server, "GET", "/")[0] == 200
    finally:
        store.release.set()
        first.join(10)
        server.close()


def test_connections_over_the_bound_are_answered_503_and_closed() -> None:
    server = start_ui(
        ProjectorSettings(),
        port=0,
        store=lambda: MemoryStore([], {}),
        actions=SentRequests,
        max_connections=1,
    )
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as held:
            # The held connection has its thread once it is answered.
            held.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            first = http.client.HTTPResponse(held)
            first.begin()
            assert first.status == 200
            first.read()
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
                data = b""
                while chunk := extra.recv(4096):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 503")
            assert b"too many connections" in data
        # The place is given back once the held connection's thread sees it closed: polled,
        # each refusal being immediate, until then.
        deadline = time.monotonic() + 30
        while _call(server, "GET", "/healthz")[0] != 200:
            assert time.monotonic() < deadline, "the closed connection's place never came back"
    finally:
        server.close()


def test_an_unconfirmed_action_may_still_be_delivered_not_failed() -> None:
    """With the real client and no broker: the flush times out, and the answer says the
    request is not confirmed and may still arrive (so a signal is resent with its id)."""
    client = WorkflowClient(
        KafkaSettings(kafka_bootstrap="127.0.0.1:1", kafka_extra={"message.timeout.ms": 3000})
    )
    store = MemoryStore(list(ROWS), EVENTS)
    app = UiApp(lambda: store, lambda: client, flush_timeout_s=0.3)
    try:
        with pytest.raises(UiRequestError) as caught:
            app.act("order/3", "signal", {"name": "approve", "signal_id": "page-1"})
    finally:
        app.close()
    assert caught.value.status is HTTPStatus.SERVICE_UNAVAILABLE
    message = caught.value.message
    assert "not confirmed within 0.3 s; it may still be delivered" in message
    assert "signal id page-1" in message
    assert "failed" not in message


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


class _OverlapWatch(SentRequests):
    """Records how many requests were between their send and the end of their flush at
    once: the client's delivery errors are one list a flush takes whole, so two at a time
    could hand one request's failure to another."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.most = 0
        self._lock = threading.Lock()

    def cancel(self, workflow_id: str, reason: str = "") -> None:
        with self._lock:
            self.active += 1
            self.most = max(self.most, self.active)
        super().cancel(workflow_id, reason)

    def flush(self, timeout_s: float = 30.0) -> None:
        time.sleep(0.05)  # a flush that takes a moment, so overlaps would show
        with self._lock:
            self.active -= 1
        super().flush(timeout_s)


def test_concurrent_actions_send_and_flush_one_at_a_time() -> None:
    watch = _OverlapWatch()
    server = start_ui(
        ProjectorSettings(),
        port=0,
        store=lambda: MemoryStore(list(ROWS), EVENTS),
        actions=lambda: watch,
    )
    try:
        answers: list[int] = []

        def cancel() -> None:
            status, _ = _json(server, "POST", "/api/workflows/order%2F3/cancel", {"reason": "x"})
            answers.append(status)

        threads = [threading.Thread(target=cancel) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        server.close()
    assert answers == [200] * 6
    assert (watch.most, watch.flushes) == (1, 6)
