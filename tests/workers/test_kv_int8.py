"""The int8 KV cache (workers/kv_int8.py): its quantization, the native write and decode ops
against torch references (on this machine's path, and via test_kernel_targets' OP_TESTS on
the portable one), and the whole attention path with and without native kernels (the
prefill op: test_kv_int8_prefill.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_reference import decode_reference, mixed_batch, shuffled_tables

from workers import kv_int8
from workers.attention import paged_attention
from workers.kernels import load_cpu_kernels

BS = 4


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    assert load_cpu_kernels()


def _int8_cache(num_blocks: int, KVH: int, D: int, g: torch.Generator) -> torch.Tensor:
    """A random int8 cache: float rows with a spread of magnitudes, quantized."""
    x = torch.randn(2, num_blocks, BS, KVH, D, generator=g)
    x *= torch.rand(2, num_blocks, BS, KVH, 1, generator=g) * 3
    return kv_int8.quantize(x)


def test_quantize_round_trips_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=g) * torch.rand(50, 3, 1, generator=g) * 10
    x[7, 1] = 0  # an all-zero row: scale 0, values 0
    rows = kv_int8.quantize(x)
    assert rows.dtype == torch.int8 and rows.shape == (50, 3, 68)
    back = kv_int8.dequantize(rows, torch.float32)
    scale = x.abs().amax(-1, keepdim=True) / 127
    assert (back - x).abs().le(scale * 0.501).all()
    assert not back[7, 1].any()
    assert rows[..., :64].abs().amax(-1).eq(127).sum() == 50 * 3 - 1  # each row uses the range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_op_quantizes_like_torch(dtype):
    """The native write gives the same bits as kv_int8.write, from k / v that are views of a
    fused QKV output (token stride > KVH * D), into shuffled slots."""
    g = torch.Generator().manual_seed(1)
    T, KVH, D = 13, 3, 64
    qkv = (torch.randn(T, 9 * D, generator=g) * 4).to(dtype)
    k = qkv[:, 3 * D : 6 * D].view(T, KVH, D)  # row stride 9 * D
    v = qkv[:, 6 * D : 9 * D].view(T, KVH, D)
    k[2] = 0
    slots = torch.randperm(6 * BS, generator=g)[:T]
    native = torch.zeros(2, 6, BS, KVH, D + 4, dtype=torch.int8)
    ref = native.clone()
    torch.ops.flotilla.write_kv_cache_int8(native[0], native[1], k, v, slots)
    kv_int8.write(ref[0], ref[1], k, v, slots)
    assert torch.equal(native, ref)
    assert native[1].view(-1, KVH, D + 4)[slots].any(-1).all()  # written
    assert not native[0].view(-1, KVH, D + 4)[slots[2]].any()  # a zero row: values, scale 0


def _reference(q, cache, tables, lens, scale, window):
    """float64 attention over the dequantized cache."""
    return decode_reference(
        q, cache, tables, lens, scale, window, lambda x: kv_int8.dequantize(x, torch.float64)
    )


def _decode(q, cache, tables, lens, scale, window):
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    out = torch.empty_like(q)
    torch.ops.flotilla.paged_decode_attention_int8(
        out, q, cache[0], cache[1], bt, torch.tensor(lens, dtype=torch.int32), scale, window
    )
    return out


@pytest.mark.parametrize("D,H,KVH", [(64, 9, 3), (128, 4, 2), (16, 4, 4), (24, 6, 2)])
@pytest.mark.parametrize("window", [0, 5])
def test_decode_op_matches_float64_reference(D, H, KVH, window):
    """D 64 / 128 / 16: the one-pass path of the build (AVX2: 8 tokens a chunk, value passes
    of 16 columns x G = 1, 2, 3 query heads; AVX-512: 16 tokens a chunk), over several chunks
    and a partial last one; D 24: the three plain passes on any build. GQA, shuffled blocks,
    partial blocks, row scales spread over 0 .. 3x."""
    g = torch.Generator().manual_seed(D + H + window)
    lens = [1, 3, 4, 17, 33, 60]
    tables, nb = shuffled_tables([-(-n // BS) for n in lens], 3, g)
    cache = _int8_cache(nb, KVH, D, g)
    q = torch.randn(len(lens), H, D, generator=g)
    got = _decode(q, cache, tables, lens, D**-0.5, window)
    want = _reference(q, cache, tables, lens, D**-0.5, window)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_decode_op_bf16_queries():
    g = torch.Generator().manual_seed(7)
    lens = [2, 9, 40]
    tables, nb = shuffled_tables([-(-n // BS) for n in lens], 1, g)
    cache = _int8_cache(nb, 2, 64, g)
    q = torch.randn(len(lens), 6, 64, generator=g).bfloat16()
    got = _decode(q, cache, tables, lens, 0.125, 0)
    assert got.dtype == torch.bfloat16
    want = _reference(q, cache, tables, lens, 0.125, 0)
    torch.testing.assert_close(got, want.to(torch.bfloat16), atol=1e-3, rtol=2**-7)


def test_ops_refuse_a_float_cache_or_a_wrong_row():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 16, generator=g)
    args = (torch.tensor([[0]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32), 0.25, 0)
    for cache, why in (
        (torch.zeros(2, 1, BS, 2, 20), "int8"),
        (torch.zeros(2, 1, BS, 2, 16, dtype=torch.int8), "expected head_dim 16 \\+ 4"),
    ):
        with pytest.raises(RuntimeError, match=why):
            torch.ops.flotilla.paged_decode_attention_int8(
                torch.empty_like(q), q, cache[0], cache[1], *args
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
def test_attention_path_native_equals_torch(dtype, window):
    """A mixed batch (decodes, a first prefill chunk, a continuing one) through paged_attention
    on an int8 cache, native (write op, int8 decode kernel, the prefill kernel for float32
    where the plan has it, else SDPA) and torch (quantize + SDPA over dequantized blocks): the
    same cache bits, close outputs; and a first chunk attends to its own keys *as quantized*,
    not to the float k / v it was handed. Prefill op: test_kv_int8_prefill.py."""
    H, KVH, D = 6, 2, 64
    g = torch.Generator().manual_seed(3)
    batch = mixed_batch([5, 9], [(12, 0), (7, 10)], BS, g)
    cache = _int8_cache(batch.num_blocks, KVH, D, g)
    T = batch.num_tokens
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype) for h in (H, KVH, KVH))
    outs, caches = [], []
    for native in (True, False):
        c = cache.clone()
        outs.append(paged_attention(q, k, v, c, batch.metadata(native), D**-0.5, window))
        caches.append(c)
    assert torch.equal(caches[0], caches[1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)
    # the first chunk (12 tokens from position 0), against causal SDPA on its quantized keys
    q0 = len(batch.dec_lens)
    kq = kv_int8.dequantize(kv_int8.quantize(k[q0 : q0 + 12]), dtype)
    vq = kv_int8.dequantize(kv_int8.quantize(v[q0 : q0 + 12]), dtype)
    mask = None if window is None else torch.ones(12, 12).tril().triu(-(window - 1)).bool()
    want = F.scaled_dot_product_attention(
        q[q0 : q0 + 12].transpose(0, 1)[None],
        kq.transpose(0, 1)[None],
        vq.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=mask is None,
        scale=D**-0.5,
        enable_gqa=True,
    )[0].transpose(0, 1)
    torch.testing.assert_close(outs[1][q0 : q0 + 12], want, atol=tol, rtol=tol)
