"""The operator commands of ``sagaline`` against the real broker and PostgreSQL: ``topics
describe|check|create``, ``dlq list|retry`` with a running orchestrator, and ``list``,
``describe``, ``history`` over the tables a running ``sagaline projector`` fills.

Every command runs as a process (``python -m orchestrator.cli``), as an operator runs it.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from examples.order_saga.harness import SagalineProcess, make_orders
from orchestrator.dlq import RETRY_OF
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.partitioning import partition_for
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import StartWorkflow, WorkflowStatus
from orchestrator.protocol.topics import Topics
from tests.integration.conftest import PARTICIPANTS
from tests.integration.pipeline import Saga, header_values
from tests.integration.pipeline import explained as _explained
from tests.integration.pipeline import sagaline_cli as _sagaline

pytestmark = pytest.mark.integration
ALL_PARTICIPANTS = ",".join(PARTICIPANTS)


def _eventually(
    env: dict[str, str],
    args: list[str],
    ready: Callable[[subprocess.CompletedProcess[str]], bool],
    what: str,
    deadline_s: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run the command until its answer is ``ready`` (another process is catching up)."""
    end = time.monotonic() + deadline_s
    while True:
        done = _sagaline(env, *args)
        if ready(done):
            return done
        if time.monotonic() > end:
            raise AssertionError(f"{what} not seen within {deadline_s:g} s\n{_explained(done)}")


# --- topics --------------------------------------------------------------------------------


def test_topics_describe_shows_the_deployments_topics(
    process_env: dict[str, str], topics: Topics
) -> None:
    done = _sagaline(process_env, "topics", "describe", "--json")
    assert done.returncode == 0, _explained(done)
    described = json.loads(done.stdout)
    shown = {t["topic"]: t for t in described["topics"]}
    assert set(shown) == {
        topics.inbox,
        topics.history,
        topics.dlq,
        topics.replies,
        *(topics.tasks(p) for p in PARTICIPANTS),
    }
    assert described["missing"] == []
    assert shown[topics.history]["config"]["cleanup.policy"] == "compact"
    assert shown[topics.history]["expected"]["cleanup.policy"] == "compact"
    assert shown[topics.inbox]["partitions"] == shown[topics.history]["partitions"] == 4
    assert shown[topics.dlq]["partitions"] == 1
    assert all(t["replication_factor"] == 1 for t in shown.values())

    table = _sagaline(process_env, "topics", "describe")
    assert table.returncode == 0, _explained(table)
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["topic", "partitions", "replicas", "cleanup.policy"]
    history = next(line for line in lines if line.startswith(topics.history + " "))
    assert history.split()[1:4] == ["4", "1", "compact"], history


def test_topics_check_passes_then_names_each_problem(
    process_env: dict[str, str], topics: Topics, admin: AdminClient
) -> None:
    done = _sagaline(process_env, "topics", "check", "--participants", ALL_PARTICIPANTS)
    assert done.returncode == 0, _explained(done)
    assert done.stdout.startswith("ok: the 7 topic(s)"), _explained(done)

    stricter = _sagaline(process_env, "topics", "check", "--replication-factor", "2")
    assert stricter.returncode == 1, _explained(stricter)
    assert len(stricter.stdout.splitlines()) == 7, _explained(stricter)
    assert all("replication factor 1, below 2" in line for line in stricter.stdout.splitlines())

    # A tasks topic someone made compacted, a participant without its topic, and a history
    # topic that grew partitions the inbox does not have.
    broken = topics.tasks("broken")
    for future in admin.create_topics(
        [NewTopic(broken, 1, 1, config={"cleanup.policy": "compact"})]
    ).values():
        future.result(30)
    for future in admin.create_partitions([NewPartitions(topics.history, 6)]).values():
        future.result(30)
    expected = [
        f"{broken}: cleanup.policy is compact, expected delete (sagaline creates it so)",
        f"{topics.tasks('audit')}: missing (sagaline topics create makes it)",
        f"{topics.inbox} has 4 partitions but {topics.history} has 6: they must be equal "
        "(a workflow lives in the same partition of both)",
    ]
    args = ["topics", "check", "--participants", f"{ALL_PARTICIPANTS},audit"]
    found = _eventually(
        process_env,
        args,
        lambda d: sorted(d.stdout.splitlines()) == sorted(expected),
        "the three problems",
    )
    assert found.returncode == 1, _explained(found)
    as_json = json.loads(_sagaline(process_env, *args, "--json").stdout)
    assert as_json["ok"] is False and sorted(as_json["problems"]) == sorted(expected)


