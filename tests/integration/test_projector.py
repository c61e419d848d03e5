"""The visibility projector against the real broker and PostgreSQL: rows that match the
history topic, idempotent replays, and the archive that outlives retention."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from examples.order_saga.harness import make_orders
from orchestrator.errors import ConfigurationError
from orchestrator.gate.sources import read_history
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.records import Failure, Payload, WorkflowRecord, WorkflowStatus
from orchestrator.protocol.topics import Topics
from orchestrator.settings import KafkaSettings, ProjectorSettings
from orchestrator.visibility.archive import ArchiveGate
from orchestrator.visibility.models import WorkflowFilter, WorkflowRow
from orchestrator.visibility.projection import project
from orchestrator.visibility.projector import run_projector
from orchestrator.visibility.store import VisibilityStore
from tests.integration.pipeline import Saga, projecting, wait_for_log

pytestmark = pytest.mark.integration
T = TypeVar("T")


def _settings(saga: Saga, group: str) -> ProjectorSettings:
    return ProjectorSettings(
        kafka_bootstrap=saga.bootstrap,
        topic_prefix=saga.topics.prefix,
        postgres_dsn=saga.dsn,
        projector_group_id=group,
        metrics_port=0,
        ui_port=0,
    )


def wait_until(what: str, probe: Callable[[], T | None], deadline_s: float = 90.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what``."""
    end = time.monotonic() + deadline_s
    last: T | None = None
    while time.monotonic() < end:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} within {deadline_s} s; last seen: {last!r}")


def caught_up(settings: ProjectorSettings, topics: Topics) -> bool:
    """The projector's group has committed the history topic up to its end."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.consumer_group}
    )
    try:
        meta = consumer.list_topics(topics.history, timeout=10).topics[topics.history]
        parts = [TopicPartition(topics.history, p) for p in meta.partitions]
        committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
        for tp in parts:
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            # read_committed stops before a trailing transaction marker: high - 1 is home too.
            if high > 0 and committed.get(tp.partition, -1) < high - 1:
                return False
        return True
    finally:
        consumer.close()


def snapshot(dsn: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Both tables, sorted, for comparing two projections."""
    with psycopg.connect(dsn) as conn:
        workflows = conn.execute("SELECT * FROM sagaline_workflows ORDER BY 1, 2").fetchall()
        events = conn.execute("SELECT * FROM sagaline_workflow_events ORDER BY 1, 2, 3").fetchall()
    return workflows, events


def test_the_projection_matches_history_and_replaying_it_changes_nothing(saga: Saga) -> None:
    orders = make_orders(30, declined_every=5)
    ids = [o["order_id"] for o in orders]
    saga.orchestrator("o1")
    saga.start_participants()
    saga.start_orders(orders)
    done = saga.finish(orders)

    first = _settings(saga, "projector-a")
    store = VisibilityStore(saga.dsn)
    with projecting(first):
        wait_until(
            "all 30 runs projected as closed",
            lambda: (
                caught_up(first, saga.topics)
                and store.count_by_status(WorkflowFilter()).get("RUNNING", 0) == 0
                and sum(store.count_by_status(WorkflowFilter()).values()) == 30
            ),
        )
    counts = store.count_by_status(WorkflowFilter())
    assert counts == {"COMPLETED": 24, "COMPENSATED": 6}, counts
    for wid in ids:
        record = done[wid]
        row = store.describe(wid)
        assert row is not None, wid
        assert (row.run_id, row.status, row.revision) == (
            record.run_id,
            record.status.value,
            record.revision,
        )
        assert row.current_step is None and row.closed_at_ms == record.closed_at_ms
        events = store.events(wid, row.run_id)
        assert [e.kind for e in events] == [type(e).__name__ for e in record.events]
        if record.status is WorkflowStatus.COMPENSATED:
            assert row.error_type is not None and row.result is None
            assert any(e.detail.get("compensation") for e in events), events
        else:
            assert row.result is not None and "charge_id" in row.result
    before = snapshot(saga.dsn)

    # Another group reads the whole topic again into the same tables: nothing changes.
    second = _settings(saga, "projector-b")
    with projecting(second):
        wait_until("the second projector caught up", lambda: caught_up(second, saga.topics))
    assert snapshot(saga.dsn) == before

    # And from empty tables, a third rebuilds the same rows.
    with psycopg.connect(saga.dsn) as conn:
        conn.execute("TRUNCATE sagaline_workflows, sagaline_workflow_events")
    third = _settings(saga, "projector-c")
    with projecting(third):
        wait_until("the third projector caught up", lambda: caught_up(third, saga.topics))
    assert snapshot(saga.dsn) == before

    # Listing is by the filters, newest first, and pages by the cursor.
    page = store.list_workflows(WorkflowFilter(statuses=("COMPENSATED",), limit=4))
    assert [r.status for r in page] == ["COMPENSATED"] * 4
    rest = store.list_workflows(
        WorkflowFilter(
            statuses=("COMPENSATED",),
            before=(page[-1].started_at_ms, page[-1].workflow_id, page[-1].run_id),
        )
    )
    assert len(rest) == 2 and not {r.workflow_id for r in rest} & {r.workflow_id for r in page}
    prefix = ids[0][: len("order-") + 8]
    assert len(store.list_workflows(WorkflowFilter(id_prefix=prefix, limit=100))) == 30
    assert store.list_workflows(WorkflowFilter(id_prefix=prefix + "%")) == []
    assert store.list_workflows(WorkflowFilter(workflow_type="no.such.type")) == []
    store.close()


