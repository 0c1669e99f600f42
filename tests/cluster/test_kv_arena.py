"""The same-node KV arena (cluster/kv_arena.py): slots are lent, read in another process through
/proc/<pid>/fd, released, coalesced, swept when not released, and a full arena says so; every
slot carries a generation, so a slot released and reused is never read as the old one; an
engine exports a hand-off straight into a reserved slot."""

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
    slot = 1024 + 64  # 1 KiB of data after each slot's 64-byte header
    arena = KVArena("t", 4 * slot, hold_s=10)
    a = torch.ones(256)
    offs = [arena.put(f"r{i}", a) for i in range(4)]
    assert offs == [64, slot + 64, 2 * slot + 64, 3 * slot + 64] and arena.free_bytes == 0
    assert arena.put("full", a) is None  # no room: the caller sends it inline
    arena.release("r1")
    arena.release("r2")
    assert arena.put("big", torch.ones(512)) == slot + 64  # the freed neighbours merged
    import cluster.kv_arena as mod

    now = mod.time.monotonic()
    monkeypatch.setattr(mod.time, "monotonic", lambda: now + 11)
    arena.sweep()  # nobody released them in time: freed
    assert arena.lent == 0 and arena.expired == 3 and arena.free_bytes == 4 * slot
    arena.close()


def test_a_slot_being_filled_has_no_hold_until_hold_starts_it(monkeypatch):
    """A hand-off's slot is reserved when its prompt is admitted and filled chunk by chunk:
    sweep() leaves it alone until hold() starts the clock; reserving a key again replaces
    (frees) the slot it held."""
    import math

    import cluster.kv_arena as mod

    arena = KVArena("t", 1 << 16, hold_s=10)
    arena.reserve("filling", (256,), torch.float32, hold_s=math.inf)
    arena.reserve("old", (256,), torch.float32)
    arena.reserve("old", (256,), torch.float32)  # the first "old" slot goes back
    assert arena.lent == 2
    now = mod.time.monotonic()
    monkeypatch.setattr(mod.time, "monotonic", lambda: now + 11)
    arena.sweep()
    assert arena.lent == 1 and arena.where("filling") is not None
    arena.hold("filling")
    monkeypatch.setattr(mod.time, "monotonic", lambda: now + 22)
    arena.sweep()
    assert arena.lent == 0 and arena.free_bytes == 1 << 16
    arena.close()


def test_a_reused_slot_is_never_read_as_the_old_one():
    """The reader's check sees the release (generation cleared) and the reuse (a new
    generation) of the slot it was sent, whether it looks before or after reading."""
    layout = KVLayout("m", 2, 1, 4, "float32", 2)
    arena = KVArena("t", 1 << 16)
    maps = ArenaMaps()
    first = arena.reserve("a", layout.shape(2), torch.float32)
    first.fill_(1.0)
    off, gen = arena.where("a")
    msg = kv_transfer.pack(list(range(4)), first, layout, arena=(arena.path, off, gen))
    _, got, _ = kv_transfer.unpack(msg, maps)
    assert kv_transfer.arena_current(msg, maps) and torch.equal(got, first)
    arena.release("a")  # e.g. its hold ran out under a slow reader
    assert not kv_transfer.arena_current(msg, maps)
    again = arena.reserve("b", layout.shape(2), torch.float32)  # the same slot, new contents
    again.fill_(2.0)
    assert arena.where("b")[0] == off and arena.where("b")[1] != gen
    assert not kv_transfer.arena_current(msg, maps)
    with pytest.raises(ValueError, match="released before it was read"):
        kv_transfer.unpack(msg, maps)
    arena.close()


def test_engine_exports_into_the_slot_and_a_stale_import_changes_nothing(tiny_model_dir):
    """A hand-off's blocks go straight into the arena slot the engine's export target gives
    (no other copy); an import whose still_valid check fails after the copy raises and
    leaves the importer's blocks as they were (free, nothing cached)."""
    from cluster.config import CacheConfig, EngineConfig
    from cluster.engine import LLMEngine
    from workers.config import ModelConfig
    from workers.sampling_params import SamplingParams

    cfg = EngineConfig(
        model=ModelConfig(model=tiny_model_dir("llama"), dtype="float32"),
        cache=CacheConfig(block_size=4, num_blocks=64),
    )
    prefill, decode = LLMEngine(cfg), LLMEngine(cfg)
    arena = KVArena("t", 1 << 20)
    prefill.kv_export.target = arena
    prompt = list(range(3, 14))  # 11 tokens: 2 full blocks
    prefill.add_request(prompt, SamplingParams(max_tokens=4, temperature=0.0), "r", handoff=True)
    out = None
    for _ in range(10):
        outs = [o for o in prefill.step() if o.finished]
        if outs:
            out = outs[0]
            break
    assert out is not None and out.finish_reason == "handoff"
    tokens, data = out.kv
    off, _ = arena.where("r")
    assert data.data_ptr() == arena.buf[off:].data_ptr()  # written in place
    free = decode.block_audit()
    with pytest.raises(ValueError, match="reused"):
        decode.import_kv(tokens, data, prefill.kv_layout, still_valid=lambda: False)
    assert decode.block_audit() == free
    assert decode.import_kv(tokens, data, prefill.kv_layout, still_valid=lambda: True) == 8
    arena.close()


def test_pack_points_at_the_slot_and_unpack_reads_it():
    layout = KVLayout("m", 2, 1, 4, "bfloat16", 2)
    data = torch.randn(layout.shape(3)).to(torch.bfloat16)
    tokens = list(range(6))
    arena = KVArena("t", 1 << 16)
    arena.put("r", data)
    msg = kv_transfer.pack(tokens, data, layout, arena=(arena.path, *arena.where("r")))
    assert "data" not in msg
    got_tokens, got, got_layout = kv_transfer.unpack(msg, ArenaMaps())
    assert got_tokens == tokens and got_layout == layout and torch.equal(got, data)
    with pytest.raises(ValueError, match="no arena maps"):
        kv_transfer.unpack(msg)
    with pytest.raises(ValueError, match="not a KV arena"):
        ArenaMaps().view("/etc/passwd", 0, [1], torch.float32)
    arena.close()
