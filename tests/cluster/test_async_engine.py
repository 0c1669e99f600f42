"""AsyncEngine: concurrent streams equal the offline output; cancellation frees KV blocks."""

from __future__ import annotations

import asyncio

import pytest

from cluster.async_engine import AsyncEngine
from cluster.config import CacheConfig, EngineConfig
from cluster.engine import LLMEngine
from workers.config import ModelConfig
from workers.errors import InvalidRequest
from workers.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = AsyncEngine(
        EngineConfig(
            model=ModelConfig(model=tiny_model_dir("llama"), dtype="float32"),
            cache=CacheConfig(block_size=8, num_blocks=64),
        )
    )
    yield eng
    eng.shutdown()


async def _collect(eng, prompt, params):
    deltas = [o async for o in eng.generate(prompt, params)]
    return deltas


def test_streams_match_offline(engine, tiny_model_dir):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[100 + i for i in range(n)] for n in (3, 17, 30)]

    async def main():
        return await asyncio.gather(*(_collect(engine, p, params) for p in prompts))

    results = asyncio.run(main())
    offline = LLMEngine(engine.engine.config).generate(prompts, params)
    for deltas, ref in zip(results, offline, strict=True):
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert [t for d in deltas for t in d.new_token_ids] == ref.token_ids
        assert "".join(d.delta_text for d in deltas) == ref.text


def test_cancel_frees_blocks(engine):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        agen = engine.generate(list(range(100, 140)), params)
        got = 0
        async for _ in agen:
            got += 1
            if got == 3:
                break
        await agen.aclose()
        for _ in range(200):  # bounded wait for the engine thread to process the abort
            if engine.stats().num_free_blocks == engine.stats().num_blocks:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    s = engine.stats()
    assert s.num_free_blocks == s.num_blocks and s.num_running == 0


def test_invalid_request_raises_before_state_change(engine):
    async def main():
        async for _ in engine.generate([], SamplingParams()):
            pass

    with pytest.raises(InvalidRequest) as e:
        asyncio.run(main())
    assert e.value.field == "prompt"
    assert engine.stats().num_waiting == 0
