"""Metric math on `RequestResult`s: percentiles, ITL from chunk timestamps, TPOT, goodput and
the run summary. Pure Python, no I/O -- the unit tests check it on synthetic timings.

Definitions (every latency is measured by the client, from sending the request):
  * TTFT  first chunk carrying output.
  * ITL   gap between consecutive chunks carrying output. A chunk with k > 1 token ids (gRPC
          says how many) contributes k samples of gap / k, so the samples of one request sum
          to (last chunk - first chunk); extra tokens of the *first* chunk arrived with the
          first token and add no sample. OpenAI SSE chunks carry text, not ids: one sample per
          chunk.
  * TPOT  (e2e - TTFT) / (output tokens - 1), per request with at least 2 output tokens.
  * E2E   request sent -> stream closed.
  * Percentiles interpolate linearly between closest ranks (numpy's default method).
  * Goodput: a request is good when it succeeded, its TTFT <= slo_ttft and its ITL statistic
    (`itl_stat`: the request's mean ITL -- the default -- or its p99 ITL) <= slo_itl; an SLO
    left unset is not checked, and a request with no ITL sample passes the ITL check.
    goodput = good requests / run duration.
Throughputs count successful requests only, over the run: its start -> the last response.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from deploy.bench.records import RequestResult

ItlStat = Literal["mean", "p99"]
PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; raises on an empty input."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """count, mean, p50, p90, p99, max of `values` times `scale` (seconds -> ms by default)."""
    out: dict[str, float | None] = {"count": len(values)}
    if not values:
        return out | {"mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None}
    out["mean"] = scale * sum(values) / len(values)
    for q in PERCENTILES:
        out[f"p{q}"] = scale * percentile(values, q)
    out["max"] = scale * max(values)
    return out


def itl_samples(chunk_times: Sequence[float], chunk_tokens: Sequence[int] | None) -> list[float]:
    """Inter-token latencies of one request from its chunk arrival times (see module doc)."""
    if chunk_tokens is not None and len(chunk_tokens) != len(chunk_times):
        raise ValueError("chunk_times and chunk_tokens differ in length")
    out: list[float] = []
    for i in range(1, len(chunk_times)):
        gap = chunk_times[i] - chunk_times[i - 1]
        k = chunk_tokens[i] if chunk_tokens is not None else 1
        out.extend([gap / k] * k)
    return out


def tpot(r: RequestResult) -> float | None:
    if not r.ok or r.ttft is None or r.e2e is None or r.output_tokens < 2:
        return None
    return (r.e2e - r.ttft) / (r.output_tokens - 1)


def request_itl(r: RequestResult, stat: ItlStat) -> float | None:
    """The request's mean or p99 ITL; None when it has no ITL sample."""
    xs = itl_samples(r.chunk_times, r.chunk_tokens)
    if not xs:
        return None
    return sum(xs) / len(xs) if stat == "mean" else percentile(xs, 99)


@dataclass(frozen=True)
class Slo:
    """Service-level objectives in seconds; None = not checked."""

    ttft: float | None = None
    itl: float | None = None
    itl_stat: ItlStat = "mean"

    @property
    def enabled(self) -> bool:
        return self.ttft is not None or self.itl is not None


def is_good(r: RequestResult, slo: Slo) -> bool:
    if not r.ok:
        return False
    if slo.ttft is not None and (r.ttft is None or r.ttft > slo.ttft):
        return False
    if slo.itl is not None:
        itl = request_itl(r, slo.itl_stat)
        if itl is not None and itl > slo.itl:
            return False
    return True


def summarize(
    results: Sequence[RequestResult], duration_s: float, slo: Slo, not_sent: int = 0
) -> dict[str, Any]:
    """The run's summary (JSON-ready). `not_sent`: specs skipped because --duration-s ran out."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    errors = Counter(r.error_code or "UNKNOWN" for r in failed)
    samples: dict[str, str] = {}
    for r in failed:
        samples.setdefault(r.error_code or "UNKNOWN", (r.error_message or "")[:300])
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    itls = [x for r in ok for x in itl_samples(r.chunk_times, r.chunk_tokens)]
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    summary: dict[str, Any] = {
        "num_requests": len(results) + not_sent,
        "sent": len(results),
        "not_sent": not_sent,
        "completed": len(ok),
        "failed": len(failed),
        "errors": dict(sorted(errors.items())),
        "error_samples": samples,
        "duration_s": duration_s,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / dur,
        "output_token_throughput": out_tokens / dur,
        "total_token_throughput": (in_tokens + out_tokens) / dur,
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": distribution(itls),
        "tpot_ms": distribution(tpots),
        "e2e_ms": distribution([r.e2e for r in ok if r.e2e is not None]),
        "usage_mismatches": sum(r.usage_mismatch for r in results),
    }
    if slo.enabled:
        good = sum(is_good(r, slo) for r in results)
        summary["goodput"] = {
            "slo_ttft_ms": None if slo.ttft is None else 1000 * slo.ttft,
            "slo_itl_ms": None if slo.itl is None else 1000 * slo.itl,
            "itl_stat": slo.itl_stat,
            "good": good,
            "good_fraction": good / len(results) if results else 0.0,
            "goodput_rps": good / dur,
        }
    return summary
