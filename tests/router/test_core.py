"""Router logic against fake replica-group handles (no Ray): the multiplexed link, retries on
overload, failover, session pins, aborts, stats polling."""

from __future__ import annotations

import asyncio

import pytest

from cluster.block_manager import block_hashes
from cluster.registry import Member
from router.config import RouterConfig
from router.core import Router
from router.directory import StaticDirectory
from router.errors import NoHealthyGroup, api_error
from workers.errors import EngineDraining, EngineOverloaded, InvalidRequest
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


def test_start_loads_limits_and_tokenizer(tokenizer_files):
    async def body(r, groups):
        assert r.limits.max_model_len == 128 and r.block_size == 4
        assert r.tokenize("Hello") == r.tokenizer.encode("Hello")
        assert len(r.healthy_groups()) == 1

    run(tokenizer_files, ["ok"], body)


def test_stream_relays_deltas_and_usage(tokenizer_files):
    async def body(r, groups):
        chunks = await collect(r, [1, 2, 3])
        assert [c.ids for c in chunks] == [[100], [101], [102]]
        assert chunks[-1].finish == "length" and chunks[-1].usage["completion_tokens"] == 3
        assert all(c.group == "g0" for c in chunks) and r.groups["g0"].inflight == 0
        assert groups["g0"].aborted == [] and r.groups["g0"].link.num_open == 0
        c = await r.complete([1], SamplingParams(max_tokens=4))
        assert c.ids == [100, 101, 102, 103] and c.text == "aaaa" and c.finish == "length"

    run(tokenizer_files, ["ok"], body)


def test_overloaded_group_is_skipped_then_refused(tokenizer_files):
    async def body(r, groups):
        for _ in range(3):  # round robin alternates; the overloaded group always passes it on
            assert (await collect(r, [1]))[-1].group == "g1"
        groups["g1"].mode = "overloaded"
        with pytest.raises(EngineOverloaded) as e:
            await collect(r, [1])
        assert api_error(e.value).grpc_code.name == "RESOURCE_EXHAUSTED"
        assert all(g.inflight == 0 and g.link.num_open == 0 for g in r.groups.values())
        assert groups["g0"].aborted == []  # refused requests hold nothing: no abort needed

    run(tokenizer_files, ["overloaded", "ok"], body)


def test_dead_group_fails_over_then_unavailable(tokenizer_files):
    async def body(r, groups):
        groups["g0"].kill()
        for _ in range(100):
            if not r.groups["g0"].link.live.is_set():
                break
            await asyncio.sleep(0.01)
        assert [g.name for g in r.healthy_groups()] == ["g1"]
        assert (await collect(r, [1]))[-1].group == "g1"
        groups["g1"].kill()
        await asyncio.sleep(0.05)
        with pytest.raises(NoHealthyGroup) as e:
            await collect(r, [1])
        assert api_error(e.value).http_status == 503
        groups["g0"].mode = "ok"  # back: the link resubscribes on its own
        for _ in range(300):
            if r.groups["g0"].link.live.is_set():
                break
            await asyncio.sleep(0.01)
        await r.poll_once()
        assert (await collect(r, [1]))[-1].group == "g0"

    run(tokenizer_files, ["ok", "ok"], body)


def test_group_dying_mid_stream_fails_the_request(tokenizer_files):
    async def body(r, groups):
        agen = r.stream([1], SamplingParams(max_tokens=50))
        await agen.__anext__()
        groups["g0"].kill()
        with pytest.raises(Exception) as e:
            async for _ in agen:
                pass
        assert api_error(e.value).grpc_code.name == "UNAVAILABLE"

    run(tokenizer_files, ["ok"], body)


def test_invalid_from_group_is_raised_not_retried(tokenizer_files):
    async def body(r, groups):
        with pytest.raises(InvalidRequest):
            await collect(r, [1])
        assert groups["g1"].calls == []

    run(tokenizer_files, ["invalid", "ok"], body)


def test_session_pins_override_round_robin(tokenizer_files):
    async def body(r, groups):
        first = (await collect(r, [1], session="s1"))[-1].group
        for _ in range(3):
            assert (await collect(r, [2], session="s1"))[-1].group == first

    run(tokenizer_files, ["ok", "ok"], body)


def test_closing_early_aborts_the_request(tokenizer_files):
    async def body(r, groups):
        agen = r.stream([1, 2], SamplingParams(max_tokens=50), request_id="req-1")
        await agen.__anext__()
        await agen.aclose()
        for _ in range(100):
            if groups["g0"].aborted:
                break
            await asyncio.sleep(0.01)
        assert groups["g0"].aborted == ["req-1"]
        assert r.groups["g0"].inflight == 0 and r.groups["g0"].link.num_open == 0

    run(tokenizer_files, ["ok"], body)


