"""A request split across two engines -- prefill (handoff=True: first token + the prompt's KV
blocks) then decode (import the blocks, resume after the first token) -- produces exactly what
one engine produces: tokens, text, finish reason; greedy and seeded; with penalties and stop
strings; with the blocks imported or recomputed. The same resume serves a migration after any
number of tokens."""

from __future__ import annotations

import pytest

from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine import LLMEngine
from workers.config import ModelConfig
from workers.sampling_params import SamplingParams

BLOCK = 8


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    cfg = EngineConfig(
        model=ModelConfig(model=tiny_model_dir("llama"), dtype="float32", num_threads=1),
        cache=CacheConfig(block_size=BLOCK, num_blocks=256),
    )
    return LLMEngine(cfg), LLMEngine(cfg), LLMEngine(cfg)  # colocated, prefill, decode


def _run(engine: LLMEngine, rid: str, limit: int = 1000) -> list:
    outs = []
    for _ in range(limit):
        outs += [o for o in engine.step() if o.request_id == rid]
        if outs and outs[-1].finished:
            return outs
    raise AssertionError(f"{rid} did not finish in {limit} steps")


def _split(engines, prompt, params, rid, import_kv=True, move_after=1):
    """(tokens, text, finish) of the request run on the prefill engine, then moved to the
    decode engine after `move_after` tokens (1 = the prefill hand-off)."""
    _, prefill, decode = engines
    if move_after == 1:
        first = _run(prefill, prefill.add_request(prompt, params, f"{rid}-p", handoff=True))
        head = first[-1]
        if head.finish_reason != "handoff":
            return head.token_ids, head.text, head.finish_reason, None
        assert head.kv is not None
        kv_tokens, data = head.kv
        bs = prefill.block_manager.block_size
        assert kv_tokens == prompt[: len(prompt) // bs * bs]
        if import_kv and kv_tokens:
            assert decode.import_kv(kv_tokens, data) == len(kv_tokens)
    else:  # a migration: the first group streamed `move_after` tokens, then died
        ref = _run(prefill, prefill.add_request(prompt, params, f"{rid}-p"))
        head_ids = ref[-1].token_ids[:move_after]
        head_text = "".join(o.delta_text for o in ref if len(o.token_ids) <= move_after)
        head = type("Head", (), {"token_ids": head_ids, "text": head_text})
    tail = _run(
        decode, decode.add_request(prompt, params, f"{rid}-d", resume_output_ids=head.token_ids)
    )
    assert tail[-1].token_ids == head.token_ids + [t for o in tail for t in o.new_token_ids]
    text = head.text + "".join(o.delta_text for o in tail)
    return tail[-1].token_ids, text, tail[-1].finish_reason, tail[-1]


def _colocated(engines, prompt, params, rid):
    out = _run(engines[0], engines[0].add_request(prompt, params, rid))
    return out[-1].token_ids, "".join(o.delta_text for o in out), out[-1].finish_reason


PROMPTS = [
    [100 + (13 * i + k) % 700 for i in range(n)] for k, n in ((0, 45), (1, 16), (2, 5), (3, 70))
]

CASES = {
    "greedy": SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=14, temperature=0.9, top_k=50, seed=7, ignore_eos=True),
    "penalties": SamplingParams(
        max_tokens=14,
        temperature=0.0,
        frequency_penalty=0.7,
        repetition_penalty=1.3,
        ignore_eos=True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("import_kv", [True, False], ids=["imported", "recomputed"])
def test_handoff_continues_exactly(engines, case, import_kv):
    params = CASES[case]
    for i, prompt in enumerate(PROMPTS):
        want = _colocated(engines, prompt, params, f"c-{case}-{import_kv}-{i}")
        got = _split(engines, prompt, params, f"s-{case}-{import_kv}-{i}", import_kv)[:3]
        assert got == want, (case, i)


def test_imported_blocks_serve_the_decode_prefill(engines):
    prompt = PROMPTS[0]
    *_, last = _split(engines, prompt, CASES["greedy"], "cached")
    assert last.num_cached_tokens == len(prompt) // BLOCK * BLOCK  # from the imported blocks


@pytest.mark.parametrize("move_after", [2, 5, 13])
def test_migration_after_n_tokens_continues_exactly(engines, move_after):
    for case in ("greedy", "seeded"):
        params = CASES[case]
        want = _colocated(engines, PROMPTS[3], params, f"mc-{case}-{move_after}")
        got = _split(engines, PROMPTS[3], params, f"ms-{case}-{move_after}", move_after=move_after)
        assert got[:3] == want, case


def test_stop_string_across_the_handoff(engines):
    """A stop string that starts in the first token and ends later is matched, and no text the
    colocated engine holds back leaks out at the hand-off."""
    prompt = PROMPTS[1]
    probe = _colocated(engines, prompt, CASES["greedy"], "probe")
    text = probe[1]
    stop = text[1:6]  # spans the first tokens' text
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, stop=[stop])
    want = _colocated(engines, prompt, params, "stop-c")
    got = _split(engines, prompt, params, "stop-s")[:3]
    assert want[2] == "stop" and got == want


def test_a_request_that_ends_at_its_first_token_is_not_handed_off(engines):
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    tokens, _, reason, kv = _split(engines, PROMPTS[0], params, "one")
    assert reason == "length" and len(tokens) == 1 and kv is None


def _model_engines(path: str, block: int) -> tuple[LLMEngine, ...]:
    """Colocated, prefill, decode: chunked prefill (32-token budget, so the longer prompts
    take several chunks, beside the decodes of the others) and the prefix cache on."""
    cfg = EngineConfig(
        model=ModelConfig(model=path, dtype="float32"),
        cache=CacheConfig(block_size=block, num_blocks=256),
        scheduler=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4),
    )
    return LLMEngine(cfg), LLMEngine(cfg), LLMEngine(cfg)


