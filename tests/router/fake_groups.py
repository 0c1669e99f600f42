"""Fake replica-group handles for router tests without Ray: what the Serve handles of real
groups answer (subscribe / submit / abort / stats / info), each fake in a mode (ok, overloaded,
dead, ...); `run` starts a Router over them, runs a test body in its loop and stops it."""

from __future__ import annotations

import asyncio

from cluster.registry import Member
from router.config import RouterConfig
from router.core import Router
from router.directory import StaticDirectory
from workers.sampling_params import SamplingParams


class _Method:
    def __init__(self, fn):
        self.remote = fn


class FakeSubscription:
    """What `handle.options(stream=True).subscribe.remote(router_id)` returns."""

    def __init__(self, group: FakeGroup, router_id: str):
        self.group, self.router_id = group, router_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.group.mode == "dead":
            self.group.subs.pop(self.router_id, None)
            raise RuntimeError("actor died")
        if not self.started:
            self.started = True
            self.group.subs[self.router_id] = self
            return []
        item = await self.queue.get()
        if isinstance(item, Exception):
            self.group.subs.pop(self.router_id, None)
            raise item
        return item


class FakeGroup:
    """mode: ok | overloaded | invalid | dead | hung (connected, but answers nothing and makes
    no progress: a hung event loop); `steps` deltas of one token each."""

    def __init__(self, name: str, files: dict[str, bytes], mode: str = "ok"):
        self.name, self.files, self.mode = name, files, mode
        self.subs: dict[str, FakeSubscription] = {}
        self.calls: list[list[int]] = []
        self.legs: list[dict | None] = []
        self.aborted: list[str] = []
        self.running: dict[str, asyncio.Task] = {}
        self.hashes: list[int] = []
        self.last_extra: dict = {}  # more keys for a leg's last delta (timing, preemptions)
        self.subscribe = _Method(lambda router_id: FakeSubscription(self, router_id))
        self.submit = _Method(self._submit)
        self.abort = _Method(self._abort)
        self.stats = _Method(self._stats)
        self.info = _Method(self._info)

    def options(self, stream: bool = False):
        return self

    def hang(self):
        self.mode = "hung"

    def kill(self):
        self.mode = "dead"
        for sub in list(self.subs.values()):
            sub.queue.put_nowait(RuntimeError("actor died"))

    async def _submit(self, router_id, request_id, token_ids, params, leg=None):
        if self.mode == "dead":
            raise RuntimeError("actor died")
        sub = self.subs.get(router_id)
        if sub is None:
            return {"error": {"kind": "dead", "field": None, "message": "not subscribed"}}
        self.calls.append(token_ids)
        self.legs.append(leg)
        self.running[request_id] = asyncio.ensure_future(self._run(sub, request_id, params, leg))
        return None

    async def _run(self, sub, request_id, params, leg=None):
        leg = leg or {}
        if self.mode == "overloaded":
            err = {"kind": "overloaded", "field": None, "message": "full"}
            sub.queue.put_nowait([(request_id, {"error": err})])
            return
        if self.mode == "invalid":
            err = {"kind": "invalid", "field": "max_tokens", "message": "x"}
            sub.queue.put_nowait([(request_id, {"error": err})])
            return
        n = params.get("max_tokens", 16)
        done = len(leg.get("resume", ()))  # output token i is 100 + i, wherever it is made
        for i in range(done, n):
            await asyncio.sleep(0.001)
            while self.mode == "hung":
                await asyncio.sleep(3600)
            delta = {"ids": [100 + i], "text": "a", "lp": None}
            if i == n - 1:
                usage = {"prompt_tokens": 1, "completion_tokens": n}
                delta |= {"finish": "length", "usage": usage} | self.last_extra
            elif leg.get("handoff"):
                delta |= {"finish": "handoff", "handoff": {"group": self.name, "kv_tokens": 0}}
                delta |= self.last_extra
            sub.queue.put_nowait([(request_id, delta)])
            if "finish" in delta:
                return

    async def _abort(self, router_id, request_ids):
        for rid in request_ids:
            self.aborted.append(rid)
            task = self.running.pop(rid, None)
            if task is not None:
                task.cancel()

    async def _stats(self, fingerprint=None):
        if self.mode == "dead":
            raise RuntimeError("actor died")
        while self.mode == "hung":
            await asyncio.sleep(3600)
        fp = hash(frozenset(self.hashes))
        return {
            "name": self.name,
            "healthy": True,
            "num_running": 0,
            "num_waiting": 0,
            "kv_usage": 0.0,
            "prefix_hit_rate": 0.0,
            "hash_fingerprint": fp,
            "hashes": None if fp == fingerprint else list(self.hashes),
        }

    async def _info(self):
        return {
            "max_model_len": 128,
            "vocab_size": 49152,
            "block_size": 4,
            "tokenizer_files": self.files,
        }


def fake_member(g: FakeGroup, role: str = "colocated", state: str = "ready") -> Member:
    return Member(g.name, role, "127.0.0.1", 0, b"", state=state, handle=g)


def run(tokenizer_files, modes, body, policy="round_robin", roles=None, **config_kw):
    """Start a Router over fake groups, run `body(router, groups)` in the same loop, stop."""

    async def main():
        groups = {f"g{i}": FakeGroup(f"g{i}", tokenizer_files, m) for i, m in enumerate(modes)}
        roles_ = roles or {}
        # The fakes speak the Serve-handle data plane; the direct one is tested end to end
        # (tests/deploy) against real groups.
        directory = StaticDirectory(
            [fake_member(g, roles_.get(n, "colocated")) for n, g in groups.items()]
        )
        config_kw.setdefault("stats_interval_s", 60)
        config = RouterConfig(policy=policy, data_plane="serve", **config_kw)
        r = Router(
            directory,
            config,
            model="m",
            info_sources=list(groups.values()),
            disaggregated="prefill" in roles_.values(),
        )
        r.test_directory = directory
        await r.start()
        for _ in range(100):  # every link live (the first one is enough for start())
            if all(g.link.live.is_set() for g in r.groups.values()):
                break
            await asyncio.sleep(0.01)
        try:
            return await body(r, groups)
        finally:
            r.stop()

    return asyncio.run(main())


async def collect(r, ids, max_tokens=3, session=None):
    return [c async for c in r.stream(ids, SamplingParams(max_tokens=max_tokens), session)]


async def _wait_dead(r, name):
    for _ in range(300):
        if not r.groups[name].link.live.is_set():
            return
        await asyncio.sleep(0.01)


PD = {"g0": "prefill", "g1": "decode"}  # roles: one prefill and one decode group
