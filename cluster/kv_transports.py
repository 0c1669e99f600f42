"""How a prompt's KV travels from a prefill group's lease to a decode group: one interface, the
transport chosen by placement. The decode group asks for one when it takes the lease
(`choose`); the prefill group answers through it (`Transport.send`, in take_kv); the answer
itself says how to read it (`arrive`, then kv_transfer.unpack), so a sender that had to fall
back (a full arena, no pair group) is still read right.

    shm     the groups share a node and the prefill group has an arena: the answer names a
            slot of it (cluster/kv_arena.py); the decode group imports in place, releases it
    dist    the groups joined one torch.distributed pair group (parallel/pair.py; gloo on
            CPU, NCCL on GPU -- the same code): the answer is a header, the bytes follow by
            send / recv on the pair's device
    inline  anything else: the raw bytes in the answer (one frame on the data-plane socket)

Which one a deployment asks for is pools.kv_transport (`MODES`; `wants_link` says which pair
groups a decode group opens, cluster/kv_links.py; `choose` what it asks for per hand-off).

The sender's data may sit in an arena slot already (the engine exports hand-offs there,
cluster/kv_export.py): shm lends it as it is, dist sends from it and releases it once sent,
inline copies it out and releases it at once.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import torch

from cluster import kv_transfer
from cluster.kv_transfer import KVLayout


class Transport(Protocol):
    via: str

    def send(
        self, request_id: str, tokens: list[int], data: torch.Tensor, layout: KVLayout
    ) -> dict[str, Any]:
        """take_kv's answer for the KV held under `request_id`'s lease (the prefill side)."""
        ...


# pools.kv_transport (deploy/config.py): which of them a deployment asks for
MODES = ("auto", "shm", "inline", "dist")


def wants_link(mode: str, backend: str, same_node: bool, arena: bool) -> bool:
    """Whether a decode group joins a pair group with a prefill group: always for "dist";
    for "auto" only where NCCL can carry the bytes (both groups on CUDA: `backend` is
    "nccl") and shared memory cannot (another node, or no arena)."""
    if mode == "dist":
        return True
    return mode == "auto" and backend == "nccl" and not (same_node and arena)


def choose(
    source: dict[str, Any],
    here_node: str | None,
    links: dict[str, Any],
    mode: str = "auto",
    arena: bool = True,
) -> str:
    """The transport a decode group asks for, from where the prefill group `source` is and
    the deployment's mode: a pair group where one is open (only wanted ones are: wants_link),
    else the same node's arena, else inline. A mode whose transport is not there right now
    (a pair group not open yet or failed, another node for shm) falls back the same way."""
    if mode == "inline":
        return "inline"
    if mode in ("auto", "dist") and source.get("group") in links:
        return "dist"
    if arena and here_node and source.get("node_id") == here_node:
        return "shm"
    return "inline"


class Inline:
    via = "inline"

    def __init__(self, arena: Any = None):
        self.arena = arena

    def send(self, request_id, tokens, data, layout):
        if self.arena is not None and self.arena.where(request_id) is not None:
            data = data.clone()  # the slot goes back now; the socket sends from this copy
            self.arena.release(request_id)
        return kv_transfer.pack(tokens, data, layout)


class Shm:
    via = "shm"

    def __init__(self, arena: Any):
        self.arena = arena

    def send(self, request_id, tokens, data, layout):
        arena = self.arena
        at = arena.where(request_id)
        if at is None and arena.put(request_id, data) is None:  # exported into new memory
            return kv_transfer.pack(tokens, data, layout)  # and the arena is full: inline
        return kv_transfer.pack(tokens, data, layout, arena=(arena.path, *arena.where(request_id)))


class Dist:
    """Send / recv over a parallel.pair.PairGroup with the decode group (rank 0 sends)."""

    via = "dist"

    def __init__(self, pair: Any, arena: Any = None):
        self.pair = pair
        self.arena = arena

    def send(self, request_id, tokens, data, layout):
        tag = self.pair.next_tag()
        # raw bytes: any dtype, the same on gloo and NCCL
        wire = data.contiguous().view(torch.uint8).reshape(-1).to(self.pair.device)
        work = self.pair.send(wire, tag)
        in_slot = self.arena is not None and self.arena.where(request_id) is not None
        loop = asyncio.get_running_loop()

        def sent(wire: torch.Tensor = wire) -> None:  # in a thread: `wire` (maybe the slot)
            try:  # stays until the peer has it
                work.wait(self.pair.timeout)
            finally:
                if in_slot:
                    self.arena.release(request_id)

        loop.run_in_executor(None, sent)
        return kv_transfer.header(tokens, data, layout) | {
            "dist": {"tag": tag, "bytes": wire.numel()}
        }


def sender(via: str, arena: Any = None, pair: Any = None) -> Transport:
    """The prefill side's transport for what the taker asked (falling back to inline)."""
    if via == "dist" and pair is not None:
        return Dist(pair, arena)
    if via == "shm" and arena is not None:
        return Shm(arena)
    return Inline(arena)


async def arrive(msg: dict[str, Any], pair: Any = None) -> dict[str, Any]:
    """The decode side, first: a "dist" answer's bytes, received from the pair group into
    the answer's inline form; any other answer as it is. kv_transfer.unpack then reads
    either (inline bytes, or in place from an arena slot)."""
    if not msg.get("dist"):
        return msg
    if pair is None:
        raise ValueError("KV sent over a pair group this group has no link to")
    d = msg["dist"]
    buf = torch.empty(d["bytes"], dtype=torch.uint8, device=pair.device)
    await asyncio.to_thread(pair.recv, buf, d["tag"])
    return msg | {"data": buf.cpu().numpy()}  # ("dist" stays: it says how it came)
