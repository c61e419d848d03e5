"""The orchestrator's in-memory state: committed bytes, closed markers, held inputs, staging."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import WorkflowRecord, WorkflowStatus
from orchestrator.protocol.topics import HELD_PREFIX, held_key, parse_held_key
from orchestrator.runtime.state import PartitionState, Presence, WorkflowStore

CODEC = AvroCodec()


def _record(wid: str, status: WorkflowStatus = WorkflowStatus.RUNNING) -> WorkflowRecord:
    closed = 500 if status.terminal else None
    return WorkflowRecord(
        wid, "order.process", status, encode_json({"id": wid}), 1, 2, 3, closed_at_ms=closed
    )


def _put(state: PartitionState, record: WorkflowRecord) -> None:
    head = CODEC.peek_workflow(CODEC.encode_workflow(record))
    state.put(
        record.workflow_id,
        CODEC.encode_workflow(record),
        head.status,
        head.closed_at_ms or 0,
        head.wake_at_ms,
    )


def test_an_open_workflow_is_kept_as_its_committed_bytes() -> None:
    state = PartitionState(0)
    record = _record("w-1")
    _put(state, record)
    assert CODEC.decode_workflow(state.open["w-1"]) == record
    assert state.stuck == set() and state.closed == {}


def test_a_closed_workflow_is_evicted_to_a_marker_with_its_closing_time() -> None:
    state = PartitionState(0)
    _put(state, _record("w-1", WorkflowStatus.STUCK))
    assert state.stuck == {"w-1"}
    _put(state, _record("w-1", WorkflowStatus.COMPENSATED))
    assert state.open == {} and state.stuck == set()
    assert state.closed == {"w-1": 500}


def test_a_status_from_newer_code_makes_the_workflow_unwritable() -> None:
    state = PartitionState(0)
    _put(state, _record("w-1"))
    state.put("w-1", b"opaque", WorkflowStatus.UNKNOWN, 0)
    assert "w-1" not in state.open
    assert "newer code" in state.unwritable["w-1"]


def test_a_tombstone_forgets_everything_but_held_inputs() -> None:
    state = PartitionState(0)
    _put(state, _record("w-1", WorkflowStatus.COMPLETED))
    state.hold("w-1", 7, b"input")
    state.delete("w-1")
    assert state.closed == {} and state.held == {"w-1": {7: b"input"}}
    state.release("w-1", 7)
    assert state.held == {}


@pytest.mark.parametrize("wid", ["order-1", "a/b:c", "ünïcode", "x" * 300, ""])
def test_held_keys_round_trip_and_never_look_like_a_workflow_key(wid: str) -> None:
    key = held_key(wid, 12_345)
    assert key.startswith(HELD_PREFIX)
    assert parse_held_key(key) == (wid, 12_345)
    assert parse_held_key(wid.encode()) is None
    with pytest.raises(UnicodeDecodeError):
        key.decode()  # no UTF-8 workflow id can collide with it


def test_a_malformed_held_key_is_refused() -> None:
    with pytest.raises(ValueError, match="malformed"):
        parse_held_key(HELD_PREFIX + b"12:x")


def test_staged_changes_reach_the_partition_only_when_promoted() -> None:
    store = WorkflowStore(cache_size=2)
    store.install(PartitionState(0))
    record = _record("w-1")
    store.stage(0, record, CODEC.encode_workflow(record))
    store.stage_hold(0, "w-2", 4, b"held")
    assert store.presence(0, "w-1") is Presence.OPEN
    assert store.holds_any(0, "w-2") and store.held(0, "w-2") == [(4, b"held")]
    assert store.partition(0).open == {}
    store.discard_staged()
    assert store.presence(0, "w-1") is Presence.ABSENT
    assert not store.holds_any(0, "w-2")
    store.stage(0, record, CODEC.encode_workflow(record))
    store.stage_hold(0, "w-2", 4, b"held")
    store.promote()
    assert store.partition(0).open == {"w-1": CODEC.encode_workflow(record)}
    assert store.cached("w-1") == record
    assert store.held(0, "w-2") == [(4, b"held")]
    store.stage_release(0, "w-2", 4)
    assert store.held(0, "w-2") == []
    store.promote()
    assert store.partition(0).held == {}


def test_promoting_a_closed_record_drops_it_from_the_cache() -> None:
    store = WorkflowStore(cache_size=10)
    store.install(PartitionState(0))
    running = _record("w-1")
    store.stage(0, running, CODEC.encode_workflow(running))
    store.promote()
    closed = dataclasses.replace(running, status=WorkflowStatus.COMPLETED, closed_at_ms=900)
    store.stage(0, closed, CODEC.encode_workflow(closed))
    store.promote()
    assert store.cached("w-1") is None
    assert store.presence(0, "w-1") is Presence.CLOSED
    assert store.partition(0).closed == {"w-1": 900}
    store.stage_tombstone(0, "w-1")
    assert store.presence(0, "w-1") is Presence.ABSENT
    store.promote()
    assert store.partition(0).closed == {}


def test_the_decoded_cache_is_bounded() -> None:
    store = WorkflowStore(cache_size=2)
    for i in range(3):
        store.remember(f"w-{i}", _record(f"w-{i}"))
    assert store.cached("w-0") is None
    assert store.cached("w-1") is not None and store.cached("w-2") is not None


def test_dropping_a_partition_drops_its_staged_changes() -> None:
    store = WorkflowStore()
    store.install(PartitionState(0))
    store.install(PartitionState(1))
    for partition, wid in ((0, "a"), (1, "b")):
        record = _record(wid)
        store.stage(partition, record, CODEC.encode_workflow(record))
        store.stage_hold(partition, wid, 1, b"x")
    store.drop([0])
    assert [s[1] for s in store.staged()] == ["b"]
    assert [h[1] for h in store.staged_held()] == ["b"]
    assert not store.owns(0) and store.owns(1)


# --- the timer index ----------------------------------------------------------------


def _timed(
    wid: str, wake_at: int | None, status: WorkflowStatus = WorkflowStatus.RUNNING
) -> WorkflowRecord:
    return dataclasses.replace(_record(wid, status), wake_at_ms=wake_at)


def test_due_workflows_come_earliest_first_and_only_once_per_batch() -> None:
    state = PartitionState(0)
    for wid, at in (("c", 30), ("a", 10), ("b", 20), ("later", 99)):
        _put(state, _timed(wid, at))
    assert state.next_wake() == 10
    assert state.due(25, limit=10) == ["a", "b"]
    assert state.due(25, limit=10) == []  # woken in this batch: not again
    assert state.due(40, limit=1) == ["c"]
    assert state.next_wake() == 99


def test_an_aborted_or_idle_wake_is_due_again_after_settle() -> None:
    state = PartitionState(0)
    _put(state, _timed("a", 10))
    assert state.due(10, limit=5) == ["a"]
    state.settle()  # the batch aborted, or the wake wrote nothing
    assert state.due(10, limit=5) == ["a"]


def test_a_committed_record_moves_or_removes_its_wake_time() -> None:
    store = WorkflowStore()
    store.install(PartitionState(0))
    state = store.partition(0)
    _put(state, _timed("a", 10))
    _put(state, _timed("b", 10))
    assert state.due(10, limit=5) == ["a", "b"]
    moved, closed = _timed("a", 500), _timed("b", None, WorkflowStatus.COMPLETED)
    store.stage(0, moved, CODEC.encode_workflow(moved))
    store.stage(0, closed, CODEC.encode_workflow(closed))
    store.promote()
    assert state.wake == {"a": 500}
    assert state.due(499, limit=5) == []
    assert store.next_wake() == 500
    assert state.due(500, limit=5) == ["a"]


def test_a_parked_workflow_has_no_wake_time_even_if_its_record_had_one() -> None:
    state = PartitionState(0)
    _put(state, _timed("a", 10, WorkflowStatus.STUCK))
    assert state.wake == {} and state.next_wake() is None


def test_moving_a_wake_time_during_a_batch_makes_it_due_again_later() -> None:
    state = PartitionState(0)
    _put(state, _timed("a", 10))
    assert state.due(10, limit=5) == ["a"]
    state.set_wake("a", 1_010)  # the wake found nothing due: look again later
    assert state.due(1_000, limit=5) == []
    assert state.due(1_010, limit=5) == ["a"]


def test_the_index_stays_small_when_wake_times_keep_moving() -> None:
    state = PartitionState(0)
    for at in range(5_000):
        state.set_wake("a", at)
    assert len(state._timers) <= 2 * len(state.wake) + 1_025
    assert state.due(10_000, limit=5) == ["a"]
