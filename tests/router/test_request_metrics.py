"""What the router records per request and per leg (router.metrics), read back from its own
/metrics body with prometheus_client's parser; fake groups from fake_groups (no Ray)."""

from __future__ import annotations

import asyncio

from fake_groups import PD, collect, run
from prometheus_client.parser import text_string_to_metric_families

from workers.sampling_params import SamplingParams

TIMING = {"queue": 0.5, "prefill": 0.25, "decode": 2.0}


def scrape(r) -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value} of the router's /metrics body."""
    text = r.metrics.mirror.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels) -> float:
    """The sum over series of `name` whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def test_finished_requests_record_phases_tokens_and_prefix_hits(tokenizer_files):
    async def body(r, groups):
        groups["g0"].last_extra = {
            "timing": TIMING,
            "preemptions": 1,
            "usage": {"prompt_tokens": 16, "completion_tokens": 3, "cached_tokens": 12},
        }
        await collect(r, [1, 2, 3], max_tokens=3)
        await collect(r, [4, 5, 6, 7], max_tokens=2)
        return scrape(r)

    m = run(tokenizer_files, ["ok"], body)
    g = {"model": "m", "group": "g0"}
    assert value(m, "ray_flotilla_request_success_total", finished_reason="length", **g) == 2
    assert value(m, "ray_flotilla_request_generation_tokens_count", **g) == 2
    assert value(m, "ray_flotilla_request_generation_tokens_sum", **g) == 5  # 3 + 2 returned
    assert value(m, "ray_flotilla_request_prompt_tokens_sum", **g) == 7  # 3 + 4
    # le="2" holds the 2-token request only; le="5" both
    assert value(m, "ray_flotilla_request_generation_tokens_bucket", le="2.0", **g) == 1
    assert value(m, "ray_flotilla_request_generation_tokens_bucket", le="5.0", **g) == 2
    for phase, seconds in TIMING.items():
        assert value(m, f"ray_flotilla_request_{phase}_time_seconds_count", **g) == 2
        assert value(m, f"ray_flotilla_request_{phase}_time_seconds_sum", **g) == 2 * seconds
    assert value(m, "ray_flotilla_num_preemptions_total", **g) == 2
    assert value(m, "ray_flotilla_prefix_cache_queries_total", **g) == 32
    assert value(m, "ray_flotilla_prefix_cache_hits_total", **g) == 24


def test_an_older_group_without_timings_still_counts_the_request(tokenizer_files):
    async def body(r, groups):
        await collect(r, [1, 2, 3], max_tokens=3)
        return scrape(r)

    m = run(tokenizer_files, ["ok"], body)
    assert value(m, "ray_flotilla_request_success_total", finished_reason="length") == 1
    assert value(m, "ray_flotilla_request_queue_time_seconds_count") == 0
    assert value(m, "ray_flotilla_num_preemptions_total") == 0
    assert value(m, "ray_flotilla_prefix_cache_queries_total") == 1  # usage.prompt_tokens


def test_abort_and_error_are_finish_reasons(tokenizer_files):
    async def body(r, groups):
        agen = r.stream([1, 2], SamplingParams(max_tokens=50), request_id="req-1")
        await agen.__anext__()  # one token relayed, then the client goes away
        await agen.aclose()
        groups["g0"].mode = "invalid"
        try:
            await collect(r, [1, 2], max_tokens=3)
        except Exception:
            pass
        else:
            raise AssertionError("the invalid request was not refused")
        await asyncio.sleep(0)
        return scrape(r)

    m = run(tokenizer_files, ["ok"], body)
    assert value(m, "ray_flotilla_request_success_total", finished_reason="abort") == 1
    assert value(m, "ray_flotilla_request_success_total", finished_reason="error") == 1
    assert value(m, "ray_flotilla_request_success_total") == 2
    # the aborted one returned 1 token, the refused one none
    assert value(m, "ray_flotilla_request_generation_tokens_sum") == 1
    assert value(m, "ray_flotilla_request_generation_tokens_count") == 2


def test_a_handed_off_request_is_timed_in_each_group_and_counted_once(tokenizer_files):
    async def body(r, groups):
        for g in groups.values():
            g.last_extra = {"timing": TIMING, "preemptions": 0}
        await collect(r, list(range(1, 9)), max_tokens=6)
        return scrape(r)

    m = run(tokenizer_files, ["ok", "ok"], body, roles=PD, pd_min_prompt_tokens=4)
    for group in ("g0", "g1"):  # prefill, then decode
        assert value(m, "ray_flotilla_request_queue_time_seconds_count", group=group) == 1
    assert value(m, "ray_flotilla_request_success_total") == 1
    assert value(m, "ray_flotilla_request_success_total", group="g1", finished_reason="length") == 1
    assert value(m, "ray_flotilla_request_generation_tokens_sum", group="g1") == 6


def test_spec_decode_counters_take_each_groups_increase():
    """Groups report running totals of draft / accepted tokens; the counters add each
    group's increase, and a restarted group (its total back near 0) counts from there."""
    from types import SimpleNamespace

    from router.metrics import RequestMetrics

    m = RequestMetrics("m", enabled=False)
    load = {"num_running": 0, "num_waiting": 0, "kv_usage": 0.0, "prefix_hit_rate": 0.0}
    for group, drafted, accepted in [
        ("g0", 10, 6),
        ("g0", 25, 14),
        ("g1", 4, 1),
        ("g0", 3, 2),  # restarted
        ("g1", 4, 1),  # no change
    ]:
        stats = load | {"spec_num_draft_tokens": drafted, "spec_num_accepted_tokens": accepted}
        m.record_group(group, stats)
    m.record_group("g2", load)  # an older group without the keys records nothing
    s = scrape(SimpleNamespace(metrics=m))
    draft, acc = (
        "ray_flotilla_spec_decode_num_draft_tokens_total",
        ("ray_flotilla_spec_decode_num_accepted_tokens_total"),
    )
    assert value(s, draft, group="g0") == 28 and value(s, acc, group="g0") == 16
    assert value(s, draft, group="g1") == 4 and value(s, acc, group="g1") == 1
    assert value(s, draft, group="g2") == 0
