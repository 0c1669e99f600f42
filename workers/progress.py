"""Start-up progress lines (kernel build, weights, KV cache) that a user of `flotilla serve`
sees: the groups run in Ray worker processes, whose stderr Ray forwards to the driver's
terminal, prefixed with the replica's name. One logger, "flotilla.startup", writing to stderr
at INFO whatever the process's logging set-up (Ray's workers leave the root logger at WARNING).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_log = logging.getLogger("flotilla.startup")
if not _log.handlers:
    # the process's real stderr: a Serve replica swaps sys.stderr for a logger into its own
    # log file, which Ray does not forward to the terminal
    _handler = logging.StreamHandler(sys.__stderr__)
    _handler.setFormatter(logging.Formatter("flotilla: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False

# Below this a model loads in seconds: one line when done; above it, a line every 10%.
BAR_MIN_BYTES = 1 << 30


# Seconds each start-up phase took in this process (kernels, weights, kv_cache), for the
# group's start-up breakdown (cluster.served_group; benchmarks/scaling.py reports it).
PHASES: dict[str, float] = {}


def report(message: str) -> None:
    _log.info(message)


def phase(name: str, seconds: float) -> None:
    PHASES[name] = PHASES.get(name, 0.0) + seconds


def weights(items: Iterable[T], total_bytes: int, what: str = "weights") -> Iterator[T]:
    """Pass `(name, tensor)` pairs through, reporting the share of `total_bytes` read."""
    t0, done, next_step = time.monotonic(), 0, 10
    for item in items:
        done += item[1].numel() * item[1].element_size()  # type: ignore[index]
        pct = 100 * done // max(total_bytes, 1)
        if total_bytes >= BAR_MIN_BYTES and pct >= next_step and next_step < 100:
            report(
                f"loading {what}: {min(pct, 99)}% ({done / 1e9:.2f} of {total_bytes / 1e9:.2f} GB)"
            )
            next_step = pct // 10 * 10 + 10
        yield item
    phase(what, time.monotonic() - t0)
    report(f"{what} loaded: {done / 1e9:.2f} GB in {time.monotonic() - t0:.1f} s")