def test_cancelled_task_aborts_the_request(tokenizer_files):
    async def body(r, groups):
        task = asyncio.ensure_future(collect(r, [1], max_tokens=500))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert len(groups["g0"].aborted) == 1 and not groups["g0"].running

    run(tokenizer_files, ["ok"], body)


def test_prefix_aware_follows_published_and_pending_hashes(tokenizer_files):
    async def body(r, groups):
        prefix = list(range(100, 140))
        groups["g1"].hashes = block_hashes(prefix, 4)
        await r.poll_once()
        assert (await collect(r, prefix + [1, 2]))[-1].group == "g1"
        # A new prefix: the first request picks a group; the next ones follow it before any poll.
        other = list(range(500, 540))
        g = (await collect(r, other + [1]))[-1].group
        for i in range(2, 5):
            assert (await collect(r, other + [i]))[-1].group == g

    run(tokenizer_files, ["ok", "ok"], body, policy="prefix_aware")


def test_stream_n_interleaves_choices(tokenizer_files):
    async def body(r, groups):
        sps = [SamplingParams(max_tokens=2), SamplingParams(max_tokens=3)]
        chunks = [c async for c in r.stream_n([[1], [1]], sps, None)]
        assert sorted(c.index for c in chunks) == [0, 0, 1, 1, 1]

    run(tokenizer_files, ["ok", "ok"], body)


def test_inbox_merges_what_queued_up_but_never_an_error():
    from router.link import Inbox

    async def main():
        box = Inbox()
        for i in range(3):
            box.put({"ids": [i], "text": str(i), "lp": [i]})
        box.put({"error": {"kind": "dead"}})
        box.put({"ids": [9], "text": "9", "lp": None, "finish": "stop"})
        first = await box.next()
        assert first == {"ids": [0, 1, 2], "text": "012", "lp": [0, 1, 2]}
        assert "error" in await box.next()
        assert (await box.next())["finish"] == "stop"

    asyncio.run(main())


async def _wait_dead(r, name):
    for _ in range(300):
        if not r.groups[name].link.live.is_set():
            return
        await asyncio.sleep(0.01)


def test_group_dying_mid_stream_resumes_on_another(tokenizer_files):
    """The router holds every token it relayed: a group dying under a stream moves it to a
    healthy group, which resumes after those tokens; the client sees each token once."""

    async def body(r, groups):
        agen = r.stream([1], SamplingParams(max_tokens=40))
        got = [await agen.__anext__() for _ in range(5)]
        assert {c.group for c in got} == {"g0"}
        groups["g0"].kill()
        got += [c async for c in agen]
        ids = [i for c in got for i in c.ids]
        assert ids == list(range(100, 140))  # no token missing or repeated
        assert got[-1].finish == "length" and got[-1].group == "g1"
        resumed = groups["g1"].legs[-1]["resume"]
        assert resumed == ids[: len(resumed)] and len(resumed) >= 5
        assert r.counters["migrations"] == 1
        assert all(g.inflight == 0 for g in r.groups.values())

    run(tokenizer_files, ["ok", "ok"], body)


def test_a_silent_group_s_requests_move_after_group_timeout(tokenizer_files):
    """A group whose connection stays up but which answers nothing (a hung event loop): after
    group_timeout_s without a stats answer its requests resume elsewhere, and the group is
    told to abort them."""

    async def body(r, groups):
        agen = r.stream([1], SamplingParams(max_tokens=30))
        got = [await agen.__anext__() for _ in range(4)]
        assert {c.group for c in got} == {"g0"}
        groups["g0"].hang()
        t0 = asyncio.get_running_loop().time()
        got += [c async for c in agen]
        waited = asyncio.get_running_loop().time() - t0
        assert [i for c in got for i in c.ids] == list(range(100, 130))
        assert got[-1].group == "g1" and r.counters["migrations"] == 1
        # bound: group_timeout_s + one poll (capped at group_timeout_s) + stats_interval_s
        assert 0.3 <= waited < 2 * 0.3 + 0.05 + 0.5, waited
        assert not r.groups["g0"].healthy and r.groups["g0"].link.live.is_set()
        for _ in range(100):
            if groups["g0"].aborted:
                break
            await asyncio.sleep(0.01)
        assert len(groups["g0"].aborted) == 1
        assert all(g.inflight == 0 for g in r.groups.values())

    run(tokenizer_files, ["ok", "ok"], body, stats_interval_s=0.05, group_timeout_s=0.3)


def test_group_timeout_is_validated():
    from pydantic import ValidationError

    assert RouterConfig().group_timeout_s == 30.0
    with pytest.raises(ValidationError, match="group_timeout_s"):
        RouterConfig(group_timeout_s=0)


