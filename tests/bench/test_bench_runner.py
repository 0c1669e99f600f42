"""The load generator against a fake client: concurrency is held, bounds are honoured, every
request's outcome is kept. No wall-clock assertions -- only counts and orders."""

from __future__ import annotations

import asyncio
import math

from deploy.bench.clients import SendOptions
from deploy.bench.records import RequestResult, RequestSpec
from deploy.bench.runner import Load, run_load

SPECS = [RequestSpec(i, max_tokens=2, input_len=3, prompt_ids=(5, 6, 7)) for i in range(12)]


class FakeClient:
    backend = "fake"

    def __init__(self, delay: float = 0.01, fail_every: int = 0):
        self.delay, self.fail_every = delay, fail_every
        self.in_flight = self.max_in_flight = 0
        self.seen: list[int] = []

    async def send(self, spec: RequestSpec, opts: SendOptions) -> RequestResult:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.seen.append(spec.index)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if self.fail_every and spec.index % self.fail_every == 0:
            return RequestResult(spec.index, error_code="INVALID_ARGUMENT", error_message="x")
        return RequestResult(spec.index, ok=True, ttft=0.001, e2e=self.delay, output_tokens=2)


def _run(client, load, specs=SPECS):
    return asyncio.run(run_load(client, specs, SendOptions(), load, seed=1, progress=False))


def test_closed_loop_holds_concurrency_and_keeps_failures():
    client = FakeClient(fail_every=4)
    run = _run(client, Load(concurrency=3))
    assert client.max_in_flight == 3
    assert sorted(client.seen) == list(range(12)) and [r.index for r in run.results] == list(
        range(12)
    )
    assert [r.error_code for r in run.results if not r.ok] == ["INVALID_ARGUMENT"] * 3
    assert run.not_sent == 0 and run.duration_s > 0
    assert all(r.start >= 0 for r in run.results)


def test_open_loop_all_at_once_and_capped():
    client = FakeClient(delay=0.05)
    run = _run(client, Load(rate=math.inf))
    assert client.max_in_flight == 12 and len(run.results) == 12
    client = FakeClient(delay=0.02)
    run = _run(client, Load(rate=math.inf, max_concurrency=2))
    assert client.max_in_flight == 2 and len(run.results) == 12


def test_duration_bound_stops_sending():
    client = FakeClient(delay=0.05)
    run = _run(client, Load(concurrency=1, duration_s=0.12))
    assert 1 <= len(run.results) < 12 and run.not_sent == 12 - len(run.results)
    client = FakeClient(delay=0.0)
    run = _run(client, Load(rate=1e-3, duration_s=0.05))  # first arrival far past the bound
    assert run.results == [] and run.not_sent == 12
