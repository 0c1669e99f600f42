"""The one root config of a Flotilla deployment, loaded from YAML and validated once.

    engine:   cluster.config.EngineConfig  -- model, KV cache, scheduler, parallel layout
    groups:   how many replica groups (each one Serve replica running one engine), or
    autoscaling: deploy.autoscaling.AutoscalingSpec -- a group count that follows the load, or
    pools:    prefill and decode pools (disaggregated): groups or autoscaling, CPUs, layout, KV
    router:   router.config.RouterConfig   -- routing policy, session header, API limits
    serve:    ServeConfig (below)          -- ports, replicas, CPUs, Serve queue limits

Each layer receives only its own sub-config. Read from the environment elsewhere, on purpose:
the kernel cache location (workers.loader, parallel.native_build), the API keys named by
router.api_keys_env (in the router's process, so keys stay out of the Serve config), and the
test-only fault injection (cluster/faults.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from deploy.autoscaling import AutoscalingRatio, AutoscalingSpec
from parallel.config import ParallelConfig
from parallel.resources import CustomResources
from router.config import RouterConfig


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    app_name: str = Field("flotilla", min_length=1, description="Serve application name.")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Listen address of the HTTP and the gRPC proxy (0.0.0.0 / :: for every "
        "interface). Applies when `flotilla serve` starts the cluster or Serve.",
    )
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field(
        "EveryNode",
        description="Where Serve runs its HTTP and gRPC proxies: on every node with a replica "
        "(Serve's default), on the head node only, or nowhere.",
    )
    http_port: int = Field(8000, ge=1, le=65535, description="OpenAI-compatible HTTP port.")
    grpc_port: int = Field(9000, ge=1, le=65535, description="gRPC port (flotilla.v1.Flotilla).")
    request_timeout_s: float | None = Field(
        None, gt=0, description="End-to-end limit per request in the proxies; None = no limit."
    )
    ingress_replicas: int = Field(1, ge=1, le=256, description="Router replicas.")
    ingress_num_cpus: float = Field(0.1, ge=0, description="Ray CPUs reserved per router replica.")
    ingress_max_ongoing_requests: int = Field(
        1024, ge=1, description="Requests one router replica handles at once."
    )
    ingress_max_queued_requests: int = Field(
        1024,
        ge=-1,
        description="Requests queued in front of the routers beyond that (-1 = unbounded); past "
        "it the proxy answers RESOURCE_EXHAUSTED (gRPC) / 503 (HTTP).",
    )
    group_num_cpus: float = Field(
        1.0, ge=0, description="Ray CPUs reserved per replica group (its engine thread)."
    )
    group_resources: CustomResources = Field(
        default_factory=dict,
        description="Ray custom resources each replica group's actor asks for (e.g. "
        "{node_b: 0.1}): groups only start on nodes started with them (`ray start --resources`). "
        "Pins the colocated pool, and the pools that do not set pools.<role>.resources.",
    )
    health_check_period_s: float = Field(5.0, gt=0, description="Serve health-check period.")
    health_check_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A health check not answered within this long fails (a replica whose "
        "event loop hangs never answers). Serve replaces a replica after 3 failed checks in a "
        "row: a hung event loop is replaced after about 3 x max(health_check_timeout_s, "
        "health_check_period_s), a hung engine about 3 x health_check_period_s after "
        "engine.scheduler.hang_timeout_s.",
    )
    group_graceful_shutdown_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="How long a group being removed on its own (scale-down, a rolling update) "
        "lets its running streams finish; those still running then move to another group "
        "(re-prefilled after the tokens already sent). Serve kills the process 5 s after.",
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On Ctrl-C / SIGTERM, how long `flotilla serve` lets in-flight requests "
        "finish (new ones are refused with UNAVAILABLE / 503) before it deletes the app.",
    )
    metrics_export_port: int | None = Field(
        8080,
        ge=1,
        le=65535,
        description="Port of Ray's Prometheus endpoint when `flotilla serve` starts the "
        "cluster (None = Ray's default: a random port).",
    )
    throughput_optimized: bool = Field(
        True,
        description="Start the cluster in Ray Serve's throughput-optimized mode "
        "(RAY_SERVE_THROUGHPUT_OPTIMIZED: replica code on the replica's own event loop, "
        "proxy -> router -> group calls over gRPC instead of actor tasks), with the proxies kept "
        "(direct ingress off). Only applies when `flotilla serve` starts the cluster.",
    )
    control_loop_interval_s: float = Field(
        0.5,
        gt=0,
        le=10,
        description="Period of the Serve controller's loop (RAY_SERVE_CONTROL_LOOP_INTERVAL_S; "
        "Ray's default 0.1). Each wake-up of a background process on a small machine preempts "
        "an engine thread mid-step, and the step's other threads wait for it: on 2 cores at "
        "saturation, 0.5 s (with metrics_export_interval_ms 1000) serves ~15% more tokens "
        "(benchmarks/RESULTS.md). Serve reacts to deaths and scaling this much later. Applies "
        "when `flotilla serve` starts the cluster; on a `ray start` cluster set the variable "
        "there.",
    )
    metrics_export_interval_ms: int = Field(
        1000,
        ge=0,
        le=60000,
        description="How often Serve's proxies and replicas export their cached metrics "
        "(RAY_SERVE_METRICS_EXPORT_INTERVAL_MS; Ray's default 100; 0: no caching). Prometheus "
        "scrapes far less often. Same scope as control_loop_interval_s.",
    )
    ray_address: str | None = Field(
        None,
        description="Join this Ray cluster (e.g. 127.0.0.1:6379); None starts a local one.",
    )


class PoolConfig(BaseModel):
    """One pool of a disaggregated deployment; unset fields take the top-level values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: int = Field(1, ge=1, le=64, description="Replica groups in this pool.")
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale this pool's groups with its load instead of a fixed `groups`."
    )
    group_num_cpus: float | None = Field(
        None, ge=0, description="Ray CPUs per group; default serve.group_num_cpus."
    )
    resources: CustomResources | None = Field(
        None,
        description="Ray custom resources per group of this pool (pins it to the nodes that "
        "have them); default serve.group_resources.",
    )
    num_threads: int | None = Field(
        None, ge=1, le=512, description="torch threads per rank; default engine.model.num_threads."
    )
    parallel: ParallelConfig | None = Field(None, description="Layout; default engine.parallel.")
    cache: CacheConfig | None = Field(None, description="KV cache; default engine.cache.")
    scheduler: SchedulerConfig | None = Field(
        None,
        description="Scheduler; default engine.scheduler, except that the decode pool's "
        "default has no ttft_target_ms: a decode group exists to keep its streams' gaps "
        "steady, and the prompts it prefills itself are the short ones, so it never stalls "
        "every stream for a max_step_ms step to hurry one first token (16 streams on a "
        "1-thread decode group: ITL p99 1238 -> 551 ms, benchmarks/RESULTS.md, interference).",
    )

    @model_validator(mode="after")
    def _one_count(self) -> PoolConfig:
        if self.autoscaling is not None and "groups" in self.model_fields_set:
            raise ValueError(
                "set either groups or autoscaling, not both "
                "(autoscaling.initial_groups is the starting count)"
            )
        return self


