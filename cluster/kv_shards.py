"""A replica group's KV blocks in the whole model's form, whatever its ranks' layout.

Each rank holds a shard of every KV block: the layers of its pipeline stage and the KV heads
of its tensor-parallel rank (workers.model_runner.ModelRunner.kv_shard says which). Exports
leave a group as

    [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]     -- the whole model's

so a group of any TP / PP / EP layout can import what a group of any other layout exported:
`gather` concatenates the ranks' shards (one rank per distinct shard: replicas hold the same
values), `scatter` cuts the shard each rank holds, replicas included.
"""

from __future__ import annotations

from typing import Any

import torch

Shard = dict[str, Any]  # {"layers": [first, last), "heads": [first, last), "head_dim", "dtype"}


def whole(shards: list[Shard]) -> tuple[int, int, int, str]:
    """(layers, KV heads, head dim, dtype) of the whole model the shards cover; raises when
    they do not tile it (a bug in a layout, never a user error)."""
    layers = max(s["layers"][1] for s in shards)
    heads = max(s["heads"][1] for s in shards)
    dims = {(s["head_dim"], s["dtype"]) for s in shards}
    if len(dims) != 1:
        raise ValueError(f"ranks disagree on the KV head dim / dtype: {sorted(dims)}")
    covered = {
        (layer, h) for s in shards for layer in range(*s["layers"]) for h in range(*s["heads"])
    }
    if len(covered) != layers * heads:
        raise ValueError(f"the ranks' KV shards do not cover {layers} layers x {heads} heads")
    ((head_dim, dtype),) = dims
    return layers, heads, head_dim, dtype


def holders(shards: list[Shard]) -> list[int]:
    """One rank per distinct shard: the ranks whose exports make up the whole."""
    seen: dict[tuple, int] = {}
    for rank, s in enumerate(shards):
        seen.setdefault((*s["layers"], *s["heads"]), rank)
    return sorted(seen.values())


def gather(
    shards: list[Shard], parts: dict[int, torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """The whole-model tensor from the holders' exports (`parts`: rank -> its shard), written
    into `out` where it has the whole's shape and dtype."""
    layers, heads, _, _ = whole(shards)
    first = next(iter(parts.values()))
    n, block_size, _, head_dim = first.shape[2:]
    shape = (layers, 2, n, block_size, heads, head_dim)
    if out is None or tuple(out.shape) != shape or out.dtype != first.dtype:
        out = torch.empty(shape, dtype=first.dtype)
    for rank, part in parts.items():
        (l0, l1), (h0, h1) = shards[rank]["layers"], shards[rank]["heads"]
        out[l0:l1, ..., h0:h1, :] = part
    return out


def scatter(shard: Shard, data: torch.Tensor) -> torch.Tensor:
    """The part of a whole-model tensor that a rank with `shard` holds (a copy of its own:
    it travels to the rank on its own)."""
    (l0, l1), (h0, h1) = shard["layers"], shard["heads"]
    return data[l0:l1, ..., h0:h1, :].contiguous()
