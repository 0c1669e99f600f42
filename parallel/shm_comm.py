"""All-reduce through shared memory for the CPU ranks of one node.

gloo's all-reduce costs a few hundred microseconds per call on loopback, however small the
tensor; a decode step of a tensor-parallel model makes two per layer. When every rank of a group
is on the same machine, `ShmAllReduce` replaces it: each rank copies its tensor into its slot of
one shared mapping, publishes a sequence number, waits for its peers' numbers and sums the slots
in rank order (so every rank ends with bitwise the same result). The native side is
`torch.ops.flotilla.shm_all_reduce` (parallel/kernels/shm_comm.cpp, a small library of its own
built by parallel/native_build.py); a rank that does not arrive within the timeout raises
instead of hanging.

Set-up is collective over the group: the group's first rank creates the file in /dev/shm and
broadcasts its name; once all ranks have mapped it, the name is unlinked (the mapping lives on
until the processes exit, and nothing is left behind in /dev/shm).
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import native_build

FLAG_BYTES = 64  # one cache line per rank's sequence flag (see parallel/kernels/shm_comm.cpp)

COMM_KERNELS = native_build.NativeLib(
    "flotilla_comm", sources=(native_build.KERNELS_DIR / "shm_comm.cpp",)
)


def load_comm_kernels() -> bool:
    """Build and register the shared-memory collectives; False where they cannot be built."""
    return native_build.load(COMM_KERNELS)


def _node_id() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class ShmAllReduce:
    """All-reduce (call it) and all-gather over one shared mapping; see the module doc."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        world: int,
        slot_bytes: int = 4 << 20,
        timeout_s: float = 300.0,
        shm_dir: str = "/dev/shm",
    ):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.seq = 0
        size = world * FLAG_BYTES + 2 * world * slot_bytes
        src = dist.get_global_rank(group, 0)
        names = [f"{shm_dir}/flotilla-ar-{uuid.uuid4().hex}" if rank == 0 else None]
        dist.broadcast_object_list(names, src=src, group=group)
        path = names[0]
        if rank == 0:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, size)  # zero-filled: every flag starts at 0
            finally:
                os.close(fd)
        dist.barrier(group=group)
        try:
            self.buf = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        finally:
            dist.barrier(group=group)
            if rank == 0:
                os.unlink(path)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's x, in rank order."""
        x = x.contiguous()
        out = x.new_empty(self.world, *x.shape)
        self.seq = torch.ops.flotilla.shm_all_gather(
            out, x, self.buf, self.rank, self.world, self.seq, self.timeout_s
        )
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place; returns x."""
        flat = x if x.is_contiguous() else x.contiguous()
        self.seq = torch.ops.flotilla.shm_all_reduce(
            flat, self.buf, self.rank, self.world, self.seq, self.timeout_s
        )
        if flat is not x:
            x.copy_(flat)
        return x


def make_shm_all_reduce(
    group: dist.ProcessGroup, rank: int, world: int, timeout_s: float
) -> ShmAllReduce | None:
    """A ShmAllReduce when every rank of `group` runs on this machine and the native kernels
    load on all of them; None otherwise (callers keep gloo). Collective over `group`."""
    here = (_node_id(), load_comm_kernels() and os.path.isdir("/dev/shm"))
    seen: list = [None] * world
    dist.all_gather_object(seen, here, group=group)
    if any(s != seen[0] or not s[1] for s in seen):
        return None
    return ShmAllReduce(group, rank, world, timeout_s=timeout_s)
