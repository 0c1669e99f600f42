"""Shared by the kernel tests of the float cache (test_paged_kernel.py) and of the int8 cache
(test_kv_int8.py, test_kv_int8_prefill.py): float64 references for paged decode and prefill
attention, shuffled block tables, and the mixed decode + prefill batch they all run through
paged_attention with and without kernels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.attention import AttentionMetadata, build_metadata


def decode_reference(
    q: torch.Tensor,  # [n, H, D]
    cache: torch.Tensor,  # [2, blocks, block_size, KVH, row]
    tables: list[list[int]],
    lens: list[int],
    scale: float,
    window: int,
    to_float64: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.double,
) -> torch.Tensor:
    """Attention of each sequence's query over its cached keys and values (the last `window`
    ones if window > 0); `to_float64` turns gathered cache blocks into float64 [.., KVH, D]."""
    n, H, D = q.shape
    KVH = cache.shape[3]
    out = torch.empty(n, H, D, dtype=torch.float64)
    for i, (t, L) in enumerate(zip(tables, lens, strict=True)):
        k = to_float64(cache[0, t]).flatten(0, 1)[:L]  # [L, KVH, D]
        v = to_float64(cache[1, t]).flatten(0, 1)[:L]
        lo = max(0, L - window) if window else 0
        k, v = k[lo:], v[lo:]
        for h in range(H):
            kv = h // (H // KVH)
            s = (k[:, kv] @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(s, 0) @ v[:, kv]
    return out


def prefill_reference(
    q: torch.Tensor,  # [n, H, D]: one chunk's queries, at positions start_pos ..
    cache: torch.Tensor,  # [2, blocks, block_size, KVH, row]
    table: list[int],
    start_pos: int,
    scale: float,
    window: int,
    to_float64: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.double,
) -> torch.Tensor:
    """One prefill chunk's attention over its cached keys and values (earlier context and its
    own), causal from start_pos, the last `window` keys of each position if window > 0."""
    n, H, D = q.shape
    KVH = cache.shape[3]
    k = to_float64(cache[0, table]).flatten(0, 1)[: start_pos + n]  # [L, KVH, D]
    v = to_float64(cache[1, table]).flatten(0, 1)[: start_pos + n]
    pos = torch.arange(start_pos, start_pos + n)[:, None]
    key = torch.arange(start_pos + n)[None, :]
    visible = (key <= pos) & ((key > pos - window) if window else True)
    out = torch.empty(n, H, D, dtype=torch.float64)
    for h in range(H):
        kv = h // (H // KVH)
        s = (q[:, h].double() @ k[:, kv].T) * scale
        out[:, h] = torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ v[:, kv]
    return out


def shuffled_tables(need: list[int], spare: int, g: torch.Generator) -> tuple[list[list[int]], int]:
    """Block tables of need[i] blocks each, drawn without overlap from a shuffled pool with
    `spare` blocks left over; returns (tables, pool size)."""
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, i = [], 0
    for k in need:
        tables.append(perm[i : i + k])
        i += k
    return tables, num_blocks


@dataclass(frozen=True)
class MixedBatch:
    """One step's tokens: a decode per entry of dec_lens (ascending, first), then the prefill
    chunks; tables[i] is sequence i's block table (decodes first)."""

    dec_lens: list[int]
    tables: list[list[int]]
    num_blocks: int
    positions: list[int]
    slots: list[int]
    prefills: list[tuple[int, int, int, list[int]]]  # (q_start, q_len, start_pos, table)
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.positions)

    def metadata(self, native: bool) -> AttentionMetadata:
        nd = len(self.dec_lens)
        return build_metadata(
            self.positions,
            self.slots,
            self.tables[:nd],
            self.dec_lens,
            self.prefills,
            self.block_size,
            torch.device("cpu"),
            native=native,
        )


def mixed_batch(
    dec_lens: list[int],
    chunks: list[tuple[int, int]],  # (q_len, start_pos) per prefill chunk
    block_size: int,
    g: torch.Generator,
    spare: int = 2,
) -> MixedBatch:
    """Decodes of the given context lengths (their new token at position len - 1) and prefill
    chunks (fresh: start_pos 0, or continuing after cached context), on shuffled blocks."""
    bs = block_size
    need = [-(-n // bs) for n in dec_lens] + [-(-(n + s) // bs) for n, s in chunks]
    tables, num_blocks = shuffled_tables(need, spare, g)
    positions, slots, prefills = [], [], []
    for t, n in zip(tables, dec_lens, strict=False):
        positions.append(n - 1)
        slots.append(t[(n - 1) // bs] * bs + (n - 1) % bs)
    for t, (n, sp) in zip(tables[len(dec_lens) :], chunks, strict=True):
        prefills.append((len(positions), n, sp, t))
        positions += range(sp, sp + n)
        slots += [t[p // bs] * bs + p % bs for p in range(sp, sp + n)]
    return MixedBatch(dec_lens, tables, num_blocks, positions, slots, prefills, bs)
