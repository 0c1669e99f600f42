"""deploy/grafana/flotilla.json without a server: the panels the README promises, and every
metric its queries name is one the router exports (the live scrape is
tests/deploy/serve_app/test_serve_metrics.py)."""

from __future__ import annotations

import pytest
from dashboard_names import dashboard_queries, metric_names, sample_values

from router.metrics import RequestMetrics


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.99, sum by (le) (rate(a_bucket{model=~"$m", x="by(y)"}[5m])))',
            {"a_bucket"},
        ),
        ("sum(rate(x_total[$__rate_interval])) / sum(rate(y_total[1m]))", {"x_total", "y_total"}),
        ("max by (group) (g) > bool 1e3 * h offset 5m", {"g", "h"}),
        ("sum without (le, group) (k) and on (model) l", {"k", "l"}),
        ("label_values(ray_flotilla_requests_running, model)", {"ray_flotilla_requests_running"}),
    ],
)
def test_metric_names_of_promql(expr, names):
    assert metric_names(expr) == names


def test_dashboard_has_the_panels_and_only_exported_names():
    queries = dashboard_queries()
    for words in (
        "request rate",
        "time to first token",
        "inter-token",
        "end-to-end",
        "queue time",
        "tokens/s",
        "running and waiting",
        "kv cache usage",
        "prefix cache hit rate",
        "preemptions",
        "finish reasons",
    ):
        assert any(words in title.lower() for title in queries), words
    assert all(exprs for exprs in queries.values())
    p99 = [
        e for exprs in queries.values() for e in exprs if e.startswith("histogram_quantile(0.99")
    ]
    assert len(p99) >= 4  # TTFT, ITL, e2e, queue time

    # Every series the router can record, once each, as its /metrics renders them.
    m = RequestMetrics("m", enabled=False)
    stats = {"num_running": 1, "num_waiting": 0, "kv_usage": 0.5, "prefix_hit_rate": 0.5}
    m.record_group("g0", stats)
    m.itl.observe(0.01, tags=m.tags("g0"))
    m.record_finished("g0", "finished", 4, 2, 0.1, 0.2)
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "cached_tokens": 0}
    timing = {"queue": 0.0, "prefill": 0.1, "decode": 0.1}
    m.record_leg_end("g0", {"finish": "stop", "usage": usage, "timing": timing, "preemptions": 0})
    m.record_request("g0", "stop", 4, 2)
    exported = {name for name, _ in sample_values(m.mirror.render().decode())}

    used = {n for exprs in queries.values() for e in exprs for n in metric_names(e)}
    assert used and all(n.startswith("ray_flotilla_") for n in used), used
    assert used <= exported, f"not exported by the router: {sorted(used - exported)}"
