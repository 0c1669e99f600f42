"""Where a decode step's time goes: SmolLM2-135M-Instruct (bf16 by default), B requests with
prompts of --prompt-len random tokens, decoding --tokens tokens each.

    .venv/bin/python benchmarks/profile_decode.py --batch 1 --threads 2
    .venv/bin/python benchmarks/profile_decode.py --batch 32 --attention sdpa --profile

Prints ms per decode step ((T_n - T_1) / (n - 1), best of --repeats) and, with --profile, the
torch profiler's top operators by self CPU time over the decode steps of one run.
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kernels", default="auto", choices=["auto", "native", "torch"])
    p.add_argument("--no-prepack", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()

    import torch

    from cluster.config import EngineConfig
    from cluster.engine import LLMEngine
    from workers.config import ModelConfig
    from workers.sampling_params import SamplingParams

    mc = ModelConfig(
        dtype=args.dtype,
        num_threads=args.threads,
        kernels=args.kernels,
        prepack=not args.no_prepack,
    )
    engine = LLMEngine(EngineConfig(model=mc))
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 49000) for _ in range(args.prompt_len)] for _ in range(args.batch)
    ]

    def run(n: int) -> float:
        sp = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
        t0 = time.perf_counter()
        outs = engine.generate(prompts, sp)
        assert all(len(o.token_ids) == n for o in outs)
        return time.perf_counter() - t0

    run(4)  # warm-up
    t1 = min(run(1) for _ in range(args.repeats))
    tn = min(run(args.tokens) for _ in range(args.repeats))
    step = (tn - t1) / (args.tokens - 1)
    print(
        f"batch {args.batch} prompt {args.prompt_len} threads {args.threads} "
        f"kernels {args.kernels} ({'native' if engine.executor.runner.native else 'torch'})"
        f": {step * 1e3:.2f} ms/step, {args.batch / step:.1f} tok/s, prefill {t1 * 1e3:.1f} ms"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(args.tokens)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    del torch


if __name__ == "__main__":
    main()
