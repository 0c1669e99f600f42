"""KV blocks exported from one engine and imported into another's prefix cache give the same
continuation without recomputing the prompt (the prefill -> decode hand-off)."""

from __future__ import annotations

from cluster.config import CacheConfig, EngineConfig
from cluster.engine import LLMEngine
from workers.config import ModelConfig
from workers.sampling_params import SamplingParams


def test_export_import_roundtrip(tiny_model_dir):
    cfg = EngineConfig(
        model=ModelConfig(model=tiny_model_dir("qwen3"), dtype="float32"),
        cache=CacheConfig(block_size=8, num_blocks=64),
    )
    prefill, decode = LLMEngine(cfg), LLMEngine(cfg)
    prompt = [100 + (13 * i) % 700 for i in range(45)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    rid = prefill.add_request(prompt, params)
    prefill.step()  # computes the whole prompt (45 tokens fit the budget) and samples one
    tokens, data = prefill.export_kv(rid)
    assert len(tokens) == 40  # 5 full blocks
    expected = prefill.generate([prompt], params)  # a second, identical request, for reference
    imported = decode.import_kv(tokens, data)
    assert imported == 40
    out = decode.generate([prompt], params)[0]
    assert out.num_cached_tokens == 40  # the prompt came from the imported blocks
    assert out.token_ids == expected[0].token_ids
    assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks
