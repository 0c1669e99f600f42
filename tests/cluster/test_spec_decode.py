"""Speculative decoding (n-gram prompt lookup): the proposer, config checks, the scheduler's
draft bookkeeping without a model (blocks given back, switch-off), and engines whose output
must be token-for-token the non-speculative one (SmolLM2 and a random Qwen3; batched, chunked
prefill, preemption, stop conditions inside an accepted run, seeded sampling)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.block_manager import BlockManager
from cluster.config import (
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from cluster.engine import LLMEngine
from cluster.request import Request
from cluster.scheduler import Scheduler
from cluster.spec_decode import DRAFT_SLOT, Proposer, ngram_lookup
from parallel.config import ParallelConfig
from workers.config import DraftConfig, ModelConfig
from workers.messages import StepPlan, StepResult
from workers.sampling_params import SamplingParams

SPEC = SpeculativeConfig(num_tokens=4, prompt_lookup_min=2, prompt_lookup_max=3)


# ---- proposer and config -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tokens", "want"),
    [
        ([1, 2, 3, 4, 5, 9, 1, 2, 3], [4, 5, 9, 1]),  # 3-gram match, k=4 tokens after it
        ([1, 2, 3, 8, 2, 3, 7, 6, 2, 3], [7, 6, 2, 3]),  # the latest occurrence wins
        ([5, 1, 2, 6, 6, 7, 1, 2], [6, 6, 7, 1]),  # only a 2-gram matches
        ([1, 2, 3, 4, 1, 2], [3, 4, 1, 2]),
        ([1, 2, 3, 4, 5, 6], []),  # no repeat
        ([4, 4], []),  # 1-grams are below prompt_lookup_min
        ([1, 2, 1, 2], [1, 2]),  # the continuation runs up to the end, no further
        ([7, 7, 7, 7, 7, 7, 7], [7, 7, 7, 7]),  # a run: the latest match with k tokens after it
    ],
)
def test_ngram_lookup(tokens, want):
    assert ngram_lookup(tokens, 2, 3, 4) == want


def test_config_defaults_off_and_clear_errors():
    assert EngineConfig().speculative is None
    with pytest.raises(ValidationError, match="prompt_lookup_min=5 exceeds prompt_lookup_max=3"):
        SpeculativeConfig(prompt_lookup_min=5, prompt_lookup_max=3)
    with pytest.raises(ValidationError, match="needs parallel.pp=1"):
        EngineConfig(speculative=SPEC, parallel=ParallelConfig(pp=2))
    with pytest.raises(ValidationError, match="exceeds scheduler.max_num_batched_tokens=4"):
        EngineConfig(speculative=SPEC, scheduler=SchedulerConfig(max_num_batched_tokens=4))
    with pytest.raises(ValidationError, match="extra"):
        SpeculativeConfig(method="ngram", num_draft=3)
    with pytest.raises(ValidationError):
        SpeculativeConfig(method="eagle")


# ---- scheduler bookkeeping without a model ------------------------------------------------------
def make_sched(num_blocks=64, budget=256, spec=SPEC, block_size=4) -> Scheduler:
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget), bm, speculative=spec)


def repeating(rid: str, max_tokens: int = 12) -> Request:
    # 10 11 12 ... 19 10 11 12: the lookup proposes 13 14 15 16 on the first decode.
    return Request(rid, list(range(10, 20)) + [10, 11, 12], SamplingParams(max_tokens=max_tokens))


def run_step(s: Scheduler, accept: int, own: int = 99) -> StepPlan:
    """A fake worker: accepts the first `accept` drafts of each sequence, then answers `own`."""
    plan = s.schedule()
    ids, first, more = [], [], []
    for q in plan.seqs:
        if q.sample:
            got = q.token_ids[len(q.token_ids) - q.num_draft :][: min(accept, q.num_draft)] + [own]
            ids.append(q.req_id)
            first.append(got[0])
            more.append(got[1:])
    for r in s.update(plan, StepResult(plan.step_id, ids, first, None, more)):
        if r.num_output_tokens >= r.params.max_tokens:
            s.finish(r, "length")
    return plan


def test_drafts_scheduled_verified_and_rejected_blocks_given_back():
    s = make_sched(block_size=2)
    r = repeating("a")
    s.add(r)
    run_step(s, 0)  # prefill: 13 tokens -> 7 blocks of 2, first token 99
    assert r.output_token_ids == [99] and s.bm.block_table("a") == list(range(7))
    plan = run_step(s, 0)  # tail [12, 99]: no earlier occurrence -> a plain decode
    assert plan.seqs[0].num_draft == 0
    # Rewrite the tail to ... 12 99 13 14: "13 14" occurred at positions 3-4.
    r.token_ids[-1] = 13
    r.token_ids.append(14)
    r.num_computed_tokens = r.num_tokens - 1
    plan = run_step(s, 1)  # drafts 15 16 17 18; accept 15, then the worker's 99
    q = plan.seqs[0]
    assert (q.token_ids, q.num_draft, q.start_pos) == ([14, 15, 16, 17, 18], 4, 15)
    assert r.output_token_ids[-2:] == [15, 99]
    # Computed: 15 + [14, 15]; 18 tokens need 9 blocks; the 10th (17, 18's slots) went back.
    assert r.num_computed_tokens == 17 and r.num_tokens == 18
    assert len(s.bm.block_table("a")) == 9 and s.bm.num_free_blocks == 64 - 9
    assert s.proposer.num_draft_tokens == 4 and s.proposer.num_accepted_tokens == 1
    assert s.bm.audit(s.requests.keys())["leaked"] == 0
    while s.has_work():
        run_step(s, 4)
    assert r.num_output_tokens == r.params.max_tokens  # drafts never run past max_tokens
    audit = s.bm.audit(s.requests.keys())
    assert audit["leaked"] == 0 and audit["in_use"] == 0


def test_drafts_never_preempt():
    s = make_sched(num_blocks=4)  # 13 prompt tokens + 1 fill the 4 blocks of 4
    r = repeating("a", max_tokens=10)
    s.add(r)
    run_step(s, 0)
    r.token_ids[-1] = 13  # tail 12 13 -> drafts 14..17, which would need a 5th block
    plan = run_step(s, 4)
    assert (plan.seqs[0].num_draft, s.num_preemptions) == (0, 0)
    assert r.num_output_tokens == 2 and s.bm.block_table("a") == [0, 1, 2, 3]


@pytest.mark.parametrize(("limit", "drafts"), [(None, [4, 4]), (2, [4, 4]), (1, [0, 0])])
def test_no_drafts_past_disable_by_batch_size(limit, drafts):
    s = make_sched(spec=SpeculativeConfig(num_tokens=4, disable_by_batch_size=limit))
    for rid in "cd":
        s.add(Request(rid, [1] * 10, SamplingParams(max_tokens=10)))
    run_step(s, 0, own=1)  # both prefill
    assert [q.num_draft for q in run_step(s, 0, own=1).seqs] == drafts


def test_low_acceptance_switches_a_request_off():
    spec = SpeculativeConfig(num_tokens=4, probe_tokens=8, min_acceptance=0.5)
    s = make_sched(spec=spec)
    r = Request("a", [1] * 10, SamplingParams(max_tokens=20))  # always proposes 1 1 1 1
    s.add(r)
    drafted = []
    while s.has_work():
        drafted.append(run_step(s, 0, own=1).seqs[0].num_draft)
    # Two steps of 4 rejected drafts reach the probe; no drafts after that.
    assert drafted[:3] == [0, 4, 4] and set(drafted[3:]) == {0}
    assert r.spec_off and (r.spec_drafted, r.spec_accepted) == (8, 0)


def test_a_draft_model_that_misses_is_switched_off_engine_wide_then_probed_again():
    now = [0.0]
    spec = SpeculativeConfig(
        method="draft_model",
        draft=DraftConfig(num_layers=2),
        num_tokens=2,
        probe_tokens=8,
        min_acceptance=0.5,
        reprobe_after_s=30.0,
    )
    p = Proposer(spec, clock=lambda: now[0])
    reqs = [Request(str(i), [1] * 10, SamplingParams(max_tokens=100)) for i in range(4)]
    for r in reqs:  # 4 requests x 2 rejected drafts: one engine-wide window of 8
        assert p.propose(r, 50) == [DRAFT_SLOT] * 2
        p.record(r, 2, 0)
    assert not any(r.spec_off for r in reqs)  # none reached its own probe...
    fresh = Request("new", [1] * 10, SamplingParams(max_tokens=100))
    assert p.propose(fresh, 50) == [] and p.propose(reqs[0], 50) == []  # ...but nobody drafts
    now[0] = 29.9
    assert p.propose(fresh, 50) == []
    now[0] = 30.0  # the period is over: the next window probes again
    assert p.propose(fresh, 50) == [DRAFT_SLOT] * 2
    for _ in range(10):  # a window at the threshold (4 of 8) keeps drafting on
        p.record(fresh, 2, 1)
        assert p.propose(fresh, 50) == [DRAFT_SLOT] * 2


def test_ngram_misses_switch_off_only_their_own_request():
    p = Proposer(SpeculativeConfig(num_tokens=4, probe_tokens=8, min_acceptance=0.5))
    bad = Request("bad", [1] * 10, SamplingParams(max_tokens=100))
    p.record(bad, 4, 0)
    p.record(bad, 4, 0)
    other = Request("other", [1] * 10, SamplingParams(max_tokens=100))
    assert bad.spec_off and p.propose(bad, 50) == []
    assert p.propose(other, 50) == [1, 1, 1, 1]


# ---- engines: identical tokens with and without speculation -------------------------------------
TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
    "nothing to do: once or twice she had peeped into the book her sister was reading, but it "
    "had no pictures or conversations in it."
)


def engine(model: str, spec: SpeculativeConfig | None, **cache) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model=model, dtype="float32", max_model_len=512),
            cache=CacheConfig(**({"block_size": 8, "num_blocks": 256} | cache)),
            # A small budget: prompts arrive in chunks, drafts compete with prefill.
            scheduler=SchedulerConfig(max_num_batched_tokens=48),
            speculative=spec,
        )
    )


def run_both(model: str | tuple[LLMEngine, LLMEngine], prompts, params, **cache):
    """Outputs of an engine without and one with speculation (built here from `model`, or a
    pair given); both block audits clean afterwards."""
    if isinstance(model, str):
        engines = [engine(model, None, **cache), engine(model, SPEC, **cache)]
    else:
        engines = list(model)
    outs = []
    for eng in engines:
        outs.append(eng.generate(prompts, params))
        audit = eng.block_audit()
        assert audit["leaked"] == 0 and audit["in_use"] == 0, audit
    return outs, engines


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_path):
    """SmolLM2 without and with speculation; 24 blocks of 8 tokens, so four ~60-90-token
    prompts with 40 outputs each must preempt."""
    pair = engine(smollm2_path, None, num_blocks=24), engine(smollm2_path, SPEC, num_blocks=24)
    yield pair
    for eng in pair:
        eng.shutdown()


def chat(tok, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))


def test_smollm2_greedy_identical_batched_chunked_preempted(smollm2_pair, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompts = [
        chat(tok, "Repeat this text exactly:\n" + TEXT),
        chat(tok, "Copy this sentence, replacing 'sister' with 'brother':\n" + TEXT),
        chat(tok, "Write a haiku about the sea."),
        chat(tok, "Repeat this list: apples, pears, plums, cherries, figs, dates, limes."),
    ]
    params = SamplingParams(max_tokens=40, temperature=0.0)
    (base, spec), (_, eng) = run_both(smollm2_pair, prompts, params)
    for a, b in zip(base, spec, strict=True):
        assert b.token_ids == a.token_ids and b.text == a.text
        assert b.finish_reason == a.finish_reason
    s = eng.stats()
    assert s.num_preemptions > 0
    assert s.spec_num_accepted_tokens > 10 and s.spec_num_draft_tokens >= s.spec_num_accepted_tokens


def test_qwen3_greedy_identical_with_stops(tiny_model_dir):
    model = tiny_model_dir("qwen3")
    pattern = [300 + i * 37 for i in range(9)]
    prompts = [
        pattern * 4,
        [500 + i for i in range(20)] + pattern * 2,
        [7000 + i for i in range(30)],
    ]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    (base, spec), (_, eng) = run_both(model, prompts, params, num_blocks=18)
    assert [o.token_ids for o in spec] == [o.token_ids for o in base]
    assert eng.stats().spec_num_accepted_tokens > 0 and eng.stats().num_preemptions > 0
    # A stop token from the middle of an output: tokens after it (in the same accepted run)
    # are dropped, exactly as without speculation; likewise max_tokens.
    ref = base[0].token_ids
    stop = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[ref[12]])
    short = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    (b2, s2), _ = run_both(model, prompts[:1] * 2, [stop, short])
    assert [o.token_ids for o in s2] == [o.token_ids for o in b2]
    assert s2[0].token_ids == ref[: ref.index(ref[12]) + 1] and len(s2[1].token_ids) == 7


def test_seeded_sampling_unchanged_by_speculation(smollm2_pair, smollm2_tokenizer):
    """Verification draws one row of noise per output token, as the plain sampler does: a
    seeded request gets the same tokens with speculation, rejections and resampling included."""
    tok = smollm2_tokenizer
    prompts = [
        chat(tok, "Repeat this text exactly:\n" + TEXT),
        chat(tok, "Rewrite this text in the past perfect tense:\n" + TEXT),
    ]
    params = [
        SamplingParams(max_tokens=24, temperature=0.7, seed=11),
        SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=5),
    ]
    (_, eng) = smollm2_pair
    before = eng.stats()
    (base, spec), _ = run_both(smollm2_pair, prompts, params)
    s = eng.stats()
    accepted = s.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    drafted = s.spec_num_draft_tokens - before.spec_num_draft_tokens
    assert 0 < accepted < drafted  # some accepted, some rejected and resampled
    assert [o.token_ids for o in spec] == [o.token_ids for o in base]


def test_yaml_section_reaches_the_engine_config():
    import yaml

    from deploy.config import FlotillaConfig

    text = """
