"""The shared-memory all-reduce and all-gather (parallel/shm_comm.py) on 3 local processes:
results bitwise equal to a rank-ordered sum (or the stacked inputs) on every rank, tensors
larger than a slot split into chunks, many
consecutive calls reusing the two phases, a missing rank raising after the timeout instead of
hanging, and no file left in /dev/shm."""

from __future__ import annotations

import glob
import os

import torch
import torch.distributed as dist

WORLD = 3


def _inputs(call: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [
        torch.randn(n, generator=torch.Generator().manual_seed(1000 * call + r)).to(dtype)
        for r in range(WORLD)
    ]


def _run(rank: int, port: int, results) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    from parallel.shm_comm import ShmAllReduce, make_shm_all_reduce

    out: dict = {"auto": make_shm_all_reduce(dist.group.WORLD, rank, WORLD, 5.0) is not None}
    # 1 KiB slots: a 1000-element float32 tensor goes in 4 chunks.
    shm = ShmAllReduce(dist.group.WORLD, rank, WORLD, slot_bytes=1024, timeout_s=10.0)
    mismatches = []
    call = 0
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 7, 256, 1000, 3001):
            for _ in range(5):
                call += 1
                xs = _inputs(call, n, dtype)
                want = xs[0].float()
                for x in xs[1:]:
                    want = want + x.float()
                want = want.to(dtype)
                got = shm(xs[rank].clone())
                if not torch.equal(got, want):
                    mismatches.append((str(dtype), n, call))
    for n in (3, 300, 1000):  # 1000 float32 = 4 chunks of a 1 KiB slot
        call += 1
        xs = _inputs(call, n, torch.float32)
        if not torch.equal(shm.all_gather(xs[rank].view(-1, 1)), torch.stack(xs).view(3, -1, 1)):
            mismatches.append(("all_gather", n, call))
    out["mismatches"] = mismatches
    out["seq"] = shm.seq
    out["leftover"] = glob.glob("/dev/shm/flotilla-ar-*")
    # A rank that never arrives: the others raise after the timeout.
    late = ShmAllReduce(dist.group.WORLD, rank, WORLD, slot_bytes=1024, timeout_s=1.0)
    if rank != 2:
        try:
            late(torch.ones(4))
            out["timeout"] = "no error"
        except RuntimeError as e:
            out["timeout"] = str(e)
    dist.barrier()
    results[rank] = out
    dist.destroy_process_group()


def test_shm_all_reduce_three_ranks(spawn_ranks):
    from workers.kernels import build

    build()  # once here, so the three ranks only load it (and a build error shows up here)
    res = spawn_ranks(_run, WORLD)
    for r, out in enumerate(res):
        assert out["auto"], f"rank {r}: shm all-reduce not chosen for ranks on one node"
        assert out["mismatches"] == [], f"rank {r}: {out['mismatches'][:5]}"
        assert out["leftover"] == []
    # Same chunk count everywhere (all-reduces of 1 to 24 chunks, then the gathers).
    assert len({out["seq"] for out in res}) == 1 and res[0]["seq"] > 50
    for r in (0, 1):
        assert "rank 2 did not arrive within 1 s" in res[r]["timeout"], res[r]["timeout"]
