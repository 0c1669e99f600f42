"""The one-call native forward (torch.ops.flotilla.dense_layers) against the module path it
replaces: same kernels in the same order, so tokens and logprobs must be bit-identical."""

from __future__ import annotations

import random

import pytest

from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine import LLMEngine
from workers.config import ModelConfig
from workers.kernels import cpu_has_amx
from workers.sampling_params import SamplingParams


def _engine(path: str, budget: int) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model=path, dtype="bfloat16"),
            cache=CacheConfig(block_size=8),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget),
        )
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])  # plain, QKV bias, window
def test_dense_layers_match_module_path(arch, tiny_model_dir):
    if not cpu_has_amx():
        pytest.skip("dense_layers runs on AMX CPUs only (the module path is tested everywhere)")
    rng = random.Random(arch)
    prompts = [[rng.randrange(100, 49000) for _ in range(n)] for n in (5, 40, 17, 90, 1, 33)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)
    # budget 48: prompts split into chunks that share steps with running decodes
    fused, modules = _engine(tiny_model_dir(arch), 48), _engine(tiny_model_dir(arch), 48)
    model = fused.executor.runner.model
    assert model._dense is not None
    calls = 0
    run = model._dense_layers

    def counted(*a):
        nonlocal calls
        calls += 1
        return run(*a)

    model._dense_layers = counted
    modules.executor.runner.model._dense = None
    a, b = fused.generate(prompts, params), modules.generate(prompts, params)
    assert calls > 0
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.logprobs == y.logprobs  # dataclasses: every float compared exactly


def test_dense_layers_decline_q_k_norms(tiny_model_dir):
    """Qwen3's per-head q/k norms are not in the one-call path: that model keeps the modules."""
    engine = _engine(tiny_model_dir("qwen3"), 64)
    assert engine.executor.runner.model._dense is None


def test_greedy_lm_head_picks_the_sampled_token(tiny_model_dir):
    """Plain greedy requests take the fused LM head (torch.ops.flotilla.amx_argmax: no logits
    written); asking for logprobs takes the logits and the sampler. Same tokens either way,
    for a batch mixing prefill chunks and decodes."""
    if not cpu_has_amx():
        pytest.skip("the fused greedy head runs on AMX CPUs only")
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 49000) for _ in range(n)] for n in (5, 40, 17, 90, 1, 33)]
    engine = _engine(tiny_model_dir("llama"), 48)
    model = engine.executor.runner.model
    fused = 0
    head = model.greedy_tokens

    def counted(hidden):
        nonlocal fused
        out = head(hidden)
        fused += out is not None
        return out

    model.greedy_tokens = counted
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    a = engine.generate(prompts, plain)
    steps = fused
    assert steps > 0
    b = engine.generate(prompts, plain.model_copy(update={"logprobs": 1}))
    assert fused == steps  # logprobs need the logits: the sampler path
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert [lp.top_ids[0] for lp in y.logprobs] == y.token_ids  # greedy = the top logprob
