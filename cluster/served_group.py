"""A replica group as one replica of a pool's Serve deployment: it names itself after its
replica, sizes its threads from its own node (its ranks from theirs), announces its data plane
to the registry, and when Serve removes it (scale-down, delete, a rolling update) it drains
before it goes.

    ServedGroup(engine_config, role, kv_lease_s, kv_transfer_timeout_s, drain_s, kv_arena_mib,
                kv_transport, kv_link_backend)
    reconfigure({"cpu_share": f})   Serve's user_config: the share of the node's cores

Removal, step by step (Serve calls `__del__` once its own requests -- none: ours travel on the
data plane -- are done, and kills the process `graceful_shutdown_timeout_s` after it started):
  1. refuse new requests (kind "draining": the router tries another group) and announce
     "draining", so routers stop choosing it within a heartbeat;
  2. let running streams finish and KV leases be taken, for up to `drain_s`;
  3. end whatever still runs with kind "dead": each router resumes those requests on another
     group after the tokens it already relayed (the same path as a crash, bounded by
     router.max_migrations);
  4. leave the registry and free the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from cluster.config import EngineConfig
from cluster.registry import HEARTBEAT_S, Member
from cluster.replica_group import ReplicaGroup

log = logging.getLogger(__name__)

REGISTRY = "registry"  # the registry's deployment name in every Flotilla app
# How long a group being removed waits for the registry. When the whole app is deleted the
# registry stops alongside, and a call to it hangs: waiting 5 s each for the drain announcement
# and the leave outlasted Serve's grace period, and every group was force-killed instead of
# freeing its engine. Routers learn of the drain from the group's own refusals, and the TTL
# drops a member that never left.
_LEAVING_REGISTRY_S = 1.0


def threads_for(config: EngineConfig, cpu_share: float) -> EngineConfig:
    """Unset torch threads become this node's cores times this group's share of them (Ray
    starts workers with OMP_NUM_THREADS=1, which would leave each engine one thread). Read
    here, in the group's own process, so a group on a 16-core node gets that node's cores.
    A multi-rank group's ranks may run on other nodes: they get the share instead and count
    their own node's cores (cluster.ray_executor)."""
    if config.model.num_threads is not None:
        return config
    if not config.parallel.is_single:
        share = min(1.0, cpu_share)
        return config.model_copy(
            update={"parallel": config.parallel.model_copy(update={"cpu_share": share})}
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, int((cores or 1) * cpu_share))
    return config.model_copy(
        update={"model": config.model.model_copy(update={"num_threads": threads})}
    )


def pool_prefix(role: str) -> str:
    return "group" if role == "colocated" else role


