"""The shared-memory all-reduce is only set up when the caller says every rank of the stage
is on one node (cluster.ray_executor decides by Ray node id): two local processes -- where
shared memory would physically work -- told they are on different nodes take gloo, and
cpu_all_reduce='shm' then fails at start-up with the reason."""

from __future__ import annotations

import os

from parallel.config import ParallelConfig


def _run(rank: int, port: int, results) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch.distributed as dist

    from parallel.groups import destroy_groups, free_port, init_groups

    out = {}
    for name, same, mode in (("apart", False, "auto"), ("together", True, "auto")):
        g = init_groups(ParallelConfig(tp=2, cpu_all_reduce=mode), rank, "127.0.0.1", port,
                        "gloo", stage_on_one_node=same)  # fmt: skip
        out[name] = g.tp.shm is not None
        nxt = [free_port("127.0.0.1")]  # rank 0's: a fresh rendezvous for the next round
        dist.broadcast_object_list(nxt, src=0)
        port = nxt[0]
        destroy_groups()
    try:
        init_groups(ParallelConfig(tp=2, cpu_all_reduce="shm"), rank, "127.0.0.1", port, "gloo",
                    stage_on_one_node=False)  # fmt: skip
        out["forced"] = "no error"
    except ValueError as e:
        out["forced"] = str(e)
    destroy_groups()
    results[rank] = out


def test_ranks_on_different_nodes_never_use_shared_memory(spawn_ranks):
    from parallel.shm_comm import load_comm_kernels

    for out in spawn_ranks(_run, 2):
        assert out["apart"] is False
        assert out["together"] is load_comm_kernels()
        assert "on different nodes" in out["forced"]
