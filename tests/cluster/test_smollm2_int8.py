"""The real SmolLM2-135M-Instruct with model.quantization=int8 against the unquantized model
(float32 on a CPU without fast bf16): greedy chat answers agree for their first 32 tokens on
most prompts, and perplexity over 20k tokens of English text is within 2%. Both run on our own
model and linear methods (Int8Linear: the native kernel for decode, torch on the dequantized
weight for prefill), not on Hugging Face's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cluster.config import CacheConfig, EngineConfig
from cluster.engine import LLMEngine
from workers.config import ModelConfig
from workers.messages import SeqPlan
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning, my friend' into Spanish.",
    "What is 12 times 7? Answer briefly.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "Write a Python function that reverses a string.",
]
TOKENS = 32
WINDOW, CHUNK, WINDOWS = 1024, 512, 20  # 20 x 1024 = 20,480 predicted tokens


@pytest.fixture(scope="module")
def engines() -> dict[str, LLMEngine]:
    # prefix caching off: the perplexity pass writes KV blocks behind the block manager's back
    cache = CacheConfig(enable_prefix_caching=False)
    return {
        q: LLMEngine(EngineConfig(model=ModelConfig(dtype="float32", quantization=q), cache=cache))
        for q in ("none", "int8")
    }


@pytest.fixture(scope="module")
def text_ids(smollm2_tokenizer) -> list[int]:
    """English prose (with some code) that ships with every Python: the stdlib's pydoc topics,
    in a fixed order, as WINDOWS windows of WINDOW + 1 tokens."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = smollm2_tokenizer(text).input_ids
    need = WINDOWS * (WINDOW + 1)
    assert len(ids) >= need
    return ids[:need]


def test_int8_greedy_chat_agrees_with_float32(engines, smollm2_tokenizer):
    prompts = [
        smollm2_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in QUESTIONS
    ]
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0)
    ref = engines["none"].generate(prompts, params)
    got = engines["int8"].generate(prompts, params)
    same = [a.token_ids == b.token_ids for a, b in zip(ref, got, strict=True)]
    detail = [(a.text, b.text) for a, b, s in zip(ref, got, same, strict=True) if not s]
    print(f"int8 greedy answers identical to float32's: {sum(same)} of {len(same)}")
    assert sum(same) >= 5, detail
    assert "Paris" in got[0].text


@torch.inference_mode()
def _perplexity(engine: LLMEngine, ids: list[int]) -> float:
    """exp(mean NLL) of every token after the first of each window, each window one sequence
    prefilled in CHUNK-token steps through the paged KV cache (blocks 0.. of the engine's
    cache, idle here), logits of every position from the model's own head."""
    runner = engine.executor.runner
    table = list(range(-(-WINDOW // runner.block_size)))
    total, count = 0.0, 0
    for w in range(WINDOWS):
        seq = ids[w * (WINDOW + 1) : (w + 1) * (WINDOW + 1)]
        for c0 in range(0, WINDOW, CHUNK):
            plan = SeqPlan("ppl", seq[c0 : c0 + CHUNK], c0, table, sample=False)
            input_ids, meta, _, _ = runner._prepare([plan])
            hidden = runner.model(input_ids, None, meta, runner.kv_caches)
            logits = runner.model.compute_logits(hidden).float()
            target = torch.tensor(seq[c0 + 1 : c0 + CHUNK + 1])
            total += F.cross_entropy(logits, target, reduction="sum").item()
            count += len(target)
    assert count == WINDOWS * WINDOW
    return math.exp(total / count)


def test_int8_perplexity_within_2_percent(engines, text_ids):
    ppl = {q: _perplexity(e, text_ids) for q, e in engines.items()}
    print(f"perplexity over {WINDOWS * WINDOW} tokens: {ppl}")
    assert ppl["none"] < 100  # the text and the model are what they should be
    assert abs(ppl["int8"] / ppl["none"] - 1) <= 0.02, ppl
