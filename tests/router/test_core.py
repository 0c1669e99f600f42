"""Router logic against fake replica-group handles (tests/router/fake_groups.py, no Ray): the
multiplexed link, retries on overload, failover, session pins, aborts, stats polling."""

from __future__ import annotations

import asyncio

import pytest
from fake_groups import collect, run

from cluster.block_manager import block_hashes
from router.errors import NoHealthyGroup, api_error
from workers.errors import EngineOverloaded, InvalidRequest
from workers.sampling_params import SamplingParams


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