def test_topics_create_makes_only_what_is_missing(
    process_env: dict[str, str], topics: Topics
) -> None:
    done = _sagaline(
        process_env,
        "topics",
        "create",
        "--participants",
        f"{ALL_PARTICIPANTS},audit",
        "--min-insync-replicas",
        "1",
    )
    assert done.returncode == 0, _explained(done)
    assert done.stdout.strip() == f"created 1 topic(s): {topics.tasks('audit')}"
    described = json.loads(_sagaline(process_env, "topics", "describe", "--json").stdout)
    audit = next(t for t in described["topics"] if t["topic"] == topics.tasks("audit"))
    assert audit["config"]["min.insync.replicas"] == "1"
    assert audit["config"]["cleanup.policy"] == "delete"
    again = _sagaline(process_env, "topics", "create", "--participants", "audit")
    assert again.stdout.strip() == "created 0 topic(s): none needed", _explained(again)


def _visible(admin: AdminClient, topic: str) -> None:
    """Wait until the broker's metadata lists ``topic`` (just created by the test)."""
    end = time.monotonic() + 30
    while topic not in admin.list_topics(timeout=10).topics:
        if time.monotonic() > end:
            raise AssertionError(f"{topic} not in the metadata within 30 s")


def test_topics_create_gives_a_missing_history_the_inbox_partition_count(
    process_env: dict[str, str], topics: Topics, admin: AdminClient
) -> None:
    """Created with the default 4 beside a 3-partition inbox, the history would fail the
    co-partition check and stay behind broken."""
    lone = Topics(f"{topics.prefix}-lone")  # under the fixture's prefix: deleted after
    env = {**process_env, "SAGALINE_TOPIC_PREFIX": lone.prefix}
    for future in admin.create_topics([NewTopic(lone.inbox, 3, 1)]).values():
        future.result(30)
    _visible(admin, lone.inbox)

    refused = _sagaline(env, "topics", "create", "--partitions", "4")
    assert refused.returncode == 2, _explained(refused)
    assert len(refused.stderr.splitlines()) == 1, _explained(refused)
    assert f"{lone.inbox} exists with 3 partitions, not the --partitions 4" in refused.stderr
    made = [t for t in admin.list_topics(timeout=30).topics if t.startswith(lone.prefix + ".")]
    assert made == [lone.inbox], made

    done = _sagaline(env, "topics", "create")
    assert done.returncode == 0, _explained(done)
    described = json.loads(_sagaline(env, "topics", "describe", "--json").stdout)
    shown = {t["topic"]: t["partitions"] for t in described["topics"]}
    assert shown[lone.history] == 3 and shown[lone.dlq] == 1, shown


