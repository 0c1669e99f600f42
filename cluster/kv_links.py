"""Pair groups between replica groups: which decode group joins a torch.distributed group of two
with which prefill group, when, and what happens when one fails or its peer leaves
(cluster.kv_handoff mixes this in; the "dist" transport that uses them is in
cluster/kv_transports.py, the group itself in parallel/pair.py).

    pools.kv_transport  says whether links are wanted (kv_transports.wants_link): "dist" with
                        every prefill group, "auto" with those NCCL can reach and shared
                        memory cannot; the backend comes from the pools' device config
                        (deploy/config.py: nccl when both pools' groups hold their GPU, else gloo)
    opened              by the decode group, in the background, when it learns of a prefill
                        group: from the registry's answer to its heartbeat (sync_kv_links;
                        served_group.py), or from a hand-off's source (a group the registry
                        did not list yet). Eager, so the rendezvous -- and NCCL's communicator
                        set-up -- never sits on a request's path; the hand-offs before it is
                        open go by shm / inline, as do those after a failed open
    dropped             when the peer left the registry (died, scaled down, replaced) or a
                        transfer over it failed or ran late: a new group gets a new link at
                        the next heartbeat; a failed open is retried after LINK_RETRY_S

Blocking torch.distributed calls (rendezvous, handshake, recv, waiting for a send) run in
threads, each bounded by kv_transfer_timeout_s: the event loop never waits on a peer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from cluster import wire

log = logging.getLogger("cluster.replica_group")  # the group's one log

LINK_RETRY_S = 30.0  # after a pair group failed to open, try that prefill group again after


class KVLinks:
    """Mixed into ReplicaGroup (through KVHandoff); _init_links sets the state."""

    def _init_links(self, mode: str, backend: str, arena: bool) -> None:
        from cluster.kv_transports import MODES

        if mode not in MODES or backend not in ("gloo", "nccl"):
            raise ValueError(
                f"kv_transport {mode!r} / backend {backend!r}: not in {MODES} / gloo, nccl"
            )
        self.kv_transport = mode  # pools.kv_transport (cluster/kv_transports.py MODES)
        self.kv_link_backend = backend  # gloo | nccl
        self._kv_arena_on = arena  # the deployment gives prefill groups an arena
        # peer group -> a parallel.pair.PairGroup joined with it (decode: by prefill group;
        # prefill: by the decode group that joined)
        self.kv_links: dict[str, Any] = {}
        self._link_locks: dict[str, asyncio.Lock] = {}
        self._link_opening: dict[str, asyncio.Task] = {}
        self._link_retry_at: dict[str, float] = {}  # prefill group -> when to try again
        self._link_warned: set[str] = set()  # a failed open is logged once per group
        self.kv["link_failures"] = 0  # opens that failed and transfers over a link that did

    # ---- prefill side -------------------------------------------------------------------
    def kv_link(self, taker: str, backend: str) -> int:
        """Prefill side of open_kv_link: listen for `taker` to join a pair group (rank 0 here);
        the port of the rendezvous. The group is used once both joined; it replaces the one
        `taker` had (a decode group re-opens after a failure)."""
        from parallel.pair import PairGroup  # torch: only in a group's process

        host = self._kv_link_host()
        timeout = self.kv_transfer_timeout_s
        store = PairGroup.listen(host, timeout)

        def joined(f: asyncio.Future) -> None:
            if f.exception() is not None:
                log.warning("pair group with %s not made: %r", taker, f.exception())
                return
            old = self.kv_links.get(taker)
            self.kv_links[taker] = f.result()
            _close(old)

        loop = asyncio.get_running_loop()
        make = loop.run_in_executor(None, PairGroup, store, 0, backend, host, timeout)
        make.add_done_callback(joined)
        return store.port

    # ---- decode side --------------------------------------------------------------------
    async def open_kv_link(self, source: dict[str, Any], backend: str | None = None) -> None:
        """Join a torch.distributed pair group with the prefill group `source` names (as
        _fetch_kv's): hand-offs from it then travel by send / recv ("dist"). For groups that
        can reach each other's addresses; `backend`: gloo (CPU tensors) or nccl (CUDA),
        default this group's kv_link_backend."""
        from parallel.pair import PairGroup  # torch: only in a group's process

        backend = backend or self.kv_link_backend
        timeout = self.kv_transfer_timeout_s
        port = await wire.call_once(
            source["host"], source["port"], source["secret"], self.name,
            "kv_link", [self.name, backend],
        )  # fmt: skip
        here = self._kv_link_host()

        def join() -> Any:
            return PairGroup(
                PairGroup.dial(source["host"], port, timeout), 1, backend, here, timeout
            )

        # The thread ends by itself within the timeout: the rendezvous and handshake are bounded.
        pair = await asyncio.to_thread(join)
        old = self.kv_links.get(source["group"])
        self.kv_links[source["group"]] = pair
        _close(old)

    def _kv_link_host(self) -> str:
        server = getattr(self, "_server", None)
        return server.sockets[0].getsockname()[0] if server is not None else "127.0.0.1"

    def _link_wanted(self, source: dict[str, Any]) -> bool:
        from cluster import kv_transports

        if self.role != "decode" or not source.get("host"):
            return False
        here = getattr(getattr(self, "member", None), "node_id", None)
        same = bool(here) and source.get("node_id") == here
        return kv_transports.wants_link(
            self.kv_transport, self.kv_link_backend, same, self._kv_arena_on
        )

    def ensure_link(self, source: dict[str, Any]) -> None:
        """Start opening a pair group with `source`'s prefill group if the deployment wants one
        and none is open, opening or waiting to be retried. Returns at once."""
        group = source.get("group")
        if group in self.kv_links or group in self._link_opening or not self._link_wanted(source):
            return
        if time.monotonic() < self._link_retry_at.get(group, 0.0):
            return
        task = asyncio.get_running_loop().create_task(self._open_link(dict(source)))
        self._link_opening[group] = task

    async def _open_link(self, source: dict[str, Any]) -> None:
        group = source["group"]
        try:
            await asyncio.wait_for(self.open_kv_link(source), self.kv_transfer_timeout_s)
            self._link_retry_at.pop(group, None)
            log.info("pair group (%s) with %s open", self.kv_link_backend, group)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # hand-offs from it go by shm / inline meanwhile
            self.kv["link_failures"] += 1
            self._link_retry_at[group] = time.monotonic() + LINK_RETRY_S
            level = logging.INFO if group in self._link_warned else logging.WARNING
            self._link_warned.add(group)
            log.log(level, "no pair group with %s (KV goes by shm / inline; retried in %.0f s): %r",
                    group, LINK_RETRY_S, e)  # fmt: skip
        finally:
            self._link_opening.pop(group, None)

    def drop_link(self, group: str, why: str) -> None:
        """Close the pair group with `group` (it left, or a transfer over it failed: a pair
        whose sends and receives got out of step is not used again)."""
        pair = self.kv_links.pop(group, None)
        self._link_locks.pop(group, None)
        opening = self._link_opening.pop(group, None)
        if opening is not None:
            opening.cancel()
        if pair is not None:
            log.info("pair group with %s dropped: %s", group, why)
            _close(pair)

    def sync_kv_links(self, members: list[dict[str, Any]]) -> None:
        """The registry's current list (cluster.registry.Member dicts): drop the links to
        groups no longer in it; a decode group opens links to the ready prefill groups that
        want one. Called on every heartbeat."""
        present = {m["name"] for m in members}
        for group in [g for g in self.kv_links if g not in present]:
            self.drop_link(group, "it left the registry")
        for group in [g for g in self._link_retry_at if g not in present]:
            self._link_retry_at.pop(group)
            self._link_warned.discard(group)
        if self.role != "decode" or getattr(self, "draining", False):
            return
        for m in members:
            if m.get("role") == "prefill" and m.get("state", "ready") == "ready":
                self.ensure_link(
                    {k: m.get(k) for k in ("host", "port", "secret", "node_id")}
                    | {"group": m["name"]}
                )


def _close(pair: Any) -> None:
    """Close a pair group off the loop (an abort may wait for the backend's own threads)."""
    if pair is not None:
        asyncio.get_running_loop().run_in_executor(None, pair.close)
