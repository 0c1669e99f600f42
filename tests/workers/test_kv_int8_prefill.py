"""Prefill attention over the int8 KV cache (workers/kv_int8.py): the native kernel for float32
queries (paged_prefill_attention -> prefill_attention_f32.cpp with the Int8Rows row format)
against a float64 reference over the dequantized cache, its declines, and chunked prefill
through paged_attention with and without native kernels. On a build without the AVX2 path
(tests/workers/test_kernel_targets.py runs this file on the portable one) the op declines and
the SDPA fallback over dequantized blocks is what the path tests check."""

from __future__ import annotations

import pytest
import torch
from attention_reference import prefill_reference, shuffled_tables

from workers import kv_int8
from workers.attention import build_metadata, paged_attention
from workers.kernels import load_cpu_kernels

BS = 4


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    assert load_cpu_kernels()


def _i32(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32)


def _setup(chunks, H, KVH, D, seed, q_dtype=torch.float32):
    """chunks: (q_len, start_pos) each, on shuffled blocks of a random int8 cache whose row
    scales spread over 0 .. 3x; returns q [T, H, D], cache, tables, starts, kernel args."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(n + s) // BS) for n, s in chunks]
    tables, num_blocks = shuffled_tables(need, 3, g)
    x = torch.randn(2, num_blocks, BS, KVH, D, generator=g)
    cache = kv_int8.quantize(x * torch.rand(2, num_blocks, BS, KVH, 1, generator=g) * 3)
    q = torch.randn(sum(n for n, _ in chunks), H, D, generator=g).to(q_dtype)
    starts = [sum(n for n, _ in chunks[:j]) for j in range(len(chunks))]
    width = max(need)
    args = (
        _i32([t + [0] * (width - len(t)) for t in tables]),
        _i32(starts),
        _i32([n for n, _ in chunks]),
        _i32([s for _, s in chunks]),
    )
    return q, cache, tables, starts, args


def _dequantized(x: torch.Tensor) -> torch.Tensor:
    return kv_int8.dequantize(x, torch.float64)


@pytest.mark.parametrize("D,H,KVH", [(64, 9, 3), (128, 4, 4), (64, 8, 1), (16, 4, 2), (96, 2, 1)])
@pytest.mark.parametrize("window", [0, 7])
def test_prefill_op_matches_float64_reference(D, H, KVH, window, needs):
    """Chunks of every kind in one call: from position 0, continuing after cached context (a
    later chunk of chunked prefill, or a prefix-cache hit), single tokens, odd lengths, spans
    longer than one task (64 positions) and than one register tile (4 rows); GQA 1..9 query
    heads per KV head. The kernel's keys are the dequantized values exactly, so only float32
    summation separates it from the float64 reference."""
    chunks = [(37, 0), (1, 0), (21, 13), (150, 0), (5, 203), (17, 16)]
    q, cache, tables, starts, args = _setup(chunks, H, KVH, D, D + H + window)
    needs("prefill_attention_f32")
    out = torch.zeros_like(q)
    assert torch.ops.flotilla.paged_prefill_attention(
        out, q, cache[0], cache[1], *args, D**-0.5, window
    )
    for (n, sp), t, q0 in zip(chunks, tables, starts, strict=True):
        want = prefill_reference(q[q0 : q0 + n], cache, t, sp, D**-0.5, window, _dequantized)
        torch.testing.assert_close(out[q0 : q0 + n].double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "D,q_dtype,runs",
    [
        (64, torch.float32, "plan"),  # the AVX2 path: runs where the plan has it
        (24, torch.float32, False),  # a head dim not compiled in
        (64, torch.bfloat16, False),  # bf16 queries (the bf16 kernel reads bf16 caches only)
    ],
    ids=["f32", "head-dim-24", "bf16"],
)
def test_prefill_op_declines_where_it_cannot_run(D, q_dtype, runs, kernel_plan):
    """A decline writes nothing (paged_attention then dequantizes for SDPA)."""
    q, cache, _, _, args = _setup([(8, 0), (5, 3)], 4, 2, D, seed=1, q_dtype=q_dtype)
    out = torch.zeros_like(q)
    ok = torch.ops.flotilla.paged_prefill_attention(out, q, cache[0], cache[1], *args, 0.125, 0)
    assert ok == (kernel_plan.prefill_attention_f32 if runs == "plan" else runs)
    assert out.any() == ok


def test_prefill_op_refuses_a_wrong_int8_row():
    q, cache, _, _, args = _setup([(8, 0)], 4, 2, 64, seed=2)
    short = cache[..., :64].contiguous()  # rows without their scales
    with pytest.raises(RuntimeError, match="head_dim \\+ 4"):
        torch.ops.flotilla.paged_prefill_attention(
            torch.empty_like(q), q, short[0], short[1], *args, 0.125, 0
        )
    with pytest.raises(RuntimeError, match="both be int8"):
        torch.ops.flotilla.paged_prefill_attention(
            torch.empty_like(q), q, cache[0], cache[1].float(), *args, 0.125, 0
        )


def _chunked(q, k, v, sizes, table, num_blocks, native, window):
    """One sequence's prompt through paged_attention as chunks of `sizes` tokens, each step
    writing its K/V (quantized) and attending to the cache so far; returns (out, cache)."""
    D, KVH = q.shape[2], k.shape[1]
    cache = torch.zeros(2, num_blocks, BS, KVH, kv_int8.row_width(D), dtype=torch.int8)
    outs, pos = [], 0
    for n in sizes:
        positions = list(range(pos, pos + n))
        slots = [table[p // BS] * BS + p % BS for p in positions]
        used = table[: -(-(pos + n) // BS)]
        meta = build_metadata(
            positions, slots, [], [], [(0, n, pos, used)], BS, torch.device("cpu"), native
        )
        s = slice(pos, pos + n)
        outs.append(paged_attention(q[s], k[s], v[s], cache, meta, D**-0.5, window))
        pos += n
    return torch.cat(outs), cache


@pytest.mark.parametrize("window", [None, 9])
def test_chunked_prefill_native_equals_torch_and_one_chunk(window):
    """A 45-token prompt (SmolLM2's 9 / 3 heads) in chunks of 16, 16 and 13, native (write op,
    prefill kernel where the plan has it) and torch (quantize, SDPA over dequantized blocks):
    the same cache bits, the same outputs within float32 error, equal to the float64 reference
    over the quantized cache -- and to the prompt run as one chunk, since every chunk reads its
    own keys back quantized, as later chunks do."""
    H, KVH, D, L = 9, 3, 64, 45
    g = torch.Generator().manual_seed(5)
    (table,), num_blocks = shuffled_tables([-(-L // BS)], 2, g)
    q, k, v = (torch.randn(L, h, D, generator=g) for h in (H, KVH, KVH))
    runs = {
        (native, sizes): _chunked(q, k, v, sizes, table, num_blocks, native, window)
        for native in (True, False)
        for sizes in ((16, 16, 13), (45,))
    }
    cache = runs[True, (16, 16, 13)][1]
    for _, c in runs.values():
        assert torch.equal(c, cache)
    want = prefill_reference(q, cache, table, 0, D**-0.5, window or 0, _dequantized)
    for out, _ in runs.values():
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-4)
