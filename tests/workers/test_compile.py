"""model.compile=torch_compile (workers/models/compiled.py): the compiled torch path gives the
eager path's greedy tokens on tiny random Llama and Qwen3 models, over steps of many token
counts, in at most MAX_GRAPHS graphs per compiled function. The backends only trace (aot_eager
also functionalizes, as for inductor) without inductor's C++ builds (~100 s for the tiny model
here), so the float ops are eager's and the tokens must match exactly; inductor may reorder
float ops (benchmarks/compile_vs_eager.py compares its tokens on SmolLM2)."""

from __future__ import annotations

import random

import pytest

from cluster.config import CacheConfig, EngineConfig
from cluster.engine import LLMEngine
from parallel.config import ParallelConfig
from workers.config import ModelConfig
from workers.models import compiled
from workers.sampling_params import SamplingParams


# qwen3 (q/k norms) with the plain dynamo backend: the same graphs, traced only (cheaper)
@pytest.mark.parametrize(
    "arch,backend,batches", [("llama", "aot_eager", (1, 7, 3)), ("qwen3", "eager", (1, 5))]
)
def test_compiled_tokens_match_eager_with_bounded_graphs(arch, backend, batches, tiny_model_dir):
    mc = ModelConfig(
        model=tiny_model_dir(arch),
        dtype="float32",
        kernels="torch",
        compile="torch_compile",
        compile_backend=backend,
    )
    engine = LLMEngine(EngineConfig(model=mc, cache=CacheConfig(block_size=8, num_blocks=128)))
    model = engine.executor.runner.model
    layers = model.compiled
    assert isinstance(layers, compiled.CompiledLayers)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randrange(2, 20))] for _ in range(7)]
    sp = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0)

    def run() -> list[list[int]]:
        # decode steps of 1 and several rows (T = 3 after 7: no new graph), prefills of 2..~80
        return [o.token_ids for n in batches for o in engine.generate(prompts[:n], sp)]

    got = run()
    graphs = layers.graphs()
    assert 0 < graphs["before"] <= compiled.MAX_GRAPHS["before"], graphs
    assert 0 < graphs["after"] <= compiled.MAX_GRAPHS["after"], graphs
    model.compiled = None
    assert run() == got


def test_compile_config_errors():
    with pytest.raises(ValueError, match="model.compile=torch_compile with model.kernels=native"):
        ModelConfig(compile="torch_compile", kernels="native")
    with pytest.raises(ValueError, match="compile"):
        ModelConfig(compile="jit")
    with pytest.raises(ValueError, match="compile_backend"):
        ModelConfig(compile="torch_compile", compile_backend="cudagraphs")
    mc = ModelConfig(compile="torch_compile", kernels="torch")
    for field in ("tp", "pp", "ep"):
        with pytest.raises(ValueError, match=f"needs parallel.{field}=1"):
            EngineConfig(model=mc, parallel=ParallelConfig(**{field: 2}))
    EngineConfig(model=ModelConfig(kernels="native"), parallel=ParallelConfig(tp=2))  # compile off
    with pytest.raises(ValueError, match="compile backend 'jit'"):
        compiled.CompiledLayers("jit")


def test_compile_declines_native_kernels_and_experts():
    from types import SimpleNamespace

    from torch import nn

    class Fake(nn.Module):
        def __init__(self, moe=frozenset(), native=False):
            super().__init__()
            self.arch = SimpleNamespace(moe_layers=moe)
            self.norm = nn.Module()
            self.norm.native = native

    assert compiled.why_not(Fake()) is None
    assert "native CPU kernels" in compiled.why_not(Fake(native=True))
    assert "mixture-of-experts" in compiled.why_not(Fake(moe=frozenset({0})))
