"""The figures ``bench.compare`` gathers and the report it writes: pure, no I/O.

Rules: this module knows runs (one :class:`~bench.floor.PhaseFigures` per measured batch of
sagas), medians, ratios and markdown. It never starts a process, reads /proc or a clock,
or talks to Kafka or PostgreSQL: bench/compare.py measures and hands the figures in, so
everything here is tested without a broker (tests/unit/test_compare.py).
"""

from __future__ import annotations

import re
import statistics
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from examples.order_saga.harness import expected_status
from orchestrator.protocol.records import WorkflowStatus

from .floor import PhaseFigures

VARIANTS: Final = ("floor", "remote", "local", "local2")
SAGALINE_VARIANTS: Final = ("remote", "local", "local2")
# What each variant runs, for the report's reader.
VARIANT_NOTES: Final = {
    "floor": (
        "`bench/floor.py`: the order saga's shape on plain confluent-kafka and psycopg, a "
        "transactional coordinator and three participant processes that insert a row per task"
    ),
    "remote": (
        "sagaline, the order saga (`order.process`) through one orchestrator and three "
        "participant processes (inventory, payment, shipping); each run also audits the "
        "participants' rows"
    ),
    "local": (
        "sagaline, `order.local`: the same saga with its steps as local activities, run "
        "inside the one orchestrator process (no participant processes); its steps only "
        "compute and write no rows, so it does less than the other two"
    ),
    "local2": (
        "sagaline, `order.local` as in `local`, on two orchestrator processes sharing the "
        "workflow partitions (how a deployment scales out: one Python thread per process "
        "bounds one orchestrator); its orchestrator row is both processes' CPU"
    ),
}
# The processes whose CPU is reported, in the tables' order, with their row labels.
CPU_ROWS: Final = (
    ("orchestrator", "orchestrator / coordinator"),
    ("inventory", "inventory participant"),
    ("payment", "payment participant"),
    ("shipping", "shipping participant"),
    ("postgres", "PostgreSQL backends"),
    ("kafka", "Kafka broker"),
    ("client", "benchmark client"),
)
# bench.floor names two processes differently from sagaline's roles.
FLOOR_ROLES: Final = {"coordinator": "orchestrator", "driver": "client"}
BEGIN: Final = "<!-- bench-compare:begin -->"
END: Final = "<!-- bench-compare:end -->"
MISSING: Final = "—"
# Prose lines of the section are wrapped as docs/performance.md's own text is.
WIDTH: Final = 92


def parse_variants(text: str) -> tuple[str, ...]:
    """The variants named in ``text`` (comma-separated), in the report's order.

    Raises:
        ValueError: an unknown name, or none at all.
    """
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if not names:
        raise ValueError(f"no variant given; choose from {', '.join(VARIANTS)}")
    return tuple(v for v in VARIANTS if v in names)


# --- medians and ratios ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spread:
    """The median of some runs' values and their range."""

    median: float
    low: float
    high: float

    @staticmethod
    def of(values: Iterable[float]) -> Spread:
        """The spread of ``values``.

        Raises:
            ValueError: no values (a figure from no run is no figure).
        """
        seen = list(values)
        if not seen:
            raise ValueError("a spread of no values")
        return Spread(statistics.median(seen), min(seen), max(seen))

    def show(self, digits: int) -> str:
        """``median (low-high)``, or the median alone when every run read the same."""
        if self.low == self.high:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def ratio(value: Spread | None, floor: Spread | None) -> float | None:
    """``value``'s median over the floor's, or None when either is missing or the floor's is 0."""
    if value is None or floor is None or floor.median <= 0:
        return None
    return value.median / floor.median


def show_ratio(value: float | None) -> str:
    """A ratio as the tables print it."""
    return MISSING if value is None else f"{value:.2f}"


def half_of_peak(burst: Sequence[PhaseFigures]) -> float:
    """The second load of issue 16: half the median burst throughput (as bench.floor does)."""
    return statistics.median(r.per_second for r in burst) / 2


def cpu_roles(run: PhaseFigures) -> dict[str, float]:
    """A run's CPU ms per saga by role, with bench.floor's process names mapped to roles."""
    return {FLOOR_ROLES.get(name, name): ms for name, ms in run.cpu_ms.items()}


# --- what was measured ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VariantFigures:
    """One variant's runs: bursts, then the fixed rate, then half of its own peak."""

    burst: tuple[PhaseFigures, ...]
    low: tuple[PhaseFigures, ...]
    half_rate: float
    half: tuple[PhaseFigures, ...]


