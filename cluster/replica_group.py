"""One replica group as a Ray Serve deployment: an AsyncEngine behind a small typed API.

deploy/app.py wraps this class with `serve.deployment` (one deployment per group, one replica
each, so the router addresses each group by name). Everything crossing the boundary is plain
data: token ids in, token deltas out.

Two ways to run requests:

* Multiplexed (what the router uses): each router replica holds ONE long-lived stream per group,
  `subscribe(router_id)`, and sends requests with `submit(...)` / `abort(...)`. Every message on
  the stream is a batch `[(request_id, delta), ...]` -- everything that happened since the last
  one, typically one engine step's tokens for all of that router's requests -- so the per-message
  cost of a Serve stream is paid once per step, not once per token per request. If the stream
  closes (the router went away), every request it carried is aborted.
* Per request: `generate_stream(request_id, token_ids, params)`, one Serve streaming call per
  request; cancelling the call (asyncio.CancelledError / generator close) aborts the request.

Either way a request's first delta is an error (invalid / overloaded / dead: nothing was
queued, no KV blocks held) or its first tokens; its last delta carries "finish" and "usage",
and (optional keys, for the router's metrics) "preemptions" and "timing" {queue, prefill,
decode} in seconds.
Aborting frees the request's KV blocks at the engine's next step boundary.

Errors never travel as exceptions (custom exception classes do not survive pickling well and
Serve would wrap them); they are deltas: {"error": {"kind", "field", "message"}}, kind in
cluster.deltas.ERROR_KINDS.

Groups publish load and the hashes of their cached KV blocks through stats(); the router's
prefix-aware policy matches a prompt's own block hashes (cluster.block_manager.block_hashes)
against them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from cluster import wire
from cluster.config import EngineConfig
from cluster.deltas import delta, encode_error
from cluster.kv_handoff import KVHandoff, _Leases
from cluster.latency_window import TokenLatencies
from workers.errors import EngineDead, EngineDraining, EngineOverloaded, InvalidRequest
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def _fingerprint(hashes: list[int]) -> int:
    return hash(frozenset(hashes)) if hashes else 0


class _Subscriber:
    """Deltas waiting to go out on one router's stream, and that router's running requests."""

    # Aborts of ids not (yet) submitted: remembered so that a submit overtaken by its own
    # abort (the two are separate Serve calls) is refused instead of running unread.
    MAX_EARLY_ABORTS = 4096

    def __init__(self) -> None:
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.wake = asyncio.Event()
        self.tasks: dict[str, asyncio.Task] = {}
        self.early_aborts: OrderedDict[str, None] = OrderedDict()

    def abort_early(self, request_id: str) -> None:
        self.early_aborts[request_id] = None
        while len(self.early_aborts) > self.MAX_EARLY_ABORTS:
            self.early_aborts.popitem(last=False)

    def push(self, request_id: str, delta: dict[str, Any]) -> None:
        self.pending.append((request_id, delta))
        self.wake.set()


ROLES = ("colocated", "prefill", "decode")


class ReplicaGroup(KVHandoff):
    def __init__(
        self,
        config: EngineConfig | dict,
        name: str = "group-0",
        role: str = "colocated",
        kv_lease_s: float = 30.0,
        kv_transfer_timeout_s: float = 30.0,
        kv_arena_mib: int = 0,
        kv_transport: str = "auto",
        kv_link_backend: str = "gloo",
    ):
        # Imported here so that deploy/ (which only names this class) never imports torch.
        from cluster.async_engine import AsyncEngine
        from cluster.kv_arena import ArenaMaps, KVArena

        if isinstance(config, dict):
            config = EngineConfig.model_validate(config)
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.name = name
        self.role = role
        self.leases = _Leases(kv_lease_s, on_expire=self._lease_expired)
        self.kv_transfer_timeout_s = kv_transfer_timeout_s
        # fetched and imported / recomputed instead / abandoned (the request was cancelled)
        self.kv = {"imports": 0, "recomputes": 0, "cancelled": 0, "bytes": 0, "seconds": 0.0}
        self.kv["shm_imports"] = 0  # ... of which read from a same-node prefill group's arena
        self.kv["dist_imports"] = 0  # ... of which received over a pair group
        # Same-node hand-offs go through shared memory (cluster/kv_arena.py): a prefill group
        # lends slots of its arena, a decode group maps the arenas it is sent.
        self.arena = (
            KVArena(name, kv_arena_mib << 20, hold_s=kv_lease_s + kv_transfer_timeout_s)
            if role == "prefill" and kv_arena_mib > 0
            else None
        )
        self.arena_maps = ArenaMaps()
        # pair groups with peer groups (cluster/kv_links.py), as pools.kv_transport asks
        self._init_links(kv_transport, kv_link_backend, kv_arena_mib > 0)
        self._arena_loans: dict[str, dict[str, Any]] = {}  # request -> the lender's address
        self._transfers: dict[str, dict[str, Any]] = {}  # request -> its KV fetch (_fetch_kv)
        self.config = config
        self.engine = AsyncEngine(config)
        if self.arena is not None:  # hand-offs are exported into an arena slot, chunk by chunk
            self.engine.engine.kv_export.target = self.arena
        self.num_aborted = 0  # requests whose caller went away before they finished
        self.num_requests = 0  # requests received, including refused ones
        self._subscribers: dict[str, _Subscriber] = {}
        self._server: asyncio.AbstractServer | None = None
        self.direct_links = 0  # routers connected to the direct data plane right now
        self.rejected_links = 0  # connections closed unread: no or a wrong secret
        self._secret = b""
        self.draining = False  # set by drain(): new requests are refused, running ones finish
        self.latency = TokenLatencies()  # recent TTFT / ITL, for record_autoscaling_stats

    # ---- multiplexed requests --------------------------------------------------------------
    async def subscribe(self, router_id: str) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
        """The stream of `router_id`'s deltas (see the module docstring). The first message is
        an empty batch: the subscription is live and `submit` will be accepted."""
        old = self._subscribers.get(router_id)
        if old is not None:  # the router reconnected: its old requests have no reader left
            for task in list(old.tasks.values()):
                task.cancel()
        sub = self._subscribers[router_id] = _Subscriber()
        try:
            yield []
            while True:
                await sub.wake.wait()
                sub.wake.clear()
                batch, sub.pending = sub.pending, []
                if batch:
                    yield batch
        finally:
            if self._subscribers.get(router_id) is sub:
                del self._subscribers[router_id]
            for task in list(sub.tasks.values()):
                task.cancel()

    async def submit(
        self,
        router_id: str,
        request_id: str,
        token_ids: list[int],
        params: dict[str, Any],
        leg: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Start a request whose deltas go to `router_id`'s stream. Returns None, or an error
        when that router has no live subscription here (e.g. this replica restarted). `leg`:
        see generate_stream."""
        sub = self._subscribers.get(router_id)
        if sub is None:
            return {"error": {"kind": "dead", "field": None, "message": "not subscribed"}}
        if request_id in sub.tasks:
            return {"error": encode_error(InvalidRequest("request_id", "already in flight"))}
        if request_id in sub.early_aborts:
            del sub.early_aborts[request_id]
            self.num_aborted += 1
            return {"error": {"kind": "dead", "field": None, "message": "aborted"}}
        sub.tasks[request_id] = asyncio.get_running_loop().create_task(
            self._pump(sub, request_id, token_ids, params, leg)
        )
        return None

    async def abort(self, router_id: str, request_ids: list[str]) -> None:
        """Abort requests of `router_id` (their callers went away). An id that is not running
        is remembered, so that its submit, if still on the way, is refused."""
        sub = self._subscribers.get(router_id)
        if sub is None:
            return
        for request_id in request_ids:
            task = sub.tasks.get(request_id)
            if task is not None:
                task.cancel()
            else:  # finished already, or its submit is still on the way
                sub.abort_early(request_id)

    async def _pump(
        self,
        sub: _Subscriber,
        request_id: str,
        token_ids: list[int],
        params: dict[str, Any],
        leg: dict[str, Any] | None,
    ) -> None:
        try:
            async for delta in self.generate_stream(request_id, token_ids, params, leg):
                sub.push(request_id, delta)
        finally:
            sub.tasks.pop(request_id, None)

    # ---- direct data plane --------------------------------------------------------------------
    async def data_address(self) -> tuple[str, int, bytes]:
        """Address of this group's direct data plane (started on first call): a TCP server on
        this node's Ray address that speaks the multiplexed protocol above without Serve in the
        way (cluster/wire.py has the frames), and the secret a router must open it with (Ray
        authenticates this call; the port alone gets nothing). Every Serve handle call costs
        ~3 ms here; a frame on an open socket ~0.1 ms. Closing the connection aborts every
        request it carried, like closing the Serve stream."""
        if self._server is None:
            import ray

            host = ray.util.get_node_ip_address()
            self._secret = wire.new_secret()
            self._server = await asyncio.start_server(self._serve_link, host, 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port, self._secret

    async def _serve_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        async def pump(router_id: str) -> None:
            async for batch in self.subscribe(router_id):
                writer.write(wire.frame(wire.Batch(batch)))
                await writer.drain()

        out: asyncio.Task | None = None
        try:
            if not await wire.accept(reader, writer, self._secret):
                self.rejected_links += 1
                log.warning("refused a data-plane connection without the group's secret")
                return
            hello = await wire.read_to_group(reader)
            if not isinstance(hello, wire.Hello):
                return
            if hello.version != wire.PROTOCOL_VERSION:
                msg = f"router speaks protocol {hello.version}, group {wire.PROTOCOL_VERSION}"
                log.warning("refused a data-plane connection: %s", msg)
                writer.write(wire.frame(wire.Refused(msg)))
                await writer.drain()
                return
            router_id = hello.router
            if hello.subscribe:
                out = asyncio.get_running_loop().create_task(pump(router_id))
                self.direct_links += 1
            while (msg := await wire.read_to_group(reader)) is not None:
                if isinstance(msg, wire.Submit) and out is not None:
                    err = await self.submit(router_id, msg.id, msg.ids, msg.params, msg.leg)
                    writer.write(wire.frame(wire.Ack(msg.id, err)))
                elif isinstance(msg, wire.Abort) and out is not None:
                    await self.abort(router_id, msg.ids)
                elif isinstance(msg, wire.Call):
                    await wire.send_large(writer, await self._control(msg))
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            log.info("data-plane connection closed: %r", e)
        finally:
            if out is not None:
                self.direct_links -= 1
                out.cancel()
            writer.close()

    async def _control(self, call: wire.Call) -> wire.Reply:
        """A control call from a router (stats, drain) or a peer group (take_kv)."""
        try:
            if call.method == "stats":
                value = self.stats(*call.args)
            elif call.method == "drain":
                value = self.drain()
            elif call.method == "take_kv":
                value = self.take_kv(*call.args)
            elif call.method == "kv_link":
                value = self.kv_link(*call.args)
            elif call.method == "release_kv":
                value = self.arena.release(*call.args) if self.arena is not None else False
            else:
                return wire.Reply(call.id, err=f"unknown call {call.method!r}")
            return wire.Reply(call.id, value)
        except Exception as e:  # answer, never drop the connection over one bad call
            log.exception("control call %s failed", call.method)
            return wire.Reply(call.id, err=repr(e))

    # ---- requests ------------------------------------------------------------------------
    async def generate_stream(
        self,
        request_id: str,
        token_ids: list[int],
        params: dict[str, Any],
        leg: dict[str, Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream token deltas (see the module docstring for the message shapes).

        `leg` moves a request between groups (the router's hand-offs and migrations):
          {"handoff": True}      prefill pool: stop after the first token with finish
                                 "handoff" and hold the prompt's KV under a lease here;
          {"resume": [ids..],    continue after these output tokens, importing the prompt's
           "kv_from": group}     KV from that group's lease first (if it is gone or late:
                                 recompute, which gives the same tokens, only later).
        """
        self.num_requests += 1
        finished = False
        leg = leg or {}
        try:
            if self.draining:
                raise EngineDraining(f"replica group {self.name} is shutting down")
            sampling = SamplingParams.from_dict(params)
            kv = await self._fetch_kv(leg["kv_from"], request_id) if leg.get("kv_from") else None
            stream = self.engine.generate(
                token_ids,
                sampling,
                request_id,
                resume_output_ids=leg.get("resume", ()),
                handoff=bool(leg.get("handoff")),
                kv=kv,
            )
            last_t = None  # when this request's previous tokens came (self.latency.observe)
            async for out in stream:
                if request_id in self._arena_loans:  # imported (the engine did it first)
                    self._give_back_arena(request_id)
                finished = out.finished
                last_t = self.latency.observe(out, last_t)
                if out.finish_reason == "handoff":
                    self.leases.put(request_id, out.kv)
                msg = delta(out, sampling, self.name)
                if out.finished and request_id in self._transfers:
                    msg["kv_transfer"] = self._transfers.pop(request_id)
                yield msg
        except (InvalidRequest, EngineOverloaded, EngineDraining, EngineDead) as e:
            finished = True
            yield {"error": encode_error(e)}
        except Exception as e:  # never let a traceback reach the client
            finished = True
            log.exception("request %s failed", request_id)
            yield {"error": encode_error(e)}
        finally:
            self._transfers.pop(request_id, None)  # (a leg that ended without a last delta)
            # Cancelled (CancelledError) or closed early (GeneratorExit): free the KV blocks now.
            # The engine stream sends the same abort from its own finally; abort is idempotent.
            if not finished:
                self.num_aborted += 1
                await self.engine.abort(request_id)

    # ---- shutdown ------------------------------------------------------------------------------
    def drain(self) -> int:
        """Stop accepting requests (each new one is refused with kind "draining", so the router
        tries another group); running ones go on. Returns how many are still in flight, which
        stats() keeps reporting until it reaches 0. Idempotent."""
        self.draining = True
        s = self.engine.stats()
        return s.num_running + s.num_waiting

    # ---- introspection -----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What the router needs once: limits, block size and the tokenizer's files (so the
        router tokenizes exactly as this engine does without loading the model)."""
        eng = self.engine.engine
        return {
            "name": self.name,
            "role": self.role,
            "model": self.config.model.name,
            "max_model_len": eng.max_model_len,
            "vocab_size": eng.vocab_size,
            "block_size": self.config.cache.block_size,
            "num_blocks": eng.block_manager.num_blocks,
            "max_logprobs": 20,
            "tokenizer_files": _tokenizer_files(eng.tokenizer),
        }

    def stats(self, known_fingerprint: int | None = None) -> dict[str, Any]:
        """Load, KV usage and prefix-cache counters; the cached block hashes only when they
        changed since `known_fingerprint` (the router's last copy)."""
        s = self.engine.stats()
        self.leases.sweep()
        if self.arena is not None:
            self.arena.sweep()
        bm = self.engine.engine.block_manager
        hashes = self.engine.cached_block_hashes()
        fp = _fingerprint(hashes)
        return {
            "name": self.name,
            "healthy": self.health(),
            "hung": self.engine.hung is not None,
            "draining": self.draining,
            "time": time.time(),
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "kv_usage": s.kv_usage,
            "num_free_blocks": s.num_free_blocks,
            "num_blocks": s.num_blocks,
            "prefix_hit_rate": s.prefix_hit_rate,
            "prefix_queries": bm.prefix_queries,
            "prefix_hits": bm.prefix_hits,
            "num_preemptions": s.num_preemptions,
            "spec_num_draft_tokens": s.spec_num_draft_tokens,
            "spec_num_accepted_tokens": s.spec_num_accepted_tokens,
            "num_requests": self.num_requests,
            "num_aborted": self.num_aborted,
            # Running requests per router replica (its id): what that router's death aborts.
            "router_requests": {rid: len(sub.tasks) for rid, sub in self._subscribers.items()},
            "direct_links": self.direct_links,
            "rejected_links": self.rejected_links,
            "role": self.role,
            "kv_leases": len(self.leases.items),
            "kv_lease_blocks": self.leases.blocks(self.config.cache.block_size),
            "kv_leases_taken": self.leases.taken,
            "kv_lease_expiries": self.leases.expired,
            "kv_imports": self.kv["imports"],
            "kv_recomputes": self.kv["recomputes"],
            "kv_transfers_cancelled": self.kv["cancelled"],
            "kv_transfer_bytes": self.kv["bytes"],
            "kv_transfer_seconds": self.kv["seconds"],
            "kv_shm_imports": self.kv["shm_imports"],
            "kv_dist_imports": self.kv["dist_imports"],
            "kv_link_failures": self.kv["link_failures"],
            "kv_arena_lent": self.arena.lent if self.arena is not None else 0,
            "kv_arena_expired": self.arena.expired if self.arena is not None else 0,
            # hand-off blocks copied while the prompt's prefill ran / when its first token came
            "kv_export_early_blocks": self.engine.engine.kv_export.early_blocks,
            "kv_export_late_blocks": self.engine.engine.kv_export.late_blocks,
            "kv_links": sorted(self.kv_links),  # groups this one joined a pair group with
            "hash_fingerprint": fp,
            "hashes": None if fp == known_fingerprint else hashes,
            "blocks": dict(self.engine.blocks),  # as of the engine's last idle moment
        } | self.engine.engine.executor.layout()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom metrics Serve forwards to autoscaling policies (deploy/autoscaling_policy.py).
        The latency p90s cover the last 30 s; 0.0 means no sample, not fast."""
        s = self.engine.stats()
        ttft_p90, itl_p90 = self.latency.p90_ms()
        return {
            "num_running": float(s.num_running),
            "num_waiting": float(s.num_waiting),
            "kv_usage": float(s.kv_usage),
            "ttft_ms_p90": ttft_p90,
            "itl_ms_p90": itl_p90,
        }

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; after 3 failures in a row (raised, or
        no answer within health_check_timeout_s) Serve replaces the replica."""
        if self.engine.dead is not None:
            raise EngineDead(f"engine failed: {self.engine.dead!r}")
        if self.engine.hung is not None:
            raise EngineDead(f"engine hung: {self.engine.hung}")

    def health(self) -> bool:
        return self.engine.dead is None and self.engine.hung is None

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # interpreter shutdown: nothing left to free
                pass


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="flotilla-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = f.read()
        return files
