"""Router logic when requests move (fake groups, tests/router/fake_groups.py, no Ray): a group
dying or going silent mid-stream (resume elsewhere, bounded migrations), prefill -> decode
hand-offs, groups joining, draining and leaving while serving."""

from __future__ import annotations

import asyncio

import pytest
from fake_groups import PD, FakeGroup, _wait_dead, collect, fake_member, run

from router.config import RouterConfig
from router.errors import api_error
from workers.errors import EngineDraining
from workers.sampling_params import SamplingParams


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
