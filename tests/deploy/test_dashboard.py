"""Every metric docs/grafana-dashboard.json queries is one the code exports.

The names come from outbox/observability/metrics.py (every prometheus_client collector defined
there); EXPECTED below, the names agreed for issue 12, must all still be exported (a rename breaks
dashboards people already run).
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"

#: name -> Prometheus type, as agreed for issue 12 (counters without _total, as prometheus_client names them)
EXPECTED = {
    "outbox_relay_messages_published": "counter",
    "outbox_relay_messages_retried": "counter",
    "outbox_relay_messages_dead": "counter",
    "outbox_relay_batch_size": "histogram",
    "outbox_relay_batch_duration_seconds": "histogram",
    "outbox_relay_delivery_latency_seconds": "histogram",
    "outbox_relay_rows": "gauge",
    "outbox_relay_oldest_pending_age_seconds": "gauge",
    "outbox_relay_leases_held": "gauge",
    "outbox_relay_lease_takeovers": "counter",
    "outbox_relay_fenced_rows": "counter",
    "outbox_relay_last_loop_timestamp_seconds": "gauge",
    "outbox_relay_blocked_keys": "gauge",
    "outbox_consumer_messages": "counter",
    "outbox_consumer_handler_duration_seconds": "histogram",
    "outbox_consumer_batch_size": "histogram",
    "outbox_consumer_lag_messages": "gauge",
    "outbox_consumer_queue_depth_messages": "gauge",
    "outbox_consumer_last_loop_timestamp_seconds": "gauge",
    "outbox_info": "gauge",  # a Gauge set to 1 with version/component labels (the series is outbox_info)
}

#: the series each type of metric exposes on /metrics
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",),
            "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "untyped": ("",), "stateset": ("",), "enum": ("",)}


def exported_metrics() -> dict[str, str]:
    """name -> type of every metric the code exports."""
    module = importlib.import_module("outbox.observability.metrics")
    from prometheus_client.metrics import MetricWrapperBase

    found: dict[str, str] = {}
    for value in vars(module).values():
        collectors = value if isinstance(value, (list, tuple)) else (value,)
        for c in collectors:
            if isinstance(c, MetricWrapperBase):
                for family in c.describe():
                    found[family.name] = family.type
    if not found:
        pytest.fail("outbox.observability.metrics defines no prometheus_client metric at module level: teach "
                    "exported_metrics() where the module keeps them")
    return found


def series_names(metrics: dict[str, str]) -> set[str]:
    return {name + suffix for name, kind in metrics.items() for suffix in SUFFIXES.get(kind, ("",))}


def expressions(dashboard: dict) -> list[str]:
    out: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    out.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return out


def metric_names_in(expr: str) -> set[str]:
    """The metric names an expression reads: every ``outbox_*`` identifier (labels and functions are not)."""
    return set(re.findall(r"(?<![A-Za-z0-9_:])(outbox_[a-zA-Z0-9_:]*)", expr))


def test_every_metric_the_dashboard_uses_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard)
    assert len(exprs) >= 20, "the dashboard lost its queries"
    known = series_names(exported_metrics())
    used = set().union(*(metric_names_in(e) for e in exprs))
    assert used, "no outbox_* metric found in the dashboard"
    unknown = sorted(used - known)
    assert not unknown, f"the dashboard queries metrics nobody exports: {unknown}"


def test_the_dashboard_covers_what_an_operator_needs() -> None:
    """Backlog by state, oldest age, publish and dead rates, latency p50/p99, leases, consumer outcomes, lag."""
    text = "\n".join(expressions(json.loads(DASHBOARD.read_text())))
    for needle in ("by (state) (outbox_relay_rows", "outbox_relay_oldest_pending_age_seconds",
                   "outbox_relay_messages_published_total", "outbox_relay_messages_dead_total",
                   "histogram_quantile(0.5, sum by (le) (rate(outbox_relay_delivery_latency_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(outbox_relay_delivery_latency_seconds_bucket",
                   "outbox_relay_leases_held", "by (consumer, outcome) (rate(outbox_consumer_messages_total",
                   "outbox_consumer_lag_messages", "outbox_consumer_queue_depth_messages"):
        assert needle in text, needle


def test_the_check_catches_a_misspelt_metric() -> None:
    """The name extraction is not blind: a typo and a counter without _total are reported."""
    known = series_names(exported_metrics())
    assert metric_names_in('sum(rate(outbox_relay_mesages_published_total{job="x"}[5m]))') - known
    assert metric_names_in("rate(outbox_relay_messages_published[5m])") - known
    assert not metric_names_in("histogram_quantile(0.99, rate(outbox_relay_batch_size_bucket[1m]))") - known


def test_the_dashboard_is_importable_json() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and d["panels"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["targets"] and all(t["refId"] for t in p["targets"]), p["title"]


def test_every_agreed_metric_is_still_exported() -> None:
    found = exported_metrics()
    missing = {name: kind for name, kind in EXPECTED.items() if found.get(name) != kind}
    assert not missing, f"metrics dashboards rely on are gone or changed type: {missing}"
