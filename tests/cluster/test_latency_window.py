"""The groups' recent TTFT / ITL percentiles: fixed memory, old samples age out, 0.0 when empty."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.latency_window import NUM_BINS, LatencyWindow, TokenLatencies


def test_empty_window_reports_zero():
    assert LatencyWindow().percentile(90, now=100.0) == 0.0


def test_p90_is_within_a_bin_of_the_exact_value():
    w = LatencyWindow(window_s=30)
    for i in range(1, 101):  # 1..100 ms: exact p90 is 90
        w.record(float(i), now=10.0)
    assert w.percentile(90, now=10.0) == pytest.approx(90, rel=0.1)
    assert w.percentile(50, now=10.0) == pytest.approx(50, rel=0.1)
    assert w.count(now=10.0) == 100


def test_samples_older_than_the_window_age_out():
    w = LatencyWindow(window_s=30, num_slices=6)
    w.record(1000.0, now=0.0)
    w.record(10.0, now=20.0)
    assert w.percentile(90, now=20.0) == pytest.approx(1000, rel=0.1)
    assert w.percentile(90, now=31.0) == pytest.approx(10, rel=0.1)  # the 1000 ms slice left
    assert w.percentile(90, now=100.0) == 0.0
    w.record(5.0, now=100.0)  # a slot reused after a long gap holds only the new sample
    assert w.count(now=100.0) == 1


def test_memory_does_not_grow_with_samples():
    w = LatencyWindow(window_s=30, num_slices=6)
    for i in range(10_000):
        w.record(float(i % 500) + 0.5, now=i * 0.01)
    assert len(w.counts) == 6 and all(len(c) == NUM_BINS for c in w.counts)
    assert w.percentile(100, now=99.99) > 0 and w.percentile(90, now=1e9) == 0.0


def test_extremes_land_in_the_end_bins():
    w = LatencyWindow()
    w.record(0.0, now=1.0)
    w.record(1e9, now=1.0)
    assert 0 < w.percentile(1, now=1.0) < 0.2
    assert w.percentile(100, now=1.0) > 100_000


def _out(new: int, total: int, arrival=0.0, first=None):
    return SimpleNamespace(
        new_token_ids=[0] * new, token_ids=[0] * total, arrival_time=arrival, first_token_time=first
    )


def test_token_latencies_from_a_stream():
    lat = TokenLatencies(window_s=30)
    t = lat.observe(_out(1, 1, arrival=10.0, first=10.25), None, now=10.25)  # TTFT 250 ms
    t = lat.observe(_out(0, 1), t, now=10.3)  # no tokens (e.g. a finish-only output): no sample
    t = lat.observe(_out(2, 3), t, now=10.45)  # 2 tokens after 200 ms: ITL 100 ms each
    ttft, itl = lat.p90_ms(now=11.0)
    assert ttft == pytest.approx(250, rel=0.1) and itl == pytest.approx(100, rel=0.1)
    assert lat.ttft.count(now=11.0) == 1 and lat.itl.count(now=11.0) == 1


def test_a_resumed_leg_records_no_ttft():
    lat = TokenLatencies()
    # A decode leg resuming after tokens made elsewhere: its first output is not the first token.
    lat.observe(_out(1, 5, arrival=0.0, first=0.5), None, now=1.0)
    assert lat.p90_ms(now=1.0) == (0.0, 0.0)


def test_bad_window_is_refused():
    with pytest.raises(ValueError):
        LatencyWindow(window_s=0)


def test_group_reports_the_latency_p90s_to_serve():
    from cluster.replica_group import ReplicaGroup

    group = ReplicaGroup.__new__(ReplicaGroup)  # no engine to load: stats() is all it reads
    group.engine = SimpleNamespace(
        stats=lambda: SimpleNamespace(num_running=2, num_waiting=1, kv_usage=0.5)
    )
    group.latency = TokenLatencies()
    stats = group.record_autoscaling_stats()
    assert stats == {
        "num_running": 2.0,
        "num_waiting": 1.0,
        "kv_usage": 0.5,
        "ttft_ms_p90": 0.0,
        "itl_ms_p90": 0.0,
    }
    group.latency.ttft.record(300.0)
    assert group.record_autoscaling_stats()["ttft_ms_p90"] == pytest.approx(300, rel=0.1)
