"""Settings of every sagaline process, read from ``SAGALINE_*`` environment variables.

One settings object per process. Kafka client options that sagaline does not set itself
(TLS, SASL, timeouts) pass through ``SAGALINE_KAFKA_EXTRA`` as JSON, e.g.
``{"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}``; secrets are
never logged (``redacted()`` hides them).
"""

from __future__ import annotations

import json
import socket
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from orchestrator.protocol.topics import Topics

_SECRET_HINTS = ("password", "secret", "key", "token", "sasl.jaas")


def _valid_dsn(value: SecretStr) -> SecretStr:
    # Parsed here, at start, because libpq's parse errors quote the text around the
    # mistake, which in a DSN is often the password: the message must not carry it.
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    try:
        conninfo_to_dict(value.get_secret_value())
    except Exception:
        raise ValueError(
            "not a valid PostgreSQL connection string (a URI such as "
            "postgresql://user:password@host:5432/db, with special characters in the "
            "password percent-encoded, or key=value pairs)"
        ) from None
    return value


Dsn = Annotated[SecretStr, AfterValidator(_valid_dsn)]
"""A PostgreSQL connection string, checked at start and never shown."""


class KafkaSettings(BaseSettings):
    """How to reach Kafka; shared by orchestrators, participants and clients."""

    model_config = SettingsConfigDict(
        env_prefix="SAGALINE_",
        extra="ignore",
        # A bad value may be a secret (a DSN, SAGALINE_KAFKA_EXTRA): errors name the
        # variable, never its value.
        hide_input_in_errors=True,
    )

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="bootstrap.servers")
    topic_prefix: str = Field("sagaline", description="prefix of every sagaline topic")
    kafka_extra: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        repr=False,
        description="extra librdkafka settings (JSON object); may hold secrets",
    )

    @property
    def topics(self) -> Topics:
        """Topic names under the configured prefix."""
        return Topics(self.topic_prefix)

    def kafka_common(self) -> dict[str, Any]:
        """librdkafka settings every client of this deployment starts from."""
        return {"bootstrap.servers": self.kafka_bootstrap, **self.kafka_extra}

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict safe to log."""
        shown = self.model_dump()
        shown["kafka_extra"] = {
            k: ("***" if any(h in k for h in _SECRET_HINTS) else v)
            for k, v in self.kafka_extra.items()
        }
        for name in shown:
            if isinstance(getattr(self, name, None), SecretStr):
                shown[name] = "***"
        return shown


class OrchestratorSettings(KafkaSettings):
    """Settings of an orchestrator process (``sagaline orchestrator``)."""

    instance_id: str = Field(
        default_factory=socket.gethostname,
        description="stable per instance: group.instance.id and the "
        "transactional.id derive from it",
    )
    group_id: str = Field(
        "", description="orchestrator consumer group; default '<topic_prefix>.orchestrator'"
    )
    commit_interval_ms: int = Field(100, ge=1, description="longest a batch stays open")
    max_batch_records: int = Field(2_000, ge=1, description="inputs per transaction, at most")
    transaction_timeout_ms: int = Field(15_000, ge=1_000)
    transaction_budget: float = Field(
        0.5,
        gt=0.0,
        le=0.8,
        description="a batch commits before this share of transaction_timeout_ms has passed "
        "since its transaction began, however few inputs it holds",
    )
    session_timeout_ms: int = Field(
        0, ge=0, description="0: the lowest the broker allows (group.min.session.timeout.ms)"
    )
    closed_retention_ms: int = Field(
        7 * 24 * 3_600_000,
        ge=0,
        description="how long a closed workflow stays on the history topic before it is "
        "tombstoned (a duplicate start within it is ignored)",
    )
    decoded_cache: int = Field(
        10_000,
        ge=0,
        description="workflows kept decoded in memory; the others are held as their "
        "committed bytes and decoded when an input arrives",
    )
    max_record_bytes: int = Field(
        900_000,
        ge=1_024,
        description="largest input, workflow record or task; larger inputs go to the DLQ. "
        "The default stays below the ~1 MB Kafka clients and topics accept by default; "
        "raise it only with the topics' max.message.bytes",
    )
    max_history_events: int = Field(1_000, ge=10)
    local_activity_timeout_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="longest one attempt of a local activity without a start_to_close of "
        "its own may run; the orchestrator's other workflows wait while it does",
    )
    replay_cache_size: int = Field(
        1_000,
        ge=0,
        description="waiting workflow runs whose code is kept suspended between inputs, "
        "so the next input runs it on instead of replaying its history from the start; "
        "the least recently used beyond this are closed (0: replay every input from the "
        "start)",
    )
    archive_dsn: Dsn | None = Field(
        None,
        repr=False,
        description="PostgreSQL of the visibility projector (sagaline projector); when "
        "set, retention tombstones a closed workflow only once the projector has archived "
        "its last run there. Unset: retention does not wait",
    )
    metrics_port: int = Field(9400, ge=0, description="0 disables /metrics")
    metrics_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _interval_below_timeout(self) -> OrchestratorSettings:
        if self.commit_interval_ms * 10 > self.transaction_timeout_ms:
            raise ValueError(
                f"commit_interval_ms ({self.commit_interval_ms}) must be at most a tenth of "
                f"transaction_timeout_ms ({self.transaction_timeout_ms})"
            )
        return self

    @property
    def transactional_id(self) -> str:
        """Stable per instance, so a restart fences its own dangling transaction."""
        return transactional_id(self.consumer_group, self.instance_id)

    @property
    def consumer_group(self) -> str:
        """The orchestrators' consumer group: one per deployment (topic prefix)."""
        return self.group_id or f"{self.topic_prefix}.orchestrator"


