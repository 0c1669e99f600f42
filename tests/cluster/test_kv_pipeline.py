"""The pipelined hand-off export (cluster/kv_export.py): with chunked prefill, each chunk's full
blocks go into the request's arena slot as its step returns, and the slot then holds exactly
what a one-shot export at the first token copies; the decode engine continues with the same
greedy tokens; an abort mid-prefill or a stop at the first token leaves no slot and no block
held. The same KV also travels between two processes over a gloo pair group (kv_transports
"dist")."""

from __future__ import annotations

import asyncio
import multiprocessing as mp

import pair_support
import pytest
import torch

from cluster import kv_transfer, kv_transports
from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine import LLMEngine
from cluster.kv_arena import ArenaMaps, KVArena
from cluster.kv_transfer import KVLayout
from workers.config import ModelConfig
from workers.sampling_params import SamplingParams

BLOCK, CHUNK = 4, 8
PROMPT = [100 + (13 * i) % 700 for i in range(30)]  # 7 full blocks, 4 chunked-prefill steps
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pd(tiny_model_dir):
    """(prefill engine with an arena, chunks of CHUNK tokens; decode engine; the arena)."""
    model = ModelConfig(model=tiny_model_dir("llama"), dtype="float32", num_threads=1)
    cache = CacheConfig(block_size=BLOCK, num_blocks=64)
    prefill = LLMEngine(
        EngineConfig(
            model=model, cache=cache, scheduler=SchedulerConfig(max_num_batched_tokens=CHUNK)
        )
    )
    decode = LLMEngine(EngineConfig(model=model, cache=cache))
    arena = KVArena("test-pipe", 1 << 20)
    prefill.kv_export.target = arena
    yield prefill, decode, arena
    arena.close()


def _handoff(engine: LLMEngine, rid: str, params=GREEDY):
    """Prefill PROMPT from an empty prefix cache; the hand-off output and, per step, the slot's
    blocks already filled (counted by the exporter)."""
    engine.block_manager.reset_prefix_cache()
    engine.add_request(PROMPT, params, rid, handoff=True)
    early = []
    for _ in range(20):
        outs = [o for o in engine.step() if o.request_id == rid and o.finished]
        if outs:
            return outs[0], early
        early.append(engine.kv_export._exports[rid].done if rid in engine.kv_export._exports else 0)
    raise AssertionError(f"{rid} was not handed off")


@pytest.mark.parametrize("background", [False, True], ids=["inline", "copier"])
def test_pipelined_export_equals_one_shot(pd, background):
    prefill, _, arena = pd
    exp = prefill.kv_export
    exp.pipelined = False
    one, _ = _handoff(prefill, "one-shot")
    want = one.kv[1].clone()
    arena.release("one-shot")
    exp.pipelined, exp.background = True, background
    early0, late0 = exp.early_blocks, exp.late_blocks
    out, early = _handoff(prefill, f"pipe-{background}")
    tokens, data = out.kv
    assert tokens == one.kv[0] == PROMPT[:28]
    assert torch.equal(data, want)  # byte for byte
    # steps of 8 tokens: 2, 4, 6 full blocks went into the slot before the first token; the
    # last step (tokens 24..30) completed the 7th, copied at the hand-off
    assert early == [2, 4, 6]
    assert (exp.early_blocks - early0, exp.late_blocks - late0) == (6, 1)
    off, gen = arena.where(out.request_id)
    assert data.data_ptr() == arena.buf[off:].data_ptr() and gen > 0  # in the slot, held
    assert arena.release(out.request_id) and arena.lent == 0


