"""bench.compare's pure side (bench/comparison.py): medians, ratios, CPU arithmetic, outcome
checks, the report's tables and the rewrite of docs/performance.md's generated section."""

from __future__ import annotations

from typing import Any

import pytest

from bench.comparison import (
    BEGIN,
    END,
    MISSING,
    Environment,
    Report,
    Spread,
    StateFigures,
    VariantFigures,
    backend_ticks,
    cpu_ms_per_saga,
    cpu_roles,
    floor_variant,
    half_of_peak,
    kafka_version_from_jars,
    markdown_table,
    outcome_problems,
    parse_variants,
    ratio,
    render_section,
    replace_section,
    show_ratio,
)
from bench.floor import PhaseFigures
from examples.order_saga.harness import make_orders
from orchestrator.protocol.records import WorkflowStatus

FLOOR_CPU = {
    "coordinator": 0.3,
    "inventory": 0.3,
    "payment": 0.3,
    "shipping": 0.2,
    "driver": 0.1,
    "postgres": 0.5,
    "kafka": 1.3,
}


def _run(per_second: float, p50: float = 10.0, cpu: dict[str, float] | None = None) -> PhaseFigures:
    return PhaseFigures(
        finished=100,
        per_second=per_second,
        p50_ms=p50,
        p95_ms=p50 * 2,
        p99_ms=p50 * 3,
        cpu_ms=dict(cpu or {}),
    )


