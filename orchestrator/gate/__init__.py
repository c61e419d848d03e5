"""The replay gate (``sagaline replay``): would the code deployed now replay the recorded
workflows the same way? ``judge`` decides per record (pure); ``sources`` reads the records
(export files, directories of them, the live history topic) and runs the commands."""

from orchestrator.gate.judge import (
    DEFAULT_MAX_LINES,
    PROGRESS_EVERY_S,
    Entry,
    Kind,
    Progress,
    ReplaySourceError,
    Verdict,
    check,
    counts,
    exit_code,
    judge,
    report,
    undecodable,
)
from orchestrator.gate.sources import (
    HistorySnapshot,
    avro_files,
    export_history,
    file_schema,
    gate_codec,
    read_history,
    read_records,
    replay_files,
    replay_topic,
    write_records,
)

__all__ = [
    "DEFAULT_MAX_LINES",
    "PROGRESS_EVERY_S",
    "Entry",
    "HistorySnapshot",
    "Kind",
    "Progress",
    "ReplaySourceError",
    "Verdict",
    "avro_files",
    "check",
    "counts",
    "exit_code",
    "export_history",
    "file_schema",
    "gate_codec",
    "judge",
    "read_history",
    "read_records",
    "replay_files",
    "replay_topic",
    "report",
    "undecodable",
    "write_records",
]
