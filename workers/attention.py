"""Attention over the paged KV cache for mixed prefill + decode batches.

The flat token batch is laid out decodes first (one token per sequence), then prefill chunks.
Per step, `build_metadata` turns block tables into index tensors once; every layer reuses them.

- Decodes, CPU: one call of the native kernel `torch.ops.flotilla.paged_decode_attention`
  (workers/kernels), which reads K/V in place through the block tables, no copy.
- Decodes, elsewhere (CUDA, or a CPU where the kernel cannot be built): batched SDPA calls, one
  per group of similar context length. Keys/values are gathered block-wise from the cache into a
  padded [B, kv_heads, L, D] view with a length mask. Queries are grouped per KV head
  ([B, kv_heads, q_per_kv, D]) so grouped-query attention needs no K/V repetition.
- Prefill chunks, CPU in bfloat16 with AVX512-BF16, or float32 with AVX2 (over a float32 or
  int8 cache): one call of the native kernel `torch.ops.flotilla.paged_prefill_attention` for
  all chunks, reading K/V in place through the block tables (the chunk's own K/V are written
  to the cache first), causal from each chunk's offset; bf16 ~3.5x torch's CPU flash kernel,
  float32 no gathers and no output copy (it declines other dtypes/CPUs).
- Prefill chunks, elsewhere: one SDPA call each. A chunk with nothing cached before it attends
  to its own K/V (causal); a later chunk (chunked prefill or a prefix-cache hit) gathers the
  earlier context from the cache with an offset causal mask.
- Sliding windows are masks: key k is visible to query q iff q - window < k <= q.
- The int8 KV cache (`cache.kv_dtype: int8`, workers/kv_int8.py: an int8 tensor whose rows
  carry their float32 scale): the write quantizes (native `write_kv_cache_int8`, or torch),
  decodes run `paged_decode_attention_int8`, float32 prefill chunks the prefill kernel (which
  widens each row and applies its scale as it packs the keys), and the SDPA paths dequantize
  the blocks they gather -- for every prefill chunk, its own keys included (bf16 queries: the
  prefill kernel declines the int8 cache).

`scaled_dot_product_attention` picks FlashAttention / memory-efficient kernels on CUDA and a
fused flash kernel on CPU; the same code runs on both. Every index tensor and mask is made on
the KV cache's device (`build_metadata`'s `device`; masks on their lengths' device), so nothing
crosses between host and GPU inside the layers (tests/workers/test_device_placement.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers import kv_int8


@dataclass
class PrefillChunk:
    q_start: int  # offset in the flat batch
    q_len: int
    start_pos: int  # tokens cached before this chunk
    block_table: torch.Tensor  # blocks covering start_pos + q_len


@dataclass
class DecodeGroup:
    """Decodes of similar context length, batched into one attention call. Grouping by length
    keeps the padding (gathered but masked keys) small when lengths vary widely."""

    start: int  # offset of the group's first token in the flat batch
    count: int
    flat_blocks: torch.Tensor  # [count * max_blocks] block ids, row-major, zero-padded
    context_lens: torch.Tensor  # [count]
    max_blocks: int
    _masks: dict | None = None

    def mask(self, window: int | None, block_size: int) -> torch.Tensor:
        if self._masks is None:
            self._masks = {}
        mask = self._masks.get(window)
        if mask is None:
            ctx = self.context_lens[:, None]
            k = torch.arange(self.max_blocks * block_size, device=ctx.device)[None, :]
            mask = k < ctx
            if window is not None:
                mask &= k > ctx - 1 - window
            mask = self._masks[window] = mask[:, None, None, :]
        return mask


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V goes to
    positions: torch.Tensor  # [T]
    num_decodes: int
    decodes: list[DecodeGroup]
    prefills: list[PrefillChunk]
    block_size: int
    # Native decode kernel inputs (None: use the SDPA groups): int32 [num_decodes, max_blocks]
    # block tables (zero-padded) and int32 [num_decodes] context lengths.
    decode_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    # Native prefill kernel inputs (None: SDPA per chunk): int32 block tables [C, max_blocks]
    # (zero-padded), q_starts, q_lens, start_pos [C].
    prefill_kernel: tuple[torch.Tensor, ...] | None = None
    # Built lazily per window size and cached for the step (layers share them).
    _prefill_masks: dict | None = None

    @property
    def native(self) -> bool:
        """The step's attention runs the native kernels (which read q contiguous and take K/V
        already written to the cache)."""
        return self.decode_tables is not None or self.prefill_kernel is not None

    def prefill_mask(self, i: int, window: int | None) -> torch.Tensor | None:
        chunk = self.prefills[i]
        if chunk.start_pos == 0 and window is None:
            return None  # plain causal
        if self._prefill_masks is None:
            self._prefill_masks = {}
        key = (i, window)
        mask = self._prefill_masks.get(key)
        if mask is None:
            dev = chunk.block_table.device
            q = torch.arange(chunk.start_pos, chunk.start_pos + chunk.q_len, device=dev)[:, None]
            k = torch.arange(chunk.start_pos + chunk.q_len, device=dev)[None, :]
            mask = k <= q
            if window is not None:
                mask &= k > q - window
            self._prefill_masks[key] = mask
        return mask


def group_by_length(lens: list[int], min_group: int = 8, ratio: float = 1.5) -> list[int]:
    """Split decodes sorted by ascending context length into runs whose longest is at most
    `ratio` x their shortest (runs of at least `min_group`); returns the run sizes."""
    sizes: list[int] = []
    start = 0
    for i, n in enumerate(lens):
        if i - start >= min_group and n > ratio * lens[start]:
            sizes.append(i - start)
            start = i
    if lens:
        sizes.append(len(lens) - start)
    return sizes


def build_metadata(
    positions: list[int],
    slots: list[int],
    decode_tables: list[list[int]],
    decode_lens: list[int],
    prefills: list[tuple[int, int, int, list[int]]],
    block_size: int,
    device: torch.device,
    native: bool = False,
) -> AttentionMetadata:
    """`decode_tables`/`decode_lens` must be sorted by ascending length (the runner lays
    decodes out that way). `native`: attention goes to the native CPU kernels (decodes always;
    prefill chunks where the kernel accepts the dtype)."""
    groups: list[DecodeGroup] = []
    kernel_tables = kernel_lens = None
    if native and decode_tables:
        width = max(len(t) for t in decode_tables)
        kernel_tables = torch.tensor(
            [t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.int32, device=device
        )
        kernel_lens = torch.tensor(decode_lens, dtype=torch.int32, device=device)
    start = 0
    for size in group_by_length(decode_lens) if kernel_tables is None else []:
        tables = decode_tables[start : start + size]
        width = max(len(t) for t in tables)
        flat = [b for t in tables for b in t + [0] * (width - len(t))]
        groups.append(
            DecodeGroup(
                start=start,
                count=size,
                flat_blocks=torch.tensor(flat, device=device),
                context_lens=torch.tensor(decode_lens[start : start + size], device=device),
                max_blocks=width,
            )
        )
        start += size
    chunks = [
        PrefillChunk(q0, n, start, torch.tensor(table, device=device))
        for q0, n, start, table in prefills
    ]
    prefill_kernel = None
    if native and prefills:
        width = max(len(t) for *_, t in prefills)
        prefill_kernel = (
            torch.tensor(
                [t + [0] * (width - len(t)) for *_, t in prefills], dtype=torch.int32, device=device
            ),
            *(
                torch.tensor([c[i] for c in prefills], dtype=torch.int32, device=device)
                for i in range(3)
            ),
        )
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        positions=torch.tensor(positions, device=device),
        num_decodes=len(decode_tables),
        decodes=groups,
        prefills=chunks,
        block_size=block_size,
        decode_tables=kernel_tables,
        decode_lens=kernel_lens,
        prefill_kernel=prefill_kernel,
    )


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor | None,  # [T, KVH, D]; None: the step's k and v are in the cache already
    v: torch.Tensor | None,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KVH, D] (int8: D + 4, kv_int8)
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    T, H, D = q.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    kvh = k_cache.shape[2]
    native = meta.native
    int8 = kv_int8.is_int8(kv_cache)
    if k is not None:
        if native and k.stride(1) == D and v.stride(1) == D and k.stride(2) == v.stride(2) == 1:
            ops = torch.ops.flotilla
            write = ops.write_kv_cache_int8 if int8 else ops.write_kv_cache
            write(k_cache, v_cache, k, v, meta.slot_mapping)
        elif int8:
            kv_int8.write(k_cache, v_cache, k, v, meta.slot_mapping)
        else:
            k_cache.view(-1, kvh, D).index_copy_(0, meta.slot_mapping, k)
            v_cache.view(-1, kvh, D).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if native:
        q = q.contiguous()  # the native kernels' layout; one copy serves both

    if meta.decode_tables is not None:
        nd = meta.num_decodes
        decode = (
            torch.ops.flotilla.paged_decode_attention_int8
            if int8
            else torch.ops.flotilla.paged_decode_attention
        )
        decode(
            out[:nd],
            q[:nd],
            k_cache,
            v_cache,
            meta.decode_tables,
            meta.decode_lens,
            scale,
            window or 0,
        )

    def blocks(cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # index_select on a flat block list is a plain row copy (faster than advanced indexing)
        if int8:
            return kv_int8.gather(cache, ids, q.dtype)
        return cache.index_select(0, ids)

    for grp in meta.decodes:
        n, L = grp.count, grp.max_blocks * meta.block_size
        # [n*MB, bs, KVH, D] -> [n, KVH, MB*bs, D] as a view.
        kd = blocks(k_cache, grp.flat_blocks).view(n, L, kvh, D).transpose(1, 2)
        vd = blocks(v_cache, grp.flat_blocks).view(n, L, kvh, D).transpose(1, 2)
        s, e = grp.start, grp.start + n
        qd = q[s:e].view(n, kvh, H // kvh, D)
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=grp.mask(window, meta.block_size), scale=scale
        )
        out[s:e] = od.reshape(n, H, D)

    if meta.prefill_kernel is not None and torch.ops.flotilla.paged_prefill_attention(
        out, q, k_cache, v_cache, *meta.prefill_kernel, scale, window or 0
    ):
        return out
    for i, c in enumerate(meta.prefills):
        s, e = c.q_start, c.q_start + c.q_len
        qp = q[s:e].transpose(0, 1)  # [H, n, D]
        if c.start_pos == 0 and k is not None and not int8:
            kp, vp = k[s:e], v[s:e]
        else:  # (int8: a first chunk too reads its keys back quantized, see kv_int8)
            n_ctx = c.start_pos + c.q_len
            kp = blocks(k_cache, c.block_table).flatten(0, 1)[:n_ctx]
            vp = blocks(v_cache, c.block_table).flatten(0, 1)[:n_ctx]
        mask = meta.prefill_mask(i, window)
        # 4-D inputs: torch's CPU flash-attention kernel takes only those (3-D falls back to
        # the unfused math path, 3-4x slower here).
        op = F.scaled_dot_product_attention(
            qp[None],
            kp.transpose(0, 1)[None],
            vp.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=kvh != H,
        )
        out[s:e] = op[0].transpose(0, 1)
    return out
