"""Greedy output of the engine against Hugging Face transformers `generate()`.

Random tiny models have near-tied logits, so for them we use vLLM's criterion: tokens equal up
to the first difference, and there each side's token is in the other's top-5 logprobs.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch
import transformers

from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine import LLMEngine
from workers.config import ModelConfig
from workers.sampling_params import SamplingParams

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe"]
NEW_TOKENS = 24


# (model, prompt, n) -> hf_greedy's answer: both dtypes (and both kernel backends) of a test
# are checked against the same float32 HF run, so it runs once.
_HF_RUNS: dict[tuple, tuple[list[int], list[set[int]]]] = {}


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[set[int]]]:
    """HF greedy tokens and the top-5 ids at each step."""
    key = (model, tuple(prompt), n)
    if key not in _HF_RUNS:
        _HF_RUNS[key] = _hf_greedy(model, prompt, n)
    return _HF_RUNS[key]


def _hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[set[int]]]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    toks = out.sequences[0, len(prompt) :].tolist()
    tops = [set(step[0].float().topk(5).indices.tolist()) for step in out.logits]
    return toks, tops


def assert_close_greedy(ours, theirs, our_tops, their_tops, label: str) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            assert a in their_tops[i] and b in our_tops[i], (
                f"{label}: first difference at token {i}: ours {a} not in HF top-5 "
                f"{their_tops[i]} or HF {b} not in our top-5 {our_tops[i]}"
            )
            return


def prompts_for(seed: int, lengths: list[int], shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(100, 49000) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(100, 49000) for _ in range(n)] for n in lengths]


# 512 blocks of 8 hold every scenario's batch; sizing the cache from free memory (the
# default) would give a tiny model ~10^6 tokens and add nothing to these checks.
CACHE = CacheConfig(block_size=8, num_blocks=512)
SCENARIOS = {
    # name: (cache config, scheduler config, prompt lengths, shared prefix)
    "mixed": (CACHE, SchedulerConfig(), [5, 40, 17, 63, 1], 0),
    "chunked": (
        CACHE,
        SchedulerConfig(max_num_batched_tokens=16),
        [5, 40, 70],
        0,
    ),
    "prefix": (
        CACHE,
        SchedulerConfig(max_num_batched_tokens=64),
        [3, 20, 9],
        33,
    ),
    "preempt": (CacheConfig(block_size=4, num_blocks=40), SchedulerConfig(), [30, 25, 41, 12], 0),
}


@pytest.fixture(scope="module")
def hf_models(tiny_model_dir):
    return {
        a: transformers.AutoModelForCausalLM.from_pretrained(
            tiny_model_dir(a), dtype=torch.float32
        ).eval()
        for a in ARCHS
    }


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_matches_hf(dtype, arch, scenario, tiny_model_dir, hf_models):
    """float32 and bfloat16 (on an AMX CPU its dense models run the one-call native forward,
    AMX linears included) against the float32 HF reference."""
    cache, sched, lengths, shared = SCENARIOS[scenario]
    engine = LLMEngine(
        EngineConfig(
            model=ModelConfig(model=tiny_model_dir(arch), dtype=dtype),
            cache=cache,
            scheduler=sched,
        )
    )
    prompts = prompts_for(zlib.crc32(f"{arch}/{scenario}".encode()), lengths, shared)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    if scenario == "prefix":
        # Warm the prefix cache with one request, then run the batch sharing its prefix.
        engine.generate(prompts[:1], params)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        theirs, their_tops = hf_greedy(hf_models[arch], prompt, NEW_TOKENS)
        our_tops = [set(lp.top_ids) for lp in out.logprobs]
        assert len(out.token_ids) == NEW_TOKENS
        assert_close_greedy(
            out.token_ids, theirs, our_tops, their_tops, f"{arch}/{scenario}/{dtype}"
        )
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if scenario == "prefix":
        assert all(o.num_cached_tokens >= 32 for o in outs)
    if scenario == "preempt":
        assert stats.num_preemptions > 0


def test_bf16_close_to_fp32_reference(tiny_model_dir, hf_models):
    engine = LLMEngine(
        EngineConfig(
            model=ModelConfig(model=tiny_model_dir("llama"), dtype="bfloat16"),
            cache=CACHE,
            scheduler=SchedulerConfig(max_num_batched_tokens=32),
        )
    )
    prompts = prompts_for(7, [9, 50, 23])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    for prompt, out in zip(prompts, engine.generate(prompts, params), strict=True):
        theirs, their_tops = hf_greedy(hf_models["llama"], prompt, NEW_TOKENS)
        our_tops = [set(lp.top_ids) for lp in out.logprobs]
        assert_close_greedy(out.token_ids, theirs, our_tops, their_tops, "llama/bf16")


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_many_decodes_grouped_by_length(arch, backend, tiny_model_dir, hf_models):
    """20 running requests with context lengths from 2 to ~230: the native kernel reads them in
    place; the SDPA path splits them into several length groups. Every request matches HF."""
    engine = LLMEngine(
        EngineConfig(
            model=ModelConfig(model=tiny_model_dir(arch), dtype="float32", kernels=backend),
            cache=CACHE,
        )
    )
    lengths = [2 + (i * 37) % 211 for i in range(20)]
    prompts = prompts_for(11, lengths)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5)
    for prompt, out in zip(prompts, engine.generate(prompts, params), strict=True):
        theirs, their_tops = hf_greedy(hf_models[arch], prompt, 8)
        our_tops = [set(lp.top_ids) for lp in out.logprobs]
        assert_close_greedy(out.token_ids, theirs, our_tops, their_tops, f"{arch}/many")
    assert engine.executor.runner.native == (backend == "native")