def floor_variant(
    results: Mapping[str, Sequence[PhaseFigures]], burst: int, low_rate: float
) -> VariantFigures:
    """The floor's figures out of ``bench.floor.run``'s results (keyed by its phase labels),
    run with ``--rates <low_rate>,half``.

    Raises:
        ValueError: a phase is missing (the labels say which).
    """
    bursts = _phase(results, f"burst of {burst}")
    half = half_of_peak(bursts)
    return VariantFigures(
        burst=bursts,
        low=_phase(results, f"{low_rate:.0f} starts/s"),
        half_rate=half,
        # bench.floor labels a rate by its rounded value; if both rates round alike, the
        # later (half) phase is what the label holds, which is still a run at that rate.
        half=_phase(results, f"{half:.0f} starts/s"),
    )


def _phase(results: Mapping[str, Sequence[PhaseFigures]], label: str) -> tuple[PhaseFigures, ...]:
    runs = tuple(results.get(label, ()))
    if not runs:
        raise ValueError(f"bench.floor returned no {label!r} phase (it has {sorted(results)})")
    return runs


def cpu_ms_per_saga(
    before: Mapping[str, int], after: Mapping[str, int], sagas: int, ticks_per_second: int
) -> dict[str, float]:
    """CPU ms per saga by role between two readings of clock ticks (roles of ``after``)."""
    return {
        role: (ticks - before.get(role, 0)) * 1000 / ticks_per_second / sagas
        for role, ticks in after.items()
    }


def outcome_problems(
    orders: Sequence[Mapping[str, Any]], statuses: Mapping[str, WorkflowStatus]
) -> list[str]:
    """What is wrong with the sagas of ``orders``, given the terminal status of each one that
    finished: a declined card must end COMPENSATED, any other order COMPLETED."""
    problems = []
    for order in orders:
        wid, wanted = order["order_id"], expected_status(order)
        got = statuses.get(wid)
        if got is None:
            problems.append(f"{wid}: not finished, expected {wanted.value}")
        elif got is not wanted:
            problems.append(f"{wid}: ended {got.value}, expected {wanted.value}")
    return problems


def backend_ticks(before: Mapping[int, int], after: Mapping[int, int]) -> int:
    """Ticks the PostgreSQL backends ``after`` lists used since ``before``.

    A backend that appeared in between (a pool opening a connection) counts from zero; one
    that ended in between is not in ``after`` and its ticks are lost, so pools that keep
    their connections are what makes this figure whole.
    """
    return sum(ticks - before.get(pid, 0) for pid, ticks in after.items())


@dataclass(frozen=True, slots=True)
class StateFigures:
    """sagaline's own figures, which the floor has no counterpart for."""

    partitions: int
    failover_workflows: int
    failover_s: tuple[float, ...]  # per kill -9: until the victim's partitions flow again
    memory_workflows: int
    open_kib: tuple[float, ...]  # resident memory per idle open workflow, per restart
    closed_kib: tuple[float, ...]  # the same, recently closed workflows


