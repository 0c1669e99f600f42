"""The real SmolLM2-135M-Instruct with model.quantization=int8, and with the int8 KV cache
(cache.kv_dtype=int8), each against the unquantized model (float32): greedy chat answers agree
for their first 32 tokens on most prompts, and perplexity over 20k tokens of English text is
within 2%. Both run on our own model, linear methods (Int8Linear: the native kernel for decode,
linear_w8_gemm, the packed float32 GEMM dequantizing block by block, for prefill) and attention (the int8 decode kernel; the
float32 prefill kernel over the int8 rows, or SDPA over dequantized blocks where it declines,
every chunk reading its keys back from the quantized cache), not on Hugging Face's.

The float32 side of the perplexity is data: each window's summed NLL, computed by this file's
own pass (`python tests/cluster/test_smollm2_int8.py` rewrites it) and kept in
data/smollm2_f32_window_nll.json, because the float32 pass over 20k tokens is ~2 minutes of
the suite. The test recomputes SPOT_CHECK windows of it in float32 every run, so a change to
the model, the text, the tokenizer or the float32 path fails here instead of going stale."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
REFERENCE = Path(__file__).parent / "data" / "smollm2_f32_window_nll.json"
SPOT_CHECK = (0, 13)  # float32 windows recomputed every run (first, and one mostly code)


@pytest.fixture(scope="module")
def engines() -> dict[str, LLMEngine]:
    """none: float32; int8: int8 weights; kv8: float32 weights, int8 KV cache (the same 1 GiB)."""
    # prefix caching off: the perplexity pass writes KV blocks behind the block manager's back
    cache = CacheConfig(enable_prefix_caching=False)
    out = {
        q: LLMEngine(EngineConfig(model=ModelConfig(dtype="float32", quantization=q), cache=cache))
        for q in ("none", "int8")
    }
    kv8 = cache.model_copy(update={"kv_dtype": "int8"})
    out["kv8"] = LLMEngine(EngineConfig(model=ModelConfig(dtype="float32"), cache=kv8))
    return out


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


@pytest.fixture(scope="module")
def chat(engines, smollm2_tokenizer):
    """(prompts, params, float32's answers): computed once for both quantizations."""
    prompts = [
        smollm2_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in QUESTIONS
    ]
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0)
    return prompts, params, engines["none"].generate(prompts, params)


@pytest.mark.parametrize("which", ["int8", "kv8"])
def test_int8_greedy_chat_agrees_with_float32(engines, chat, which):
    """int8: int8 weights; kv8: the int8 KV cache (decodes by its native kernel here)."""
    prompts, params, ref = chat
    got = engines[which].generate(prompts, params)
    same = [a.token_ids == b.token_ids for a, b in zip(ref, got, strict=True)]
    detail = [(a.text, b.text) for a, b, s in zip(ref, got, same, strict=True) if not s]
    print(f"{which} greedy answers identical to float32's: {sum(same)} of {len(same)}")
    assert sum(same) >= 5, detail
    assert "Paris" in got[0].text


