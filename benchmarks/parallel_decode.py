"""Decode step time and communication share for TP=1 / TP=2 / PP=2 (and EP=2 for MoE).

    .venv/bin/python benchmarks/parallel_decode.py [--batch 32] [--steps 20]

Random-weight models (seeded) built from transformers configs: a ~0.5B dense Qwen3-style model
and a small Qwen3-MoE. TP=1 runs in-process with 2 threads; multi-rank layouts run one Ray actor
per rank with 1 thread each (2 cores on this machine). Communication share = time inside
collectives / point-to-point transfers on a rank divided by the step time (mean over ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only Ray
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = os.path.join(os.path.dirname(__file__), "out")


def build_models() -> dict[str, str]:
    import torch
    import transformers

    from workers.loader import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    specs = {
        "dense-0.5B": transformers.Qwen3Config(
            vocab_size=49152, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
            tie_word_embeddings=True,
        ),
        "moe-8x": transformers.Qwen3MoeConfig(
            vocab_size=49152, hidden_size=512, intermediate_size=1536, moe_intermediate_size=768,
            num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=4096,
            tie_word_embeddings=True,
        ),
    }
    paths = {}
    for name, cfg in specs.items():
        path = os.path.join(OUT, "models", name)
        if not os.path.exists(os.path.join(path, "config.json")):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
            model.save_pretrained(path)
            tok.save_pretrained(path)
            del model
        paths[name] = path
    return paths


def measure(model: str, layout: dict, batch: int, steps: int, prompt_len: int) -> dict:
    from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
    from cluster.engine import LLMEngine
    from parallel.comm_timer import COMM
    from parallel.config import ParallelConfig
    from workers.config import ModelConfig
    from workers.sampling_params import SamplingParams

    ranks = max(layout.get("tp", 1), layout.get("ep", 1)) * layout.get("pp", 1)
    cfg = EngineConfig(
        model=ModelConfig(model=model, dtype="bfloat16", num_threads=2 if ranks == 1 else 1),
        cache=CacheConfig(block_size=16, kv_cache_memory_gib=1.0),
        scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=batch),
        parallel=ParallelConfig(**layout, cpus_per_rank=1.0),
    )
    eng = LLMEngine(cfg)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        eng.add_request([rng.randrange(100, 40000) for _ in range(prompt_len)], params)
    while any(r.num_computed_tokens < r.num_tokens - 1 for r in eng.scheduler.requests.values()):
        eng.step()  # prefill until every request decodes
    for _ in range(3):
        eng.step()  # warm-up decode steps
    multi = ranks > 1
    if multi:
        eng.executor.comm_timing(True)
    else:
        COMM.enabled, _ = True, COMM.take()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    elapsed = time.perf_counter() - t0
    per_rank = eng.executor.comm_timing(False) if multi else [COMM.take()]
    eng.shutdown()
    comm = sum(s for s, _ in per_rank) / len(per_rank)
    return {
        "step_ms": 1000 * elapsed / steps,
        "tok_s": batch * steps / elapsed,
        "comm_share": comm / elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=128)
    args = ap.parse_args()
    import ray

    paths = build_models()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs = [
        ("dense-0.5B", {}), ("dense-0.5B", {"tp": 2}), ("dense-0.5B", {"pp": 2}),
        ("moe-8x", {}), ("moe-8x", {"tp": 2}), ("moe-8x", {"ep": 2}), ("moe-8x", {"pp": 2}),
    ]
    rows = []
    for name, layout in runs:
        r = measure(paths[name], layout, args.batch, args.steps, args.prompt_len)
        label = ", ".join(f"{k}={v}" for k, v in layout.items()) or "tp=1 (2 threads)"
        rows.append({"model": name, "layout": label, **r})
        print(f"{name:11s} {label:18s} step {r['step_ms']:8.1f} ms  {r['tok_s']:7.1f} tok/s"
              f"  comm {100 * r['comm_share']:5.1f}%", flush=True)
    ray.shutdown()
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "parallel_decode.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    print("\n| model | layout | decode step (ms) | tokens/s | communication |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['layout']} | {r['step_ms']:.1f} | {r['tok_s']:.1f} | "
              f"{100 * r['comm_share']:.1f}% |")


if __name__ == "__main__":
    main()
