"""The one-call native forward (torch.ops.flotilla.dense_layers) against the module path it
replaces: same kernels in the same order, so tokens and logprobs must be bit-identical."""

from __future__ import annotations

import random

import pytest

from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine import LLMEngine
from workers.config import ModelConfig
from workers.sampling_params import SamplingParams


def _engine(path: str, budget: int, dtype: str = "bfloat16", **model) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model=path, dtype=dtype, **model),
            cache=CacheConfig(block_size=8, num_blocks=256),  # a batch's worth
            scheduler=SchedulerConfig(max_num_batched_tokens=budget),
        )
    )


# (kind, dtype, model options, the ISA it needs): AMX bf16; float32 packed at load; int8
# weights per channel and group-wise (float32 activations)
KINDS = {
    "amx": (0, "bfloat16", {}, "amx"),
    "f32": (1, "float32", {}, "f32_packed"),
    "int8": (2, "float32", {"quantization": "int8"}, "w8"),
    "int8-g32": (2, "float32", {"quantization": "int8", "quantization_group_size": 32}, "w8"),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])  # plain, QKV bias, window
def test_dense_layers_match_module_path(arch, kind, tiny_model_dir, needs):
    code, dtype, options, isa = KINDS[kind]
    needs(isa)  # (the module path is tested everywhere)
    rng = random.Random(arch)
    prompts = [[rng.randrange(100, 49000) for _ in range(n)] for n in (5, 40, 17, 90, 1, 33)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)
    # budget 48: prompts split into chunks that share steps with running decodes (and, for
    # int8, steps past linear_w8's rows: linear_w8_gemm)
    fused, modules = (_engine(tiny_model_dir(arch), 48, dtype, **options) for _ in range(2))
    model = fused.executor.runner.model
    assert model._dense is not None and model._dense.kind == code
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


def test_kernel_plan_decides_the_model_paths(tiny_model_dir, kernel_plan):
    """What the engine runs follows the machine's plan: the one-call forward, the fused head
    and the packed linears exactly where the plan has AMX; the native modules where it is
    native; torch's everywhere with model.kernels = torch."""
    from parallel.layers import TORCH_LINEAR, LinearLayer
    from workers.linear_methods import AmxLinear

    runner = _engine(tiny_model_dir("llama"), 64).executor.runner
    assert runner.kernels == kernel_plan
    model = runner.model
    assert (model._dense is not None) == kernel_plan.amx  # bf16: only AMX's linears are in it
    f32 = _engine(tiny_model_dir("llama"), 64, "float32").executor.runner.model
    assert (f32._dense is not None) == kernel_plan.f32_packed == kernel_plan.dense_layers
    methods = [m.linear_method for m in model.modules() if isinstance(m, LinearLayer)]
    assert any(isinstance(m, AmxLinear) for m in methods) == kernel_plan.amx
    assert model.norm.native == kernel_plan.native
    path = tiny_model_dir("llama")
    torch_engine = LLMEngine(
        EngineConfig(
            model=ModelConfig(model=path, dtype="bfloat16", kernels="torch"),
            cache=CacheConfig(block_size=8, num_blocks=256),  # a batch's worth
        )
    )
    plain = torch_engine.executor.runner
    assert not plain.kernels.native and plain.model._dense is None
    for m in plain.model.modules():
        if isinstance(m, LinearLayer) and not plain.kernels.onednn_bf16:
            assert m.linear_method is TORCH_LINEAR


def test_greedy_lm_head_picks_the_sampled_token(tiny_model_dir, needs):
    """Plain greedy requests take the fused LM head (torch.ops.flotilla.amx_argmax: no logits
    written); asking for logprobs takes the logits and the sampler. Same tokens either way,
    for a batch mixing prefill chunks and decodes."""
    needs("amx")
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