def test_kv8_holds_its_bytes_of_blocks(engines):
    """The same kv_cache_memory_gib holds 3.76x float32's blocks in int8 (1.88x bf16's): a
    block's bytes count the scales. SmolLM2: 30 layers x 3 KV heads x 64; 16-token blocks."""
    f32, kv8 = (engines[k].executor.runner for k in ("none", "kv8"))
    assert f32.bytes_per_block() == 2 * 30 * 16 * 3 * 64 * 4  # 737,280
    assert kv8.bytes_per_block() == 2 * 30 * 16 * 3 * (64 + 4)  # 195,840 (bf16: 368,640)
    assert (f32.num_blocks, kv8.num_blocks) == (2**30 // 737_280, 2**30 // 195_840)  # 1456, 5482
    cache = kv8.kv_caches[0]
    assert cache.dtype == torch.int8 and cache.shape == (2, 5482, 16, 3, 68)
    assert sum(c.numel() for c in kv8.kv_caches) <= 2**30


@torch.inference_mode()
def _window_nll(engine: LLMEngine, ids: list[int], w: int) -> float:
    """Summed NLL of every token after the first of window w, the window one sequence
    prefilled in CHUNK-token steps through the paged KV cache (blocks 0.. of the engine's
    cache, idle here), logits of every position from the model's own head."""
    runner = engine.executor.runner
    table = list(range(-(-WINDOW // runner.block_size)))
    seq = ids[w * (WINDOW + 1) : (w + 1) * (WINDOW + 1)]
    total = 0.0
    for c0 in range(0, WINDOW, CHUNK):
        plan = SeqPlan("ppl", seq[c0 : c0 + CHUNK], c0, table, sample=False)
        input_ids, meta, _, _ = runner._prepare([plan])
        hidden = runner.model(input_ids, None, meta, runner.kv_caches)
        logits = runner.model.compute_logits(hidden).float()
        target = torch.tensor(seq[c0 + 1 : c0 + CHUNK + 1])
        total += F.cross_entropy(logits, target, reduction="sum").item()
    return total


def _perplexity(window_nll: list[float]) -> float:
    assert len(window_nll) == WINDOWS
    return math.exp(sum(window_nll) / (WINDOWS * WINDOW))


def test_int8_perplexity_within_2_percent(engines, text_ids):
    """int8 weights; the stored float32 figures are checked on SPOT_CHECK windows here."""
    ref = json.loads(REFERENCE.read_text())
    assert ref["window"] == WINDOW and ref["chunk"] == CHUNK and len(ref["nll"]) == WINDOWS
    for w in SPOT_CHECK:  # the stored float32 figures are still this code's
        got = _window_nll(engines["none"], text_ids, w)
        assert got == pytest.approx(ref["nll"][w], rel=1e-4), (w, got, ref["nll"][w])
    ppl = {
        "none": _perplexity(ref["nll"]),
        "int8": _perplexity([_window_nll(engines["int8"], text_ids, w) for w in range(WINDOWS)]),
    }
    print(f"perplexity over {WINDOWS * WINDOW} tokens: {ppl}")
    assert ppl["none"] < 100  # the text and the model are what they should be
    assert abs(ppl["int8"] / ppl["none"] - 1) <= 0.02, ppl


def test_kv8_perplexity_within_2_percent(engines, text_ids):
    """The int8 KV cache: every one of the CHUNK-token prefill chunks reads its keys and values
    back from the quantized cache (its own as well as the earlier chunk's), so every predicted
    token carries the KV quantization error. One pass of the 20 windows."""
    ref = json.loads(REFERENCE.read_text())
    ppl = {
        "none": _perplexity(ref["nll"]),
        "kv8": _perplexity([_window_nll(engines["kv8"], text_ids, w) for w in range(WINDOWS)]),
    }
    print(f"perplexity over {WINDOWS * WINDOW} tokens: {ppl}")
    assert ppl["kv8"] != ppl["none"]  # the quantization is really in the path
    assert abs(ppl["kv8"] / ppl["none"] - 1) <= 0.02, ppl


if __name__ == "__main__":  # rewrite the float32 reference (after a deliberate change)
    from pydoc_data.topics import topics

    from workers.loader import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))

    ids = tok("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    ids = ids[: WINDOWS * (WINDOW + 1)]
    cache = CacheConfig(enable_prefix_caching=False)
    eng = LLMEngine(EngineConfig(model=ModelConfig(dtype="float32"), cache=cache))
    nll = [_window_nll(eng, ids, w) for w in range(WINDOWS)]
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps({"window": WINDOW, "chunk": CHUNK, "nll": nll}, indent=1))
    print(f"wrote {REFERENCE}: perplexity {_perplexity(nll):.4f}")
