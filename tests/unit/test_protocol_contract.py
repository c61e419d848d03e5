"""docs/protocol.md is a contract a client in another language follows without reading
our code: its schema-id rule, run as the document gives it, must reproduce every id its
table lists, current and archived, and the ids our codec writes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import WorkflowClient
from orchestrator.protocol.codec import SCHEMA_ORDER, AvroCodec
from orchestrator.protocol.records import StartWorkflow
from orchestrator.settings import KafkaSettings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"
SCHEMAS = ROOT / "schemas" / "avro"
NS = "io.sagaline."


def _documented_rule() -> Any:
    """The ``schema_ids`` function of the document's reference implementation."""
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (source,) = [b for b in blocks if "def schema_ids(" in b]
    scope: dict[str, Any] = {}
    # The document's own code, run as a client would copy it.
    exec(compile(source, str(DOC), "exec"), scope)
    return scope["schema_ids"], scope["ORDER"]


def _documented_table() -> dict[str, dict[str, int]]:
    """{full name: {"current": id, "v4": id, ...}} from the document's id table."""
    table: dict[str, dict[str, int]] = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `(io\.sagaline\.\w+)` \| (\d+)[^|]*\| (.*) \|$", line)
        if match is None:
            continue
        ids = {"current": int(match[2])}
        archived = match[3]
        for versions, number in re.findall(r"((?:v\d+/?)+) (\d+)", archived):
            for version in versions.split("/"):
                ids[version] = int(number)
        same = re.search(r"\(same in ([^)]*)\)", line)
        if same:
            for version in re.findall(r"v\d+", same[1]):
                ids[version] = int(match[2])
        table[match[1]] = ids
    return table


def test_the_table_lists_the_four_top_level_records() -> None:
    assert set(_documented_table()) == {
        NS + "InboxRecord",
        NS + "Reply",
        NS + "WorkflowRecord",
        NS + "ActivityTask",
    }


def test_the_documented_rule_gives_the_current_ids_of_the_table_and_of_the_codec() -> None:
    schema_ids, order = _documented_rule()
    assert order == list(SCHEMA_ORDER)
    computed = schema_ids(SCHEMAS)
    codec = AvroCodec()
    for name, ids in _documented_table().items():
        assert computed[name] == ids["current"], name
        assert codec.schema_id_of(name) == ids["current"], name
    # Every record the codec knows, not only the four on topics, by the same rule.
    for short in SCHEMA_ORDER:
        assert computed[NS + short] == codec.schema_id_of(NS + short), short


def test_the_documented_rule_gives_every_archived_id_of_the_table() -> None:
    schema_ids, _ = _documented_rule()
    checked = 0
    for name, ids in _documented_table().items():
        for version, expected in ids.items():
            if version == "current":
                continue
            directory = SCHEMAS / "archive" / version
            assert directory.is_dir(), f"{name} names an archive {version} that does not exist"
            assert schema_ids(directory)[name] == expected, f"{name} {version}"
            checked += 1
    assert checked >= 12


def test_every_id_fits_a_positive_signed_32_bit_integer() -> None:
    schema_ids, _ = _documented_rule()
    directories = [SCHEMAS, *sorted((SCHEMAS / "archive").glob("v*"))]
    for directory in directories:
        for name, value in schema_ids(directory).items():
            assert 0 <= value < 2**31, (directory.name, name, value)
            assert value.to_bytes(4, "big", signed=True) == value.to_bytes(4, "big"), name


def test_the_worked_example_writes_an_inbox_record_the_codec_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """§8's producer code, up to its first Kafka call, after §3's reference code."""
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    reference = next(b for b in blocks if "def schema_ids(" in b)
    example = next(b for b in blocks if "def inbox_value(" in b).split("producer = Producer(")[0]
    monkeypatch.chdir(ROOT)  # the example names schemas/avro relative to a checkout
    scope: dict[str, Any] = {}
    exec(compile(reference + "\n" + example, str(DOC), "exec"), scope)
    order = {"order_id": "o-1", "items": [{"sku": "a", "qty": 1}], "total": 5}
    value = scope["inbox_value"](
        "StartWorkflow",
        {
            "workflow_id": "o-1",
            "workflow_type": "order.process",
            "input": scope["json_payload"](json.dumps(order)),
            "requested_at_ms": 1,
            "request_id": None,
            "if_running": "FAIL",
            "if_closed": "ALLOW",
            "parent": None,
        },
    )
    body = AvroCodec().decode_inbox(value)
    assert isinstance(body, StartWorkflow)
    assert (body.workflow_id, body.workflow_type) == ("o-1", "order.process")
    assert json.loads(body.input.data) == order


def test_the_client_refuses_an_empty_workflow_id_before_sending_anything() -> None:
    client = WorkflowClient(KafkaSettings(kafka_bootstrap="127.0.0.1:1"))
    try:
        with pytest.raises(ValueError, match="must not be empty"):
            client.start("order.process", {}, workflow_id="")
        with pytest.raises(ValueError, match="must not be empty"):
            client.start_workflow("order.process", {}, workflow_id="", timeout_s=0.1)
    finally:
        client.close()
