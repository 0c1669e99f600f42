"""Metric math on synthetic timings, with expected values worked out by hand."""

from __future__ import annotations

import pytest

from deploy.bench.http_client import _apply_event
from deploy.bench.metrics import (
    Slo,
    distribution,
    is_good,
    itl_samples,
    percentile,
    request_itl,
    summarize,
    tpot,
)
from deploy.bench.records import RequestResult

approx = lambda x: pytest.approx(x, rel=1e-12, abs=1e-12)  # noqa: E731 -- float rounding only


def test_percentile_linear_interpolation():
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 90) == approx(3.7)  # rank 2.7 -> 3 + 0.7 * (4 - 3)
    assert percentile(xs, 99) == approx(3.97)
    assert percentile([7.0], 99) == 7.0
    deciles = [10.0 * i for i in range(11)]
    assert percentile(deciles, 90) == 90.0 and percentile(deciles, 99) == approx(99.0)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_in_ms_and_ordered():
    d = distribution([0.05, 0.1, 0.1, 0.1, 0.3])
    assert d["count"] == 5
    assert d["mean"] == approx(130.0) and d["p50"] == approx(100.0)
    assert d["p90"] == approx(220.0)  # rank 3.6 -> 0.1 + 0.6 * 0.2
    assert d["p99"] == approx(292.0) and d["max"] == approx(300.0)
    assert d["p50"] <= d["p90"] <= d["p99"] <= d["max"]
    empty = distribution([])
    assert empty["count"] == 0 and empty["p99"] is None and empty["mean"] is None


def test_itl_from_timestamps():
    times = [1.0, 1.5, 1.9, 2.8]
    # One sample per chunk gap when the API does not say how many tokens a chunk carries.
    assert itl_samples(times, None) == [approx(0.5), approx(0.4), approx(0.9)]
    # k tokens in a chunk: k samples of gap / k; the first chunk's extra token adds none.
    got = itl_samples(times, [2, 1, 2, 3])
    assert got == [approx(x) for x in (0.5, 0.2, 0.2, 0.3, 0.3, 0.3)]
    assert sum(got) == approx(times[-1] - times[0])
    assert itl_samples([0.3], [4]) == [] and itl_samples([], []) == []
    with pytest.raises(ValueError):
        itl_samples([1.0, 2.0], [1])


def _ok(index: int, times: list[float], e2e: float | None = None, tokens=None) -> RequestResult:
    toks = tokens if tokens is not None else [1] * len(times)
    return RequestResult(
        index=index,
        ok=True,
        ttft=times[0],
        e2e=e2e if e2e is not None else times[-1],
        chunk_times=times,
        chunk_tokens=toks,
        output_tokens=sum(toks),
        streamed_tokens=sum(toks),
        usage_completion_tokens=sum(toks),
        input_len=10,
    )


def _failed(index: int, code: str) -> RequestResult:
    return RequestResult(index=index, error_code=code, error_message=f"{code} happened")


def test_tpot():
    r = _ok(0, [1.0, 1.5, 2.0, 2.5, 3.0])
    assert tpot(r) == approx(0.5)  # (3.0 - 1.0) / (5 - 1)
    assert tpot(_ok(1, [0.2])) is None  # one token: no TPOT
    assert tpot(_failed(2, "HTTP 400")) is None


def _goodput_results() -> list[RequestResult]:
    return [
        _ok(0, [0.1, 0.2, 0.3]),  # TTFT 0.1, ITL 0.1 0.1: good
        _ok(1, [0.3, 0.4]),  # TTFT 0.3: too slow
        _ok(2, [0.1, 0.15, 0.2, 0.25, 0.6]),  # ITL mean 0.125 passes, p99 0.341 fails
        _ok(3, [0.05]),  # one token: no ITL sample, passes the ITL check
        _failed(4, "INVALID_ARGUMENT"),  # never good
        _failed(5, "HTTP 400"),
        _failed(6, "INVALID_ARGUMENT"),
    ]


def test_goodput_mean_vs_p99_itl():
    rs = _goodput_results()
    assert request_itl(rs[2], "mean") == approx(0.125)
    assert request_itl(rs[2], "p99") == approx(0.05 + 0.3 * 0.97)
    mean_slo = Slo(ttft=0.2, itl=0.15, itl_stat="mean")
    p99_slo = Slo(ttft=0.2, itl=0.15, itl_stat="p99")
    assert [is_good(r, mean_slo) for r in rs] == [True, False, True, True, False, False, False]
    assert [is_good(r, p99_slo) for r in rs] == [True, False, False, True, False, False, False]
    assert [is_good(r, Slo(itl=0.15)) for r in rs][:4] == [True, True, True, True]
    g = summarize(rs, duration_s=2.0, slo=mean_slo)["goodput"]
    assert g == {
        "slo_ttft_ms": 200.0,
        "slo_itl_ms": 150.0,
        "itl_stat": "mean",
        "good": 3,
        "good_fraction": 3 / 7,
        "goodput_rps": 1.5,
    }
    assert summarize(rs, 2.0, p99_slo)["goodput"]["goodput_rps"] == 1.0
    assert "goodput" not in summarize(rs, 2.0, Slo())


def test_summary_counts_errors_and_tokens():
    rs = _goodput_results()
    s = summarize(rs, duration_s=2.0, slo=Slo(), not_sent=3)
    assert (s["num_requests"], s["sent"], s["not_sent"]) == (10, 7, 3)
    assert (s["completed"], s["failed"]) == (4, 3)
    assert s["errors"] == {"HTTP 400": 1, "INVALID_ARGUMENT": 2}
    assert s["error_samples"]["HTTP 400"] == "HTTP 400 happened"
    assert s["output_tokens"] == 3 + 2 + 5 + 1 and s["input_tokens"] == 40
    assert s["request_throughput"] == 2.0 and s["output_token_throughput"] == 5.5
    assert s["total_token_throughput"] == (40 + 11) / 2.0
    assert s["ttft_ms"]["p50"] == approx(100.0)
    assert s["itl_ms"]["count"] == 2 + 1 + 4  # samples pooled over successful requests
    assert s["usage_mismatches"] == 0


def test_usage_mismatch():
    r = _ok(0, [0.1, 0.2])
    r.usage_completion_tokens = 3
    assert r.usage_mismatch
    sse = RequestResult(index=1, ok=True, chunk_times=[0.1, 0.2], chunk_tokens=None)
    sse.usage_completion_tokens = 3  # 2 chunks, 3 tokens: fine (a chunk may hold several)
    assert not sse.usage_mismatch
    sse.usage_completion_tokens = 1
    assert sse.usage_mismatch
    assert RequestResult.from_json(r.to_json()) == r


def test_sse_events_vllm_and_flotilla_shapes():
    r = RequestResult(index=0, chunk_tokens=None)
    # vLLM opens a chat stream with a role-only delta: no output yet.
    _apply_event({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, r, 0.1)
    _apply_event({"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]}, r, 0.2)
    _apply_event({"choices": [{"text": " there", "finish_reason": "length"}]}, r, 0.3)
    _apply_event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}, r, 0.4)
    assert r.chunk_times == [0.2, 0.3] and r.finish_reason == "length"
    assert (r.usage_prompt_tokens, r.usage_completion_tokens) == (7, 3)
    _apply_event({"error": {"message": "group died", "type": "unavailable"}}, r, 0.5)
    assert r.error_code == "SSE unavailable" and r.error_message == "group died"
