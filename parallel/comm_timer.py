"""Optional accounting of time spent inside collectives and point-to-point transfers, so a
benchmark can report the communication share of a step. Off by default (one attribute check
per collective when off)."""

from __future__ import annotations

import time
from contextlib import contextmanager


class CommTimer:
    def __init__(self) -> None:
        self.enabled = False
        self.seconds = 0.0
        self.calls = 0

    @contextmanager
    def time(self):
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


COMM = CommTimer()
