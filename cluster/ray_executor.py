"""A multi-rank replica group: one Ray actor per rank, placed in one placement group.

Start-up:
    check the layout against the model (clear error naming the numbers)
    -> placement: the caller's placement group if we run inside one (a Serve replica that
       reserved a bundle per rank after its own), else a new one; wait a bounded time
    -> rank actors -> rank 0 picks a free port on its node -> every rank joins the process
       groups and loads only its slice -> KV blocks = the smallest capacity any rank reports.
Each step: the plan goes to the object store once; every rank runs it; the result comes from
the driver rank (first rank of the last pipeline stage). A rank that dies or a step past its
timeout marks the group unhealthy and raises EngineDead: in-flight requests fail, nothing hangs.
"""

from __future__ import annotations

import logging

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import EngineConfig
from workers.errors import EngineDead
from workers.loader import load_hf_config, resolve_model_path
from workers.messages import StepPlan, StepResult
from workers.models.llama import LlamaArch, check_parallel
from workers.worker import Worker

log = logging.getLogger(__name__)


class RayExecutor:
    def __init__(self, config: EngineConfig):
        p = config.parallel
        self.config = config
        self.hf_config = load_hf_config(resolve_model_path(config.model.model))
        arch = LlamaArch.from_hf(self.hf_config)
        check_parallel(arch, p.tp, p.pp, p.ep)
        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        self.world = p.world_size
        self._own_pg = None
        pg = ray.util.get_current_placement_group()
        offset = 1  # a Serve replica sits in bundle 0 of its own placement group
        # One GPU per rank on CUDA: Ray then sets each actor's CUDA_VISIBLE_DEVICES to its own
        # GPU, so "cuda" is a different device on every rank (NCCL refuses two ranks on one).
        self.gpus_per_rank = 1 if config.model.device == "cuda" else 0
        if pg is None or len(pg.bundle_specs) < self.world + offset:
            pg, offset = self._create_placement(p.cpus_per_rank, p.placement_timeout_s), 0
        actor_cls = ray.remote(Worker)
        self.actors = [
            actor_cls.options(
                num_cpus=p.cpus_per_rank,
                num_gpus=self.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=i + offset
                ),
                name=None,
            ).remote(i, config.model, p, config.cache.block_size, config.cache.kv_cache_memory_gib)
            for i in range(self.world)
        ]
        self.healthy = True
        try:
            host = ray.util.get_node_ip_address()
            addr, port = ray.get(self.actors[0].rendezvous_address.remote(host), timeout=60)
            caps = self._get(
                [a.init.remote(addr, port, arch.num_layers) for a in self.actors],
                timeout=p.placement_timeout_s + 300,
            )
            self.num_blocks = config.cache.num_blocks or min(caps)
            self._get([a.allocate_kv.remote(self.num_blocks) for a in self.actors], timeout=120)
        except BaseException:
            self.shutdown()
            raise
        stage = p.stage_size
        self.driver = (p.pp - 1) * stage

    def _create_placement(self, cpus: float, timeout_s: float):
        bundle = {"CPU": cpus}
        if self.gpus_per_rank:
            bundle["GPU"] = self.gpus_per_rank
        pg = placement_group([dict(bundle) for _ in range(self.world)], strategy="PACK")
        if not pg.wait(timeout_seconds=timeout_s):
            remove_placement_group(pg)
            free, total = ray.available_resources(), ray.cluster_resources()
            raise RuntimeError(
                f"cannot place {self.world} ranks x "
                + " + ".join(f"{n:g} {k}" for k, n in bundle.items())
                + f" within {timeout_s:.0f}s: the cluster has "
                + ", ".join(
                    f"{free.get(k, 0.0):g} of {total.get(k, 0.0):g} {k}s free" for k in bundle
                )
            )
        self._own_pg = pg
        return pg

    def _get(self, refs, timeout: float):
        try:
            return ray.get(refs, timeout=timeout)
        except (RayActorError, RayTaskError, GetTimeoutError) as e:
            self.healthy = False
            raise EngineDead(f"replica group rank failed: {type(e).__name__}: {e}") from e

    def execute(self, plan: StepPlan) -> StepResult:
        if not self.healthy:
            raise EngineDead("replica group is unhealthy (a rank failed earlier)")
        ref = ray.put(plan)
        results = self._get(
            [a.execute.remote(ref) for a in self.actors], self.config.parallel.step_timeout_s
        )
        return results[self.driver]

    def export_blocks(self, block_ids: list[int]):
        return self._get([a.export_blocks.remote(block_ids) for a in self.actors], 120)

    def import_blocks(self, block_ids: list[int], data) -> None:
        self._get(
            [a.import_blocks.remote(block_ids, d) for a, d in zip(self.actors, data, strict=True)],
            120,
        )

    def param_bytes(self) -> list[int]:
        return self._get([a.param_bytes.remote() for a in self.actors], 60)

    def describe(self) -> list[dict]:
        """Per rank: which all-reduce and kernels it uses (see workers.worker.Worker.describe)."""
        return self._get([a.describe.remote() for a in self.actors], 60)

    def comm_timing(self, enabled: bool) -> list[tuple[float, int]]:
        """Per rank: seconds spent in collectives / transfers since the last call."""
        return self._get([a.comm_timing.remote(enabled) for a in self.actors], 60)

    def shutdown(self) -> None:
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass
        self.actors = []
        if self._own_pg is not None:
            remove_placement_group(self._own_pg)
            self._own_pg = None