@dataclass(frozen=True, slots=True)
class Environment:
    """Where and with what the figures were taken."""

    date: str
    cores: int
    memory_gib: float
    load: tuple[float, float, float]
    kafka: str
    postgres: str
    confluent_kafka: str
    librdkafka: str
    python: str
    commit: str
    dirty: bool
    command: str


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one ``bench.compare`` run found."""

    environment: Environment
    repeat: int
    burst: int
    low_rate: float
    seconds: float
    partitions: int
    variants: Mapping[str, VariantFigures]
    state: StateFigures | None = None
    load_end: tuple[float, float, float] | None = None  # other work may start meanwhile


def kafka_version_from_jars(names: Iterable[str]) -> str | None:
    """The broker's version from the file names on its class path, or None.

    ``kafka_2.13-4.3.1.jar`` (the server jar, named after its Scala build) wins; a
    ``kafka-server-4.3.1.jar`` does otherwise.
    """
    listed = sorted(names)
    for pattern in (r"kafka_[0-9.]+-(\d[\w.-]*)\.jar", r"kafka-server-(\d[\w.-]*)\.jar"):
        for name in listed:
            match = re.fullmatch(pattern, name)
            if match and not match.group(1).endswith(("-test", "-sources", "-javadoc")):
                return match.group(1)
    return None


# --- tables ------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table's lines.

    Raises:
        ValueError: a row's width differs from the header's.
    """
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)} has {len(row)} cells, the header {len(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


Figure = Callable[[VariantFigures], Spread | None]


class Tables:
    """The report's tables: a column per variant run, then each sagaline variant / floor."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.columns = [v for v in VARIANTS if v in report.variants]
        floor = "floor" in report.variants
        self.ratios = [v for v in self.columns if v != "floor"] if floor else []

    def header(self, first: str) -> list[str]:
        """The first column's title, the variants, the ratios."""
        return [first, *self.columns, *(f"{v} / floor" for v in self.ratios)]

    def row(self, label: str, figure: Figure, digits: int, *, compared: bool) -> list[str]:
        """One figure across the variants; ``compared`` adds its ratios to the floor's."""
        spreads = {v: figure(self.report.variants[v]) for v in self.columns}
        cells = [label]
        cells += [MISSING if s is None else s.show(digits) for s in spreads.values()]
        floor = spreads.get("floor")
        cells += [show_ratio(ratio(spreads[v], floor)) if compared else "" for v in self.ratios]
        return cells

    def throughput(self) -> list[str]:
        """Burst throughput."""

        def rate(figures: VariantFigures) -> Spread:
            return Spread.of(r.per_second for r in figures.burst)

        label = f"burst of {self.report.burst}, sagas/s"
        return markdown_table(self.header(""), [self.row(label, rate, 1, compared=True)])

    def cpu(self) -> list[str]:
        """CPU ms per saga over the bursts, per process and in all."""

        def role(name: str) -> Figure:
            def figure(figures: VariantFigures) -> Spread | None:
                values = [cpu_roles(r).get(name) for r in figures.burst]
                present = [v for v in values if v is not None]
                return Spread.of(present) if present else None

            return figure

        def total(figures: VariantFigures) -> Spread:
            return Spread.of(sum(r.cpu_ms.values()) for r in figures.burst)

        rows = [
            self.row(label, role(name), 2, compared=False)
            for name, label in CPU_ROWS
            if any(name in cpu_roles(r) for f in self.report.variants.values() for r in f.burst)
        ]
        rows.append(self.row("total", total, 2, compared=True))
        return markdown_table(self.header("process"), rows)

    def latency(self, runs: Callable[[VariantFigures], Sequence[PhaseFigures]]) -> list[str]:
        """Latency from start published to saga closed, and the throughput achieved."""

        def achieved(figures: VariantFigures) -> Spread:
            return Spread.of(r.per_second for r in runs(figures))

        def quantile(q: str) -> Figure:
            def figure(figures: VariantFigures) -> Spread:
                return Spread.of(getattr(r, f"{q}_ms") for r in runs(figures))

            return figure

        rows = [self.row("sagas/s achieved", achieved, 1, compared=False)]
        rows += [self.row(f"{q}, ms", quantile(q), 0, compared=True) for q in ("p50", "p95", "p99")]
        return markdown_table(self.header(""), rows)

    def half_rates(self) -> list[str]:
        """The rate each variant ran at for its half-peak latency."""
        return [f"{v} {self.report.variants[v].half_rate:.0f}/s" for v in self.columns]

    def state(self, state: StateFigures) -> list[str]:
        """sagaline's failover and memory figures (no floor counterpart)."""
        rows = [
            [
                f"kill -9 of one of two orchestrators until its partitions flow again, s "
                f"({state.failover_workflows:,} open workflows, "
                f"{_count(state.failover_s, 'kill')})",
                MISSING,
                Spread.of(state.failover_s).show(2),
            ],
            [
                f"resident memory per idle open workflow, KiB ({state.memory_workflows:,})",
                MISSING,
                Spread.of(state.open_kib).show(2),
            ],
            [
                f"resident memory per recently closed workflow, KiB ({state.memory_workflows:,})",
                MISSING,
                Spread.of(state.closed_kib).show(2),
            ],
        ]
        return markdown_table(["", "floor", "sagaline"], rows)


def render_section(report: Report) -> str:
    """The generated section of docs/performance.md (without its markers)."""
    env = report.environment
    tables = Tables(report)
    load = f"{_load(env.load)} at the start"
    if report.load_end is not None:
        load += f", {_load(report.load_end)} at the end"
    tree = "with uncommitted changes" if env.dirty else "clean tree"
    lines = [
        "## Floor and sagaline side by side (generated)",
        "",
        "Written by `bin/bench compare` (bench/compare.py), which rewrites everything between "
        "this section's markers: change the code, not the text.",
        "",
        f"- date: {env.date}",
        f"- machine: {env.cores} cores, {env.memory_gib:.1f} GiB memory, load average {load}",
        f"- versions: Kafka {env.kafka}, PostgreSQL {env.postgres}, confluent-kafka "
        f"{env.confluent_kafka} (librdkafka {env.librdkafka}), Python {env.python}, sagaline "
        f"{env.commit} ({tree})",
        f"- command: `{env.command}`",
        "",
        "The variants, one after the other on the same broker and PostgreSQL, each on fresh "
        f"topics with {report.partitions} partitions:",
        "",
        *(f"- **{v}**: {VARIANT_NOTES[v]};" for v in tables.columns),
        "",
        f"Each figure is the median of {report.repeat} runs with (min-max), or the one "
        "value when every run read the same; a ratio is the "
        "variant's median over the floor's. A declined card (every tenth order) ends "
        "COMPENSATED, every other order COMPLETED; each run checks every saga ended so. "
        "Latency runs from the start published to the saga's closing record's Kafka "
        "timestamp (when it was produced, at the commit that makes it visible; the floor "
        "stamps its done record the same way), and throughput from the first start to the "
        f"last of those; a rate run lasts {report.seconds:g} s.",
        "",
        f"### Burst throughput ({report.burst} starts published at once)",
        "",
        *tables.throughput(),
        "",
        "### CPU ms per saga over the burst",
        "",
        "User and system time from `/proc/<pid>/stat` per process, divided by the sagas of "
        "the burst; the PostgreSQL backends are those of the measured processes' "
        "connections, the benchmark client is the process publishing starts and reading "
        "outcomes.",
        "",
        *tables.cpu(),
        "",
        f"### Latency at {report.low_rate:g} starts/s",
        "",
        *tables.latency(lambda f: f.low),
        "",
        "### Latency at half of each variant's peak",
        "",
        f"Half of the variant's median burst throughput: {', '.join(tables.half_rates())}.",
        "",
        *tables.latency(lambda f: f.half),
    ]
    if report.state is not None:
        state = report.state
        lines += [
            "",
            "### sagaline only: failover and memory",
            "",
            "From `bench/failover.py` and `bench/state.py`'s memory section, on "
            f"{state.partitions} partitions with orchestrators only: the orchestrator is the "
            "same program in every sagaline variant, so these are measured once. Failover: "
            "from kill -9 of one of two instances until a probe closes on every partition it "
            "owned. Memory: VmRSS after a restart over that many restored workflows, minus an "
            "empty history's.",
            "",
            *tables.state(state),
        ]
    return "\n".join(_wrap(line) for line in lines) + "\n"


def _wrap(line: str) -> str:
    if not line or line.startswith(("|", "#")):
        return line  # tables and headings stay on one line
    return textwrap.fill(
        line,
        WIDTH,
        subsequent_indent="  " if line.startswith("- ") else "",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _count(values: Sequence[float], noun: str) -> str:
    return f"{len(values)} {noun}{'' if len(values) == 1 else 's'}"


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)  # one word: wrapping keeps it whole


# --- the document ------------------------------------------------------------------------


def replace_section(doc: str, body: str) -> str:
    """``doc`` with ``body`` between the markers; markers absent, they go in (with ``body``)
    right after the document's first paragraph (the first text under its title).

    Raises:
        ValueError: the markers are there but not exactly once each, in order.
    """
    begins, ends = doc.count(BEGIN), doc.count(END)
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if begins == ends == 1 and doc.index(BEGIN) < doc.index(END):
        head, rest = doc.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    if begins or ends:
        raise ValueError(
            f"the document has {begins} {BEGIN} and {ends} {END} markers, not one of each in "
            "that order: mend them by hand (delete both to have them put back)"
        )
    lines = doc.splitlines(keepends=True)
    index = 0
    # Skip the title and the blank lines before the first paragraph, then the paragraph.
    while index < len(lines) and (not lines[index].strip() or lines[index].startswith("#")):
        index += 1
    while index < len(lines) and lines[index].strip():
        index += 1
    head = "".join(lines[:index])
    if head and not head.endswith("\n"):
        head += "\n"
    tail = "".join(lines[index:]).lstrip("\n")
    return f"{head}\n{block}\n" + (f"\n{tail}" if tail else "")
