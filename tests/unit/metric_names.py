"""What the metrics tests share: the names sagaline exports, and the metric names a PromQL
expression reads.

Every sagaline metric is defined in ``orchestrator.metrics`` (participants, the Celery
integration and the projector import it); ``test_metrics_docs`` pins that no other module
defines one.
"""

from __future__ import annotations

import re

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from orchestrator import metrics

# The sample names each metric type adds to its family's name.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
# Series Prometheus itself adds to every target.
SCRAPE_SERIES = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)


def sagaline_metrics() -> dict[str, str]:
    """Every metric ``orchestrator.metrics`` defines: the name it is exported under
    (without its type's suffixes) -> its type."""
    found: dict[str, str] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                found[family.name] = family.type
    return found


def sagaline_label_names() -> dict[str, frozenset[str]]:
    """Every metric ``orchestrator.metrics`` defines -> its label names (prometheus_client
    has no public accessor for them)."""
    found: dict[str, frozenset[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                found[family.name] = frozenset(value._labelnames)
    return found


def sample_names() -> frozenset[str]:
    """Every series name a sagaline process can export (prometheus_client's own process
    and Python collectors included), and the series Prometheus adds to each scrape."""
    names = set(SCRAPE_SERIES)
    # A labelled metric without children yet has no samples: names come from the types.
    families = {family.name: family.type for family in REGISTRY.collect()}
    for name, kind in {**families, **sagaline_metrics()}.items():
        names.update(name + suffix for suffix in _SUFFIXES.get(kind, ("",)))
    return frozenset(names)


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_OFFSETS = re.compile(r"\boffset\s+-?[0-9a-z$_]+", re.IGNORECASE)
_NUMBERS = re.compile(r"(?<![\w:])[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?(?![\w:])", re.IGNORECASE)
_IDENT = re.compile(r"(?<![\w:$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "inf", "nan", "offset", "by", "without"})


def promql_metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects, by a lexical pass that is enough for the rules and
    dashboards here: label matchers, strings, ranges, groupings, offsets and numbers are
    dropped, and of the identifiers left, those not called as functions are metric names."""
    text = _STRINGS.sub(" ", expr)
    while True:
        stripped = _MATCHERS.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSETS.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    text = _NUMBERS.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        name = match.group()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names