def _variant(rates: tuple[float, ...], p50: float, cpu: dict[str, float]) -> VariantFigures:
    return VariantFigures(
        burst=tuple(_run(r, p50, cpu) for r in rates),
        low=tuple(_run(20.0, p50) for _ in rates),
        half_rate=sorted(rates)[len(rates) // 2] / 2,
        half=tuple(_run(r / 2, p50 * 2) for r in rates),
    )


ENVIRONMENT = Environment(
    date="2025-01-02 03:04 UTC",
    cores=2,
    memory_gib=23.5,
    load=(0.1, 0.2, 0.3),
    kafka="4.3.1",
    postgres="15.18",
    confluent_kafka="2.16.1",
    librdkafka="2.16.0",
    python="3.11.7",
    commit="0f65042f5546",
    dirty=True,
    command="python3 -m bench.compare --repeat 3",
)


def _report(variants: dict[str, VariantFigures], state: StateFigures | None = None) -> Report:
    return Report(
        environment=ENVIRONMENT,
        repeat=3,
        burst=1000,
        low_rate=20.0,
        seconds=15.0,
        partitions=4,
        variants=variants,
        state=state,
        load_end=(1.5, 1.0, 0.5),
    )


FLOOR = _variant((500.0, 600.0, 700.0), 20.0, FLOOR_CPU)
REMOTE = _variant(
    (100.0, 150.0, 160.0),
    40.0,
    {
        "orchestrator": 2.0,
        "inventory": 1.0,
        "payment": 1.0,
        "shipping": 1.0,
        "client": 0.5,
        "postgres": 1.5,
        "kafka": 3.0,
    },
)
LOCAL = _variant((300.0, 300.0, 300.0), 30.0, {"orchestrator": 2.0, "client": 0.5, "kafka": 1.5})
STATE = StateFigures(
    partitions=12,
    failover_workflows=1000,
    failover_s=(2.0, 2.5, 3.0),
    memory_workflows=20_000,
    open_kib=(1.4, 1.5, 1.6),
    closed_kib=(3.0, 3.1, 3.2),
)


def _lines_with(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def _prose(text: str) -> str:
    """The text with its wrapping undone."""
    return " ".join(text.split())


# --- arguments and arithmetic -------------------------------------------------------------


def test_variants_come_in_the_reports_order_whatever_order_they_are_given() -> None:
    assert parse_variants("local, floor") == ("floor", "local")
    assert parse_variants("remote,remote,") == ("remote",)
    assert parse_variants("local2,local") == ("local", "local2")


@pytest.mark.parametrize("text", ["", " , ", "floor,sagaline"])
def test_no_or_unknown_variants_are_refused_with_the_choices(text: str) -> None:
    with pytest.raises(ValueError, match="floor, remote, local, local2"):
        parse_variants(text)


def test_a_spread_is_the_median_and_the_range() -> None:
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0)
    assert Spread.of([1.0, 4.0]).median == 2.5
    assert Spread.of([3.0, 1.0, 2.0]).show(1) == "2.0 (1.0-3.0)"
    assert Spread.of([2.0, 2.0]).show(2) == "2.00"


def test_a_spread_of_nothing_is_an_error_not_a_zero() -> None:
    with pytest.raises(ValueError, match="no values"):
        Spread.of([])


def test_a_ratio_is_of_medians_and_absent_without_a_floor() -> None:
    assert ratio(Spread.of([1.0, 2.0, 9.0]), Spread.of([4.0])) == pytest.approx(0.5)
    assert ratio(Spread.of([1.0]), None) is None
    assert ratio(None, Spread.of([1.0])) is None
    assert ratio(Spread.of([1.0]), Spread.of([0.0])) is None
    assert show_ratio(None) == MISSING
    assert show_ratio(0.214) == "0.21"


def test_half_of_peak_is_half_the_median_burst_throughput() -> None:
    assert half_of_peak([_run(100.0), _run(300.0), _run(200.0)]) == 100.0


def test_cpu_per_saga_is_the_tick_difference_in_ms_over_the_sagas() -> None:
    before = {"orchestrator": 100, "client": 10}
    after = {"orchestrator": 300, "client": 10, "kafka": 50}
    cpu = cpu_ms_per_saga(before, after, sagas=1000, ticks_per_second=100)
    assert cpu == {"orchestrator": 2.0, "client": 0.0, "kafka": 0.5}


def test_backends_that_appear_count_from_zero_and_ended_ones_are_lost() -> None:
    before = {11: 100, 12: 50}
    after = {11: 130, 13: 7}  # 12 ended, 13 is a new pool connection
    assert backend_ticks(before, after) == 30 + 7


def test_the_floors_process_names_map_to_sagalines_roles() -> None:
    roles = cpu_roles(_run(1.0, cpu=FLOOR_CPU))
    assert roles["orchestrator"] == 0.3
    assert roles["client"] == 0.1
    assert "coordinator" not in roles
    assert "driver" not in roles


def test_the_floors_phases_are_found_by_benchs_floor_labels() -> None:
    bursts = [_run(500.0), _run(600.0), _run(700.0)]
    low = [_run(20.0)]
    half = [_run(300.0)]
    found = floor_variant(
        {"burst of 1000": bursts, "20 starts/s": low, "300 starts/s": half}, 1000, 20.0
    )
    assert found == VariantFigures(tuple(bursts), tuple(low), 300.0, tuple(half))


def test_a_missing_floor_phase_names_the_label_it_looked_for() -> None:
    with pytest.raises(ValueError, match=r"'20 starts/s'"):
        floor_variant({"burst of 1000": [_run(600.0)]}, 1000, 20.0)


# --- outcomes -----------------------------------------------------------------------------


def test_declined_orders_must_compensate_and_the_others_complete() -> None:
    orders = make_orders(10, declined_every=10, run_id="t")
    statuses = {o["order_id"]: WorkflowStatus.COMPLETED for o in orders}
    statuses[orders[9]["order_id"]] = WorkflowStatus.COMPENSATED
    assert outcome_problems(orders, statuses) == []


def test_wrong_and_missing_outcomes_are_each_named_with_the_workflow_id() -> None:
    orders: list[dict[str, Any]] = make_orders(10, declined_every=10, run_id="t")
    statuses = {o["order_id"]: WorkflowStatus.COMPLETED for o in orders[1:]}
    problems = outcome_problems(orders, statuses)
    assert problems == [
        f"{orders[0]['order_id']}: not finished, expected COMPLETED",
        f"{orders[9]['order_id']}: ended COMPLETED, expected COMPENSATED",
    ]


# --- versions -----------------------------------------------------------------------------


def test_the_brokers_version_comes_from_its_server_jar() -> None:
    jars = ["kafka-clients-4.3.1.jar", "kafka-server-4.3.1.jar", "kafka_2.13-4.3.1.jar"]
    assert kafka_version_from_jars(jars) == "4.3.1"
    assert kafka_version_from_jars(["kafka-clients-4.3.1.jar", "kafka-server-4.2.0.jar"]) == (
        "4.2.0"
    )
    assert kafka_version_from_jars(["kafka_2.13-4.3.1-test.jar", "zstd-jni-1.5.jar"]) is None


# --- tables and the section ---------------------------------------------------------------


def test_a_table_row_must_be_as_wide_as_its_header() -> None:
    assert markdown_table(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    with pytest.raises(ValueError, match="2 cells, the header 3"):
        markdown_table(["a", "b", "c"], [["1", "2"]])


def test_the_section_holds_every_variant_and_its_ratios_to_the_floor() -> None:
    text = render_section(_report({"floor": FLOOR, "remote": REMOTE, "local": LOCAL}, STATE))
    assert _lines_with(text, "| process |") == [
        "| process | floor | remote | local | remote / floor | local / floor |"
    ]
    (burst,) = _lines_with(text, "| burst of 1000")
    assert burst == (
        "| burst of 1000, sagas/s | 600.0 (500.0-700.0) | 150.0 (100.0-160.0) | 300.0 | "
        "0.25 | 0.50 |"
    )
    # Processes the local variant does not run are missing, not zero; only totals compare.
    (payment,) = _lines_with(text, "| payment participant")
    assert payment == "| payment participant | 0.30 | 1.00 | — |  |  |"
    (coordinator,) = _lines_with(text, "| orchestrator / coordinator")
    assert coordinator == "| orchestrator / coordinator | 0.30 | 2.00 | 2.00 |  |  |"
    (total,) = _lines_with(text, "| total")
    assert total == "| total | 3.00 | 10.00 | 4.00 | 3.33 | 1.33 |"
    # p50 at the fixed rate, then at half of each peak (twice the ms in these figures).
    assert _lines_with(text, "| p50, ms") == [
        "| p50, ms | 20 | 40 | 30 | 2.00 | 1.50 |",
        "| p50, ms | 40 | 80 | 60 | 2.00 | 1.50 |",
    ]
    prose = _prose(text)
    assert "Half of the variant's median burst throughput: floor 300/s, remote 75/s" in prose
    assert "| kill -9 of one of two orchestrators" in text
    assert "| 2.50 (2.00-3.00) |" in text
    for fact in ("Kafka 4.3.1", "PostgreSQL 15.18", "librdkafka 2.16.0", "Python 3.11.7"):
        assert fact in prose
    assert "0f65042f5546 (with uncommitted changes)" in prose
    assert "0.10/0.20/0.30 at the start, 1.50/1.00/0.50 at the end" in prose
    assert "`python3 -m bench.compare --repeat 3`" in prose


def test_the_scaled_out_local_variant_is_a_column_of_its_own_with_its_note() -> None:
    text = render_section(_report({"floor": FLOOR, "local": LOCAL, "local2": LOCAL}, STATE))
    assert _lines_with(text, "| process |") == [
        "| process | floor | local | local2 | local / floor | local2 / floor |"
    ]
    assert "two orchestrator processes sharing the workflow partitions" in _prose(text)


def test_prose_is_wrapped_and_tables_are_not() -> None:
    text = render_section(_report({"floor": FLOOR, "remote": REMOTE, "local": LOCAL}, STATE))
    for line in text.splitlines():
        if not line.startswith(("|", "#")):
            assert len(line) <= 92, line
    assert any(len(line) > 92 for line in text.splitlines() if line.startswith("|"))


def test_without_the_floor_there_are_no_ratio_columns_and_without_state_no_state() -> None:
    text = render_section(_report({"remote": REMOTE}))
    assert _lines_with(text, "| process |") == ["| process | remote |"]
    assert "/ floor |" not in text
    assert "failover" not in text
    assert "**floor**" not in text


DOC = """# Performance

All figures come from `bin/bench` on the
development machine.

`bin/bench` runs two benchmarks.

## Older figures

| a | b |
"""


def test_the_markers_go_in_right_after_the_first_paragraph() -> None:
    updated = replace_section(DOC, "## Generated\n\nfigures\n")
    assert updated == DOC.replace(
        "development machine.\n\n",
        f"development machine.\n\n{BEGIN}\n## Generated\n\nfigures\n{END}\n\n",
    )


def test_a_second_run_replaces_only_what_is_between_the_markers() -> None:
    once = replace_section(DOC, "first\n")
    twice = replace_section(once, "second\n")
    assert twice == replace_section(DOC, "second\n")
    assert "first" not in twice
    assert twice.count(BEGIN) == twice.count(END) == 1
    assert replace_section(twice, "second\n") == twice


def test_a_document_of_one_paragraph_gets_the_section_at_its_end() -> None:
    assert replace_section("# T\n\ntext", "body") == f"# T\n\ntext\n\n{BEGIN}\nbody\n{END}\n"


@pytest.mark.parametrize(
    "doc",
    [f"{BEGIN}\n", f"{END}\n{BEGIN}\n", f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n", f"x\n{END}\n"],
)
def test_broken_markers_are_refused_rather_than_guessed_at(doc: str) -> None:
    with pytest.raises(ValueError, match="mend them by hand"):
        replace_section(doc, "body")