def test_migrations_are_bounded(tokenizer_files):
    async def body(r, groups):
        agen = r.stream([1], SamplingParams(max_tokens=400))
        await agen.__anext__()
        groups["g0"].kill()
        while not groups["g1"].legs:  # moved to g1
            await agen.__anext__()
        await agen.__anext__()
        groups["g1"].kill()  # a second death: max_migrations=1 is spent
        with pytest.raises(Exception) as e:
            async for _ in agen:
                pass
        assert api_error(e.value).grpc_code.name == "UNAVAILABLE"
        assert r.counters["migrations"] == 1

    run(tokenizer_files, ["ok", "ok"], body, max_migrations=1)


PD = {"g0": "prefill", "g1": "decode"}


def test_disaggregated_prefill_then_decode(tokenizer_files):
    async def body(r, groups):
        chunks = await collect(r, list(range(1, 9)), max_tokens=6)
        ids = [i for c in chunks for i in c.ids]
        assert ids == list(range(100, 106))
        assert chunks[0].group == "g0" and chunks[0].finish is None  # first token, at once
        assert {c.group for c in chunks[1:]} == {"g1"} and chunks[-1].finish == "length"
        assert groups["g0"].legs == [{"handoff": True}]
        assert groups["g1"].legs == [{"resume": [100], "kv_from": KV_FROM_FAKE_G0}]
        assert all(g.inflight == 0 and g.link.num_open == 0 for g in r.groups.values())

    run(tokenizer_files, ["ok", "ok"], body, roles=PD, pd_min_prompt_tokens=4)


def test_short_prompts_and_a_dead_prefill_pool_prefill_on_decode(tokenizer_files):
    async def body(r, groups):
        chunks = await collect(r, [1, 2], max_tokens=3)  # below pd_min_prompt_tokens
        assert {c.group for c in chunks} == {"g1"} and groups["g0"].legs == []
        groups["g0"].kill()
        await _wait_dead(r, "g0")
        chunks = await collect(r, list(range(1, 9)), max_tokens=3)
        assert [i for c in chunks for i in c.ids] == [100, 101, 102]
        assert {c.group for c in chunks} == {"g1"} and groups["g1"].legs[-1] is None

    run(tokenizer_files, ["ok", "ok"], body, roles=PD, pd_min_prompt_tokens=4)


KV_FROM_FAKE_G0 = {"group": "g0", "host": "", "port": 0, "secret": b"", "node_id": ""}


def test_groups_join_drain_and_leave_while_serving(tokenizer_files):
    """A pool's groups come and go: the router links to a group the directory lists, stops
    choosing one that drains while its running stream goes on, and drops it once it left
    and its streams ended."""

    async def body(r, groups):
        extra = FakeGroup("g1", tokenizer_files)
        r.test_directory.list.append(fake_member(extra))
        await r.discover()
        for _ in range(100):
            if r.groups["g1"].link.live.is_set():
                break
            await asyncio.sleep(0.01)
        await r.poll_once()
        seen = {(await collect(r, [i]))[0].group for i in range(4)}
        assert seen == {"g0", "g1"}  # round robin now spreads over both

        agen = r.stream([1], SamplingParams(max_tokens=30))
        first = await agen.__anext__()
        busy = first.group
        idle = "g1" if busy == "g0" else "g0"
        # The busy group drains: nothing new goes there, its stream goes on to the end.
        r.test_directory.list = [
            fake_member(groups.get(n) or extra, state="draining" if n == busy else "ready")
            for n in ("g0", "g1")
        ]
        await r.discover()
        assert {(await collect(r, [i]))[0].group for i in range(3)} == {idle}
        rest = [c async for c in agen]
        assert {c.group for c in rest} == {busy} and rest[-1].finish == "length"
        # It leaves the directory: forgotten, since no stream of ours runs there any more.
        r.test_directory.list = [m for m in r.test_directory.list if m.name != busy]
        await r.discover()
        assert set(r.groups) == {idle}

    run(tokenizer_files, ["ok"], body)


def test_a_group_that_left_keeps_its_running_streams(tokenizer_files):
    async def body(r, groups):
        agen = r.stream([1], SamplingParams(max_tokens=20))
        await agen.__anext__()
        r.test_directory.list = []
        await r.discover()
        assert "g0" in r.groups and r.groups["g0"].draining  # a stream still runs there
        with pytest.raises(EngineDraining):  # UNAVAILABLE / 503 "shutting down"
            await collect(r, [2])
        rest = [c async for c in agen]
        assert rest[-1].finish == "length"
        await r.discover()
        assert r.groups == {}

    run(tokenizer_files, ["ok"], body)
