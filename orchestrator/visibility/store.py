"""The visibility tables in PostgreSQL: what the projector writes and every reader queries.

``sagaline_workflows`` holds one row per run of a workflow, ``sagaline_workflow_events``
its history events. Writes are idempotent: a row changes only for a newer revision of
its run (or a later record of the same revision), so applying the history topic twice, or
any prefix of it again, leaves the same rows. A tombstone marks the workflow's closed
runs ``archived`` instead of deleting them: the archive outlives retention.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Final

import psycopg
from psycopg.rows import tuple_row

from orchestrator.visibility.models import EventRow, WorkflowFilter, WorkflowRow

SCHEMA_SQL: Final = """
CREATE TABLE IF NOT EXISTS sagaline_workflows (
    workflow_id text NOT NULL,
    run_id text NOT NULL,
    workflow_type text NOT NULL,
    status text NOT NULL,
    started_at_ms bigint NOT NULL,
    updated_at_ms bigint NOT NULL,
    closed_at_ms bigint,
    revision bigint NOT NULL,
    current_step text,
    attempts integer NOT NULL,
    error_type text,
    error_message text,
    result text,
    input text,
    parent_workflow_id text,
    kafka_partition integer NOT NULL,
    kafka_offset bigint NOT NULL,
    archived boolean NOT NULL DEFAULT false,
    PRIMARY KEY (workflow_id, run_id)
);
CREATE INDEX IF NOT EXISTS sagaline_workflows_by_start
    ON sagaline_workflows (started_at_ms DESC, workflow_id DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS sagaline_workflows_by_type
    ON sagaline_workflows (workflow_type, started_at_ms DESC, workflow_id DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS sagaline_workflows_by_status
    ON sagaline_workflows (status, started_at_ms DESC, workflow_id DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS sagaline_workflows_by_id_prefix
    ON sagaline_workflows (workflow_id text_pattern_ops);
CREATE TABLE IF NOT EXISTS sagaline_workflow_events (
    workflow_id text NOT NULL,
    run_id text NOT NULL,
    idx integer NOT NULL,
    kind text NOT NULL,
    at_ms bigint NOT NULL,
    seq integer,
    attempt integer,
    name text,
    detail jsonb NOT NULL,
    PRIMARY KEY (workflow_id, run_id, idx)
);
"""

_COLUMNS: Final = (
    "workflow_id",
    "run_id",
    "workflow_type",
    "status",
    "started_at_ms",
    "updated_at_ms",
    "closed_at_ms",
    "revision",
    "current_step",
    "attempts",
    "error_type",
    "error_message",
    "result",
    "input",
    "parent_workflow_id",
    "kafka_partition",
    "kafka_offset",
    "archived",
)
_TYPES: Final = (
    "text",
    "text",
    "text",
    "text",
    "bigint",
    "bigint",
    "bigint",
    "bigint",
    "text",
    "integer",
    "text",
    "text",
    "text",
    "text",
    "text",
    "integer",
    "bigint",
    "boolean",
)
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM sagaline_workflows"

# One statement per batch: arrays in, one row per run out. The WHERE keeps it idempotent
# and monotonic: an older revision (a replay, or records read out of order across a
# rebalance) never overwrites a newer one; the same record again changes nothing. A newer
# record un-archives nothing it should not: the run it belongs to was open again.
_UPSERT: Final = f"""
INSERT INTO sagaline_workflows AS w ({", ".join(_COLUMNS)})
SELECT * FROM unnest({", ".join(f"%s::{t}[]" for t in _TYPES)})
ON CONFLICT (workflow_id, run_id) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in _COLUMNS[2:])}
WHERE (w.revision, w.updated_at_ms, w.kafka_offset)
    < (EXCLUDED.revision, EXCLUDED.updated_at_ms, EXCLUDED.kafka_offset)
RETURNING workflow_id, run_id
"""
_DELETE_EVENTS: Final = """
DELETE FROM sagaline_workflow_events e
 USING unnest(%s::text[], %s::text[], %s::integer[]) AS t(workflow_id, run_id, keep)
 WHERE e.workflow_id = t.workflow_id AND e.run_id = t.run_id AND e.idx >= t.keep
"""
_UPSERT_EVENTS: Final = """
INSERT INTO sagaline_workflow_events AS e
    (workflow_id, run_id, idx, kind, at_ms, seq, attempt, name, detail)
SELECT * FROM unnest(%s::text[], %s::text[], %s::integer[], %s::text[], %s::bigint[],
                     %s::integer[], %s::integer[], %s::text[], %s::jsonb[])
ON CONFLICT (workflow_id, run_id, idx) DO UPDATE SET
    kind = EXCLUDED.kind, at_ms = EXCLUDED.at_ms, seq = EXCLUDED.seq,
    attempt = EXCLUDED.attempt, name = EXCLUDED.name, detail = EXCLUDED.detail
WHERE (e.kind, e.at_ms, e.seq, e.attempt, e.name, e.detail)
    IS DISTINCT FROM (EXCLUDED.kind, EXCLUDED.at_ms, EXCLUDED.seq, EXCLUDED.attempt,
                      EXCLUDED.name, EXCLUDED.detail)
"""
# Only what the tombstone deleted: runs written before it. A run started again under the
# same id after the tombstone is written after it too, so order within a batch is moot.
# A run still open here was closed and deleted while the projector was behind (no archive
# gate): it is closed as UNKNOWN with the reason, rather than shown RUNNING for ever.
_ARCHIVE: Final = """
UPDATE sagaline_workflows w SET archived = true,
       status = CASE WHEN w.closed_at_ms IS NULL THEN 'UNKNOWN' ELSE w.status END,
       current_step = CASE WHEN w.closed_at_ms IS NULL THEN NULL ELSE w.current_step END,
       error_type = CASE WHEN w.closed_at_ms IS NULL THEN 'Unprojected' ELSE w.error_type END,
       error_message = CASE WHEN w.closed_at_ms IS NULL
           THEN 'retention deleted this run from the history topic before the projector '
                'read how it ended' ELSE w.error_message END,
       closed_at_ms = COALESCE(w.closed_at_ms, w.updated_at_ms)
  FROM unnest(%s::text[], %s::bigint[]) AS t(workflow_id, kafka_offset)
 WHERE w.workflow_id = t.workflow_id AND w.kafka_offset < t.kafka_offset AND NOT w.archived
"""
# A newer run under the same id means every earlier one ended, even when compaction
# removed its closing record before the projector read it (continue-as-new, a start that
# terminated the running one). Those still open here are closed as UNKNOWN, with the reason.
_SUPERSEDE: Final = """
UPDATE sagaline_workflows w SET status = 'UNKNOWN', current_step = NULL,
       error_type = 'Unprojected',
       error_message = 'run ' || t.run_id || ' replaced this run before the projector read '
                       'how it ended',
       closed_at_ms = t.started_at_ms
  FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[])
       AS t(workflow_id, run_id, kafka_offset, started_at_ms)
 WHERE w.workflow_id = t.workflow_id AND w.run_id <> t.run_id
   AND w.kafka_offset < t.kafka_offset AND w.closed_at_ms IS NULL
