"""The load generator: sends a workload's requests through a client, in one of two modes, and
collects one `RequestResult` per request sent.

  closed loop   `concurrency` requests in flight at all times (each worker sends its next
                request when the previous one ends).
  open loop     Poisson arrivals at `rate` requests/s (seeded send times, `inf` = all at once),
                optionally capped at `max_concurrency` in flight.

Both stop sending at `duration_s` (requests not sent by then are counted as `not_sent`, not
as errors); requests already in flight finish, each bounded by the client's request
timeout. The run's duration, for throughputs, is run start -> last response.
A sweep runs one open-loop run per rate, each with fresh prompts (seed + i) so no point
finds an earlier point's prompts in the prefix cache.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from deploy.bench.clients import Client, SendOptions
from deploy.bench.records import RequestResult, RequestSpec
from deploy.bench.workloads import poisson_arrivals


@dataclass(frozen=True)
class Load:
    concurrency: int | None = None  # closed loop
    rate: float | None = None  # open loop (requests/s; math.inf = all at once)
    max_concurrency: int | None = None  # cap for the open loop
    duration_s: float | None = None

    def describe(self) -> dict[str, Any]:
        rate = None if self.rate is None else ("inf" if math.isinf(self.rate) else self.rate)
        return {
            "concurrency": self.concurrency,
            "rate": rate,
            "max_concurrency": self.max_concurrency,
            "duration_s": self.duration_s,
        }


@dataclass
class RunResult:
    load: Load
    results: list[RequestResult] = field(default_factory=list)
    duration_s: float = 0.0
    not_sent: int = 0


class Progress:
    """tqdm on stderr when installed, else a plain one-line bar; `enabled=False` is silent."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.done, self.desc, self.enabled = total, 0, desc, enabled
        self._bar: Any = None
        self._last = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="req")
            except ImportError:
                self._bar = None

    def update(self, ok: bool) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            return
        now = time.monotonic()
        if now - self._last >= 0.2 or self.done == self.total:
            self._last = now
            filled = 30 * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (30 - filled)
            print(f"\r{self.desc} [{bar}] {self.done}/{self.total}", end="", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


async def run_load(
    client: Client,
    specs: list[RequestSpec],
    opts: SendOptions,
    load: Load,
    seed: int = 0,
    progress: bool = True,
    desc: str = "bench",
) -> RunResult:
    """Send `specs` under `load`; see the module docstring for the two modes."""
    run = RunResult(load)
    bar = Progress(len(specs), desc, progress)
    start = time.perf_counter()
    stop_at = start + load.duration_s if load.duration_s else math.inf
    last_end = start

    async def one(spec: RequestSpec) -> None:
        nonlocal last_end
        sent = time.perf_counter()
        result = await client.send(spec, opts)
        result.start = sent - start
        last_end = max(last_end, time.perf_counter())
        run.results.append(result)
        bar.update(result.ok)

    try:
        if load.rate is None:
            queue = iter(specs)

            async def worker() -> None:
                for spec in queue:  # one shared iterator: each spec goes out once
                    if time.perf_counter() >= stop_at:
                        return
                    await one(spec)

            await asyncio.gather(*(worker() for _ in range(load.concurrency or 1)))
        else:
            cap = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None

            async def capped(spec: RequestSpec) -> None:
                async with cap if cap is not None else nullcontext():
                    await one(spec)

            tasks = []
            for spec, at in zip(specs, poisson_arrivals(len(specs), load.rate, seed), strict=True):
                if start + at >= stop_at:
                    break
                await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
                tasks.append(asyncio.ensure_future(capped(spec)))
            await asyncio.gather(*tasks)
    finally:
        bar.close()
    run.results.sort(key=lambda r: r.index)
    run.not_sent = len(specs) - len(run.results)
    run.duration_s = last_end - start
    return run
