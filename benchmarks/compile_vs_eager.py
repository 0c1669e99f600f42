"""model.compile (issue 21): SmolLM2-135M-Instruct decode steps and a prefill through three
paths, interleaved in one process so a shared machine's load hits them alike:

- eager:    kernels=torch, compile=none (plain torch ops)
- compiled: kernels=torch, compile=torch_compile (inductor on the layers' dense code)
- native:   kernels=native (the C++ CPU kernels; compile does not apply)

    .venv/bin/python benchmarks/compile_vs_eager.py --threads 2 --repeats 3

Decode: B requests of --prompt-len random tokens; ms per step = (T_n - T_1) / (n - 1) of two
generate() calls. Prefill: one prompt of --prefill-len tokens, one output token (prefix
caching off, so every repeat prefills). Prints medians over --repeats rounds, the compiled
engine's first-steps time (its graphs compile there) against eager's, and whether the greedy
tokens of the three paths agree.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--tokens", type=int, default=17)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="eager,compiled,native")
    args = p.parse_args()

    from cluster.config import CacheConfig, EngineConfig
    from cluster.engine import LLMEngine
    from workers.config import ModelConfig
    from workers.sampling_params import SamplingParams

    settings = {
        "eager": dict(kernels="torch"),
        "compiled": dict(kernels="torch", compile="torch_compile"),
        "native": dict(kernels="native"),
    }
    variants = args.variants.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 49000) for _ in range(args.prompt_len)] for _ in range(max(batches))
    ]
    long_prompt = [rng.randrange(100, 49000) for _ in range(args.prefill_len)]

    def gen(engine, ps, n: int) -> tuple[float, list[list[int]]]:
        sp = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
        t0 = time.perf_counter()
        outs = engine.generate(ps, sp)
        return time.perf_counter() - t0, [o.token_ids for o in outs]

    engines, first_steps, tokens = {}, {}, {}
    for v in variants:
        mc = ModelConfig(dtype=args.dtype, num_threads=args.threads, **settings[v])
        cache = CacheConfig(enable_prefix_caching=False, kv_cache_memory_gib=1.0)
        engines[v] = LLMEngine(EngineConfig(model=mc, cache=cache))
        # the first steps: every shape class (prefill, decode of 1 and of several rows)
        t0 = time.perf_counter()
        gen(engines[v], prompts[:2], 3)
        gen(engines[v], prompts[:1], 3)
        gen(engines[v], [long_prompt], 1)
        first_steps[v] = time.perf_counter() - t0
        tokens[v] = gen(engines[v], prompts[:8], 8)[1]
        print(f"{v}: first steps {first_steps[v]:.1f} s", flush=True)

    rows = [f"decode b={b}" for b in batches] + [f"prefill {args.prefill_len}"]
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.repeats):
        for b in batches:
            for v in variants:
                t1 = gen(engines[v], prompts[:b], 1)[0]
                tn = gen(engines[v], prompts[:b], args.tokens)[0]
                times.setdefault((v, rows[batches.index(b)]), []).append(
                    (tn - t1) / (args.tokens - 1)
                )
        for v in variants:
            times.setdefault((v, rows[-1]), []).append(gen(engines[v], [long_prompt], 1)[0])
        # the table so far after every round (a long run on a loaded machine can be cut short)
        print(f"\n{args.dtype}, {args.threads} threads, median of {r + 1} round(s) (ms)")
        print("| step | " + " | ".join(variants) + " |")
        print("|---|" + "---:|" * len(variants))
        for row in rows:
            cells = [f"{statistics.median(times[(v, row)]) * 1e3:.1f}" for v in variants]
            print(f"| {row} | " + " | ".join(cells) + " |", flush=True)
    print("first steps (s): " + ", ".join(f"{v} {first_steps[v]:.1f}" for v in variants))
    ref = tokens[variants[0]]
    for v in variants[1:]:
        same = sum(a == b for a, b in zip(ref, tokens[v], strict=True))
        print(f"greedy tokens {v} vs {variants[0]}: {same}/{len(ref)} requests identical")


if __name__ == "__main__":
    main()
