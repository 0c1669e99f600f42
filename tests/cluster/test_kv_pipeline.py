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
    """Two replica groups in one process: the decode group joins a gloo pair group with the
    prefill group (open_kv_link), takes a hand-off through it ("dist"), continues with the
    tokens of an uninterrupted run, and the prefill group's slot goes back once it is sent."""
    import ray

    from cluster.replica_group import ReplicaGroup

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    cfg = pd[0].config
    p = ReplicaGroup(cfg, name="P", role="prefill", kv_arena_mib=1)
    d = ReplicaGroup(cfg, name="D", role="decode")
    params = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}

    async def ids(stream) -> tuple[list[int], dict]:
        deltas = [x async for x in stream]
        return [t for x in deltas for t in x["ids"]], deltas[-1]

    async def main():
        host, port, secret = await p.data_address()
        source = {"group": "P", "host": host, "port": port, "secret": secret}
        await asyncio.wait_for(d.open_kv_link(source), 30)
        want, _ = await ids(d.generate_stream("c", PROMPT, params))
        d.engine.engine.block_manager.reset_prefix_cache()  # the tail must import, not hit
        first, last = await ids(p.generate_stream("r", PROMPT, params, {"handoff": True}))
        assert last["finish"] == "handoff" and p.arena.lent == 1
        leg = {"resume": first, "kv_from": source}
        rest, last = await asyncio.wait_for(ids(d.generate_stream("r", PROMPT, params, leg)), 30)
        for _ in range(200):  # the send completes in a thread, then the slot goes back
            if p.arena.lent == 0:
                break
            await asyncio.sleep(0.05)
        p._server.close()
        return want, first + rest, last

    try:
        want, got, last = asyncio.run(main())
        assert last["kv_transfer"]["via"] == "dist" and last["usage"]["cached_tokens"] == 28
        assert got == want and p.arena.lent == 0
        s = p.stats()  # 6 of the prompt's 7 blocks were in the slot before its first token
        early_late = (s["kv_export_early_blocks"], s["kv_export_late_blocks"])
        assert early_late == (6, 1) and s["kv_links"] == ["D"]
    finally:
        p.kv_links.clear()
        d.kv_links.clear()
        p.engine.shutdown()
        d.engine.shutdown()