engine:
  speculative: {method: ngram, num_tokens: 3, prompt_lookup_min: 1, prompt_lookup_max: 2}
"""
    cfg = FlotillaConfig.model_validate(yaml.safe_load(text))
    assert cfg.engine.speculative == SpeculativeConfig(
        num_tokens=3, prompt_lookup_min=1, prompt_lookup_max=2
    )
    bad = "engine:\n  speculative: {num_tokens: 0}\n"
    with pytest.raises(ValidationError, match="speculative.num_tokens"):
        FlotillaConfig.model_validate(yaml.safe_load(bad))


def test_only_requests_sampled_from_the_raw_logits_speculate():
    """Drafts are verified on the raw logits: a request whose sampling reads more than them
    (logprobs, penalties, a grammar's mask, a logit bias, min_tokens) never speculates."""
    from cluster.spec_decode import can_speculate
    from workers.sampling_params import SamplingParams
    from workers.structured_output import StructuredOutput

    assert can_speculate(SamplingParams(max_tokens=8))
    assert can_speculate(SamplingParams(max_tokens=8, temperature=0.7, seed=1))
    for kw in (
        {"logprobs": 1},
        {"repetition_penalty": 1.2},
        {"structured": StructuredOutput(kind="json_object")},
        {"logit_bias": {5: 3.0}},
        {"min_tokens": 2},
    ):
        assert not can_speculate(SamplingParams(max_tokens=8, **kw)), kw
