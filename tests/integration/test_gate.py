"""The replay gate on the real broker: ``sagaline replay --topic`` reads the live history
topic, ``sagaline export`` writes it to a file that ``replay --file`` judges alike.

Orders are started with no participant running, so each stays RUNNING with its
reservation sent; one more is terminated, so it is closed. The order saga's own code
replays them all; ``CHANGED`` (this module), a deploy that renamed the first activity,
diverges on every open one.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from examples.order_saga.harness import WORKFLOWS_APP
from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.protocol.records import WorkflowStatus
from tests.integration.conftest import ROOT
from tests.integration.pipeline import Saga
from tests.integration.pipeline import explained as _explained
from tests.integration.pipeline import sagaline_cli as _sagaline
from tests.integration.test_hardening import client_for, status_of, wait_until

pytestmark = pytest.mark.integration

CHANGED = WorkflowRegistry()
CHANGED_APP = f"{__name__}:CHANGED"
OPEN = 5
DIFFERENCE = (
    "step 0 is activity 'inventory.hold' in the code but activity 'inventory.reserve' in history"
)


@CHANGED.workflow("order.process")
async def hold_first(ctx: WorkflowContext, order: dict[str, Any]) -> Any:
    """The order saga after a deploy that renamed its first step."""
    return await ctx.activity("inventory.hold", {"order_id": order["order_id"]})


def _assert_gate(
    done: subprocess.CompletedProcess[str], code: int, last: str, diverging: Sequence[str] = ()
) -> None:
    """Exit ``code``, the count line ``last``, and one line per diverging workflow."""
    lines = done.stdout.splitlines()
    assert done.returncode == code and lines and lines[-1] == last, _explained(done)
    for wid in diverging:
        expected = f"DIVERGES {wid} (run "
        found = [line for line in lines if line.startswith(expected)]
        assert len(found) == 1 and found[0].endswith(
            f", order.process, RUNNING, 1 event): {DIFFERENCE}"
        ), f"workflow {wid}: no line naming its first differing command\n{_explained(done)}"
    assert len(lines) == len(diverging) + 1, _explained(done)


def test_replay_gate_on_the_live_topic_and_an_export(saga: Saga, tmp_path: Path) -> None:
    saga.orchestrator("a")
    client = client_for(saga)
    tag = uuid.uuid4().hex[:8]
    opened = [f"gate-{tag}-{i}" for i in range(OPEN)]
    closed = f"gate-{tag}-terminated"
    try:
        for wid in [*opened, closed]:
            client.start("order.process", {"order_id": wid, "items": ["tea"]}, workflow_id=wid)
        client.flush()
        wait_until(
            saga,
            lambda: all(status_of(saga, w) is WorkflowStatus.RUNNING for w in [*opened, closed]),
            "every order RUNNING with its reservation sent",
            60,
        )
        client.terminate(closed, "closed for the gate's --all")
        client.flush()
        wait_until(
            saga,
            lambda: status_of(saga, closed) is WorkflowStatus.TERMINATED,
            f"{closed} TERMINATED",
            60,
        )
    finally:
        client.close()

    # The live topic: open workflows by default, every one with --all.
    same = _sagaline(saga.env, "replay", WORKFLOWS_APP, "--topic")
    _assert_gate(same, 0, f"replayed {OPEN} workflows: {OPEN} ok, 0 diverge, 0 broken")
    assert f"read {saga.topics.history}: " in same.stderr, _explained(same)
    assert f"replayed {OPEN}/{OPEN}" in same.stderr, _explained(same)
    everything = _sagaline(saga.env, "replay", WORKFLOWS_APP, "--topic", "--all")
    _assert_gate(
        everything, 0, f"replayed {OPEN + 1} workflows: {OPEN + 1} ok, 0 diverge, 0 broken"
    )
    changed = _sagaline(saga.env, "replay", CHANGED_APP, "--topic")
    _assert_gate(changed, 1, f"replayed {OPEN} workflows: 0 ok, {OPEN} diverge, 0 broken", opened)

    # An export replays as the topic did; --workflow-id takes any status.
    export = tmp_path / "open.avro"
    done = _sagaline(saga.env, "export", "--out", str(export))
    assert done.returncode == 0, _explained(done)
    assert done.stdout.strip() == f"exported {OPEN} workflow(s) to {export}", _explained(done)
    changed = _sagaline(saga.env, "replay", CHANGED_APP, "--file", str(export))
    _assert_gate(changed, 1, f"replayed {OPEN} workflows: 0 ok, {OPEN} diverge, 0 broken", opened)
    picked = tmp_path / "picked.avro"
    done = _sagaline(saga.env, "export", "--out", str(picked), "--workflow-id", closed, opened[0])
    assert done.stdout.strip() == f"exported 2 workflow(s) to {picked}", _explained(done)
    same = _sagaline(saga.env, "replay", WORKFLOWS_APP, "--file", str(picked))
    _assert_gate(same, 0, "replayed 2 workflows: 2 ok, 0 diverge, 0 broken")


def test_an_unreachable_broker_is_a_configuration_error() -> None:
    env = {**os.environ, "SAGALINE_KAFKA_BOOTSTRAP": "127.0.0.1:1", "PYTHONPATH": str(ROOT)}
    done = _sagaline(env, "replay", WORKFLOWS_APP, "--topic", "--timeout", "2")
    assert done.returncode == 2, _explained(done)
    assert "cannot reach Kafka at 127.0.0.1:1 (SAGALINE_KAFKA_BOOTSTRAP) within 2 s" in (
        done.stderr
    ), _explained(done)
