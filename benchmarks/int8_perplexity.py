"""Perplexity of SmolLM2-135M-Instruct over the 20,480 tokens of tests/cluster/test_smollm2_int8.py
(the stdlib's pydoc topics, 20 windows of 1,024 predicted tokens, 512-token prefill chunks
through the paged KV cache), per configuration, with the test's own pass:

    .venv/bin/python benchmarks/int8_perplexity.py [--group-sizes 32,64]

float32 (the stored reference of that test, whose spot checks it also recomputes), int8 per
output channel, int8 with each group size (model.quantization_group_size), and the int8 KV
cache. The test asserts per-channel int8 and the int8 KV cache within 2%; this prints the
group-wise figures beside them (a real-model quality figure the suite does not pay for)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "cluster"))

import test_smollm2_int8 as t  # noqa: E402  (the test's text, windows and pass)

from cluster.config import CacheConfig, EngineConfig  # noqa: E402
from cluster.engine import LLMEngine  # noqa: E402
from workers.config import ModelConfig  # noqa: E402
from workers.loader import load_tokenizer, resolve_model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group-sizes", default="32,64")
    args = ap.parse_args()
    from pydoc_data.topics import topics

    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    ids = tok("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    ids = ids[: t.WINDOWS * (t.WINDOW + 1)]
    cache = CacheConfig(enable_prefix_caching=False)
    ref = json.loads(t.REFERENCE.read_text())["nll"]
    base = t._perplexity(ref)
    configs = {"int8 per channel": (ModelConfig(dtype="float32", quantization="int8"), cache)}
    for g in filter(None, args.group_sizes.split(",")):
        mc = ModelConfig(dtype="float32", quantization="int8", quantization_group_size=int(g))
        configs[f"int8 groups of {g}"] = (mc, cache)
    kv8 = cache.model_copy(update={"kv_dtype": "int8"})
    configs["int8 KV cache"] = (ModelConfig(dtype="float32"), kv8)
    f32 = LLMEngine(EngineConfig(model=ModelConfig(dtype="float32"), cache=cache))
    for w in t.SPOT_CHECK:  # the stored float32 figures are still this code's
        got = t._window_nll(f32, ids, w)
        assert abs(got / ref[w] - 1) < 1e-4, (w, got, ref[w])
    del f32
    print("| configuration | perplexity | vs float32 | pass s |\n|---|---:|---:|---:|")
    print(f"| float32 | {base:.4f} | - | - |", flush=True)
    for name, (mc, cc) in configs.items():
        eng = LLMEngine(EngineConfig(model=mc, cache=cc))
        t0 = time.perf_counter()
        ppl = t._perplexity([t._window_nll(eng, ids, w) for w in range(t.WINDOWS)])
        dt = time.perf_counter() - t0
        print(f"| {name} | {ppl:.4f} | {ppl / base - 1:+.2%} | {dt:.0f} |", flush=True)
        del eng


if __name__ == "__main__":
    main()
