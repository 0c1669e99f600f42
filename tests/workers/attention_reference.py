"""A float64 reference for paged decode attention, shared by the kernel tests of the float
cache (test_paged_kernel.py) and of the int8 cache (test_kv_int8.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch


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
