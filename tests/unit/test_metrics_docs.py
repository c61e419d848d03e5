"""docs/operations.md lists every metric sagaline exports: a metric added without a line in
its "Metrics" section is one nobody knows to watch. Every metric is defined in
``orchestrator.metrics``; this also pins that no other module defines one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.unit.metric_names import sagaline_label_names, sagaline_metrics

ROOT = Path(__file__).resolve().parents[2]
_CONSTRUCTORS = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}


def _metrics_section() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    match = re.search(r"^## Metrics\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, 'docs/operations.md has no "## Metrics" section'
    return match.group(1)


def _exported(name: str, kind: str) -> str:
    """The name as an operator queries it: counters with their ``_total``."""
    return f"{name}_total" if kind == "counter" else name


def test_every_metric_is_documented_in_the_metrics_section() -> None:
    section = _metrics_section()
    defined = sagaline_metrics()
    assert len(defined) > 30, "orchestrator.metrics defines fewer metrics than expected"
    missing = sorted(
        _exported(name, kind)
        for name, kind in defined.items()
        if f"| `{_exported(name, kind)}` | {kind} |" not in section
    )
    assert missing == [], (
        "add a row `| `name` | type | labels | meaning |` for each to the Metrics section of "
        "docs/operations.md"
    )


def test_the_metrics_section_names_no_metric_that_does_not_exist() -> None:
    exported = {_exported(name, kind) for name, kind in sagaline_metrics().items()}
    rows = set(re.findall(r"^\| `(sagaline_\w+)` \|", _metrics_section(), re.MULTILINE))
    assert rows - exported == set()


def test_every_documented_label_is_the_metrics_own() -> None:
    """Each row's labels column names exactly the metric's labels."""
    kinds = sagaline_metrics()
    labels_of = {_exported(n, kinds[n]): labels for n, labels in sagaline_label_names().items()}
    rows = re.findall(r"^\| `(sagaline_\w+)` \| \w+ \| ([^|]*) \|", _metrics_section(), re.M)
    assert rows
    for name, labels in rows:
        # Values are given in parentheses after a label: only the label names count.
        named = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", labels)))
        assert named == labels_of[name], f"{name}: documented {named}, defined {labels_of[name]}"


def test_no_module_but_orchestrator_metrics_defines_a_metric() -> None:
    """A metric defined elsewhere would escape the test above."""
    offenders = []
    for path in sorted([*ROOT.glob("orchestrator/**/*.py"), *ROOT.glob("participants/**/*.py")]):
        if path == ROOT / "orchestrator" / "metrics.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "prometheus_client"
            ):
                imported = {alias.name for alias in node.names} & _CONSTRUCTORS
                if imported:
                    offenders.append(f"{path.relative_to(ROOT)}: {sorted(imported)}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in _CONSTRUCTORS
                and isinstance(node.value, ast.Name)
                and node.value.id == "prometheus_client"
            ):
                offenders.append(f"{path.relative_to(ROOT)}: prometheus_client.{node.attr}")
    assert offenders == []