class PoolsConfig(BaseModel):
    """Disaggregated prefill and decode: a prompt is computed in the prefill pool, which
    streams its first token at once; a decode group imports the prompt's KV blocks and
    continues (router.pd_* say which prompts skip the prefill pool)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill: PoolConfig = Field(default_factory=PoolConfig)
    decode: PoolConfig = Field(default_factory=PoolConfig)
    kv_lease_s: float = Field(
        30.0, gt=0, description="How long a prefill group holds a prompt's KV for its decode group."
    )
    kv_transfer_timeout_s: float = Field(
        30.0, gt=0, description="A decode group that has not received the KV by then recomputes it."
    )
    kv_arena_mib: int = Field(
        256,
        ge=0,
        le=1 << 20,
        description="Shared memory each prefill group keeps for hand-offs to decode groups on "
        "its node (faulted in once at start; a prompt that does not fit goes over the socket). "
        "0 = always the socket.",
    )
    kv_transport: Literal["auto", "shm", "inline", "dist"] = Field(
        "auto",
        description="How a prompt's KV travels from a prefill group to a decode group. shm: "
        "the prefill group's shared-memory arena when the groups share a node (needs "
        "kv_arena_mib > 0), inline otherwise. inline: the bytes in the answer on the "
        "data-plane socket, always. dist: a torch.distributed pair group between each decode "
        "group and each prefill group (send / recv; NCCL when both pools' groups run one rank on "
        "CUDA, else gloo), opened as the decode group learns of the prefill group. auto: shm on "
        "one node, dist between CUDA groups (NCCL) on different nodes, inline otherwise. A "
        "transport not available for a hand-off (a pair group not open yet or failed to open, "
        "a full arena) falls back to the next (shm, then inline); never a failed request.",
    )
    autoscaling_ratio: AutoscalingRatio | None = Field(
        None,
        description="Coordinate the pools' autoscaling (a Serve application-level policy; "
        "needs prefill.autoscaling and decode.autoscaling).",
    )

    @model_validator(mode="after")
    def _shm_needs_an_arena(self) -> PoolsConfig:
        if self.kv_transport == "shm" and self.kv_arena_mib == 0:
            raise ValueError(
                "pools.kv_transport shm needs pools.kv_arena_mib > 0 (the shared memory it "
                "lends); set kv_transport: inline to send every hand-off over the socket"
            )
        return self

    @model_validator(mode="after")
    def _ratio_needs_both(self) -> PoolsConfig:
        if self.autoscaling_ratio is not None and None in (
            self.prefill.autoscaling,
            self.decode.autoscaling,
        ):
            raise ValueError(
                "pools.autoscaling_ratio needs pools.prefill.autoscaling and pools.decode.autoscaling"
            )
        return self


@dataclass(frozen=True)
class PoolSpec:
    """One pool to deploy: a Serve deployment whose replicas are its replica groups."""

    deployment: str  # groups | prefill | decode
    role: str  # colocated | prefill | decode
    engine: EngineConfig
    num_cpus: float  # per group
    groups: int  # how many to start with
    max_groups: int  # the most it may grow to (= groups without autoscaling)
    autoscaling: AutoscalingSpec | None = None
    resources: dict[str, float] | None = None  # Ray custom resources per group, if any
    resources_field: str = "serve.group_resources"  # where they were set (for messages)


class FlotillaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineConfig = Field(default_factory=EngineConfig)
    groups: int = Field(
        1, ge=1, le=64, description="Replica groups, each a full model copy (colocated mode)."
    )
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale the colocated groups with their load instead of `groups`."
    )
    pools: PoolsConfig | None = Field(
        None, description="Prefill and decode pools instead of `groups` (disaggregated mode)."
    )
    router: RouterConfig = Field(default_factory=RouterConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _check(self) -> FlotillaConfig:
        if self.serve.http_port == self.serve.grpc_port:
            raise ValueError(f"serve.http_port and serve.grpc_port are both {self.serve.grpc_port}")
        if self.autoscaling is not None and "groups" in self.model_fields_set:
            raise ValueError(
                "autoscaling: set either groups or autoscaling, not both "
                "(autoscaling.initial_groups is the starting count)"
            )
        if self.pools is not None:
            if self.autoscaling is not None:
                raise ValueError(
                    "autoscaling: applies to colocated groups; with pools, set "
                    "pools.prefill.autoscaling / pools.decode.autoscaling"
                )
            if "groups" in self.model_fields_set:
                raise ValueError("set either groups (colocated) or pools (disaggregated), not both")
            p, d = (self._pool_engine(r) for r in ("prefill", "decode"))
            if p.cache.block_size != d.cache.block_size:
                raise ValueError(
                    f"pools.prefill block_size {p.cache.block_size} != pools.decode block_size "
                    f"{d.cache.block_size}: KV blocks move between them as they are (re-blocking "
                    "is not supported)"
                )
            pk, dk = p.cache.kv_dtype, d.cache.kv_dtype
            if pk != dk:
                raise ValueError(
                    f"pools.prefill cache.kv_dtype {pk!r} != pools.decode cache.kv_dtype {dk!r}: "
                    "KV blocks move between them as they are (an int8 cache's rows carry their "
                    "scales; no conversion on import)"
                )
            # The pools' TP / PP / EP layouts may differ: KV travels as the whole model's blocks
            # (cluster.kv_shards). The model and its dtype are the top-level engine's, shared;
            # a dtype that `auto` resolves differently on two nodes is caught per transfer.
        return self

    def _pool_engine(self, role: str) -> EngineConfig:
        assert self.pools is not None
        pool: PoolConfig = getattr(self.pools, role)
        engine = self.engine
        update: dict[str, object] = {}
        if pool.parallel is not None:
            update["parallel"] = pool.parallel
        if pool.cache is not None:
            update["cache"] = pool.cache
        if pool.num_threads is not None:
            update["model"] = engine.model.model_copy(update={"num_threads": pool.num_threads})
        if pool.scheduler is not None:
            update["scheduler"] = pool.scheduler
        elif role == "decode" and engine.scheduler.ttft_target_ms is not None:
            update["scheduler"] = engine.scheduler.model_copy(update={"ttft_target_ms": None})
        return engine.model_copy(update=update) if update else engine

    def kv_link_backend(self) -> str:
        """The backend of the pair groups between prefill and decode groups (pools.kv_transport
        dist / auto): nccl when both pools' groups hold a GPU in their own process (one rank on
        CUDA: deploy.app gives it the GPU), else gloo on CPU tensors (any device)."""
        if self.pools is None:
            return "gloo"
        engines = [self._pool_engine(r) for r in ("prefill", "decode")]
        on_gpu = all(e.model.device == "cuda" and e.parallel.is_single for e in engines)
        return "nccl" if on_gpu else "gloo"

    def pool_specs(self) -> list[PoolSpec]:
        """Every pool of the deployment: one (colocated) or prefill and decode."""
        cpus, res = self.serve.group_num_cpus, self.serve.group_resources
        if self.pools is None:
            spec = _pool("groups", "colocated", self.engine, cpus, self.groups, self.autoscaling)
            return [replace(spec, resources=res)]
        out = []
        for role in ("prefill", "decode"):
            pool: PoolConfig = getattr(self.pools, role)
            n_cpus = cpus if pool.group_num_cpus is None else pool.group_num_cpus
            engine = self._pool_engine(role)
            spec = _pool(role, role, engine, n_cpus, pool.groups, pool.autoscaling)
            own = pool.resources is not None
            field = f"pools.{role}.resources" if own else spec.resources_field
            out.append(
                replace(spec, resources=pool.resources if own else res, resources_field=field)
            )
        return out

    def max_groups(self) -> int:
        """The most groups the app may run at once (sizes each group's share of a node)."""
        return sum(p.max_groups for p in self.pool_specs())

    @property
    def model_name(self) -> str:
        return self.engine.model.name

    @classmethod
    def from_yaml(cls, path: str | Path) -> FlotillaConfig:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.model_validate(data)


def _pool(
    name: str, role: str, engine: EngineConfig, cpus: float, groups: int, a: AutoscalingSpec | None
) -> PoolSpec:
    if a is None:
        return PoolSpec(name, role, engine, cpus, groups, groups)
    return PoolSpec(name, role, engine, cpus, a.initial_groups or a.min_groups, a.max_groups, a)
