"""The int8 KV cache (`cache.kv_dtype: int8`): layout, quantization and the torch paths.

Design. Each (token slot, KV head) row of K and of V is quantized when it is written,
symmetrically with its own float32 scale (scale = max|x| / 127, q = round(x / scale) in
[-127, 127]), so a block is never re-quantized: a later token cannot change an earlier row's
scale. The scale travels *inside* the row, in 4 trailing bytes:

    cache per layer: int8 [2 (K, V), num_blocks, block_size, kv_heads, head_dim + 4]
                     row = head_dim int8 values | the float32 scale's 4 bytes

so the int8 cache is still one tensor per layer with the block and head dims of the float
one, and everything that moves blocks as they are -- prefix caching (blocks shared by id),
export / import for the KV hand-off and disaggregated prefill / decode (cluster.kv_shards cuts
by layer and head; the scale goes with its head), the shared-memory arena -- carries the
scales without knowing about them. The exported layout says dtype int8 and a row of
head_dim + 4, so it never matches a float group's (cluster.kv_transfer refuses it; the
deploy config refuses pools whose cache.kv_dtype differ before anything starts).

Per SmolLM2-135M token and layer (3 KV heads x 64): K and V take 2 x 3 x 68 = 408 bytes
against 768 in bf16 and 1,536 in float32, so the same kv_cache_memory_gib holds 1.88x the
blocks of bf16 and 3.76x those of float32.

Who reads it: the native decode kernel (torch.ops.flotilla.paged_decode_attention_int8: the
float caches' one-pass flash-decoding loops, workers/kernels/decode_attention.h, with the
int8 row format of cache_rows.h) widens the int8 values to float32 in registers and applies
the scale once per row (to the score for keys, to the softmax weight for values); the native
prefill kernel for float32 queries (paged_prefill_attention, prefill_attention_f32.cpp, the
same row format) widens and scales each row as it packs a task's keys -- the float32 values
`dequantize` gives; the write op (write_kv_cache_int8) quantizes. Everything else -- the SDPA
decode fallback and prefill chunks the kernel declines (bf16 queries, a CPU without AVX2,
other head dims) -- dequantizes the gathered blocks here. A prefill chunk reads its *own*
keys and values back from the quantized cache too, like a later chunk and like vLLM: what a
token attends to never depends on how the prompt was chunked, and the perplexity test
measures the quantization error of every position, not only of positions past the first
chunk.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4  # one float32 per row
QMAX = 127.0


def is_int8(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.int8


def row_width(head_dim: int) -> int:
    """The int8 cache's last dim: the values, then the scale's bytes."""
    return head_dim + SCALE_BYTES


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[..., D] float -> [..., D + 4] int8 rows (values, then the float32 scale's bytes).
    The same float32 operations as the native write op, so both give the same bits: the
    amax, 127 / amax (0 for an all-zero row), x * that rounded half-to-even, amax / 127."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    qmax = torch.full_like(amax, QMAX)  # tensor / tensor: a true division (a python number
    # over a tensor is computed as its reciprocal times the number: other bits)
    inv = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    q = (xf * inv).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    scale = (amax / qmax).view(torch.int8)  # [..., 1] float32 -> [..., 4] bytes
    return torch.cat((q, scale), dim=-1)


def dequantize(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., D + 4] int8 rows -> [..., D] of `dtype` (values times their row's scale, in
    float32, then rounded to dtype: what the native kernel computes with)."""
    d = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., d:].contiguous().view(torch.float32)  # [..., 1]
    return (rows[..., :d].float() * scale).to(dtype)


def write(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots
) -> None:
    """Quantize k / v [T, KVH, D] into cache slots `slots` (the torch path of
    write_kv_cache_int8)."""
    kvh, width = k_cache.shape[-2:]
    k_cache.view(-1, kvh, width).index_copy_(0, slots, quantize(k))
    v_cache.view(-1, kvh, width).index_copy_(0, slots, quantize(v))


def gather(cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The given blocks of one of K / V, dequantized: [n, block_size, KVH, D]."""
    return dequantize(cache.index_select(0, block_ids), dtype)
