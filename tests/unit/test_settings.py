"""Process settings from ``SAGALINE_*`` environment variables, and keeping secrets out of logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from orchestrator.settings import CelerySettings, OrchestratorSettings, ParticipantSettings

SASL = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "orchestrator",
    "sasl.password": "s3cr3t-sasl-pw",
    "ssl.key.password": "s3cr3t-key-pw",
    "sasl.jaas.config": "org.apache.kafka...ScramLoginModule required password=s3cr3t-jaas;",
    "sasl.oauthbearer.client.secret": "s3cr3t-oauth",
}
SECRETS = ("s3cr3t-sasl-pw", "s3cr3t-key-pw", "s3cr3t-jaas", "s3cr3t-oauth")
DSN = "postgresql://participant:s3cr3t-db-pw@db.internal:5432/orders"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test from an environment without SAGALINE_* variables."""
    for name in list(os.environ):
        if name.upper().startswith("SAGALINE_"):
            monkeypatch.delenv(name)


def test_orchestrator_defaults() -> None:
    settings = OrchestratorSettings()
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.topics.inbox == "sagaline.inbox"
    assert settings.kafka_extra == {}
    assert settings.instance_id == socket.gethostname()
    assert (settings.commit_interval_ms, settings.transaction_timeout_ms) == (100, 15_000)
    assert settings.max_history_events == 1_000
    assert settings.kafka_common() == {"bootstrap.servers": "127.0.0.1:9092"}


def test_orchestrator_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "SAGALINE_KAFKA_BOOTSTRAP": "kafka-1:9093,kafka-2:9093",
        "SAGALINE_TOPIC_PREFIX": "shop",
        "SAGALINE_KAFKA_EXTRA": json.dumps(
            {"security.protocol": "SSL", "ssl.ca.location": "/etc/ca.pem"}
        ),
        "SAGALINE_INSTANCE_ID": "orch-0",
        "SAGALINE_GROUP_ID": "shop-orchestrator",
        "SAGALINE_COMMIT_INTERVAL_MS": "250",
        "SAGALINE_TRANSACTION_TIMEOUT_MS": "30000",
        "SAGALINE_MAX_BATCH_RECORDS": "500",
        "SAGALINE_MAX_RECORD_BYTES": "2048",
        "SAGALINE_MAX_HISTORY_EVENTS": "50",
        "SAGALINE_METRICS_PORT": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = OrchestratorSettings()
    assert settings.kafka_bootstrap == "kafka-1:9093,kafka-2:9093"
    assert (settings.topics.inbox, settings.topics.history, settings.topics.tasks("payment")) == (
        "shop.inbox",
        "shop.history",
        "shop.tasks.payment",
    )
    assert settings.transactional_id == "shop-orchestrator.orch-0"
    assert (settings.commit_interval_ms, settings.transaction_timeout_ms) == (250, 30_000)
    assert (settings.max_batch_records, settings.max_record_bytes) == (500, 2048)
    assert (settings.max_history_events, settings.metrics_port) == (50, 0)
    assert settings.kafka_common() == {
        "bootstrap.servers": "kafka-1:9093,kafka-2:9093",
        "security.protocol": "SSL",
        "ssl.ca.location": "/etc/ca.pem",
    }


def test_participant_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGALINE_POSTGRES_DSN", DSN)
    monkeypatch.setenv("SAGALINE_CONCURRENCY", "32")
    monkeypatch.setenv("SAGALINE_TOPIC_PREFIX", "shop")
    settings = ParticipantSettings()
    assert settings.postgres_dsn.get_secret_value() == DSN
    assert settings.concurrency == 32
    assert settings.topics.tasks("inventory") == "shop.tasks.inventory"


@pytest.mark.parametrize(("interval", "timeout"), [(1_500, 15_000), (3_000, 30_000), (1, 1_000)])
def test_a_commit_interval_up_to_a_tenth_of_the_timeout_is_accepted(
    monkeypatch: pytest.MonkeyPatch, interval: int, timeout: int
) -> None:
    monkeypatch.setenv("SAGALINE_COMMIT_INTERVAL_MS", str(interval))
    monkeypatch.setenv("SAGALINE_TRANSACTION_TIMEOUT_MS", str(timeout))
    assert OrchestratorSettings().commit_interval_ms == interval


@pytest.mark.parametrize(("interval", "timeout"), [(1_501, 15_000), (5_000, 30_000)])
def test_a_commit_interval_above_a_tenth_of_the_timeout_is_refused(
    monkeypatch: pytest.MonkeyPatch, interval: int, timeout: int
) -> None:
    monkeypatch.setenv("SAGALINE_COMMIT_INTERVAL_MS", str(interval))
    monkeypatch.setenv("SAGALINE_TRANSACTION_TIMEOUT_MS", str(timeout))
    with pytest.raises(
        ValidationError,
        match=rf"commit_interval_ms \({interval}\).*"
        rf"transaction_timeout_ms \({timeout}\)",
    ):
        OrchestratorSettings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SAGALINE_COMMIT_INTERVAL_MS", "0"),
        ("SAGALINE_TRANSACTION_TIMEOUT_MS", "999"),
        ("SAGALINE_MAX_HISTORY_EVENTS", "9"),
        ("SAGALINE_MAX_RECORD_BYTES", "1023"),
        ("SAGALINE_METRICS_PORT", "-1"),
        ("SAGALINE_MAX_BATCH_RECORDS", "many"),
    ],
)
def test_out_of_range_orchestrator_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    field = name.removeprefix("SAGALINE_").lower()
    with pytest.raises(ValidationError, match=field):
        OrchestratorSettings()