@pytest.mark.parametrize("model", ["smollm2", "qwen3"])
def test_models_hand_off_exactly_with_chunks_and_prefix_hits(model, tiny_model_dir, smollm2_path):
    """SmolLM2 (the real model) and a random Qwen3: prompts of mixed lengths, chunked prefill,
    and prefix hits on both sides -- the later prompts share the first one's 48-token prefix,
    so the prefill engine serves it from its cache and the decode engine already holds it from
    the first import -- give exactly the colocated engine's greedy tokens."""
    path, block = (smollm2_path, 16) if model == "smollm2" else (tiny_model_dir("qwen3"), BLOCK)
    engines = _model_engines(path, block)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    shared = [200 + (17 * i) % 900 for i in range(48)]
    prompts = [
        shared + [7, 8, 9],
        shared + [500 + i for i in range(41)],  # 89 tokens: 3 chunks
        [400 + (7 * i) % 600 for i in range(70)],
        shared + [11, 12],
    ]
    prefill = engines[1]
    for i, prompt in enumerate(prompts):
        want = _colocated(engines, prompt, params, f"{model}-c{i}")
        hits = prefill.block_manager.prefix_hits
        got = _split(engines, prompt, params, f"{model}-s{i}")
        assert got[:3] == want, (model, i)
        assert got[3] is None or got[3].num_cached_tokens == len(prompt) // block * block
        if i > 0 and prompt[:48] == shared:  # the prefill side's prefix hit
            assert prefill.block_manager.prefix_hits - hits >= 48, (model, i)
    for e in engines:
        assert not e.has_unfinished()
        assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


def test_every_block_is_free_or_cached_afterwards(engines):
    for e in engines:
        bm = e.block_manager
        assert not e.has_unfinished()
        assert bm.num_free_blocks == bm.num_blocks  # cached blocks count as free (evictable)


def test_resume_is_validated(engines):
    from workers.errors import InvalidRequest

    e = engines[2]
    with pytest.raises(InvalidRequest, match="resume_output_ids: 3 tokens, max_tokens is 3"):
        e.add_request(PROMPTS[0], SamplingParams(max_tokens=3), resume_output_ids=[1, 2, 3])
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        e.add_request(PROMPTS[0], SamplingParams(max_tokens=3), resume_output_ids=[10**7])
