"""Hung engines are detected: the step clock's rule, the test-only fault hook, and an
AsyncEngine whose step never returns -- its streams fail with EngineDead within the bound, new
requests are refused, and the blocks of finished requests are accounted for."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster import faults
from cluster.async_engine import AsyncEngine
from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.watchdog import StepClock
from workers.config import ModelConfig
from workers.errors import EngineDead
from workers.sampling_params import SamplingParams


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_step_clock_rule():
    t = FakeTime()
    c = StepClock(t)
    t.now += 50
    assert c.stalled(pending=False, timeout_s=10) is None  # idle for long: fine
    assert "no step has begun" in c.stalled(pending=True, timeout_s=10)
    c.tick()
    assert c.stalled(pending=True, timeout_s=10) is None
    c.start()
    t.now += 9
    assert c.stalled(pending=True, timeout_s=10) is None
    t.now += 2
    assert "a step has run for 11.0 s" in c.stalled(pending=False, timeout_s=10)
    c.end()
    assert c.stalled(pending=True, timeout_s=10) is None
    # Idle for long, then work is queued: it counts from then, not from the last pass.
    t.now += 50
    c.poke()
    assert c.stalled(pending=True, timeout_s=10) is None
    t.now += 6
    c.poke()  # more work: still from the first
    t.now += 5
    assert "no step has begun for 11.0 s" in c.stalled(pending=True, timeout_s=10)
    c.tick()
    assert c.stalled(pending=True, timeout_s=10) is None


def test_hang_timeout_is_validated():
    assert SchedulerConfig().hang_timeout_s == 60.0
    with pytest.raises(ValueError, match="hang_timeout_s"):
        SchedulerConfig(hang_timeout_s=0)


def test_fault_hook_is_off_unless_asked(monkeypatch, tmp_path):
    def step():
        return "stepped"

    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.wrap_step(step) is step
    monkeypatch.setenv(faults.ENV, "explode")
    with pytest.raises(ValueError, match="hang_step_after:N"):
        faults.wrap_step(step)
    # Claimed by another process already: this one never hangs.
    monkeypatch.setenv(faults.ENV, "hang_step_after:0")
    claim = tmp_path / "claim"
    claim.touch()
    monkeypatch.setenv(faults.ONCE_ENV, str(claim))
    wrapped = faults.wrap_step(step)
    assert wrapped is not step and [wrapped() for _ in range(3)] == ["stepped"] * 3


def _config(model: str, hang_s: float) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=model, dtype="float32", num_threads=1),
        cache=CacheConfig(block_size=8, num_blocks=64),
        scheduler=SchedulerConfig(hang_timeout_s=hang_s),
    )


def test_block_audit_after_streams(tiny_model_dir):
    eng = AsyncEngine(_config(tiny_model_dir("llama"), 30))
    try:
        assert eng.blocks == {"total": 64, "free": 64, "cached": 0, "in_use": 0, "leaked": 0}
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

        async def main():
            async def one(p):
                return [o async for o in eng.generate(p, params)]

            await asyncio.gather(*(one([100 + i] * (9 + i)) for i in range(3)))

        asyncio.run(main())
        deadline = time.monotonic() + 10
        while eng.blocks["cached"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine thread audits as it goes idle
        b = eng.blocks
        assert b["leaked"] == 0 and b["in_use"] == 0 and b["cached"] > 0
        assert b["free"] + b["cached"] + b["in_use"] == b["total"]
    finally:
        eng.shutdown()


def test_a_step_that_never_returns_fails_streams_and_refuses(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(faults.ENV, "hang_step_after:3")
    monkeypatch.delenv(faults.ONCE_ENV, raising=False)
    hang_s = 0.5
    eng = AsyncEngine(_config(tiny_model_dir("llama"), hang_s))
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)

    async def main():
        got: list[int] = []
        t0 = None
        with pytest.raises(EngineDead, match="engine hung: a step has run for"):
            async for out in eng.generate([100, 101, 102], params):
                got += out.new_token_ids
                t0 = time.monotonic()
        return got, time.monotonic() - t0

    try:
        got, waited = asyncio.run(main())
        assert len(got) == 3  # three steps, then the fourth hangs
        assert hang_s < waited < hang_s + min(1.0, hang_s / 4) + 1.0  # detection bound (+slack)
        assert eng.hung is not None

        async def refused():
            async for _ in eng.generate([5, 6], params):
                pass

        with pytest.raises(EngineDead, match="engine hung"):
            asyncio.run(refused())
    finally:
        eng.shutdown()


def test_a_request_still_queued_ends_with_the_hang(tiny_model_dir, monkeypatch):
    """A request queued behind the step that hangs is never taken by the engine thread: the
    hang ends it with EngineDead too, instead of leaving its client waiting forever."""
    monkeypatch.setenv(faults.ENV, "hang_step_after:0")
    monkeypatch.delenv(faults.ONCE_ENV, raising=False)
    eng = AsyncEngine(_config(tiny_model_dir("llama"), 600))  # the test declares the hang
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

    async def main():
        async def one(prompt):
            return [o async for o in eng.generate(prompt, params)]

        first = asyncio.ensure_future(one([100, 101]))
        deadline = time.monotonic() + 60
        while eng.clock.step_started is None:  # the engine thread is in the step that hangs
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(one([102, 103]))
        await asyncio.sleep(0.05)
        assert eng._cmds.qsize() == 1  # the second request, queued
        eng._give_up("declared by the test")
        return await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 10)

    try:
        results = asyncio.run(main())
        assert [type(r) for r in results] == [EngineDead, EngineDead]
    finally:
        eng.shutdown()


def test_a_hung_group_reports_it_and_ends_its_requests_as_dead(tiny_model_dir, monkeypatch):
    from cluster.replica_group import ReplicaGroup

    monkeypatch.setenv(faults.ENV, "hang_step_after:2")
    monkeypatch.delenv(faults.ONCE_ENV, raising=False)
    group = ReplicaGroup(_config(tiny_model_dir("llama"), 0.5), name="g")
    params = {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True}

    async def main():
        deltas: list[tuple[str, dict]] = []
        sub = group.subscribe("r")
        assert await sub.__anext__() == []
        for i in range(2):
            assert await group.submit("r", f"q{i}", [100 + i, 7, 8], params) is None
        while sum("error" in d or "finish" in d for _, d in deltas) < 2:
            deltas += await asyncio.wait_for(sub.__anext__(), 10)
        refused = await group.submit("r", "late", [1, 2], params)
        late = await asyncio.wait_for(sub.__anext__(), 10) if refused is None else []
        await sub.aclose()
        return deltas, late

    try:
        deltas, late = asyncio.run(main())
        ends = {rid: d["error"]["kind"] for rid, d in deltas if "error" in d}
        assert ends == {"q0": "dead", "q1": "dead"}
        assert [d["error"]["kind"] for _, d in late] == ["dead"]  # refused, as dead
        s = group.stats()
        assert s["healthy"] is False and s["hung"] is True
        assert s["blocks"]["total"] == 64
        with pytest.raises(EngineDead, match="engine hung"):
            group.check_health()
    finally:
        group.engine.shutdown()