def test_participant_concurrency_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGALINE_CONCURRENCY", "0")
    with pytest.raises(ValidationError, match="concurrency"):
        ParticipantSettings()


def test_kafka_extra_that_is_not_json_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGALINE_KAFKA_EXTRA", '{"linger.ms": ')
    with pytest.raises(SettingsError, match="kafka_extra"):
        OrchestratorSettings()


def test_kafka_extra_takes_numbers_and_booleans_as_json_has_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """librdkafka takes ints and bools; `{"linger.ms": 5}` is what people write."""
    monkeypatch.setenv(
        "SAGALINE_KAFKA_EXTRA", '{"linger.ms": 5, "enable.ssl.certificate.verification": false}'
    )
    common = OrchestratorSettings().kafka_common()
    assert str(common["linger.ms"]) == "5"
    assert str(common["enable.ssl.certificate.verification"]).lower() == "false"


# --- secrets -------------------------------------------------------------------------


def _with_sasl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGALINE_KAFKA_EXTRA", json.dumps(SASL))
    monkeypatch.setenv("SAGALINE_POSTGRES_DSN", DSN)


def test_redacted_hides_sasl_and_tls_secrets_and_keeps_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _with_sasl(monkeypatch)
    shown = OrchestratorSettings().redacted()
    assert shown["kafka_extra"] == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "orchestrator",
        "sasl.password": "***",
        "ssl.key.password": "***",
        "sasl.jaas.config": "***",
        "sasl.oauthbearer.client.secret": "***",
    }
    assert shown["kafka_bootstrap"] == "127.0.0.1:9092"
    text = json.dumps(shown, default=str)
    for secret in SECRETS:
        assert secret not in text


def test_redacted_hides_the_postgres_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    _with_sasl(monkeypatch)
    shown = ParticipantSettings().redacted()
    assert shown["postgres_dsn"] == "***"
    assert shown["kafka_extra"]["sasl.password"] == "***"
    text = json.dumps(shown, default=str)
    for secret in (*SECRETS, "s3cr3t-db-pw"):
        assert secret not in text


def test_redacting_leaves_the_client_settings_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    _with_sasl(monkeypatch)
    settings = ParticipantSettings()
    settings.redacted()
    assert settings.kafka_common()["sasl.password"] == "s3cr3t-sasl-pw"
    assert settings.postgres_dsn.get_secret_value() == DSN


@pytest.mark.parametrize("cls", [OrchestratorSettings, ParticipantSettings])
def test_printing_the_settings_object_shows_no_secret(
    monkeypatch: pytest.MonkeyPatch, cls: type[OrchestratorSettings]
) -> None:
    """A settings object in a log line or traceback (repr, str) must not leak either."""
    _with_sasl(monkeypatch)
    settings = cls()
    for text in (repr(settings), str(settings)):
        leaked = [secret for secret in (*SECRETS, "s3cr3t-db-pw") if secret in text]
        assert not leaked, f"{cls.__name__} prints the secrets {leaked}"


@pytest.mark.parametrize(
    "role",
    [
        ["orchestrator", "examples.order_saga.workflows:registry"],
        ["participant", "examples.order_saga.services:payment"],
    ],
)
def test_a_metrics_port_in_use_stops_the_process_at_start_naming_the_variable(
    role: list[str],
) -> None:
    """Two processes on one host keeping the default port: the second one used to die
    with an OSError traceback and exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *role],
            cwd=Path(__file__).resolve().parents[2],
            env={
                **os.environ,
                "SAGALINE_METRICS_PORT": str(port),
                # Never reached: the port is checked before Kafka or PostgreSQL.
                "SAGALINE_KAFKA_BOOTSTRAP": "127.0.0.1:1",
                "SAGALINE_POSTGRES_DSN": "postgresql://nobody@127.0.0.1:1/none",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert "SAGALINE_METRICS_PORT" in done.stderr
    assert "Traceback" not in done.stderr


def test_every_setting_is_documented_with_its_variable() -> None:
    """docs/operations.md is where operators look a variable up; a field added to a
    settings model without a line there is a setting nobody knows of."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    missing = []
    for model in (OrchestratorSettings, ParticipantSettings, CelerySettings):
        for name in model.model_fields:
            variable = f"SAGALINE_{name.upper()}"
            # "SAGALINE_METRICS_PORT` / `_HOST`" documents both in one row.
            shorthand = variable.endswith("_HOST") and "_PORT` / `_HOST`" in text
            if f"`{variable}`" not in text and not shorthand:
                missing.append(f"{model.__name__}.{name} ({variable})")
    assert not missing, f"not in docs/operations.md: {missing}"