"""
# The UI and the orchestrators' archive gate wait on these: a database that hangs must
# fail a call, not hold it for the kernel's TCP timeout.
CONNECT_OPTIONS: Final[dict[str, Any]] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def _where(flt: WorkflowFilter, *, for_counts: bool) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if flt.workflow_type is not None:
        clauses.append("workflow_type = %s")
        params.append(flt.workflow_type)
    if flt.statuses and not for_counts:
        clauses.append("status = ANY(%s)")
        params.append(list(flt.statuses))
    if flt.id_prefix:
        clauses.append("workflow_id LIKE %s")
        params.append(_like_prefix(flt.id_prefix))
    if flt.started_after_ms is not None:
        clauses.append("started_at_ms >= %s")
        params.append(flt.started_after_ms)
    if flt.started_before_ms is not None:
        clauses.append("started_at_ms < %s")
        params.append(flt.started_before_ms)
    if flt.before is not None and not for_counts:
        clauses.append("(started_at_ms, workflow_id, run_id) < (%s, %s, %s)")
        params.extend(flt.before)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _row(values: Sequence[Any]) -> WorkflowRow:
    return WorkflowRow(*values)


class VisibilityStore:
    """Reads and writes the visibility tables over one PostgreSQL connection.

    Thread-safe: calls are serialised on the connection (readers such as the web UI may
    share one store across request threads). The connection is opened lazily and again
    after it breaks; errors surface as ``psycopg.Error``.
    """

    def __init__(
        self, dsn: str, *, connect_timeout_s: float = 10.0, statement_timeout_ms: int = 30_000
    ) -> None:
        self._dsn = dsn
        self._timeout = connect_timeout_s
        self._statement_timeout_ms = statement_timeout_ms
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._lock = threading.Lock()

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=max(1, round(self._timeout)),
                row_factory=tuple_row,
                options=f"-c statement_timeout={self._statement_timeout_ms}",
                **CONNECT_OPTIONS,
            )
        return self._conn

    def close(self) -> None:
        """Close the connection, if open."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def ensure_schema(self) -> None:
        """Create the tables and their indexes if they are missing."""
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                # Two projectors starting together must not race on CREATE ... IF NOT EXISTS.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('sagaline_visibility'))")
                conn.execute(SCHEMA_SQL)

    # --- writing (the projector) ----------------------------------------------------

    def apply(
        self,
        runs: Sequence[tuple[WorkflowRow, Sequence[EventRow]]],
        tombstones: Iterable[tuple[str, int]] = (),
    ) -> int:
        """Upsert ``runs`` and archive the workflows of ``tombstones`` (workflow id, the
        tombstone's offset) in one transaction.

        A run's events are written only when its row changed, and events past its new
        count are removed (history is cut at ``max_history_events``). Returns how many
        runs changed.
        """
        archived = list(tombstones)
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                changed: set[tuple[str, str]] = set()
                if runs:
                    columns: list[list[Any]] = [[] for _ in _COLUMNS]
                    for row, _ in runs:
                        for i, name in enumerate(_COLUMNS):
                            columns[i].append(getattr(row, _FIELD.get(name, name)))
                    cur = conn.execute(_UPSERT, columns)
                    changed = {(r[0], r[1]) for r in cur.fetchall()}
                if runs:
                    conn.execute(
                        _SUPERSEDE,
                        (
                            [r.workflow_id for r, _ in runs],
                            [r.run_id for r, _ in runs],
                            [r.offset for r, _ in runs],
                            [r.started_at_ms for r, _ in runs],
                        ),
                    )
                if changed:
                    self._write_events(
                        conn, [(r, e) for r, e in runs if (r.workflow_id, r.run_id) in changed]
                    )
                if archived:
                    conn.execute(_ARCHIVE, ([wid for wid, _ in archived], [o for _, o in archived]))
        return len(changed)

    @staticmethod
    def _write_events(
        conn: psycopg.Connection[tuple[Any, ...]],
        runs: Sequence[tuple[WorkflowRow, Sequence[EventRow]]],
    ) -> None:
        conn.execute(
            _DELETE_EVENTS,
            (
                [r.workflow_id for r, _ in runs],
                [r.run_id for r, _ in runs],
                [len(events) for _, events in runs],
            ),
        )
        cols: list[list[Any]] = [[] for _ in range(9)]
        for row, events in runs:
            for e in events:
                for i, value in enumerate(
                    (
                        row.workflow_id,
                        row.run_id,
                        e.index,
                        e.kind,
                        e.at_ms,
                        e.seq,
                        e.attempt,
                        e.name,
                        json.dumps(e.detail, separators=(",", ":")),
                    )
                ):
                    cols[i].append(value)
        if cols[0]:
            conn.execute(_UPSERT_EVENTS, cols)

    # --- reading --------------------------------------------------------------------

    def list_workflows(self, flt: WorkflowFilter) -> list[WorkflowRow]:
        """Runs matching ``flt``, newest first, at most ``flt.limit``."""
        where, params = _where(flt, for_counts=False)
        sql = (
            f"{_SELECT}{where} ORDER BY started_at_ms DESC, workflow_id DESC, run_id DESC LIMIT %s"
        )
        with self._lock:
            rows = self._connection().execute(sql, [*params, flt.limit]).fetchall()
        return [_row(r) for r in rows]

    def count_by_status(self, flt: WorkflowFilter) -> dict[str, int]:
        """How many runs match ``flt`` per status (its statuses, cursor and limit aside)."""
        where, params = _where(flt, for_counts=True)
        sql = f"SELECT status, count(*) FROM sagaline_workflows{where} GROUP BY status"
        with self._lock:
            rows = self._connection().execute(sql, params).fetchall()
        return {status: int(n) for status, n in rows}

    def describe(self, workflow_id: str, run_id: str | None = None) -> WorkflowRow | None:
        """One run of ``workflow_id`` (its latest run by default), or None if unknown."""
        if run_id is None:
            sql = (
                f"{_SELECT} WHERE workflow_id = %s"
                " ORDER BY started_at_ms DESC, revision DESC LIMIT 1"
            )
            params: list[Any] = [workflow_id]
        else:
            sql = f"{_SELECT} WHERE workflow_id = %s AND run_id = %s"
            params = [workflow_id, run_id]
        with self._lock:
            found = self._connection().execute(sql, params).fetchone()
        return None if found is None else _row(found)

    def runs(self, workflow_id: str) -> list[WorkflowRow]:
        """Every run of ``workflow_id`` the tables hold, newest first."""
        sql = f"{_SELECT} WHERE workflow_id = %s ORDER BY started_at_ms DESC, run_id DESC"
        with self._lock:
            rows = self._connection().execute(sql, [workflow_id]).fetchall()
        return [_row(r) for r in rows]

    def events(self, workflow_id: str, run_id: str) -> list[EventRow]:
        """The history events of one run, in order."""
        sql = (
            "SELECT idx, kind, at_ms, seq, attempt, name, detail FROM sagaline_workflow_events"
            " WHERE workflow_id = %s AND run_id = %s ORDER BY idx"
        )
        with self._lock:
            rows = self._connection().execute(sql, [workflow_id, run_id]).fetchall()
        return [EventRow(*r) for r in rows]


# WorkflowRow's fields named differently from their columns.
_FIELD: Final = {"kafka_partition": "partition", "kafka_offset": "offset"}
