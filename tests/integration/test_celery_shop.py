"""The Celery example (examples/celery_shop) end to end: a real ``celery worker`` on the
local Kafka broker runs the shop's exactly-once tasks for the order saga, against the
real PostgreSQL; every effect is audited."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from examples.order_saga.harness import free_port, make_orders
from orchestrator.client import WorkflowClient
from orchestrator.protocol.records import ActivityFailed, ActivityScheduled
from orchestrator.settings import KafkaSettings
from tests.integration.celery_process import CeleryWorker
from tests.integration.pipeline import Saga

APP = "examples.celery_shop.workflows:registry"
TASKS = "examples.celery_shop.tasks"
# The same app, with a crash after a chosen charge commits (SHOP_CRASH_AFTER_COMMIT).
CRASHING = "tests.integration.celery_crashing_shop"
ENDED = r"\[{}\] (succeeded|raised|retry|ignored|rejected)"
CHARGE = "shop.payments.charge"


@pytest.fixture
def shop(saga: Saga, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The shop's queues under this test's prefix, in the environment of the orchestrator
    and the workers; yields the worker's environment and queues."""
    prefix = f"{saga.topics.prefix}-shop"
    saga.env["SHOP_QUEUE_PREFIX"] = prefix
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {
        **os.environ,
        **saga.env,
        "SAGALINE_CELERY_METRICS_PORT": str(free_port()),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    queues = [f"{prefix}-inventory", f"{prefix}-payments", f"{prefix}-shipping"]
    workers: list[CeleryWorker] = []
    yield {"env": env, "queues": queues, "workers": workers, "log_dir": tmp_path}
    for worker in workers:
        worker.stop()


def _worker(shop: dict[str, Any], name: str, app: str = TASKS, **env: str) -> CeleryWorker:
    worker = CeleryWorker(
        app, shop["queues"], {**shop["env"], **env}, shop["log_dir"] / f"{name}.log"
    )
    shop["workers"].append(worker)
    return worker.start()


def _start(saga: Saga, orders: list[dict[str, Any]]) -> None:
    client = WorkflowClient(
        KafkaSettings(kafka_bootstrap=saga.bootstrap, topic_prefix=saga.topics.prefix)
    )
    for order in orders:
        client.start("shop.order", order, workflow_id=order["order_id"])
    client.flush()
    client.close()


def _scrape(env: dict[str, str]) -> dict[tuple[str, str], float]:
    """The worker's published-outcome counters, by (task, status)."""
    url = f"http://127.0.0.1:{env['SAGALINE_CELERY_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found: dict[tuple[str, str], float] = {}
    pattern = re.compile(
        r"^sagaline_celery_outcomes_published_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M
    )
    for match in pattern.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        key = (labels["task"], labels["status"])
        found[key] = found.get(key, 0.0) + float(match["value"])
    return found


def _inbox_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM sagaline_activity_results WHERE participant = 'celery'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_200_orders_through_celery_tasks_every_effect_once(
    saga: Saga, shop: dict[str, Any]
) -> None:
    orders = make_orders(200)  # every tenth card is declined: 20 compensated
    # The pool's process running this order's charge exits after the charge commits and
    # before its outcome is published: the main process finds the outcome in the inbox.
    lost = orders[100]["order_id"]
    worker = _worker(
        shop,
        "worker",
        CRASHING,
        SHOP_HANG_S="30",
        SHOP_CRASH_AFTER_COMMIT=f"{lost}:child",
        SHOP_CRASH_MARKER=str(shop["log_dir"] / "crashed"),
    )
    saga.orchestrator("a", app=APP)
    # A card network that hangs on the first attempt: Celery's hard time limit (the
    # step's start-to-close) kills the task mid-transaction, and the retry charges once.
    hung = {**make_orders(1, declined_every=0)[0], "card": "hangs-once", "charge_timeout_s": 3}
    hung["order_id"] += "-hung"
    _start(saga, [*orders, hung])
    done = saga.finish([*orders, hung], deadline_s=240)

    charge_failures = [
        e.failure.error_type
        for e in done[hung["order_id"]].events
        if isinstance(e, ActivityFailed) and e.seq == 1
    ]
    # The workflow's own timer or the worker's report of the hard time limit, first.
    assert charge_failures in (["StartToCloseTimeout"], ["TimeLimitExceeded"]), charge_failures
    # One stored outcome per attempt the workflows scheduled: the hung attempt's is the
    # time limit's failure, stored by the worker's main process.
    attempts = sum(1 for r in done.values() for e in r.events if isinstance(e, ActivityScheduled))
    assert _inbox_rows(saga.dsn) == attempts
    # The lost process's charge was answered from the inbox: one attempt, completed.
    assert (shop["log_dir"] / "crashed").exists(), "the injected crash did not happen"
    lost_charges = [e for e in done[lost].events if isinstance(e, ActivityScheduled) and e.seq == 1]
    assert [e.attempt for e in lost_charges] == [1]
    assert "publishing the stored outcome" in worker.log()
    published = _scrape(shop["env"])
    assert published.get((CHARGE, "completed")) == 181
    assert published.get((CHARGE, "failed")) == 21  # 20 declined cards, the hung attempt
    assert published.get(("shop.inventory.release", "completed")) == 20
    assert worker.alive()


def test_kill9_of_the_worker_mid_task_loses_and_duplicates_nothing(
    saga: Saga, shop: dict[str, Any]
) -> None:
    first = _worker(shop, "worker-1", SHOP_PAYMENT_LATENCY_MS="150")
    saga.orchestrator("a", app=APP)
    orders = make_orders(200)
    ids = [o["order_id"] for o in orders]
    _start(saga, orders)
    saga.wait_count(ids, 40, 120)

    # 1. kill -9 while a charge runs: the last task received has not ended.
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, f"no charge caught mid-task:\n{first.tail()}"
        received = first.received()
        last = received[-1] if received else None
        ended = last is not None and re.search(ENDED.format(re.escape(last[1])), first.log())
        if last is not None and last[0] == CHARGE and not ended:
            first.kill9()
            killed = last
            break
        time.sleep(0.005)  # polling the worker's log for the moment to kill, with a deadline
    killed_at = time.monotonic()
    finished_before = len(saga.watcher.terminal(ids))

    # 2. The replacement dies by kill -9 of its process group right after a charge
    # commits, before its outcome is published: the worst moment.
    marker = shop["log_dir"] / "crashed"
    target = _not_charged_yet(saga, orders)
    second = _worker(
        shop,
        "worker-2",
        CRASHING,
        SHOP_PAYMENT_LATENCY_MS="150",
        SHOP_CRASH_AFTER_COMMIT=f"{target}:group",
        SHOP_CRASH_MARKER=str(marker),
    )
    restarted_in = time.monotonic() - killed_at
    assert killed in second.received() or _wait_received(second, killed), (
        f"the task killed mid-run ({killed[1]}) was not delivered again:\n{second.tail()}"
    )
    end = time.monotonic() + 180
    while second.alive():
        assert time.monotonic() < end, f"the injected crash did not happen:\n{second.tail()}"
        saga.watcher.poll()  # waiting on the worker's death, with a deadline
    assert marker.exists()
    crashed_id = marker.read_text()

    third = _worker(shop, "worker-3", SHOP_PAYMENT_LATENCY_MS="150")
    done = saga.finish(orders, deadline_s=240)
    assert len(done) == len(orders)
    assert (CHARGE, crashed_id) in third.received()
    answered = third.log().count("answered from the idempotency inbox")
    assert answered >= 1, f"the committed charge was not answered from the inbox:\n{third.tail()}"
    print(
        f"kill -9 audit: {len(orders)} sagas, {finished_before} finished before the first "
        f"kill (mid-task, {killed[1]}); replacement ready in {restarted_in:.1f} s; second "
        f"kill after {crashed_id} committed; {answered} redelivered task(s) answered from "
        f"the inbox; all ended {time.monotonic() - killed_at:.1f} s after the first kill; "
        "every effect once"
    )


def _wait_received(worker: CeleryWorker, task: tuple[str, str], within_s: float = 60) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if task in worker.received():
            return True
        time.sleep(0.1)  # polling the worker's log, with a deadline
    return False


def _not_charged_yet(saga: Saga, orders: list[dict[str, Any]]) -> str:
    """The last order with a card that is not declined and no charge sent yet."""
    saga.watcher.poll()
    for order in reversed(orders):
        record = saga.watcher.latest.get(order["order_id"])
        charged = record is not None and any(
            isinstance(e, ActivityScheduled) and e.seq == 1 for e in record.events
        )
        if order["card"] != "declined" and not charged:
            return str(order["order_id"])
    raise AssertionError("every order was charged before the first kill; kill earlier")
