"""The int8 KV cache in whole engines (a tiny random Llama): prefix-cache hits reuse its blocks,
a prefill -> decode hand-off between two int8 engines carries the scales with the values (the
continuation is the colocated one), and KV from a float cache is refused, not converted."""

from __future__ import annotations

import pytest
import torch

from cluster.config import CacheConfig, EngineConfig
from cluster.engine import LLMEngine
from workers.config import ModelConfig
from workers.sampling_params import SamplingParams

BLOCK = 8
PROMPT = [100 + (13 * i) % 700 for i in range(45)]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_model_dir) -> dict[str, LLMEngine]:
    def make(kv_dtype: str) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=ModelConfig(model=tiny_model_dir("llama"), dtype="float32", num_threads=1),
                cache=CacheConfig(block_size=BLOCK, num_blocks=64, kv_dtype=kv_dtype),
            )
        )

    return {"colocated": make("int8"), "prefill": make("int8"), "decode": make("int8")}


def _run(engine: LLMEngine, rid: str) -> list:
    outs = []
    for _ in range(1000):
        outs += [o for o in engine.step() if o.request_id == rid]
        if outs and outs[-1].finished:
            return outs
    raise AssertionError(f"{rid} did not finish")


def test_prefix_cache_hit_reuses_int8_blocks(engines):
    e = engines["colocated"]
    assert e.executor.runner.kv_caches[0].dtype == torch.int8
    first = _run(e, e.add_request(PROMPT, GREEDY, "a"))[-1]
    again = _run(e, e.add_request(PROMPT, GREEDY, "b"))[-1]
    assert again.num_cached_tokens == len(PROMPT) // BLOCK * BLOCK
    # every prefill position read its keys back quantized, so a hit reads the same values
    assert again.token_ids == first.token_ids


def test_handoff_between_int8_engines_continues_exactly(engines):
    want = _run(engines["colocated"], engines["colocated"].add_request(PROMPT, GREEDY, "c"))[-1]
    prefill, decode = engines["prefill"], engines["decode"]
    head = _run(prefill, prefill.add_request(PROMPT, GREEDY, "p", handoff=True))[-1]
    assert head.finish_reason == "handoff"
    kv_tokens, data = head.kv
    assert data.dtype == torch.int8 and data.shape[-1] == 16 + 4  # values | scale bytes
    assert decode.import_kv(kv_tokens, data, prefill.kv_layout) == len(kv_tokens)
    tail = _run(decode, decode.add_request(PROMPT, GREEDY, "d", resume_output_ids=head.token_ids))
    assert tail[-1].num_cached_tokens == len(kv_tokens)  # the imported blocks, not recomputed
    assert tail[-1].token_ids == want.token_ids


def test_float_kv_is_refused_by_an_int8_engine(engines):
    decode = engines["decode"]
    layout = decode.kv_layout
    assert (layout.dtype, layout.head_dim) == ("int8", 20)
    tokens = PROMPT[:16]
    f32 = torch.zeros(layout.layers, 2, 2, BLOCK, layout.kv_heads, 16)
    sent = type(layout)(**{**vars(layout), "dtype": "float32", "head_dim": 16})
    with pytest.raises(ValueError, match="head_dim 16 != 20, dtype 'float32' != 'int8'"):
        decode.import_kv(tokens, f32, sent)
    with pytest.raises(ValueError, match="float32"):
        decode.import_kv(tokens, f32)  # no layout: the data's own shape and dtype