class ServedGroup(ReplicaGroup):
    async def __init__(
        self,
        config: EngineConfig | dict,
        role: str = "colocated",
        kv_lease_s: float = 30.0,
        kv_transfer_timeout_s: float = 30.0,
        drain_s: float = 30.0,
        kv_arena_mib: int = 0,
        kv_transport: str = "auto",
        kv_link_backend: str = "gloo",
    ):
        # The engine starts in the first reconfigure(), which Serve calls right after this,
        # before the replica counts as ready: the thread share arrives there, in user_config,
        # so that a change of the pool's size is an in-place update, not a restart.
        if isinstance(config, dict):
            config = EngineConfig.model_validate(config)
        self._args = (config, role, kv_lease_s, kv_transfer_timeout_s, kv_arena_mib)
        self._links = (kv_transport, kv_link_backend)
        self.drain_s = drain_s
        self.started = False

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's user_config hook: {"cpu_share": fraction of the node's cores}."""
        self.cpu_share = float(user_config.get("cpu_share", 1.0))
        if not self.started:
            await self._start()

    async def _start(self) -> None:
        import psutil
        import ray
        from ray import serve

        from workers import progress

        t_engine = time.time()
        config, role, kv_lease_s, kv_transfer_timeout_s, kv_arena_mib = self._args
        ctx = serve.get_replica_context()
        name = f"{pool_prefix(role)}-{ctx.replica_id.unique_id}"
        config = threads_for(config, self.cpu_share)
        super().__init__(
            config, name, role, kv_lease_s, kv_transfer_timeout_s, kv_arena_mib, *self._links
        )
        self.started = True
        # Where this group's cold start went (one-rank groups: the phases ran in this process).
        self.startup = {
            "process_s": t_engine - psutil.Process().create_time(),  # up to the engine's start
            **{f"{k}_s": round(v, 3) for k, v in progress.PHASES.items()},
            "engine_s": time.time() - t_engine,  # kernels + weights + KV + the rest
        }
        host, port, secret = await self.data_address()
        self.member = Member(
            name, role, host, port, secret, node_id=ray.get_runtime_context().get_node_id()
        )
        self._registry = serve.get_deployment_handle(REGISTRY, ctx.app_name)
        await self._announce()
        self._heartbeat = asyncio.get_running_loop().create_task(self._announce_forever())
        self.startup["ready_s"] = time.time() - psutil.Process().create_time()

    async def _announce(self) -> None:
        members = await self._registry.announce.remote(self.member.to_dict())
        if isinstance(members, list):  # the peers: open / drop pair groups (cluster/kv_links.py)
            self.sync_kv_links(members)

    async def _announce_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await asyncio.wait_for(self._announce(), 10 * HEARTBEAT_S)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the registry is restarting: the next beat refills it
                log.info("group %s: announcing failed: %r", self.name, e)

    def in_flight(self) -> int:
        s = self.engine.stats()
        return s.num_running + s.num_waiting + sum(len(x.tasks) for x in self._subscribers.values())

    async def __del__(self) -> None:  # Serve awaits it; see the module docstring
        if not getattr(self, "started", False):
            return
        # Drained by the app's shutdown already (deploy.app.drain waited), or hung (nothing
        # will finish; its streams were failed over already): do not wait.
        wait_s = 0.0 if self.draining or not self.health() else self.drain_s
        self.draining = True
        self.member.state = "draining"
        registry_up = True
        try:
            await asyncio.wait_for(self._announce(), _LEAVING_REGISTRY_S)
        except Exception as e:
            registry_up = False  # gone with the app, or restarting: the TTL will drop us
            log.info("group %s: announcing the drain failed: %r", self.name, e)
        deadline = time.monotonic() + wait_s
        while (self.in_flight() or self.leases.items) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            self.leases.sweep()
        moved = self.evict("replica group is being removed")
        if moved:
            log.warning("group %s: %d request(s) still running after %.0f s moved on",
                        self.name, moved, wait_s)  # fmt: skip
            await asyncio.sleep(0.5)  # let the error deltas reach the routers
        self._heartbeat.cancel()
        for group in list(self.kv_links):
            self.drop_link(group, "this group is being removed")
        if registry_up:
            try:
                await asyncio.wait_for(self._registry.leave.remote(self.name), _LEAVING_REGISTRY_S)
            except Exception:  # TTL removes it anyway
                pass
        ReplicaGroup.__del__(self)

    def evict(self, reason: str) -> int:
        """End every running request with kind "dead" (routers resume them elsewhere)."""
        err = {"error": {"kind": "dead", "field": None, "message": f"{self.name}: {reason}"}}
        n = 0
        for sub in self._subscribers.values():
            for request_id, task in list(sub.tasks.items()):
                sub.push(request_id, err)
                task.cancel()
                n += 1
        return n

    def stats(self, known_fingerprint: int | None = None) -> dict[str, Any]:
        return super().stats(known_fingerprint) | {
            "node_id": self.member.node_id,
            "host": self.member.host,
            "pid": os.getpid(),  # the replica's process on that node (its engine, one-rank)
            "startup": self.startup,
        }
