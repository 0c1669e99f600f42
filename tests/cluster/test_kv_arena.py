"""The same-node KV arena (cluster/kv_arena.py): slots are lent, read in another process through
/proc/<pid>/fd, released, coalesced, swept when not released, and a full arena says so."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from cluster import kv_transfer
from cluster.kv_arena import ArenaMaps, KVArena
from cluster.kv_transfer import KVLayout


def _read_sum(path: str, offset: int, shape: list[int], q) -> None:
    q.put(float(ArenaMaps().view(path, offset, shape, torch.float32).double().sum()))


def test_another_process_reads_the_slot():
    arena = KVArena("t", 1 << 20)
    x = torch.randn(3, 5, 7)
    off = arena.put("r1", x)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_read_sum, args=(arena.path, off, list(x.shape), q))
    p.start()
    try:
        assert q.get(timeout=60) == pytest.approx(float(x.double().sum()))
    finally:
        p.join(timeout=60)
    assert arena.release("r1") and not arena.release("r1")
    arena.close()


def test_slots_are_lent_released_coalesced_and_swept(monkeypatch):
    arena = KVArena("t", 4096, hold_s=10)
    a = torch.ones(256)  # 1 KiB each
    offs = [arena.put(f"r{i}", a) for i in range(4)]
    assert offs == [0, 1024, 2048, 3072] and arena.free_bytes == 0
    assert arena.put("full", a) is None  # no room: the caller sends it inline
    arena.release("r1")
    arena.release("r2")
    assert arena.put("big", torch.ones(512)) == 1024  # the two freed neighbours merged
    import cluster.kv_arena as mod

    now = mod.time.monotonic()
    monkeypatch.setattr(mod.time, "monotonic", lambda: now + 11)
    arena.sweep()  # nobody released them in time: freed
    assert arena.lent == 0 and arena.expired == 3 and arena.free_bytes == 4096
    arena.close()


def test_pack_points_at_the_slot_and_unpack_reads_it():
    layout = KVLayout("m", 2, 1, 4, "bfloat16", 2)
    data = torch.randn(layout.shape(3)).to(torch.bfloat16)
    tokens = list(range(6))
    arena = KVArena("t", 1 << 16)
    off = arena.put("r", data)
    msg = kv_transfer.pack(tokens, data, layout, arena=(arena.path, off))
    assert "data" not in msg
    got_tokens, got, got_layout = kv_transfer.unpack(msg, ArenaMaps())
    assert got_tokens == tokens and got_layout == layout and torch.equal(got, data)
    with pytest.raises(ValueError, match="no arena maps"):
        kv_transfer.unpack(msg)
    with pytest.raises(ValueError, match="not a KV arena"):
        ArenaMaps().view("/etc/passwd", 0, [1], torch.float32)
    arena.close()