def test_retention_waits_for_the_archive_and_archived_workflows_stay_describable(
    saga: Saga,
) -> None:
    orders = make_orders(6, declined_every=3)
    ids = [o["order_id"] for o in orders]
    orchestrator = saga.orchestrator("o1", closed_retention_ms="500", archive_dsn=saga.dsn)
    saga.start_participants()
    saga.start_orders(orders)
    saga.finish(orders)
    kafka = KafkaSettings(kafka_bootstrap=saga.bootstrap, topic_prefix=saga.topics.prefix)

    # No projector yet, so no visibility tables: retention must hold every record back.
    wait_for_log(orchestrator, "retention:", 60)
    assert set(ids) <= set(read_history(kafka).latest), "retention deleted unarchived runs"

    settings = _settings(saga, "projector-archive")
    store = VisibilityStore(saga.dsn)
    store.ensure_schema()  # so the probe below can ask before the projector's first batch
    with projecting(settings):

        def all_archived() -> list[WorkflowRow] | None:
            found = [store.describe(w) for w in ids]
            rows = [r for r in found if r is not None and r.archived]
            return rows if len(rows) == len(ids) else None

        rows = wait_until("every run archived after retention tombstoned it", all_archived)
    still = set(read_history(kafka).latest)
    assert not set(ids) & still, f"tombstones missing for {sorted(set(ids) & still)}"
    for row in rows:
        assert row.status in ("COMPLETED", "COMPENSATED") and row.closed_at_ms is not None
        assert store.events(row.workflow_id, row.run_id), row.workflow_id
    store.close()


def _row(workflow_id: str, run_id: str, started: int, closed: int | None) -> WorkflowRow:
    return WorkflowRow(
        workflow_id=workflow_id,
        run_id=run_id,
        workflow_type="t",
        status="COMPLETED" if closed else "RUNNING",
        started_at_ms=started,
        updated_at_ms=started,
        closed_at_ms=closed,
        revision=1,
        current_step=None,
        attempts=0,
        error_type=None,
        error_message=None,
        result=None,
        input=None,
        parent_workflow_id=None,
        partition=0,
        offset=started,
    )


def test_the_archive_gate_releases_only_the_run_the_projector_holds_closed(
    postgres_dsn: str,
) -> None:
    gate = ArchiveGate(postgres_dsn)
    # No tables yet (no projector ever ran): nothing is released, nothing raises.
    assert list(gate.release(0, {"a": "r1"})) == []
    store = VisibilityStore(postgres_dsn)
    store.ensure_schema()
    store.apply(
        [
            (_row("a", "r1", 1, 5), []),  # closed, the run retention is about to delete
            (_row("b", "r1", 1, 5), []),  # closed, but the orchestrator closed run r2 since
            (_row("c", "r1", 1, None), []),  # still open as far as the projector knows
        ]
    )
    released = gate.release(0, {"a": "r1", "b": "r2", "c": "r1", "d": "r1"})
    assert sorted(released) == ["a"]
    gate.close()
    # A database that cannot be reached releases nothing either.
    assert list(ArchiveGate("postgresql://nobody@127.0.0.1:1/none").release(0, {"a": "r1"})) == []
    store.close()


