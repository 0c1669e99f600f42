"""The form a prompt's KV takes between a prefill and a decode group: its raw bytes (bf16 and
fp16 as their 16-bit patterns) with dtype and shape beside them, and the layout they were cut
to (`KVLayout`), sent as one frame on the decode group's own connection to the prefill group's
data plane (cluster/wire.py `take_kv`) -- or, between groups on one node, left in a slot of the
prefill group's shared-memory arena (cluster/kv_arena.py), the frame saying where, or sent over
a torch.distributed pair group after the frame (cluster/kv_transports.py chooses). The sender hands the socket a view of the tensor's
memory (no serialization of the values); the receiver maps a tensor over the received bytes
and copies it into its blocks once.

The blocks are always the whole model's (cluster.kv_shards), so groups of different TP / PP /
EP layouts exchange them; what must match is the layout itself -- the same model, layer and
KV-head counts, head dim, dtype and block size. The importer checks that first: KV that does
not fit is recomputed (with the reason logged), never written into blocks it would corrupt.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


@dataclass(frozen=True)
class KVLayout:
    """What one block of a group's exported KV is: the whole model's, not a rank's."""

    model: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # torch's name without the prefix: float32, bfloat16, ...
    block_size: int

    def shape(self, n_blocks: int) -> tuple[int, ...]:
        """[layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]"""
        return (self.layers, 2, n_blocks, self.block_size, self.kv_heads, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def mismatch(self, sent: KVLayout) -> str | None:
        """Why KV of layout `sent` cannot go into a group of this layout, or None."""
        diff = [
            f"{f.name} {getattr(sent, f.name)!r} != {getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(sent, f.name) != getattr(self, f.name)
        ]
        return ", ".join(diff) if diff else None

    def check(self, token_ids: list[int], data: torch.Tensor, sent: KVLayout | None) -> None:
        """Raise ValueError naming what does not fit: the sender's layout, or the data's own
        shape and dtype (KV without a layout, e.g. from this process, is checked by those)."""
        why = sent and self.mismatch(sent)
        if why:
            raise ValueError(f"KV layout does not match this group's: {why}")
        want = self.shape(len(token_ids) // self.block_size)
        got_dtype = str(data.dtype).removeprefix("torch.")
        if tuple(data.shape) != want or got_dtype != self.dtype:
            raise ValueError(
                f"KV of shape {list(data.shape)} {got_dtype} for {len(token_ids)} tokens; this "
                f"group's is {list(want)} {self.dtype}"
            )


def pack(
    token_ids: list[int],
    data: torch.Tensor,
    layout: KVLayout,
    arena: tuple[str, int, int] | None = None,
) -> dict[str, Any]:
    """The message for `data`: its bytes inline, or (`arena`: (path, offset, generation))
    where in a same-node arena (cluster/kv_arena.py) they are."""
    dtype = data.dtype
    msg = header(token_ids, data, layout)
    if arena is not None:
        msg["arena"] = {"path": arena[0], "offset": arena[1], "gen": arena[2]}
        return msg
    data = data.contiguous()
    arr = data.view(_BITS[dtype]).numpy() if dtype in _BITS else data.numpy()
    msg["data"] = memoryview(arr.reshape(-1)).cast("B")
    return msg


def header(token_ids: list[int], data: torch.Tensor, layout: KVLayout) -> dict[str, Any]:
    """What every message says about the data besides where its bytes are."""
    return {
        "tokens": list(token_ids),
        "layout": asdict(layout),
        "dtype": str(data.dtype).removeprefix("torch."),
        "shape": list(data.shape),
    }


def unpack(
    msg: dict[str, Any], maps: Any = None
) -> tuple[list[int], torch.Tensor, KVLayout | None]:
    """The tokens, a tensor over the received buffer or the arena slot (the importer only
    reads it; `maps`: the reader's cluster.kv_arena.ArenaMaps) and the sender's layout (None
    from a sender that did not say)."""
    dtype = getattr(torch, msg["dtype"])
    layout = KVLayout(**msg["layout"]) if msg.get("layout") else None
    if msg.get("arena"):
        if maps is None:
            raise ValueError("KV in a shared-memory arena, but no arena maps to read it")
        a = msg["arena"]
        view = maps.view(a["path"], a["offset"], msg["shape"], dtype)
        if not arena_current(msg, maps):
            raise ValueError("the arena slot was released before it was read")
        return msg["tokens"], view, layout
    np_dtype = np.int16 if dtype in _BITS else torch.empty(0, dtype=dtype).numpy().dtype
    arr = np.frombuffer(msg["data"], dtype=np_dtype).reshape(msg["shape"])
    with warnings.catch_warnings():  # bytes are immutable; the importer only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(arr)
    return msg["tokens"], (t.view(dtype) if dtype in _BITS else t), layout


def arena_current(msg: dict[str, Any], maps: Any) -> bool:
    """The arena slot `msg` names still holds what was put there for it (its generation is
    unchanged): checked before and after an import reads it."""
    a = msg["arena"]
    return maps.generation(a["path"], a["offset"]) == a["gen"]
