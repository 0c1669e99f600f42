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

A prefill group's engine exports a hand-off's blocks straight into a slot (`reserve`, from
the engine thread), so the hand-off copies the bytes once out of the paged cache and once into
the decode group's. It reserves the slot when the prompt is admitted, fills it chunk by chunk
as prefill completes full blocks (cluster/kv_export.py), and only then starts its hold
(`hold`): a slot being filled has no deadline -- the engine releases it itself if the request
ends without a hand-off.

Every slot starts with a 64-byte header holding its generation: a number given once per
reservation and cleared on release. The message names it; the reader checks it before and
after importing, so a slot freed and reused under a slow reader (its hold ran out) is
recomputed, never imported as another request's KV.

A slot not released within `hold_s` (the decode group died, or gave up) is freed by sweep().
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import threading
import time

import torch

_ALIGN = 64
_HEADER = 64  # bytes before a slot's data: its generation (int64), then padding
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
        # key -> (slot offset, length, deadline, generation)
        self._lent: dict[str, tuple[int, int, float, int]] = {}
        self._gens = itertools.count(1)
        self._gen_view = torch.frombuffer(self._mm, dtype=torch.int64)
        # reserve() runs on the engine thread, the rest on the group's event loop
        self._lock = threading.Lock()
        self.expired = 0

    def reserve(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, hold_s: float | None = None
    ) -> torch.Tensor | None:
        """A slot held under `key` for a tensor of `shape` and `dtype`: a tensor over it to
        write into, or None when the arena has no room (the caller uses other memory).
        `hold_s`: how long before sweep() frees it unreleased (None: the arena's hold_s;
        math.inf: until release(), or hold() starts the clock)."""
        n = dtype.itemsize
        for d in shape:
            n *= d
        need = _HEADER + -(-n // _ALIGN) * _ALIGN
        with self._lock:
            self._sweep_locked()
            self._release_locked(key)  # a key names one slot: an older one under it goes
            for i, (off, length) in enumerate(self._free):
                if length >= need:
                    rest = (off + need, length - need)
                    self._free[i : i + 1] = [rest] if rest[1] else []
                    gen = next(self._gens)
                    self._gen_view[off // 8] = gen
                    hold = self.hold_s if hold_s is None else hold_s
                    self._lent[key] = (off, need, time.monotonic() + hold, gen)
                    data = off + _HEADER
                    return self.buf[data : data + n].view(dtype).view(shape)
        return None

    def put(self, key: str, data: torch.Tensor) -> int | None:
        """Copy `data` into a free slot held under `key`; its offset, or None when the arena
        has no room (the caller sends the bytes another way)."""
        dst = self.reserve(key, tuple(data.shape), data.dtype)
        if dst is None:
            return None
        dst.copy_(data)
        return self.where(key)[0]  # type: ignore[index]

    def where(self, key: str) -> tuple[int, int] | None:
        """(offset of the data, generation) of the slot held under `key`, or None."""
        slot = self._lent.get(key)
        return None if slot is None else (slot[0] + _HEADER, slot[3])

    def hold(self, key: str) -> None:
        """Start the hold of `key`'s slot now (it was reserved to be filled, without one)."""
        with self._lock:
            slot = self._lent.get(key)
            if slot is not None:
                self._lent[key] = (slot[0], slot[1], time.monotonic() + self.hold_s, slot[3])

    def release(self, key: str) -> bool:
        with self._lock:
            return self._release_locked(key)

    def _release_locked(self, key: str) -> bool:
        slot = self._lent.pop(key, None)
        if slot is None:
            return False
        self._gen_view[slot[0] // 8] = 0  # a late reader of this slot now sees it is gone
        self._give_back(slot[0], slot[1])
        return True

    def sweep(self) -> None:
        with self._lock:
            self._sweep_locked()

    def _sweep_locked(self) -> None:
        now = time.monotonic()
        for key in [k for k, slot in self._lent.items() if slot[2] < now]:
            self.expired += 1
            self._release_locked(key)

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
        del self.buf, self._gen_view
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

    def generation(self, path: str, offset: int) -> int:
        """The generation now in the header of the slot whose data starts at `offset` (of an
        arena view() has mapped): 0 once its owner released it."""
        buf = self._maps[path][1]
        return int(buf[offset - _HEADER : offset - _HEADER + 8].view(torch.int64)[0])

    def forget(self, path: str) -> None:
        self._maps.pop(path, None)
