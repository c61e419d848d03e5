"""Creating, describing and checking sagaline's topics with explicit settings.

What each topic should be is said once, by :func:`expected_topics` (from
``orchestrator.protocol.topics``): ``sagaline topics create`` makes what is missing from
it, ``sagaline topics describe`` shows the broker's topics beside it and ``sagaline topics
check`` lists every way they differ that breaks sagaline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from orchestrator.errors import ConfigurationError
from orchestrator.protocol.topics import (
    LOCAL_PARTICIPANT,
    PARTICIPANT_NAME,
    Topics,
    dlq_config,
    history_config,
    inbox_config,
    replies_config,
    tasks_config,
)

log = logging.getLogger(__name__)

# A record of SAGALINE_MAX_RECORD_BYTES needs this much more room in a topic's
# max.message.bytes for the batch around it (the producers' message.max.bytes rule).
BATCH_OVERHEAD_BYTES: Final = 65_536
DEFAULT_MAX_RECORD_BYTES: Final = 900_000
# The configs `topics describe` shows, in its columns' order.
SHOWN_CONFIGS: Final = (
    "cleanup.policy",
    "min.insync.replicas",
    "max.message.bytes",
    "retention.ms",
)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """What one of a deployment's topics should be.

    ``partitions``: a fixed count (the DLQ's 1), or None for the deployment's count
    (``topics create --partitions``). ``config``: the topic configs sagaline sets on it.
    ``required``: every process needs it (tasks topics are needed only by the workflows
    that call that participant).
    """

    name: str
    role: str
    partitions: int | None
    config: Mapping[str, str]
    required: bool = True

    def expectation(self) -> str:
        """What the spec asks for, in a few words, for ``topics describe``."""
        said = [f"{k}={v}" for k, v in self.config.items() if k in SHOWN_CONFIGS]
        if self.role == "history":
            said.append("partitions = inbox's")
        elif self.partitions is not None:
            said.append(f"partitions={self.partitions}")
        return ", ".join(said)


@dataclass(frozen=True, slots=True)
class TopicState:
    """One topic as the broker has it: partitions, the smallest replica count of any of
    them, and its configs (``min.insync.replicas`` and the others, as text)."""

    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str] = field(default_factory=dict)

    @property
    def min_insync_replicas(self) -> int | None:
        """The topic's ``min.insync.replicas``, None if unknown."""
        return _int(self.config.get("min.insync.replicas"))

    @property
    def max_message_bytes(self) -> int | None:
        """The topic's ``max.message.bytes``, None if unknown."""
        return _int(self.config.get("max.message.bytes"))

    def to_json(self) -> dict[str, Any]:
        """The state as a JSON-ready dict."""
        return {
            "topic": self.name,
            "partitions": self.partitions,
            "replication_factor": self.replication_factor,
            "config": dict(self.config),
        }


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def expected_topics(topics: Topics, participants: Iterable[str] = ()) -> list[TopicSpec]:
    """The topics of the deployment under ``topics``' prefix, with the tasks topics of
    ``participants``, as :func:`ensure_topics` creates them."""
    specs = [
        TopicSpec(topics.inbox, "inbox", None, inbox_config()),
        TopicSpec(topics.history, "history", None, history_config()),
        TopicSpec(topics.dlq, "dlq", 1, dlq_config()),
        TopicSpec(topics.replies, "replies", None, replies_config()),
    ]
    for participant in dict.fromkeys(participants):  # each once, in the order given
        specs.append(TopicSpec(topics.tasks(participant), "tasks", None, tasks_config(), False))
    return specs


def participant_names(text: str) -> list[str]:
    """The participants of a comma-separated list (``--participants a,b``), checked.

    Raises:
        ConfigurationError: a name that cannot be part of a topic name.
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if not PARTICIPANT_NAME.fullmatch(name):
            raise ConfigurationError(
                f"participant name {name!r} must be 1-100 letters, digits, '_' or '-'"
            )
        if name == LOCAL_PARTICIPANT:
            raise ConfigurationError(
                f"participant name {name!r} is reserved for local activities, which run "
                "inside the orchestrator and have no tasks topic"
            )
    return names


def ensure_topics(
    admin: AdminClient,
    topics: Topics,
    *,
    partitions: int,
    participants: Iterable[str],
    replication_factor: int = 1,
    min_insync_replicas: int | None = None,
    timeout_s: float = 30.0,
    progress: Callable[[str], None] | None = None,
    partitions_given: bool = True,
) -> list[str]:
    """Create the inbox, history, DLQ, replies and task topics that do not exist yet.

    Inbox and history must have the same partition count (they are co-partitioned): when
    one of them exists, the other is created with its count; if ``partitions_given`` (the
    caller asked for ``partitions`` explicitly) and that differs, nothing is created. An
    existing pair that disagrees is a deployment error, reported rather than repaired.
    ``min_insync_replicas`` sets that config on the topics created (None: the broker's
    default). Topics that exist are left as they are: ``sagaline topics check`` says how
    they differ. ``progress`` is told what happens, one line at a time.

    Returns:
        The names of the topics created.
    """
    say = progress or (lambda _text: None)
    existing = admin.list_topics(timeout=timeout_s).topics
    pair = _pair_partitions(existing, topics, partitions, partitions_given)
    new: list[NewTopic] = []
    for spec in expected_topics(topics, participants):
        if spec.name in existing:
            continue
        config = dict(spec.config)
        if min_insync_replicas is not None:
            config["min.insync.replicas"] = str(min_insync_replicas)
        count = spec.partitions if spec.partitions is not None else partitions
        if spec.role in ("inbox", "history"):
            count = pair
        new.append(
            NewTopic(
                spec.name,
                num_partitions=count,
                replication_factor=replication_factor,
                config=config,
            )
        )
    created: list[str] = []
    if new:
        say(f"creating {len(new)} topic(s)")
        for name, future in admin.create_topics(new, operation_timeout=timeout_s).items():
            try:
                future.result(timeout=timeout_s)
                created.append(name)
                say(f"created {name}")
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                say(f"{name} was created meanwhile")
        log.info("created topics %s", ",".join(created))
    say("checking that the inbox and history partition counts match")
    check_copartitioned(admin, topics, timeout_s=timeout_s)
    return created


def _pair_partitions(
    existing: Mapping[str, Any], topics: Topics, partitions: int, given: bool
) -> int:
    """The partition count a missing inbox or history must be created with: the count of
    the one that exists (a workflow lives in the same partition of both), else
    ``partitions``.

    Raises:
        ConfigurationError: ``partitions`` was ``given`` and differs from the existing one's.
    """
    found = {
        name: len(info.partitions)
        for name in (topics.inbox, topics.history)
        if (info := existing.get(name)) is not None and info.error is None and info.partitions
    }
    if len(found) != 1:
        return partitions  # both missing: created alike; both there: nothing to create
    for name, count in found.items():
        if given and count != partitions:
            raise ConfigurationError(
                f"{name} exists with {count} partitions, not the --partitions {partitions} "
                "asked for; inbox and history must be equal: created nothing (leave "
                f"--partitions out, or give {count})"
            )
        return count
    return partitions


def check_copartitioned(admin: AdminClient, topics: Topics, *, timeout_s: float = 30.0) -> int:
    """Return the partition count shared by inbox and history, or raise if they differ."""
    deadline = time.monotonic() + timeout_s
    while True:
        # Metadata of just-created topics reaches the broker's cache a moment later.
        metadata = admin.list_topics(timeout=timeout_s).topics
        missing = [
            t
            for t in (topics.inbox, topics.history)
            if t not in metadata or metadata[t].error is not None
        ]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if missing:
        raise ConfigurationError(
            f"topics {', '.join(missing)} do not exist; run `sagaline topics create`"
        )
    inbox = len(metadata[topics.inbox].partitions)
    history = len(metadata[topics.history].partitions)
    if inbox != history:
        raise ConfigurationError(
            f"{topics.inbox} has {inbox} partitions but {topics.history} has {history}; "
            "they must be equal because a workflow lives in the same partition of both"
        )
    return inbox


def describe_topics(
    admin: AdminClient, topics: Topics, *, timeout_s: float = 30.0
) -> list[TopicState]:
    """The deployment's topics the broker has (inbox, history, DLQ, replies and every
    ``<prefix>.tasks.*``), with their configs, sorted by name.

    Raises:
        KafkaException: the broker is out of reach or refuses the requests.
    """
    metadata = admin.list_topics(timeout=timeout_s).topics
    own = {topics.inbox, topics.history, topics.dlq, topics.replies}
    tasks_prefix = topics.tasks("")
    names = sorted(
        name
        for name, info in metadata.items()
        if info.error is None and (name in own or name.startswith(tasks_prefix))
    )
    if not names:
        return []
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
    futures = admin.describe_configs(resources, request_timeout=timeout_s)
    states: list[TopicState] = []
    for resource in resources:
        entries = futures[resource].result(timeout=timeout_s)
        config = {
            key: str(entry.value) for key, entry in entries.items() if entry.value is not None
        }
        partitions = metadata[resource.name].partitions
        replicas = min((len(p.replicas) for p in partitions.values()), default=0)
        states.append(TopicState(resource.name, len(partitions), replicas, config))
    return states


def topic_problems(
    states: Iterable[TopicState],
    topics: Topics,
    *,
    participants: Iterable[str] = (),
    replication_factor: int = 1,
    min_insync_replicas: int = 1,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> list[str]:
    """Every way the broker's topics (``states``) break what sagaline needs, one line each.

    Checked: a required topic (or the tasks topic of one of ``participants``) is missing;
    inbox and history partition counts differ; a ``cleanup.policy`` other than the spec's
    (a deleting history loses workflows, a compacted inbox loses inputs); fewer replicas
    than ``replication_factor``; a ``min.insync.replicas`` below ``min_insync_replicas`` or
    above the topic's replica count (then no write with acks=all succeeds); a
    ``max.message.bytes`` below ``max_record_bytes`` plus batch room on a topic that
    carries records of that size. An empty list means all is well.
    """
    found = {state.name: state for state in states}
    specs = expected_topics(topics, participants)
    tasks_prefix = topics.tasks("")
    known = {spec.name for spec in specs}
    # Tasks topics of other participants exist too: they are checked like the named ones.
    specs += [
        TopicSpec(name, "tasks", None, tasks_config(), False)
        for name in sorted(found)
        if name.startswith(tasks_prefix) and name not in known
    ]
    problems: list[str] = []
    for spec in specs:
        state = found.get(spec.name)
        if state is None:
            problems.append(f"{spec.name}: missing (sagaline topics create makes it)")
            continue
        problems.extend(_spec_problems(spec, state, replication_factor, min_insync_replicas))
        if spec.role != "dlq":
            limit = state.max_message_bytes
            if limit is not None and limit < max_record_bytes + BATCH_OVERHEAD_BYTES:
                problems.append(
                    f"{spec.name}: max.message.bytes is {limit}, below "
                    f"{max_record_bytes + BATCH_OVERHEAD_BYTES} (SAGALINE_MAX_RECORD_BYTES "
                    f"{max_record_bytes} plus {BATCH_OVERHEAD_BYTES} of batch room): "
                    "larger records are refused"
                )
    inbox, history = found.get(topics.inbox), found.get(topics.history)
    if inbox is not None and history is not None and inbox.partitions != history.partitions:
        problems.append(
            f"{topics.inbox} has {inbox.partitions} partitions but {topics.history} has "
            f"{history.partitions}: they must be equal (a workflow lives in the same "
            "partition of both)"
        )
    return problems


def _spec_problems(
    spec: TopicSpec, state: TopicState, replication_factor: int, min_insync_replicas: int
) -> list[str]:
    problems: list[str] = []
    wanted_policy = spec.config.get("cleanup.policy")
    policy = state.config.get("cleanup.policy")
    if wanted_policy is not None and policy is not None and policy != wanted_policy:
        why = {
            "history": "a history that deletes loses workflows",
            "inbox": "a compacted inbox loses inputs",
        }.get(spec.role, "sagaline creates it so")
        problems.append(
            f"{spec.name}: cleanup.policy is {policy}, expected {wanted_policy} ({why})"
        )
    if state.replication_factor < replication_factor:
        problems.append(
            f"{spec.name}: replication factor {state.replication_factor}, below "
            f"{replication_factor}"
        )
    isr = state.min_insync_replicas
    if isr is not None and isr < min_insync_replicas:
        problems.append(f"{spec.name}: min.insync.replicas is {isr}, below {min_insync_replicas}")
    if isr is not None and isr > state.replication_factor:
        problems.append(
            f"{spec.name}: min.insync.replicas is {isr}, above its replication factor "
            f"{state.replication_factor}: no write with acks=all can succeed"
        )
    return problems
