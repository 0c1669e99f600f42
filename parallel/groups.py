"""Process groups per parallel axis over torch.distributed.

Rank layout of one replica group: `rank = pp_rank * stage_size + stage_rank`. The ranks of a
stage form the tensor-parallel group (attention, dense MLPs) and the expert-parallel group (MoE
layers); consecutive stages exchange hidden states point to point.

Backend: NCCL when the workers hold CUDA devices, gloo on CPU (config.backend = auto).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from parallel.config import ParallelConfig
from parallel.layers import SINGLE, TPGroup
from parallel.moe import EP_SINGLE, EPGroup
from parallel.shm_comm import make_shm_all_reduce


@dataclass(frozen=True)
class ParallelGroups:
    rank: int
    world_size: int
    pp_rank: int
    pp_size: int
    tp: TPGroup
    ep: EPGroup
    prev_rank: int | None  # global rank of the same stage position one stage up
    next_rank: int | None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        """The rank that samples and reports results: first rank of the last stage."""
        return self.is_last_stage and self.tp.rank == 0 and self.ep.rank == 0


SINGLE_RANK = ParallelGroups(0, 1, 0, 1, SINGLE, EP_SINGLE, None, None)


def resolve_backend(config: ParallelConfig, device: str) -> str:
    if config.backend != "auto":
        return config.backend
    return "nccl" if device == "cuda" else "gloo"


def free_port(host: str) -> int:
    """A free TCP port on `host` (the leader's node) for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def partition_layers(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Contiguous, balanced layer ranges per stage (earlier stages take the remainder)."""
    if pp > num_layers:
        raise ValueError(f"pp={pp} is larger than the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for i in range(pp):
        n = base + (1 if i < extra else 0)
        ranges.append((start, start + n))
        start += n
    return ranges


def init_groups(
    config: ParallelConfig,
    rank: int,
    master_addr: str,
    master_port: int,
    backend: str,
    timeout_s: float = 120.0,
    stage_on_one_node: bool = True,
) -> ParallelGroups:
    """Join the group. `stage_on_one_node`: every rank of this rank's stage runs on the same
    node (the caller knows, by node identity; the same value on all of them) -- shared memory
    is only tried then: on separate machines a /dev/shm file is not shared."""
    world, stage = config.world_size, config.stage_size
    if world == 1:
        return SINGLE_RANK
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    pp_rank, stage_rank = divmod(rank, stage)
    stage_group = None
    # Every rank must create every group, in the same order.
    for p in range(config.pp):
        ranks = list(range(p * stage, (p + 1) * stage))
        g = dist.new_group(ranks, backend=backend) if stage > 1 else None
        if p == pp_rank:
            stage_group = g
    shm = None
    if config.tp > 1 and backend == "gloo" and config.cpu_all_reduce != "gloo":
        if stage_on_one_node:
            shm = make_shm_all_reduce(stage_group, stage_rank, stage, config.step_timeout_s)
        if shm is None and config.cpu_all_reduce == "shm":
            raise ValueError(
                "cpu_all_reduce='shm' needs every rank of a stage on one node with the native "
                "CPU kernels built"
                + ("" if stage_on_one_node else " (this stage's ranks are on different nodes)")
            )
    tp = TPGroup(stage_rank, stage, stage_group, shm) if config.tp > 1 else SINGLE
    ep = EPGroup(stage_rank, stage, stage_group) if config.ep > 1 else EP_SINGLE
    return ParallelGroups(
        rank=rank,
        world_size=world,
        pp_rank=pp_rank,
        pp_size=config.pp,
        tp=tp,
        ep=ep,
        prev_rank=rank - stage if pp_rank > 0 else None,
        next_rank=rank + stage if pp_rank < config.pp - 1 else None,
    )


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
