"""Recent latency percentiles of a group (TTFT, ITL) in fixed memory, for autoscaling.

A LatencyWindow keeps the last `window_s` seconds as `num_slices` time slices, each a
histogram over log-spaced bins (BINS_PER_OCTAVE per doubling, so a reported percentile is
within ~9% of the exact one). Recording is O(1); a percentile reads every slice
(num_slices * NUM_BINS counters, ~1000), which the group does once per metrics push. Memory
does not grow with the request rate, unlike a list of samples.

TokenLatencies turns a request's stream of engine outputs into samples: its time to first
token, and per later delta the time since the previous delta divided by its new tokens.
"""

from __future__ import annotations

import math
import time
from typing import Any

BINS_PER_OCTAVE = 8
MIN_MS = 0.1  # values below land in the first bin
NUM_BINS = BINS_PER_OCTAVE * 21  # 0.1 ms .. ~210 s; larger values land in the last bin


def _bin(ms: float) -> int:
    if ms <= MIN_MS:
        return 0
    return min(NUM_BINS - 1, int(math.log2(ms / MIN_MS) * BINS_PER_OCTAVE))


def _bin_value(i: int) -> float:
    """The bin's geometric middle: what a percentile falling in bin i reports."""
    return MIN_MS * 2 ** ((i + 0.5) / BINS_PER_OCTAVE)


class LatencyWindow:
    def __init__(self, window_s: float = 30.0, num_slices: int = 6):
        if window_s <= 0 or num_slices < 1:
            raise ValueError("window_s must be > 0 and num_slices >= 1")
        self.slice_s = window_s / num_slices
        self.counts = [[0] * NUM_BINS for _ in range(num_slices)]
        self.totals = [0] * num_slices
        self.epochs = [-1] * num_slices  # which slice-long period each slot holds now

    def _slot(self, epoch: int) -> int:
        """The slot for `epoch`, emptied first if it still holds an older period."""
        i = epoch % len(self.epochs)
        if self.epochs[i] != epoch:
            self.counts[i] = [0] * NUM_BINS
            self.totals[i] = 0
            self.epochs[i] = epoch
        return i

    def record(self, ms: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        i = self._slot(int(now // self.slice_s))
        self.counts[i][_bin(ms)] += 1
        self.totals[i] += 1

    def count(self, now: float | None = None) -> int:
        return sum(self.totals[i] for i in self._live(now))

    def _live(self, now: float | None) -> list[int]:
        now = time.monotonic() if now is None else now
        epoch = int(now // self.slice_s)
        oldest = epoch - len(self.epochs) + 1
        return [i for i, e in enumerate(self.epochs) if oldest <= e <= epoch]

    def percentile(self, q: float, now: float | None = None) -> float:
        """The q-th percentile (0 < q <= 100) of the window's samples in ms; 0.0 without any."""
        live = self._live(now)
        total = sum(self.totals[i] for i in live)
        if total == 0:
            return 0.0
        rank = math.ceil(total * q / 100)
        seen = 0
        for b in range(NUM_BINS):
            seen += sum(self.counts[i][b] for i in live)
            if seen >= rank:
                return _bin_value(b)
        return _bin_value(NUM_BINS - 1)


class TokenLatencies:
    """A group's TTFT and ITL windows, fed from its requests' engine outputs."""

    def __init__(self, window_s: float = 30.0):
        self.ttft = LatencyWindow(window_s)
        self.itl = LatencyWindow(window_s)

    def observe(self, out: Any, last_t: float | None, now: float | None = None) -> float | None:
        """Record what engine output `out` (cluster.engine.RequestOutput) says about latency;
        `last_t` is this function's result for the request's previous output (None at first).
        Returns the time of `out` if it carried tokens, else `last_t`."""
        n = len(out.new_token_ids)
        if n == 0:
            return last_t
        now = time.monotonic() if now is None else now
        if last_t is None:
            if out.first_token_time is not None and len(out.token_ids) == n:
                self.ttft.record((out.first_token_time - out.arrival_time) * 1000, now)
        else:
            self.itl.record((now - last_t) * 1000 / n, now)
        return now

    def p90_ms(self, now: float | None = None) -> tuple[float, float]:
        """(TTFT p90, ITL p90) over the window, 0.0 where there is no sample."""
        return self.ttft.percentile(90, now), self.itl.percentile(90, now)
