"""Multi-rank replica groups on a real (loopback) Ray cluster: TP, PP, TP x PP, EP, TP + EP.

Greedy tokens must be identical to the single-process engine (same numerics, float32) and
close to Hugging Face by the top-5 criterion; each rank holds only its slice of the weights;
bad layouts fail at start-up with the numbers; a dead rank fails requests instead of hanging.
"""

from __future__ import annotations

import asyncio

import pytest
import ray

from cluster.async_engine import AsyncEngine
from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine import LLMEngine
from parallel.config import ParallelConfig
from workers.config import ModelConfig
from workers.errors import EngineDead
from workers.sampling_params import SamplingParams

PROMPTS = [[100 + (7 * i + j) % 900 for j in range(n)] for i, n in enumerate((5, 37, 20, 61))]
PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(model: str, tp=1, pp=1, ep=1, **par) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=model, dtype="float32"),
        cache=CacheConfig(block_size=8, num_blocks=128),
        scheduler=SchedulerConfig(max_num_batched_tokens=48),  # chunked prefill
        parallel=ParallelConfig(tp=tp, pp=pp, ep=ep, cpus_per_rank=0.5, **par),
    )


_reference: dict[str, list[list[int]]] = {}


def _single(model: str) -> list[list[int]]:
    if model not in _reference:
        eng = LLMEngine(_config(model))
        _reference[model] = [o.token_ids for o in eng.generate(PROMPTS, PARAMS)]
    return _reference[model]


LAYOUTS = [
    ("qwen3", dict(tp=2)),
    ("qwen3", dict(tp=2, cpu_all_reduce="gloo")),
    ("qwen3", dict(pp=2)),
    ("qwen3", dict(tp=2, pp=2)),
    ("mixtral", dict(ep=2)),
    ("mixtral", dict(tp=2, ep=2)),
    ("qwen3_moe", dict(ep=2)),
    ("qwen3_moe", dict(tp=2, ep=2)),
    ("qwen2_moe", dict(tp=2)),
]


@pytest.mark.parametrize("arch,layout", LAYOUTS, ids=[f"{a}-{lay}" for a, lay in LAYOUTS])
def test_parallel_matches_single_process(arch, layout, tiny_model_dir):
    model = tiny_model_dir(arch)
    eng = LLMEngine(_config(model, **layout))
    try:
        outs = eng.generate(PROMPTS, PARAMS)
        assert [o.token_ids for o in outs] == _single(model)
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        if layout.get("tp", 1) > 1:
            # Ranks on one node all-reduce through shared memory unless told to use gloo.
            want = "dist" if layout.get("cpu_all_reduce") == "gloo" else "shm"
            ranks = eng.executor.describe()
            assert len(ranks) == layout["tp"] * layout.get("pp", 1)
            assert {d["tp_all_reduce"] for d in ranks} == {want}
        if layout.get("tp", 1) > 1 and "ep" not in layout:
            full = sum(eng.executor.param_bytes()[:1])
            single = LLMEngine(_config(model)).executor.runner.param_bytes()
            # Sharded weights halve; norms, router and replicated bits stay whole.
            assert full < 0.62 * single, (full, single)
    finally:
        eng.shutdown()


def test_smollm2_pp2_and_tp3_match_single(smollm2_path):
    ref = LLMEngine(_config(smollm2_path)).generate(PROMPTS[:2], PARAMS)
    for layout in (dict(pp=2), dict(tp=3)):
        eng = LLMEngine(_config(smollm2_path, **layout))
        try:
            outs = eng.generate(PROMPTS[:2], PARAMS)
            assert [o.token_ids for o in outs] == [o.token_ids for o in ref], layout
        finally:
            eng.shutdown()


@pytest.mark.parametrize(
    "arch,layout,message",
    [
        ("smollm2", dict(tp=2), "tp=2 does not divide 9 attention heads"),
        ("mixtral", dict(ep=3), "ep=3 does not divide 4 experts"),
        ("llama", dict(pp=4), "pp=4 is larger than the 3 layers"),
        ("llama", dict(ep=2), "ep=2 but the model has no experts"),
    ],
)
def test_bad_layouts_fail_at_startup(arch, layout, message, tiny_model_dir, smollm2_path):
    model = smollm2_path if arch == "smollm2" else tiny_model_dir(arch)
    with pytest.raises(ValueError, match=message):
        LLMEngine(_config(model, **layout))


def test_unplaceable_group_fails_after_bounded_wait(tiny_model_dir):
    cfg = _config(tiny_model_dir("qwen3"), tp=2, pp=2, placement_timeout_s=2)
    cfg = cfg.model_copy(
        update={"parallel": cfg.parallel.model_copy(update={"cpus_per_rank": 3.0})}
    )
    with pytest.raises(RuntimeError, match=r"cannot place 4 ranks x 3 CPU within 2s"):
        LLMEngine(cfg)


def test_dead_rank_fails_inflight_requests(tiny_model_dir):
    eng = AsyncEngine(_config(tiny_model_dir("qwen3"), tp=2, step_timeout_s=30))

    async def run():
        stream = eng.generate(PROMPTS[1], SamplingParams(max_tokens=500, ignore_eos=True))
        first = await stream.__anext__()
        assert not first.finished
        ray.kill(eng.engine.executor.actors[1])
        async for _ in stream:
            pass

    try:
        with pytest.raises(EngineDead):
            asyncio.run(asyncio.wait_for(run(), timeout=60))
        assert eng.engine.executor.healthy is False
    finally:
        eng.shutdown()
