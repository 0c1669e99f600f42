"""The prefill -> decode hand-off between groups of different parallel layouts, on a real
(loopback) Ray cluster: a TP=2 group's ranks each hold one of the tiny Llama's two KV heads, a
PP=2 group's ranks the layers of their stage. Exports are the whole model's blocks (gathered
from the ranks), imports scatter them again, so P tp=1 -> D tp=2, P tp=2 -> D tp=1 and
P pp=2 -> D tp=2 continue exactly as the colocated single-process engine: greedy and seeded,
through the wire form (cluster.kv_transfer) with the sender's layout checked."""

from __future__ import annotations

import pytest
import ray

from cluster import kv_transfer
from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine import LLMEngine
from parallel.config import ParallelConfig
from workers.config import ModelConfig
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

BLOCK = 8
PROMPTS = [[100 + (13 * i + k) % 700 for i in range(n)] for k, n in ((0, 45), (1, 16), (2, 21))]
CASES = {
    "greedy": SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=10, temperature=0.9, top_k=50, seed=7, ignore_eos=True),
}


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)

    def make(**layout) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=ModelConfig(model=tiny_model_dir("llama"), dtype="float32", num_threads=1),
                cache=CacheConfig(block_size=BLOCK, num_blocks=128),
                scheduler=SchedulerConfig(max_num_batched_tokens=48),
                parallel=ParallelConfig(cpus_per_rank=0.5, **layout),
            )
        )

    made = {}
    try:
        made = {"tp1": make(), "tp2": make(tp=2), "pp2": make(pp=2)}
        yield made
    finally:
        for e in made.values():
            e.shutdown()
        ray.shutdown()


def _run(engine: LLMEngine, rid: str, limit: int = 500) -> list:
    outs = []
    for _ in range(limit):
        outs += [o for o in engine.step() if o.request_id == rid]
        if outs and outs[-1].finished:
            return outs
    raise AssertionError(f"{rid} did not finish in {limit} steps")


def _colocated(engine: LLMEngine, prompt, params, rid) -> tuple[list[int], str]:
    outs = _run(engine, engine.add_request(prompt, params, rid))
    return outs[-1].token_ids, "".join(o.delta_text for o in outs)


def _handoff(prefill: LLMEngine, decode: LLMEngine, prompt, params, rid):
    """(tokens, text, tokens served from imported blocks) of a request prefilled on one engine
    and decoded on the other, its KV through the wire form."""
    head = _run(prefill, prefill.add_request(prompt, params, f"{rid}-p", handoff=True))[-1]
    assert head.finish_reason == "handoff"
    msg = kv_transfer.pack(*head.kv, prefill.kv_layout)
    msg["data"] = bytes(msg["data"])  # what the socket delivers
    tokens, data, layout = kv_transfer.unpack(msg)
    assert layout == decode.kv_layout  # the same model's whole layout, whatever the ranks
    assert decode.import_kv(tokens, data, layout) == len(prompt) // BLOCK * BLOCK
    resume = head.token_ids
    tail = _run(decode, decode.add_request(prompt, params, f"{rid}-d", resume_output_ids=resume))
    text = head.text + "".join(o.delta_text for o in tail)
    return tail[-1].token_ids, text, tail[-1].num_cached_tokens


PAIRS = [("tp1", "tp2"), ("tp2", "tp1"), ("pp2", "tp2")]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pair", PAIRS, ids=[f"{p}-to-{d}" for p, d in PAIRS])
def test_handoff_across_layouts_continues_exactly(engines, pair, case):
    prefill, decode = engines[pair[0]], engines[pair[1]]
    params = CASES[case]
    for i, prompt in enumerate(PROMPTS):
        rid = f"{pair[0]}-{pair[1]}-{case}-{i}"
        want = _colocated(engines["tp1"], prompt, params, f"c-{rid}")
        tokens, text, cached = _handoff(prefill, decode, prompt, params, rid)
        assert (tokens, text) == want, (pair, case, i)
        assert cached == len(prompt) // BLOCK * BLOCK  # the prompt came from the imported KV


def test_a_tp2_export_is_the_whole_models_blocks(engines):
    """Gathered from both ranks, the TP=2 group's blocks equal the single-process engine's."""
    assert [s["heads"] for s in engines["tp2"].executor.kv_shards] == [[0, 1], [1, 2]]
    assert [s["layers"] for s in engines["pp2"].executor.kv_shards] == [[0, 2], [2, 3]]
    prompt = PROMPTS[0]
    params = CASES["greedy"]
    kv = {}
    for name in ("tp1", "tp2"):
        e = engines[name]
        kv[name] = _run(e, e.add_request(prompt, params, f"whole-{name}", handoff=True))[-1].kv
    assert kv["tp1"][0] == kv["tp2"][0]
    assert kv["tp1"][1].shape == kv["tp2"][1].shape == (3, 2, 5, BLOCK, 2, 16)
    assert (kv["tp1"][1] - kv["tp2"][1]).abs().max() < 1e-4


def test_every_block_is_free_or_cached_afterwards(engines):
    for e in engines.values():
        assert not e.has_unfinished()
        assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