def test_an_unreachable_broker_is_exit_2_with_the_reason(process_env: dict[str, str]) -> None:
    env = {**process_env, "SAGALINE_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    done = _sagaline(env, "topics", "check", "--timeout", "2")
    assert done.returncode == 2, _explained(done)
    assert "cannot reach Kafka at 127.0.0.1:1 (SAGALINE_KAFKA_BOOTSTRAP) within 2 s" in (
        done.stderr
    ), _explained(done)
    assert len(done.stderr.splitlines()) == 1, _explained(done)


def test_an_unknown_prefix_is_one_line_and_exit_1(process_env: dict[str, str]) -> None:
    env = {**process_env, "SAGALINE_TOPIC_PREFIX": f"none{uuid.uuid4().hex[:8]}"}
    done = _sagaline(env, "topics", "describe")
    assert done.returncode == 1, _explained(done)
    assert done.stderr.strip().startswith("sagaline: no topics of prefix 'none"), _explained(done)


# --- dead letters --------------------------------------------------------------------------


def _produce(bootstrap: str, topic: str, key: bytes, value: bytes, partition: int) -> int:
    """Produce one record to ``partition``; returns its offset."""
    producer = Producer({"bootstrap.servers": bootstrap})
    offsets: list[int] = []
    producer.produce(
        topic,
        key=key,
        value=value,
        partition=partition,
        on_delivery=lambda err, msg: offsets.append(-1 if err else (msg.offset() or 0)),
    )
    assert producer.flush(30) == 0 and offsets and offsets[0] >= 0
    return offsets[0]


def _letters(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    if done.returncode != 0:
        return []
    letters: list[dict[str, Any]] = json.loads(done.stdout)["topics"][0]["dead_letters"]
    return letters


def _retried_on_inbox(bootstrap: str, topic: str, partition: int) -> list[tuple[Any, ...]]:
    """Key, value and retry header of every re-published record on an inbox partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"cli-ops-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)
        if high <= low:
            return []  # empty: no position to wait for
        consumer.assign([TopicPartition(topic, partition, low)])
        found: list[tuple[Any, ...]] = []
        end = time.monotonic() + 30
        while time.monotonic() < end:
            for msg in consumer.consume(100, 0.2):
                if msg.error() is None and RETRY_OF in header_values(msg):
                    found.append((msg.key(), msg.value(), header_values(msg)[RETRY_OF]))
            position = consumer.position([TopicPartition(topic, partition)])[0].offset
            if position >= high:
                return found
        raise AssertionError(f"{topic}[{partition}] not read to {high} within 30 s")
    finally:
        consumer.close()


def test_dlq_list_shows_dead_letters_and_retry_sends_back_what_is_safe(
    saga: Saga, topics: Topics, kafka_bootstrap: str
) -> None:
    orchestrator = saga.orchestrator("solo")
    codec = AvroCodec()
    wid = f"wp-{uuid.uuid4().hex[:6]}"
    order = {
        "order_id": wid,
        "items": [{"sku": "a", "qty": 1}],
        "total": 5,
        "card": "visa",
        "address": "x",
    }
    start = codec.encode_inbox(StartWorkflow(wid, "order.process", encode_json(order), 0))
    right = partition_for(wid.encode(), 4)
    # A client with another partitioner: the start lands where no orchestrator looks for it.
    wrong_at = _produce(kafka_bootstrap, topics.inbox, wid.encode(), start, (right + 1) % 4)
    garbage_at = _produce(kafka_bootstrap, topics.inbox, b"garbage-1", b"\xffnot avro", 0)

    listed = _eventually(
        saga.env,
        ["dlq", "list", "--json"],
        lambda d: len(_letters(d)) == 2,
        f"two dead letters\n{orchestrator.tail()}",
    )
    letters = {d["reason"]: d for d in _letters(listed)}
    assert set(letters) == {"wrong-partition", "malformed"}, letters
    wrong, garbage = letters["wrong-partition"], letters["malformed"]
    assert wrong["key"] == wid and wrong["source"] == "orchestrator"
    assert wrong["origin"] == {
        "topic": topics.inbox,
        "partition": (right + 1) % 4,
        "offset": wrong_at,
    }
    assert garbage["origin"] == {"topic": topics.inbox, "partition": 0, "offset": garbage_at}
    assert garbage["error"]

    table = _sagaline(saga.env, "dlq", "list")
    assert table.returncode == 0, _explained(table)
    row = next(line for line in table.stdout.splitlines() if wid in line)
    assert "wrong-partition" in row and f"{topics.inbox}[{(right + 1) % 4}]@{wrong_at}" in row
    assert table.stdout.splitlines()[-1] == f"{topics.dlq}: 2 record(s); shown the last 2"
    only = _sagaline(saga.env, "dlq", "list", "--reason", "malformed", "--json")
    assert [d["key"] for d in _letters(only)] == ["garbage-1"]

    # The malformed bytes would only be dead-lettered again: refused, nothing sent.
    at = f"{garbage['partition']}:{garbage['offset']}"
    refused = _sagaline(saga.env, "dlq", "retry", "--offset", at)
    assert refused.returncode == 1, _explained(refused)
    assert f"not sent {at} (key garbage-1)" in refused.stderr
    assert "would be dead-lettered again" in refused.stderr
    assert "sent nothing" in refused.stderr and refused.stdout == "", _explained(refused)
    dry = _sagaline(saga.env, "dlq", "retry", "--all", "--dry-run", "--include-starts")
    assert dry.returncode == 1, _explained(dry)  # the malformed one is not sendable
    assert f"would send {wrong['partition']}:{wrong['offset']} (key {wid}" in dry.stdout
    assert "next time" not in dry.stdout, _explained(dry)  # a dry run moves no mark
    assert _retried_on_inbox(kafka_bootstrap, topics.inbox, right) == []

    # A start is sent again only when asked: its request id may be forgotten by now.
    at = f"{wrong['partition']}:{wrong['offset']}"
    start_refused = _sagaline(saga.env, "dlq", "retry", "--offset", at)
    assert start_refused.returncode == 1, _explained(start_refused)
    assert f"not sent {at} (key {wid}): a start" in start_refused.stderr
    assert "--include-starts" in start_refused.stderr and start_refused.stdout == ""
    assert _retried_on_inbox(kafka_bootstrap, topics.inbox, right) == []

    # The misrouted start goes back keyed by its id, to the partition murmur2 gives it,
    # and its orchestrator starts the workflow.
    sent = _sagaline(saga.env, "dlq", "retry", "--offset", at, "--include-starts")
    assert sent.returncode == 0, _explained(sent)
    assert sent.stdout.splitlines() == [
        f"sent {at} (key {wid}, wrong-partition) to {topics.inbox}",
        f"sent 1 of 1 dead letter(s) from {topics.dlq}",
    ]
    retried = _retried_on_inbox(kafka_bootstrap, topics.inbox, right)
    assert retried == [(wid.encode(), start, f"{topics.dlq}:{at}".encode())]
    end = time.monotonic() + 120
    while saga.watcher.latest.get(wid) is None and time.monotonic() < end:
        saga.watcher.poll()
    record = saga.watcher.latest.get(wid)
    assert record is not None and record.status is WorkflowStatus.RUNNING, orchestrator.tail()

    # --all refuses both (a start, malformed bytes) and says where the next run starts,
    # so a run repeated later does not send again what this one read.
    everything = _sagaline(saga.env, "dlq", "retry", "--all")
    assert everything.returncode == 1, _explained(everything)
    mark = everything.stdout.splitlines()[-1]
    assert mark.startswith("next time: --after 0:"), _explained(everything)
    # Past the last letter (and the commit marker of the transaction that wrote it).
    assert int(mark.rpartition(":")[2]) >= max(wrong["offset"], garbage["offset"])
    assert everything.stderr.count("not sent ") == 2, _explained(everything)
    after = mark.rpartition(" ")[2]
    later = _sagaline(saga.env, "dlq", "retry", "--all", "--after", after)
    assert later.returncode == 0, _explained(later)
    assert later.stdout.splitlines() == [f"nothing to send from {topics.dlq}", mark]

    unknown = _sagaline(saga.env, "dlq", "retry", "--offset", "0:99999")
    assert unknown.returncode == 1, _explained(unknown)
    assert unknown.stderr.strip() == f"sagaline: no dead letter at 0:99999 of {topics.dlq}"
    assert orchestrator.alive(), orchestrator.tail()


# --- the visibility tables -----------------------------------------------------------------


def _listed(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    if done.returncode != 0:
        return {"workflows": [], "counts": {}}
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def test_list_describe_and_history_read_what_the_projector_wrote(
    saga: Saga, tmp_path: Path
) -> None:
    saga.orchestrator("solo")
    saga.start_participants()
    projector_env = {**saga.env, "SAGALINE_UI_PORT": "0", "SAGALINE_METRICS_PORT": "0"}
    projector = SagalineProcess(
        "projector", ["projector"], projector_env, tmp_path / "logs" / "projector.log"
    ).start()
    saga.processes.append(projector)
    run = uuid.uuid4().hex[:8]
    orders = make_orders(6, declined_every=3, run_id=run)
    saga.start_orders(orders)
    saga.finish(orders)
    prefix = f"order-{run}-"
    ids = {o["order_id"] for o in orders}
    declined = sorted(o["order_id"] for o in orders if o["card"] == "declined")

    args = ["list", "--id-prefix", prefix, "--json"]
    listed = _eventually(
        saga.env,
        args,
        lambda d: {w["workflow_id"] for w in _listed(d)["workflows"] if w["closed_at_ms"]} == ids,
        f"the six closed runs in the visibility tables\n{projector.tail()}",
    )
    found = _listed(listed)
    assert found["counts"] == {"COMPLETED": 4, "COMPENSATED": 2}, found["counts"]
    assert {w["workflow_type"] for w in found["workflows"]} == {"order.process"}

    narrowed = _sagaline(
        saga.env, "list", "--id-prefix", prefix, "--status", "compensated", "--since", "1h"
    )
    assert narrowed.returncode == 0, _explained(narrowed)
    shown = [line.split()[0] for line in narrowed.stdout.splitlines()[2:-1]]
    assert sorted(shown) == declined, _explained(narrowed)
    assert narrowed.stdout.splitlines()[-1] == (
        "shown 2; matching by status: COMPENSATED 2, COMPLETED 4 (6 in all)"
    )
    before = _listed(_sagaline(saga.env, "list", "--id-prefix", prefix, "--until", "1h", "--json"))
    assert before["workflows"] == []
    two = _listed(_sagaline(saga.env, "list", "--id-prefix", prefix, "--limit", "2", "--json"))
    assert len(two["workflows"]) == 2

    described = _sagaline(saga.env, "describe", declined[0])
    assert described.returncode == 0, _explained(described)
    fields = dict(line.split(None, 1) for line in described.stdout.splitlines() if " " in line)
    assert fields["status"].strip() == "COMPENSATED" and fields["type"].strip() == "order.process"
    as_json = json.loads(_sagaline(saga.env, "describe", declined[0], "--json").stdout)
    assert as_json["status"] == "COMPENSATED" and as_json["error_type"]
    history = _sagaline(saga.env, "history", declined[0], "--run", as_json["run_id"], "--json")
    assert history.returncode == 0, _explained(history)
    kinds = [e["kind"] for e in json.loads(history.stdout)["events"]]
    assert "ActivityScheduled" in kinds and "ActivityFailed" in kinds, kinds
    table = _sagaline(saga.env, "history", declined[0])
    assert "ActivityScheduled" in table.stdout and "payment.charge" in table.stdout

    for argv in (["describe", "ghost-1"], ["history", declined[0], "--run", "no-such-run"]):
        unknown = _sagaline(saga.env, *argv)
        assert unknown.returncode == 1, _explained(unknown)
        assert unknown.stderr.strip().endswith(
            "in the visibility tables (is `sagaline projector` running?)"
        ), _explained(unknown)
    assert projector.stop() == 0, projector.tail()


def test_the_visibility_commands_need_the_projectors_tables(
    process_env: dict[str, str],
) -> None:
    done = _sagaline(process_env, "list")
    assert done.returncode == 2, _explained(done)
    assert "start `sagaline projector`" in done.stderr and "Traceback" not in done.stderr
    env = {**process_env, "SAGALINE_POSTGRES_DSN": "postgresql://ann:pw-s3cr3t@127.0.0.1:1/x"}
    down = _sagaline(env, "describe", "order-1")
    assert down.returncode == 2, _explained(down)
    assert "SAGALINE_POSTGRES_DSN" in down.stderr and "pw-s3cr3t" not in down.stderr