def test_list_filters_are_served_by_indexes(postgres_dsn: str) -> None:
    store = VisibilityStore(postgres_dsn)
    store.ensure_schema()
    filters = {
        "type": "workflow_type = 't' ORDER BY started_at_ms DESC, workflow_id DESC, run_id DESC",
        "status": "status = ANY('{FAILED}') ORDER BY started_at_ms DESC, workflow_id DESC, "
        "run_id DESC",
        "prefix": "workflow_id LIKE 'order-1%'",
        "time": "started_at_ms >= 5 AND started_at_ms < 9 ORDER BY started_at_ms DESC",
    }
    with psycopg.connect(postgres_dsn) as conn:
        # Tiny tables make a sequential scan cheapest; forbid it to see which index serves.
        conn.execute("SET enable_seqscan = off")
        for name, where in filters.items():
            plan = "\n".join(
                r[0]
                for r in conn.execute(
                    f"EXPLAIN SELECT * FROM sagaline_workflows WHERE {where} LIMIT 50"
                ).fetchall()
            )
            assert "Index" in plan and "sagaline_workflows_by_" in plan, f"{name}:\n{plan}"
    store.close()


def test_a_missing_history_topic_stops_the_projector_with_one_clear_error(
    kafka_bootstrap: str, postgres_dsn: str
) -> None:
    settings = ProjectorSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix="no-such-deployment",
        postgres_dsn=postgres_dsn,
        metrics_port=0,
        ui_port=0,
    )
    with pytest.raises(ConfigurationError, match=r"no-such-deployment\.history does not exist"):
        run_projector(settings, threading.Event())


def test_runs_whose_end_the_projector_never_saw_are_closed_as_unknown(
    postgres_dsn: str,
) -> None:
    store = VisibilityStore(postgres_dsn)
    store.ensure_schema()
    # "a" run r1 was open when last seen; its closing record was compacted away, and now
    # run r2 of the same id arrives.
    store.apply([(_row("a", "r1", 1, None), [])])
    store.apply([(_row("a", "r2", 9, None), [])])
    old = store.describe("a", "r1")
    assert old is not None and (old.status, old.error_type, old.closed_at_ms) == (
        "UNKNOWN",
        "Unprojected",
        9,
    ), old
    assert "r2 replaced this run" in (old.error_message or "")
    current = store.describe("a")
    assert current is not None and (current.run_id, current.status) == ("r2", "RUNNING")
    # "b" was deleted by retention while the projector was behind: the tombstone closes it.
    store.apply([(_row("b", "r1", 3, None), [])])
    store.apply([], [("b", 50)])
    gone = store.describe("b")
    assert gone is not None and (gone.archived, gone.status) == (True, "UNKNOWN"), gone
    # Applying it all again changes nothing.
    before = snapshot(postgres_dsn)
    store.apply([(_row("a", "r1", 1, None), []), (_row("a", "r2", 9, None), [])], [("b", 50)])
    assert snapshot(postgres_dsn) == before
    store.close()


def test_text_postgresql_cannot_store_does_not_stop_the_projection(postgres_dsn: str) -> None:
    codec = AvroCodec()
    record = WorkflowRecord(
        workflow_id="nul\x00id",
        workflow_type="type\x00with nul",
        status=WorkflowStatus.STUCK,
        input=Payload(b'"\\u0000 in JSON"'),
        started_at_ms=1,
        updated_at_ms=2,
        run_id="r1",
        failure=Failure("Bad\x00Type", "message \x00"),
    )
    row, events = project(codec.decode_workflow(codec.encode_workflow(record)), 0, 7)
    store = VisibilityStore(postgres_dsn)
    store.ensure_schema()
    store.apply([(row, events)])
    found = store.describe("nul\ufffdid")
    assert found is not None and found.workflow_type == "type\ufffdwith nul"
    assert found.error_type == "Bad\ufffdType"
    store.close()
