"""model.quantization=int8 under tensor parallelism: two ranks (local processes on loopback gloo,
no Ray) each quantize their shards at load and decode greedily; the tokens equal the single
process's int8 tokens on a tiny seeded model (per-output-channel scales are whole-row scales on
every rank, and group-wise ones (model.quantization_group_size) cover whole groups of each
rank's columns, so both hold the same int8 values and scales; only float32 summation order
differs)."""

from __future__ import annotations

import functools
import os

import pytest
import torch.distributed as dist

PROMPTS = [[100 + (7 * i + j) % 900 for j in range(n)] for i, n in enumerate((5, 23, 40))]
TOKENS = 12
BLOCK = 8


def greedy(runner, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens per prompt through ModelRunner.execute (a whole-prompt prefill step, then
    decode steps); with tp > 1 the driver's tokens are broadcast so every rank feeds the same."""
    from workers.messages import NewRequest, SeqPlan, StepPlan
    from workers.sampling_params import SamplingParams

    per = -(-(max(map(len, prompts)) + n) // BLOCK)
    runner.allocate_kv(per * len(prompts))
    tables = [list(range(i * per, (i + 1) * per)) for i in range(len(prompts))]
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    new = [NewRequest(f"r{i}", p, params) for i, p in enumerate(prompts)]
    seqs = [SeqPlan(f"r{i}", p, 0, tables[i], True) for i, p in enumerate(prompts)]
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(n):
        res = runner.execute(StepPlan(step, seqs, new if step == 0 else []))
        toks = [res.token_ids if res is not None else None]
        if dist.is_initialized():
            dist.broadcast_object_list(toks, src=0)
        for i, t in enumerate(toks[0]):
            out[i].append(t)
        pos = [len(p) + step for p in prompts]
        seqs = [SeqPlan(f"r{i}", [t], pos[i], tables[i], True) for i, t in enumerate(toks[0])]
    return out


def _runner(model: str, group_size: int | None, groups=None):
    from workers.config import ModelConfig
    from workers.model_runner import ModelRunner

    mc = ModelConfig(
        model=model,
        dtype="float32",
        quantization="int8",
        quantization_group_size=group_size,
        num_threads=1,
    )
    return ModelRunner(mc, BLOCK) if groups is None else ModelRunner(mc, BLOCK, groups)


def _assert_int8(runner, group_size: int | None) -> None:
    from parallel.layers import LinearLayer
    from workers.linear_methods import Int8Linear
    from workers.quantization import is_int8

    layers = [m for m in runner.model.modules() if isinstance(m, LinearLayer)]
    assert len(layers) == 3 * 4 + 1  # qkv, o, gate|up, down per layer; the LM head
    assert all(is_int8(m) and isinstance(m.linear_method, Int8Linear) for m in layers)
    assert all(m.weight_scale.dim() == (1 if group_size is None else 2) for m in layers)


def _rank(model: str, group_size: int | None, rank: int, port: int, results) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    from parallel.config import ParallelConfig
    from parallel.groups import destroy_groups, init_groups

    groups = init_groups(
        ParallelConfig(tp=2, cpu_all_reduce="gloo"), rank, "127.0.0.1", port, "gloo"
    )
    runner = _runner(model, group_size, groups)
    _assert_int8(runner, group_size)
    results[rank] = greedy(runner, PROMPTS, TOKENS)
    destroy_groups()


# 32: the row-parallel o_proj's 64 inputs split into 32 per rank, one group each
@pytest.mark.parametrize("group_size", [None, 32])
def test_tp2_int8_matches_tp1_int8(tiny_model_dir, spawn_ranks, group_size):
    model = tiny_model_dir("qwen2")  # q/k/v biases: the kernel's bias path too
    single = _runner(model, group_size)
    _assert_int8(single, group_size)
    want = greedy(single, PROMPTS, TOKENS)
    got = spawn_ranks(functools.partial(_rank, model, group_size), 2, timeout_s=300)
    assert got[0] == got[1] == want
