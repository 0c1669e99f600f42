"""benchmarks/interference.py's measurement window: only gaps and tokens that arrived inside
[warmup, duration] count, a chunk of k tokens gives k gaps of a k-th of its wait each, and
long prompts' TTFT counts only for those sent inside the window."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from interference import summarize  # noqa: E402

from deploy.bench.records import RequestResult  # noqa: E402


def _result(start: float, times: list[float], tokens: list[int], ttft: float | None = None):
    return RequestResult(
        index=0, start=start, ok=True, ttft=ttft, chunk_times=times, chunk_tokens=tokens
    )


def test_only_the_window_counts():
    args = SimpleNamespace(warmup_s=10.0, duration_s=20.0)
    # Arrivals at 9, 11, 13 (2 tokens), 21: the gap ending at 11 (2 s) counts, the one ending
    # at 13 gives two 1 s gaps; 9 and 21 are outside.
    stream = _result(5.0, [4.0, 6.0, 8.0, 16.0], [1, 1, 2, 1])
    inside = _result(12.0, [3.0], [1], ttft=3.0)  # sent at 12: TTFT counts, its token too
    before = _result(2.0, [1.0], [1], ttft=1.0)  # sent at 2: neither counts
    s = summarize([stream], [inside, before], args)
    assert s["stream_itl_ms"]["count"] == 3
    assert s["stream_itl_ms"]["max"] == pytest.approx(2000.0)
    assert s["stream_itl_ms"]["p50"] == pytest.approx(1000.0)
    assert s["stream_tok_s"] == pytest.approx(3 / 10)  # 1 + 2 tokens at 11 and 13
    assert s["output_tok_s"] == pytest.approx(4 / 10)  # and the long prompt's token at 15
    assert s["long_ttft_ms"]["count"] == 1 and s["long_ttft_ms"]["max"] == pytest.approx(3000.0)
    assert s["requests"] == {"streams": 1, "longs": 2, "failed": 0}
