"""The replay gate's sources and commands: files written by ``sagaline export`` (Avro
Object Container Files of ``WorkflowRecord``), directories of them, and the live history
topic (the last record of every workflow, read as a restore reads it). Only the topic
source talks to Kafka, and imports it when it is used.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import fastavro
from fastavro.schema import to_parsing_canonical_form

from orchestrator.errors import UnknownSchemaError
from orchestrator.protocol.codec import (
    WORKFLOW,
    AvroCodec,
    _inline,
    _workflow_from_avro,
    _workflow_to_avro,
)
from orchestrator.protocol.failures import MAX_NAME_CHARS, describe, safe_text
from orchestrator.protocol.records import WorkflowRecord
from orchestrator.workflow import WorkflowRegistry

if TYPE_CHECKING:
    from orchestrator.settings import KafkaSettings

from orchestrator.gate.judge import (
    DEFAULT_MAX_LINES,
    Entry,
    Progress,
    ReplaySourceError,
    Verdict,
    counts,
    exit_code,
    judge,
    newer,
    one_line,
    report,
    undecodable,
)

# The gate reads whatever the topic holds: the record size limit is the orchestrator's
# business, and a deployment may have raised it (the history topic takes 8 MiB).
_READ_ANY_SIZE: Final = 1 << 30
_HELD_KEY: Final = b"\xff"  # history keys of inputs held for a parked workflow
_BATCH: Final = 10_000
# How much of why a record of an export does not resolve its verdict quotes.
_REASON_CHARS: Final = 300
_PATH_CHARS: Final = 4096

# --- export files -----------------------------------------------------------------------


def gate_codec() -> AvroCodec:
    """The codec the gate reads with: records of any size (limits are the orchestrator's)."""
    return AvroCodec(max_record_bytes=_READ_ANY_SIZE)


def file_schema(codec: AvroCodec) -> dict[str, Any]:
    """The current ``io.sagaline.WorkflowRecord`` schema as an export's header holds it:
    every named type it uses is defined inline at its first use (the codec's parsed schema
    only names the shared ones), so an Avro tool needs no other file to read it."""
    parsed = codec.writer_schema(WORKFLOW)
    full: dict[str, Any] = _inline(parsed, parsed.get("__named_schemas", {}), set())
    return full


def write_records(
    path: Path,
    records: Iterable[WorkflowRecord],
    codec: AvroCodec,
    *,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write ``records`` to ``path`` as an Avro Object Container File; returns how many.

    The file is written beside ``path`` and renamed over it once complete, so a reader
    never sees half an export.

    Raises:
        ReplaySourceError: the file cannot be written.
    """
    schema = fastavro.parse_schema(file_schema(codec))
    written = 0

    def datums() -> Iterator[dict[str, Any]]:
        nonlocal written
        for record in records:
            written += 1
            yield _workflow_to_avro(record)

    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("wb") as out:
            fastavro.writer(out, schema, datums(), codec="deflate", metadata=dict(metadata or {}))
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ReplaySourceError(f"cannot write {path}: {exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written


def read_records(path: Path, codec: AvroCodec) -> list[Entry]:
    """The records of an export, in the current shape: files written by older versions are
    read through Avro schema resolution, like older records on the topic, one record at a
    time, so that one record this version cannot resolve (an event kind or status added
    later, without a default) is a ``SKIPPED`` verdict in its place and the others are
    judged.

    A record that resolves but does not convert is a ``BROKEN`` verdict in its place.

    Raises:
        ReplaySourceError: ``path`` cannot be read, is not an Avro file of WorkflowRecords,
            or is damaged (a block that does not decode with the file's own schema).
    """
    reader_schema = fastavro.parse_schema(file_schema(codec))
    entries: list[Entry] = []
    try:
        with path.open("rb") as stream:
            # Read with the writer's schema alone: fastavro's resolution to a reader schema
            # raises out of the iteration, and the rest of the file would be lost with the
            # one record it cannot resolve.
            reader = fastavro.reader(
                stream, return_record_name=True, return_record_name_override=True
            )
            written_as = reader.writer_schema
            name = written_as.get("name") if isinstance(written_as, dict) else written_as
            if name != WORKFLOW:
                raise ReplaySourceError(
                    f"{path} holds {one_line(str(name), MAX_NAME_CHARS)} records, not {WORKFLOW}"
                )
            writer_schema = fastavro.parse_schema(written_as)
            same = to_parsing_canonical_form(writer_schema) == to_parsing_canonical_form(
                reader_schema
            )
            added = [] if same else _additions(writer_schema, reader_schema)
            for datum in reader:
                if same:
                    entries.append(_entry(datum))
                else:
                    entries.append(_resolved(datum, writer_schema, reader_schema, added))
    except ReplaySourceError:
        raise
    except OSError as exc:
        raise ReplaySourceError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:  # fastavro raises many types on what is not an export
        raise ReplaySourceError(
            f"{path} is not a readable Avro file of {WORKFLOW} records: {describe(exc)}"
        ) from exc
    return entries


def _resolved(datum: Any, writer_schema: Any, reader_schema: Any, added: list[str]) -> Entry:
    """``datum`` (decoded with the file's schema) in the current schema: Avro resolution,
    one record at a time. A record that does not resolve is ``SKIPPED`` when the file's
    schema has types or symbols this version lacks (``added``: a newer version wrote it),
    else ``BROKEN``."""
    buffer = io.BytesIO()
    try:
        fastavro.schemaless_writer(buffer, writer_schema, datum)
        buffer.seek(0)
        current = fastavro.schemaless_reader(
            buffer,
            writer_schema,
            reader_schema,
            return_record_name=True,
            return_record_name_override=True,
        )
    except Exception as exc:  # SchemaResolutionError: a union branch, an enum symbol
        head = datum if isinstance(datum, dict) else {}
        workflow_id = _text(head.get("workflow_id"), "?")
        if not added:
            return undecodable(workflow_id, safe_text(describe(exc), _REASON_CHARS))
        # Union branches show their names; an enum symbol or a lone record does not.
        used = sorted(_branches(datum) & set(added))
        holds = f"it holds {', '.join(used)}" if used else f"it may hold {', '.join(added)}"
        return newer(
            workflow_id,
            _text(head.get("run_id")),
            _text(head.get("workflow_type")),
            safe_text(f"{holds}, unknown here", _REASON_CHARS),
        )
    return _entry(current)


def _additions(writer_schema: Any, reader_schema: Any) -> list[str]:
    """The named types and enum symbols (``Name.SYMBOL``) of ``writer_schema`` that
    ``reader_schema`` lacks, sorted."""
    ours = _named(reader_schema)
    added: list[str] = []
    for name, schema in _named(writer_schema).items():
        known = ours.get(name)
        if known is None:
            added.append(name)
        elif schema.get("type") == "enum":
            symbols = set(known.get("symbols", ()))
            added.extend(f"{name}.{s}" for s in schema.get("symbols", ()) if s not in symbols)
    return sorted(added)


def _named(
    schema: Any, found: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """The named types (records, enums, fixed) a parsed schema defines, by full name."""
    found = {} if found is None else found
    if isinstance(schema, list):
        for branch in schema:
            _named(branch, found)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        name = schema.get("name")
        if kind in ("record", "error", "enum", "fixed") and isinstance(name, str):
            found.setdefault(name, schema)
        for field in schema.get("fields", ()):
            if isinstance(field, dict):
                _named(field.get("type"), found)
        for key in ("items", "values"):
            if key in schema:
                _named(schema[key], found)
        if isinstance(kind, dict | list):
            _named(kind, found)
    return found


def _branches(datum: Any) -> set[str]:
    """The record names of the union branches ``datum`` holds (``(name, value)`` pairs, as
    fastavro reads them with ``return_record_name``)."""
    names: set[str] = set()
    stack = [datum]
    while stack:
        item = stack.pop()
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            names.add(item[0])
            stack.append(item[1])
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return names


def _text(value: Any, otherwise: str = "") -> str:
    return value if isinstance(value, str) else otherwise


def _entry(datum: Any) -> Entry:
    try:
        return _workflow_from_avro(datum)
    except Exception as exc:  # a value the current code rejects
        found = datum.get("workflow_id") if isinstance(datum, dict) else None
        return undecodable(_text(found, "?"), describe(exc))


def avro_files(directory: Path) -> list[Path]:
    """The ``*.avro`` files of ``directory``, sorted by name.

    Raises:
        ReplaySourceError: not a directory, or no such file in it.
    """
    if not directory.is_dir():
        raise ReplaySourceError(f"{directory} is not a directory")
    files = sorted(p for p in directory.glob("*.avro") if p.is_file())
    if not files:
        raise ReplaySourceError(f"{directory} holds no *.avro files")
    return files


# --- the live history topic -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistorySnapshot:
    """The last record of every workflow on the history topic, as of one read.

    ``records`` counts what was read: every version of every workflow, tombstones and
    held inputs included.
    """

    topic: str
    latest: Mapping[str, bytes]
    records: int

    def select(self, codec: AvroCodec, *, include_closed: bool) -> list[str]:
        """The workflow ids to replay, sorted: the open ones (``RUNNING``, ``STUCK``, and
        statuses only a newer version knows), or all with ``include_closed``. A record whose
        status cannot be read is selected, so that its decoding failure is reported."""
        chosen: list[str] = []
        for workflow_id, value in self.latest.items():
            if not include_closed:
                # A head that cannot be read is selected: decoding it reports why.
                with contextlib.suppress(Exception):
                    if codec.peek_workflow(value).status.terminal:
                        continue
            chosen.append(workflow_id)
        return sorted(chosen)

    def entries(self, codec: AvroCodec, workflow_ids: Iterable[str]) -> Iterator[Entry]:
        """The records of ``workflow_ids``, decoded one at a time as they are judged."""
        for workflow_id in workflow_ids:
            try:
                yield codec.decode_workflow(self.latest[workflow_id])
            except UnknownSchemaError as exc:
                # A schema id a newer version wrote, as files report it: not the code's fault.
                yield newer(workflow_id, "", "", safe_text(describe(exc), _REASON_CHARS))
            except Exception as exc:  # garbage, a newer event kind under a known id
                yield undecodable(workflow_id, describe(exc))


def read_history(
    settings: KafkaSettings,
    *,
    progress: Progress | None = None,
    timeout_s: float = 30.0,
    stall_s: float = 60.0,
) -> HistorySnapshot:
    """Read the deployment's history topic to its end, the way a restore does.

    read_committed, from each partition's first offset to its high watermark as
    read_uncommitted sees it, until ``position() >= target`` (never by the last record's
    offset: transaction markers and compaction leave gaps), keeping the last record of
    each workflow key; a tombstone deletes it, held inputs (keys starting 0xFF) are
    skipped. The consumer is assign-only under a throwaway group id and commits nothing,
    so the orchestrators never notice it.

    Raises:
        ReplaySourceError: Kafka is out of reach within ``timeout_s``, the topic does not
            exist, or no partition advanced for ``stall_s``.
    """
    # Kafka loads only for this source: the file sources work without a client library.
    from confluent_kafka import Consumer, KafkaException, TopicPartition  # noqa: PLC0415
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    from orchestrator.runtime.restore import history_starts, history_targets  # noqa: PLC0415
    from orchestrator.transport import poll_batch  # noqa: PLC0415

    topic = settings.topics.history
    where = f"Kafka at {settings.kafka_bootstrap} (SAGALINE_KAFKA_BOOTSTRAP)"
    started = time.monotonic()
    admin = AdminClient(settings.kafka_common())
    try:
        found = admin.list_topics(timeout=timeout_s).topics.get(topic)
    except KafkaException as exc:
        raise ReplaySourceError(f"cannot reach {where} within {timeout_s:g} s: {exc}") from exc
    if found is None or found.error is not None:
        raise ReplaySourceError(
            f"topic {topic} does not exist at {settings.kafka_bootstrap}; is "
            f"SAGALINE_TOPIC_PREFIX ({settings.topic_prefix!r}) the deployment's?"
        )
    partitions = sorted(found.partitions)
    try:
        targets = history_targets(admin, topic, partitions, timeout_s)
        starts = history_starts(admin, topic, partitions, timeout_s)
    except Exception as exc:  # KafkaException, or a future that timed out
        raise ReplaySourceError(f"cannot list the offsets of {topic} at {where}: {exc}") from exc
    pending = {p for p in partitions if targets[p] > starts[p]}
    latest: dict[str, bytes] = {}
    records = 0
    consumer = Consumer(
        {
            **settings.kafka_common(),
            "group.id": f"sagaline-replay-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",  # compaction may move a start meanwhile
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in sorted(pending)])
        positions: dict[int, int] = {}
        moved = time.monotonic()
        while pending:
            for msg in poll_batch(consumer, _BATCH, 0.2):
                error = msg.error()
                if error is not None:
                    if error.fatal():
                        raise ReplaySourceError(f"reading {topic} at {where}: {error}")
                    continue  # transient: the positions below decide when a partition is done
                records += 1
                key = msg.key()
                if key is None or key.startswith(_HELD_KEY):
                    continue
                workflow_id = key.decode("utf-8", "backslashreplace")
                value = msg.value()
                if value is None:
                    latest.pop(workflow_id, None)
                else:
                    latest[workflow_id] = value
            now = time.monotonic()
            for tp in consumer.position([TopicPartition(topic, p) for p in sorted(pending)]):
                if tp.offset > positions.get(tp.partition, -1):
                    positions[tp.partition] = tp.offset
                    moved = now
                if tp.offset >= targets[tp.partition]:
                    pending.discard(tp.partition)
            if pending and now - moved > stall_s:
                behind = {p: (positions.get(p), targets[p]) for p in sorted(pending)}
                raise ReplaySourceError(
                    f"reading {topic} made no progress for {stall_s:g} s (partition: "
                    f"(position, target)) {behind}; is a transaction open that nobody ends?"
                )
            if progress is not None and progress.due():
                progress.say(
                    f"reading {topic}: {records:,} records, "
                    f"{len(partitions) - len(pending)}/{len(partitions)} partitions done"
                )
    finally:
        consumer.close()
    if progress is not None:
        progress.say(
            f"read {topic}: {records:,} records, {len(latest):,} workflows, "
            f"{len(partitions)} partitions in {time.monotonic() - started:.1f} s"
        )
    return HistorySnapshot(topic, latest, records)


# --- the commands -------------------------------------------------------------------------


def replay_topic(
    registry: WorkflowRegistry,
    settings: KafkaSettings,
    out: TextIO,
    *,
    include_closed: bool = False,
    max_lines: int = DEFAULT_MAX_LINES,
    progress: Progress | None = None,
    timeout_s: float = 30.0,
) -> int:
    """``sagaline replay --topic``: judge the workflows on the history topic, print the
    report to ``out`` and return the exit code (:func:`exit_code`)."""
    codec = gate_codec()
    snapshot = read_history(settings, progress=progress, timeout_s=timeout_s)
    chosen = snapshot.select(codec, include_closed=include_closed)
    verdicts = judge(
        snapshot.entries(codec, chosen), registry, total=len(chosen), progress=progress
    )
    print(report(verdicts, max_lines=max_lines), file=out)
    return exit_code(verdicts)


def replay_files(
    registry: WorkflowRegistry,
    paths: Sequence[Path],
    out: TextIO,
    *,
    max_lines: int = DEFAULT_MAX_LINES,
    progress: Progress | None = None,
) -> int:
    """``sagaline replay --file`` / ``--dir``: judge every record of each file, print a
    report per file (headed by its name when there are several) and a total."""
    codec = gate_codec()
    everything: list[Verdict] = []
    for path in paths:
        entries = read_records(path, codec)
        verdicts = judge(entries, registry, total=len(entries), progress=progress)
        if len(paths) > 1:
            print(f"== {one_line(str(path), _PATH_CHARS)}", file=out)
        print(report(verdicts, max_lines=max_lines), file=out)
        everything.extend(verdicts)
    if len(paths) > 1:
        print(f"== all {len(paths)} files: {counts(everything)}", file=out)
    return exit_code(everything)


def export_history(
    settings: KafkaSettings,
    path: Path,
    *,
    include_closed: bool = False,
    limit: int | None = None,
    workflow_ids: Sequence[str] = (),
    progress: Progress | None = None,
    timeout_s: float = 30.0,
) -> tuple[int, list[Verdict]]:
    """``sagaline export``: write workflows of the history topic to an export file.

    The open workflows (all with ``include_closed``; exactly ``workflow_ids`` when given,
    whatever their status), sorted by id, at most ``limit``. Returns how many were written
    and the verdicts on those that could not be decoded (left out).

    Raises:
        ReplaySourceError: the topic cannot be read, a given id has no record, or the file
            cannot be written.
    """
    codec = gate_codec()
    snapshot = read_history(settings, progress=progress, timeout_s=timeout_s)
    if workflow_ids:
        missing = [w for w in workflow_ids if w not in snapshot.latest]
        if missing:
            raise ReplaySourceError(
                f"no record on {snapshot.topic} for workflow id(s) {', '.join(missing)} "
                "(never started, or closed and past retention)"
            )
        chosen = sorted(set(workflow_ids))
    else:
        chosen = snapshot.select(codec, include_closed=include_closed)
    if limit is not None:
        chosen = chosen[: max(0, limit)]
    left_out: list[Verdict] = []

    def records() -> Iterator[WorkflowRecord]:
        for entry in snapshot.entries(codec, chosen):
            if isinstance(entry, Verdict):
                left_out.append(entry)
            else:
                yield entry

    written = write_records(path, records(), codec, metadata={"sagaline.topic": snapshot.topic})
    return written, left_out