def test_greedy_tokens_identical_p_to_d(pd):
    """Chunked prefill with the copier, then the decode engine imports from the slot (as a
    same-node decode group does) and continues: the tokens of one uninterrupted run."""
    prefill, decode, arena = pd
    prefill.kv_export.pipelined = prefill.kv_export.background = True
    decode.block_manager.reset_prefix_cache()
    want = decode.generate([PROMPT], GREEDY)[0].token_ids
    decode.block_manager.reset_prefix_cache()
    head, _ = _handoff(prefill, "pd")
    tokens, data = head.kv
    msg = kv_transfer.pack(tokens, data, prefill.kv_layout, (arena.path, *arena.where("pd")))
    maps = ArenaMaps()
    got_tokens, view, layout = kv_transfer.unpack(msg, maps)
    check = lambda: kv_transfer.arena_current(msg, maps)  # noqa: E731
    assert decode.import_kv(got_tokens, view, layout, still_valid=check) == 28
    arena.release("pd")
    rid = decode.add_request(PROMPT, GREEDY, "pd-d", resume_output_ids=head.token_ids)
    while decode.has_unfinished():
        outs = [o for o in decode.step() if o.request_id == rid]
    assert outs[-1].num_cached_tokens == 28 and outs[-1].token_ids == want


@pytest.mark.parametrize("how", ["abort", "stop-at-first-token"])
def test_a_request_that_is_not_handed_off_holds_nothing(pd, how):
    prefill, _, arena = pd
    prefill.kv_export.pipelined = prefill.kv_export.background = True
    prefill.block_manager.reset_prefix_cache()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rid = prefill.add_request(PROMPT, params if how != "abort" else GREEDY, how, handoff=True)
    prefill.step()
    prefill.step()  # mid-prefill: a slot reserved, copies queued
    assert arena.lent == 1 and prefill.kv_export.active == 1
    if how == "abort":
        assert prefill.abort(rid)
    else:
        while prefill.has_unfinished():
            outs = [o for o in prefill.step() if o.finished]
        assert outs[0].finish_reason == "length" and outs[0].kv is None
    assert arena.lent == 0 and prefill.kv_export.active == 0
    audit = prefill.block_audit()
    assert audit["leaked"] == 0 and audit["in_use"] == 0


