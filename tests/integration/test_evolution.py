"""Evolving workflow code under running workflows, end to end on the real broker (issue
13): a deploy that would strand 100 sagas in flight is caught by the replay gate before
it ships, the patched version passes the gate and runs all of them to completion with
every effect exactly once, and a workflow that loops forever continues as new.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from examples.order_saga.harness import audit_effects, make_orders
from orchestrator.protocol.payloads import decode_json
from orchestrator.protocol.records import ActivityCompleted, PatchMarker, WorkflowStatus
from tests.integration.evolution import CHANGE
from tests.integration.pipeline import Saga, assert_history_sane
from tests.integration.test_hardening import client_for, status_of, wait_until

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.integration.evolution"
IN_FLIGHT = 100
AFTER_DEPLOY = 20


def _gate(saga: Saga, registry: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """``sagaline replay`` over the live history topic, as a deploy pipeline runs it."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "replay", f"{MODULE}:{registry}", *extra],
        cwd=ROOT,
        env={**os.environ, **saga.env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _charged(saga: Saga, wid: str) -> bool:
    record = saga.watcher.latest.get(wid)
    return (
        record is not None
        and record.status is WorkflowStatus.RUNNING
        and any(isinstance(e, ActivityCompleted) and e.seq == 1 for e in record.events)
    )


def test_the_gate_catches_an_incompatible_deploy_and_the_patched_one_finishes_every_saga(
    saga: Saga,
) -> None:
    saga.start_participants()
    v1 = saga.orchestrator("v1", app=f"{MODULE}:registry_v1")
    client = client_for(saga)
    before = make_orders(IN_FLIGHT, declined_every=0, run_id="evo-before")
    for order in before:
        client.start("evolution.order", order, workflow_id=order["order_id"])
    client.flush()
    ids = [o["order_id"] for o in before]
    wait_until(
        saga,
        lambda: all(_charged(saga, wid) for wid in ids),
        f"{IN_FLIGHT} sagas to be charged and held",
        180,
        lambda: f"({sum(_charged(saga, w) for w in ids)} so far)",
    )

    # The gate, before the deploy: the unpatched change would strand every one of them.
    refused = _gate(saga, "registry_v2", "--topic")
    print(refused.stdout)  # the closing note quotes it
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"{IN_FLIGHT} diverge" in refused.stdout, refused.stdout
    assert "payment.charge" in refused.stdout, refused.stdout
    assert (
        "history settles step 1 ('payment.charge') before the code schedules it "
        "(the code waits on signal 'release')"
    ) in refused.stdout, refused.stdout
    passed = _gate(saga, "registry_v2_patched", "--topic")
    print(passed.stdout)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert f"{IN_FLIGHT} ok" in passed.stdout, passed.stdout

    # The deploy: v1's orchestrator stops, the patched one takes over its partitions.
    assert v1.stop(30) is not None
    saga.processes.remove(v1)
    saga.orchestrator("v2", app=f"{MODULE}:registry_v2_patched")
    after = make_orders(AFTER_DEPLOY, declined_every=0, run_id="evo-after")
    for order in after:
        client.start("evolution.order", order, workflow_id=order["order_id"])
    client.flush()
    fresh = [o["order_id"] for o in after]
    wait_until(
        saga,
        lambda: all(status_of(saga, wid) is WorkflowStatus.RUNNING for wid in fresh),
        "the sagas started after the deploy to reach their hold",
        120,
    )
    for wid in ids + fresh:
        client.signal(wid, "release", None)
    client.flush()
    everything = ids + fresh
    wait_until(
        saga,
        lambda: all(status_of(saga, wid) is WorkflowStatus.COMPLETED for wid in everything),
        f"all {len(everything)} sagas to complete",
        240,
        lambda: f"({sum(status_of(saga, w) is WorkflowStatus.COMPLETED for w in everything)})",
    )
    paths: dict[str, Any] = {}
    for wid in everything:
        record = saga.watcher.latest[wid]
        assert_history_sane(record)
        assert record.result is not None
        paths[wid] = decode_json(record.result)["path"]
        marked = any(isinstance(e, PatchMarker) and e.patch_id == CHANGE for e in record.events)
        assert marked is (wid in fresh), f"{wid}: patch recorded {marked}"
    assert {paths[w] for w in ids} == {1}, "a saga charged before the deploy changed path"
    assert {paths[w] for w in fresh} == {2}, "a saga started after the deploy took the old path"
    problems = audit_effects(saga.dsn, before + after)
    assert not problems, f"{len(problems)} effect problems, e.g. {problems[:5]}"
    client.close()


def test_a_workflow_that_loops_forever_continues_as_new_and_loses_no_signal(saga: Saga) -> None:
    saga.orchestrator("a", app=f"{MODULE}:registry_v1")
    client = client_for(saga)
    wid = "counter-1"
    client.start("evolution.counter", {"total": 0, "every": 4}, workflow_id=wid)
    for n in range(1, 31):
        client.signal(wid, "add", n)
    client.flush()
    wait_until(
        saga,
        lambda: client.query(wid, "total", timeout_s=30)["total"] == sum(range(1, 31)),
        "the counter to take all 30 signals",
        120,
    )
    # 30 signals, a new run every 4: the eighth run holds the last two.
    wait_until(
        saga,
        lambda: (
            wid in saga.watcher.latest
            and decode_json(saga.watcher.latest[wid].input).get("runs") == 8
        ),
        "the history topic to show the eighth run",
        60,
    )
    running = saga.watcher.latest[wid]
    assert running.status is WorkflowStatus.RUNNING
    # The record holds the current run's events only.
    assert len(running.events) < 10, running.events
    client.signal(wid, "stop", None)
    client.flush()
    wait_until(saga, lambda: status_of(saga, wid) is WorkflowStatus.COMPLETED, "the stop", 60)
    record = saga.watcher.latest[wid]
    assert record.result is not None
    assert decode_json(record.result) == {"total": sum(range(1, 31)), "runs": 8}
    client.close()
