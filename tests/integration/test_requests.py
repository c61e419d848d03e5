"""Requests that get an answer, end to end on the real broker: starts with every id-reuse
policy (and a retried start, also after a restore), a query answered while the workflow
sleeps that records nothing, and updates with a validator, a retried update id and an
unknown handler."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from orchestrator.client import RequestFailedError, WorkflowClient
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.partitioning import partition_for
from orchestrator.protocol.records import (
    IfClosed,
    IfRunning,
    UpdateAccepted,
    WorkflowRecord,
    WorkflowStatus,
)
from tests.integration.pipeline import Saga
from tests.integration.test_hardening import PARTITIONS, client_for, status_of, wait_until

APP = "tests.integration.control:registry"
ASLEEP = {"sleep_s": 3600}


def _failure(call: object) -> str:
    """The error type of the RequestFailedError ``call`` raises."""
    assert callable(call)
    with pytest.raises(RequestFailedError) as caught:
        call()
    return caught.value.error_type


def _run_of(saga: Saga, wid: str) -> str:
    saga.watcher.poll()
    record = saga.watcher.latest.get(wid)
    return "" if record is None else record.run_id


def test_id_reuse_policies_queries_and_updates(saga: Saga) -> None:
    saga.orchestrator("a", app=APP)
    client: WorkflowClient = client_for(saga)
    wid = f"cart-{uuid.uuid4().hex[:8]}"
    try:
        # A new id: a run is created; the same request again gets the same answer.
        first = client.start_workflow("control.cart", ASLEEP, workflow_id=wid, request_id="r-1")
        assert first.created and first.status is WorkflowStatus.RUNNING
        again = client.start_workflow("control.cart", ASLEEP, workflow_id=wid, request_id="r-1")
        assert (again.run_id, again.created) == (first.run_id, True)
        # While it runs: FAIL refuses, USE_EXISTING answers with it.
        assert _failure(lambda: client.start_workflow("control.cart", ASLEEP, workflow_id=wid)) == (
            "WorkflowAlreadyRunning"
        )
        used = client.start_workflow(
            "control.cart", ASLEEP, workflow_id=wid, if_running=IfRunning.USE_EXISTING
        )
        assert (used.run_id, used.created) == (first.run_id, False)

        # A query while it sleeps answers from its state and writes nothing.
        wait_until(saga, lambda: _run_of(saga, wid) == first.run_id, "the cart's record", 30)
        before = saga.watcher.latest[wid]
        assert client.query(wid, "state") == {"items": [], "phase": "sleeping"}
        assert _failure(lambda: client.query(wid, "nope")) == "UnknownQuery"
        # Updates: validated, applied once per id, answered after commit.
        assert client.update(wid, "add", "apple", update_id="u-1") == 1
        assert client.update(wid, "add", "apple", update_id="u-1") == 1  # a retried send
        assert _failure(lambda: client.update(wid, "add", "")) == "UpdateRejected"
        assert _failure(lambda: client.update(wid, "remove", "apple")) == "UnknownUpdate"
        assert client.update(wid, "add", "pear") == 2
        assert client.query(wid, "state") == {"items": ["apple", "pear"], "phase": "sleeping"}

        def updated() -> bool:
            record = saga.watcher.latest[wid]
            return sum(isinstance(e, UpdateAccepted) for e in record.events) == 2

        wait_until(saga, updated, "both updates in history", 30)
        # The query between them wrote nothing: two updates, two revisions.
        assert saga.watcher.latest[wid].revision == before.revision + 2

        # TERMINATE_EXISTING ends the sleeping run and starts anew (this run ends at once).
        fresh = client.start_workflow(
            "control.cart",
            {"sleep_s": 0},
            workflow_id=wid,
            if_running=IfRunning.TERMINATE_EXISTING,
            request_id="r-2",
        )
        assert fresh.created and fresh.run_id != first.run_id
        wait_until(
            saga,
            lambda: status_of(saga, wid) is WorkflowStatus.COMPLETED,
            "the new run to complete",
            30,
        )
        terminated = [
            r for r in _records_of(saga, wid) if r.run_id == first.run_id and r.status.terminal
        ]
        assert [r.status for r in terminated] == [WorkflowStatus.TERMINATED]
        assert saga.watcher.latest[wid].run_id == fresh.run_id
        assert _failure(lambda: client.query(wid, "state")) == "WorkflowClosed"
        assert _failure(lambda: client.update(wid, "add", "fig")) == "WorkflowClosed"

        # After it closed: REJECT and ALLOW_IF_FAILED (it completed) refuse, ALLOW starts.
        for policy in (IfClosed.REJECT, IfClosed.ALLOW_IF_FAILED):
            refused = lambda p=policy: client.start_workflow(  # noqa: E731
                "control.cart", ASLEEP, workflow_id=wid, if_closed=p
            )
            assert _failure(refused) == "WorkflowIdReuseRejected"
        third = client.start_workflow(
            "control.cart", ASLEEP, workflow_id=wid, if_closed=IfClosed.ALLOW, request_id="r-3"
        )
        assert third.created and third.run_id not in (first.run_id, fresh.run_id)
        # A cancelled run did not complete: ALLOW_IF_FAILED starts another.
        client.cancel(wid, "test")
        client.flush()
        wait_until(
            saga,
            lambda: (
                status_of(saga, wid) is WorkflowStatus.CANCELLED
                and _run_of(saga, wid) == third.run_id
            ),
            "the third run to be cancelled",
            30,
        )
        fourth = client.start_workflow(
            "control.cart",
            ASLEEP,
            workflow_id=wid,
            if_closed=IfClosed.ALLOW_IF_FAILED,
            request_id="r-4",
        )
        assert fourth.created and fourth.run_id != third.run_id
    finally:
        client.close()


def test_retried_starts_are_recognised_after_a_restore(saga: Saga) -> None:
    first_orchestrator = saga.orchestrator("a", app=APP)
    client = client_for(saga)
    wid = f"cart-{uuid.uuid4().hex[:8]}"
    try:
        replaced = client.start_workflow("control.cart", ASLEEP, workflow_id=wid, request_id="one")
        done = client.start_workflow(
            "control.cart",
            {"sleep_s": 0},
            workflow_id=wid,
            if_running=IfRunning.TERMINATE_EXISTING,
            request_id="two",
        )
        wait_until(
            saga,
            lambda: (
                status_of(saga, wid) is WorkflowStatus.COMPLETED
                and _run_of(saga, wid) == done.run_id
            ),
            "the second run to complete",
            30,
        )
        first_orchestrator.kill9()
        saga.orchestrator("b", app=APP)
        # The new owner read both starts' request ids from the closed record's head: each
        # retried start gets its first answer, even with policies that would start or
        # terminate a run, and nothing changes.
        for request_id, run in (("two", done), ("one", replaced)):
            retried = client.start_workflow(
                "control.cart",
                {"sleep_s": 0},
                workflow_id=wid,
                if_running=IfRunning.TERMINATE_EXISTING,
                if_closed=IfClosed.ALLOW,
                request_id=request_id,
                timeout_s=90,
            )
            assert (retried.run_id, retried.created) == (run.run_id, True)
        assert _run_of(saga, wid) == done.run_id
        assert status_of(saga, wid) is WorkflowStatus.COMPLETED
    finally:
        client.close()


def _records_of(saga: Saga, wid: str) -> list[WorkflowRecord]:
    """Every record of ``wid`` on its history partition, in order (read_committed)."""
    codec = AvroCodec()
    consumer = Consumer(
        {
            "bootstrap.servers": saga.bootstrap,
            "group.id": f"records-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    partition = partition_for(wid.encode(), PARTITIONS)
    consumer.assign([TopicPartition(saga.topics.history, partition, 0)])
    found: list[WorkflowRecord] = []
    end = time.monotonic() + 30
    try:
        while time.monotonic() < end:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is not None:
                    return found  # the end of the partition
                if msg.key() == wid.encode() and msg.value():
                    found.append(codec.decode_workflow(msg.value()))
    finally:
        consumer.close()
    raise AssertionError(f"did not reach the end of history partition {partition} in 30 s")
