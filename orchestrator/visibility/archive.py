"""Retention waits for the archive: closed workflows leave the history topic only once the
projector has stored their last run in PostgreSQL."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Final

from orchestrator.visibility.projection import clean
from orchestrator.visibility.store import CONNECT_OPTIONS

if TYPE_CHECKING:
    from orchestrator.runtime.inputs import RetentionHook
    from orchestrator.settings import OrchestratorSettings

log = logging.getLogger(__name__)
# The orchestrator's loop waits on this query: keep it short, and a slow database only
# postpones retention.
_STATEMENT_TIMEOUT_MS: Final = 2_000
_CONNECT_TIMEOUT_S: Final = 2
_WARN_EVERY_S: Final = 60.0
# After a failure the loop does not wait on the database again for this long: at most one
# connect timeout per period, whatever the number of partitions.
_RETRY_AFTER_S: Final = 30.0

# A run counts as archived when the projector holds its closed state. The run id pins
# the run the orchestrator is about to delete, not an earlier one of the same id.
_ARCHIVED_SQL: Final = """
SELECT w.workflow_id
  FROM sagaline_workflows w
  JOIN unnest(%(ids)s::text[], %(runs)s::text[]) AS t(workflow_id, run_id)
    ON w.workflow_id = t.workflow_id AND w.run_id = t.run_id
 WHERE w.closed_at_ms IS NOT NULL
"""


class ArchiveGate:
    """A :class:`~orchestrator.runtime.inputs.RetentionHook` that releases only the
    workflows whose closed run is in the visibility tables.

    Connects lazily and again after any error; a database that is down or slow releases
    nothing (retention waits) and is not asked again for 30 s, so the loop waits on it
    at most one connect or statement timeout (2 s) per 30 s; a warning at most once a
    minute. The message names the error's type only: libpq's text can quote the DSN.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: Any = None
        self._warned_at = 0.0
        self._retry_at = 0.0

    def release(self, partition: int, runs: Mapping[str, str]) -> Collection[str]:
        """The ids among ``runs`` whose run the projector has archived as closed."""
        import psycopg  # noqa: PLC0415 (only deployments that archive need it)

        now = time.monotonic()
        if now < self._retry_at:
            return ()  # it failed a moment ago: do not stall the loop on it again
        # The projector stores ids as clean() makes them; answer with the orchestrator's.
        ids = {clean(wid): wid for wid in runs}
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=_CONNECT_TIMEOUT_S,
                    options=f"-c statement_timeout={_STATEMENT_TIMEOUT_MS}",
                    **CONNECT_OPTIONS,
                )
            rows = self._conn.execute(
                _ARCHIVED_SQL,
                {"ids": list(ids), "runs": [clean(runs[wid]) for wid in ids.values()]},
            ).fetchall()
        except psycopg.Error as exc:
            self._drop()
            if isinstance(exc, psycopg.OperationalError):
                # Unreachable or timed out: the kind that costs the loop seconds. (A missing
                # table, before the projector's first run, is answered at once.)
                self._retry_at = time.monotonic() + _RETRY_AFTER_S
            self._warn(
                "cannot ask PostgreSQL (SAGALINE_ARCHIVE_DSN) which closed workflows are "
                f"archived ({type(exc).__name__}); retention waits and asks again in "
                f"{_RETRY_AFTER_S:g} s"
            )
            return ()
        released = [ids[row[0]] for row in rows if row[0] in ids]
        if len(released) < len(ids):
            self._warn(
                f"partition {partition}: {len(ids) - len(released)} closed workflows wait "
                "for the projector to archive them before retention deletes them"
            )
        return released

    def close(self) -> None:
        """Close the connection, if any."""
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing the archive connection failed", exc_info=True)

    def _warn(self, text: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("retention: %s", text)


def archive_gate(settings: OrchestratorSettings) -> RetentionHook | None:
    """The gate for ``SAGALINE_ARCHIVE_DSN``, or None when retention need not wait."""
    if settings.archive_dsn is None:
        return None
    return ArchiveGate(settings.archive_dsn.get_secret_value())