def transactional_id(group: str, instance_id: str) -> str:
    """The transactional id of orchestrator instance ``instance_id`` in ``group``."""
    return f"{group}.{instance_id}"


class ParticipantSettings(KafkaSettings):
    """Settings of a participant process (``sagaline participant``)."""

    instance_id: str = Field(
        default_factory=socket.gethostname,
        description="stable per process and unique among the replicas of a participant: "
        "its static group member id, so a restart keeps its partitions",
    )
    postgres_dsn: Dsn = Field(
        SecretStr("postgresql://sagaline@127.0.0.1:5432/sagaline"),
        description="PostgreSQL for the idempotency inbox and business tables",
    )
    concurrency: int = Field(8, ge=1, description="handlers running at once")
    max_record_bytes: int = Field(
        900_000, ge=1_024, description="largest result published; larger ones become failures"
    )
    max_batch_records: int = Field(200, ge=1)
    session_timeout_ms: int = Field(
        0, ge=0, description="0: the lowest the broker allows (group.min.session.timeout.ms)"
    )
    db_connect_timeout_s: float = Field(10.0, gt=0, description="PostgreSQL connect timeout")
    metrics_port: int = Field(9410, ge=0, description="0 disables /metrics")
    metrics_host: str = "127.0.0.1"


class CelerySettings(KafkaSettings):
    """Settings of the sagaline integration in a Celery worker (``participants.celery``)."""

    postgres_dsn: Dsn = Field(
        SecretStr("postgresql://sagaline@127.0.0.1:5432/sagaline"),
        description="PostgreSQL of the idempotency inbox and the tasks' writes "
        "(ExactlyOnceTask); other tasks never connect",
    )
    db_connect_timeout_s: float = Field(10.0, gt=0, description="PostgreSQL connect timeout")
    max_record_bytes: int = Field(
        900_000,
        ge=1_024,
        description="largest outcome published (the orchestrators' SAGALINE_MAX_RECORD_BYTES); "
        "larger results become ResultTooLarge failures",
    )
    celery_metrics_port: int = Field(
        0,
        ge=0,
        description="serve /metrics from the worker's main process on this port (0: not "
        "served); a prefork pool needs PROMETHEUS_MULTIPROC_DIR",
    )
    metrics_host: str = "127.0.0.1"


def _host_list(value: Any) -> Any:
    # SAGALINE_UI_ALLOWED_HOSTS arrives as text: a JSON list, or names separated by commas.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [name.strip() for name in text.split(",") if name.strip()]
    return value


class ProjectorSettings(KafkaSettings):
    """Settings of the visibility projector and its web UI (``sagaline projector``,
    ``sagaline ui``)."""

    postgres_dsn: Dsn = Field(
        SecretStr("postgresql://sagaline@127.0.0.1:5432/sagaline"),
        description="PostgreSQL of the visibility tables (sagaline_workflows, "
        "sagaline_workflow_events)",
    )
    db_connect_timeout_s: float = Field(10.0, gt=0, description="PostgreSQL connect timeout")
    projector_group_id: str = Field(
        "", description="the projector's consumer group; default '<topic_prefix>.projector'"
    )
    max_batch_records: int = Field(
        2_000, ge=1, description="history records applied per PostgreSQL transaction, at most"
    )
    metrics_port: int = Field(9420, ge=0, description="0 disables /metrics")
    metrics_host: str = "127.0.0.1"
    ui_port: int = Field(
        9430, ge=0, description="the web UI's port (sagaline projector and sagaline ui); 0: none"
    )
    ui_host: str = Field("127.0.0.1", description="address the web UI listens on")
    ui_allowed_hosts: Annotated[list[str], NoDecode, BeforeValidator(_host_list)] = Field(
        default_factory=list,
        description="host names (optionally name:port) the web UI answers besides localhost "
        "and loopback addresses, e.g. an Ingress or proxy name; JSON list or comma-separated. "
        "Any other Host header is refused (DNS rebinding)",
    )

    @property
    def consumer_group(self) -> str:
        """The projector's consumer group: one per deployment (topic prefix)."""
        return self.projector_group_id or f"{self.topic_prefix}.projector"
