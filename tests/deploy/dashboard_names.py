"""The metric names the Grafana dashboard (deploy/grafana/flotilla.json) queries, read from its
PromQL, and the sample names of a Prometheus scrape, for tests to compare."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "flotilla.json"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")  # {model=~"$model"}: labels, not names
_RANGES = re.compile(r"\[[^\]]*\]")  # [$__rate_interval], [5m]
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,")


def metric_names(expr: str) -> set[str]:
    """Metric names in one PromQL expression: identifiers that are not functions, keywords,
    labels (in matchers or by / without lists) or parts of numbers."""
    if m := _LABEL_VALUES.search(expr):  # a Grafana variable query: label_values(metric, label)
        return {m.group(1)}
    for pattern in (_STRING, _MATCHERS, _RANGES, _GROUPING):
        expr = pattern.sub(" ", expr)
    names = set()
    for m in _IDENT.finditer(expr):
        before = expr[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":  # the e3 of 1e3
            continue
        if expr[m.end() :].lstrip().startswith("(") or m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def dashboard_queries(path: Path = DASHBOARD) -> dict[str, list[str]]:
    """{panel title (or "variable NAME"): its PromQL expressions}."""
    dash = json.loads(path.read_text())
    out = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dash["panels"]}
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            out[f"variable {var['name']}"] = [query["query"] if isinstance(query, dict) else query]
    return out


def sample_values(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value} of a Prometheus text scrape."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum over series of `name` whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)
