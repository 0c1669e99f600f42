"""Shared memory for KV hand-offs between two groups on one node.

A prefill group keeps one arena: an anonymous memory file (memfd) that no path names -- it goes
away with the process, however that ends -- mapped once and touched once at start-up, so a
hand-off writes into memory that is already faulted in. Another process of this user on this
node opens it as /proc/<pid>/fd/<fd>. When a decode group on the same node takes a lease, the prompt's KV is copied into
a slot of the arena and the decode group gets the slot's place (path, offset, shape) instead
of the bytes; it maps the arena once, imports straight from it, then releases the slot. On
this kind of VM a copy into fresh memory costs 3-6x one into warm memory (page faults), and
the socket path copies the bytes five times -- this path copies them once more than an
in-process move (benchmarks/kv_transfer.py).

    KVArena(name, size)      the owner (prefill group): put / release / sweep / close
    ArenaMaps()              a reader's (decode group's) mappings of the arenas it was sent

A slot not released within `hold_s` (the decode group died, or gave up) is freed by sweep().
"""

from __future__ import annotations

import mmap
import os
import re
import time

import torch

_ALIGN = 64
_PROC_FD = re.compile(r"/proc/\d+/fd/\d+")


class KVArena:
    def __init__(self, name: str, size: int, hold_s: float = 60.0):
        self.size = size
        self.hold_s = hold_s
        self._fd = os.memfd_create(f"flotilla-kv-{name}", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, size)
        self._mm = mmap.mmap(self._fd, size)
        self.path = f"/proc/{os.getpid()}/fd/{self._fd}"
        self.buf = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.buf.zero_()  # fault every page in now, not during a hand-off
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted
        self._lent: dict[str, tuple[int, int, float]] = {}  # key -> (offset, length, deadline)
        self.expired = 0

    def put(self, key: str, data: torch.Tensor) -> int | None:
        """Copy `data` into a free slot held under `key`; its offset, or None when the arena
        has no room (the caller sends the bytes another way)."""
        self.sweep()
        n = data.numel() * data.element_size()
        need = -(-n // _ALIGN) * _ALIGN
        for i, (off, length) in enumerate(self._free):
            if length >= need:
                rest = (off + need, length - need)
                self._free[i : i + 1] = [rest] if rest[1] else []
                self._lent[key] = (off, need, time.monotonic() + self.hold_s)
                dst = self.buf[off : off + n].view(data.dtype).view(data.shape)
                dst.copy_(data)
                return off
        return None

    def release(self, key: str) -> bool:
        slot = self._lent.pop(key, None)
        if slot is None:
            return False
        self._give_back(slot[0], slot[1])
        return True

    def sweep(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, _, deadline) in self._lent.items() if deadline < now]:
            self.expired += 1
            self.release(key)

    def _give_back(self, off: int, length: int) -> None:
        free = sorted([*self._free, (off, length)])
        merged: list[tuple[int, int]] = []
        for o, n in free:  # coalesce neighbours so large prompts keep finding room
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((o, n))
        self._free = merged

    @property
    def lent(self) -> int:
        return len(self._lent)

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)

    def close(self) -> None:
        os.close(self._fd)
        del self.buf
        try:
            self._mm.close()
        except BufferError:  # a tensor still views it: the mapping goes with the process
            pass


class ArenaMaps:
    """The arenas a decode group has read from, each mapped once."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}

    def view(self, path: str, offset: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        if path not in self._maps:
            if not _PROC_FD.fullmatch(path):
                raise ValueError(f"not a KV arena: {path!r}")
            fd = os.open(path, os.O_RDWR)
            try:
                mm = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            self._maps[path] = (mm, torch.frombuffer(mm, dtype=torch.uint8))
        buf = self._maps[path][1]
        n = dtype.itemsize
        for d in shape:
            n *= d
        return buf[offset : offset + n].view(dtype).view(shape)

    def forget(self, path: str) -> None:
        self._maps.pop(path, None)
