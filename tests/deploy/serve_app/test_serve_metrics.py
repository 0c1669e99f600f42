"""The real Serve app, metrics: the Grafana dashboard's queries against live scrapes, and the
per-request histograms and counters against what the requests returned.

The router's GET /metrics is compared before and after this module's requests (other modules
of the package share the app), so the counts are exact; Ray's endpoint gets the same names
some seconds later.
"""

from __future__ import annotations

import time

import pytest
import requests
from dashboard_names import dashboard_queries, metric_names, sample_values, total

from .serve_support import BASE, METRICS_PORT

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]

# The second prompt repeats the first one's 3 full blocks (block size 8): a prefix-cache hit
# when the prefix-aware policy sends it to the same group.
SHARED = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
PROMPTS = [(SHARED, 5), (SHARED + " every morning", 7), ("The capital of France is", 3)]


def _router_scrape() -> dict:
    r = requests.get(f"{BASE}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    return sample_values(r.text)


def _settled_scrape() -> dict:
    """A scrape once the requests of earlier tests are all recorded (two alike, 0.3 s apart)."""
    last = _router_scrape()
    for _ in range(30):
        time.sleep(0.3)
        now = _router_scrape()
        if total(now, "ray_flotilla_request_success_total") == total(
            last, "ray_flotilla_request_success_total"
        ):
            return now
        last = now
    raise AssertionError("the router kept recording requests nobody sent")


def _dashboard_names() -> set[str]:
    return {n for exprs in dashboard_queries().values() for e in exprs for n in metric_names(e)}


def test_dashboard_queries_and_request_histograms_against_a_live_scrape(app, client):
    before = _settled_scrape()
    usages = []
    for prompt, max_tokens in PROMPTS:
        resp = client.completions.create(
            model=client.models.list().data[0].id,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
        )
        usages.append(resp.usage)
    stream = client.completions.create(
        model=client.models.list().data[0].id,
        prompt="Count: one, two,",
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usages.append([c.usage for c in stream if c.usage is not None][-1])
    n = len(usages)
    completion = sum(u.completion_tokens for u in usages)
    prompt_tokens = sum(u.prompt_tokens for u in usages)

    def delta(after, name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    # The router records a request when its stream closes, just after the client's answer.
    deadline = time.monotonic() + 30
    while True:
        after = _router_scrape()
        if delta(after, "ray_flotilla_request_generation_tokens_count") >= n:
            break
        assert time.monotonic() < deadline, "the router never recorded the requests"
        time.sleep(0.2)

    assert delta(after, "ray_flotilla_request_generation_tokens_count") == n
    assert delta(after, "ray_flotilla_request_generation_tokens_sum") == completion
    assert delta(after, "ray_flotilla_request_prompt_tokens_count") == n
    assert delta(after, "ray_flotilla_request_prompt_tokens_sum") == prompt_tokens
    finished = {
        reason: delta(after, "ray_flotilla_request_success_total", finished_reason=reason)
        for reason in ("stop", "length", "abort", "error")
    }
    assert (
        finished["stop"] + finished["length"] == n and finished["abort"] == finished["error"] == 0
    )
    # One leg each (colocated groups): timed once, in the group that ran it.
    for phase in ("queue", "prefill", "decode"):
        assert delta(after, f"ray_flotilla_request_{phase}_time_seconds_count") == n
    assert delta(after, "ray_flotilla_request_decode_time_seconds_sum") > 0
    assert delta(after, "ray_flotilla_prefix_cache_queries_total") == prompt_tokens
    hits = delta(after, "ray_flotilla_prefix_cache_hits_total")
    assert 0 <= hits <= prompt_tokens
    assert delta(after, "ray_flotilla_num_preemptions_total") == 0  # 1024 blocks: no pressure
    assert delta(after, "ray_flotilla_generation_tokens_total") == completion  # the old counter

    used = _dashboard_names()
    scraped = {name for name, _ in after}
    assert used <= scraped, f"dashboard names missing from GET /metrics: {sorted(used - scraped)}"

    # Ray's own endpoint: the same names, for every series the router has recorded as nonzero
    # (Ray drops a counter's zero increments, so an all-zero counter has no series there).
    nonzero = {name for (name, _), v in after.items() if v}
    wanted = used & nonzero
    assert "ray_flotilla_request_queue_time_seconds_bucket" in wanted
    deadline = time.monotonic() + 60
    while True:
        text = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        missing = wanted - {name for name, _ in sample_values(text)}
        if not missing:
            break
        assert time.monotonic() < deadline, f"missing from Ray's endpoint: {sorted(missing)}"
        time.sleep(1)