def test_dist_transport_round_trip_over_gloo():
    from parallel.pair import PairGroup

    layout = KVLayout("m", 2, 1, 4, "bfloat16", 2)
    data = torch.randn(layout.shape(3)).to(torch.bfloat16)
    tokens = list(range(6))
    store = PairGroup.listen("127.0.0.1", 30)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    sender = kv_transports.sender("dist", pair=None)
    assert sender.via == "inline"  # no pair group with the taker: the bytes go inline
    msg = kv_transfer.header(tokens, data, layout) | {"dist": {"tag": 1, "bytes": data.numel() * 2}}
    child = ctx.Process(target=pair_support.receive, args=(store.port, msg, data, q))
    child.start()
    try:
        pair = PairGroup(store, 0, "gloo", "127.0.0.1", 30)

        async def send() -> dict:
            return kv_transports.Dist(pair).send("r", tokens, data, layout)

        assert asyncio.run(send()) == msg  # the header the taker reads: tag 1, its bytes
        got = q.get(timeout=60)
        assert got == (tokens, layout, True, True), got
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def test_groups_hand_off_over_their_pair_group(pd, tiny_model_dir, monkeypatch):
    """Two replica groups in one process, kv_transport "dist": the decode group learns of the
    prefill group from the registry's list (sync_kv_links, as on its heartbeat) and joins a
    gloo pair group with it in the background; a hand-off then goes through it ("dist") and
    continues with the tokens of an uninterrupted run, the prefill group's slot going back
    once it is sent. A prefill group that cannot be joined costs one counted failure, not
    retried at once; a group that left the registry loses its link, on both sides, and one
    that (re)appears gets a new one."""
    import ray

    from cluster.replica_group import ReplicaGroup

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    cfg = pd[0].config
    p = ReplicaGroup(cfg, name="P", role="prefill", kv_arena_mib=1)
    d = ReplicaGroup(cfg, name="D", role="decode", kv_transport="dist")
    params = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}

    async def ids(stream) -> tuple[list[int], dict]:
        deltas = [x async for x in stream]
        return [t for x in deltas for t in x["ids"]], deltas[-1]

    async def until(cond) -> None:
        for _ in range(600):
            if cond():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("timed out")

    async def main():
        host, port, secret = await p.data_address()
        source = {"group": "P", "host": host, "port": port, "secret": secret}
        gone = {"name": "X", "role": "prefill", "host": host, "port": 1, "secret": b""}
        members = [{"name": "P", "role": "prefill", **source}, gone]
        d.sync_kv_links(members)
        await until(lambda: "P" in d.kv_links and "D" in p.kv_links and not d._link_opening)
        assert d.kv_links["P"].id == p.kv_links["D"].id and "X" not in d.kv_links
        assert d.kv["link_failures"] == 1
        d.sync_kv_links(members)  # X is not retried yet
        assert not d._link_opening and d.kv["link_failures"] == 1
        want, _ = await ids(d.generate_stream("c", PROMPT, params))
        d.engine.engine.block_manager.reset_prefix_cache()  # the tail must import, not hit
        first, last = await ids(p.generate_stream("r", PROMPT, params, {"handoff": True}))
        assert last["finish"] == "handoff" and p.arena.lent == 1
        leg = {"resume": first, "kv_from": source}
        rest, last = await asyncio.wait_for(ids(d.generate_stream("r", PROMPT, params, leg)), 30)
        await until(lambda: p.arena.lent == 0)  # the send completes in a thread, then it goes
        s = p.stats()
        links = (s["kv_links"], d.stats()["kv_links"], d.stats()["kv_dist_imports"])
        old = d.kv_links["P"].id
        d.sync_kv_links([])
        p.sync_kv_links([])
        assert d.kv_links == {} == p.kv_links
        d.sync_kv_links(members[:1])  # P is back (or a new group): a new pair group
        await until(lambda: "P" in d.kv_links and "D" in p.kv_links and not d._link_opening)
        assert d.kv_links["P"].id == p.kv_links["D"].id != old
        p._server.close()
        return want, first + rest, last, s, links

    try:
        want, got, last, s, links = asyncio.run(main())
        assert last["kv_transfer"]["via"] == "dist" and last["usage"]["cached_tokens"] == 28
        assert got == want and links == (["D"], ["P"], 1)
        # 6 of the prompt's 7 blocks were in the slot before its first token
        assert (s["kv_export_early_blocks"], s["kv_export_late_blocks"]) == (6, 1)
    finally:
        p.kv_links.clear()
        d.kv_links.clear()
        p.engine.shutdown()
        d.engine.shutdown()


def test_the_transport_follows_the_mode_and_the_placement():
    """pools.kv_transport's rule (kv_transports.choose / wants_link): which pair groups a
    decode group opens, and what it asks a prefill group for."""
    same, other = {"group": "P", "node_id": "n1"}, {"group": "P", "node_id": "n2"}
    linked, none = {"P": object()}, {}
    want = kv_transports.wants_link
    # dist: a link with every prefill group; auto: only NCCL where shared memory cannot
    assert want("dist", "gloo", True, True) and want("dist", "nccl", False, True)
    assert want("auto", "nccl", False, True) and want("auto", "nccl", True, False)
    assert not want("auto", "nccl", True, True) and not want("auto", "gloo", False, True)
    assert not any(want(m, "nccl", False, True) for m in ("shm", "inline"))

    def choose(source, links, mode, arena=True):
        return kv_transports.choose(source, "n1", links, mode, arena)

    assert [choose(s, none, "auto") for s in (same, other)] == ["shm", "inline"]
    assert [choose(s, linked, "dist") for s in (same, other)] == ["dist", "dist"]
    # a link not (yet) open, or failed: the next transport, never an error
    assert [choose(s, none, "dist") for s in (same, other)] == ["shm", "inline"]
    assert choose(same, none, "auto", arena=False) == "inline"
    assert choose(same, linked, "inline") == "inline" and choose(same, linked, "shm") == "shm"
