"""Orchestrator processes as the benchmark sees them: started, waited on, measured.

Everything here reads what a process exposes to an operator (its log, /proc, the consumer
group), never its internals, so the same code measures today's runtime and its rewrite.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient

from examples.order_saga.harness import SagalineProcess, orchestrator_process

from .workflows import APP

T = TypeVar("T")

# Today's runtime: one line per partition, each with the whole batch's seconds.
_OLD_LINE: Final = re.compile(r"restored partition=(\d+) (.*)")
# The rewrite: one line per restore batch.
_NEW_LINE: Final = re.compile(r"restore done partitions=(\[[^\]]*\]|\S+)(.*)")
_FIELD: Final = re.compile(r"(\w+)=(\S+)")


class BenchError(RuntimeError):
    """A condition the benchmark waits for did not come about."""


def orchestrator(
    env: Mapping[str, str], log_dir: Path, instance: str, **settings: str
) -> SagalineProcess:
    """``sagaline orchestrator bench.workflows:registry`` as SAGALINE_INSTANCE_ID ``instance``."""
    process = orchestrator_process(env, log_dir, instance, **settings)
    return dataclasses.replace(process, args=["orchestrator", APP])


def wait_until(
    condition: Callable[[], T | None],
    *,
    deadline_s: float,
    what: str,
    step: Callable[[], object] | None = None,
    processes: Iterable[SagalineProcess] = (),
    every_s: float = 0.05,
) -> T:
    """Call ``step`` and, at most every ``every_s``, ``condition`` until it returns a value.

    Without a ``step`` the loop sleeps ``every_s`` between checks.

    Raises:
        BenchError: the deadline passed, or one of ``processes`` exited meanwhile.
    """
    watched = list(processes)
    end = time.monotonic() + deadline_s
    checked = 0.0
    while True:
        if step is None:
            time.sleep(every_s)  # pacing the check, not waiting for the system
        else:
            step()
            if time.monotonic() - checked < every_s:
                continue
        checked = time.monotonic()
        value = condition()
        if value is not None:
            return value
        for process in watched:
            if not process.alive():
                code = process.proc.returncode if process.proc else None
                raise BenchError(
                    f"waiting for {what}: {process.name} exited ({code}); its log ends:\n"
                    f"{process.tail(30)}"
                )
        if time.monotonic() > end:
            tails = "".join(f"\n--- {p.name}:\n{p.tail(15)}" for p in watched)
            raise BenchError(f"{what}: not reached within {deadline_s:.0f} s{tails}")


# --- the log ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestoreReport:
    """What an orchestrator's log says about its restores since a point in time."""

    seconds: float  # summed over restore batches
    batches: int
    partitions: frozenset[int]
    records: int
    workflows: int
    open: int | None
    closed: int | None
    style: str  # "per-partition" (today) or "per-batch" (the rewrite)


def parse_restore(text: str) -> RestoreReport | None:
    """Restore figures from log text; None if it holds no restore line.

    ``restore done partitions=[...] ...`` lines (the rewrite) are one per batch and win when
    present. Today's ``restored partition=P ... seconds=S`` lines carry the whole batch's
    time on each partition's line, so a batch's seconds are counted once (lines of one
    batch are consecutive and share their seconds).
    """
    lines = text.splitlines()
    return _per_batch(lines) or _per_partition(lines)


def _per_batch(lines: list[str]) -> RestoreReport | None:
    found = [
        (m.group(1), dict(_FIELD.findall(m.group(2)))) for m in map(_NEW_LINE.search, lines) if m
    ]
    if not found:
        return None

    def total(name: str) -> int:
        return sum(int(fields.get(name, "0")) for _, fields in found)

    def optional(name: str) -> int | None:
        return total(name) if all(name in fields for _, fields in found) else None

    return RestoreReport(
        seconds=sum(float(fields.get("seconds", "0")) for _, fields in found),
        batches=len(found),
        partitions=frozenset(int(p) for listed, _ in found for p in re.findall(r"\d+", listed)),
        records=total("records"),
        workflows=total("workflows"),
        open=optional("open"),
        closed=optional("closed"),
        style="per-batch",
    )


def _per_partition(lines: list[str]) -> RestoreReport | None:
    batches: list[float] = []
    partitions: set[int] = set()
    records = workflows = running = 0
    last: str | None = None
    for line in lines:
        match = _OLD_LINE.search(line)
        if match is None:
            last = None
            continue
        fields = dict(_FIELD.findall(match.group(2)))
        partitions.add(int(match.group(1)))
        seconds = fields.get("seconds", "0")
        if seconds != last:
            batches.append(float(seconds))
            last = seconds
        records += int(fields.get("records", "0"))
        workflows += int(fields.get("workflows", "0"))
        running += int(fields.get("running", "0"))
    if not partitions:
        return None
    return RestoreReport(
        seconds=sum(batches),
        batches=len(batches),
        partitions=frozenset(partitions),
        records=records,
        workflows=workflows,
        open=running,
        closed=workflows - running,
        style="per-partition",
    )


class LogCursor:
    """The part of a process's log written after the cursor was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def text(self) -> str:
        """Log text since the cursor."""
        if not self.path.exists():
            return ""
        with self.path.open("rb") as log:
            log.seek(self.offset)
            return log.read().decode(errors="replace")


# --- memory ----------------------------------------------------------------------------


def rss_kib(process: SagalineProcess) -> int:
    """VmRSS of the process, KiB."""
    assert process.proc is not None
    for line in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"{process.name}: no VmRSS in /proc/{process.proc.pid}/status")


def stable_rss_kib(
    process: SagalineProcess,
    *,
    readings: int = 3,
    interval_s: float = 0.5,
    tolerance_kib: int = 256,
    deadline_s: float = 60.0,
) -> int:
    """RSS once ``readings`` readings ``interval_s`` apart differ by at most ``tolerance_kib``.

    Returns the last reading.
    """
    seen: list[int] = []

    def settled() -> int | None:
        seen.append(rss_kib(process))
        recent = seen[-readings:]
        if len(recent) == readings and max(recent) - min(recent) <= tolerance_kib:
            return recent[-1]
        return None

    try:
        return wait_until(
            settled,
            deadline_s=deadline_s,
            what=f"{process.name}: resident memory stable",
            processes=[process],
            every_s=interval_s,
        )
    except BenchError as exc:
        raise BenchError(
            f"{exc} (wanted {readings} readings {interval_s} s apart within {tolerance_kib} KiB; "
            f"last readings in KiB: {seen[-2 * readings :]})"
        ) from exc


# --- the consumer group ----------------------------------------------------------------


def group_owners(admin: AdminClient, group: str, topic: str) -> dict[int, str] | None:
    """Owner (group.instance.id, else client id) of each partition of ``topic``.

    None while the group is not stable.
    """
    try:
        description = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    except Exception:  # a group being created or rebalancing answers with errors too
        return None
    if description.state != ConsumerGroupState.STABLE:
        return None
    owners: dict[int, str] = {}
    for member in description.members:
        name = member.group_instance_id or member.client_id
        for tp in member.assignment.topic_partitions:
            if tp.topic == topic:
                owners[tp.partition] = name
    return owners


def settled_owners(
    admin: AdminClient, group: str, topic: str, members: set[str], partitions: int
) -> dict[int, str] | None:
    """The owners once exactly ``members`` share all ``partitions``, each with some."""
    owners = group_owners(admin, group, topic)
    if owners is None or len(owners) != partitions or set(owners.values()) != members:
        return None
    return owners
