"""One rank of a replica group. `cluster.ray_executor` runs it as a Ray actor (one per rank,
in the group's placement group); nothing here knows about Ray.

Lifecycle: construct (cheap) -> [rank 0] rendezvous_address() -> init(addr, port) on every
rank at once (process groups, then this rank's slice of the weights) -> allocate_kv(n) with the
smallest capacity any rank reported -> execute(plan) per step -> shutdown().
"""

from __future__ import annotations

import os

import torch

from parallel.config import ParallelConfig
from parallel.groups import (
    destroy_groups,
    free_port,
    init_groups,
    partition_layers,
    resolve_backend,
)
from workers.config import ModelConfig
from workers.messages import StepPlan, StepResult


def _interface_for(addr: str) -> str | None:
    """The network interface that carries `addr` (gloo binds its sockets there)."""
    try:
        import psutil
    except ImportError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == addr for a in addrs):
            return name
    return None


def node_cores() -> int:
    """Cores this process may use: the node's, read on the node itself."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Worker:
    def __init__(
        self,
        rank: int,
        model: ModelConfig,
        parallel: ParallelConfig,
        block_size: int,
        kv_cache_memory_gib: float,
        kv_dtype: str = "auto",
    ):
        self.rank = rank
        self.kv_dtype = kv_dtype
        self.model_config = model
        self.parallel = parallel
        self.block_size = block_size
        self.kv_gib = kv_cache_memory_gib
        self.runner = None
        threads = model.num_threads or max(1, int(parallel.cpus_per_rank))
        torch.set_num_threads(threads)

    def rendezvous_address(self, host: str) -> tuple[str, int]:
        return host, free_port(host)

    def init(
        self,
        master_addr: str,
        master_port: int,
        num_layers: int,
        stage_on_one_node: bool = True,
        node_share: float | None = None,
    ) -> int:
        """Join the group and load this rank's weights; returns its KV capacity in blocks.
        `stage_on_one_node`: see parallel.groups.init_groups. `node_share`: with
        model.num_threads unset, this rank's share of its own node's cores for its threads."""
        from workers.model_runner import ModelRunner

        if self.model_config.num_threads is None and node_share is not None:
            torch.set_num_threads(max(1, int(node_cores() * node_share)))
        iface = _interface_for(master_addr)
        if iface is not None:
            # Process-wide setting for this actor's own process: gloo must bind where the
            # rendezvous address lives (loopback in tests, the node's interface in a cluster).
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        backend = resolve_backend(self.parallel, self.model_config.device)
        groups = init_groups(
            self.parallel,
            self.rank,
            master_addr,
            master_port,
            backend,
            stage_on_one_node=stage_on_one_node,
        )
        layer_range = partition_layers(num_layers, self.parallel.pp)[groups.pp_rank]
        self.runner = ModelRunner(
            self.model_config, self.block_size, groups, layer_range, kv_dtype=self.kv_dtype
        )
        return self.runner.blocks_for_memory(self.kv_gib)

    def allocate_kv(self, num_blocks: int) -> None:
        self.runner.allocate_kv(num_blocks)

    def execute(self, plan: StepPlan) -> StepResult | None:
        return self.runner.execute(plan)

    def export_blocks(self, block_ids: list[int]):
        return self.runner.export_blocks(block_ids)

    def import_blocks(self, block_ids: list[int], data) -> None:
        self.runner.import_blocks(block_ids, data)

    def kv_shard(self) -> dict:
        return self.runner.kv_shard()

    def param_bytes(self) -> int:
        return self.runner.param_bytes()

    def comm_timing(self, enabled: bool) -> tuple[float, int]:
        """Switch collective timing on/off; returns (seconds, calls) since the last call."""
        from parallel.comm_timer import COMM

        COMM.enabled = enabled
        return COMM.take()

    def describe(self) -> dict:
        """How this rank runs: its collectives and kernels (for tests and benchmarks)."""
        g = self.runner.groups
        return {
            "rank": self.rank,
            "tp_all_reduce": "none" if g.tp.size == 1 else ("shm" if g.tp.shm else "dist"),
            "native_kernels": self.runner.native,
            "num_threads": torch.get_num_threads(),
        }

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        destroy_groups()
