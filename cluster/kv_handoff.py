"""A replica group's side of the prefill -> decode KV hand-off (cluster.replica_group mixes it
in; the router's side is router/legs.py).

    prefill group   holds a finished prompt's KV under a lease (_Leases) until a decode group
                    takes it (take_kv, through the transport the taker asked for: inline bytes,
                    a slot of its same-node shared-memory arena, or send / recv over a pair
                    group -- cluster/kv_transports.py) or the lease runs out
    decode group    fetches it from the address the router passed on (_fetch_kv), checks it
                    fits its KV layout (_fitting_kv), imports it, gives an arena slot back once the
                    engine has read it (_give_back_arena); anything missing, late or not
                    fitting is recomputed -- the same tokens, only later
    pair groups     a decode group that joined a torch.distributed group of two with a
                    prefill group (cluster/kv_links.py: which, when, and when it is dropped)
                    takes that group's hand-offs by send / recv on it (gloo on CPU, NCCL on GPU)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

from cluster import wire
from cluster.kv_links import KVLinks

log = logging.getLogger("cluster.replica_group")  # the group's one log
_NO_LOCK = contextlib.nullcontext()


class _Leases:
    """Prompt KV exported by this (prefill) group, held until a decode group takes it or the
    lease runs out. What is held is a copy (in the group's arena, or in new memory): the
    group's own blocks went back to its prefix cache when the request finished, so an
    abandoned hand-off can never pin KV memory. `on_expire(request_id)`: a lease ran out."""

    def __init__(self, lease_s: float, on_expire: Any = None):
        self.lease_s = lease_s
        self.on_expire = on_expire
        self.items: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self.expired = 0
        self.taken = 0

    def put(self, request_id: str, kv: Any) -> None:
        self.sweep()
        self.items[request_id] = (time.monotonic() + self.lease_s, kv)

    def take(self, request_id: str) -> Any:
        self.sweep()
        item = self.items.pop(request_id, None)
        if item is None:
            return None
        self.taken += 1
        return item[1]

    def blocks(self, block_size: int) -> int:
        """KV blocks held under leases now (each lease holds whole blocks' tokens)."""
        return sum(len(kv[0]) // block_size for _, kv in self.items.values())

    def sweep(self) -> None:
        now = time.monotonic()
        while self.items and next(iter(self.items.values()))[0] < now:
            request_id, _ = self.items.popitem(last=False)
            self.expired += 1
            if self.on_expire is not None:
                self.on_expire(request_id)


class KVHandoff(KVLinks):
    """Mixed into ReplicaGroup, whose __init__ sets leases, arena, arena_maps, _arena_loans,
    kv (counters), kv_transfer_timeout_s, engine, role and name, and calls _init_links."""

    def take_kv(
        self, request_id: str, via: str = "inline", taker: str | None = None, link: int = 0
    ) -> Any:
        """A decode group takes (and so acknowledges) a request's prompt KV (token ids and block
        data), or None when the lease expired or was never made. `via`: the transport the taker
        asked for (cluster/kv_transports.py): "shm" (a decode group on this node: the answer
        names a slot of this group's arena, which the taker releases with release_kv once it
        imported it, or the slot is freed after the lease and transfer times), "dist" (the
        taker, `taker`, joined a pair group with this one -- the one whose id is `link`, when
        given: the bytes follow the answer) or "inline" (the bytes in the answer). A transport
        not there (no arena, a full one, no such pair group yet) falls back to inline."""
        from cluster import kv_transports  # torch: only in a group's process, never the router's

        kv = self.leases.take(request_id)
        if kv is None:
            return None
        tokens, data = kv
        pair = self.kv_links.get(taker) if via == "dist" and taker else None
        if pair is not None and link and pair.id != link:  # a pair the taker dropped since
            pair = None
        transport = kv_transports.sender(via, self.arena, pair)
        return transport.send(request_id, tokens, data, self.engine.engine.kv_layout)

    def _lease_expired(self, request_id: str) -> None:
        if self.arena is not None:
            self.arena.release(request_id)

    def _give_back_arena(self, request_id: str) -> None:
        """Release the arena slot the request's KV was read from (fire and forget: a release
        that does not arrive is a slot freed later by the lender's sweep)."""
        source = self._arena_loans.pop(request_id)

        async def release() -> None:
            try:
                await asyncio.wait_for(
                    wire.call_once(
                        source["host"], source["port"], source["secret"], self.name,
                        "release_kv", [request_id],
                    ),
                    10,
                )  # fmt: skip
            except Exception as e:
                log.info("arena slot of %s not released: %r", request_id, e)

        asyncio.get_running_loop().create_task(release())

    async def _fetch_kv(self, source: dict[str, Any], request_id: str) -> Any:
        """The prompt KV held by the group `source` names ({group, host, port, secret}: its
        data plane, which the router passes on), or None (then the prompt is recomputed here).
        What the fetch did is kept in self._transfers[request_id] ({via: shm | dist | inline |
        recompute, bytes, seconds}) for the leg's last delta (the router's histograms)."""
        from cluster import kv_transfer, kv_transports  # torch: only in a group's process

        t0 = time.monotonic()
        group = source.get("group", "?")
        here = getattr(getattr(self, "member", None), "node_id", None)
        self.ensure_link(source)  # (one the registry did not list yet: for the next hand-offs)
        via = kv_transports.choose(
            source, here, self.kv_links, self.kv_transport, self._kv_arena_on
        )
        try:
            msg = await asyncio.wait_for(
                self._take(source, request_id, via), self.kv_transfer_timeout_s
            )
            # Python 3.11's wait_for returns the result when the answer and a cancel of this
            # task land together, swallowing the cancel: the aborted request would then run
            # to its end. The cancel is still pending on the task; honour it.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
        except asyncio.CancelledError:  # the client went away mid-transfer: nothing to import
            self.kv["cancelled"] += 1
            raise
        except Exception as e:  # the prefill group died, or the transfer is late
            log.warning("KV of %s from %s not received, recomputing: %r", request_id, group, e)
            if via == "dist":  # sends and receives on that pair may be out of step now
                self.kv["link_failures"] += 1
                self.drop_link(group, f"a transfer failed: {e!r}")
            msg = None
        kv = None
        if msg is not None:
            via = "dist" if msg.get("dist") else "shm" if msg.get("arena") else "inline"
            kv = self._fitting_kv(msg, request_id, group)
            if kv is not None and msg.get("arena"):
                # Read in place: the slot stays lent until the engine has imported it. A
                # request cancelled before that leaves it to the lender's sweep (the engine
                # thread may still be reading it). The import checks the slot's generation
                # once more after copying: a slot swept and reused meanwhile is recomputed.
                maps = self.arena_maps
                kv = (*kv, lambda: kv_transfer.arena_current(msg, maps))
                self._arena_loans[request_id] = source
                self.kv["shm_imports"] += 1
            elif kv is not None and via == "dist":
                self.kv["dist_imports"] += 1
        seconds = time.monotonic() - t0
        if kv is None:
            self.kv["recomputes"] += 1
            self._transfers[request_id] = {"via": "recompute", "bytes": 0, "seconds": seconds}
            return None
        self.kv["imports"] += 1
        self.kv["bytes"] += kv[1].nbytes
        self.kv["seconds"] += seconds
        self._transfers[request_id] = {"via": via, "bytes": kv[1].nbytes, "seconds": seconds}
        return kv

    async def _take(self, source: dict[str, Any], request_id: str, via: str) -> Any:
        """take_kv's answer from the group `source` names, its bytes received when they came
        over a pair group (cluster/kv_transports.py), or None."""
        from cluster import kv_transports  # torch: only in a group's process

        pair = self.kv_links.get(source.get("group")) if via == "dist" else None
        # One transfer at a time per pair group: NCCL matches sends and receives in order.
        lock = self._link_locks.setdefault(source["group"], asyncio.Lock()) if pair else _NO_LOCK
        async with lock:
            # the taker's name and the pair's id only for "dist" (which only a group that has
            # a link asks for)
            args = [request_id, via, self.name, pair.id] if pair else [request_id, via]
            msg = await wire.call_once(
                source["host"], source["port"], source["secret"], self.name, "take_kv", args
            )
            return None if msg is None else await kv_transports.arrive(msg, pair)

    def _fitting_kv(self, msg: dict[str, Any], request_id: str, group: str) -> tuple | None:
        """take_kv's answer as (token ids, data, layout) when it fits this group's KV layout
        (any TP / PP / EP layout of the same model does: cluster.kv_shards), else None with
        the reason logged -- a different model, dtype, head dim or block size is recomputed."""
        from cluster import kv_transfer  # torch: only in a group's process

        try:
            tokens, data, layout = kv_transfer.unpack(msg, self.arena_maps)
            self.engine.engine.kv_layout.check(tokens, data, layout)
        except (ValueError, TypeError, KeyError, OSError) as e:
            log.warning("KV of %s from %s does not fit, recomputing: %s", request_id, group, e)
            return None
        return tokens, data, layout
