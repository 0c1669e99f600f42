"""A multi-rank replica group: one Ray actor per rank, placed in one placement group.

Start-up:
    check the layout against the model (clear error naming the numbers)
    -> placement: the caller's placement group if we run inside one (a Serve replica that
       reserved a bundle per rank after its own), else a new one with parallel.placement's
       strategy (ranks may span nodes); wait a bounded time
    -> rank actors report their Ray node -> rank 0 picks a free port on its node's IP (the
       address every other node dials) -> every rank joins the process groups and loads only
       its slice -> KV blocks = the smallest capacity any rank reports.

The CPU all-reduce goes through shared memory only when every rank of a stage is on the same
Ray node, decided by node id, never by IP: nodes may share an address (several raylets on one
host over loopback, as the tests run them) while on real machines a /dev/shm file is private to
each one. `layout()` says what the group chose.
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

from cluster import kv_shards
from cluster.config import EngineConfig
from parallel.config import ParallelConfig
from workers.errors import EngineDead
from workers.loader import load_hf_config, resolve_model_path
from workers.messages import StepPlan, StepResult
from workers.models.llama import LlamaArch, check_parallel
from workers.worker import Worker

log = logging.getLogger(__name__)

_STRATEGY = {"pack": "PACK", "spread": "SPREAD", "strict_pack": "STRICT_PACK",
             "strict_spread": "STRICT_SPREAD"}  # fmt: skip


class RankActor(Worker):
    """A Worker that can say where Ray put it (workers/ knows nothing about Ray)."""

    def node(self) -> tuple[str, str]:
        """(Ray node id, that node's IP)."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


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
            pg, offset = self._create_placement(p, p.placement_timeout_s), 0
        actor_cls = ray.remote(RankActor)
        self.actors = [
            actor_cls.options(
                num_cpus=p.cpus_per_rank,
                num_gpus=self.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=i + offset
                ),
                name=None,
            ).remote(
                i,
                config.model,
                p,
                config.cache.block_size,
                config.cache.kv_cache_memory_gib,
                config.cache.kv_dtype,
            )
            for i in range(self.world)
        ]
        self.healthy = True
        try:
            nodes = self._get([a.node.remote() for a in self.actors], timeout=p.placement_timeout_s)
            self.rank_nodes = [node_id for node_id, _ in nodes]
            # Rank 0's node IP, not ours: the other ranks may run on other nodes.
            addr, port = ray.get(self.actors[0].rendezvous_address.remote(nodes[0][1]), timeout=60)
            caps = self._get(
                [
                    a.init.remote(addr, port, arch.num_layers, *self._rank_placement(i))
                    for i, a in enumerate(self.actors)
                ],
                timeout=p.placement_timeout_s + 300,
            )
            self.num_blocks = config.cache.num_blocks or min(caps)
            self._get([a.allocate_kv.remote(self.num_blocks) for a in self.actors], timeout=120)
            ranks = self.describe()
            self.all_reduce = self._all_reduce({d["tp_all_reduce"] for d in ranks})
            self.rank_threads = [d["num_threads"] for d in ranks]
            self.kv_shards = self._get([a.kv_shard.remote() for a in self.actors], 60)
            self._kv_whole = kv_shards.whole(self.kv_shards)
        except BaseException:
            self.shutdown()
            raise
        stage = p.stage_size
        self.driver = (p.pp - 1) * stage

    def _rank_placement(self, rank: int) -> tuple[bool, float | None]:
        """(every rank of its stage on its node, its share of its node's cores)."""
        p = self.config.parallel
        first = rank - rank % p.stage_size
        stage_nodes = set(self.rank_nodes[first : first + p.stage_size])
        here = self.rank_nodes.count(self.rank_nodes[rank])
        share = None if p.cpu_share is None else p.cpu_share / here
        return len(stage_nodes) == 1, share

    def _all_reduce(self, kinds: set[str]) -> str:
        """How the tensor-parallel ranks all-reduce, from what each rank reports: shm, the
        torch.distributed backend (gloo / nccl), mixed (shm in some stages only) or none."""
        if kinds == {"none"}:
            return "none"
        if kinds == {"shm"}:
            return "shm"
        backend = self.config.parallel.backend
        dist = backend if backend != "auto" else ("nccl" if self.gpus_per_rank else "gloo")
        return dist if kinds == {"dist"} else "mixed"

    def layout(self) -> dict:
        """Where the ranks run, their threads and how they all-reduce (in a group's stats)."""
        return {
            "rank_nodes": list(self.rank_nodes),
            "rank_threads": list(self.rank_threads),
            "all_reduce": self.all_reduce,
        }

    def _create_placement(self, p: ParallelConfig, timeout_s: float):
        # A zero amount asks for nothing; Ray refuses zeros in bundles.
        bundle = {"CPU": p.cpus_per_rank, **{k: v for k, v in p.rank_resources.items() if v > 0}}
        if self.gpus_per_rank:
            bundle["GPU"] = self.gpus_per_rank
        strategy = _STRATEGY[p.placement]
        pg = placement_group([dict(bundle) for _ in range(self.world)], strategy=strategy)
        if not pg.wait(timeout_seconds=timeout_s):
            remove_placement_group(pg)
            free, total = ray.available_resources(), ray.cluster_resources()
            raise RuntimeError(
                f"cannot place {self.world} ranks x "
                + " + ".join(f"{n:g} {k}" for k, n in bundle.items())
                + f" within {timeout_s:.0f}s (placement {p.placement}): the cluster has "
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

    def kv_layout(self) -> tuple[int, int, int, str]:
        """(layers, KV heads, head dim, dtype) of the whole model, as exports carry it."""
        return self._kv_whole

    def export_blocks(self, block_ids: list[int], out=None):
        """The blocks in the whole model's form (cluster.kv_shards), gathered from one rank
        per shard, so that a group of another layout can import them (into `out`, if given:
        the ranks' parts arrive in new memory anyway; the gather is the one copy into it)."""
        ranks = kv_shards.holders(self.kv_shards)
        parts = self._get([self.actors[r].export_blocks.remote(block_ids) for r in ranks], 120)
        return kv_shards.gather(self.kv_shards, dict(zip(ranks, parts, strict=True)), out)

    def import_blocks(self, block_ids: list[int], data) -> None:
        """Whole-model blocks: every rank writes its own shard of them."""
        self._get(
            [
                a.import_blocks.remote(block_ids, kv_shards.scatter(shard, data))
                for a, shard in zip(self.actors, self.kv_shards, strict=True)
            ],
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
